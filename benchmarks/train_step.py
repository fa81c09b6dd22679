r"""Times the trainer's own training step (pixel_llm.trainer.build_training) on one device.

  python benchmarks/train_step.py --config=configs/ln.py --batch=64,32 --dtype=bfloat16 \
      --attention=cudnn --out=/tmp/ts.json                      # a GPU: the paper's setting
  python benchmarks/train_step.py --config=configs/ln.py:toy --batch=16 --dtype=float32   # CPU

The step is the one `pixel_llm.train` runs: sharded jit with donated state, gradients of the
trainable parameters only (frozen towers are plain inputs, kept in --frozen_dtype), AdamW with the
config's schedule and clipping, the non-finite skip guard. Inputs are random (images, tokens,
points; never zeros), the weights a random init (speed does not depend on their values).

--batch takes a list: each size is tried in order and a size that does not fit (out of memory at
compile or run time) is reported and skipped, so `--batch=96,64,32` finds the largest that fits.
Per batch it reports: compile seconds, median step seconds over --steps timed steps after one
warm-up, examples/s, FLOPs per example two ways (analytic, from the model's shapes:
`pixel_llm.tools.flops`; and XLA's cost analysis of the compiled step, which also counts
rematerialised and elementwise work), MFU = analytic FLOPs/s over the device's peak (--peak_tflops,
default the datasheet's dense bf16 rate from pixel_llm.chips), and the device's peak
memory in use. Writes all of it with hardware, versions and the command as JSON (--out).

--aot_topology=v5e:16x16 [--aot_mesh=data=1,fsdp=256,tensor=1] estimates instead of measuring: the
same step compiled ahead of time for that TPU pod on this host (`pixel_llm.tools.aot`; libtpu, no
TPU), reporting XLA's per-chip memory and cost-model step time, examples/s and MFU for the pod,
labelled as model estimates in the JSON. Use it to pick meshes and remat policies at pod scale.

--remat=<policy> turns on rematerialisation of every tower with that jax.checkpoint_policies
name; --scan scans over layers (faster compiles); --attention picks layers.ATTENTION_IMPLS.
Shape letters: B batch.
"""
import argparse
import importlib.util
import os
import sys
import time

if any(a.startswith("--aot_topology") for a in sys.argv):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile only, as pixel_llm.tools.aot
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

import hardware  # benchmarks/hardware.py (this script's folder is on sys.path)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pixel_llm import partitioning  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixel_llm import trainer  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixel_llm.models import build  # pylint: disable=g-import-not-at-top,wrong-import-position

TOWERS = ("sam", "eva02", "t5")


def load_config(spec: str):
  """`path.py[:arg]` -> the config its get_config(arg) returns."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def apply_options(config, args):
  """The benchmark's knobs written into the config (what `--config.x=y` would do)."""
  with config.unlocked():
    config.model.dtype = args.dtype
    config.model.attention_impl = args.attention
    config.frozen_dtype = args.frozen_dtype
    config.mesh = dict(data=1, fsdp=1, tensor=1)
    for tower in TOWERS:
      if config.model.get(tower) is None:
        continue
      config.model[tower].scan_layers = bool(args.scan)
      config.model[tower].remat = bool(args.remat)
      if args.remat:
        config.model[tower].remat_policy = args.remat
  return config


def random_batch(config, batch_size: int, seed: int = 0) -> dict:
  """A batch of the config's shapes with random content (whole-image prompts kept)."""
  rng = np.random.default_rng(seed)
  batch = {k: np.asarray(v) for k, v in build.example_batch(config, batch_size, False).items()}
  vocab = config.model.t5.vocab_size
  batch["image"] = rng.random(batch["image"].shape, np.float32)
  for key in ("prompt_text", "decoder_input_tokens", "decoder_target_tokens"):
    batch[key] = rng.integers(2, vocab, batch[key].shape, dtype=np.int32)
  batch["point_targets"] = rng.random(batch["point_targets"].shape, np.float32)
  batch["point_weights"] = np.ones_like(batch["point_weights"])
  return batch


def analytic_flops(config) -> float | None:
  """Training FLOPs per example from the model's shapes (None if the counter is unavailable)."""
  try:
    from pixel_llm.tools import flops  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return float(flops.train_flops(config)["train"])


def peak_memory_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _xla_step_flops(compiled) -> float | None:
  """XLA's cost-model FLOPs of the step on all devices; None where the backend has no cost model.
  XLA counts a loop body once, so with scan over layers this is far below the real count (the
  analytic figure is the MFU numerator)."""
  try:
    from pixel_llm.tools import aot  # pylint: disable=g-import-not-at-top
    flops = float(aot.cost_analysis(compiled).get("flops", 0.0))
  except Exception:  # pylint: disable=broad-except
    return None
  return flops * jax.device_count() if flops > 0 else None


