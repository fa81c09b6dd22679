"""The feature set every multi-task Task emits, so that examples of different tasks (and Mixtures
of them) batch together, and `get_batches`: numpy batches of such a Task or Mixture.

  from pixel_llm.data import tasks_caption, tasks_common
  tasks_caption.register_caption_task("coco_cap", "OUT/coco_captions_{split}.tfrecord-*", "spm")
  for batch in tasks_common.get_batches("coco_cap", split="train", batch_size=8, num_regions=1):
    ...  # batch["caption_weights"]: float32[8, 1]

Common example (one image, R prompts; `get_batches` adds the batch axis B and makes the image
float32 in [0, 1]); the model's batch contract is in `pixel_llm/model.py`:
  image                 uint8[S, S, 3] (longer side resized to S, zero-padded bottom/right)
  image_mask            bool[S, S] (False on padding)
  prompt_boxes          float32[R, 4] xyxy in the padded square's [0, 1] frame
  prompt_text           int32[R, C] prompt tokens + EOS (0 = padding)
  decoder_target_tokens int32[R, T] targets + EOS (0 = padding)
  decoder_input_tokens  int32[R, T] BOS (0) + targets shifted right
  point_targets         float32[R, T, 2, 2] location of decoder_input_tokens[t] (box corners)
  point_weights         float32[R, T] 1 where point_targets[t] supervises the location head
  caption_weights       float32[R] 1 switches the caption loss on for a prompt
  image_id              string[], caption string[R] (the target text; "" for padding prompts),
  task                  string[] (the Task's name)
Tasks may add extra features (evaluation references, masks); Mixtures keep only the common set
(and `extra_features` named in `get_batches`, which every task of the Mixture must emit).

Per-example task masks (the release's `AddTaskMask`, as weights):
  task (module)                  prompt_boxes  prompt_text        targets     caption  points
  ln (tasks_caption)             whole square  LN prompt          narrative   1        every traced
                                                                                       token's box
  caption: COCO, WebLI           whole square  caption prompt     caption     1        0
  refcoco_loc (tasks_refcoco)    whole square  [prefix] expr.     expression  0 (*)    box at EOS
  refcoco_loco (tasks_refcoco)   GT box        region prompt      expression  1        0
  vg regions (tasks_regions)     region boxes  region prompt      phrase      1        0
  padding prompts (r >= count)   [0, 0, 1, 1]  0                  0           0        0
(*) configurable (`caption_loss=True`). The whole square is [0, 0, 1, 1] like `preprocess`'s LN
examples (the release used the unpadded content box).

Box at EOS: point_targets[t] is the location of decoder_input_tokens[t] and the hidden state at t
predicts decoder_target_tokens[t]. The position whose target is EOS (t = n for n kept expression
tokens, where decoder_input_tokens[t] is the last expression token) carries the GT box as its 2
points, weight 1 there only: the release's "^end-1" rule (the hidden state that predicts EOS).

Lengths come from `sequence_length` = {"targets": T, "prompt_text": C, "regions": R}; outputs are
padded to exactly those shapes (seqio's trimming is off: these features have a prompt axis).
Determinism: seeded file/example shuffles and Mixture sampling, stateless ops, prompts picked by
a hash of the example.

Shape letters: B batch, S image side, R prompts (regions) per image, T decoder length, C prompt
length, N tokens of one target, M references.
"""
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

EOS_ID = 1
WHOLE_BOX = (0.0, 0.0, 1.0, 1.0)
COMMON_FEATURES = ("image", "image_mask", "prompt_boxes", "prompt_text", "decoder_target_tokens",
                   "decoder_input_tokens", "point_targets", "point_weights", "caption_weights",
                   "image_id", "caption", "task")
AUTOTUNE = tf.data.AUTOTUNE
IMAGE_SIZES: dict[str, int] = {}  # common Task / Mixture name -> image side S


def plain(fn):
  """`fn` for tf.data maps without autograph: these functions never branch in Python on tensors,
  and conversion only adds tracing time."""
  return tf.autograph.experimental.do_not_convert(fn)


