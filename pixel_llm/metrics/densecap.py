"""Dense-captioning mAP of Johnson et al. ("DenseCap", CVPR 2016), as their evaluation defines it.

The definition is `DenseCaptioningEvaluator` in jcjohnson/densecap `eval/eval_utils.lua` (with
`box_utils.merge_boxes`); PixelLLM's `densecap_evaluator.py` ports it to NumPy. Per image:

1. Merge GT: greedily take the GT box with the most boxes at IoU >= 0.7 (itself included; the first
   one on ties), merge that whole group into one box (the mean box) whose references are all of the
   group's captions, remove the group, repeat until no box is left.
2. Match: in descending score order, each prediction goes to the merged GT with the highest IoU. It is
   "ok" only if that GT is still unused, and then uses it; a later prediction whose best GT is taken
   is a false positive (the evaluation does *not* fall back to the best unused GT, unlike COCO), so
   duplicate detections count as false positives. A prediction overlapping no GT is a false positive.
3. Score: every ok prediction gets a sentence-level METEOR against its GT's references.

Then over the whole dataset, sorted by score: at IoU threshold t and METEOR threshold m a prediction
is a true positive iff it is ok, IoU >= t and METEOR > m (strict). With TP/FP cumulative counts,
recall = TP / (number of merged GT boxes), precision = TP / (TP + FP), and
AP = mean over r in {0, 0.01, ..., 0.99} of max{precision at recall >= r} (0 when none).

mAP is the mean AP over IoU {0.3, 0.4, 0.5, 0.6, 0.7} x METEOR thresholds; detection-only mAP uses
the METEOR threshold -1 (every ok prediction passes) and is the mean over the IoU thresholds.

Conventions that differ between the two implementations (defaults follow the PixelLLM release, whose
numbers the paper reports; the Lua values can be passed in):
  * METEOR thresholds: PixelLLM {0, 0.05, ..., 0.25} (30 pairs); Lua {0.05, ..., 0.25} (25 pairs,
    `LUA_METEOR_THRESHOLDS`).
  * Box size: PixelLLM uses continuous areas (x2 - x1); the Lua code counts pixels (x2 - x1 + 1):
    `pixel_offset=1`.
  * Recall thresholds: PixelLLM i / 100 for i < 100; the Lua loop `for t=0,1,0.01` also visits 100
    values but accumulates 0.01 in floating point (e.g. 0.30000000000000004), which can move a point
    sitting exactly on a recall grid value. We use i / 100.
  * A prediction that overlaps no GT is a false positive everywhere, but the Lua code still runs
    `used[jmax]` with jmax = -1 (in Torch, possibly the last GT); PixelLLM and we leave GTs alone.

Shape legend: N predicted boxes of an image, M GT boxes of an image, G merged GT boxes.
Boxes are [x1, y1, x2, y2] pixels.
"""
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
METEOR_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)  # PixelLLM release
LUA_METEOR_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25)  # Johnson et al.'s eval_utils.lua
MERGE_IOU = 0.7
NUM_RECALL_POINTS = 100

MeteorFn = Callable[[str, Sequence[str]], float]


def _iou_matrix(a: np.ndarray, b: np.ndarray, pixel_offset: float) -> np.ndarray:
  """[N, 4] x [M, 4] -> [N, M] IoU; sizes are x2 - x1 + pixel_offset (Lua: offset 1)."""
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = rb - lt + pixel_offset
  inter = np.where((wh[..., 0] > 0) & (wh[..., 1] > 0), wh[..., 0] * wh[..., 1], 0.0)
  area_a = (a[:, 2] - a[:, 0] + pixel_offset) * (a[:, 3] - a[:, 1] + pixel_offset)
  area_b = (b[:, 2] - b[:, 0] + pixel_offset) * (b[:, 3] - b[:, 1] + pixel_offset)
  union = area_a[:, None] + area_b[None, :] - inter
  return np.where((inter > 0) & (union > 0), inter / np.where(union > 0, union, 1.0), 0.0)


def _boxes(x, name: str) -> np.ndarray:
  arr = np.asarray(x, dtype=np.float64)
  if arr.size == 0:
    return arr.reshape(0, 4)
  if arr.ndim != 2 or arr.shape[1] != 4 or not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} must be a finite [N, 4] array of [x1, y1, x2, y2] boxes, got shape "
                     f"{arr.shape}")
  return arr


def merge_gt_boxes(boxes, captions: Sequence[str], iou: float = MERGE_IOU, *,
                   pixel_offset: float = 0.0) -> tuple[np.ndarray, list[list[str]]]:
  """DenseCap's GT merge (step 1 of the module docstring).

  Args:
    boxes: [M, 4] GT boxes of one image.
    captions: M GT captions.
    iou: boxes of a group overlap its seed box with IoU >= `iou`.
  Returns:
    ([G, 4] merged (mean) boxes, G lists of captions), groups in the order they were formed.
  """
  boxes = _boxes(boxes, "GT boxes")
  if len(captions) != len(boxes):
    raise ValueError(f"{len(boxes)} GT boxes but {len(captions)} GT captions")
  ious = _iou_matrix(boxes, boxes, pixel_offset)
  np.fill_diagonal(ious, 1.0)  # as the Lua code: even a degenerate box forms its own group
  merged, texts = [], []
  while True:
    good = ious >= iou
    counts = good.sum(axis=0)
    seed = int(np.argmax(counts)) if len(counts) else 0
    if not len(counts) or counts[seed] == 0:
      break
    group = np.flatnonzero(good[seed])
    merged.append(boxes[group].mean(axis=0))
    texts.append([captions[i] for i in group])
    ious[group, :] = 0.0
    ious[:, group] = 0.0
  return np.asarray(merged, np.float64).reshape(-1, 4), texts


