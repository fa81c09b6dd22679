r"""Each speed change of the "Performance" issue measured as a before/after ratio, in one CPU run.

  JAX_PLATFORMS=cpu python benchmarks/speed_changes.py --out=benchmarks/results/speed_changes_cpu.json

The model is `configs/ln.py:toy` (configs/common.model_config with sam/eva02/t5/extractor "tiny",
128-px images) with T5 dropout off, so that the attention switch reaches T5 too (a fused kernel has
no attention-probability dropout, so T5 keeps its einsums where dropout is on). Every variant builds
the trainer's own step (pixel_llm.trainer.build_training: AdamW, frozen split, skip guard) on one
device and compiles it ahead of time (XLA's memory_analysis gives the byte figures). XLA's CPU
backend (LLVM) optimisation is off unless --xla_opt: the graph passes (fusion, buffer assignment)
still run, compiles take half the time, absolute step times are ~1.4x longer.

Timing on a shared machine: the load drifts by 2x within minutes, so the two variants of a pair are
compiled first and then timed interleaved: one step of each per round (the order flips every round,
so neither always runs second), --rounds_min rounds, more up to --rounds_max unless the per-round
ratios already sit on one side of 1.0 within a 20% range. Reported: both medians, their ratio, and
the median of the per-round ratios (each from two steps seconds apart, so robust to drift) with its
min..max. A change is clear when the two ratios agree and the min..max excludes 1.0. Compile and
byte figures are single measurements (bytes do not depend on load; compile seconds do, so the
1-minute load average at each compile is kept). Variants of the same config share one compiled step
(the base serves a, b, e, f and g). 759 s on 2 shared cores at load 1.8-5.4 (11 compiles of 28-62 s
each, ~490 s of it; the rest is the interleaved rounds).
Changes, each as before -> after:

  a attention_impl   "xla" (einsums) -> "dot_product" (jax.nn.dot_product_attention, XLA)
  b dtype            float32 -> bfloat16 compute
  c remat            off -> nothing_saveable / dots_saveable (sam, eva02, t5), at --remat_batch
  d scan_layers      unrolled -> scanned, T5 at 8+8 layers (compile time is the point)
  e donation         state not donated -> donated (alias bytes: outputs written in place)
  f frozen towers    all trainable -> FROZEN_SAM_AND_T5 (no grads / moments for them)
  g prompt axis      R prompts as R separate images -> R prompts per image (towers once per image)
  h prefetch         input pipeline (host time ~ one step) synchronous -> prefetch_to_device(size 2),
                     in a loop that only dispatches (async) and one that reads every step's loss

Ratio = before / after for times (> 1: faster) and bytes (> 1: smaller). CPU numbers say what XLA's
CPU backend does with these sizes; the GPU ratios differ (and "cudnn" attention is GPU-only).
Shape legend: B images, R prompts per image, T target text length.
"""
import argparse
import json
import os
import platform
import sys
import time

import flax
import jax
import numpy as np
import optax

import hardware  # benchmarks/hardware.py (this script's folder is on sys.path)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common, ln  # pylint: disable=g-import-not-at-top
from pixel_llm import partitioning, sharding, trainer  # pylint: disable=g-import-not-at-top
from pixel_llm.models import build  # pylint: disable=g-import-not-at-top
from pixel_llm.prefetch import prefetch_to_device  # pylint: disable=g-import-not-at-top

ROUNDS = (5, 9)  # (min, max) interleaved rounds, set from --rounds_min / --rounds_max
VARIANTS = []  # every compiled variant, for the JSON
COMPILER_OPTIONS = {}  # set from --xla_opt


def load() -> float:
  return os.getloadavg()[0]


def base_config(batch: int, target_len: int):
  c = ln.get_config("toy")
  c.model.t5.dropout_rate = 0.0
  c.input.max_target_len = target_len
  c.batch_size = batch
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  return c


def _host_batch(config, batch: int, seed: int = 0) -> dict:
  """A numpy batch of the config's shapes (non-trivial tokens so the loss has work)."""
  rng = np.random.RandomState(seed)
  out = {k: np.asarray(v) for k, v in build.example_batch(config, batch, abstract=False).items()}
  v = config.model.t5.vocab_size
  out["decoder_input_tokens"] = rng.randint(1, v, out["decoder_input_tokens"].shape, np.int32)
  out["decoder_target_tokens"] = rng.randint(1, v, out["decoder_target_tokens"].shape, np.int32)
  out["prompt_text"] = rng.randint(1, v, out["prompt_text"].shape, np.int32)
  out["point_weights"] = np.ones_like(out["point_weights"])
  out["image"] = rng.rand(*out["image"].shape).astype(np.float32)
  return out


