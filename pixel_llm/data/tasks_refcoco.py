"""RefCOCO / RefCOCO+ / RefCOCOg Tasks in the common format (`tasks_common`) over the records of
`build.py refcoco` (`refcoco.feature_description`: one record per image, its referred objects and
their expressions).

  register_refcoco_task("refcoco_loc", "OUT/refcoco_{split}.tfrecord-*", "spiece.model")
  register_refcoco_task("refcoco_loco", ..., kind="loco")
  register_refcoco_task("refcoco_loc16", ..., expressions_per_image=16)  # the release's packing
  for b in tasks_common.get_batches("refcoco_loc", split="testA", batch_size=8, shuffle=False,
                                    num_epochs=1, drop_remainder=False): ...

Examples: eval splits (and train with expressions_per_image=1) give one example per expression
(RefCOCO metrics count expressions), R' = 1 prompt; with expressions_per_image=K > 1 a train
example is one image with up to K of its expressions as R' = K prompts (chosen at random, fresh
each epoch), so the image towers run once for several (expression, box) pairs, as the release
trains. Per prompt:
  kind "loc" (referring localization): prompt_text = prompt_prefix + expression, targets = the
    expression (teacher forced), the GT box as the 2 points of the position whose target is EOS
    (`tasks_common` "Box at EOS"), caption_weights 0 unless caption_loss=True;
  kind "loco" (location-conditioned captioning): prompt_boxes = the GT box, prompt_text =
    region_prompt, targets = the expression, caption loss on, no point loss.
Train images may be scale-jittered (`scale_jitter`, the release's 0.75-1.25; boxes and masks move
with the image; see `_placer`); eval splits never are.
Extra features (dropped by Mixtures unless asked for): gt_boxes float32[R, 4] (padded frame),
masks uint8[R, S, S] in {0, 1} (resized like the image, nearest neighbour), mask_weights
float32[R] (0 when the object has no mask), and of the first prompt: ref_id int64[],
expression_id int64[], references string[M] (all expressions of its object).

Shape letters: S image side, R prompts, K expressions of one example, M expressions of an
object, N objects of a record, H, W record image size.
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


def _masks(pngs: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """N 1-bit PNGs (or b"") -> uint8[N, H, W] in {0, 1}."""
  return tf.map_fn(lambda png: _decode_mask(png, height, width), pngs,
                   fn_output_signature=tf.TensorSpec([None, None], tf.uint8))


def _placer(image_size: int, scale_jitter: tuple[float, float] | None,
            expressions_per_image: int):
  """The seeded preprocessor that checks a record (one image, N objects, M expressions), decodes
  its image and masks once and puts image, boxes and masks in the padded square frame:
  `resize_and_pad`, or on train records with `scale_jitter` (lo, hi) `augment.scale_jitter`
  (longer side to s * S, s ~ U[lo, hi], random crop / pad). The expressions of objects the crop
  loses are dropped; a crop that loses every object falls back to the plain resize. It also
  chooses the examples' expressions, "rows" int32[E, K]: one row per expression (K = 1) on eval
  splits or with expressions_per_image = 1, else one row of up to expressions_per_image of the
  kept expressions in a seeded random order (train). seqio runs its preprocessors after the
  epoch repeat and draws the per-example seeds from one stream, so every epoch gets fresh draws,
  the same for the same `seed` (and so for a resumed run)."""

  @seqio.map_over_dataset(num_seeds=1)
  def place(ex, seed):
    ex = tasks_common.dense(ex)
    boxes = tf.reshape(ex["box"], [-1, 4])
    n, m = tf.shape(boxes)[0], tf.size(ex["expression/id"])
    objects = tf.cast(ex["expression/object"], tf.int32)
    # Records of the earlier one-object format carry no expression/object: all are object 0.
    objects = tf.cond(tf.size(objects) == 0, lambda: tf.zeros([m], tf.int32), lambda: objects)
    where = ["refcoco record image/id", ex["image/id"], "ref/id", ex["ref/id"]]
    checks = [
        tf.debugging.Assert(m > 0, ["no expression:"] + where),
        tf.debugging.Assert((tf.size(ex["expression/raw"]) == m)
                            & (tf.size(ex["expression/sent"]) == m) & (tf.size(objects) == m),
                            ["expression fields differ in length:"] + where),
        tf.debugging.Assert((tf.size(ex["box"]) == 4 * n) & (tf.size(ex["mask"]) == n)
                            & (tf.size(ex["ref/id"]) == n),
                            ["box (4 per object), mask and ref/id disagree on N:"] + where),
        tf.debugging.Assert(tf.reduce_all((objects >= 0) & (objects < n)),
                            ["expression/object outside [0, N):", objects] + where),
        tf.debugging.Assert(tf.reduce_all(boxes[:, 2:] > boxes[:, :2])
                            & tf.reduce_all((boxes >= 0) & (boxes <= 1)),
                            ["bad box", boxes] + where)]
    height = tf.cast(ex["image/height"], tf.int32)
    width = tf.cast(ex["image/width"], tf.int32)
    with tf.control_dependencies(checks):
      decoded = preprocess.decode(ex["image/encoded"])  # once, also for the jitter's fallback
      masks = _masks(ex["mask"], height, width)

    def plain():
      image, image_mask, extent = preprocess.resize_and_pad_decoded(decoded, image_size)
      new_hw = tf.cast(tf.round(extent[::-1] * image_size), tf.int32)
      resized = tf.image.resize(masks[..., None], new_hw, method="nearest")[..., 0]
      placed = tf.pad(resized, [[0, 0], [0, image_size - new_hw[0]],
                                [0, image_size - new_hw[1]]])
      return image, image_mask, boxes * tf.tile(extent, [2])[None], placed, tf.ones([n], tf.bool)

    def jittered():
      out = augment.scale_jitter(decoded, boxes, tf.zeros([0, 2]), masks, seed,
                                 min_scale=scale_jitter[0], max_scale=scale_jitter[1],
                                 size=image_size)
      return tf.cond(tf.reduce_any(out["box_valid"]),
                     lambda: (out["image"], out["image_mask"], out["boxes"], out["masks"],
                              out["box_valid"]),
                     plain)

    train = ex["source/split"] == "train"
    if scale_jitter is None:
      image, image_mask, placed_boxes, placed_masks, kept = plain()
    else:
      image, image_mask, placed_boxes, placed_masks, kept = tf.cond(train, jittered, plain)
    usable = tf.boolean_mask(tf.range(m), tf.gather(kept, objects))
    if expressions_per_image > 1:
      order = tf.argsort(tf.random.stateless_uniform(
          tf.shape(usable), tf.random.experimental.stateless_fold_in(seed, 1)))
      grouped = tf.gather(usable, order)[None, :expressions_per_image]
      rows = tf.cond(train & (tf.size(usable) > 0), lambda: grouped, lambda: usable[:, None])
    else:
      rows = usable[:, None]
    return {**ex, "expression/object": objects, "image": image, "image_mask": image_mask,
            "placed_boxes": placed_boxes, "placed_masks": placed_masks, "rows": rows}

  return place


def _preprocessors(vocab: seqio.SentencePieceVocabulary, name: str, kind: str, image_size: int,
                   text_field: str, caption_loss: bool, prompt_prefix: str,
                   region_prompt: str, scale_jitter: tuple[float, float] | None,
                   expressions_per_image: int) -> list:
  tokenizer = vocab.tf_tokenizer
  region_ids = tf.constant(vocab.encode(region_prompt), tf.int32)
  keep = ("image", "image_mask", "image/id", "ref/id", "mask", "placed_boxes", "placed_masks",
          "expression/object", "expression/id", f"expression/{text_field}")

  def unroll(ds):
    """One example per row of the placer's "rows" (its expressions: "chosen" int32[K])."""
    def fn(ex):
      record = {k: ex[k] for k in keep}
      return tf.data.Dataset.from_tensor_slices(ex["rows"]).map(
          tasks_common.plain(lambda chosen: {**record, "chosen": chosen}))
    return ds.flat_map(tasks_common.plain(fn))

  def to_common(ds, sequence_length=None):
    r, _, _ = tasks_common.lengths(sequence_length)
    def fn(ex):
      chosen, texts = ex["chosen"], ex[f"expression/{text_field}"]
      k = tf.size(chosen)
      # Train examples of expressions_per_image > R would lose prompts (eval ones have one).
      check = tf.debugging.Assert(k <= r, [
          f"{name}: a train example has", k, f"expressions, more than the {r} prompts per "
          f"image of the batches: expressions_per_image={expressions_per_image} needs "
          "num_regions (config.input.num_prompts) >= it"])
      with tf.control_dependencies([check]):
        chosen = tf.identity(chosen)
      expressions = tf.gather(texts, chosen)  # [K]
      obj = tf.gather(ex["expression/object"], chosen)  # [K]
      first = obj[0]
      tokens = tf.cast(tokenizer.tokenize(expressions), tf.int32)
      check = tf.debugging.Assert(tf.reduce_all(tokens.row_lengths() > 0), [
          "expression without tokens: image/id", ex["image/id"], "ref/id", ex["ref/id"]])
      with tf.control_dependencies([check]):
        boxes = tf.gather(ex["placed_boxes"], obj)  # [K, 4]
      if kind == "loc":
        prompt = tf.cast(tokenizer.tokenize(tf.constant(prompt_prefix) + expressions), tf.int32)
        extra = dict(prompt_boxes=tf.tile(tf.constant([tasks_common.WHOLE_BOX]), [k, 1]),
                     eos_boxes=boxes, caption_weights=tf.fill([k], 1.0 if caption_loss else 0.0))
      else:
        prompt = tf.RaggedTensor.from_tensor(tf.tile(region_ids[None], [k, 1]))
        extra = dict(prompt_boxes=boxes, caption_weights=tf.ones([k]))
      out = tasks_common.pack(
          task=name, image=ex["image"], image_mask=ex["image_mask"], image_id=ex["image/id"],
          targets=tokens, prompt_text=prompt, captions=expressions,
          sequence_length=sequence_length, **extra)
      mask_weights = tf.cast(tf.strings.length(tf.gather(ex["mask"], obj)) > 0, tf.float32)
      out.update(
          gt_boxes=tf.ensure_shape(tasks_common.rows(boxes, r, tasks_common.WHOLE_BOX), [r, 4]),
          masks=tasks_common.rows(tf.gather(ex["placed_masks"], obj), r, 0),
          mask_weights=tasks_common.rows(mask_weights, r, 0.0),
          ref_id=ex["ref/id"][first], expression_id=ex["expression/id"][chosen[0]],
          references=tf.boolean_mask(texts, tf.equal(ex["expression/object"], first)))
      return out
    return ds.map(tasks_common.plain(fn), num_parallel_calls=tasks_common.AUTOTUNE)

  return [_placer(image_size, scale_jitter, expressions_per_image), unroll, to_common]


