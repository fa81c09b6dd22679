"""Golden fixtures for the referring, DenseCap and trace metrics, answers worked out by hand."""
import numpy as np
import pytest

from pixel_llm.metrics import (average_precision, box_iou, box_precision_at, densecap_map,
                               mask_ciou, mask_miou, merge_gt_boxes, point_l1, point_l1_per_example,
                               trace_chamfer, trace_dtw)
from pixel_llm.metrics.densecap import LUA_METEOR_THRESHOLDS


# -- referring boxes ------------------------------------------------------------------------------
def test_box_precision_at_half_and_the_exact_half_case():
  gt = [[0, 0, 2, 1], [0, 0, 2, 1], [0, 0, 2, 1], [0, 0, 10, 10]]
  pred = [[0, 0, 1, 1],     # inter 1, union 2 -> IoU exactly 0.5
          [0, 0, 2, 1],     # identical -> 1.0
          [5, 5, 6, 6],     # disjoint -> 0.0
          [0, 0, 10, 6]]    # inter 60, union 100 -> 0.6
  np.testing.assert_allclose(box_iou(pred, gt).diagonal(), [0.5, 1.0, 0.0, 0.6])
  # PixelLLM (default): IoU must be > 0.5, so the exact-0.5 box is a miss -> 2 / 4.
  assert box_precision_at(pred, gt) == 0.5
  # The >= convention counts it -> 3 / 4.
  assert box_precision_at(pred, gt, inclusive=True) == 0.75
  assert box_precision_at(pred, gt, iou=0.7) == 0.25


def test_box_inputs_are_checked():
  with pytest.raises(ValueError, match=r"\[N, 4\]"):
    box_precision_at([[0, 0, 1]], [[0, 0, 1]])
  with pytest.raises(ValueError, match="one predicted box per GT"):
    box_precision_at([[0, 0, 1, 1]], [[0, 0, 1, 1], [0, 0, 1, 1]])


# -- referring masks ------------------------------------------------------------------------------
def test_ciou_and_miou_differ():
  big_gt = np.ones((10, 10), bool)                   # 100 px
  big_pred = np.zeros((10, 10), bool)
  big_pred[:5] = True                                # 50 px inside: I 50, U 100, IoU 0.5
  small_gt = np.zeros((4, 4), bool)
  small_gt[0, 0] = True                              # 1 px
  small_pred = np.zeros((4, 4), bool)                # misses it: I 0, U 1, IoU 0
  preds, gts = [big_pred, small_pred], [big_gt, small_gt]
  # cIoU = (50 + 0) / (100 + 1); mIoU = (0.5 + 0) / 2: the big object dominates cIoU.
  assert mask_ciou(preds, gts) == pytest.approx(50 / 101, abs=1e-12)
  assert mask_miou(preds, gts) == pytest.approx(0.25, abs=1e-12)
  # An empty prediction for an empty GT is perfect in mIoU and neutral in cIoU.
  empty = np.zeros((3, 3), bool)
  assert mask_miou(preds + [empty], gts + [empty]) == pytest.approx(1.5 / 3, abs=1e-12)
  assert mask_ciou(preds + [empty], gts + [empty]) == pytest.approx(50 / 101, abs=1e-12)
  with pytest.raises(ValueError, match="boolean"):
    mask_ciou([big_pred.astype(np.float32)], [big_gt])
  with pytest.raises(ValueError, match="equal shape"):
    mask_miou([small_pred], [big_gt])


# -- DenseCap -------------------------------------------------------------------------------------
def test_merge_gt_boxes_threshold_and_largest_group_first():
  # IoU exactly 0.7 merges (>=), 0.69 does not.
  boxes, caps = merge_gt_boxes([[0, 0, 10, 10], [0, 0, 10, 7]], ["a", "b"])
  np.testing.assert_allclose(boxes, [[0, 0, 10, 8.5]])
  assert caps == [["a", "b"]]
  boxes, caps = merge_gt_boxes([[0, 0, 10, 10], [0, 0, 10, 6.9]], ["a", "b"])
  assert len(boxes) == 2 and caps == [["a"], ["b"]]
  # Heights 10, 8, 6, 5 (same x-range): IoU(A,B) .8, (B,C) .75, (C,D) .833, (A,C) .6, (B,D) .625.
  # Group sizes A 2, B 3, C 3, D 2: the first largest (B) takes {A, B, C}; D stays alone even
  # though it overlaps C by .833 (no transitive closure).
  boxes, caps = merge_gt_boxes([[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 6], [0, 0, 10, 5]],
                               ["a", "b", "c", "d"])
  np.testing.assert_allclose(boxes, [[0, 0, 10, 8], [0, 0, 10, 5]])
  assert caps == [["a", "b", "c"], ["d"]]


