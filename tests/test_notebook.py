"""The demo notebook runs top to bottom on CPU (its code cells, in order, in a fresh interpreter)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "pixel_llm_demo.ipynb"


def _code(notebook) -> str:
  cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
  lines = []
  for cell in cells:
    lines += ["".join(cell["source"]), ""]
  # A notebook's last expression per cell is displayed, not an error; plain Python ignores it.
  return "\n".join(lines)


def test_notebook_is_valid_and_covers_the_demo():
  nb = json.loads(NOTEBOOK.read_text())
  assert nb["nbformat"] == 4
  text = _code(nb)
  for needed in ("train.train_and_evaluate", "pixel_llm.load", ".caption(", "box=", ".locate(",
                 "make_mesh", "render_caption"):
    assert needed in text, needed
  assert all(c.get("outputs", []) == [] for c in nb["cells"] if c["cell_type"] == "code")


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_on_cpu(tmp_path):
  code = _code(json.loads(NOTEBOOK.read_text()))
  workdir = tmp_path / "work"
  env = dict(os.environ, PIXEL_LLM_NOTEBOOK_FAST="1", PIXEL_LLM_NOTEBOOK_WORKDIR=str(workdir),
             PIXEL_LLM_DATA_DIR=str(tmp_path / "data"), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT / "notebooks"), env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "->" in proc.stdout and "box in pixels:" in proc.stdout
  assert (workdir / "notebook_caption.png").stat().st_size > 1000
