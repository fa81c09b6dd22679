"""Datasheet figures of the accelerators we measure against: one table for the trainer's MFU and
the AOT tool's fit / roofline (`pixel_llm/tools/aot.py`).

Keys are jax `device_kind` strings. TPU kinds are matched exactly (libtpu's names: v5e is
"TPU v5 lite", v5p "TPU v5"); other kinds by substring ("NVIDIA H200" -> "H200"). Figures are per
chip: peak dense bf16 FLOP/s, HBM and its bandwidth; a jax device holding fewer TensorCores than
its chip (v4 / v5p without megacore) gets its share of each.
"""
import dataclasses
from typing import Any

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  bf16_tflops: float
  hbm_gib: float | None  # None: varies by model (A100 40 / 80 GB)
  hbm_gbps: float
  cores: int = 1  # TensorCores per chip


CHIPS = {
    "TPU v3": Chip(123, 32, 900, cores=2),
    "TPU v4": Chip(275, 32, 1200, cores=2),
    "TPU v5 lite": Chip(197, 16, 819),          # v5e
    "TPU v5": Chip(459, 95, 2765, cores=2),     # v5p
    "TPU v5p": Chip(459, 95, 2765, cores=2),
    "TPU v6 lite": Chip(918, 32, 1640),         # v6e (Trillium)
    "H200": Chip(989, 141, 4800),
    "H100": Chip(989, 80, 3350),
    "A100": Chip(312, None, 2039),
}


def lookup(kind: str) -> Chip | None:
  """The chip for a jax device_kind (exact TPU name, else the longest GPU key it contains)."""
  if kind in CHIPS:
    return CHIPS[kind]
  if kind.startswith("TPU"):
    return None  # "TPU v5 lite" must not fall back to "TPU v5"
  hits = [k for k in CHIPS if not k.startswith("TPU") and k.lower() in kind.lower()]
  return CHIPS[max(hits, key=len)] if hits else None


def device_spec(device: Any) -> tuple[float | None, float, float]:
  """(HBM bytes, peak bf16 FLOP/s, HBM bytes/s) of one jax device; ValueError if unknown."""
  chip = lookup(device.device_kind)
  if chip is None:
    raise ValueError(f"No datasheet figures for device kind {device.device_kind!r}; add it to "
                     f"CHIPS in {__file__} (known: {sorted(CHIPS)}).")
  share = getattr(device, "num_cores", chip.cores) / chip.cores
  hbm = chip.hbm_gib * GIB * share if chip.hbm_gib else None
  return hbm, chip.bf16_tflops * 1e12 * share, chip.hbm_gbps * 1e9 * share
