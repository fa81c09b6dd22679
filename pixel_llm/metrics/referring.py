"""Referring-expression metrics: box P@1 at IoU 0.5, mask cIoU and mIoU.

Shape legend: N examples (referring expressions), M boxes, H/W mask height/width. Boxes are
[x1, y1, x2, y2] in pixels with continuous coordinates: area = (x2 - x1) * (y2 - y1), no "+1" pixel
(as PixelLLM's evaluator, which works on xywh boxes rescaled to the original image).

Box P@0.5 (a.k.a. Acc@0.5): the fraction of expressions whose top-1 predicted box overlaps the GT box
with IoU above 0.5. The literature disagrees on the boundary (users_formats_metrics.md §3.3): the
PixelLLM release counts a hit only for IoU **strictly > 0.5**, MDETR uses GIoU >= 0.5 and most MLLM
evaluations IoU >= 0.5. We default to PixelLLM's strict rule, since its published numbers are the ones
we compare against; `inclusive=True` gives the >= convention. The two differ only for IoU exactly 0.5,
e.g. GT [0, 0, 2, 1] and prediction [0, 0, 1, 1]: IoU = 1/2 is a miss by default, a hit inclusively.

Mask IoU (users_formats_metrics.md §3.4):
  cIoU ("overall IoU") = sum_n |P_n & G_n| / sum_n |P_n | G_n|   (large objects weigh more)
  mIoU ("gIoU" in LISA-style papers) = mean_n |P_n & G_n| / |P_n | G_n|
PixelLLM computes cIoU as mean(I) / (mean(U) + 1e-5), the same ratio up to that epsilon. A pair of
empty masks (empty prediction for an empty GT) is a perfect answer: IoU 1 in mIoU (as LISA counts it);
it adds nothing to either sum of cIoU, and a dataset whose unions are all empty has cIoU 1.
"""
from typing import Sequence

import numpy as np

PRECISION_IOU = 0.5


def box_iou(boxes1, boxes2) -> np.ndarray:
  """Pairwise IoU of [x1, y1, x2, y2] boxes.

  Args:
    boxes1: [N, 4]; boxes2: [M, 4]. Degenerate boxes (x2 <= x1 or y2 <= y1) have area 0.
  Returns:
    [N, M] IoU in [0, 1]; 0 where the union is empty.
  """
  b1 = _as_boxes(boxes1, "boxes1")
  b2 = _as_boxes(boxes2, "boxes2")
  area1 = _area(b1)
  area2 = _area(b2)
  lt = np.maximum(b1[:, None, :2], b2[None, :, :2])
  rb = np.minimum(b1[:, None, 2:], b2[None, :, 2:])
  wh = np.clip(rb - lt, 0.0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area1[:, None] + area2[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _area(boxes: np.ndarray) -> np.ndarray:
  return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def _as_boxes(boxes, name: str) -> np.ndarray:
  arr = np.asarray(boxes, dtype=np.float64)
  if arr.ndim == 1 and arr.size == 0:
    arr = arr.reshape(0, 4)
  if arr.ndim != 2 or arr.shape[1] != 4:
    raise ValueError(f"{name} must have shape [N, 4] ([x1, y1, x2, y2] pixels), got {arr.shape}")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} contains NaN or inf")
  return arr


def box_precision_at(pred_boxes, gt_boxes, iou: float = PRECISION_IOU, *,
                     inclusive: bool = False) -> float:
  """Top-1 box precision: fraction of examples whose predicted box has IoU > `iou` with the GT.

  Args:
    pred_boxes: [N, 4] the top-1 predicted box per expression.
    gt_boxes: [N, 4] the GT box per expression.
    iou: the IoU threshold (0.5 for P@0.5).
    inclusive: False (default, PixelLLM release): a hit needs IoU strictly above `iou`, so IoU
      exactly 0.5 is a miss. True: IoU >= `iou` counts (MLLM convention).
  Returns:
    Precision in [0, 1].
  """
  pred = _as_boxes(pred_boxes, "pred_boxes")
  gt = _as_boxes(gt_boxes, "gt_boxes")
  if pred.shape != gt.shape:
    raise ValueError(f"need one predicted box per GT box, got {pred.shape} vs {gt.shape}")
  if not len(pred):
    raise ValueError("box_precision_at needs at least one example")
  ious = paired_box_iou(pred, gt)
  hits = ious >= iou if inclusive else ious > iou
  return float(np.mean(hits))


def paired_box_iou(boxes1, boxes2) -> np.ndarray:
  """IoU of boxes1[n] with boxes2[n]: [N, 4], [N, 4] -> [N]."""
  b1 = _as_boxes(boxes1, "boxes1")
  b2 = _as_boxes(boxes2, "boxes2")
  if b1.shape != b2.shape:
    raise ValueError(f"paired boxes need equal shapes, got {b1.shape} vs {b2.shape}")
  lt = np.maximum(b1[:, :2], b2[:, :2])
  rb = np.minimum(b1[:, 2:], b2[:, 2:])
  wh = np.clip(rb - lt, 0.0, None)
  inter = wh[:, 0] * wh[:, 1]
  union = _area(b1) + _area(b2) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _intersections_unions(pred_masks: Sequence,
                          gt_masks: Sequence) -> tuple[np.ndarray, np.ndarray]:
  """Per-example |P & G| and |P | G|: N masks of [H_n, W_n] each (sizes may differ) -> [N], [N]."""
  if len(pred_masks) != len(gt_masks):
    raise ValueError(f"{len(pred_masks)} predicted masks but {len(gt_masks)} GT masks")
  if not len(gt_masks):
    raise ValueError("mask IoU needs at least one example")
  inter, union = [], []
  for n, (p, g) in enumerate(zip(pred_masks, gt_masks)):
    p = np.asarray(p)
    g = np.asarray(g)
    if p.shape != g.shape or p.ndim != 2:
      raise ValueError(f"example {n}: masks must be 2-D [H, W] of equal shape, got {p.shape} vs "
                       f"{g.shape} (resize predictions to the original image first)")
    if p.dtype != bool or g.dtype != bool:
      raise ValueError(f"example {n}: masks must be boolean (threshold logits at 0 first), got "
                       f"{p.dtype} and {g.dtype}")
    inter.append(np.count_nonzero(p & g))
    union.append(np.count_nonzero(p | g))
  return np.asarray(inter, np.float64), np.asarray(union, np.float64)


def mask_ciou(pred_masks: Sequence, gt_masks: Sequence) -> float:
  """Cumulative IoU: total intersection / total union over the dataset (N masks [H_n, W_n] bool)."""
  inter, union = _intersections_unions(pred_masks, gt_masks)
  return float(inter.sum() / union.sum()) if union.sum() > 0 else 1.0


def mask_miou(pred_masks: Sequence, gt_masks: Sequence) -> float:
  """Mean of per-example IoU (N masks [H_n, W_n] bool); empty vs empty counts as IoU 1."""
  inter, union = _intersections_unions(pred_masks, gt_masks)
  return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1.0), 1.0)))
