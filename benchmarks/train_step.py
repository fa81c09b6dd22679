r"""Times one PixelLLM training step (forward + backward of the trainable parameters + AdamW).

  python benchmarks/train_step.py --config=configs/ln.py --batch=16 --dtype=bfloat16 --out=/tmp/ts.json
  python benchmarks/train_step.py --config=configs/ln.py:toy --batch=16   # CPU-sized

Prints the step time, examples/s, FLOPs per example from XLA's cost analysis of the compiled step,
and MFU against --peak_tflops (default: 989, the H100/H200 dense bf16 datasheet figure). Frozen
parameters (config.frozen_params) are inputs of the step but get no gradient and no optimizer state.
Writes the figures, hardware and versions as JSON when --out is given.
"""
import argparse
import importlib.util
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pixel_llm import optim  # pylint: disable=g-import-not-at-top
from pixel_llm.models import build  # pylint: disable=g-import-not-at-top


def _load_config(spec: str):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="configs/ln.py")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--peak_tflops", type=float, default=989.0)
  p.add_argument("--out", default="")
  args = p.parse_args()

  config = _load_config(args.config)
  config.model.dtype = args.dtype
  model = build.build_model(config)
  batch = build.example_batch(config, args.batch, abstract=False)
  batch["decoder_target_tokens"] = jnp.ones_like(batch["decoder_target_tokens"])
  batch["point_weights"] = jnp.ones_like(batch["point_weights"])

  print(f"building {args.config} batch {args.batch} {args.dtype} on {jax.devices()[0]}", flush=True)
  t0 = time.time()
  import flax.linen as nn
  params = jax.jit(lambda r: nn.meta.unbox(model.init_variables(r, batch)["params"]))(
      jax.random.key(0))
  jax.block_until_ready(params)
  init_s = time.time() - t0
  print(f"init {init_s:.1f} s", flush=True)
  labels = optim.frozen_labels(params, config.frozen_params)
  trainable = jax.tree.map(lambda x, l: x if l == "train" else None, params, labels)
  frozen = jax.tree.map(lambda x, l: x if l == "frozen" else None, params, labels)
  tx = optax.adamw(1e-5)
  opt_state = tx.init(trainable)

  def merge(t, f):
    return jax.tree.map(lambda a, b: a if a is not None else b, t, f,
                        is_leaf=lambda x: x is None)

  def step(trainable, frozen, opt_state, batch):
    loss, grads = jax.value_and_grad(
        lambda t: model.loss_fn(merge(t, frozen), batch, jax.random.key(1), train=True)[0])(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  t0 = time.time()
  compiled = jax.jit(step, donate_argnums=(0, 2)).lower(trainable, frozen, opt_state, batch).compile()
  compile_s = time.time() - t0
  print(f"compile {compile_s:.1f} s", flush=True)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  mem = compiled.memory_analysis()

  trainable, opt_state, loss = compiled(trainable, frozen, opt_state, batch)  # warm-up
  jax.block_until_ready(loss)
  times = []
  for _ in range(args.steps):
    t0 = time.time()
    trainable, opt_state, loss = compiled(trainable, frozen, opt_state, batch)
    jax.block_until_ready(loss)
    times.append(time.time() - t0)
  step_s = float(np.median(times))
  result = {
      "config": args.config, "batch": args.batch, "dtype": args.dtype,
      "device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
      "jax": jax.__version__, "python": platform.python_version(),
      "init_seconds": init_s, "compile_seconds": compile_s, "step_seconds_median": step_s,
      "step_seconds_all": times, "examples_per_second": args.batch / step_s,
      "xla_flops_per_step": flops, "xla_flops_per_example": flops / args.batch,
      "achieved_tflops": flops / step_s / 1e12,
      "mfu_vs_peak": flops / step_s / (args.peak_tflops * 1e12), "peak_tflops": args.peak_tflops,
      "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
      "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
      "loss": float(loss),
      "command": " ".join(sys.argv),
  }
  print(json.dumps(result, indent=2))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
