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
Train images may be scale-jittered (`scale_jitter`, the release's 0.75-1.25; box and mask move
with the image; see `_placer`); eval splits never are.
Extra features (dropped by Mixtures unless asked for): gt_boxes float32[R, 4] (padded frame),
masks uint8[R, S, S] in {0, 1} (resized like the image, nearest neighbour), mask_weights
float32[R] (0 when the record has no mask), ref_id int64[], expression_id int64[], references
string[M] (all expressions of the object).

Shape letters: S image side, R prompts, M expressions of the object, H, W record image size.
"""
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from pixel_llm.data import augment, preprocess, refcoco, tasks_common

DEFAULT_SPLITS = ("train", "val", "testA", "testB")
DEFAULT_REGION_PROMPT = "Describe the region."
KINDS = ("loc", "loco")


def _decode_mask(png: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """1-bit PNG at image size (or b"": all zero) -> uint8[H, W] in {0, 1}."""
  decoded = tf.cond(tf.strings.length(png) > 0,
                    lambda: tf.io.decode_png(png, channels=1),
                    lambda: tf.zeros(tf.stack([height, width, 1]), tf.uint8))
  decoded.set_shape([None, None, 1])
  return tf.cast(decoded[..., 0] > 0, tf.uint8)


def _mask(png: tf.Tensor, height: tf.Tensor, width: tf.Tensor, extent: tf.Tensor,
          size: int) -> tf.Tensor:
  """1-bit PNG at image size (or b"") -> uint8[S, S] in {0, 1}, placed like `resize_and_pad`."""
  new_hw = tf.cast(tf.round(extent[::-1] * size), tf.int32)
  resized = tf.image.resize(_decode_mask(png, height, width)[..., None], new_hw, method="nearest")
  return tf.image.pad_to_bounding_box(resized, 0, 0, size, size)[..., 0]


def _placer(image_size: int, scale_jitter: tuple[float, float] | None):
  """The seeded preprocessor that decodes a record's image and puts image, box and mask in the
  padded square frame: `resize_and_pad`, or on train records with `scale_jitter` (lo, hi)
  `augment.scale_jitter` (longer side to s * S, s ~ U[lo, hi], random crop / pad). A crop that
  loses the referred box falls back to the plain resize. seqio runs its preprocessors after the
  epoch repeat and draws the per-example seeds from one stream, so every epoch gets fresh draws,
  the same for the same `seed` (and so for a resumed run)."""

  @seqio.map_over_dataset(num_seeds=1)
  def place(ex, seed):
    ex = tasks_common.dense(ex)
    box = ex["box"]
    where = ["refcoco record image/id", ex["image/id"], "ref/id", ex["ref/id"]]
    check = tf.debugging.Assert(tf.reduce_all(box[2:] > box[:2]) & tf.reduce_all(box >= 0)
                                & tf.reduce_all(box <= 1), ["bad box", box] + where)
    height = tf.cast(ex["image/height"], tf.int32)
    width = tf.cast(ex["image/width"], tf.int32)
    with tf.control_dependencies([check]):
      decoded = preprocess.decode(ex["image/encoded"])  # once, also for the jitter's fallback

    def plain():
      image, image_mask, extent = preprocess.resize_and_pad_decoded(decoded, image_size)
      return (image, image_mask, box * tf.tile(extent, [2]),
              _mask(ex["mask"], height, width, extent, image_size))

    def jittered():
      out = augment.scale_jitter(decoded, box[None], tf.zeros([0, 2]),
                                 _decode_mask(ex["mask"], height, width)[None], seed,
                                 min_scale=scale_jitter[0], max_scale=scale_jitter[1],
                                 size=image_size)
      return tf.cond(out["box_valid"][0],
                     lambda: (out["image"], out["image_mask"], out["boxes"][0], out["masks"][0]),
                     plain)

    if scale_jitter is None:
      image, image_mask, placed_box, mask = plain()
    else:
      image, image_mask, placed_box, mask = tf.cond(ex["source/split"] == "train", jittered, plain)
    return {**ex, "image": image, "image_mask": image_mask, "placed_box": placed_box,
            "placed_mask": mask}

  return place


def _preprocessors(vocab: seqio.SentencePieceVocabulary, name: str, kind: str, image_size: int,
                   text_field: str, caption_loss: bool, prompt_prefix: str,
                   region_prompt: str, scale_jitter: tuple[float, float] | None) -> list:
  tokenizer = vocab.tf_tokenizer
  region_ids = tf.constant(vocab.encode(region_prompt), tf.int32)

  def per_expression(ds):
    def fn(ex):
      texts, ids = ex[f"expression/{text_field}"], ex["expression/id"]
      where = ["refcoco record image/id", ex["image/id"], "ref/id", ex["ref/id"]]
      checks = [
          tf.debugging.Assert(tf.size(texts) > 0, ["no expression:"] + where),
          tf.debugging.Assert(tf.size(texts) == tf.size(ids), ["expressions != ids:"] + where)]
      with tf.control_dependencies(checks):
        n = tf.size(texts)
      rep = lambda x: tf.broadcast_to(x, tf.concat([[n], tf.shape(x)], 0))  # noqa: E731
      return tf.data.Dataset.from_tensor_slices({
          "expression": texts, "expression_id": ids, "image": rep(ex["image"]),
          "image_mask": rep(ex["image_mask"]), "image_id": rep(ex["image/id"]),
          "ref_id": rep(ex["ref/id"]), "box": rep(ex["placed_box"]),
          "mask": rep(ex["placed_mask"]), "mask_weight": rep(tf.cast(
              tf.strings.length(ex["mask"]) > 0, tf.float32)),
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

  return [_placer(image_size, scale_jitter), per_expression, to_common]


def register_refcoco_task(name: str, tfrecord_pattern: str | Mapping[str, str], vocab_path: str,
                          *, kind: str = "loc", image_size: int = 384,
                          splits: Sequence[str] = DEFAULT_SPLITS, text_field: str = "raw",
                          caption_loss: bool = False, prompt_prefix: str = "",
                          region_prompt: str = DEFAULT_REGION_PROMPT, extra_ids: int = 0,
                          shuffle_buffer_size: int = 1000,
                          scale_jitter: tuple[float, float] | None = None) -> seqio.Task:
  """Registers (or replaces) a RefCOCO-family Task (module docstring).

  kind: "loc" (referring localization, box at EOS) or "loco" (location-conditioned captioning).
  splits: RefCOCO/RefCOCO+ UNC: train, val, testA, testB; RefCOCOg UMD: train, val, test.
  text_field: "raw" (the annotators' text) or "sent" (the lower-cased, cleaned form).
  caption_loss: "loc" only; the release trains referring localization without the text loss.
  prompt_prefix: "loc" only, put before the expression in the prompt (the release: "where is ").
  scale_jitter: (min, max) scale of the train split's images (the release: (0.75, 1.25)); None
    resizes every split plainly. Eval splits are never jittered.
  """
  if scale_jitter is not None and not 0 < scale_jitter[0] <= scale_jitter[1]:
    raise ValueError(f"scale_jitter must be (min, max) with 0 < min <= max, got {scale_jitter}")
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
  if text_field not in ("raw", "sent"):
    raise ValueError(f"text_field must be 'raw' or 'sent', not {text_field!r}")
  for split in splits:
    refcoco.check_split(split)
  vocab = seqio.SentencePieceVocabulary(vocab_path, extra_ids=extra_ids)
  source = tasks_common.SplitTaggedSource(tasks_common.split_patterns(tfrecord_pattern, splits),
                                          refcoco.feature_description())
  return tasks_common.add_task(
      name, source, vocab,
      _preprocessors(vocab, name, kind, image_size, text_field, caption_loss, prompt_prefix,
                     region_prompt, None if scale_jitter is None else tuple(scale_jitter)),
      image_size, shuffle_buffer_size)
