"""Location-conditioned captioning end to end: configs/loc_caption.py's toy on a tiny synthetic
world in Visual Genome's format (regions -> build vg -> seqio region task with R boxes per image ->
train -> greedy captions per box, scored per region)."""
import json
import os

from configs import loc_caption
from pixel_llm import metrics
from pixel_llm import train


def test_vg_region_captioning_trains_and_evaluates(tmp_path):
  c = loc_caption.get_config("toy")
  c.model.image_size = 64
  c.data.update(root=str(tmp_path / "world"), num_train_images=16, num_val_images=8,
                image_size=64, eval_batch_size=4)
  c.input.update(max_target_len=10, num_prompts=3)
  c.update(total_steps=4, batch_size=4, warmup_steps=1, log_every_steps=2,
           checkpoint_every_steps=4, eval_every_steps=1000)
  c.mesh = dict(data=4, fsdp=1, tensor=2)
  workdir = str(tmp_path / "work")
  result = train.train_and_evaluate(c, workdir)

  assert (tmp_path / "world" / "vg_train" / "vg" / "region_descriptions.json").exists()
  assert list((tmp_path / "world" / "tfrecords").glob("vg_val.tfrecord-*"))
  lines = [json.loads(l) for l in open(os.path.join(workdir, "train_metrics.jsonl"))]
  assert all(l["caption_loss"] > 0 for l in lines)

  got = result["vg_loca_val"]
  rows = [json.loads(l) for l in open(os.path.join(workdir, "eval",
                                                   "vg_loca_val.predictions.jsonl"))]
  # One prediction per real region (padding regions skipped), each with its own reference.
  keys = [r["key"] for r in rows]
  assert len(set(keys)) == len(keys) == got["num_predictions"] > got["num_images"] > 0
  assert all("/r" in k and len(r["references"]) == 1 for k, r in zip(keys, rows))
  predictions = {r["key"]: r["prediction"] for r in rows}
  references = {r["key"]: r["references"] for r in rows}
  assert got["cider"] == metrics.cider_d(predictions, references)
  assert got["bleu_4"] == metrics.bleu(predictions, references)[3]
