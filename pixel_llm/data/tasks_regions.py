"""Visual Genome region captioning in the common format (`tasks_common`): location-conditioned
captioning of R regions per image (prompt box -> phrase).

  register_vg_task("vg_regions", "OUT/vg_{split}.tfrecord-*", "spiece.model")
  for b in tasks_common.get_batches("vg_regions", split="train", batch_size=8, num_regions=16):
    ...  # b["caption_weights"]: float32[8, 16], 0 for padding regions

Records (`visual_genome.feature_description`, `build.py vg`): the image features plus "region/box"
(4 floats per region: x0, y0, x1, y1 normalised by the image size), "region/phrase" (one string
per region) and "region/id". The first R regions of a record are used (record order, as the
release's `pad_detection_annotations`); fewer are padded (caption and point weights 0). Images
without regions are skipped (the builder writes none). Extra feature: region_ids int64[R] (-1 for
padding).

Train images may be augmented as the release does for VG (`scale_jitter` 0.1-2.0 and `flip`;
see `_placer`): a horizontal flip with probability 1/2 that also swaps "left" and "right" in the
phrases (`augment.horizontal_flip`; the release flips the text unchanged), then scale jitter. The
first R regions that keep some area after the crop are used. Eval splits are never augmented.

Shape letters: S image side, R regions (prompts) per image, T decoder length, C prompt length.
"""
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from pixel_llm.data import augment, preprocess, tasks_common, visual_genome

DEFAULT_SPLITS = ("train", "val")
DEFAULT_REGION_PROMPT = "Describe the region."


def _placer(image_size: int, scale_jitter: tuple[float, float] | None, flip: bool):
  """The seeded preprocessor that checks a record's regions and puts image and boxes in the padded
  square frame: `resize_and_pad`, or on train records with augmentation a flip (probability 1/2,
  "left" <-> "right" in the phrases) then `augment.scale_jitter` (s ~ U[lo, hi]; without
  `scale_jitter` s = 1, i.e. resize_and_pad). Regions the crop leaves without area are dropped;
  a crop that leaves none falls back to the plain resize (not flipped).
  Per-example seeds: seqio's stream, fresh every epoch and the same for the same seed (as
  `tasks_refcoco._placer`)."""

  @seqio.map_over_dataset(num_seeds=1)
  def place(ex, seed):
    ex = tasks_common.dense(ex)
    phrases, ids, flat = ex["region/phrase"], ex["region/id"], ex["region/box"]
    where = ["VG record image/id", ex["image/id"]]
    checks = [
        tf.debugging.Assert(tf.size(flat) == 4 * tf.size(phrases),
                            ["region/box needs 4 floats per region/phrase:"] + where),
        tf.debugging.Assert(tf.size(ids) == tf.size(phrases),
                            ["region/id and region/phrase differ in length:"] + where)]
    with tf.control_dependencies(checks):
      boxes = tf.reshape(flat, [-1, 4])
    ok = tf.reduce_all(boxes[:, 2:] >= boxes[:, :2]) & tf.reduce_all((boxes >= 0) & (boxes <= 1))
    check = tf.debugging.Assert(ok, ["bad region/box", boxes] + where)
    with tf.control_dependencies([check]):
      image = preprocess.decode(ex["image/encoded"])

    def plain():
      image_, image_mask, extent = preprocess.resize_and_pad_decoded(image, image_size)
      return image_, image_mask, boxes * tf.tile(extent, [2])[None], phrases, ids

    def augmented():
      no_points, no_masks = tf.zeros([0, 2]), tf.zeros([0, 1, 1], tf.uint8)
      out = augment.horizontal_flip(image, boxes, no_points, no_masks, {"phrases": phrases}, seed,
                                    mode="swap_left_right" if flip else "off")
      lo, hi = scale_jitter or (1.0, 1.0)
      out2 = augment.scale_jitter(out["image"], out["boxes"], no_points, no_masks, seed,
                                  min_scale=lo, max_scale=hi, size=image_size)
      keep = out["box_valid"] & out2["box_valid"]
      # A crop without any region would train on nothing: the plain resize instead.
      return tf.cond(
          tf.reduce_any(keep),
          lambda: (out2["image"], out2["image_mask"], tf.boolean_mask(out2["boxes"], keep),
                   tf.boolean_mask(out["texts"]["phrases"], keep), tf.boolean_mask(ids, keep)),
          plain)

    if scale_jitter is None and not flip:
      placed = plain()
    else:
      placed = tf.cond(ex["source/split"] == "train", augmented, plain)
    keys = ("image", "image_mask", "placed_boxes", "placed_phrases", "placed_ids")
    return {**ex, **dict(zip(keys, placed))}

  return place


