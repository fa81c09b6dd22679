r"""Caption + trace decoding speed of the whole network: image in, N words with a location each out.

  python benchmarks/caption_decode.py --config=configs/ln.py --batch=1,64 --new_tokens=128 \
      --dtype=bfloat16 --out=/tmp/caption_decode.json                 # a GPU: Flan-T5-XL
  python benchmarks/caption_decode.py --config=configs/ln.py:toy --batch=1,4 --new_tokens=32 \
      --dtype=float32                                                  # CPU-sized

What `PixelLLMModel.predict_batch` runs (pixel_llm.decode.generate, greedy on the KV cache): the
image towers once per image, the prompt feature extractor and T5 encoder once per prompt, then
--new_tokens decoder steps, each also running the location head (the trace). EOS is forbidden
until --new_tokens (min_decode_len), so every row decodes all of them. Random weights cast to
--dtype (speed does not depend on their values), random images. Per batch size B it reports the
end-to-end seconds (median of --repeats after a warm-up), the encoding part alone (towers + T5
encoder), and tokens/s = B * new_tokens / end-to-end seconds. benchmarks/decode.py compares the
T5 decoder alone with Hugging Face's. Writes JSON with --out. Shape letters: B batch.
"""
import argparse
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import hardware  # benchmarks/hardware.py (this script's folder is on sys.path)
import train_step  # benchmarks/train_step.py (this script's folder is on sys.path)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pixel_llm import decode  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixel_llm.models import build  # pylint: disable=g-import-not-at-top,wrong-import-position


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
  """(first call seconds, median seconds of `repeats` more) of fn(), each waited for."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/ln.py")
  p.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--attention", default="xla", help="layers.ATTENTION_IMPLS")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--scan", action="store_true", help="scan over layers (much faster compiles)")
  p.add_argument("--out", default="")
  args = p.parse_args()

  config = train_step.load_config(args.config)
  with config.unlocked():
    config.model.dtype = args.dtype
    config.model.attention_impl = args.attention
    for tower in train_step.TOWERS:
      if config.model.get(tower) is not None:
        config.model[tower].scan_layers = bool(args.scan)
  model = build.build_model(config)
  network, new = model.network, args.new_tokens
  dtype = jnp.dtype(args.dtype)
  example = build.example_batch(config, 1, abstract=False)
  t0 = time.perf_counter()
  params = jax.jit(lambda k: jax.tree.map(lambda x: x.astype(dtype), nn.meta.unbox(
      model.init_variables(k, example)["params"])))(jax.random.key(0))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  device = jax.devices()[0]
  print(f"{args.config}: {n_params / 1e9:.2f} B parameters in {args.dtype}, {new} new tokens, "
        f"on {device.device_kind} (init {time.perf_counter() - t0:.1f} s)", flush=True)

  @jax.jit
  def generate(params, batch):
    return decode.generate(network, params, batch, max_decode_len=new, min_decode_len=new)

  @jax.jit
  def encode(params, batch):
    return decode.encode(network, params, batch, decode.num_prompts(batch))

  results = []
  for size in [int(b) for b in args.batch.split(",")]:
    batch = {k: jnp.asarray(v) for k, v in train_step.random_batch(config, size).items()
             if k in ("image", "prompt_boxes", "prompt_text")}
    print(f"batch {size}: compiling and timing", flush=True)
    first, seconds = _median_seconds(lambda: generate(params, batch), args.repeats)
    _, encode_s = _median_seconds(lambda: encode(params, batch), args.repeats)
    out = generate(params, batch)
    emitted = int((out["tokens"] != 0).sum())
    rows = size * decode.num_prompts(batch)
    r = {"batch": size, "seconds": seconds, "first_call_seconds": first,
         "encode_seconds": encode_s, "decode_seconds": seconds - encode_s,
         "tokens_per_second": rows * new / seconds, "tokens_emitted": emitted,
         "tokens_expected": rows * new}
    results.append(r)
    print(f"batch {size}: {seconds:.3f} s end to end ({encode_s * 1e3:.1f} ms encoding), "
          f"{r['tokens_per_second']:.0f} tokens/s, {emitted}/{rows * new} tokens emitted "
          f"(first call {first:.1f} s incl. compile)", flush=True)
  hardware.write_json(args.out, {
      **hardware.environment(), "config": args.config, "dtype": args.dtype,
      "attention": args.attention, "scan": args.scan, "new_tokens": new, "parameters": n_params,
      "results": results, "command": " ".join(sys.argv)})


if __name__ == "__main__":
  main()
