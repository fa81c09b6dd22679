r"""Compiles the real train step for a TPU pod topology on a CPU-only machine (ahead of time).

  python -m pixel_llm.tools.aot --config=configs/ln.py --topology=v5e:16x16 \
      --mesh=data=16,fsdp=16,tensor=1 --config.model.dtype=bfloat16 --out=aot_v5e_256.json

`trainer.build_training` runs on the topology's abstract devices (libtpu describes them; no TPU is
needed) and its step is lowered and compiled with the abstract state and a global batch of
`build.example_batch` shapes. Prints, and with --out writes as JSON: XLA's per-device memory
(arguments, outputs, temporaries, donated aliases, peak) against the chip's HBM, or the TPU
compiler's refusal when it does not fit; XLA's cost-model flops per step and per device; a step
time (XLA's optimal_seconds when it gives one, else the roofline of flops and HBM bytes per device,
communication not counted); the implied examples/s and MFU (estimates against the chip's bf16 peak,
counting XLA's flops including rematerialisation), and compile time. This is
how MaxText's train-compile test checks pod-scale sharding and memory.

Needs libtpu: `pip install libtpu==<the version jax pins>` (jax 0.10.2: libtpu==0.0.42.1), which
is what `pip install "jax[tpu]==<jax version>"` brings. JAX_PLATFORMS defaults to cpu here: the
computation is only compiled.
"""
import os

# Compile only: keep jax on the CPU backend, and let libtpu load beside another process holding
# its lockfile (a test run, a second compile); neither touches a real TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import importlib.metadata
import json
import resource
import shlex
import sys
import time
from typing import Any, Mapping

from absl import app
from absl import flags
from ml_collections import config_flags

from pixel_llm import chips
from pixel_llm.chips import GIB

# Chips whose pods run one device per chip (both TensorCores) by default.
MEGACORE = ("v4", "v5p")


def _define_flags():
  """Flags are defined only when run as a binary, so the functions below import cleanly."""
  global _CONFIG, _TOPOLOGY, _MESH, _BATCH, _CHIP_CONFIG, _OUT
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/ln.py.",
                                            lock_config=True)
  _TOPOLOGY = flags.DEFINE_string("topology", None, "libtpu topology, e.g. v5e:16x16, v4:4x4x4, "
                                  "v5p:4x4x8 (chips per torus axis).")
  _MESH = flags.DEFINE_string("mesh", None, "data=A,fsdp=B,tensor=C (-1 = the rest); default "
                              "config.mesh.")
  _BATCH = flags.DEFINE_integer("batch_size", None, "Global batch; default config.batch_size.")
  _CHIP_CONFIG = flags.DEFINE_string("chip_config", None, "libtpu chip config: megacore (one "
                                     "device per chip) or default; default megacore on v4/v5p.")
  _OUT = flags.DEFINE_string("out", None, "Also write the report as JSON here.")


def parse_mesh(text: str) -> dict[str, int]:
  """"data=16,fsdp=16,tensor=1" -> {"data": 16, "fsdp": 16, "tensor": 1}."""
  out = {}
  for item in filter(None, text.split(",")):
    key, sep, value = item.partition("=")
    try:
      out[key.strip()] = int(value)
    except ValueError:
      raise ValueError(f"--mesh={text!r}: expected axis=size items like data=16,fsdp=16,tensor=1, "
                       f"got {item!r}.") from None
    if not sep:
      raise ValueError(f"--mesh={text!r}: {item!r} has no '=size'.")
  return out


def topology_devices(topology: str, chip_config: str | None = None) -> list[Any]:
  """The abstract devices of a TPU topology, e.g. "v5e:16x16" (256 v5e chips)."""
  try:
    importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    raise RuntimeError(
        "Ahead-of-time TPU compiles need libtpu, which is not installed. Install the version this "
        f"jax pins: pip install \"jax[tpu]=={_jax_version()}\" (jax 0.10.2 pins libtpu==0.0.42.1; "
        "or pip install libtpu==0.0.42.1). It runs on CPU-only machines.") from None
  from jax.experimental import topologies
  if chip_config is None:
    chip_config = "megacore" if topology.split(":")[0] in MEGACORE else "default"
  kwargs = {} if chip_config == "default" else {"chip_config_name": chip_config}
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                             **kwargs).devices)
  except Exception as e:  # libtpu raises JaxRuntimeError / ValueError for unknown names
    raise ValueError(f"libtpu does not know topology {topology!r} (chip_config {chip_config}): "
                     f"{e}. Names look like v5e:16x16, v4:4x4x4, v5p:4x4x8.") from e