def _preprocessors(vocab: seqio.SentencePieceVocabulary, name: str, image_size: int,
                   region_prompt: str, scale_jitter: tuple[float, float] | None,
                   flip: bool) -> list:
  tokenizer = vocab.tf_tokenizer
  prompt_ids = tf.constant(vocab.encode(region_prompt), tf.int32)

  def with_regions(ds):
    return ds.filter(tasks_common.plain(lambda ex: tf.size(ex["region/phrase"].values) > 0))

  def to_common(ds, sequence_length=None):
    r, _, _ = tasks_common.lengths(sequence_length)

    def fn(ex):
      boxes, phrases = ex["placed_boxes"][:r], ex["placed_phrases"][:r]
      ids = ex["placed_ids"][:r]
      n = tf.size(phrases)
      out = tasks_common.pack(
          task=name, image=ex["image"], image_mask=ex["image_mask"], image_id=ex["image/id"],
          targets=tf.cast(tokenizer.tokenize(phrases), tf.int32),
          prompt_text=tf.RaggedTensor.from_tensor(tf.tile(prompt_ids[None], [n, 1])),
          prompt_boxes=boxes, caption_weights=tf.ones([n]), captions=phrases,
          sequence_length=sequence_length)
      out["region_ids"] = tf.ensure_shape(tasks_common.rows(ids, r, -1), [r])
      return out
    return ds.map(tasks_common.plain(fn), num_parallel_calls=tasks_common.AUTOTUNE)

  return [with_regions, _placer(image_size, scale_jitter, flip), to_common]


def register_vg_task(name: str, tfrecord_pattern: str | Mapping[str, str], vocab_path: str, *,
                     image_size: int = 384, splits: Sequence[str] = DEFAULT_SPLITS,
                     region_prompt: str = DEFAULT_REGION_PROMPT, extra_ids: int = 0,
                     shuffle_buffer_size: int = 1000,
                     scale_jitter: tuple[float, float] | None = None,
                     flip: bool = False) -> seqio.Task:
  """Registers (or replaces) a VG region-captioning Task (module docstring); the number of
  regions R is `get_batches`' num_regions.

  scale_jitter: (min, max) scale of the train split's images (the release: (0.1, 2.0)); None
    resizes plainly. flip: mirror train images with probability 1/2, swapping "left" and
    "right" in the phrases (the release flips VG). Eval splits are never augmented.
  """
  if scale_jitter is not None and not 0 < scale_jitter[0] <= scale_jitter[1]:
    raise ValueError(f"scale_jitter must be (min, max) with 0 < min <= max, got {scale_jitter}")
  vocab = seqio.SentencePieceVocabulary(vocab_path, extra_ids=extra_ids)
  source = tasks_common.SplitTaggedSource(tasks_common.split_patterns(tfrecord_pattern, splits),
                                          visual_genome.feature_description())
  jitter = None if scale_jitter is None else tuple(scale_jitter)
  return tasks_common.add_task(name, source, vocab,
                               _preprocessors(vocab, name, image_size, region_prompt, jitter,
                                              flip), image_size, shuffle_buffer_size)