def _noise_state(abstract_state) -> dict:
  """The train state from numpy noise (params) and zeros (the rest): a jitted init would cost a
  second compile per variant, and the timings do not depend on the values."""
  rng = np.random.RandomState(0)
  def fill(path, a):
    if path[0].key == "params" and jax.numpy.issubdtype(a.dtype, jax.numpy.floating):
      host = (rng.standard_normal(a.shape) * 0.02).astype(a.dtype)
    else:
      host = np.zeros(a.shape, a.dtype)
    return jax.device_put(host, a.sharding)
  return jax.tree_util.tree_map_with_path(fill, abstract_state)


class Run:
  """One variant: the trainer's step compiled for `config` at `batch` images."""

  def __init__(self, name: str, config, batch: int, donate: bool = True):
    self.name, self.config, self.batch_size = name, config, batch
    self.mesh = partitioning.mesh_from_config(config, jax.devices()[:1])
    t0 = time.perf_counter()
    training = trainer.build_training(config, self.mesh, jax.random.key(1))
    self.state = _noise_state(training.abstract_state)
    jax.block_until_ready(self.state)
    self.init_s = time.perf_counter() - t0
    self.batch_sharding = sharding.batch_sharding(self.mesh, 1)
    self.host_batch = _host_batch(config, batch)
    self.batch = self.put(self.host_batch)
    jitted = training.jitted_step
    if not donate:  # the same step and shardings, minus donate_argnums
      jitted = jax.jit(
          trainer.make_train_step(training.model, training.tx, training.schedule, training.labels,
                                jax.random.key(1)),
          in_shardings=(training.state_shardings, self.batch_sharding),
          out_shardings=(training.state_shardings, sharding.replicated(self.mesh)))
    self.load_at_compile = load()
    with trainer.mesh_context(self.mesh):
      t0 = time.perf_counter()
      lowered = jitted.lower(self.state, self.batch)
      self.lower_s = time.perf_counter() - t0
      self.compiled = lowered.compile(COMPILER_OPTIONS)
      self.compile_s = time.perf_counter() - t0 - self.lower_s
    mem = self.compiled.memory_analysis()
    self.mem = {k: int(getattr(mem, k + "_size_in_bytes", 0) or 0)
                for k in ("temp", "argument", "output", "alias", "generated_code")}
    self.loss = float(self.step()["loss"])  # warm-up: the first call pays one-off costs
    self.record = {
        "variant": name, "batch": batch, "init_s": self.init_s, "trace_lower_s": self.lower_s,
        "compile_s": self.compile_s, "trace_and_compile_s": self.lower_s + self.compile_s,
        "load_1min_at_compile": self.load_at_compile, "loss": self.loss,
        **{k + "_bytes": v for k, v in self.mem.items()}}
    VARIANTS.append(self.record)
    print(f"  {name:34s} trace {self.lower_s:5.1f} s  compile {self.compile_s:5.1f} s  (load "
          f"{self.load_at_compile:.1f})  temp {self.mem['temp'] / 2**20:7.1f} MiB  alias "
          f"{self.mem['alias'] / 2**20:5.1f} MiB  loss {self.loss:.3f}", flush=True)

  def put(self, host: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in host.items()}

  def step(self, batch=None):
    with trainer.mesh_context(self.mesh):
      self.state, metrics = self.compiled(self.state, self.batch if batch is None else batch)
    return metrics

  def timed_step(self) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(self.step())
    return time.perf_counter() - t0


def _settled(ratios: list[float]) -> bool:
  """Enough rounds: every per-round ratio on one side of 1.0, and their range <= 20% of the
  median (a change near 1.0, or a noisy one, runs to the maximum)."""
  lo, hi = min(ratios), max(ratios)
  return (lo > 1 or hi < 1) and hi - lo <= 0.2 * float(np.median(ratios))


