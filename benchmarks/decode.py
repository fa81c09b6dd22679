r"""Decoding throughput: KV-cached vs uncached greedy, and ours vs Hugging Face `generate`.

  python benchmarks/decode.py --preset=small --batch=4 --new_tokens=128 --out=/tmp/decode.json

One run, one machine, one set of weights: a random T5 v1.1 (untied head) of --preset size is built
in transformers, saved with `save_pretrained`, and read back by `pixel_llm.models.t5.load`. Then
greedy decoding of --new_tokens tokens (EOS forbidden until then, so every row decodes all of
them) from --input_len random encoder tokens is timed three ways:

  cached    pixel_llm.decode.sample (temperature 0) over T5.init_cache / T5.decode_step
  uncached  pixel_llm.decode.greedy_uncached: the whole decoder over the buffer at every step
  hf        T5ForConditionalGeneration.generate(do_sample=False, num_beams=1, max_new_tokens=N,
            min_new_tokens=N) with transformers' own KV cache, under torch.no_grad

Each is timed after a warm-up (compilation) call; the median of --repeats runs is reported
(uncached: --uncached_repeats). Times include the one encoder pass. tokens/s = batch * new tokens
/ seconds. Also reports how many generated tokens agree (cached vs uncached, ours vs HF) and the
largest first-step logit difference to HF, as evidence that the weights are the same. Writes
the figures, hardware, versions and command as JSON with --out. `--threads=1` pins torch and
XLA to one thread each (the fair setting on a machine other jobs share).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types

import hardware  # benchmarks/hardware.py (this script's folder is on sys.path)

def _threads_flag() -> int:
  """--threads must act before jax and torch start their thread pools."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--threads", type=int, default=0)
  return pre.parse_known_args()[0].threads


THREADS = _threads_flag()
if THREADS == 1:  # XLA:CPU's only thread knob: run each op on the calling thread
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# transformers imports torchvision, whose CUDA-built ops cannot load beside the CPU torch; empty
# registration modules let its pure-Python parts import (as tests/conftest.py does).
for _name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
  sys.modules.setdefault(_name, types.ModuleType(_name))
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
import transformers  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixel_llm import decode  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixel_llm.models import t5  # pylint: disable=g-import-not-at-top,wrong-import-position

if THREADS > 0:
  torch.set_num_threads(THREADS)


def hf_t5_v11(c: t5.T5Config, seed: int = 0):
  """A random HF T5 v1.1 for `c`: untied lm_head, one input embedding shared by both stacks."""
  torch.manual_seed(seed)
  hf_cfg = transformers.T5Config(
      vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, num_heads=c.num_heads, d_ff=c.d_ff,
      num_layers=c.num_layers, num_decoder_layers=c.num_decoder_layers,
      relative_attention_num_buckets=c.relative_attention_num_buckets,
      relative_attention_max_distance=c.relative_attention_max_distance,
      feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False,
      pad_token_id=decode.BOS_ID, decoder_start_token_id=decode.BOS_ID, eos_token_id=decode.EOS_ID)
  hf_cfg.tie_word_embeddings = False  # transformers 5.x forces it True in __init__.
  model = transformers.T5ForConditionalGeneration(hf_cfg).eval()
  if model.lm_head.weight is model.shared.weight:
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
  model.set_input_embeddings(model.shared)  # untying also split encoder/decoder embed_tokens
  with torch.no_grad():  # a distinct head, so a tied/rescaled head would show in the logits
    model.lm_head.weight.normal_(0.0, 0.05)
  return model


