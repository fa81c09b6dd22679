"""RefCOCO / RefCOCO+ / RefCOCOg Tasks in the common format (`tasks_common`) over the records of
`build.py refcoco` (`refcoco.feature_description`: one record per referred object).

  register_refcoco_task("refcoco_loc", "OUT/refcoco_{split}.tfrecord-*", "spiece.model")
  register_refcoco_task("refcoco_loco", ..., kind="loco")
  for b in tasks_common.get_batches("refcoco_loc", split="testA", batch_size=8, shuffle=False,
                                    num_epochs=1, drop_remainder=False): ...

One example per expression (every split; RefCOCO metrics count expressions), R' = 1 prompt:
  kind "loc" (referring localization): prompt_text = prompt_prefix + expression, targets = the
    expression (teacher forced), the GT box as the 2 points of the position whose target is EOS
    (`tasks_common` "Box at EOS"), caption_weights 0 unless caption_loss=True;
  kind "loco" (location-conditioned captioning): prompt_boxes = the GT box, prompt_text =
    region_prompt, targets = the expression, caption loss on, no point loss.
Extra features (dropped by Mixtures unless asked for): gt_boxes float32[R, 4] (padded frame),
masks uint8[R, S, S] in {0, 1} (resized like the image, nearest neighbour), mask_weights
float32[R] (0 when the record has no mask), ref_id int64[], expression_id int64[], references
string[M] (all expressions of the object).

Shape letters: S image side, R prompts, M expressions of the object, H, W record image size.
"""
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from pixel_llm.data import preprocess, refcoco, tasks_common

DEFAULT_SPLITS = ("train", "val", "testA", "testB")
DEFAULT_REGION_PROMPT = "Describe the region."
KINDS = ("loc", "loco")


def _mask(png: tf.Tensor, height: tf.Tensor, width: tf.Tensor, extent: tf.Tensor,
          size: int) -> tf.Tensor:
  """1-bit PNG at image size (or b"") -> uint8[S, S] in {0, 1}, placed like `resize_and_pad`."""
  decoded = tf.cond(tf.strings.length(png) > 0,
                    lambda: tf.io.decode_png(png, channels=1),
                    lambda: tf.zeros(tf.stack([height, width, 1]), tf.uint8))
  decoded.set_shape([None, None, 1])
  new_hw = tf.cast(tf.round(extent[::-1] * size), tf.int32)
  resized = tf.image.resize(tf.cast(decoded > 0, tf.uint8), new_hw, method="nearest")
  return tf.image.pad_to_bounding_box(resized, 0, 0, size, size)[..., 0]