def interleave(before, after, rounds=None) -> dict:
  """Seconds of `before()` and `after()` (each a callable that times one step or burst), one of
  each per round, the order flipped every round. Per-round ratio = before / after."""
  lo, hi = rounds or ROUNDS
  tb, ta = [], []
  while len(tb) < hi:
    if len(tb) % 2 == 0:
      tb.append(before()); ta.append(after())
    else:
      ta.append(after()); tb.append(before())
    if len(tb) >= lo and _settled([b / a for b, a in zip(tb, ta)]):
      break
  per = [b / a for b, a in zip(tb, ta)]
  mb, ma = float(np.median(tb)), float(np.median(ta))
  return {"before": mb, "after": ma, "ratio": mb / ma, "ratio_per_round_median": float(
      np.median(per)), "ratio_per_round_min": min(per), "ratio_per_round_max": max(per),
          "rounds": len(tb), "before_times": tb, "after_times": ta, "ratios_per_round": per,
          "before_min_max": [min(tb), max(tb)], "after_min_max": [min(ta), max(ta)]}


def _clear(t: dict) -> bool:
  """The two ratios agree (same side of 1.0, within 10%) and the per-round range excludes 1.0."""
  r, m = t["ratio"], t["ratio_per_round_median"]
  one_side = t["ratio_per_round_min"] > 1 or t["ratio_per_round_max"] < 1
  return one_side and (r > 1) == (m > 1) and abs(r / m - 1) <= 0.1


def time_row(change: str, metric: str, before: Run, after: Run, per: int = 1,
             note: str = "") -> dict:
  """Interleaved step times of two compiled variants (seconds / `per`)."""
  l0 = load()
  t = interleave(before.timed_step, after.timed_step)
  if per != 1:
    for k in ("before", "after"):
      t[k] /= per
      t[k + "_times"] = [x / per for x in t[k + "_times"]]
      t[k + "_min_max"] = [x / per for x in t[k + "_min_max"]]
  out = {"change": change, "metric": metric, "before_variant": before.name,
         "after_variant": after.name, **t, "clear": _clear(t), "load_1min": [l0, load()],
         "note": note}
  print(f"  {change}: {metric} {t['before'] * 1e3:.1f} -> {t['after'] * 1e3:.1f} ms, ratio "
        f"{t['ratio']:.2f}, per-round {t['ratio_per_round_median']:.2f} "
        f"[{t['ratio_per_round_min']:.2f}, {t['ratio_per_round_max']:.2f}], {t['rounds']} rounds",
        flush=True)
  return out


def once_row(change: str, metric: str, before: Run | float, after: Run | float, key: str = "",
             note: str = "", b_name: str = "", a_name: str = "") -> dict:
  """A figure measured once per variant (bytes, compile seconds)."""
  b = before.record[key] if key else before
  a = after.record[key] if key else after
  return {"change": change, "metric": metric,
          "before_variant": before.name if key else b_name,
          "after_variant": after.name if key else a_name,
          "before": b, "after": a, "ratio": b / a if a else None, "note": note}


def prefetch_burst(run: Run, size: int, steps: int, host_s: float, block_each: bool) -> float:
  """Seconds per step of a loop fed by an input pipeline that spends `host_s` per batch on the host
  (sleep: an I/O-bound reader, plus building the numpy batch) and then transfers it. block_each:
  the loop reads every step's loss (as a loop that logs every step), so the next dispatch waits."""
  def source():
    for i in range(steps + 1):
      time.sleep(host_s)
      yield {k: v + (i % 2) if k == "image" else v for k, v in run.host_batch.items()}

  with prefetch_to_device(source(), size, run.put) as batches:
    metrics = run.step(next(batches))  # warm-up, and the prefetcher fills
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for batch in batches:
      metrics = run.step(batch)
      if block_each:
        float(metrics["loss"])
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps


def main():
  global ROUNDS
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=8, help="images per step (R=1)")
  p.add_argument("--target_len", type=int, default=32, help="T, decoder tokens per prompt")
  p.add_argument("--rounds_min", type=int, default=5, help="interleaved rounds, at least")
  p.add_argument("--rounds_max", type=int, default=9, help="... at most (if not settled)")
  p.add_argument("--remat_batch", type=int, default=32, help="images per step for c (remat)")
  p.add_argument("--prefetch_steps", type=int, default=4, help="timed steps per prefetch burst")
  p.add_argument("--prefetch_rounds", type=int, default=5, help="rounds per prefetch loop kind")
  p.add_argument("--xla_opt", action="store_true",
                 help="XLA's full CPU backend optimisation (default: off, compiles ~2x faster)")
  p.add_argument("--out", default="")
  args = p.parse_args()
  ROUNDS = (args.rounds_min, args.rounds_max)
  if not args.xla_opt:
    COMPILER_OPTIONS.update(xla_backend_optimization_level=0,
                            xla_llvm_disable_expensive_passes=True)
  bsz = args.batch
  t_start, load_start = time.perf_counter(), os.getloadavg()
  print(f"{jax.devices()[0]} ({hardware.cpu_name()}, {os.cpu_count()} cores, load "
        f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}); batch {bsz}, T "
        f"{args.target_len}, {ROUNDS[0]}-{ROUNDS[1]} interleaved rounds, XLA backend optimisation "
        f"{'on' if args.xla_opt else 'off'}", flush=True)
  cfg = lambda: base_config(bsz, args.target_len)
  rows = []

  print("a. attention", flush=True)
  base = Run("attention_impl=xla (base)", cfg(), bsz)
  c = cfg(); c.model.attention_impl = "dot_product"
  dot = Run("attention_impl=dot_product", c, bsz)
  rows.append(time_row("a attention xla -> dot_product", "step s", base, dot))
  rows.append(once_row("a attention xla -> dot_product", "temp bytes", base, dot, "temp_bytes"))
  del dot  # frees its state and executable before the next compile

  print("b. bf16 compute", flush=True)
  c = cfg(); c.model.dtype = "bfloat16"
  bf16 = Run("dtype=bfloat16", c, bsz)
  rows.append(time_row("b dtype float32 -> bfloat16", "step s", base, bf16))
  rows.append(once_row("b dtype float32 -> bfloat16", "temp bytes", base, bf16, "temp_bytes"))
  del bf16

  # At the base batch the toy's activations are a few MiB beside ~60 MiB of gradient and optimizer
  # buffers, so remat is measured where activations dominate: --remat_batch images at T 64.
  rb = args.remat_batch
  print(f"c. remat (batch {rb}, T 64)", flush=True)
  remat_base = Run(f"remat off, batch {rb}", base_config(rb, 64), rb)
  for policy in ("nothing_saveable", "dots_saveable"):
    c = base_config(rb, 64)
    for tower in ("sam", "eva02", "t5"):
      c.model[tower].remat = True
      c.model[tower].remat_policy = policy
    r = Run(f"remat {policy}, batch {rb}", c, rb)
    rows.append(once_row(f"c remat off -> {policy}", "temp bytes", remat_base, r, "temp_bytes"))
    rows.append(time_row(f"c remat off -> {policy}", "step s", remat_base, r))
    del r
  del remat_base

  print("d. scan over layers (T5 8+8 layers)", flush=True)
  deep = {}
  for scan in (False, True):
    c = cfg()
    c.model.t5.num_layers = c.model.t5.num_decoder_layers = 8
    for tower in ("sam", "eva02", "t5"):
      c.model[tower].scan_layers = scan
    deep[scan] = Run(f"t5 8+8, scan_layers={scan}", c, bsz)
  for metric, key in (("trace+lower s", "trace_lower_s"), ("compile s", "compile_s")):
    rows.append(once_row("d scan_layers off -> on", metric, deep[False], deep[True], key))
  rows.append(time_row("d scan_layers off -> on", "step s", deep[False], deep[True]))
  rows.append(once_row("d scan_layers off -> on", "temp bytes", deep[False], deep[True],
                       "temp_bytes"))
  del deep

  print("e. donated state", flush=True)
  nodonate = Run("no donation", cfg(), bsz, donate=False)
  rows.append(time_row("e donate state", "step s", nodonate, base))
  for k in ("temp", "argument", "output", "alias"):
    rows.append(once_row("e donate state", f"{k} bytes", nodonate, base, f"{k}_bytes",
                         note="alias = outputs written into the donated inputs" if k == "alias"
                         else ""))
  fresh = lambda r: (r.mem["argument"] + r.mem["output"] - r.mem["alias"] + r.mem["temp"])
  rows.append(once_row("e donate state", "arg+out-alias+temp bytes", fresh(nodonate), fresh(base),
                       note="peak-ish device bytes of one step", b_name=nodonate.name,
                       a_name=base.name))
  del nodonate

  print("f. frozen towers", flush=True)
  c = cfg(); c.frozen_params = common.FROZEN_SAM_AND_T5
  frozen = Run("frozen SAM + T5 (LoRA trains)", c, bsz)
  rows.append(time_row("f all trainable -> frozen SAM+T5", "step s", base, frozen))
  rows.append(once_row("f all trainable -> frozen SAM+T5", "temp bytes", base, frozen,
                       "temp_bytes"))
  rows.append(once_row("f all trainable -> frozen SAM+T5", "argument bytes", base, frozen,
                       "argument_bytes", note="state: no Adam moments for frozen params"))
  del frozen

  # The base is already bsz images x 1 prompt (toy's num_prompts is 1), so it is g's "before".
  print("g. prompt axis", flush=True)
  r, imgs = 4, max(bsz // 4, 1)
  assert base.config.input.num_prompts == 1 and imgs * r == bsz, "g reuses the base as before"
  c = cfg(); c.input.num_prompts = r
  batched = Run(f"{imgs} images x {r} prompts", c, imgs)
  rows.append(time_row("g R prompts as images -> per image", "step s per prompt", base, batched,
                       per=bsz, note=f"{bsz} images x 1 prompt (the base) vs {imgs} x {r}; "
                       f"{bsz} prompts per step both ways"))
  del batched

  print("h. prefetch", flush=True)
  host_s = rows[0]["before"]  # the base's median step (item a)
  for block_each in (False, True):
    loop = "reads every loss" if block_each else "async dispatch"
    burst = lambda s, b=block_each: prefetch_burst(base, s, args.prefetch_steps, host_s, b)
    l0 = load()
    t = interleave(lambda: burst(0), lambda: burst(2), (args.prefetch_rounds,) * 2)
    rows.append({"change": "h prefetch size 0 -> 2", "metric": f"s per step, loop {loop}",
                 "before_variant": "size 0", "after_variant": "size 2", **t, "clear": _clear(t),
                 "load_1min": [l0, load()],
                 "note": f"input spends {host_s * 1e3:.0f} ms (the base step) per batch on the "
                         f"host; bursts of {args.prefetch_steps} steps"})
    print(f"  {loop}: {t['before'] * 1e3:.0f} -> {t['after'] * 1e3:.0f} ms per step, ratio "
          f"{t['ratio']:.2f}, per-round {t['ratio_per_round_median']:.2f} "
          f"[{t['ratio_per_round_min']:.2f}, {t['ratio_per_round_max']:.2f}]", flush=True)

  print("\n| change | metric | before | after | ratio of medians | per-round ratio: median "
        "[min, max] | rounds | clear | note |")
  print("|---|---|---|---|---|---|---|---|---|")
  for x in rows:
    if "bytes" in x["metric"]:
      fmt = lambda v: f"{v / 2**20:.1f} MiB"
    elif x["metric"].startswith(("s per", "step")):
      fmt = lambda v: f"{v * 1e3:.1f} ms"
    else:
      fmt = lambda v: f"{v:.1f} s"
    ratio = f"{x['ratio']:.2f}x" if x["ratio"] is not None else "n/a"
    if "rounds" in x:
      per = (f"{x['ratio_per_round_median']:.2f}x [{x['ratio_per_round_min']:.2f}, "
             f"{x['ratio_per_round_max']:.2f}]")
      rounds, clear = str(x["rounds"]), "yes" if x["clear"] else "no"
    else:
      per, rounds, clear = "(once)", "", ""
    print(f"| {x['change']} | {x['metric']} | {fmt(x['before'])} | {fmt(x['after'])} | {ratio} "
          f"| {per} | {rounds} | {clear} | {x['note']} |")
  total_s, load_end = time.perf_counter() - t_start, os.getloadavg()
  la = lambda l: " ".join(f"{x:.2f}" for x in l)
  print(f"\ntotal {total_s:.0f} s; load average (1, 5, 15 min) at start {la(load_start)}, at end "
        f"{la(load_end)}", flush=True)
  result = {"command": " ".join(["JAX_PLATFORMS=" + os.environ.get("JAX_PLATFORMS", ""), "python"]
                                + sys.argv),
            "rows": rows, "variants": VARIANTS,
            "hardware": {"cpu": hardware.cpu_name(), "cores": os.cpu_count(),
                         "device": str(jax.devices()[0].device_kind),
                         "platform": jax.default_backend()},
            "versions": {"python": platform.python_version(), "jax": jax.__version__,
                         "flax": flax.__version__, "optax": optax.__version__,
                         "numpy": np.__version__},
            "settings": vars(args), "compiler_options": COMPILER_OPTIONS,
            "load_average_at_start": list(load_start), "load_average_at_end": list(load_end),
            "total_seconds": total_s}
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
