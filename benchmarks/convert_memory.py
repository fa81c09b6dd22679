r"""Peak host memory of `pixel_llm.tools.convert` relative to the checkpoints it reads.

  python benchmarks/convert_memory.py --t5=base --sam=vit_b --eva02=B --out=/tmp/convert_mem.json

Writes checkpoints with the published key names and shapes (from `pixel_llm/models/manifests/`,
values random) in their public formats (SAM `.pth`, EVA02 and Flan-T5 safetensors) into --tmp, runs
the converter in a child process for `configs/ln.py` at those sizes, and reports the child's peak
resident memory (ru_maxrss) beside the bytes of the checkpoints and of the converted parameters.
The issue's bound: about twice the checkpoint. Full-size (t5=xl, sam=vit_h, eva02=L) needs ~15 GB of
disk in --tmp and ~35 GB of host memory.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFESTS = os.path.join(ROOT, "pixel_llm", "models", "manifests")
EVA02_NAMES = {"B": "eva02_base_patch14_224", "L": "eva02_large_patch14_224"}


def _manifest(name):
  with open(os.path.join(MANIFESTS, f"{name}.json")) as f:
    return json.load(f)["tensors"]


def _random(shape, rng):
  return rng.standard_normal(size=shape, dtype=np.float32) * 0.02


def write_checkpoints(tmp: str, t5: str, sam: str, eva02: str) -> dict[str, str]:
  """Checkpoints of the published layouts; returns {source: path}."""
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  os.makedirs(tmp, exist_ok=True)
  paths = {"sam": os.path.join(tmp, f"sam_{sam}.pth"),
           "eva02": os.path.join(tmp, f"{EVA02_NAMES[eva02]}.safetensors"),
           "t5": os.path.join(tmp, f"flan_t5_{t5}.safetensors")}
  if not os.path.exists(paths["sam"]):
    torch.save({k: torch.from_numpy(_random(s, rng)) for k, s in _manifest(f"sam_{sam}").items()},
               paths["sam"])
  if not os.path.exists(paths["eva02"]):
    save_file({k: _random(s, rng) for k, s in _manifest(EVA02_NAMES[eva02]).items()},
              paths["eva02"])
  if not os.path.exists(paths["t5"]):
    tensors = {k: _random(s, rng) for k, s in _manifest(f"flan_t5_{t5}").items()}
    for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):  # tied, as in T5 v1.1
      if k in tensors:
        tensors[k] = tensors["shared.weight"]
    save_file(tensors, paths["t5"])
  return paths


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--t5", default="base")
  p.add_argument("--sam", default="vit_b")
  p.add_argument("--eva02", default="B")
  p.add_argument("--tmp", default="/tmp/pixel_llm_convert_bench")
  p.add_argument("--out", default="")
  args = p.parse_args()

  paths = write_checkpoints(args.tmp, args.t5, args.sam, args.eva02)
  checkpoint_bytes = sum(os.path.getsize(v) for v in paths.values())
  out_dir = os.path.join(args.tmp, f"converted_{time.time_ns()}")
  config = f"configs/ln.py:t5={args.t5},sam={args.sam},eva02={args.eva02}"
  cmd = [sys.executable, "-m", "pixel_llm.tools.convert", f"--config={config}",
         f"--out={out_dir}"] + [f"--{k}={v}" for k, v in paths.items()]
  # The EVA02 manifests are the 224-px MIM checkpoints, which is what configs/ln.py stores.
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  wall = time.time() - t0
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
  if proc.returncode:
    print(proc.stdout, proc.stderr, sep="\n")
    raise SystemExit(f"convert failed with exit {proc.returncode}")
  params_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                     os.walk(os.path.join(out_dir, "params")) for f in fs)
  result = {
      "command": " ".join(cmd), "config": config,
      "checkpoint_bytes": checkpoint_bytes, "converted_bytes_on_disk": params_bytes,
      "peak_rss_bytes": peak, "peak_over_checkpoint": peak / checkpoint_bytes,
      "wall_seconds": wall, "host": platform.node(), "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
  }
  print(f"checkpoints {checkpoint_bytes / 2**30:.2f} GiB, converted {params_bytes / 2**30:.2f} GiB "
        f"on disk, peak RSS {peak / 2**30:.2f} GiB = {result['peak_over_checkpoint']:.2f}x the "
        f"checkpoints, {wall:.0f} s")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
