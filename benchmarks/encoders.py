r"""Image-tower throughput (images/s, inference): SAM ViT-B/L/H image encoders and EVA02.

  python benchmarks/encoders.py --towers=sam_vit_h@1024,sam_vit_h@384,eva02_L@384 \
      --attention=xla,cudnn --dtype=bfloat16 --batch=16 --out=/tmp/encoders.json   # a GPU
  python benchmarks/encoders.py --towers=sam_tiny@256,eva02_tiny@224 --attention=xla,dot_product \
      --dtype=float32 --batch=4 --iters=3                                          # CPU-sized

Each tower is built at its published size (configs/common.py SAM / EVA02 tables) with random
weights cast to --dtype (as the trainer keeps frozen towers), and its forward pass jitted on a
[B, S, S, 3] batch (S = the size after '@'). After a warm-up, --iters batches are timed
(alternating two random input sets, each waited for); images/s = B / median seconds. "XLA
TFLOP/s" uses XLA's cost analysis of the compiled forward, which counts a scanned stack once: with
--scan it is far too low (RESULTS.md uses the analytic count of pixel_llm/tools/flops.py instead). A variant that fails (e.g. cuDNN refusing a shape,
out of memory) is reported with its error and the rest go on. Writes JSON with --out.
Shape letters: B batch, S image side.
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import hardware  # benchmarks/hardware.py (this script's folder is on sys.path)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixel_llm.models import eva02 as eva02_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixel_llm.models import layers  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixel_llm.models import sam_image_encoder as sam_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def build_tower(name: str, dtype, scan: bool):
  """'sam_vit_h' / 'sam_tiny' / 'eva02_L' / 'eva02_tiny' -> the Flax module."""
  if name.startswith("sam_"):
    size = name[len("sam_"):]
    fields = dict(common.SAM[size], window_size=common.SAM[size].get("window_size", 14))
    return sam_lib.SamImageEncoder(**fields, scan_layers=scan, dtype=dtype)
  if name.startswith("eva02_"):
    return eva02_lib.Eva02(**common.EVA02[name[len("eva02_"):]], scan_layers=scan, dtype=dtype)
  raise ValueError(f"unknown tower {name!r}: sam_<vit_b|vit_l|vit_h|tiny> or eva02_<B|L|tiny>")


def time_tower(name: str, size: int, attention: str, args) -> dict:
  dtype = jnp.dtype(args.dtype)
  module = build_tower(name, dtype, args.scan)
  rng = np.random.default_rng(0)
  images = [jnp.asarray(rng.normal(size=(args.batch, size, size, 3)), jnp.float32)
            for _ in range(2)]
  with layers.attention_implementation(attention):
    params = jax.jit(lambda k: jax.tree.map(
        lambda p: p.astype(dtype), module.init(k, images[0][:1])["params"]))(jax.random.key(0))
    forward = jax.jit(lambda p, x: module.apply({"params": p}, x)[0])
    t0 = time.time()
    compiled = forward.lower(params, images[0]).compile()
  compile_s = time.time() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", 0.0))
  jax.block_until_ready(compiled(params, images[1]))
  times = []
  for i in range(args.iters):
    t0 = time.time()
    jax.block_until_ready(compiled(params, images[i % 2]))
    times.append(time.time() - t0)
  seconds = float(np.median(times))
  return {"tower": name, "image_size": size, "attention": attention, "batch": args.batch,
          "compile_seconds": compile_s, "seconds_per_batch": seconds,
          "images_per_second": args.batch / seconds, "xla_flops_per_image": flops / args.batch,
          "achieved_tflops": flops / seconds / 1e12, "times": times}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--towers", default="sam_vit_h@1024,sam_vit_h@384,eva02_L@384")
  p.add_argument("--attention", default="xla", help="comma-separated layers.ATTENTION_IMPLS")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--scan", action="store_true", help="scan over layers (faster compile)")
  p.add_argument("--out", default="")
  args = p.parse_args()

  results = []
  print(f"{'tower':<14}{'px':>6}{'attention':>13}{'img/s':>10}{'XLA TF/s':>10}{'compile s':>11}",
        flush=True)
  for spec in args.towers.split(","):
    name, _, size = spec.partition("@")
    for attention in args.attention.split(","):
      try:
        r = time_tower(name, int(size or 1024), attention, args)
      except Exception as e:  # pylint: disable=broad-except
        r = {"tower": name, "image_size": int(size or 1024), "attention": attention,
             "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        print(f"{name:<14}{size:>6}{attention:>13}  failed: {r['error'][:120]}", flush=True)
      else:
        print(f"{name:<14}{size:>6}{attention:>13}{r['images_per_second']:>10.1f}"
              f"{r['achieved_tflops']:>10.1f}{r['compile_seconds']:>11.1f}", flush=True)
      results.append(r)
      hardware.write_json(args.out, {  # after each variant: a stopped run keeps what it measured
          **hardware.environment(), "dtype": args.dtype, "scan": args.scan, "results": results,
          "command": " ".join(sys.argv)})


if __name__ == "__main__":
  main()
