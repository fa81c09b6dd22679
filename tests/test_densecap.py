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
from pixel_llm import model as model_lib
from pixel_llm import train
from tiny_train_config import shallow  # tests/tiny_train_config.py


def test_vg_densecap_toy_trains_detects_and_scores(tmp_path):
  c = shallow(vg_densecap.get_config("toy"))
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


def test_training_captions_proposals_matched_to_the_gt_regions():
  """model.caption_proposals: in a training forward pass every prompt box is a head proposal with
  IoU >= 0.6 to the GT region whose caption it is trained on (or that region's own box), and the
  targets follow; evaluation passes keep the GT boxes."""
  import jax
  import jax.numpy as jnp
  from pixel_llm.detection import boxes as box_lib
  from pixel_llm.models import build

  c = vg_densecap.get_config("toy")
  c.model.update(image_size=64, caption_proposals=8)
  c.input.update(max_target_len=5, num_prompts=3)
  model = build.build_model(c)
  batch = build.example_batch(c, 2, abstract=False)
  gt = jnp.asarray([[[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8], [0, 0, 0, 0]],
                    [[0.0, 0.0, 1.0, 1.0], [0.2, 0.5, 0.6, 0.9], [0.5, 0.1, 0.7, 0.4]]])
  targets = jnp.arange(2 * 3 * 5).reshape(2, 3, 5) + 3  # a distinct caption per region
  batch.update(image=jax.random.uniform(jax.random.key(0), (2, 64, 64, 3)), prompt_boxes=gt,
               decoder_target_tokens=targets, decoder_input_tokens=targets - 1,
               point_weights=jnp.ones((2, 3, 5)), caption_weights=jnp.float32([[1, 1, 0],
                                                                               [1, 1, 1]]))
  params = jax.jit(model.init_variables)(jax.random.key(1), batch)["params"]

  def forward(params, batch, rng, train):
    return model.network.apply({"params": params}, batch["image"], batch["decoder_input_tokens"],
                               prompt_boxes=batch["prompt_boxes"], train=train,
                               rngs={"dropout": jax.random.split(rng)[0]})[1]  # as model._apply

  @jax.jit
  def run(params, batch, rng):  # one compile: the matched prompts and the loss, same key
    return forward(params, batch, rng, True), model.loss_fn(params, batch, rng, train=True)

  aux, (loss, metrics) = run(params, batch, jax.random.key(2))
  index, valid, boxes = (np.asarray(aux[k]) for k in ("prompt_gt_index", "prompt_valid",
                                                      "prompt_boxes"))
  assert valid.sum() >= 4  # each of the 5 real regions is a candidate; 3 slots per image
  for i in range(2):
    for j in np.flatnonzero(valid[i]):
      iou = box_lib.iou_matrix_np(boxes[i, j][None], np.asarray(gt[i, index[i, j]])[None])[0, 0]
      assert iou >= 0.6 - 1e-6
  # The targets follow the prompts: each prompt is trained on its region's caption and weight
  # (padding regions and empty slots weigh 0), and the loss counts exactly those tokens.
  got = model_lib._follow_matches(batch, aux)
  np.testing.assert_array_equal(got["decoder_target_tokens"],
                                np.take_along_axis(np.asarray(targets), index[..., None], 1))
  expected_w = np.take_along_axis(np.float32([[1, 1, 0], [1, 1, 1]]), index, 1) * valid
  np.testing.assert_array_equal(got["caption_weights"], expected_w)
  assert np.isfinite(float(loss)) and float(metrics["num_text_tokens"]) == 5 * expected_w.sum()
  # Evaluation (train=False) keeps the GT boxes: no matching (shapes only, no compile).
  aux = jax.eval_shape(lambda p, b: forward(p, b, jax.random.key(0), False), params, batch)
  assert "prompt_gt_index" not in aux and "proposals" in aux


def _roi_toy(text_proposals: int = 0):
  """A 64-px densecap toy with the RoI head, 3 prompts per image (2 real regions + 1 padding),
  its batch of 2 random images and initial params: (model, batch, gt, weights, params)."""
  import jax
  import jax.numpy as jnp
  from pixel_llm.models import build

  c = vg_densecap.get_config("toy")
  c.model.update(image_size=64, caption_proposals=8)
  c.model.roi_head.update(enabled=True, train_proposals=8, test_proposals=8, samples_per_image=12,
                          text_proposals=text_proposals)
  c.input.update(max_target_len=5, num_prompts=3)
  model = build.build_model(c)
  batch = build.example_batch(c, 2, abstract=False)
  gt = jnp.asarray([[[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8], [0, 0, 1, 1]],
                    [[0.2, 0.5, 0.6, 0.9], [0.5, 0.1, 0.7, 0.4], [0, 0, 1, 1]]])
  weights = jnp.float32([[1, 1, 0], [1, 1, 0]])  # the third prompt of each image is padding
  targets = jnp.arange(2 * 3 * 5).reshape(2, 3, 5) + 3
  batch.update(image=jax.random.uniform(jax.random.key(0), (2, 64, 64, 3)), prompt_boxes=gt,
               decoder_target_tokens=targets, decoder_input_tokens=targets - 1,
               point_weights=jnp.zeros((2, 3, 5)), caption_weights=weights)
  params = jax.jit(model.init_variables)(jax.random.key(1), batch)["params"]
  return model, batch, gt, weights, params


