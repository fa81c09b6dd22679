"""seqio Tasks over the builders' TFRecords, and `get_dataset`: numpy batches in the model's format.

  register_ln_task("ln_coco", "OUT/ln_{split}.tfrecord-*", "spiece.model", image_size=384)
  for batch in get_dataset("ln_coco", split="train", batch_size=8, max_target_len=128):
    ...  # batch["image"]: float32[8, 384, 384, 3], batch["point_targets"]: float32[8, 1, 128, 2, 2]

The LN task's examples (before `preprocess.to_model_features`):
  image uint8[S, S, 3] (resized longer side S, zero-padded bottom/right), image_mask bool[S, S],
  targets int32[N] (caption tokens, EOS last, at most sequence_length["targets"]),
  target_boxes float32[N, 4] (the token's utterance box in the padded square's [0, 1] frame),
  target_weights float32[N] (1 for tokens inside an utterance with a trace; alignment rule in
  `preprocess.py`), prompt_text int32[C] (a fixed prompt + EOS), image_id and caption (strings).
Determinism: file and example shuffles are seeded, every op is stateless, and the prompt of an
example is picked by a hash of its image id and caption.

Shape letters: B batch, S image side, T decoder length, C prompt-text length, N tokens.
"""
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from pixel_llm.data import preprocess, tasks_common

DEFAULT_PROMPT = "Describe the image in detail."
DEFAULT_SPLITS = ("train", "val")
_AUTOTUNE = tf.data.AUTOTUNE
_LN_TASKS: dict[str, dict] = {}  # name -> registration arguments (get_dataset checks image_size)


def _ln_preprocessors(vocab: seqio.SentencePieceVocabulary, image_size: int,
                      prompts: Sequence[str], split_sentences: bool) -> list:
  tokenizer = vocab.tf_tokenizer
  prompt_ids = tf.ragged.constant([vocab.encode(p) for p in prompts], dtype=tf.int32)

  def tokenize(ds):
    def fn(ex):
      ex = preprocess.dense_utterances(ex)
      aligned = preprocess.align_tokens(ex["caption"], ex["starts"], ex["ends"], ex["has_trace"],
                                        ex["boxes"], tokenizer)
      return {"image": ex["image"], "image_id": ex["image_id"], "caption": ex["caption"],
              **aligned}
    return ds.map(fn, num_parallel_calls=_AUTOTUNE)

  def sentences(ds):
    return ds.flat_map(_split_sentences)

  def image(ds):
    def fn(ex):
      img, mask, extent = preprocess.resize_and_pad(ex["image"], image_size)
      out = {k: v for k, v in ex.items() if k not in ("sentence", "byte_start", "byte_end")}
      out.update(image=img, image_mask=mask, boxes=ex["boxes"] * tf.tile(extent, [2]))
      return out
    return ds.map(fn, num_parallel_calls=_AUTOTUNE)

  def targets(ds, sequence_length=None):
    length = (sequence_length or {}).get("targets")
    context = (sequence_length or {}).get("prompt_text")

    def fn(ex):
      tokens, boxes, weights = preprocess.trim_with_eos(ex["tokens"], ex["boxes"], ex["weights"],
                                                        length, vocab.eos_id)
      key = tf.strings.join([ex["image_id"], ex["caption"]], "\n")
      prompt = prompt_ids[tf.strings.to_hash_bucket_fast(key, len(prompts))]
      if context is not None:
        prompt = prompt[:context - 1]
      prompt = tf.concat([prompt, [vocab.eos_id]], 0)  # EOS ends T5 encoder inputs
      return {"image": ex["image"], "image_mask": ex["image_mask"], "targets": tokens,
              "target_boxes": boxes, "target_weights": weights, "prompt_text": prompt,
              "image_id": ex["image_id"], "caption": ex["caption"]}
    return ds.map(fn, num_parallel_calls=_AUTOTUNE)

  return [tokenize] + ([sentences] if split_sentences else []) + [image, targets]


def _split_sentences(ex: dict) -> tf.data.Dataset:
  """One narrative -> one example per sentence (tokens grouped by their sentence index)."""
  sentence = ex["sentence"]
  n = tf.cond(tf.size(sentence) > 0, lambda: tf.reduce_max(sentence) + 1, lambda: 0)

  def rows(v):
    return tf.RaggedTensor.from_value_rowids(v, sentence, nrows=n)

  parts = {k: rows(ex[k]) for k in ("tokens", "boxes", "weights", "byte_start", "byte_end")}
  parts = tf.data.Dataset.from_tensor_slices(parts).filter(lambda p: tf.size(p["tokens"]) > 0)

  def fn(p):
    start, end = p["byte_start"][0], p["byte_end"][-1]
    text = tf.strings.strip(tf.strings.substr(ex["caption"], start, end - start))
    return {"image": ex["image"], "image_id": ex["image_id"], "caption": text,
            "tokens": p["tokens"], "boxes": p["boxes"], "weights": p["weights"]}
  return parts.map(fn)