def _timed(fn, repeats: int) -> tuple[float, float, object]:
  """(warm-up seconds, median seconds, last result) of fn()."""
  t0 = time.perf_counter()
  out = fn()
  warm = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return warm, statistics.median(times), out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="small", choices=sorted(t5.PRESETS))
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--input_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--uncached_repeats", type=int, default=1)
  p.add_argument("--skip_uncached", action="store_true")
  p.add_argument("--skip_hf", action="store_true")
  p.add_argument("--threads", type=int, default=0,
                 help="CPU threads for torch, and for XLA when 1 (0: library defaults). On a "
                 "shared machine use 1: torch's spinning OpenMP threads collapse when "
                 "oversubscribed.")
  p.add_argument("--out", default="")
  args = p.parse_args()
  n, new = args.batch, args.new_tokens

  cfg = t5.T5Config.preset(args.preset, dropout_rate=0.0)
  model = t5.T5(cfg)
  hf = hf_t5_v11(cfg)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    tok = jnp.ones((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tok, tok))["params"]
    params = jax.tree.map(jnp.asarray, t5.load(shapes, tmp))
  inputs = np.random.RandomState(0).randint(2, cfg.vocab_size, (n, args.input_len)).astype(np.int32)
  device = jax.devices()[0]
  print(f"T5 {args.preset} ({sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f} M params), "
        f"batch {n}, {args.input_len} input tokens, {new} new tokens, jax on {device}, torch "
        f"{torch.get_num_threads()} threads", flush=True)

  def encode(params, inputs):
    mask = inputs != 0
    return model.apply({"params": params}, method=lambda m: m.encode(m.embed(inputs), mask)), mask

  @jax.jit
  def cached(params, inputs):
    encoded, mask = encode(params, inputs)
    cache = decode.init_cache(model, params, encoded, mask, new + 1)
    return decode.sample(decode.step_fn(model, params), cache, n, new, min_len=new)[0]

  @jax.jit
  def uncached(params, inputs):
    encoded, mask = encode(params, inputs)

    def logits_fn(buf):
      logits, _ = model.apply({"params": params}, encoded, mask, buf, method=model.decode)
      return logits, jnp.zeros(buf.shape + (0, 2), jnp.float32)
    return decode.greedy_uncached(logits_fn, n, new, min_len=new)[0]

  results = {}

  def report(name, warm, secs, tokens):
    results[name] = {"seconds": secs, "warmup_seconds": warm, "tokens_per_s": n * new / secs}
    print(f"  {name:9s} {secs:8.3f} s  {n * new / secs:9.1f} tokens/s  (warm-up {warm:.1f} s)",
          flush=True)
    return np.asarray(tokens)

  warm, secs, ours = _timed(lambda: jax.block_until_ready(cached(params, inputs)), args.repeats)
  ours = report("cached", warm, secs, ours)
  if not args.skip_uncached:
    warm, secs, ref = _timed(lambda: jax.block_until_ready(uncached(params, inputs)),
                             args.uncached_repeats)
    ref = report("uncached", warm, secs, ref)
    results["cached_vs_uncached_token_agreement"] = float((ours == ref).mean())
  if not args.skip_hf:
    ids = torch.from_numpy(inputs.astype(np.int64))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
              max_new_tokens=new, min_new_tokens=new, decoder_start_token_id=decode.BOS_ID,
              eos_token_id=decode.EOS_ID, pad_token_id=decode.BOS_ID)
    with torch.no_grad():
      warm, secs, theirs = _timed(lambda: hf.generate(**kw), args.repeats)
      start = torch.zeros((n, 1), dtype=torch.long)
      hf_logits = hf(input_ids=ids, attention_mask=kw["attention_mask"],
                     decoder_input_ids=start).logits.numpy()[:, 0]
    theirs = report("hf", warm, secs, theirs.numpy()[:, 1:])  # drop the decoder start token
    encoded, mask = encode(params, inputs)
    our_logits = model.apply({"params": params}, encoded, mask, jnp.zeros((n, 1), jnp.int32),
                             method=model.decode)[0][:, 0]
    results["hf_first_step_max_abs_logit_diff"] = float(np.abs(our_logits - hf_logits).max())
    same = ours == theirs[:, :new]
    results["hf_token_agreement"] = float(same.mean())
    results["hf_identical_rows"] = int(same.all(1).sum())

  ratios = {}
  if "uncached" in results:
    ratios["cached_over_uncached"] = results["cached"]["tokens_per_s"] / results["uncached"][
        "tokens_per_s"]
  if "hf" in results:
    ratios["ours_over_hf"] = results["cached"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
  print("\n| decoder | seconds | tokens/s |\n|---|---:|---:|")
  for name in ("cached", "uncached", "hf"):
    if name in results:
      print(f"| {name} | {results[name]['seconds']:.3f} | {results[name]['tokens_per_s']:.1f} |")
  for k, v in ratios.items():
    print(f"{k}: {v:.2f}x")
  for k in ("cached_vs_uncached_token_agreement", "hf_token_agreement", "hf_identical_rows",
            "hf_first_step_max_abs_logit_diff"):
    if k in results:
      print(f"{k}: {results[k]:.3g}")

  if args.out:
    record = {
        "command": " ".join([sys.executable] + sys.argv),
        "settings": vars(args),
        "results": results,
        "ratios": ratios,
        "hardware": {"jax_device": str(device), "platform": device.platform,
                     "cpu": hardware.cpu_name(), "cpu_count": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(),
                     "xla_flags": os.environ.get("XLA_FLAGS", ""),
                     "load_average": os.getloadavg()},
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": __import__("jaxlib").__version__,
                     "flax": __import__("flax").__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
    }
    with open(args.out, "w") as f:
      json.dump(record, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