def test_roi_head_trains_on_sampled_rois_and_refines_the_detections():
  """model.roi_head: a training pass samples RoIs from the proposals plus the real GT regions
  (the tasks' whole-image padding prompts, caption weight 0, are not GT), its Fast R-CNN loss
  joins the detection loss with gradients into the head, the caption prompts are its first
  samples (the release's text proposals), and `detect` returns refined boxes."""
  import jax
  import jax.numpy as jnp
  from pixel_llm.detection import boxes as box_lib
  from pixel_llm.models import roi_head as roi_lib

  model, batch, gt, weights, params = _roi_toy()
  assert "roi_head" in params

  @jax.jit
  def run(params, batch, rng):
    aux = model.network.apply({"params": params}, batch["image"], batch["decoder_input_tokens"],
                              prompt_boxes=batch["prompt_boxes"], region_valid=weights > 0,
                              train=True, rngs={"dropout": jax.random.split(rng)[0]})[1]
    grads, metrics = jax.grad(lambda p: model.loss_fn(p, batch, rng, train=True),
                              has_aux=True)(params)
    return aux, grads, metrics

  aux, grads, metrics = run(params, batch, jax.random.key(2))
  roi = aux["roi"]
  np.testing.assert_array_equal(aux["prompt_boxes"], roi["boxes"][:, :3])
  prompt_valid = np.asarray(aux["prompt_valid"])
  np.testing.assert_array_equal(prompt_valid, np.asarray(roi["labels"][:, :3]) > 0)
  assert prompt_valid[:, :2].all()  # 2 real regions per image, positives first
  for i in range(2):
    for j in np.flatnonzero(prompt_valid[i]):
      k = int(aux["prompt_gt_index"][i, j])
      assert k < 2 and box_lib.iou_matrix_np(np.asarray(aux["prompt_boxes"][i, j])[None],
                                             np.asarray(gt[i, k])[None])[0, 0] >= 0.6 - 1e-6
  assert np.isfinite(float(metrics["roi_loss"])) and float(metrics["roi_loss"]) > 0
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads["roi_head"])) > 0
  labels, valid = np.asarray(roi["labels"]), np.asarray(roi["valid"])
  assert labels[valid].sum() >= 4  # at least the 4 real GT boxes appended as candidates
  for i in range(2):
    real = np.asarray(gt[i, :2])
    for box, label, delta in zip(np.asarray(roi["boxes"][i])[valid[i]], labels[i][valid[i]],
                                 np.asarray(roi["deltas"][i])[valid[i]]):
      ious = box_lib.iou_matrix_np(box[None], real)[0]
      if label:  # a positive's target is a real region it overlaps at IoU >= 0.6
        target = np.asarray(roi_lib.decode_deltas(jnp.asarray(box), jnp.asarray(delta)))
        k = int(np.argmin(np.abs(real - target).sum(-1)))
        np.testing.assert_allclose(target, real[k], atol=1e-4)
        assert ious[k] >= 0.6 - 1e-6
      else:
        assert ious.max() < 0.6 + 1e-6
  boxes, scores, ok = jax.jit(lambda p, im: model.network.apply(
      {"params": p}, im, num_boxes=5, method=model.network.detect))(params, batch["image"])
  assert boxes.shape == (2, 5, 4) and scores.shape == ok.shape == (2, 5)
  boxes, scores, ok = np.asarray(boxes), np.asarray(scores), np.asarray(ok)
  assert ((boxes >= 0) & (boxes <= 1)).all() and (scores[ok] > 0.05).all() and not scores[~ok].any()


def test_fewer_text_proposals_than_regions_decode_only_those():
  """roi_head.text_proposals = 2 < R = 3: the example's regions are all GT for the RoIs, but
  only the first 2 RoI samples are decoded, each against its matched region's caption."""
  import jax

  model, batch, gt, weights, params = _roi_toy(text_proposals=2)
  out, aux = jax.jit(lambda p, b, rng: model.network.apply(
      {"params": p}, b["image"], b["decoder_input_tokens"], prompt_boxes=b["prompt_boxes"],
      region_valid=weights > 0, train=True, rngs={"dropout": rng}))(params, batch,
                                                                  jax.random.key(3))
  assert out["logits"].shape[:3] == (2, 2, 5) and out["points"].shape[:3] == (2, 2, 5)
  np.testing.assert_array_equal(aux["prompt_boxes"], aux["roi"]["boxes"][:, :2])
  assert np.asarray(aux["prompt_valid"]).all()  # 2 real regions each, positives first
  _, metrics = jax.jit(lambda p, b, rng: model.loss_fn(p, b, rng, train=True))(
      params, batch, jax.random.key(3))
  # 2 images x 2 decoded prompts x 5 target tokens, all non-padding and all weighted.
  assert float(metrics["num_text_tokens"]) == 20
  assert np.isfinite(float(metrics["loss"]))
