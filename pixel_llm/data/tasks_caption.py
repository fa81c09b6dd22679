"""Image-captioning Tasks in the common format (`tasks_common`): COCO captions and WebLI records
(`coco_captions.feature_description`), and Localized Narratives (the LN Task of `tasks.py`).

  register_caption_task("coco_cap", "OUT/coco_captions_{split}.tfrecord-*", "spiece.model")
  register_caption_task("webli", "OUT/webli_{split}.tfrecord-*", "spiece.model",
                        splits=("train",))  # `build.py webli` writes the same schema
  register_ln_common_task("ln_common", "ln_coco")  # "ln_coco": a tasks.register_ln_task task

Caption examples: train splits give one example per (image, caption); other splits one per image
with the first caption as target. Every example carries "references": string[M], all the image's
captions (for metrics; `get_batches` pads to the batch's largest M with b""). Caption loss on,
point_weights 0. LN examples keep their per-token trace boxes (caption loss on). Train images may
be scale-jittered (`scale_jitter`; the release: 0.75-1.25 for COCO captions), one draw per image
shared by its captions; other splits never are.

Shape letters: S image side, R prompts, T decoder length, C prompt length, M references.
"""
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from pixel_llm.data import augment, coco_captions, preprocess, tasks, tasks_common

DEFAULT_CAPTION_PROMPT = "A photo of"  # the release's COCO eval prompt ("A photo of ")
DEFAULT_SPLITS = ("train", "val")


def _placer(image_size: int, train_splits: Sequence[str],
            scale_jitter: tuple[float, float] | None):
  """The seeded preprocessor that decodes a record's image into the padded square frame:
  `augment.scale_jitter` on train splits with `scale_jitter`, else `resize_and_pad`. Seeds as
  `tasks_refcoco._placer` (fresh every epoch, the same for the same seed)."""

  @seqio.map_over_dataset(num_seeds=1)
  def place(ex, seed):
    ex = tasks_common.dense(ex)
    check = tf.debugging.Assert(tf.size(ex["captions"]) > 0,
                                ["caption record without captions: image/id", ex["image/id"]])
    train = tf.reduce_any(ex["source/split"] == tf.constant(list(train_splits) or [""]))

    with tf.control_dependencies([check]):
      image = preprocess.decode(ex["image/encoded"])

    def plain():
      return preprocess.resize_and_pad_decoded(image, image_size)[:2]

    def jittered():
      out = augment.scale_jitter(image, tf.zeros([0, 4]), tf.zeros([0, 2]),
                                 tf.zeros([0, 1, 1], tf.uint8), seed, min_scale=scale_jitter[0],
                                 max_scale=scale_jitter[1], size=image_size)
      return out["image"], out["image_mask"]

    placed, mask = plain() if scale_jitter is None else tf.cond(train, jittered, plain)
    return {**ex, "image": placed, "image_mask": mask, "train": train}

  return place


def _caption_preprocessors(vocab: seqio.SentencePieceVocabulary, name: str, image_size: int,
                           prompts: Sequence[str], train_splits: Sequence[str],
                           scale_jitter: tuple[float, float] | None) -> list:
  prompt_ids = tasks_common.encode_all(vocab, prompts)
  tokenizer = vocab.tf_tokenizer

  def per_caption(ds):
    def fn(ex):
      captions = ex["captions"]
      chosen = tf.cond(ex["train"], lambda: captions, lambda: captions[:1])
      n = tf.size(chosen)
      rep = lambda x: tf.broadcast_to(x, tf.concat([[n], tf.shape(x)], 0))  # noqa: E731
      per = {"caption": chosen, "image": rep(ex["image"]), "image_mask": rep(ex["image_mask"]),
             "image_id": rep(ex["image/id"]), "references": rep(captions)}
      return tf.data.Dataset.from_tensor_slices(per)
    return ds.flat_map(tasks_common.plain(fn))

  def to_common(ds, sequence_length=None):
    def fn(ex):
      caption = ex["caption"]
      key = tf.strings.join([ex["image_id"], caption], "\n")
      prompt = tasks_common.hashed_choice(key, prompt_ids, len(prompts))
      out = tasks_common.pack(
          task=name, image=ex["image"], image_mask=ex["image_mask"], image_id=ex["image_id"],
          targets=tf.RaggedTensor.from_tensor(tf.cast(tokenizer.tokenize(caption), tf.int32)[None]),
          prompt_text=tf.RaggedTensor.from_tensor(prompt[None]),
          prompt_boxes=tf.constant([tasks_common.WHOLE_BOX]), caption_weights=tf.ones([1]),
          captions=caption[None], sequence_length=sequence_length)
      return {**out, "references": ex["references"]}
    return ds.map(tasks_common.plain(fn), num_parallel_calls=tasks_common.AUTOTUNE)

  return [_placer(image_size, train_splits, scale_jitter), per_caption, to_common]


