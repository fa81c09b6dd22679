"""Ahead-of-time TPU compiles of the real train step (pixel_llm/tools/aot.py), on this CPU machine.

libtpu describes the topologies (v5e:2x2 = 4 chips, v5e:4x4 = 16); nothing runs on a TPU. The TPU
compiler takes minutes even for a trimmed toy network (one layer per tower, 64-px images) on 2 busy
cores, so there is one compile, through the CLI, on a mesh with both fsdp and tensor parallelism
(marked slow). The error paths need no compile.
"""
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="AOT TPU compiles need libtpu: pip install libtpu==0.0.42.1 "
                    "(the version jax 0.10.2 pins; part of the test extra)")

from configs import ln
from pixel_llm import chips
from pixel_llm.tools import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The trimmed toy network as command-line overrides (one layer per tower, 64-px images).
OVERRIDES = ["--config.model.image_size=64", "--config.model.sam.depth=1",
             "--config.model.eva02.depth=1", "--config.model.prompt_extractor.depth=1",
             "--config.model.t5.num_layers=1", "--config.model.t5.num_decoder_layers=1",
             "--config.model.location_head.depth=1", "--config.input.max_target_len=6",
             "--config.input.max_context_len=4"]


def _config():
  config = ln.get_config("toy")
  config.unlock()
  config.batch_size = 8
  return config


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """One compile for everything: the CLI, fsdp and tensor parallelism together, JSON out."""
  out = tmp_path_factory.mktemp("aot") / "aot.json"
  result = subprocess.run(
      [sys.executable, "-m", "pixel_llm.tools.aot", "--config=configs/ln.py:toy",
       "--topology=v5e:2x2", "--mesh=data=1,fsdp=2,tensor=-1", "--batch_size=4", f"--out={out}",
       *OVERRIDES], cwd=ROOT, capture_output=True, text=True, timeout=1800,
      env={**os.environ, "XLA_FLAGS": ""})
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout, json.loads(out.read_text())


@pytest.mark.slow  # one TPU compile: ~4 min on 2 busy cores
def test_cli_compiles_the_train_step_for_v5e(cli_run):
  stdout, r = cli_run
  assert (r["device_kind"], r["devices"], r["mesh"], r["batch_size"]) == (
      "TPU v5 lite", 4, {"data": 1, "fsdp": 2, "tensor": 2}, 4)
  m = r["memory_per_device"]
  assert m["argument_bytes"] > 0 and m["output_bytes"] > 0 and m["temp_bytes"] >= 0
  assert m["total_bytes"] >= m["argument_bytes"] + m["temp_bytes"]
  assert 0 < max(m["total_bytes"], m["peak_bytes"]) < r["hbm_bytes"] == 16 * aot.GIB and r["fits"]
  c = r["cost_model"]
  assert c["flops_per_device"] > 0 and c["flops_per_step"] == 4 * c["flops_per_device"]
  assert c["step_seconds"] > 0 and c["roofline_seconds"] > 0 and 0 < c["mfu"] <= 1
  assert c["model_flops_per_step"] > 0 and 0 < c["model_compute_floor_seconds"] <= c["step_seconds"]
  assert "per-device memory" in stdout and "fits" in stdout and "MFU" in stdout
  assert r["versions"]["libtpu"] == importlib.metadata.version("libtpu")
  assert "pixel_llm.tools.aot" in r["command"] and "--mesh=data=1,fsdp=2,tensor=-1" in r["command"]


def test_mesh_must_fit_the_torus_and_the_batch():
  with pytest.raises(ValueError, match="product of torus axis sizes"):
    aot.compile_step(_config(), "v5e:4x4", {"data": 8, "fsdp": 2})
  with pytest.raises(ValueError, match="needs 6 devices; 4 are available"):
    aot.compile_step(_config(), "v5e:2x2", {"data": 3, "fsdp": 2})
  with pytest.raises(ValueError, match="Global batch 6 does not divide"):
    aot.compile_step(_config(), "v5e:2x2", {"fsdp": 4}, batch_size=6)
  with pytest.raises(ValueError, match="does not know topology"):
    aot.topology_devices("v5e:3x7x9")


def test_missing_libtpu_says_how_to_install(monkeypatch):
  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(importlib.metadata, "version", missing)
  with pytest.raises(RuntimeError, match=r"pip install"):
    aot.topology_devices("v5e:2x2")


def test_chip_table_shares_hbm_between_cores():
  v4_core = aot.topology_devices("v4:2x2x1", "default")  # one device per TensorCore
  v4_chip = aot.topology_devices("v4:2x2x1")  # megacore: one device per chip
  assert (len(v4_core), len(v4_chip)) == (8, 4)
  assert chips.device_spec(v4_chip[0]) == (32 * aot.GIB, 275e12, 1200e9)
  assert chips.device_spec(v4_core[0]) == (16 * aot.GIB, 137.5e12, 600e9)
  assert aot.parse_mesh("data=16,fsdp=-1") == {"data": 16, "fsdp": -1}
  with pytest.raises(ValueError, match="axis=size"):
    aot.parse_mesh("data=16,fsdp")


class _Fake:
  def __init__(self, **kw):
    self.__dict__.update(kw)


def test_a_scanned_program_gets_bounds_not_a_step_time():
  """XLA's cost model counts a scanned layer stack once, so for a scanned program the report
  gives the compute floor and an examples/s upper bound, never an MFU (no compile: stub analyses
  whose roofline exceeds the floor, as v5e-256's did)."""
  config = _config()
  config.model.t5.scan_layers = True
  mem = _Fake(argument_size_in_bytes=1, output_size_in_bytes=1, temp_size_in_bytes=1,
              alias_size_in_bytes=0, generated_code_size_in_bytes=1, peak_memory_in_bytes=1)
  compiled = _Fake(memory_analysis=lambda: mem,
                   cost_analysis=lambda: {"flops": 1e15, "bytes accessed": 1.0})
  mesh = _Fake(devices=_Fake(size=4), shape={"data": 1, "fsdp": 4, "tensor": 1})
  device = _Fake(device_kind="TPU v5 lite")
  timing = {"build_and_lower_seconds": 1.0, "compile_seconds": 1.0, "compile_cpu_seconds": 1.0}
  r = aot._report(config, "v5e:2x2", mesh, device, compiled, None, timing)
  c = r["cost_model"]
  assert c["roofline_seconds"] > c["model_compute_floor_seconds"] > 0
  assert not c["step_seconds_is_estimate"] and c["mfu"] is None and c["examples_per_second"] is None
  assert c["examples_per_second_upper_bound"] > 0
  text = aot.format_report(r)
  assert "no step-time estimate" in text and "each scanned stack once" in text
  assert "MFU" not in text.replace("(100% MFU)", "")  # only the bound's label
  config.model.t5.scan_layers = False  # unscanned: the same analyses give an estimate
  c = aot._report(config, "v5e:2x2", mesh, device, compiled, None, timing)["cost_model"]
  assert c["step_seconds_is_estimate"] and 0 < c["mfu"] < 1