def output_features(vocab: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """seqio output features of a common Task (the token features; the rest pass through)."""
  return {"decoder_target_tokens": seqio.Feature(vocab, add_eos=True, dtype=tf.int32, rank=2),
          "prompt_text": seqio.Feature(vocab, add_eos=True, dtype=tf.int32, rank=2)}


def is_common(name: str) -> bool:
  """Whether `name` is a registered common-format Task or Mixture."""
  return name in IMAGE_SIZES and name in (set(seqio.TaskRegistry.names())
                                          | set(seqio.MixtureRegistry.names()))


def lengths(sequence_length) -> tuple[int, int, int]:
  """(R, T, C) from a seqio sequence_length; every key is required."""
  missing = {"regions", "targets", "prompt_text"} - set(sequence_length or {})
  if missing:
    raise ValueError(f"common tasks need sequence_length keys {sorted(missing)} "
                     "(use tasks_common.get_batches)")
  return (sequence_length["regions"], sequence_length["targets"],
          sequence_length["prompt_text"])


def dense(ex: dict) -> dict:
  """Parsed record with VarLen features made dense."""
  return {k: tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v
          for k, v in ex.items()}


def hashed_choice(key: tf.Tensor, options: tf.RaggedTensor, count: int) -> tf.Tensor:
  """options[hash(key) % count] (count = number of rows): a pick that needs no random state."""
  return options[tf.strings.to_hash_bucket_fast(key, count)]


def encode_all(vocab: seqio.Vocabulary, texts: Sequence[str]) -> tf.RaggedTensor:
  return tf.ragged.constant([vocab.encode(t) for t in texts], dtype=tf.int32,
                            row_splits_dtype=tf.int64)


def rows(x: tf.Tensor, r: int, fill=0) -> tf.Tensor:
  """x[:r] padded to r rows of `fill` (a scalar, or a row such as WHOLE_BOX)."""
  x = x[:r]
  pad = [[0, r - tf.shape(x)[0]]] + [[0, 0]] * (len(x.shape) - 1)
  if np.ndim(fill) == 0:
    return tf.pad(x, pad, constant_values=tf.constant(fill, x.dtype))
  fill = tf.constant(fill, x.dtype)
  return tf.pad(x - fill, pad) + fill


def _cut(rt: tf.RaggedTensor, length: int) -> tf.Tensor:
  """Rows cut to `length` items and zero-padded to [R', length, ...] (dense ops only: ragged
  slicing costs seconds of tracing per dataset)."""
  x = rt.to_tensor()[:, :length]
  pad = [[0, 0], [0, length - tf.shape(x)[1]]] + [[0, 0]] * (len(x.shape) - 2)
  return tf.pad(x, pad)


def _put_eos(tokens: tf.Tensor, n: tf.Tensor, eos: int) -> tf.Tensor:
  return tf.where(tf.range(tf.shape(tokens)[1])[None, :] == n[:, None], eos, tokens)


def pack(*, task: str, image: tf.Tensor, image_mask: tf.Tensor, image_id: tf.Tensor,
         targets: tf.RaggedTensor, prompt_text: tf.RaggedTensor, prompt_boxes: tf.Tensor,
         caption_weights: tf.Tensor, captions: tf.Tensor, sequence_length,
         target_boxes: tf.RaggedTensor | None = None,
         target_weights: tf.RaggedTensor | None = None,
         eos_boxes: tf.Tensor | None = None) -> dict:
  """R' prompts of one image -> a common example (module docstring), R' cut or padded to R.

  targets int32[R', (N)] and prompt_text int32[R', (C')] without EOS (cut to T - 1 and C - 1
  tokens, then EOS); prompt_boxes float32[R', 4]; caption_weights float32[R']; captions
  string[R']. Point supervision (else none): target_boxes float32[R', (N), 4] with target_weights
  float32[R', (N)], the location of each target token; or eos_boxes float32[R', 4], a box at
  the position whose target is EOS (module docstring, "Box at EOS").
  """
  r, t, c = lengths(sequence_length)
  n = tf.minimum(tf.cast(targets.row_lengths(), tf.int32), t - 1)  # kept tokens = EOS position
  tokens = _put_eos(_cut(targets, t), n, EOS_ID)
  if target_boxes is not None:
    valid = tf.cast(tf.range(t)[None, :] < n[:, None], tf.float32)
    weights = _cut(target_weights, t) * valid
    boxes = _cut(target_boxes, t) * weights[..., None]
  else:
    boxes, weights = tf.zeros([tf.shape(tokens)[0], t, 4]), tf.zeros_like(tokens, tf.float32)
  shift = lambda x: tf.concat([tf.zeros_like(x[:, :1]), x[:, :-1]], 1)  # noqa: E731
  point_targets, point_weights = shift(boxes), shift(weights)
  if eos_boxes is not None:
    # n = 0 (no target token) leaves no position whose input is a token of the target.
    at_eos = tf.cast((tf.range(t)[None, :] == n[:, None]) & (n[:, None] > 0), tf.float32)
    point_weights = at_eos
    point_targets = at_eos[..., None] * tf.cast(eos_boxes, tf.float32)[:, None, :]
  cp = tf.cast(prompt_text.row_lengths(), tf.int32)
  prompt = _put_eos(_cut(prompt_text, c), tf.minimum(cp, c - 1), EOS_ID)
  return {
      "image": image, "image_mask": image_mask,
      "prompt_boxes": rows(tf.cast(prompt_boxes, tf.float32), r, WHOLE_BOX),
      "prompt_text": tf.ensure_shape(rows(prompt, r, 0), [r, c]),
      "decoder_target_tokens": tf.ensure_shape(rows(tokens, r, 0), [r, t]),
      "decoder_input_tokens": tf.ensure_shape(rows(shift(tokens), r, 0), [r, t]),
      "point_targets": tf.ensure_shape(tf.reshape(rows(point_targets, r, 0.0), [r, t, 2, 2]),
                                       [r, t, 2, 2]),
      "point_weights": tf.ensure_shape(rows(point_weights, r, 0.0), [r, t]),
      "caption_weights": tf.ensure_shape(rows(tf.cast(caption_weights, tf.float32), r, 0.0),
                                         [r]),
      "image_id": image_id, "caption": rows(captions, r, ""), "task": tf.constant(task),
  }


class SplitTaggedSource(seqio.TFExampleDataSource):
  """TFRecords source whose examples also carry "source/split" (the split being read), so
  preprocessors (which seqio does not tell the split) can treat train and eval differently."""

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, **kwargs) -> tf.data.Dataset:
    ds = super().get_dataset(split, shuffle, seed, shard_info, **kwargs)
    return ds.map(plain(lambda ex: {**ex, "source/split": tf.constant(split)}))


