"""Trace metrics for Localized Narratives: per-token point L1 and trace-to-trace distances.

Shape legend: B captions (rows), T text tokens, K predicted points per token, G GT points per token
(2 box corners for the LN trace targets), S / R points of a predicted / GT trace.

`point_l1` is the metric of the PixelLLM release (`evaluators.PointEvaluator`, "point_l1"):
coordinates are divided by the image (W, H); the distance of a predicted point to a GT point is the
mean of |dx| and |dy| (L1 / 2); each predicted point takes its *closest* GT point of the same token
(so predicting either corner of the target box is free), and a token's error is the mean over its K
points. A token counts when it is a real token (`valid_mask`) and its GT is not all zero (the
release's "no target" marker, as in the `l1_nonzero` loss). A row's error is the mean over its counted
tokens, the dataset's the mean over rows. Difference from the release: a row with no counted token is
left out here (the release divides 0 by 1e-8 and averages a 0 in).

The LN paper (Pont-Tuset et al., ECCV 2020) defines no trace-to-trace metric, and MITR's LBM (Meng et
al., CVPR 2021) compares per-time-window *boxes* with undocumented windowing (users_formats_metrics.md
§3.6), so for whole narratives we provide two point-sequence distances using the same per-point cost
|p - q|_1 / 2 in normalised coordinates:
  * `trace_chamfer` (default choice): the symmetric mean nearest-point distance
      1/2 (mean_{p in P} min_{q in Q} d(p, q) + mean_{q in Q} min_{p in P} d(p, q)).
    It is the two-sided version of the release's point_l1 (which is the P -> Q half), ignores timing
    and sampling density, and is robust to traces of different lengths: it answers "does the predicted
    trace cover the same places, and only those?".
  * `trace_dtw`: dynamic time warping (Sakoe & Chiba, 1978), the mean per-step cost of the minimum
    total-cost monotone alignment of the two sequences. It also checks the *order* in which regions
    are visited, which matters for narratives (what is said first is looked at first).
"""
from typing import Optional

import numpy as np


def _point_cost(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Mean |dx|, |dy| between every pair: [..., S, 2] x [..., R, 2] -> [..., S, R]."""
  return np.mean(np.abs(a[..., :, None, :] - b[..., None, :, :]), axis=-1)


def point_l1_per_example(pred_points, gt_points, valid_mask=None,
                         image_size=None) -> np.ndarray:
  """Per-row point L1 of the release (module docstring).

  Args:
    pred_points: [B, T, 2] or [B, T, K, 2] predicted (x, y) per token, pixels (or normalised when
      `image_size` is None).
    gt_points: [B, T, G, 2] GT (x, y) points per token, same units; all-zero = no target.
    valid_mask: [B, T] bool/0-1, True for real (non-padding) tokens; None = all.
    image_size: [B, 2] or [2] (H, W) to normalise by; None when already normalised.
  Returns:
    [B] mean error over counted tokens; NaN for a row with no counted token.
  """
  gt = np.asarray(gt_points, np.float64)
  pred = np.asarray(pred_points, np.float64)
  if gt.ndim != 4 or gt.shape[-1] != 2:
    raise ValueError(f"gt_points must be [B, T, G, 2], got {gt.shape}")
  if pred.ndim == 3:
    pred = pred[:, :, None, :]
  if pred.ndim != 4 or pred.shape[:2] != gt.shape[:2] or pred.shape[-1] != 2:
    raise ValueError(f"pred_points must be [B, T, 2] or [B, T, K, 2] matching gt_points {gt.shape}, "
                     f"got {np.shape(pred_points)}")
  mask = np.ones(gt.shape[:2], bool) if valid_mask is None else np.asarray(valid_mask).astype(bool)
  if mask.shape != gt.shape[:2]:
    raise ValueError(f"valid_mask must be [B, T] = {gt.shape[:2]}, got {mask.shape}")
  mask = mask & (gt.max(axis=(-2, -1)) > 0)
  if image_size is not None:
    size = np.asarray(image_size, np.float64).reshape(-1, 2)
    if len(size) not in (1, len(gt)) or np.any(size <= 0):
      raise ValueError(f"image_size must be positive (H, W) per row or one for all, got {size.shape}")
    scale = size[:, ::-1][:, None, None, :]  # (W, H): x is divided by the width
    gt, pred = gt / scale, pred / scale
  dist = _point_cost(pred, gt).min(axis=-1).mean(axis=-1)  # [B, T]
  counted = mask.sum(axis=1)
  total = np.where(mask, dist, 0.0).sum(axis=1)
  return np.where(counted > 0, total / np.maximum(counted, 1), np.nan)


def point_l1(pred_points, gt_points, valid_mask=None, image_size=None) -> float:
  """Mean over rows of `point_l1_per_example` (rows without a counted token are skipped).

  Raises ValueError when no row has a counted token.
  """
  per = point_l1_per_example(pred_points, gt_points, valid_mask, image_size)
  if np.all(np.isnan(per)):
    raise ValueError("no token has a trace target (all masked or all-zero GT points)")
  return float(np.nanmean(per))


def _trace(points, name: str) -> np.ndarray:
  arr = np.asarray(points, np.float64)
  if arr.ndim != 2 or arr.shape[1] != 2 or not len(arr):
    raise ValueError(f"{name} must be a non-empty [S, 2] array of normalised (x, y), got {arr.shape}")
  return arr


def trace_chamfer(pred_trace, gt_trace) -> float:
  """Symmetric mean nearest-point distance between traces [S, 2] and [R, 2] (normalised)."""
  cost = _point_cost(_trace(pred_trace, "pred_trace"), _trace(gt_trace, "gt_trace"))
  return float(0.5 * (cost.min(axis=1).mean() + cost.min(axis=0).mean()))


def trace_dtw(pred_trace, gt_trace, window: Optional[int] = None) -> float:
  """DTW distance between traces [S, 2] and [R, 2]: mean step cost of the best alignment.

  The alignment is the monotone, continuous path from (0, 0) to (S-1, R-1) of minimum total cost;
  its total is divided by its number of steps (ties between equal-cost paths go to the shorter one).
  `window`: optional Sakoe-Chiba band |i - j * S / R| <= window (None: unconstrained).
  """
  cost = _point_cost(_trace(pred_trace, "pred_trace"), _trace(gt_trace, "gt_trace"))
  s, r = cost.shape
  total = np.full((s + 1, r + 1), np.inf)
  steps = np.zeros((s + 1, r + 1), np.int64)
  total[0, 0] = 0.0
  for i in range(1, s + 1):
    for j in range(1, r + 1):
      if window is not None and abs((i - 1) - (j - 1) * s / r) > window:
        continue
      # (total, steps) tuples compare by total first, then prefer fewer steps.
      best = min((total[i - 1, j - 1], steps[i - 1, j - 1]), (total[i - 1, j], steps[i - 1, j]),
                 (total[i, j - 1], steps[i, j - 1]))
      total[i, j] = best[0] + cost[i - 1, j - 1]
      steps[i, j] = best[1] + 1
  if not np.isfinite(total[s, r]):
    raise ValueError(f"window={window} admits no alignment of {s} and {r} points; widen it")
  return float(total[s, r] / steps[s, r])