def register_refcoco_task(name: str, tfrecord_pattern: str | Mapping[str, str], vocab_path: str,
                          *, kind: str = "loc", image_size: int = 384,
                          splits: Sequence[str] = DEFAULT_SPLITS, text_field: str = "raw",
                          caption_loss: bool = False, prompt_prefix: str = "",
                          region_prompt: str = DEFAULT_REGION_PROMPT, extra_ids: int = 0,
                          shuffle_buffer_size: int = 1000,
                          scale_jitter: tuple[float, float] | None = None,
                          expressions_per_image: int = 1) -> seqio.Task:
  """Registers (or replaces) a RefCOCO-family Task (module docstring).

  kind: "loc" (referring localization, box at EOS) or "loco" (location-conditioned captioning).
  splits: RefCOCO/RefCOCO+ UNC: train, val, testA, testB; RefCOCOg UMD: train, val, test.
  text_field: "raw" (the annotators' text) or "sent" (the lower-cased, cleaned form).
  caption_loss: "loc" only; the release trains referring localization without the text loss.
  prompt_prefix: "loc" only, put before the expression in the prompt (the release: "where is ").
  scale_jitter: (min, max) scale of the train split's images (the release: (0.75, 1.25)); None
    resizes every split plainly. Eval splits are never jittered.
  expressions_per_image: 1 = one example per expression; K > 1 = each train example is an image
    with up to K of its expressions (randomly chosen each epoch) as its prompts, which needs
    batches of at least K prompts per image (the release packs up to 16). Eval splits always
    give one example per expression.
  """
  if expressions_per_image < 1:
    raise ValueError(f"expressions_per_image must be >= 1, got {expressions_per_image}")
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
                     region_prompt, None if scale_jitter is None else tuple(scale_jitter),
                     expressions_per_image),
      image_size, shuffle_buffer_size)
