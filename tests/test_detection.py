"""Tests for pixel_llm.detection: boxes, NMS, proposal matching and CenterNet targets / losses."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixel_llm.detection import boxes as box_lib
from pixel_llm.detection import centernet
from pixel_llm.detection import matching
from pixel_llm.detection import nms as nms_lib


def _random_boxes(rng, n, size=100.0):
  xy = rng.uniform(0, size, (n, 2))
  wh = rng.uniform(2, size / 3, (n, 2))
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


# ---------------------------------------------------------------------------------------- boxes


def test_ltrb_hand_case_and_roundtrip():
  ltrb = box_lib.encode_ltrb(jnp.array([5.0, 5.0]), jnp.array([2.0, 3.0, 10.0, 7.0]))
  np.testing.assert_allclose(ltrb, [3.0, 2.0, 5.0, 2.0])
  rng = np.random.default_rng(0)
  boxes = _random_boxes(rng, 50)
  points = rng.uniform(0, 120, (50, 2)).astype(np.float32)  # inside or outside: both invert
  back = box_lib.decode_ltrb(points, box_lib.encode_ltrb(points, boxes))
  np.testing.assert_allclose(back, boxes, atol=1e-4)


def test_iou_and_giou_hand_cases():
  a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]], np.float32)
  b = np.array([[1, 1, 3, 3], [2, 0, 3, 1], [0, 0, 2, 2]], np.float32)
  # [0,0,2,2] vs [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7; [0,0,1,1] in [0,0,2,2]: 1 / 4.
  expected = np.array([[1 / 7, 0.0, 1.0], [0.0, 0.0, 0.25]])
  np.testing.assert_allclose(box_lib.iou_matrix_np(a, b), expected, rtol=1e-6)
  np.testing.assert_allclose(box_lib.iou_matrix(a, b), expected, rtol=1e-6)
  # GIoU: overlapping pair hull 3x3 = 9 -> 1/7 - (9 - 7)/9; disjoint unit boxes 2 apart: hull 3,
  # union 2 -> 0 - 1/3; identical -> 1.
  pairs_a = np.array([[0, 0, 2, 2], [0, 0, 1, 1], [1, 2, 3, 4]], np.float32)
  pairs_b = np.array([[1, 1, 3, 3], [2, 0, 3, 1], [1, 2, 3, 4]], np.float32)
  expected_g = [1 / 7 - 2 / 9, -1 / 3, 1.0]
  np.testing.assert_allclose(box_lib.giou_np(pairs_a, pairs_b), expected_g, rtol=1e-6)
  np.testing.assert_allclose(box_lib.giou(pairs_a, pairs_b), expected_g, rtol=1e-6)


def test_degenerate_boxes_give_zero_not_nan():
  z = np.zeros((1, 4), np.float32)
  assert box_lib.iou_matrix_np(z, z)[0, 0] == 0.0
  assert float(box_lib.giou(z[0], z[0])) == 0.0


def test_pixel_conversion_clip_and_yxyx():
  norm = np.array([[0.1, 0.2, 0.5, 1.0]], np.float32)
  pix = box_lib.to_pixels(norm, height=200, width=100)
  np.testing.assert_allclose(pix, [[10, 40, 50, 200]], rtol=1e-6)
  np.testing.assert_allclose(box_lib.to_normalized(pix, 200, 100), norm, rtol=1e-6)
  np.testing.assert_allclose(box_lib.clip_boxes(jnp.array([[-5.0, 3.0, 120.0, 250.0]]), 200, 100),
                             [[0, 3, 100, 200]])
  np.testing.assert_array_equal(box_lib.yxyx_to_xyxy(np.array([1, 2, 3, 4])), [2, 1, 4, 3])
  with pytest.raises(ValueError, match="4 coordinates"):
    box_lib.iou_matrix_np(np.zeros((2, 3)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match="positive"):
    box_lib.to_pixels(norm, 0, 100)


# ------------------------------------------------------------------------------------------ NMS


def _hand_nms_case():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], np.float32)
  scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
  return boxes, scores


@pytest.mark.parametrize("threshold,expected", [
    # Order by score: 3, 0, 1, 2. IoU(3, 0) = 90 / 100 = 0.9; IoU(3, 1) = 72 / 118 = 0.61;
    # IoU(0, 1) = 81 / 119 = 0.68; box 2 overlaps nothing.
    (0.5, [3, 2]),
    (0.65, [3, 1, 2]),
    (0.9, [3, 0, 1, 2]),  # IoU exactly 0.9 is not > 0.9, so box 0 survives
])
def test_nms_hand_example(threshold, expected):
  boxes, scores = _hand_nms_case()
  np.testing.assert_array_equal(nms_lib.nms_np(boxes, scores, threshold), expected)
  idx, mask = nms_lib.nms_fixed(jnp.asarray(boxes), jnp.asarray(scores), threshold, max_output=4)
  np.testing.assert_array_equal(np.asarray(idx)[np.asarray(mask)], expected)
  assert int(mask.sum()) == len(expected)
  np.testing.assert_array_equal(np.asarray(idx)[~np.asarray(mask)], 0)


def test_nms_fixed_matches_numpy_on_random_boxes():
  rng = np.random.default_rng(1)
  boxes = _random_boxes(rng, 120)
  scores = rng.choice(np.linspace(0, 1, 30), 120).astype(np.float32)  # many exact ties
  valid = rng.uniform(size=120) > 0.2
  for threshold in (0.3, 0.5, 0.7):
    ref = np.flatnonzero(valid)[nms_lib.nms_np(boxes[valid], scores[valid], threshold)]
    idx, mask = nms_lib.nms_fixed(boxes, scores, threshold, 150, valid=jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(mask)], ref)
  # max_output truncates to the best kept boxes; pre_nms_topk equals NMS on the top-k subset.
  ref = nms_lib.nms_np(boxes, scores, 0.5)
  idx, mask = nms_lib.nms_fixed(boxes, scores, 0.5, 5)
  np.testing.assert_array_equal(idx, ref[:5])
  assert bool(mask.all())
  top = np.argsort(-scores, kind="stable")[:40]
  idx, mask = nms_lib.nms_fixed(boxes, scores, 0.5, 40, pre_nms_topk=40)
  np.testing.assert_array_equal(np.asarray(idx)[np.asarray(mask)],
                                top[nms_lib.nms_np(boxes[top], scores[top], 0.5)])


def test_nms_bad_input():
  with pytest.raises(ValueError, match="scores must be"):
    nms_lib.nms_np(np.zeros((3, 4)), np.zeros(2), 0.5)
  with pytest.raises(ValueError, match="iou_threshold"):
    nms_lib.nms_fixed(jnp.zeros((3, 4)), jnp.zeros(3), 1.5, 2)


# ------------------------------------------------------------------------------------- matching


GT = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0]], np.float32)  # last row = padding
PROPOSALS = np.array([
    [0, 0, 6, 10],    # IoU with GT 0 exactly 60 / 100 = 0.6 -> positive
    [0, 0, 5, 10],    # 0.5 -> negative
    [21, 20, 30, 30],  # 0.9 with GT 1
    [50, 50, 60, 60],  # no overlap
    [0, 0, 10, 10],   # exact GT 0, but marked invalid below
], np.float32)


def test_matching_thresholds_numpy():
  m = matching.match_proposals_np(PROPOSALS, GT[:2])
  np.testing.assert_array_equal(m.gt_index, [0, -1, 1, -1, 0])
  np.testing.assert_array_equal(m.positive, [True, False, True, False, True])
  np.testing.assert_allclose(m.iou, [0.6, 0.5, 0.9, 0.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(m.gt_matched, [True, True])
  # With the exact-GT proposal dropped and a stricter threshold, GT 0 goes unmatched.
  m = matching.match_proposals_np(PROPOSALS[:4], GT[:2], threshold=0.61)
  np.testing.assert_array_equal(m.gt_index, [-1, -1, 1, -1])
  np.testing.assert_array_equal(m.gt_matched, [False, True])


def test_matching_jnp_with_padding_and_targets():
  proposal_valid = jnp.array([True, True, True, True, False])
  gt_valid = jnp.array([True, True, False])
  m = matching.match_proposals(jnp.asarray(PROPOSALS), jnp.asarray(GT),
                               proposal_valid=proposal_valid, gt_valid=gt_valid)
  np.testing.assert_array_equal(m.gt_index, [0, -1, 1, -1, -1])
  np.testing.assert_array_equal(m.positive, [True, False, True, False, False])
  np.testing.assert_array_equal(m.gt_matched, [True, True, False])
  assert float(m.iou[0]) == pytest.approx(0.6)
  classes, captions = matching.gather_targets(
      m, jnp.array([3, 7, 0]), jnp.array([[5, 6, 1], [8, 1, 0], [0, 0, 0]]))
  np.testing.assert_array_equal(classes, [3, 0, 7, 0, 0])
  np.testing.assert_array_equal(captions, [[5, 6, 1], [0, 0, 0], [8, 1, 0], [0, 0, 0], [0, 0, 0]])
  # The NumPy path agrees on the valid part.
  ref = matching.match_proposals_np(PROPOSALS[:4], GT[:2])
  np.testing.assert_array_equal(np.asarray(m.gt_index[:4]), ref.gt_index)


def test_caption_prompts_are_matched_proposals_and_the_gt_boxes():
  proposal_valid = jnp.array([[True, True, True, True, False]])
  gt_valid = jnp.array([[True, True, False]])
  args = (jnp.asarray(PROPOSALS)[None], proposal_valid, jnp.asarray(GT)[None], gt_valid)
  # Positives in candidate order: proposal 0 (GT 0, IoU 0.6), proposal 2 (GT 1), then the
  # appended GT rows 0 and 1; the invalid proposal and the padding GT row never count.
  boxes, index, valid = matching.select_caption_prompts(*args, num_prompts=5)
  np.testing.assert_array_equal(boxes[0, :4], np.stack([PROPOSALS[0], PROPOSALS[2], GT[0], GT[1]]))
  np.testing.assert_array_equal(index, [[0, 1, 0, 1, 0]])
  np.testing.assert_array_equal(valid, [[True, True, True, True, False]])  # no 5th positive
  # At random: two of the four positives, each with its own GT index.
  positives = {tuple(PROPOSALS[0]): 0, tuple(PROPOSALS[2]): 1, tuple(GT[0]): 0, tuple(GT[1]): 1}
  seen = set()
  for seed in range(6):
    boxes, index, valid = matching.select_caption_prompts(*args, num_prompts=2,
                                                          rng=jax.random.key(seed))
    assert np.all(valid)
    for box, i in zip(np.asarray(boxes[0]), np.asarray(index[0])):
      assert positives[tuple(box)] == i
      seen.add(tuple(box))
  assert len(seen) > 2  # the order among positives varies with the key
  with pytest.raises(ValueError, match="num_prompts"):
    matching.select_caption_prompts(*args, num_prompts=9)


def test_matching_bad_input():
  with pytest.raises(ValueError, match="proposals must be"):
    matching.match_proposals_np(np.zeros((3, 5)), GT)
  with pytest.raises(ValueError, match="M >= 1"):
    matching.match_proposals(jnp.zeros((3, 4)), jnp.zeros((0, 4)))


# ------------------------------------------------------------------------------------ CenterNet


SHAPES = ((16, 16), (8, 8), (4, 4), (2, 2))
STRIDES = (8, 16, 32, 64)


def _level_slice(level):
  start = sum(h * w for h, w in SHAPES[:level])
  h, w = SHAPES[level]
  return slice(start, start + h * w), (h, w)


def test_heatmap_targets_peak_radius_and_levels():
  # Box 40x32 (area 1280) centred at (60, 56); half diagonal sqrt(40^2 + 32^2) / 2 = 25.6 -> only
  # level 0 (range 0..40). Second row is padding and must not contribute.
  gt = jnp.array([[40.0, 40.0, 80.0, 72.0], [0.0, 0.0, 128.0, 128.0]])
  t = centernet.centernet_targets(gt, jnp.array([True, False]), SHAPES, STRIDES)
  t = centernet.Targets(*map(np.asarray, t))
  sl0, (h0, w0) = _level_slice(0)
  hm0 = np.asarray(t.heatmap[sl0]).reshape(h0, w0)
  # Centre (60, 56) lies in cell (row 7, col 7) whose grid point is (60, 60): the peak, exactly 1.
  assert hm0[7, 7] == 1.0
  assert np.flatnonzero(t.pos_mask).tolist() == [7 * 16 + 7]
  # Radius^2 = 2 * (0.2 / 1.8)^2 * 1280 = 2560 / 81. Grid point (68, 60) is at d^2 = 8^2 + 4^2 = 80.
  # exp(-80 * 81 / 2560) = exp(-2.53125) = 0.0795595
  assert hm0[7, 8] == pytest.approx(0.0795595, rel=1e-5)
  # CenterNet2 draws the heatmap on every level; the level-1 peak is 1 but not a positive.
  sl1, (h1, w1) = _level_slice(1)
  assert np.asarray(t.heatmap[sl1]).reshape(h1, w1)[3, 3] == 1.0
  assert not bool(t.pos_mask[sl1].any())
  # Regression: the 3x3 cells around the peak, all inside the box, only on level 0.
  assert int(t.reg_mask.sum()) == 9 and int(t.reg_mask[sl0].sum()) == 9
  reg0 = np.asarray(t.reg[sl0]).reshape(h0, w0, 4)
  np.testing.assert_allclose(reg0[7, 7], [20 / 8, 20 / 8, 20 / 8, 12 / 8])
  np.testing.assert_allclose(reg0[6, 8], [28 / 8, 12 / 8, 12 / 8, 20 / 8])  # point (68, 52)


def test_min_radius_and_level_assignment():
  # An 8x8 box: 2 * 64 / 81 < 16, so the radius is the minimum 4.
  np.testing.assert_allclose(centernet.gaussian_radius2(jnp.array([[0.0, 0.0, 8.0, 8.0]])), [16.0])
  # Half diagonals: 40x32 -> 25.6 (level 0); 60x36 -> sqrt(4896) / 2 = 34.99, inside both 0..40 and
  # 32..80 (the ranges overlap); 400x0 -> 200 (only the open-ended last level).
  boxes = jnp.array([[0, 0, 40, 32], [0, 0, 60, 36], [0, 0, 400, 0]], jnp.float32)
  np.testing.assert_array_equal(centernet.assign_levels(boxes, centernet.default_size_ranges(4)),
                                [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]])
  assert centernet.default_size_ranges(4)[-1] == (128, 50000)
  with pytest.raises(ValueError, match="size ranges"):
    centernet.centernet_targets(boxes, jnp.ones(3, bool), SHAPES, STRIDES,
                                size_ranges=centernet.PIXEL_LLM_SIZE_RANGES)


def test_focal_loss_hand_example():
  # p = sigmoid(logit): 0.5 at the positive, 0.25 and 0.75 at two negatives with y = 0.5 and 0.
  logits = jnp.array([0.0, math.log(1 / 3), math.log(3)])
  targets = jnp.array([1.0, 0.5, 0.0])
  pos_mask = jnp.array([True, False, False])
  pos, neg = centernet.heatmap_focal_loss(logits, targets, pos_mask)
  # pos = -(1 - 0.5)^2 log 0.5 = 0.173287
  assert float(pos) == pytest.approx(0.25 * math.log(2), rel=1e-5)
  # neg = -(0.5^4)(0.25^2) log 0.75 - (1)(0.75^2) log 0.25 = 0.0011237 + 0.7797905
  assert float(neg) == pytest.approx(0.7809142, rel=1e-5)
  _, neg_masked = centernet.heatmap_focal_loss(logits, targets, pos_mask,
                                               location_mask=jnp.array([1.0, 1.0, 0.0]))
  assert float(neg_masked) == pytest.approx(0.0011237, rel=1e-3)


def test_giou_loss_and_total_loss():
  # ltrb (1,1,1,1) vs (2,2,2,2) from one point: a 2x2 box inside a 4x4 one, IoU = GIoU = 0.25.
  pred = jnp.array([[[1.0, 1, 1, 1], [5, 5, 5, 5]]])
  target = jnp.array([[[2.0, 2, 2, 2], [0, 0, 0, 0]]])
  mask = jnp.array([[True, False]])
  assert float(centernet.giou_ltrb_loss(pred, target, mask)) == pytest.approx(0.75)
  targets = centernet.Targets(heatmap=jnp.array([[1.0, 0.0]]), reg=target, reg_mask=mask,
                              pos_mask=jnp.array([[True, False]]))
  logits = jnp.array([[0.0, 0.0]])
  loss, metrics = centernet.centernet_loss(logits, pred, targets)
  # pos 0.25 log 2, neg -(0.5^2) log 0.5 = 0.25 log 2, one positive: 0.5 * 0.5 log 2 + 0.75.
  assert float(loss) == pytest.approx(0.25 * math.log(2) + 0.75, rel=1e-5)
  assert float(metrics["num_pos"]) == 1.0