def compile_step(config, topology: str, mesh_shape: Mapping[str, int] | None = None,
                 batch_size: int | None = None, chip_config: str | None = None) -> dict:
  """Builds the training for `config` on `topology` and compiles its step; returns the report."""
  import jax
  from pixel_llm import partitioning
  from pixel_llm import sharding
  from pixel_llm import trainer
  from pixel_llm.models import build

  devices = topology_devices(topology, chip_config)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if mesh_shape is not None:
      config.mesh = dict(mesh_shape)
    if batch_size is not None:
      config.batch_size = batch_size
  mesh = partitioning.mesh_from_config(config, devices)
  data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % data_ways:
    raise ValueError(f"Global batch {config.batch_size} does not divide over data x fsdp = "
                     f"{data_ways} (mesh {dict(mesh.shape)} on {topology}).")

  t0 = time.time()
  rng = jax.random.key(config.seed)
  training = trainer.build_training(config, mesh, rng)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, v.ndim))
           for k, v in build.example_batch(config, config.batch_size).items()}
  with trainer.mesh_context(mesh):  # activation constraints resolve against mesh and rules
    lowered = training.jitted_step.lower(training.abstract_state, batch)
  t1, cpu1 = time.time(), time.process_time()
  try:
    compiled, error = lowered.compile(), None
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses programs that cannot fit HBM: that is an answer, not a crash.
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    compiled, error = None, str(e).strip()
  timing = {"build_and_lower_seconds": t1 - t0, "compile_seconds": time.time() - t1,
            "compile_cpu_seconds": time.process_time() - cpu1}
  return _report(config, topology, mesh, devices[0], compiled, error, timing)


def cost_analysis(compiled) -> dict:
  """XLA's cost analysis of a compiled program as one dict (jax returns a dict, older versions a
  one-element list): "flops", "bytes accessed", "optimal_seconds", ... of the per-device program.
  XLA counts a loop body (e.g. a scanned layer stack) once."""
  cost = compiled.cost_analysis()
  return dict(cost[0] if isinstance(cost, (list, tuple)) else cost or {})


def _report(config, topology, mesh, device, compiled, error, timing) -> dict:
  import jax
  hbm, peak, bandwidth = chips.device_spec(device)
  report = {
      "command": _command_line(),
      "config": config.get("name", ""), "topology": topology, "device_kind": device.device_kind,
      "devices": mesh.devices.size, "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "batch_size": int(config.batch_size), "dtype": config.model.get("dtype", "float32"),
      "remat": {k: (config.model[k].get("remat_policy", "nothing_saveable")
                    if config.model[k].get("remat", False) else False)
                for k in ("sam", "eva02", "t5") if config.model.get(k)},
      "scan_layers": {k: bool(config.model[k].get("scan_layers", False))
                      for k in ("sam", "eva02", "t5") if config.model.get(k)},
      "hbm_bytes": hbm, "fits": False, "compile_error": error,
      "memory_per_device": None, "cost_model": None, **timing,
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "versions": {"jax": jax.__version__, "libtpu": importlib.metadata.version("libtpu")},
  }
  if compiled is None:
    return report
  mem = compiled.memory_analysis()
  memory = {
      "argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "alias_bytes": int(mem.alias_size_in_bytes),
      "code_bytes": int(mem.generated_code_size_in_bytes),
      # XLA's own peak of live buffers (liveness-aware; 0 where the backend does not report it).
      "peak_bytes": int(getattr(mem, "peak_memory_in_bytes", 0)),
  }
  # Donated state is both argument and output: aliased bytes count once.
  memory["total_bytes"] = (memory["argument_bytes"] + memory["output_bytes"]
                           - memory["alias_bytes"] + memory["temp_bytes"] + memory["code_bytes"])
  cost = cost_analysis(compiled)
  flops = float(cost.get("flops", 0.0))  # of the per-device (SPMD-partitioned) program
  accessed = float(cost.get("bytes accessed", 0.0))
  # XLA's optimal_seconds is negative (unknown) for many sharded programs; then the roofline of
  # this device's flops and HBM traffic stands in (no communication: a lower bound).
  optimal = float(cost.get("optimal_seconds", -1.0))
  roofline = max(flops / peak, accessed / bandwidth)
  n = mesh.devices.size
  # XLA counts a scanned (while-loop) layer stack once, so with scan_layers its flops and times
  # are too low; the model's own FLOPs (pixel_llm/tools/flops.py) give a compute floor that holds
  # either way, and the MFU numerator.
  model_flops = _model_flops(config)
  floor = model_flops / (n * peak) if model_flops else 0.0
  xla_seconds = optimal if optimal > 0 else roofline
  # A scanned program's cost is a partial count (each loop body once), so XLA's estimate means
  # nothing there, even above the floor (v5e-256 gave a roofline of 0.024 s from 1/9 of the flops);
  # nor where it falls below the floor. Then only bounds are reported.
  scanned = any(report["scan_layers"].values())
  estimated = xla_seconds > floor and not scanned
  seconds = xla_seconds if estimated else floor
  report.update({
      "memory_per_device": memory,
      "fits": max(memory["total_bytes"], memory["peak_bytes"]) <= hbm,
      "cost_model": {
          "flops_per_device": flops, "flops_per_step": flops * n,
          "bytes_accessed_per_device": accessed,
          "optimal_seconds": optimal if optimal > 0 else None,
          "roofline_seconds": roofline, "step_seconds": seconds,
          "model_flops_per_step": model_flops, "model_compute_floor_seconds": floor,
          "xla_counts_scan_body_once": scanned,
          "step_seconds_is_estimate": estimated,
          "examples_per_second": (config.batch_size / seconds
                                  if seconds > 0 and estimated else None),
          "examples_per_second_upper_bound": config.batch_size / floor if floor > 0 else None,
          "mfu": (((model_flops or flops * n) / n) / seconds / peak
                  if seconds > 0 and estimated else None),
          "peak_flops_per_device": peak,
      },
  })
  return report


