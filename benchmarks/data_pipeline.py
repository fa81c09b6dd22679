r"""Data-pipeline throughput (examples/s after a warm-up) at 384 px on synthetic data:

  ln              the LN seqio task through `pixel_llm.data.tasks.get_dataset` (what the trainer
                  reads): parse, tokenise + align, JPEG decode, resize_and_pad, model features
  refcoco         RefCOCO TFRecords: parse, JPEG + PNG mask decode, one expression (and its
                  object) picked per record (an image), augment.random_crop_keeping + horizontal_flip + scale_jitter, batched
  refcoco_noaug   the same without crop / flip and at scale 1 (= resize_and_pad; evaluation)
  --profile adds ln_stages: the LN work split into cumulative stages (parse, + JPEG decode,
                  + resize_and_pad, tokenise + align alone) to show where the time goes.

  python benchmarks/data_pipeline.py --batch_size 32 --num_batches 20 --threads 2 --profile \
      [--data_dir DIR] [--out benchmarks/results/data_pipeline.json]

The synthetic world (--num_images images of 384 px, LN + RefCOCO annotations) is generated and
built once into --data_dir (default $PIXEL_LLM_DATA_DIR or ~/.cache/pixel_llm, then
bench-data_pipeline-<settings>) with the same CLIs as real data. --threads N pins the process to N
CPUs and sizes TF's intra/inter-op pools and the tf.data private threadpools (0: TF defaults).
Writes the figures, hardware, versions and command as JSON to --out. Shape letters: B batch,
S image side, R regions.
"""
import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import hardware  # benchmarks/hardware.py (this script's folder is on sys.path)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--num_batches", type=int, default=20, help="timed batches per pipeline")
  p.add_argument("--warmup_batches", type=int, default=3)
  p.add_argument("--threads", type=int, default=0, help="CPUs / TF threads (0: TF defaults)")
  p.add_argument("--image_size", type=int, default=384)
  p.add_argument("--num_images", type=int, default=256, help="synthetic images to generate")
  p.add_argument("--max_target_len", type=int, default=128)
  p.add_argument("--flip", default="swap_left_right", choices=("off", "swap_left_right"),
                 help="refcoco flip mode (default exercises the text swap; the dataset default "
                      "is off, augment.FLIP_DEFAULTS)")
  p.add_argument("--pipelines", default="ln,refcoco,refcoco_noaug")
  p.add_argument("--profile", action="store_true", help="also time the LN stages")
  p.add_argument("--data_dir", default=None)
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                               "data_pipeline.json"))
  return p.parse_args()


ARGS = _args()
if ARGS.threads > 0 and hasattr(os, "sched_setaffinity"):
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:ARGS.threads])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402  (after pinning the CPUs)

if ARGS.threads > 0:
  tf.config.threading.set_intra_op_parallelism_threads(ARGS.threads)
  tf.config.threading.set_inter_op_parallelism_threads(ARGS.threads)
from pixel_llm.data import augment, preprocess, refcoco, synthetic, tasks  # noqa: E402


