"""From a config to train and eval batches: the embedded synthetic world or real TFRecords.

`config.data.task`:
  "ln"        captioning + trace on Localized Narratives (stage 2), optionally mixed with COCO
              captions: `config.data.coco_captions_rate` r > 0 draws COCO : LN = r : 2 (the
              paper's trace stage is r = 1), COCO train images jittered by
              `config.data.coco_captions_scale_jitter`. Evaluation: the LN val split.
  "captions"  image-caption pre-training on COCO-captions-schema records (WebLI pairs built with
              `python -m pixel_llm.data.build webli`, or COCO captions); stage 1, `configs/webli.py`.
  "refcoco"   referring localization (`tasks_refcoco`, kind `config.data.refcoco_kind`: "loc" =
              expression prompt, box as 2 points where EOS is predicted; "loco" = GT box prompt,
              expression target) on records of `python -m pixel_llm.data.build refcoco`; eval on
              the val split (`configs/refcoco.py`). `config.data.refcoco_loco_rate` r > 0 trains
              "loc" jointly with "loco" (loc : loco = 1 : r, one Mixture); eval stays "loc".
              `config.data.refcoco_expressions_per_image` K > 1: each train example is an image
              with up to K expressions (needs `config.input.num_prompts` >= K); evaluation
              batches `config.input.eval_num_prompts` (1: one expression per example).
  "vg"        location-conditioned captioning of Visual Genome regions (`tasks_regions`:
              `config.input.num_prompts` regions per image, GT box prompt -> phrase) on records
              of `python -m pixel_llm.data.build vg` (`configs/loc_caption.py`); train images
              augmented by `config.data.vg_scale_jitter` (min, max) and `vg_flip`.
`config.data.source`:
  "synthetic"  generate the synthetic world once into a cache (LN format, plus the COCO-captions
               and WebLI formats when the task needs them), build its TFRecords with the same
               builders as real data, then read them through the seqio tasks. The cache is
               `config.data.root`, else $PIXEL_LLM_DATA_DIR/synthetic-<settings>, else
               ~/.cache/pixel_llm/synthetic-<settings>. `config.data.synthetic_narration`
               ("salient" or "shuffled", `synthetic.NARRATIONS`) orders the narratives.
  "files"      (or "ln") real TFRecords: `config.data.tfrecords` (pattern with "{split}"; LN records for task
               "ln", caption records for "captions", RefCOCO records for "refcoco") and `config.data.vocab` (Flan-T5's
               spiece.model), or the environment variables PIXEL_LLM_LN_TFRECORDS /
               PIXEL_LLM_CAPTIONS_TFRECORDS and PIXEL_LLM_VOCAB; COCO captions for the mixture from
               `config.data.coco_captions_tfrecords` or PIXEL_LLM_COCO_CAPTIONS_TFRECORDS.
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
              "point_weights", "caption_weights", "masks", "mask_weights")


@dataclasses.dataclass
class Data:
  vocab: Any
  # (batches to skip, shard index, number of shards) -> endless iterator of this shard's batches
  train_batches: Callable[..., Iterator[dict]]
  eval_batches: Callable[..., Iterator[dict]]     # (split="val") -> one pass over that split


def _synthetic_formats(config) -> tuple[str, ...]:
  """Formats beyond LN the synthetic world must write for this config's task."""
  d = config.data
  if d.get("task", "ln") == "captions":
    return ("webli",)
  if d.get("task", "ln") in ("refcoco", "vg"):
    return (d.task,)
  return ("coco_captions",) if d.get("coco_captions_rate", 0.0) > 0 else ()


def _narration(config) -> str:
  """The synthetic narratives' order (`synthetic.NARRATIONS`); configs without it: "salient"."""
  return config.data.get("synthetic_narration", "salient")