def _model_flops(config) -> float | None:
  """Training FLOPs of one global batch counted from the model's shapes (None if uncountable)."""
  from pixel_llm.tools import flops
  try:
    return flops.train_flops(config)["train"] * config.batch_size
  except Exception:  # pylint: disable=broad-except  (the estimate is a report, not the job)
    return None


def format_report(r: dict) -> str:
  """The report as a readable table."""
  m, c = r["memory_per_device"], r["cost_model"]
  gib = lambda b: f"{b / GIB:8.2f} GiB"
  lines = [
      f"{r['config']} on {r['topology']} ({r['devices']} x {r['device_kind']}), mesh {r['mesh']}, "
      f"batch {r['batch_size']}, dtype {r['dtype']}, remat {r['remat']}, "
      f"scan {r['scan_layers']}"]
  if m is None:
    lines.append(f"DOES NOT FIT {r['hbm_bytes'] / GIB:.2f} GiB HBM per device; the TPU compiler "
                 f"says: {r['compile_error']}")
  else:
    lines += [
      "per-device memory (XLA memory analysis):",
      *(f"  {k[:-6]:<10} {gib(m[k])}" for k in ("argument_bytes", "output_bytes", "temp_bytes",
                                                "alias_bytes", "code_bytes", "peak_bytes")),
      f"  {'total':<10} {gib(m['total_bytes'])}  of {r['hbm_bytes'] / GIB:.1f} GiB HBM: "
      + ("fits" if r["fits"] else "DOES NOT FIT"),
      "cost-model estimate (XLA; not a measurement):",
      f"  flops per step {c['flops_per_step']:.3e}, per device {c['flops_per_device']:.3e}"
      + (" (scan: XLA counts each scanned stack once)" if c["xla_counts_scan_body_once"] else ""),
      f"  model flops per step {c['model_flops_per_step'] or 0:.3e} (pixel_llm.tools.flops), "
      f"compute floor {c['model_compute_floor_seconds']:.4f} s",
    ]
    if c["step_seconds_is_estimate"]:
      lines.append(f"  step seconds {c['step_seconds']:.4f} ("
                   + ("XLA optimal_seconds" if c["optimal_seconds"] else "the roofline of XLA's "
                      "flops and HBM bytes per device") + "; communication not counted: a lower "
                   "bound)")
    else:
      why = ("it counts each scanned stack once" if c["xla_counts_scan_body_once"] else
             "it is below the compute floor")
      lines.append(f"  no step-time estimate: XLA's cost model ({c['roofline_seconds']:.4f} s) "
                   f"is a partial count ({why}); examples/s at most "
                   f"{c['examples_per_second_upper_bound']:.1f} (100% MFU)")
    if c["examples_per_second"]:
      lines.append(f"  examples/s {c['examples_per_second']:.1f}, MFU {100 * c['mfu']:.1f}% of "
                   f"{c['peak_flops_per_device'] / 1e12:.0f} TFLOP/s bf16 peak per device")
  lines.append(f"build+lower {r['build_and_lower_seconds']:.1f} s, compile "
               f"{r['compile_seconds']:.1f} s ({r['compile_cpu_seconds']:.0f} CPU s), peak RSS "
               f"{r['peak_rss_bytes'] / GIB:.2f} GiB; jax {r['versions']['jax']}, libtpu "
               f"{r['versions']['libtpu']}")
  return "\n".join(lines)


def _command_line() -> str:
  argv = list(sys.argv)
  if argv and argv[0].endswith(os.path.join("tools", "aot.py")):  # run as python -m
    argv[:1] = ["python", "-m", "pixel_llm.tools.aot"]
  return " ".join(shlex.quote(a) for a in argv)


def _jax_version() -> str:
  try:
    return importlib.metadata.version("jax")
  except importlib.metadata.PackageNotFoundError:
    return "0.10.2"


def main(argv):
  del argv
  report = compile_step(_CONFIG.value, _TOPOLOGY.value,
                        parse_mesh(_MESH.value) if _MESH.value else None, _BATCH.value,
                        _CHIP_CONFIG.value)
  print(format_report(report), flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
