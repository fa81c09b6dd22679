"""End to end: the training binary on a tiny synthetic world (generate -> build -> seqio -> train ->
checkpoint -> evaluate -> visualise), then a rerun that resumes instead of starting over."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import ln
from pixel_llm import train
from pixel_llm.tools import flops
from tiny_train_config import shallow  # tests/tiny_train_config.py


def _config(tmp_path):
  c = shallow(ln.get_config("toy"))
  c.model.image_size = 64
  c.data.update(root=str(tmp_path / "world"), num_train_images=24, num_val_images=4, image_size=64,
                eval_batch_size=4)
  c.input.max_target_len = 12
  c.update(total_steps=12, batch_size=4, warmup_steps=2, log_every_steps=2,
           checkpoint_every_steps=6, eval_every_steps=1000)
  c.mesh = dict(data=4, fsdp=1, tensor=2)  # batch 4 on conftest's 8 devices; tensor-parallel too
  c.peak_flops_per_device = 1e12  # CPUs have no entry in pixel_llm.chips: MFU needs a peak
  return c


def test_train_evaluate_and_resume(tmp_path, capsys):
  config = _config(tmp_path)
  workdir = str(tmp_path / "work")
  result = train.train_and_evaluate(config, workdir)

  # The synthetic world was written in the official formats and built into TFRecords.
  world = tmp_path / "world"
  assert (world / "annotations" / "coco_train_localized_narratives-00000-of-00001.jsonl").exists()
  assert list((world / "tfrecords").glob("ln_train.tfrecord-*"))

  # Metrics: one JSON line per logged step, with each task's loss; the loss falls.
  lines = [json.loads(l) for l in open(os.path.join(workdir, "train_metrics.jsonl"))]
  assert [l["step"] for l in lines] == [2, 4, 6, 8, 10, 12]
  for key in ("loss", "caption_loss", "point_loss", "learning_rate"):
    assert all(np.isfinite(l[key]) for l in lines), key
  assert lines[-1]["loss"] < lines[0]["loss"]
  # MFU = the model's training FLOPs per example (from its shapes) x examples/s / (peak x devices).
  per_example = flops.train_flops(config)["train"]
  for l in lines:
    np.testing.assert_allclose(l["mfu"] * 1e12 * 8 / l["examples_per_second"], per_example,
                               rtol=1e-6)

  # Final evaluation, on disk and returned: metrics.json, and eval/ln_val.json + predictions as
  # the eval binary writes them.
  with open(os.path.join(workdir, "metrics.json")) as f:
    on_disk = json.load(f)
  assert on_disk == result and on_disk["steps"] == 12 and np.isfinite(on_disk["wall_seconds"])
  logged = on_disk["ln_val"]
  for key in ("token_accuracy", "cider", "trace_l1"):
    assert key in logged and np.isfinite(logged[key]), key
  assert logged["num_images"] == 4
  assert 0.0 <= logged["token_accuracy"] <= 1.0 and logged["trace_l1"] > 0
  with open(os.path.join(workdir, "eval", "ln_val.json")) as f:
    assert json.load(f) == {"step": 12, **logged}
  rows = [json.loads(l) for l in open(os.path.join(workdir, "eval", "ln_val.predictions.jsonl"))]
  assert len(rows) == 4 and all(r["references"] and "prediction" in r for r in rows)

  # `pixel_llm.eval` on the checkpoint reproduces the trainer's numbers (same step, same params).
  from pixel_llm import eval as eval_lib
  out = tmp_path / "eval_out"
  again = eval_lib.evaluate(config, workdir, output_dir=str(out))
  assert again == {"ln_val": logged}
  with open(out / "ln_val.json") as f:
    assert json.load(f) == {"step": 12, **logged}
  assert [json.loads(l) for l in open(out / "ln_val.predictions.jsonl")] == rows
  assert os.listdir(out / "tensorboard")
  # Only the parameters are read: a config that freezes other parts (so its optimizer state has
  # another structure) evaluates the same checkpoint to the same numbers.
  frozen = config.copy_and_resolve_references()
  frozen.frozen_params = (r"^(?!location_head/)",)
  assert eval_lib.evaluate(frozen, workdir, output_dir=str(tmp_path / "eval_frozen")) == {
      "ln_val": logged}

  # A picture a person can judge: written and not blank.
  pngs = sorted(os.listdir(os.path.join(workdir, "visualizations")))
  assert pngs and all(p.endswith(".png") for p in pngs)
  pixels = np.asarray(Image.open(os.path.join(workdir, "visualizations", pngs[0])).convert("RGB"))
  assert pixels.std() > 10

  # Checkpoints at 6 and 12; the same command again resumes at 12 and trains no further.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6"]
  capsys.readouterr()
  train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert "at step 12" in out
  assert len(open(os.path.join(workdir, "train_metrics.jsonl")).readlines()) == len(lines)

  # Another vocabulary is refused before the workdir's copy is touched: resuming this workdir
  # with it, or starting a new workdir from its checkpoint (the token ids would mean other words).
  from pixel_llm.data import synthetic
  from pixel_llm.data import vocab as vocab_lib
  texts = [synthetic.make_example(1, i, narration="shuffled").record["caption"]
           for i in range(1, 31)]
  other = vocab_lib.train_spm(texts, str(tmp_path / "other"), vocab_size=96)
  saved = open(os.path.join(workdir, "spiece.model"), "rb").read()
  refused = config.copy_and_resolve_references()
  refused.data.vocab = other
  with pytest.raises(ValueError, match="workdir's checkpoint.*ids differ"):
    train.train_and_evaluate(refused, workdir)
  assert open(os.path.join(workdir, "spiece.model"), "rb").read() == saved
  refused.init_checkpoint = os.path.join(workdir, "checkpoints", "12", "state")
  with pytest.raises(ValueError, match="init checkpoint.*ids differ"):
    train.train_and_evaluate(refused, str(tmp_path / "work2"))
  assert not (tmp_path / "work2" / "spiece.model").exists()

  # The input position: the batches after skipping k equal batches k, k+1, ... of a fresh read.
  from pixel_llm.data import pipeline
  data = pipeline.prepare(config)
  fresh = data.train_batches()
  expected = [next(fresh) for _ in range(5)]
  resumed = data.train_batches(3)
  for want in expected[3:]:
    got = next(resumed)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # Two input shards (processes): the tiny world has one file, so each shard takes its half of
  # every global batch; together they are the one-process batches, in order.
  halves = [next(data.train_batches(0, i, 2)) for i in range(2)]
  for k in expected[0]:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), expected[0][k],
                                  err_msg=k)