def split_patterns(tfrecord_pattern: str | Mapping[str, str], splits: Sequence[str]
                   ) -> dict[str, str]:
  """A pattern with "{split}" (filled in for each of `splits`) or a mapping split -> pattern."""
  if isinstance(tfrecord_pattern, str):
    return {s: tfrecord_pattern.replace("{split}", s) for s in splits}
  return dict(tfrecord_pattern)


def add_task(name: str, source: seqio.DataSource, vocab: seqio.Vocabulary, preprocessors: list,
             image_size: int, shuffle_buffer_size: int = 1000) -> seqio.Task:
  """Registers (or replaces) a common-format seqio Task."""
  seqio.TaskRegistry.remove(name)
  task = seqio.TaskRegistry.add(name, source=source, output_features=output_features(vocab),
                                preprocessors=preprocessors,
                                shuffle_buffer_size=shuffle_buffer_size)
  IMAGE_SIZES[name] = image_size
  return task


def shard_plan(provider, split: str, shard_index: int, num_shards: int
               ) -> tuple[seqio.ShardInfo | None, bool]:
  """(seqio ShardInfo, shard examples instead): file-level sharding (each process reads its own
  files) when every source has at least `num_shards` files, else every process reads everything
  and keeps its rows of each global batch (the very batches of a single process, at num_shards
  times the reading: for small datasets)."""
  if num_shards <= 1:
    return None, False
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  if all(len(t.source.list_shards(split)) >= num_shards for t in tasks):
    return seqio.ShardInfo(shard_index, num_shards), False
  return None, True


def rows_of_shard(batch: dict, shard_index: int, rows: int) -> dict:
  """Rows [shard_index * rows, (shard_index + 1) * rows) of every feature of a global batch."""
  return {k: v[shard_index * rows:(shard_index + 1) * rows] for k, v in batch.items()}


def get_batches(name: str, *, split: str = "train", batch_size: int, shuffle: bool = True,
                seed: int = 0, image_size: int | None = None, max_target_len: int = 128,
                max_context_len: int = 8, num_regions: int = 1, num_epochs: int | None = None,
                shard_index: int = 0, num_shards: int = 1, drop_remainder: bool = True,
                extra_features: Sequence[str] = ()) -> Iterator[dict[str, np.ndarray]]:
  """Numpy batches of a common Task or Mixture: the module docstring's features with a batch axis,
  image float32[B, S, S, 3] in [0, 1]. A Task also yields its extra features (variable-length
  ones padded with 0 / b""); a Mixture only `extra_features`. The same seed gives the same
  batches."""
  if not is_common(name):
    raise ValueError(f"{name!r} is not a registered common-format Task or Mixture "
                     f"(known: {sorted(IMAGE_SIZES)})")
  if image_size is not None and image_size != IMAGE_SIZES[name]:
    raise ValueError(f"{name!r} was registered with image_size={IMAGE_SIZES[name]}, not "
                     f"{image_size}; register another task for that size.")
  provider = seqio.get_mixture_or_task(name)
  shard_info, example_level = shard_plan(provider, split, shard_index, num_shards)
  kwargs = dict(sequence_length={"targets": max_target_len, "prompt_text": max_context_len,
                                 "regions": num_regions},
                split=split, shuffle=shuffle, seed=seed, num_epochs=num_epochs,
                shard_info=shard_info, trim_output_features=False)
  if isinstance(provider, seqio.Mixture):
    kwargs["passthrough_features"] = list(COMMON_FEATURES) + list(extra_features)
  ds = provider.get_dataset(**kwargs)
  missing = set(COMMON_FEATURES) - set(ds.element_spec)
  if missing:
    raise ValueError(f"{name!r} lacks the common features {sorted(missing)}")

  def to_float(ex):
    return {**ex, "image": tf.cast(ex["image"], tf.float32) / 255.0}
  ds = ds.map(plain(to_float), num_parallel_calls=AUTOTUNE)
  if example_level:  # this shard's rows of the global batch: the same batches as one process
    ds = ds.padded_batch(batch_size * num_shards, drop_remainder=drop_remainder)
    ds = ds.map(plain(lambda b: rows_of_shard(b, shard_index, batch_size)))
  else:
    ds = ds.padded_batch(batch_size, drop_remainder=drop_remainder)
  return ds.prefetch(AUTOTUNE).as_numpy_iterator()