def average_precision(is_tp: np.ndarray, num_gt: int,
                      num_points: int = NUM_RECALL_POINTS) -> float:
  """Interpolated AP of predictions already sorted by descending score.

  Args:
    is_tp: [N] bool, True for a true positive.
    num_gt: number of GT objects (the recall denominator), > 0.
  Returns:
    mean over r = i / num_points (i < num_points) of the max precision at recall >= r.
  """
  tp = np.cumsum(is_tp, dtype=np.float64)
  if not len(tp):
    return 0.0
  recall = tp / num_gt
  precision = tp / np.arange(1, len(tp) + 1)
  thresholds = np.arange(num_points) / num_points
  reached = recall[None, :] >= thresholds[:, None]
  return float(np.mean(np.max(np.where(reached, precision[None, :], 0.0), axis=1)))


def densecap_map(predictions: Mapping, ground_truths: Mapping, meteor_fn: Optional[MeteorFn] = None,
                 *, iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
                 meteor_thresholds: Sequence[float] = METEOR_THRESHOLDS,
                 merge_iou: Optional[float] = MERGE_IOU, pixel_offset: float = 0.0) -> dict:
  """DenseCap mAP and detection-only mAP over a dataset.

  Args:
    predictions: image id -> {"boxes": [N, 4], "scores": [N], "captions": N strings}.
    ground_truths: image id -> {"boxes": [M, 4], "captions": M strings}; every predicted image id must
      be here (GT images without predictions still count their boxes in the recall).
    meteor_fn: (candidate, references) -> sentence METEOR; by default a `meteor.MeteorScorer` (needs
      Java) is opened for the call. Not called when `meteor_thresholds` is empty.
    iou_thresholds: the IoU thresholds t (TP needs IoU >= t).
    meteor_thresholds: the METEOR thresholds m (TP needs METEOR > m); () for detection only.
    merge_iou: GT merge IoU (None: no merge, each GT box keeps its one caption).
    pixel_offset: 0 for continuous boxes (PixelLLM), 1 for the Lua code's pixel counting.
  Returns:
    {"map": mean AP over the (t, m) grid (None without METEOR thresholds), "detection_map": mean AP
     over t with METEOR ignored, "ap": {(t, m): AP}, "detection_ap": {t: AP}, "num_gt": G total,
     "num_predictions": N total}.
  """
  unknown = set(predictions) - set(ground_truths)
  if unknown:
    raise ValueError(f"predictions for images without ground truth: {sorted(map(str, unknown))[:5]}")
  records = []  # (score, ok, iou, candidate, references), per image in descending score order
  num_gt = 0
  for image_id, gt in ground_truths.items():
    gt_boxes = _boxes(gt["boxes"], f"GT boxes of image {image_id}")
    if merge_iou is None:
      if len(gt["captions"]) != len(gt_boxes):
        raise ValueError(f"image {image_id}: {len(gt_boxes)} GT boxes but "
                         f"{len(gt['captions'])} GT captions")
      refs = [[c] for c in gt["captions"]]
    else:
      gt_boxes, refs = merge_gt_boxes(gt_boxes, gt["captions"], merge_iou,
                                      pixel_offset=pixel_offset)
    num_gt += len(gt_boxes)
    if image_id not in predictions:
      continue
    pred = predictions[image_id]
    boxes = _boxes(pred["boxes"], f"predicted boxes of image {image_id}")
    scores = np.asarray(pred["scores"], np.float64).reshape(-1)
    if not len(scores) == len(boxes) == len(pred["captions"]):
      raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores and "
                       f"{len(pred['captions'])} captions; need one of each per prediction")
    order = np.argsort(-scores, kind="stable")
    ious = _iou_matrix(boxes, gt_boxes, pixel_offset)
    used = np.zeros(len(gt_boxes), bool)
    for i in order:
      best = int(np.argmax(ious[i])) if len(gt_boxes) else -1
      overlap = float(ious[i, best]) if best >= 0 else 0.0
      ok = overlap > 0 and not used[best]
      if ok:
        used[best] = True
      records.append((float(scores[i]), ok, overlap, pred["captions"][i],
                      refs[best] if ok else None))
  if num_gt == 0:
    raise ValueError("the ground truth has no boxes: recall (and so AP) is undefined")

  order = sorted(range(len(records)), key=lambda r: -records[r][0])  # stable across images
  records = [records[r] for r in order]
  ok = np.array([r[1] for r in records], bool)
  overlap = np.array([r[2] for r in records], np.float64)
  meteor_scores = np.full(len(records), -np.inf)
  if meteor_thresholds and ok.any():
    if meteor_fn is None:
      from pixel_llm.metrics.meteor import MeteorScorer  # pylint: disable=g-import-not-at-top
      with MeteorScorer() as scorer:
        meteor_scores[ok] = [scorer(r[3], r[4]) for r in records if r[1]]
    else:
      meteor_scores[ok] = [float(meteor_fn(r[3], r[4])) for r in records if r[1]]

  detection_ap = {t: average_precision(ok & (overlap >= t), num_gt) for t in iou_thresholds}
  ap = {(t, m): average_precision(ok & (overlap >= t) & (meteor_scores > m), num_gt)
        for t in iou_thresholds for m in meteor_thresholds}
  return {
      "map": float(np.mean(list(ap.values()))) if ap else None,
      "detection_map": float(np.mean(list(detection_ap.values()))),
      "ap": ap,
      "detection_ap": detection_ap,
      "num_gt": num_gt,
      "num_predictions": len(records),
  }