def _densecap_fixture():
  gts = {
      # g1, g2 overlap with IoU 90/100 -> merged into [0, 0, 10, 9.5] with both captions.
      "img1": {"boxes": [[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30]],
               "captions": ["red car", "a red car", "green tree"]},
      "img2": {"boxes": [[0, 0, 4, 4]], "captions": ["blue sky"]},
  }  # 3 merged GT boxes in total
  preds = {
      "img1": {"boxes": [[0, 0, 10, 9.5], [0, 0, 10, 9.5], [20, 20, 30, 25]],
               "scores": [0.9, 0.8, 0.7],
               "captions": ["red car", "red car", "green tree"]},
      "img2": {"boxes": [[0, 0, 4, 4], [50, 50, 60, 60]], "scores": [0.85, 0.6],
               "captions": ["yellow sun", "nothing"]},
  }
  return preds, gts


def test_densecap_map_by_hand():
  preds, gts = _densecap_fixture()
  table = {"red car": 0.1, "green tree": 0.3, "yellow sun": 0.0}
  calls = []

  def fake_meteor(candidate, references):
    calls.append((candidate, list(references)))
    return table[candidate]

  out = densecap_map(preds, gts, fake_meteor)
  # Dataset order by score: p1 .9 (img1, IoU 1, ok), p4 .85 (img2, IoU 1, ok),
  # p2 .8 (duplicate of p1: its best GT is taken -> FP), p3 .7 (IoU 50/100 = .5, ok),
  # p5 .6 (overlaps nothing -> FP). Only ok predictions are scored, against merged references.
  assert sorted(calls) == [("green tree", ["green tree"]), ("red car", ["red car", "a red car"]),
                           ("yellow sun", ["blue sky"])]
  assert out["num_gt"] == 3 and out["num_predictions"] == 5
  # Detection, IoU <= .5: TP = [1,1,0,1,0]: precision 1, 1, 2/3, 3/4, 3/5 at recall 1/3, 2/3, 2/3,
  # 1, 1. Recall points r = 0..0.66 (67 of them) reach precision 1, r = 0.67..0.99 (33) reach 3/4:
  # AP = (67 + 33 * 0.75) / 100 = 0.9175. IoU .6 and .7 drop p3: 67 points of 1 -> 0.67.
  assert out["detection_ap"] == pytest.approx({.3: .9175, .4: .9175, .5: .9175, .6: .67, .7: .67})
  assert out["detection_map"] == pytest.approx((3 * 0.9175 + 2 * 0.67) / 5)
  # With METEOR > m: p4 (0.0) never passes. m in {0, .05}: p1 (0.1) and p3 (0.3) pass.
  #   IoU <= .5: TP = [1,0,0,1,0], precision 1, 1/2, 1/3, 1/2, 2/5, recall 1/3, 1/3, 1/3, 2/3, 2/3:
  #   34 points (r <= .33) of 1 + 33 points (r = .34..0.66) of 1/2 -> 0.505. IoU > .5: 0.34.
  # m >= .1: p1 fails (0.1 > 0.1 is false). IoU <= .5: TP = [0,0,0,1,0], best precision 1/4 at
  #   recall 1/3 -> 34 points of 1/4 = 0.085; IoU > .5: nothing -> 0.
  for t in (.3, .4, .5):
    assert out["ap"][(t, 0.0)] == out["ap"][(t, 0.05)] == pytest.approx(0.505)
    for m in (.1, .15, .2, .25):
      assert out["ap"][(t, m)] == pytest.approx(0.085)
  for t in (.6, .7):
    assert out["ap"][(t, 0.0)] == pytest.approx(0.34) and out["ap"][(t, .25)] == 0.0
  assert len(out["ap"]) == 30
  assert out["map"] == pytest.approx((3 * (2 * 0.505 + 4 * 0.085) + 2 * (2 * 0.34)) / 30)
  # The Lua grid (no m = 0 column): (3 * (0.505 + 4 * 0.085) + 2 * 0.34) / 25 = 0.1286.
  lua = densecap_map(preds, gts, lambda c, r: table[c], meteor_thresholds=LUA_METEOR_THRESHOLDS)
  assert lua["map"] == pytest.approx(0.1286) and len(lua["ap"]) == 25
  assert lua["detection_map"] == out["detection_map"]


