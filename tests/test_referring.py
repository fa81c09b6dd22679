"""Referring localization end to end: configs/refcoco.py's toy on a tiny synthetic world (refs in the
official RefCOCO format -> build -> seqio "loc" task -> train -> the referring evaluator), and the
adapter's box-at-EOS read-out on a stub network."""
import json
import os

import jax.numpy as jnp
import numpy as np

from configs import refcoco
from pixel_llm import metrics
from pixel_llm import train
from pixel_llm.model import PixelLLMModel


class _StubNetwork:
  """points[b, r, t] = (t, 10 t) for both points: the read-out position is visible in the value."""
  image_size = 64

  def apply(self, variables, image, tokens, **kwargs):
    del variables, image, kwargs
    b, r, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.float32)[None, None, :], (b, r, t))
    xy = jnp.stack([pos, 10 * pos], -1)[..., None, :]
    return {"points": jnp.repeat(xy, 2, axis=-2), "logits": jnp.zeros((b, r, t, 5))}, {}


def test_locate_batch_reads_the_position_that_predicts_eos():
  # Targets: expression tokens then EOS (1) then padding; EOS is the last target token.
  targets = np.array([[[5, 6, 7, 1, 0, 0]], [[9, 1, 0, 0, 0, 0]]], np.int32)
  batch = {"image": np.zeros((2, 64, 64, 3), np.float32), "decoder_input_tokens": targets,
           "decoder_target_tokens": targets}
  points = np.asarray(PixelLLMModel(_StubNetwork()).locate_batch(None, batch))
  assert points.shape == (2, 1, 2, 2)
  np.testing.assert_array_equal(points[:, 0, 0], [[3.0, 30.0], [1.0, 10.0]])


def test_refcoco_toy_trains_and_evaluates(tmp_path):
  c = refcoco.get_config("toy")
  c.model.image_size = 64
  c.data.update(root=str(tmp_path / "world"), num_train_images=16, num_val_images=9,
                image_size=64, eval_batch_size=8)
  c.input.update(max_target_len=12, max_context_len=12)
  c.update(total_steps=4, batch_size=4, warmup_steps=1, log_every_steps=2,
           checkpoint_every_steps=4, eval_every_steps=1000)
  c.mesh = dict(data=4, fsdp=1, tensor=2)
  workdir = str(tmp_path / "work")
  result = train.train_and_evaluate(c, workdir)

  # The refs were written in the official format and built with the real builder.
  assert (tmp_path / "world" / "refcoco_train" / "refcoco" / "refs(unc).p").exists()
  assert list((tmp_path / "world" / "tfrecords").glob("refcoco_val.tfrecord-*"))
  # Only the box trains: the caption loss is masked out for referring batches.
  lines = [json.loads(l) for l in open(os.path.join(workdir, "train_metrics.jsonl"))]
  assert all(l["caption_loss"] == 0.0 and l["point_loss"] > 0 for l in lines)

  got = result["refcoco_val"]
  rows = [json.loads(l) for l in open(os.path.join(workdir, "eval",
                                                   "refcoco_val.predictions.jsonl"))]
  assert got["num_expressions"] == len(rows) > 0
  boxes = np.array([r["box"] for r in rows])
  gt = np.array([r["gt_box"] for r in rows])
  assert np.all(boxes[:, 2:] >= boxes[:, :2]) and np.all((gt >= 0) & (gt <= 1))
  # The evaluator's numbers are the metric functions of what it wrote (rounded to 5 digits).
  ious = metrics.paired_box_iou(boxes, gt)
  np.testing.assert_allclose([r["iou"] for r in rows], ious, atol=1e-4)
  np.testing.assert_allclose(got["mean_iou"], ious.mean(), atol=1e-4)
  assert got["precision_at_0.5"] == np.mean(ious > 0.5)
