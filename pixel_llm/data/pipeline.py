"""From a config to train and eval batches: the embedded synthetic world or real LN TFRecords.

`config.data.source`:
  "synthetic"  generate the synthetic world (LN format) into a cache once, build its TFRecords with
               the same builder as real data, then read them through the LN seqio task. The cache is
               `config.data.root`, else $PIXEL_LLM_DATA_DIR/synthetic-<settings>, else
               ~/.cache/pixel_llm/synthetic-<settings>.
  "ln"         real Localized Narratives TFRecords written by `python -m pixel_llm.data.build ln`:
               `config.data.tfrecords` (pattern with "{split}") and `config.data.vocab`
               (Flan-T5's spiece.model), or the environment variables PIXEL_LLM_LN_TFRECORDS and
               PIXEL_LLM_VOCAB.
"""
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Iterator

from pixel_llm.data import synthetic

MODEL_KEYS = ("image", "image_mask", "prompt_boxes", "prompt_points", "prompt_point_labels",
              "prompt_text", "decoder_input_tokens", "decoder_target_tokens", "point_targets",
              "point_weights", "caption_weights")


@dataclasses.dataclass
class Data:
  vocab: Any
  # (batches to skip, shard index, number of shards) -> endless iterator of this shard's batches
  train_batches: Callable[..., Iterator[dict]]
  eval_batches: Callable[[], Iterator[dict]]      # one pass over the held-out split


def _synthetic_root(config) -> str:
  d = config.data
  if d.get("root"):
    return d.root
  key = json.dumps(dict(n=d.num_train_images, v=d.num_val_images, s=d.image_size, seed=d.seed,
                        generator=synthetic.VERSION), sort_keys=True)
  name = "synthetic-" + hashlib.sha1(key.encode()).hexdigest()[:10]
  base = os.environ.get("PIXEL_LLM_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "pixel_llm")
  return os.path.join(base, name)


def ensure_synthetic(config) -> str:
  """Generates and builds the synthetic world once; returns its root. Crash-safe: the world is
  written to a temporary folder and renamed into place only when complete."""
  from pixel_llm.data import build

  d = config.data
  root = _synthetic_root(config)
  if os.path.exists(os.path.join(root, "READY")):
    return root
  tmp = root + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  print(f"Generating the synthetic world ({d.num_train_images} train + {d.num_val_images} val "
        f"images, {d.image_size} px) into {root}", flush=True)
  synthetic.generate(tmp, d.num_train_images, d.seed, image_size=d.image_size, split="train")
  synthetic.generate(tmp, d.num_val_images, d.seed, image_size=d.image_size, split="val")
  for split in ("train", "val"):
    rc = build.main(["ln", "--annotations", synthetic.annotation_path(tmp, split),
                     "--images", os.path.join(tmp, "images", f"{split}2017"),
                     "--out", os.path.join(tmp, "tfrecords"), "--split", split, "--strict"])
    if rc:
      raise RuntimeError(f"Building the synthetic {split} TFRecords failed (exit {rc}).")
  with open(os.path.join(tmp, "READY"), "w") as f:
    f.write("ok\n")
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
  os.rename(tmp, root)
  return root


def _sources(config) -> tuple[str, str]:
  """(TFRecord pattern with "{split}", vocabulary path) for the configured source."""
  d = config.data
  if d.source == "synthetic":
    root = ensure_synthetic(config)
    return os.path.join(root, "tfrecords", "ln_{split}.tfrecord-*"), os.path.join(root,
                                                                                   "spiece.model")
  if d.source == "ln":
    pattern = d.get("tfrecords") or os.environ.get("PIXEL_LLM_LN_TFRECORDS", "")
    vocab = d.get("vocab") or os.environ.get("PIXEL_LLM_VOCAB", "")
    if not pattern or not vocab:
      raise ValueError("config.data.source='ln' needs --config.data.tfrecords=PATTERN (with "
                       "'{split}') and --config.data.vocab=spiece.model, or the environment "
                       "variables PIXEL_LLM_LN_TFRECORDS and PIXEL_LLM_VOCAB.")
    for split in ("train", "val"):
      if not glob.glob(pattern.replace("{split}", split)):
        raise FileNotFoundError(f"No LN TFRecords match {pattern.replace('{split}', split)!r}; "
                                "build them with `python -m pixel_llm.data.build ln ...`.")
    if not os.path.exists(vocab):
      raise FileNotFoundError(f"Vocabulary {vocab!r} does not exist.")
    return pattern, vocab
  raise ValueError(f"Unknown config.data.source {d.source!r}; use 'synthetic' or 'ln'.")


def _fast_forward(batches: Iterator[dict], skip: int, every_s: float = 10.0) -> None:
  """Reads and drops `skip` batches (the resumed run's position), with progress and ETA."""
  if not skip:
    return
  start = last = time.time()
  for i in range(1, skip + 1):
    next(batches)
    now = time.time()
    if now - last > every_s or i == skip:
      last, rate = now, i / max(now - start, 1e-9)
      print(f"input pipeline: skipped {i}/{skip} batches already trained on "
            f"({rate:.1f} batches/s, ETA {int((skip - i) / rate)} s)", flush=True)


def prepare(config, workdir: str | None = None) -> Data:
  """Sources, vocabulary and batch iterators for `config` (see the module docstring)."""
  del workdir
  from pixel_llm.data import tasks
  from pixel_llm.data import vocab as vocab_lib

  pattern, vocab_path = _sources(config)
  vocab = vocab_lib.load(vocab_path)
  if vocab.vocab_size > config.model.t5.vocab_size:
    raise ValueError(f"The vocabulary {vocab_path} has {vocab.vocab_size} ids but the model's "
                     f"vocab_size is {config.model.t5.vocab_size}.")
  d, inp = config.data, config.input
  common = dict(vocab_path=vocab_path, image_size=config.model.image_size,
                max_target_len=inp.max_target_len, max_context_len=inp.max_context_len,
                prompts=tuple(d.prompts), split_sentences=d.split_sentences)

  def train_batches(skip: int = 0, shard_index: int = 0, num_shards: int = 1):
    # One fixed seed: the batch sequence is a pure function of (config, shard), so a resumed run
    # re-reads the first `skip` batches and continues exactly where the interrupted one stopped.
    if config.batch_size % num_shards:
      raise ValueError(f"batch_size {config.batch_size} is not divisible by the {num_shards} "
                       "input shards (processes).")
    batches = tasks.get_dataset(pattern, split="train", batch_size=config.batch_size // num_shards,
                                shuffle=True, seed=config.seed, shard_index=shard_index,
                                num_shards=num_shards, **common)
    _fast_forward(batches, skip)
    return batches

  def eval_batches():
    return tasks.get_dataset(pattern, split="val", batch_size=d.eval_batch_size, shuffle=False,
                             num_epochs=1, drop_remainder=False, **common)

  return Data(vocab=vocab, train_batches=train_batches, eval_batches=eval_batches)