def register_ln_task(name: str, tfrecord_pattern: str | Mapping[str, str], vocab_path: str, *,
                     image_size: int = 384, prompts: Sequence[str] = (DEFAULT_PROMPT,),
                     split_sentences: bool = False, extra_ids: int = 0,
                     splits: Sequence[str] = DEFAULT_SPLITS,
                     shuffle_buffer_size: int = 1000) -> seqio.Task:
  """Registers (or replaces) a seqio Task reading the LN TFRecords of `build.py`.

  tfrecord_pattern: a file pattern where "{split}" is replaced by each of `splits`, or a mapping
    split -> pattern. vocab_path: a SentencePiece model (the same ids as
    seqio.SentencePieceVocabulary(vocab_path, extra_ids)). prompts: the prompt texts; each example
    gets one, chosen by a hash of its image id and caption. split_sentences: one example per
    sentence of a narrative (targets and alignment per sentence).
  """
  if not prompts:
    raise ValueError("register_ln_task needs at least one prompt")
  if isinstance(tfrecord_pattern, str):
    tfrecord_pattern = {s: tfrecord_pattern.replace("{split}", s) for s in splits}
  vocab = seqio.SentencePieceVocabulary(vocab_path, extra_ids=extra_ids)
  seqio.TaskRegistry.remove(name)
  task = seqio.TaskRegistry.add(
      name,
      source=seqio.TFExampleDataSource(dict(tfrecord_pattern), preprocess.FEATURE_DESCRIPTION),
      output_features={"targets": seqio.Feature(vocab, add_eos=True, dtype=tf.int32),
                       "prompt_text": seqio.Feature(vocab, add_eos=True, dtype=tf.int32)},
      preprocessors=_ln_preprocessors(vocab, image_size, tuple(prompts), split_sentences),
      shuffle_buffer_size=shuffle_buffer_size)
  _LN_TASKS[name] = dict(image_size=image_size)
  return task


def _task_for(task_or_pattern: str, image_size: int | None, vocab_path: str | None,
              **kwargs) -> seqio.Task:
  if task_or_pattern in _LN_TASKS or task_or_pattern in seqio.TaskRegistry.names():
    known = _LN_TASKS.get(task_or_pattern, {}).get("image_size")
    if image_size is not None and known is not None and image_size != known:
      raise ValueError(f"Task {task_or_pattern!r} was registered with image_size={known}, "
                       f"not {image_size}; register another task for that size.")
    return seqio.get_mixture_or_task(task_or_pattern)
  if vocab_path is None:
    raise ValueError(f"{task_or_pattern!r} is not a registered task; a file pattern needs "
                     "vocab_path.")
  config = dict(pattern=task_or_pattern, vocab=vocab_path, image_size=image_size or 384, **kwargs)
  digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
  name = f"ln_files_{digest}"
  if name in seqio.TaskRegistry.names():
    return seqio.get_mixture_or_task(name)
  return register_ln_task(name, task_or_pattern, vocab_path, image_size=image_size or 384,
                          **kwargs)


def get_dataset(task_or_pattern: str, *, split: str = "train", batch_size: int,
                shuffle: bool = True, seed: int = 0, image_size: int | None = None,
                max_target_len: int = 128, max_context_len: int = 8,
                num_epochs: int | None = None, vocab_path: str | None = None,
                prompts: Sequence[str] = (DEFAULT_PROMPT,), split_sentences: bool = False,
                shard_index: int = 0, num_shards: int = 1, drop_remainder: bool = True,
                num_regions: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Numpy batches in the model's format (`pixel_llm/model.py`) plus evaluation fields.

  task_or_pattern: a registered task name, or a TFRecord pattern (then `vocab_path`, `prompts`,
    `split_sentences` and `image_size` (default 384) define an ad-hoc task, registered once).
  shard_index / num_shards: this host's part of the data (seqio ShardInfo).
  Yields {image float32[B, S, S, 3], image_mask bool[B, S, S], prompt_boxes float32[B, 1, 4],
  prompt_text int32[B, 1, C], decoder_input_tokens / decoder_target_tokens int32[B, 1, T],
  point_targets float32[B, 1, T, 2, 2], point_weights float32[B, 1, T], image_id bytes[B],
  caption bytes[B, 1]}. The same seed gives the same batches.
  A common-format Task or Mixture (`tasks_common`: caption, RefCOCO, VG tasks, mixtures) yields
  `tasks_common.get_batches`' features instead, with R = num_regions prompts per image.
  """
  if tasks_common.is_common(task_or_pattern):
    if tuple(prompts) != (DEFAULT_PROMPT,) or split_sentences or vocab_path is not None:
      raise ValueError(f"{task_or_pattern!r} is a registered task: set prompts, split_sentences "
                       "and vocab_path when registering it.")
    return tasks_common.get_batches(
        task_or_pattern, split=split, batch_size=batch_size, shuffle=shuffle, seed=seed,
        image_size=image_size, max_target_len=max_target_len, max_context_len=max_context_len,
        num_regions=num_regions, num_epochs=num_epochs, shard_index=shard_index,
        num_shards=num_shards, drop_remainder=drop_remainder)
  if task_or_pattern in seqio.TaskRegistry.names():
    if tuple(prompts) != (DEFAULT_PROMPT,) or split_sentences:
      raise ValueError(f"{task_or_pattern!r} is a registered task: set prompts and "
                       "split_sentences in register_ln_task.")
    kwargs = {}
  else:
    kwargs = dict(prompts=tuple(prompts), split_sentences=split_sentences)
  task = _task_for(task_or_pattern, image_size, vocab_path, **kwargs)
  shard, example_level = tasks_common.shard_plan(task, split, shard_index, num_shards)
  ds = task.get_dataset(
      sequence_length={"targets": max_target_len, "prompt_text": max_context_len},
      split=split, shuffle=shuffle, seed=seed, shard_info=shard, num_epochs=num_epochs)
  ds = ds.map(lambda ex: preprocess.to_model_features(ex, max_target_len, max_context_len),
              num_parallel_calls=_AUTOTUNE)
  if example_level:  # this shard's rows of the global batch: the same batches as one process
    ds = ds.batch(batch_size * num_shards, drop_remainder=drop_remainder)
    ds = ds.map(lambda b: tasks_common.rows_of_shard(b, shard_index, batch_size))
  else:
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds.prefetch(_AUTOTUNE).as_numpy_iterator()