def _synthetic_root(config) -> str:
  d = config.data
  if d.get("root"):
    return d.root
  settings = dict(n=d.num_train_images, v=d.num_val_images, s=d.image_size, seed=d.seed,
                  generator=synthetic.VERSION)
  if _synthetic_formats(config):  # (LN-only worlds keep their earlier cache names)
    settings["formats"] = list(_synthetic_formats(config))
  if _narration(config) != "salient":  # (salient worlds keep their earlier cache names)
    settings["narration"] = _narration(config)
  if "refcoco" in _synthetic_formats(config):
    settings["refcoco_records"] = "per_image"  # `build.py refcoco` writes one record per image
  key = json.dumps(settings, sort_keys=True)
  name = "synthetic-" + hashlib.sha1(key.encode()).hexdigest()[:10]
  base = os.environ.get("PIXEL_LLM_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "pixel_llm")
  return os.path.join(base, name)


def _build(args: list[str]) -> None:
  from pixel_llm.data import build
  rc = build.main(args + ["--strict"])
  if rc:
    raise RuntimeError(f"Building the synthetic TFRecords failed (exit {rc}): build {args}")


def ensure_synthetic(config) -> str:
  """Generates and builds the synthetic world once; returns its root. Crash-safe: the world is
  written to a temporary folder and renamed into place only when complete."""
  d = config.data
  formats = _synthetic_formats(config)
  root = _synthetic_root(config)
  if os.path.exists(os.path.join(root, "READY")):
    return root
  tmp = root + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  print(f"Generating the synthetic world ({d.num_train_images} train + {d.num_val_images} val "
        f"images, {d.image_size} px; formats ln{''.join(',' + f for f in formats)}) into {root}",
        flush=True)
  records = os.path.join(tmp, "tfrecords")
  for split, n in (("train", d.num_train_images), ("val", d.num_val_images)):
    examples = []
    synthetic.generate(tmp, n, d.seed, image_size=d.image_size, split=split,
                       on_example=examples.append,
                       narration=_narration(config))
    images = os.path.join(tmp, "images", f"{split}2017")
    _build(["ln", "--annotations", synthetic.annotation_path(tmp, split), "--images", images,
            "--out", records, "--split", split])
    if "coco_captions" in formats:
      from pixel_llm.data import synthetic_formats
      path, = synthetic_formats.write_coco_captions(tmp, examples, d.seed)[:1]
      _build(["coco_captions", "--captions", path, "--images", images, "--out", records,
              "--split", split])
    if "refcoco" in formats:  # the val images' refs are split val/testA/testB (image id mod 3)
      from pixel_llm.data import synthetic_formats
      info = synthetic_formats.write_refcoco(os.path.join(tmp, f"refcoco_{split}"), examples,
                                             d.seed)
      _build(["refcoco", "--refs", info["refs"], "--instances", info["instances"], "--images",
              images, "--out", records, "--split", split])
    if "vg" in formats:  # the val images are split val/test by image id parity
      from pixel_llm.data import synthetic_regions
      vg_dir = os.path.join(tmp, f"vg_{split}")
      descriptions, image_data, split_file = synthetic_regions.write_vg(vg_dir, examples,
                                                                        d.seed)[:3]
      _build(["vg", "--regions", descriptions, "--image_data", image_data, "--split_file",
              split_file, "--images", os.path.join(vg_dir, "vg", "VG_100K"),
              os.path.join(vg_dir, "vg", "VG_100K_2"), "--out", records, "--split", split])
    if "webli" in formats:
      from pixel_llm.data import synthetic_regions
      path = synthetic_regions.write_webli(tmp, examples, d.seed)
      _build(["webli", "--jsonl", path, "--images", tmp, "--out", records, "--split", split])
  with open(os.path.join(tmp, "READY"), "w") as f:
    f.write("ok\n")
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
  os.rename(tmp, root)
  return root


def _files(config, field: str, env: str, what: str, builder: str) -> str:
  """A real TFRecord pattern (with "{split}") from the config or the environment, checked."""
  pattern = config.data.get(field) or os.environ.get(env, "")
  if not pattern:
    raise ValueError(f"config.data.source={config.data.source!r} needs {what} TFRecords: --config.data.{field}="
                     f"PATTERN (with '{{split}}') or the environment variable {env}.")
  for split in ("train", "val"):
    if not glob.glob(pattern.replace("{split}", split)):
      raise FileNotFoundError(f"No {what} TFRecords match {pattern.replace('{split}', split)!r}; "
                              f"build them with `python -m pixel_llm.data.build {builder} ...`.")
  return pattern


def _existing_vocab(path: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f"Vocabulary {path!r} does not exist.")
  return path


def _sources(config) -> tuple[dict[str, str], str]:
  """({"ln" | "captions" | "coco_captions": TFRecord pattern with "{split}"}, vocabulary path)."""
  d = config.data
  task = d.get("task", "ln")
  if task not in ("ln", "captions", "refcoco", "vg"):
    raise ValueError(f"Unknown config.data.task {task!r}; use 'ln', 'captions', 'refcoco' or "
                     "'vg'.")
  mix = task == "ln" and d.get("coco_captions_rate", 0.0) > 0
  if d.source == "synthetic":
    root = os.path.join(ensure_synthetic(config), "tfrecords")
    names = {"ln": "ln", "captions": "webli", "coco_captions": "coco_captions",
             "refcoco": "refcoco", "vg": "vg"}
    wanted = [task] + (["coco_captions"] if mix else [])
    # A given vocabulary replaces the world's (trained on its train captions), e.g. to go on
    # from a checkpoint trained on a smaller world, whose vocabulary differs in a few pieces.
    vocab = d.get("vocab") or os.path.join(os.path.dirname(root), "spiece.model")
    return ({k: os.path.join(root, names[k] + "_{split}.tfrecord-*") for k in wanted},
            _existing_vocab(vocab))
  if d.source not in ("files", "ln"):
    raise ValueError(f"Unknown config.data.source {d.source!r}; use 'synthetic' or 'files' "
                     "('ln' is the same as 'files').")
  vocab = d.get("vocab") or os.environ.get("PIXEL_LLM_VOCAB", "")
  if not vocab:
    raise ValueError(f"config.data.source={d.source!r} needs --config.data.vocab=spiece.model (Flan-T5's) "
                     "or the environment variable PIXEL_LLM_VOCAB.")
  _existing_vocab(vocab)
  if task == "captions":
    patterns = {"captions": _files(config, "tfrecords", "PIXEL_LLM_CAPTIONS_TFRECORDS",
                                   "image-caption", "webli")}
  elif task == "refcoco":
    patterns = {"refcoco": _files(config, "tfrecords", "PIXEL_LLM_REFCOCO_TFRECORDS", "RefCOCO",
                                  "refcoco")}
  elif task == "vg":
    patterns = {"vg": _files(config, "tfrecords", "PIXEL_LLM_VG_TFRECORDS", "Visual Genome", "vg")}
  else:
    patterns = {"ln": _files(config, "tfrecords", "PIXEL_LLM_LN_TFRECORDS", "LN", "ln")}
  if mix:
    patterns["coco_captions"] = _files(config, "coco_captions_tfrecords",
                                       "PIXEL_LLM_COCO_CAPTIONS_TFRECORDS", "COCO captions",
                                       "coco_captions")
  return patterns, vocab


def _register(config, patterns: dict[str, str], vocab_path: str) -> tuple[str | None, str]:
  """Registers the seqio tasks of `patterns`; (common-format train Task/Mixture name or None for
  the plain LN path, eval Task name or pattern)."""
  from pixel_llm.data import mixtures, tasks, tasks_caption, tasks_refcoco, tasks_regions

  d = config.data
  jitter = tuple(d.get("refcoco_scale_jitter", ())) or None
  digest = hashlib.sha1(json.dumps([patterns, vocab_path, config.model.image_size,
                                    list(d.prompts), d.split_sentences, jitter,
                                    d.get("refcoco_loco_rate", 0.0),
                                    list(d.get("vg_scale_jitter", ())), d.get("vg_flip", False),
                                    list(d.get("coco_captions_scale_jitter", ())),
                                    d.get("refcoco_expressions_per_image", 1)],
                                   sort_keys=True).encode()).hexdigest()[:10]
  size = config.model.image_size
  if "captions" in patterns:
    name = f"captions_{digest}"
    tasks_caption.register_caption_task(name, patterns["captions"], vocab_path, image_size=size,
                                        prompts=tuple(d.prompts))
    return name, name
  if "refcoco" in patterns:
    kind = d.get("refcoco_kind", "loc")
    loco_rate = d.get("refcoco_loco_rate", 0.0)
    if loco_rate and kind != "loc":
      raise ValueError("config.data.refcoco_loco_rate mixes location-conditioned captioning into "
                       f"referring localization; it needs refcoco_kind='loc', not {kind!r}.")

    def register(kind, caption_loss):
      name = f"refcoco_{kind}_{digest}"
      tasks_refcoco.register_refcoco_task(
          name, patterns["refcoco"], vocab_path, kind=kind, image_size=size,
          splits=("train",) + tuple(d.get("eval_splits", ("val",))),
          prompt_prefix=d.get("refcoco_prompt_prefix", ""), caption_loss=caption_loss,
          scale_jitter=jitter,
          expressions_per_image=d.get("refcoco_expressions_per_image", 1))
      return name

    name = register(kind, d.get("refcoco_caption_loss", False))
    if not loco_rate:
      return name, name
    # The paper's joint referring stage: box -> expression examples beside expression -> box ones
    # (loc : loco = 1 : rate); evaluation stays referring localization.
    mixture = f"refcoco_joint_{digest}"
    mixtures.register_mixture(mixture, [(name, 1.0), (register("loco", True), loco_rate)])
    return mixture, name
  if "vg" in patterns:
    name = f"vg_regions_{digest}"
    tasks_regions.register_vg_task(name, patterns["vg"], vocab_path, image_size=size,
                                   splits=("train",) + tuple(d.get("eval_splits", ("val",))),
                                   scale_jitter=tuple(d.get("vg_scale_jitter", ())) or None,
                                   flip=d.get("vg_flip", False))
    return name, name
  if "coco_captions" not in patterns:
    return None, patterns["ln"]
  ln_name, coco_name = f"ln_{digest}", f"coco_captions_{digest}"
  tasks.register_ln_task(ln_name, patterns["ln"], vocab_path, image_size=size,
                         prompts=tuple(d.prompts), split_sentences=d.split_sentences)
  tasks_caption.register_ln_common_task(ln_name + "_common", ln_name)
  tasks_caption.register_caption_task(
      coco_name, patterns["coco_captions"], vocab_path, image_size=size,
      scale_jitter=tuple(d.get("coco_captions_scale_jitter", ())) or None)
  mixtures.register_trace_stage(f"trace_stage_{digest}", coco_name, ln_name + "_common",
                                rates=(d.coco_captions_rate, 2.0))
  return f"trace_stage_{digest}", ln_name


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

  patterns, vocab_path = _sources(config)
  vocab = vocab_lib.load(vocab_path)
  if vocab.vocab_size > config.model.t5.vocab_size:
    raise ValueError(f"The vocabulary {vocab_path} has {vocab.vocab_size} ids but the model's "
                     f"vocab_size is {config.model.t5.vocab_size}.")
  d, inp = config.data, config.input
  if d.get("refcoco_expressions_per_image", 1) > inp.get("num_prompts", 1):
    raise ValueError(f"config.data.refcoco_expressions_per_image="
                     f"{d.refcoco_expressions_per_image} needs config.input.num_prompts >= it "
                     f"(it is {inp.get('num_prompts', 1)}): each is a prompt of the image.")
  train_name, eval_name = _register(config, patterns, vocab_path)
  lengths = dict(image_size=config.model.image_size, max_target_len=inp.max_target_len,
                 max_context_len=inp.max_context_len)
  if train_name:  # common-format tasks carry R prompts per image
    lengths["num_regions"] = inp.get("num_prompts", 1)
  # The plain LN path defines its task from a file pattern on the fly; registered tasks carry
  # their own vocabulary and prompts.
  plain_ln = dict(vocab_path=vocab_path, prompts=tuple(d.prompts),
                  split_sentences=d.split_sentences)

  def train_batches(skip: int = 0, shard_index: int = 0, num_shards: int = 1):
    # One fixed seed: the batch sequence is a pure function of (config, shard), so a resumed run
    # re-reads the first `skip` batches and continues exactly where the interrupted one stopped.
    if config.batch_size % num_shards:
      raise ValueError(f"batch_size {config.batch_size} is not divisible by the {num_shards} "
                       "input shards (processes).")
    batches = tasks.get_dataset(train_name or patterns["ln"], split="train",
                                batch_size=config.batch_size // num_shards, shuffle=True,
                                seed=config.seed, shard_index=shard_index, num_shards=num_shards,
                                **lengths, **({} if train_name else plain_ln))
    _fast_forward(batches, skip)
    return batches

  # Evaluation may batch fewer prompts per image (referring: one expression per example).
  eval_lengths = dict(lengths)
  if train_name:
    eval_lengths["num_regions"] = inp.get("eval_num_prompts", 0) or lengths["num_regions"]

  def eval_batches(split: str = "val"):
    registered = eval_name in tasks.seqio.TaskRegistry.names()
    return tasks.get_dataset(eval_name, split=split, batch_size=d.eval_batch_size, shuffle=False,
                             num_epochs=1, drop_remainder=False, **eval_lengths,
                             **({} if registered else plain_ln))

  return Data(vocab=vocab, train_batches=train_batches, eval_batches=eval_batches)
