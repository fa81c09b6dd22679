"""The paper's stage chain on the synthetic world, tiny: stage 1 (`configs/webli.py`, captions
from WebLI-format pairs) trains and checkpoints; stage 2 (`configs/ln.py` with COCO captions mixed
into LN, 1 : 2) starts from stage 1's checkpoint through `init_checkpoint`."""
import json
import os

import numpy as np
import pytest

from configs import ln
from configs import webli
from pixel_llm import train
from pixel_llm.data import pipeline
from tiny_train_config import shallow  # tests/tiny_train_config.py

pytestmark = pytest.mark.slow


def _shrink(c, root):
  c = shallow(c)
  c.model.image_size = 64
  c.data.update(root=root, num_train_images=12, num_val_images=4, image_size=64,
                eval_batch_size=4)
  c.input.max_target_len = 12
  c.update(total_steps=2, batch_size=4, warmup_steps=1, log_every_steps=1,
           checkpoint_every_steps=2, eval_every_steps=1000, final_eval=False)
  c.mesh = dict(data=4, fsdp=1, tensor=2)
  return c


def test_stage_1_captions_then_stage_2_mixture_from_its_checkpoint(tmp_path, capsys):
  stage1 = _shrink(webli.get_config("toy"), str(tmp_path / "world_webli"))
  data = pipeline.prepare(stage1)
  batch = next(data.train_batches())
  assert set(batch["task"]) == {next(iter(set(batch["task"])))}  # one caption task
  assert float(batch["point_weights"].sum()) == 0.0 and float(batch["caption_weights"].min()) == 1
  train.train_and_evaluate(stage1, str(tmp_path / "stage1"))
  state = tmp_path / "stage1" / "checkpoints" / "2" / "state"
  assert state.is_dir()

  stage2 = _shrink(ln.get_config("toy"), str(tmp_path / "world_mix"))
  stage2.data.coco_captions_rate = 1.0
  stage2.init_checkpoint = str(state)
  data = pipeline.prepare(stage2)
  batches = data.train_batches()
  tasks = [t for _ in range(4) for t in next(batches)["task"]]
  assert len({t.decode().split("_")[0] for t in tasks}) == 2  # LN and COCO captions mixed
  capsys.readouterr()
  train.train_and_evaluate(stage2, str(tmp_path / "stage2"))
  out = capsys.readouterr().out
  assert f"Initialised from {state}" in out
  lines = [json.loads(l) for l in open(tmp_path / "stage2" / "train_metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2]
  assert all(np.isfinite(l["loss"]) for l in lines)
