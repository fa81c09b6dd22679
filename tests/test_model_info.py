"""Full-size parameter counts from jax.eval_shape, against the public checkpoints' counts."""
import json
import pathlib
import subprocess
import sys

from configs import ln
from pixel_llm.models import build
from pixel_llm.tools import model_info

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_full_size_counts_match_public_checkpoints():
  config = ln.get_config(None)
  counts = model_info.component_counts(model_info.flat_shapes(build.abstract_params(config)),
                                       config.frozen_params)
  assert counts["sam_image_encoder"] == 637_026_048  # sam_vit_h_4b8939.pth image_encoder.*
  assert counts["eva02"] == 303_268_800  # timm eva02_large_patch14_224, num_classes=0
  assert counts["t5"] == 2_849_757_184  # google/flan-t5-xl
  assert counts["lora"] == 18_874_368  # r=32 on q, v of 72 attention blocks
  assert counts["total"] == sum(v for k, v in counts.items() if k not in ("total", "trainable"))
  # Frozen: SAM image + prompt encoder, T5 base weights. Trainable: the rest.
  expected_trainable = (counts["eva02"] + counts["prompt_extractor"] + counts["visual_projection"]
                        + counts["lora"] + counts["location_head"])
  assert counts["trainable"] == expected_trainable


def test_cli_json_on_toy_config():
  proc = subprocess.run([sys.executable, "-m", "pixel_llm.tools.model_info",
                         "--config=configs/ln.py:toy", "--json"],
                        capture_output=True, text=True, check=True, timeout=300, cwd=ROOT)
  counts = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(model_info.COMPONENTS) | {"total", "trainable"} == set(counts)
  assert all(v > 0 for v in counts.values())


def test_readme_command_prints_table_with_logical_axes():
  proc = subprocess.run([sys.executable, "-m", "pixel_llm.tools.model_info",
                         "--config=configs/ln.py", "--top=2"],
                        capture_output=True, text=True, check=True, timeout=300, cwd=ROOT)
  assert "3,856,122,128" in proc.stdout  # total of the paper's setting
  lines = proc.stdout.split("(shape, logical axes):")[1].strip().splitlines()
  assert len(lines) == 2
  assert {line.split()[0] for line in lines} == {"t5/lm_head/kernel", "t5/shared/embedding"}
  assert "('embed', 'vocab')" in proc.stdout


def test_mask_decoder_joins_the_network_when_enabled():
  config = ln.get_config(None)
  config.model.mask_decoder.enabled = True
  counts = model_info.component_counts(model_info.flat_shapes(build.abstract_params(config)),
                                       config.frozen_params)
  assert counts["mask_decoder"] == 4_058_340  # sam_vit_*.pth mask_decoder.* (same for B/L/H)
  assert counts["total"] == 3_856_122_128 + 4_058_340
  assert counts["trainable"] == 369_332_420  # frozen with the rest of SAM