def _preprocessors(vocab: seqio.SentencePieceVocabulary, name: str, kind: str, image_size: int,
                   text_field: str, caption_loss: bool, prompt_prefix: str,
                   region_prompt: str) -> list:
  tokenizer = vocab.tf_tokenizer
  region_ids = tf.constant(vocab.encode(region_prompt), tf.int32)

  def per_expression(ds):
    def fn(ex):
      ex = tasks_common.dense(ex)
      texts, ids = ex[f"expression/{text_field}"], ex["expression/id"]
      where = ["refcoco record image/id", ex["image/id"], "ref/id", ex["ref/id"]]
      box = ex["box"]
      checks = [
          tf.debugging.Assert(tf.size(texts) > 0, ["no expression:"] + where),
          tf.debugging.Assert(tf.size(texts) == tf.size(ids), ["expressions != ids:"] + where),
          tf.debugging.Assert(tf.reduce_all(box[2:] > box[:2]) & tf.reduce_all(box >= 0)
                              & tf.reduce_all(box <= 1), ["bad box", box] + where)]
      with tf.control_dependencies(checks):
        image, image_mask, extent = preprocess.resize_and_pad(ex["image/encoded"], image_size)
      mask = _mask(ex["mask"], tf.cast(ex["image/height"], tf.int32),
                   tf.cast(ex["image/width"], tf.int32), extent, image_size)
      n = tf.size(texts)
      rep = lambda x: tf.broadcast_to(x, tf.concat([[n], tf.shape(x)], 0))  # noqa: E731
      return tf.data.Dataset.from_tensor_slices({
          "expression": texts, "expression_id": ids, "image": rep(image),
          "image_mask": rep(image_mask), "image_id": rep(ex["image/id"]),
          "ref_id": rep(ex["ref/id"]), "box": rep(box * tf.tile(extent, [2])),
          "mask": rep(mask), "mask_weight": rep(tf.cast(tf.strings.length(ex["mask"]) > 0,
                                                        tf.float32)),
          "references": rep(texts)})
    return ds.flat_map(tasks_common.plain(fn))

  def to_common(ds, sequence_length=None):
    r, _, _ = tasks_common.lengths(sequence_length)

    def fn(ex):
      expression = ex["expression"]
      tokens = tf.cast(tokenizer.tokenize(expression), tf.int32)
      check = tf.debugging.Assert(tf.size(tokens) > 0, [
          "expression without tokens: image/id", ex["image_id"], "ref/id", ex["ref_id"]])
      with tf.control_dependencies([check]):
        targets = tf.RaggedTensor.from_tensor(tokens[None])
      box = ex["box"][None]
      if kind == "loc":
        context = tf.strings.join([prompt_prefix, expression])
        prompt = tf.cast(tokenizer.tokenize(context), tf.int32)
        extra = dict(prompt_boxes=tf.constant([tasks_common.WHOLE_BOX]), eos_boxes=box,
                     caption_weights=tf.fill([1], 1.0 if caption_loss else 0.0))
      else:
        prompt = region_ids
        extra = dict(prompt_boxes=box, caption_weights=tf.ones([1]))
      out = tasks_common.pack(
          task=name, image=ex["image"], image_mask=ex["image_mask"], image_id=ex["image_id"],
          targets=targets, prompt_text=tf.RaggedTensor.from_tensor(prompt[None]),
          captions=expression[None], sequence_length=sequence_length, **extra)
      out.update(
          gt_boxes=tf.ensure_shape(tasks_common.rows(box, r, tasks_common.WHOLE_BOX), [r, 4]),
          masks=tasks_common.rows(ex["mask"][None], r, 0),
          mask_weights=tasks_common.rows(ex["mask_weight"][None], r, 0.0),
          ref_id=ex["ref_id"], expression_id=ex["expression_id"], references=ex["references"])
      return out
    return ds.map(tasks_common.plain(fn), num_parallel_calls=tasks_common.AUTOTUNE)

  return [per_expression, to_common]


def register_refcoco_task(name: str, tfrecord_pattern: str | Mapping[str, str], vocab_path: str,
                          *, kind: str = "loc", image_size: int = 384,
                          splits: Sequence[str] = DEFAULT_SPLITS, text_field: str = "raw",
                          caption_loss: bool = False, prompt_prefix: str = "",
                          region_prompt: str = DEFAULT_REGION_PROMPT, extra_ids: int = 0,
                          shuffle_buffer_size: int = 1000) -> seqio.Task:
  """Registers (or replaces) a RefCOCO-family Task (module docstring).

  kind: "loc" (referring localization, box at EOS) or "loco" (location-conditioned captioning).
  splits: RefCOCO/RefCOCO+ UNC: train, val, testA, testB; RefCOCOg UMD: train, val, test.
  text_field: "raw" (the annotators' text) or "sent" (the lower-cased, cleaned form).
  caption_loss: "loc" only; the release trains referring localization without the text loss.
  prompt_prefix: "loc" only, put before the expression in the prompt (the release: "where is ").
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
  if text_field not in ("raw", "sent"):
    raise ValueError(f"text_field must be 'raw' or 'sent', not {text_field!r}")
  for split in splits:
    refcoco.check_split(split)
  vocab = seqio.SentencePieceVocabulary(vocab_path, extra_ids=extra_ids)
  source = seqio.TFExampleDataSource(tasks_common.split_patterns(tfrecord_pattern, splits),
                                     refcoco.feature_description())
  return tasks_common.add_task(
      name, source, vocab,
      _preprocessors(vocab, name, kind, image_size, text_field, caption_loss, prompt_prefix,
                     region_prompt),
      image_size, shuffle_buffer_size)