def time_batch(training, config, batch_size: int, steps: int) -> dict:
  """Compiles and times the step at one batch size; raises on out-of-memory."""
  state = training.init(jax.random.key(1))  # per size: the step donates (deletes) its state
  batch = {k: jax.device_put(v) for k, v in random_batch(config, batch_size).items()}
  print(f"batch {batch_size}: compiling", flush=True)
  t0 = time.time()
  compiled = training.compile_step(state, batch)
  compile_s = time.time() - t0
  print(f"batch {batch_size}: compiled in {compile_s:.1f} s; timing {steps} steps", flush=True)
  xla_flops = _xla_step_flops(compiled)
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.time()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.time() - t0)
  step_s = float(np.median(times))
  loss = float(metrics["loss"])
  del state
  return {"batch": batch_size, "compile_seconds": compile_s, "step_seconds_median": step_s,
          "step_seconds_all": times, "examples_per_second": batch_size / step_s,
          "xla_flops_per_example": xla_flops / batch_size if xla_flops else None,
          "peak_memory_bytes": peak_memory_bytes(), "loss": loss,
          "skipped_steps": int(metrics["skipped_steps"])}


def _is_oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def aot_estimates(config, args) -> None:
  """The step compiled for a TPU topology on this host: XLA's estimates, one report per batch."""
  from pixel_llm.tools import aot  # pylint: disable=g-import-not-at-top
  record = {**hardware.environment(), "config": args.config, "dtype": args.dtype,
            "remat": args.remat, "scan": args.scan, "aot_topology": args.aot_topology,
            "aot_mesh": args.aot_mesh, "kind": "XLA cost-model estimate for a TPU pod (compiled "
            "ahead of time on this host; nothing ran on a TPU)", "results": [],
            "command": " ".join(sys.argv)}
  for size in [int(b) for b in args.batch.split(",")]:
    r = aot.compile_step(config, args.aot_topology, aot.parse_mesh(args.aot_mesh), size)
    print(f"[model estimate] batch {size}\n{aot.format_report(r)}", flush=True)
    record["results"].append(r)
    hardware.write_json(args.out, record)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/ln.py")
  p.add_argument("--batch", default="16", help="comma-separated sizes, tried in order")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--frozen_dtype", default="bfloat16")
  p.add_argument("--attention", default="xla", help="xla | dot_product | cudnn")
  p.add_argument("--remat", default="", help="a jax.checkpoint_policies name; empty = no remat")
  p.add_argument("--scan", action="store_true", help="scan over layers in every tower")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--stop_after_first_fit", action="store_true",
                 help="stop at the first batch size that fits (a largest-first sweep)")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="0: the datasheet figure (pixel_llm.chips)")
  p.add_argument("--aot_topology", default="", help="e.g. v5e:16x16: pod-scale estimates (AOT)")
  p.add_argument("--aot_mesh", default="fsdp=-1", help="mesh for --aot_topology")
  p.add_argument("--out", default="")
  args = p.parse_args()

  config = apply_options(load_config(args.config), args)
  if args.aot_topology:
    aot_estimates(config, args)
    return
  device = jax.devices()[0]
  peak = args.peak_tflops * 1e12 or trainer.peak_flops(config)
  model_flops = analytic_flops(config)
  print(f"{args.config} {args.dtype} attention={args.attention} remat={args.remat or 'off'} "
        f"scan={args.scan} on {device.device_kind}; analytic "
        f"{(model_flops or 0) / 1e12:.3f} TFLOPs per example", flush=True)
  t0 = time.time()
  training = trainer.build_training(config, partitioning.mesh_from_config(config),
                                    jax.random.key(0))
  print(f"built in {time.time() - t0:.1f} s", flush=True)

  record = {**hardware.environment(), "config": args.config, "dtype": args.dtype,
            "frozen_dtype": args.frozen_dtype, "attention": args.attention, "remat": args.remat,
            "scan": args.scan, "peak_flops": peak, "results": [], "command": " ".join(sys.argv)}
  for size in [int(b) for b in args.batch.split(",")]:
    try:
      r = time_batch(training, config, size, args.steps)
    except Exception as e:  # pylint: disable=broad-except
      if not _is_oom(e):
        raise
      print(f"batch {size}: out of memory ({str(e).splitlines()[0][:160]})", flush=True)
      record["results"].append({"batch": size, "error": "out of memory"})
      hardware.write_json(args.out, record)
      continue
    if model_flops:
      r["analytic_flops_per_example"] = model_flops
      r["achieved_tflops"] = model_flops * r["examples_per_second"] / 1e12
      r["mfu"] = model_flops * r["examples_per_second"] / peak if peak else None
    record["results"].append(r)
    hardware.write_json(args.out, record)  # after each size: a run stopped by a time limit keeps what it measured
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
    mem = f"{r['peak_memory_bytes'] / 2**30:.1f} GiB" if r["peak_memory_bytes"] else "n/a"
    print(f"batch {size}: compile {r['compile_seconds']:.1f} s, step "
          f"{r['step_seconds_median'] * 1e3:.1f} ms, {r['examples_per_second']:.1f} examples/s, "
          f"MFU {mfu}, peak memory {mem}, loss {r['loss']:.3f}", flush=True)
    if args.stop_after_first_fit:
      break


if __name__ == "__main__":
  main()