def _run(cmd: list[str]) -> None:
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def ensure_data(args) -> str:
  """Generates and builds the synthetic LN + RefCOCO TFRecords once; returns the folder."""
  root = args.data_dir or os.path.join(
      os.environ.get("PIXEL_LLM_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "pixel_llm"),
      f"bench-data_pipeline-n{args.num_images}-s{args.image_size}-v{synthetic.VERSION}")
  if os.path.exists(os.path.join(root, "READY")):
    return root
  tmp = root + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  print(f"Generating {args.num_images} synthetic images ({args.image_size} px) into {root}",
        flush=True)
  py = sys.executable
  _run([py, "-m", "pixel_llm.data.synthetic", "--out", tmp, "--num_images",
        str(args.num_images), "--image_size", str(args.image_size), "--split", "train",
        "--formats", "ln,refcoco"])
  images, out = os.path.join(tmp, "images", "train2017"), os.path.join(tmp, "tfrecords")
  _run([py, "-m", "pixel_llm.data.build", "ln", "--annotations",
        synthetic.annotation_path(tmp, "train"), "--images", images, "--out", out, "--split",
        "train", "--strict"])
  _run([py, "-m", "pixel_llm.data.build", "refcoco", "--refs",
        os.path.join(tmp, "refcoco", "refs(unc).p"), "--instances",
        os.path.join(tmp, "refcoco", "instances.json"), "--images", images, "--out", out,
        "--split", "train", "--strict"])
  with open(os.path.join(tmp, "READY"), "w") as f:
    f.write("ok\n")
  shutil.rmtree(root, ignore_errors=True)
  os.rename(tmp, root)
  return root


def _options(threads: int) -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True
  if threads > 0:
    opts.threading.private_threadpool_size = threads
  return opts


def refcoco_dataset(pattern: str, batch_size: int, size: int, seed: int, flip: str,
                    augmented: bool, threads: int) -> tf.data.Dataset:
  """Batches {image float32[B, S, S, 3], image_mask bool[B, S, S], boxes float32[B, 1, 4],
  box_valid bool[B, 1], masks bool[B, 1, S, S], expression string[B]}."""
  files = sorted(glob.glob(pattern))
  if not files:
    raise FileNotFoundError(f"no RefCOCO TFRecords match {pattern!r}")
  spec = refcoco.feature_description()

  @tf.autograph.experimental.do_not_convert
  def fn(index, record):
    ex = tf.io.parse_single_example(record, spec)
    seed_ = augment.example_seed(seed, index)
    image = tf.io.decode_jpeg(ex["image/encoded"], channels=3)
    sents = tf.sparse.to_dense(ex["expression/sent"])  # a record is an image: M expressions
    pick = tf.random.stateless_uniform([], seed_, 0, tf.shape(sents)[0], tf.int32)
    owner = tf.cast(tf.sparse.to_dense(ex["expression/object"]), tf.int32)
    obj = tf.cond(tf.size(owner) > 0, lambda: owner[pick % tf.maximum(tf.size(owner), 1)],
                  lambda: 0)
    png = tf.sparse.to_dense(ex["mask"])[obj]
    masks = tf.cond(tf.strings.length(png) > 0,
                    lambda: tf.io.decode_png(png, channels=1)[..., 0] > 0,
                    lambda: tf.zeros(tf.shape(image)[:2], tf.bool))[None]
    texts = {"expression": sents[pick]}
    boxes = tf.reshape(tf.sparse.to_dense(ex["box"]), [-1, 4])[obj][None]
    points = tf.zeros([0, 2])
    if augmented:
      out = augment.random_crop_keeping(image, boxes, points, masks, [True], seed_, 0.6)
      out = augment.horizontal_flip(out["image"], out["boxes"], out["points"], out["masks"],
                                    texts, seed_, 0.5, flip)
      texts = out["texts"]
      out = augment.scale_jitter(out["image"], out["boxes"], out["points"], out["masks"], seed_,
                                 0.75, 1.25, size)
    else:
      out = augment.scale_jitter(image, boxes, points, masks, seed_, 1.0, 1.0, size)
    return {"image": tf.cast(out["image"], tf.float32) / 255.0, "image_mask": out["image_mask"],
            "boxes": out["boxes"], "box_valid": out["box_valid"], "masks": out["masks"],
            "expression": texts["expression"]}

  ds = tf.data.TFRecordDataset(files).repeat().enumerate().shuffle(1000, seed=seed)
  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(
      _options(threads))


def ln_stage_datasets(pattern: str, vocab_path: str, size: int, batch_size: int,
                      threads: int) -> dict:
  """Cumulative pieces of the LN work, each a batched tf.data pipeline over the same records."""
  import seqio  # pylint: disable=g-import-not-at-top
  tokenizer = seqio.SentencePieceVocabulary(vocab_path).tf_tokenizer
  parse = lambda r: preprocess.dense_utterances(  # noqa: E731
      tf.io.parse_single_example(r, preprocess.FEATURE_DESCRIPTION))
  stages = {
      "parse": lambda ex: {"caption": ex["caption"]},
      "parse+jpeg_decode": lambda ex: {"image": tf.io.decode_image(
          ex["image"], channels=3, expand_animations=False)},
      "parse+resize_and_pad": lambda ex: dict(zip(("image", "mask", "extent"),
                                                  preprocess.resize_and_pad(ex["image"], size))),
      "parse+tokenise_align": lambda ex: preprocess.align_tokens(
          ex["caption"], ex["starts"], ex["ends"], ex["has_trace"], ex["boxes"], tokenizer),
  }
  out = {}
  for name, fn in stages.items():
    ds = tf.data.TFRecordDataset(sorted(glob.glob(pattern))).repeat()
    ds = ds.map(lambda r, fn=fn: fn(parse(r)), num_parallel_calls=tf.data.AUTOTUNE)
    out[name] = ds.padded_batch(batch_size, drop_remainder=True).prefetch(
        tf.data.AUTOTUNE).with_options(_options(threads))
  return out


def throughput(batches, batch_size: int, warmup: int, num: int) -> dict:
  """examples/s over `num` batches of an iterator, after `warmup` batches (pipeline start,
  tracing, shuffle-buffer fill). cpu_ms_per_example: this process's CPU time (all threads) per
  example, which other jobs on the machine inflate much less than the wall time."""
  t0 = time.perf_counter()
  for _ in range(warmup):
    next(batches)
  t1, c1 = time.perf_counter(), time.process_time()
  for _ in range(num):
    next(batches)
  secs, cpu = time.perf_counter() - t1, time.process_time() - c1
  n = batch_size * num
  return {"examples_per_s": round(n / secs, 1), "seconds": round(secs, 3), "examples": n,
          "cpu_ms_per_example": round(1000 * cpu / n, 2),
          "warmup_seconds": round(t1 - t0, 3)}


def main(args) -> None:
  root = ensure_data(args)
  rec = os.path.join(root, "tfrecords")
  ln_pattern = os.path.join(rec, "ln_train.tfrecord-*")
  vocab_path = os.path.join(root, "spiece.model")
  b, size, load_before = args.batch_size, args.image_size, os.getloadavg()
  results = {}
  for name in args.pipelines.split(","):
    if name == "ln":
      it = tasks.get_dataset(ln_pattern, split="train", batch_size=b, seed=0, image_size=size,
                             max_target_len=args.max_target_len, vocab_path=vocab_path)
    elif name in ("refcoco", "refcoco_noaug"):
      it = refcoco_dataset(os.path.join(rec, "refcoco_train.tfrecord-*"), b, size, 0, args.flip,
                           name == "refcoco", args.threads).as_numpy_iterator()
    else:
      raise SystemExit(f"--pipelines: unknown {name!r}; valid: ln, refcoco, refcoco_noaug")
    results[name] = throughput(it, b, args.warmup_batches, args.num_batches)
    print(f"{name}: {results[name]['examples_per_s']} examples/s, "
          f"{results[name]['cpu_ms_per_example']} CPU ms/example", flush=True)
  if args.profile:
    results["ln_stages"] = {}
    for name, ds in ln_stage_datasets(ln_pattern, vocab_path, size, b, args.threads).items():
      results["ln_stages"][name] = throughput(ds.as_numpy_iterator(), b, args.warmup_batches,
                                              args.num_batches)
      r = results["ln_stages"][name]
      print(f"ln stage {name}: {r['examples_per_s']} examples/s, {r['cpu_ms_per_example']} CPU "
            "ms/example", flush=True)
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  load = max(load_before[0], os.getloadavg()[0])
  record = {
      "command": " ".join([sys.executable] + sys.argv),
      "note": (f"load average up to {load:.1f} on {cpus} CPUs: other processes shared them, so "
               "examples_per_s is pessimistic; cpu_ms_per_example depends less on the load"
               if load > cpus else "the machine was otherwise idle"),
      "settings": vars(args),
      "data_dir": root,
      "results": results,
      "hardware": {"cpu": hardware.cpu_name(), "cpu_count": os.cpu_count(),
                   "cpus_used": cpus,
                   "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
                   "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
                   "load_average_before": load_before, "load_average_after": os.getloadavg()},
      "versions": {"python": platform.python_version(), "tensorflow": tf.__version__},
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main(ARGS)
