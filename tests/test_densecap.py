"""Dense object captioning and location-conditioned captioning end to end, in one training run:
configs/vg_densecap.py's toy on a tiny synthetic world in Visual Genome's format (regions -> build
vg -> seqio region task with R boxes per image -> train with the proposal loss next to the caption
loss on the GT boxes -> (a) proposals + a caption per box -> DenseCap mAP, (b) configs/
loc_caption.py's evaluation: a greedy caption per GT box, scored per region)."""
import json
import os
import shutil

import numpy as np

from configs import loc_caption
from configs import vg_densecap
from pixel_llm import metrics
from pixel_llm import train


def test_vg_densecap_toy_trains_detects_and_scores(tmp_path):
  c = vg_densecap.get_config("toy")
  c.model.image_size = 64
  c.data.update(root=str(tmp_path / "world"), num_train_images=16, num_val_images=6,
                image_size=64, eval_batch_size=3)
  c.input.update(max_target_len=8, num_prompts=3)
  c.update(total_steps=4, batch_size=8, warmup_steps=1, log_every_steps=2,
           checkpoint_every_steps=4, eval_every_steps=1000)
  java = shutil.which("java") is not None
  c.evals.vg_densecap_val.update(num_boxes=5, meteor=java)
  c.evals.vg_loca_val = loc_caption.get_config("toy").evals.vg_loca_val  # the same network
  # fsdp shards the convolutions' output channels; the proposal head has no tensor-parallel dim.
  c.mesh = dict(data=2, fsdp=4, tensor=1)
  workdir = str(tmp_path / "work")
  result = train.train_and_evaluate(c, workdir)

  lines = [json.loads(l) for l in open(os.path.join(workdir, "train_metrics.jsonl"))]
  assert all(np.isfinite(l["detection_loss"]) and l["detection_loss"] > 0 for l in lines)
  assert all(l["caption_loss"] > 0 for l in lines)

  got = result["vg_densecap_val"]
  rows = [json.loads(l) for l in open(os.path.join(workdir, "eval",
                                                   "vg_densecap_val.predictions.jsonl"))]
  assert len(rows) == 3 and got["num_gt"] > 0  # the synthetic val images split val / test
  for r in rows:  # at most num_boxes proposals, inside the image, one caption each
    boxes = np.array(r["boxes"]).reshape(-1, 4)
    assert len(boxes) == len(r["scores"]) == len(r["captions"]) <= 5
    assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, 2:] >= boxes[:, :2])
  # The reported detection AP is the metric of what the evaluator wrote.
  preds = {r["image_id"]: {"boxes": np.array(r["boxes"]).reshape(-1, 4), "scores": r["scores"],
                           "captions": r["captions"]} for r in rows}
  gts = {r["image_id"]: {"boxes": np.array(r["gt_boxes"]).reshape(-1, 4),
                         "captions": r["gt_captions"]} for r in rows}
  again = metrics.densecap_map(preds, gts, meteor_thresholds=())
  np.testing.assert_allclose(got["detection_map"], again["detection_map"], atol=1e-4)
  assert 0.0 <= got["detection_map"] <= 1.0
  if java:
    assert 0.0 <= got["map"] <= got["detection_map"] + 1e-9

  # (b) Location-conditioned captioning: one prediction per real region (padding regions
  # skipped), each with its own reference, scored by the metric functions.
  got = result["vg_loca_val"]
  rows = [json.loads(l) for l in open(os.path.join(workdir, "eval",
                                                   "vg_loca_val.predictions.jsonl"))]
  keys = [r["key"] for r in rows]
  assert len(set(keys)) == len(keys) == got["num_predictions"] > got["num_images"] > 0
  assert all("/r" in k and len(r["references"]) == 1 for k, r in zip(keys, rows))
  predictions = {r["key"]: r["prediction"] for r in rows}
  references = {r["key"]: r["references"] for r in rows}
  assert got["cider"] == metrics.cider_d(predictions, references)
  assert got["bleu_4"] == metrics.bleu(predictions, references)[3]
