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

Shape letters: S image side, R regions (prompts) per image, T decoder length, C prompt length.
"""
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from pixel_llm.data import preprocess, tasks_common, visual_genome

DEFAULT_SPLITS = ("train", "val")
DEFAULT_REGION_PROMPT = "Describe the region."


def _preprocessors(vocab: seqio.SentencePieceVocabulary, name: str, image_size: int,
                   region_prompt: str) -> list:
  tokenizer = vocab.tf_tokenizer
  prompt_ids = tf.constant(vocab.encode(region_prompt), tf.int32)

  def with_regions(ds):
    return ds.filter(tasks_common.plain(lambda ex: tf.size(ex["region/phrase"].values) > 0))

  def to_common(ds, sequence_length=None):
    r, _, _ = tasks_common.lengths(sequence_length)

    def fn(ex):
      ex = tasks_common.dense(ex)
      phrases, ids, flat = ex["region/phrase"], ex["region/id"], ex["region/box"]
      where = ["VG record image/id", ex["image/id"]]
      checks = [
          tf.debugging.Assert(tf.size(flat) == 4 * tf.size(phrases),
                              ["region/box needs 4 floats per region/phrase:"] + where),
          tf.debugging.Assert(tf.size(ids) == tf.size(phrases),
                              ["region/id and region/phrase differ in length:"] + where)]
      with tf.control_dependencies(checks):
        boxes = tf.reshape(flat, [-1, 4])[:r]
      phrases, ids = phrases[:r], ids[:r]
      ok = tf.reduce_all(boxes[:, 2:] >= boxes[:, :2]) & tf.reduce_all(
          (boxes >= 0) & (boxes <= 1))
      with tf.control_dependencies([tf.debugging.Assert(ok, ["bad region/box", boxes] + where)]):
        image, image_mask, extent = preprocess.resize_and_pad(ex["image/encoded"], image_size)
      n = tf.size(phrases)
      out = tasks_common.pack(
          task=name, image=image, image_mask=image_mask, image_id=ex["image/id"],
          targets=tf.cast(tokenizer.tokenize(phrases), tf.int32),
          prompt_text=tf.RaggedTensor.from_tensor(tf.tile(prompt_ids[None], [n, 1])),
          prompt_boxes=boxes * tf.tile(extent, [2])[None], caption_weights=tf.ones([n]),
          captions=phrases, sequence_length=sequence_length)
      out["region_ids"] = tf.ensure_shape(tasks_common.rows(ids, r, -1), [r])
      return out
    return ds.map(tasks_common.plain(fn), num_parallel_calls=tasks_common.AUTOTUNE)

  return [with_regions, to_common]


def register_vg_task(name: str, tfrecord_pattern: str | Mapping[str, str], vocab_path: str, *,
                     image_size: int = 384, splits: Sequence[str] = DEFAULT_SPLITS,
                     region_prompt: str = DEFAULT_REGION_PROMPT, extra_ids: int = 0,
                     shuffle_buffer_size: int = 1000) -> seqio.Task:
  """Registers (or replaces) a VG region-captioning Task (module docstring); the number of
  regions R is `get_batches`' num_regions."""
  vocab = seqio.SentencePieceVocabulary(vocab_path, extra_ids=extra_ids)
  source = seqio.TFExampleDataSource(tasks_common.split_patterns(tfrecord_pattern, splits),
                                     visual_genome.feature_description())
  return tasks_common.add_task(name, source, vocab,
                               _preprocessors(vocab, name, image_size, region_prompt),
                               image_size, shuffle_buffer_size)