def test_densecap_detection_only_and_errors():
  preds, gts = _densecap_fixture()
  out = densecap_map(preds, gts, meteor_thresholds=())  # no METEOR, no Java needed
  assert out["map"] is None and out["detection_map"] == pytest.approx(0.8185)
  # Without the GT merge there are 4 GT boxes.
  # p1 [0,0,10,9.5]: IoU with g1 95/100 = .95, with g2 90/95 = .947 -> g1; p2 -> best is g1 again
  # (taken) -> still FP. TP = [1,1,0,1,0] over 4 GT: recall 1/4, 2/4, 2/4, 3/4, 3/4;
  # r <= .5 (51 points) -> 1, r in .51..0.75 (25) -> 3/4, beyond -> 0: AP = (51 + 18.75) / 100.
  no_merge = densecap_map(preds, gts, meteor_thresholds=(), merge_iou=None, iou_thresholds=(.5,))
  assert no_merge["num_gt"] == 4 and no_merge["detection_map"] == pytest.approx(0.6975)
  # An image with GT but no predictions still counts in the recall; duplicates of a perfect box
  # are false positives: TP = [1, 0], recall 1/2 -> 51 points of 1 -> AP .51.
  gts2 = {"a": {"boxes": [[0, 0, 1, 1]], "captions": ["x"]}, "b": gts["img2"]}
  preds2 = {"a": {"boxes": [[0, 0, 1, 1]] * 2, "scores": [1, 0.5], "captions": ["x", "x"]}}
  assert densecap_map(preds2, gts2, meteor_thresholds=(), iou_thresholds=(.5,))[
      "detection_map"] == pytest.approx(0.51)
  with pytest.raises(ValueError, match="without ground truth"):
    densecap_map({"zzz": preds["img1"]}, gts, meteor_thresholds=())
  with pytest.raises(ValueError, match="one of each"):
    densecap_map({"img1": dict(preds["img1"], scores=[1.0])}, gts, meteor_thresholds=())
  with pytest.raises(ValueError, match="no boxes"):
    densecap_map({}, {"a": {"boxes": [], "captions": []}}, meteor_thresholds=())


def test_average_precision_edges():
  assert average_precision(np.array([], bool), 3) == 0.0
  assert average_precision(np.array([True, True]), 2) == 1.0
  # A single FP then a TP for 1 GT: precision 1/2 at recall 1 -> AP 0.5.
  assert average_precision(np.array([False, True]), 1) == 0.5


# -- trace ----------------------------------------------------------------------------------------
def test_point_l1_by_hand():
  size = (100, 200)  # (H, W): x is divided by 200, y by 100
  gt = np.array([[[[20, 10], [60, 50]],      # corners (.1, .1) and (.3, .5)
                  [[0, 0], [0, 0]],          # all zero: no target, ignored
                  [[200, 100], [200, 100]],  # (1, 1)
                  [[10, 10], [10, 10]]],     # padding token (masked out below)
                 [[[0, 0], [0, 0]]] * 4], np.float64)
  pred = np.array([[[40, 10], [999, 999], [0, 0], [999, 999]],
                   [[1, 1]] * 4], np.float64)
  valid = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
  # Token 0: (.2, .1) is (|.1| + 0) / 2 = .05 from the first corner, (.1 + .4) / 2 = .25 from the
  # second -> .05. Token 2: (0, 0) vs (1, 1) -> 1. Row 0: (.05 + 1) / 2 = .525.
  # Row 1 has no target at all: NaN, left out of the mean.
  per = point_l1_per_example(pred, gt, valid, size)
  assert per[0] == pytest.approx(0.525) and np.isnan(per[1])
  assert point_l1(pred, gt, valid, size) == pytest.approx(0.525)
  # K = 2 points per token: token 0 points (.2, .1) -> .05 and (.3, .5) -> 0: mean .025.
  pred_k = np.stack([pred, pred], axis=2)
  pred_k[0, 0, 1] = [60, 50]
  assert point_l1_per_example(pred_k, gt, valid, size)[0] == pytest.approx((0.025 + 1) / 2)
  with pytest.raises(ValueError, match="no token"):
    point_l1(pred[1:], gt[1:])


def test_trace_distances_by_hand():
  p = [[0, 0], [0.5, 0], [1, 0]]
  q = [[0, 0], [1, 0]]
  # Costs |dx| / 2: p->q nearest 0, .25, 0 (mean 1/12); q->p nearest 0, 0 -> chamfer 1/24.
  assert trace_chamfer(p, q) == pytest.approx(1 / 24)
  # DTW: best path (0,0) (1,0|1) (2,1) costs 0 + .25 + 0 over 3 steps.
  assert trace_dtw(p, q) == pytest.approx(0.25 / 3)
  # Reversing p keeps the chamfer distance but DTW sees the wrong order:
  # (2,0) .5 + (1,*) .25 + (0,1) .5 = 1.25 over 3 steps.
  assert trace_chamfer(p[::-1], q) == pytest.approx(1 / 24)
  assert trace_dtw(p[::-1], q) == pytest.approx(1.25 / 3)
  assert trace_chamfer(q, q) == 0.0 and trace_dtw(q, q) == 0.0
  with pytest.raises(ValueError, match=r"\[S, 2\]"):
    trace_dtw([], q)