def register_caption_task(name: str, tfrecord_pattern: str | Mapping[str, str],
                          vocab_path: str, *, image_size: int = 384,
                          prompts: Sequence[str] = (DEFAULT_CAPTION_PROMPT,),
                          splits: Sequence[str] = DEFAULT_SPLITS,
                          train_splits: Sequence[str] = ("train",), extra_ids: int = 0,
                          shuffle_buffer_size: int = 1000,
                          scale_jitter: tuple[float, float] | None = None) -> seqio.Task:
  """Registers (or replaces) a captioning Task over COCO-captions-schema records (COCO, WebLI).

  tfrecord_pattern: a pattern where "{split}" is replaced by each of `splits`, or a mapping
    split -> pattern. prompts: picked per example by a hash of image id and caption.
  train_splits: splits expanded to one example per caption (the others: first caption only).
  scale_jitter: (min, max) scale of the train splits' images (the release's COCO captions:
    (0.75, 1.25)); None resizes plainly.
  """
  if not prompts:
    raise ValueError("register_caption_task needs at least one prompt")
  if scale_jitter is not None and not 0 < scale_jitter[0] <= scale_jitter[1]:
    raise ValueError(f"scale_jitter must be (min, max) with 0 < min <= max, got {scale_jitter}")
  vocab = seqio.SentencePieceVocabulary(vocab_path, extra_ids=extra_ids)
  source = tasks_common.SplitTaggedSource(tasks_common.split_patterns(tfrecord_pattern, splits),
                                          coco_captions.feature_description())
  return tasks_common.add_task(
      name, source, vocab,
      _caption_preprocessors(vocab, name, image_size, tuple(prompts), tuple(train_splits),
                             None if scale_jitter is None else tuple(scale_jitter)),
      image_size, shuffle_buffer_size)


def register_ln_common_task(name: str, ln_task: str) -> seqio.Task:
  """Registers (or replaces) the common-format view of an LN Task of `tasks.register_ln_task`
  (same source, prompts and alignment; caption loss on, per-token trace boxes)."""
  registered = tasks._LN_TASKS.get(ln_task)  # pylint: disable=protected-access
  if registered is None:
    raise ValueError(f"{ln_task!r} is not an LN task of tasks.register_ln_task")
  base = seqio.get_mixture_or_task(ln_task)
  vocab = base.output_features["targets"].vocabulary

  def to_common(ds, sequence_length=None):
    def fn(ex):
      one = lambda x: tf.RaggedTensor.from_tensor(x[None])  # noqa: E731
      # The LN examples end with EOS (targets and prompt); `pack` cuts and appends it again.
      return tasks_common.pack(
          task=name, image=ex["image"], image_mask=ex["image_mask"], image_id=ex["image_id"],
          targets=one(ex["targets"][:-1]), target_boxes=one(ex["target_boxes"][:-1]),
          target_weights=one(ex["target_weights"][:-1]), prompt_text=one(ex["prompt_text"][:-1]),
          prompt_boxes=tf.constant([tasks_common.WHOLE_BOX]), caption_weights=tf.ones([1]),
          captions=ex["caption"][None], sequence_length=sequence_length)
    return ds.map(tasks_common.plain(fn), num_parallel_calls=tasks_common.AUTOTUNE)

  return tasks_common.add_task(name, base.source, vocab, list(base.preprocessors) + [to_common],
                               registered["image_size"], base.shuffle_buffer_size)
