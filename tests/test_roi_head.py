"""Second-stage RoI head: box deltas, RoI sampling, targets, loss and refinement."""
import jax
import jax.numpy as jnp
import numpy as np

from pixel_llm.models import roi_head as roi


def test_deltas_round_trip_and_known_values():
  p = jnp.asarray([[10.0, 20.0, 30.0, 60.0]])
  g = jnp.asarray([[12.0, 18.0, 36.0, 58.0]])
  d = np.asarray(roi.encode_deltas(p, g))[0]
  # centres (20, 40) -> (24, 38), sizes (20, 40) -> (24, 40); weights (10, 10, 5, 5).
  np.testing.assert_allclose(d, [10 * 4 / 20, 10 * -2 / 40, 5 * np.log(24 / 20), 0.0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(roi.decode_deltas(p, roi.encode_deltas(p, g))), g,
                             atol=1e-4)
  # Huge scale deltas are clamped at log(1000 / 16) rather than overflowing.
  big = np.asarray(roi.decode_deltas(p, jnp.asarray([[0.0, 0.0, 1e4, 1e4]])))
  assert np.isfinite(big).all() and big[0, 2] - big[0, 0] <= 20 * 1000 / 16 + 1e-3


def test_sampling_caps_positives_and_fills_with_negatives():
  positive = jnp.asarray([True] * 6 + [False] * 20)
  valid = jnp.asarray([True] * 24 + [False] * 2)
  index, sampled = roi.sample_rois(positive, valid, 16, 0.25, jax.random.PRNGKey(0))
  index, sampled = np.asarray(index), np.asarray(sampled)
  assert sampled.all() and len(set(index.tolist())) == 16
  assert (index < 6).sum() == 4  # 16 * 0.25 positives
  assert (index < 24).all()  # never a padded candidate
  # Fewer candidates than samples: every valid one once, the other slots not sampled.
  index, sampled = roi.sample_rois(jnp.asarray([True, False, False]), jnp.asarray([True] * 3),
                                   8, 0.25, None)
  assert np.asarray(sampled).sum() == 3
  assert sorted(np.asarray(index)[np.asarray(sampled)].tolist()) == [0, 1, 2]


def test_targets_point_each_positive_at_its_gt():
  gt = jnp.asarray([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 100.0, 90.0], [0.0, 0.0, 0.0, 0.0]])
  gt_valid = jnp.asarray([True, True, False])
  props = jnp.asarray([[12.0, 11.0, 49.0, 52.0],   # matches gt 0
                       [58.0, 62.0, 101.0, 88.0],  # matches gt 1
                       [0.0, 60.0, 20.0, 80.0]])   # background
  cand = jnp.concatenate([props, gt])
  cand_valid = jnp.concatenate([jnp.ones(3, bool), gt_valid])
  t = roi.roi_targets(cand, cand_valid, gt, gt_valid, 8, 0.5, None)
  boxes, labels = np.asarray(t["boxes"]), np.asarray(t["labels"])
  valid = np.asarray(t["valid"])
  assert valid.sum() == 5 and labels[valid].sum() == 4  # 2 proposals + 2 appended GT positive
  assert labels[:4].all() and valid[:4].all()  # positives first (the text proposals' order)
  for box, label, delta, v, k in zip(boxes, labels, np.asarray(t["deltas"]), valid,
                                     np.asarray(t["gt_index"])):
    assert k == (0 if box[0] < 55 else 1) if v and label else k == 0
    if v and label:
      target = np.asarray(gt)[k]
      np.testing.assert_allclose(np.asarray(roi.decode_deltas(jnp.asarray(box), jnp.asarray(delta))),
                                 target, atol=1e-3)
    else:
      assert not delta.any()


def test_loss_is_zero_for_confident_exact_predictions_and_counts_only_samples():
  targets = {"labels": jnp.asarray([[1, 0, 0]]), "deltas": jnp.asarray([[[1.0, 2.0, 0.5, 0.0]] + [[0.0] * 4] * 2]),
             "valid": jnp.asarray([[True, True, False]])}
  logits = jnp.asarray([[[-20.0, 20.0], [20.0, -20.0], [20.0, -20.0]]])
  loss, m = roi.roi_loss(logits, targets["deltas"], targets)
  assert float(loss) < 1e-6 and float(m["roi_accuracy"]) == 1.0
  off = targets["deltas"].at[0, 0, 0].add(2.0).at[0, 2].set(9.0)  # the unsampled row is ignored
  loss, m = roi.roi_loss(logits, off, targets)
  np.testing.assert_allclose(float(m["roi_box"]), 2.0 / 2, rtol=1e-6)


def test_head_shapes_and_refinement_keeps_the_refined_boxes_after_nms():
  head = roi.RoIBoxHead(fc_dim=16, output_size=3)
  levels = [jnp.ones((3, 8, 8, 4)), jnp.ones((3, 4, 4, 4))]
  boxes = jnp.tile(jnp.asarray([[[0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 40.0, 48.0]]]), (3, 1, 1))
  params = head.init(jax.random.PRNGKey(0), levels, (8, 16), boxes)
  logits, deltas = head.apply(params, levels, (8, 16), boxes)
  assert logits.shape == (3, 2, 2) and deltas.shape == (3, 2, 4)
  assert params["params"]["fc0"]["kernel"].unbox().shape == (3 * 3 * 4, 16)
  # Two proposals refined onto the same box: NMS keeps the higher-scoring one, clipped.
  props = jnp.asarray([[10.0, 10.0, 30.0, 30.0], [12.0, 12.0, 32.0, 32.0], [0.0, 0.0, 5.0, 5.0]])
  target = jnp.asarray([11.0, 11.0, 70.0, 31.0])
  d = roi.encode_deltas(props, jnp.broadcast_to(target, props.shape))
  logits = jnp.asarray([[0.0, 3.0], [0.0, 1.0], [5.0, -5.0]])  # the third is background
  out_boxes, scores, valid = roi.refine((logits, d), props, jnp.ones(3), jnp.ones(3, bool),
                                        (64.0, 64.0), 3, score_threshold=0.05,
                                        nms_threshold=0.5, mult_proposal_score=False)
  assert np.asarray(valid).tolist() == [True, False, False]
  np.testing.assert_allclose(np.asarray(out_boxes)[0], [11.0, 11.0, 64.0, 31.0], atol=1e-3)
  np.testing.assert_allclose(float(scores[0]), float(jax.nn.softmax(logits[0])[1]), rtol=1e-6)
