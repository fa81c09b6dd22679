"""Greedy non-maximum suppression, NumPy (inference) and fixed-size jnp (inside jit).

CenterNet2's proposal stage (anchor section 2.11) keeps the top `pre_nms_topk` boxes by score, runs
class-agnostic NMS at IoU 0.9 and keeps `post_nms_topk`. Greedy NMS visits boxes by decreasing score
and drops every later box whose IoU with a kept box is strictly greater than `iou_threshold`
(torchvision's convention). Equal scores keep the lower index first in both versions, so
`nms_fixed` returns exactly the kept set of `nms_np`, padded to a static size with a validity mask
(IoU is float32 in `nms_fixed` and float64 in `nms_np`, so a pair whose IoU lies within float32
rounding of the threshold could in principle be decided differently).

Shape legend: N candidate boxes, K kept slots (static).
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pixel_llm.detection import boxes as box_lib

Array = Any


def _check(boxes: Array, scores: Array, iou_threshold: float) -> None:
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must be [N, 4] xyxy; got shape {tuple(boxes.shape)}.")
  if scores.shape != boxes.shape[:1]:
    raise ValueError(f"scores must be [N] = {boxes.shape[:1]}; got {tuple(scores.shape)}.")
  if not 0.0 <= iou_threshold <= 1.0:
    raise ValueError(f"iou_threshold must be in [0, 1]; got {iou_threshold}.")


def nms_np(boxes: Array, scores: Array, iou_threshold: float,
           max_output: int | None = None) -> np.ndarray:
  """NumPy greedy NMS.

  Args:
    boxes: float[N, 4] xyxy.
    scores: float[N].
    iou_threshold: a box is dropped when its IoU with a kept box is > this.
    max_output: keep at most this many (all when None).

  Returns:
    int64[K'] indices into `boxes` of the kept boxes, by decreasing score.
  """
  boxes = np.asarray(boxes, np.float64)
  scores = np.asarray(scores, np.float64)
  _check(boxes, scores, iou_threshold)
  order = np.argsort(-scores, kind="stable")
  iou = box_lib.iou_matrix_np(boxes, boxes)
  suppressed = np.zeros(len(boxes), bool)
  keep = []
  for i in order:
    if suppressed[i]:
      continue
    keep.append(i)
    if max_output is not None and len(keep) >= max_output:
      break
    suppressed |= iou[i] > iou_threshold
  return np.asarray(keep, np.int64)


def nms_fixed(boxes: jax.Array, scores: jax.Array, iou_threshold: float, max_output: int, *,
              valid: jax.Array | None = None,
              pre_nms_topk: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Static-shape greedy NMS (jit/vmap-able), same kept set as `nms_np` on the valid boxes.

  Candidates are first cut to the `pre_nms_topk` best scores (all when None); the suppression is a
  sequential scan over them with an [N', N'] IoU matrix, so keep N' to a few thousand.

  Args:
    boxes: float[N, 4] xyxy.
    scores: float[N].
    iou_threshold: a box is dropped when its IoU with a kept box is > this (a Python float).
    max_output: K, the static number of output slots.
    valid: bool[N]; invalid boxes (padding, below a score threshold) are never kept.
    pre_nms_topk: static N' <= N.

  Returns:
    (indices int32[K] into `boxes`, by decreasing score; mask bool[K], True for real entries).
    Padded slots hold index 0 and mask False.
  """
  _check(boxes, scores, iou_threshold)
  n = boxes.shape[0]
  if max_output <= 0:
    raise ValueError(f"max_output must be positive; got {max_output}.")
  valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
  if valid.shape != (n,):
    raise ValueError(f"valid must be [N] = ({n},); got {valid.shape}.")
  k = n if pre_nms_topk is None else min(int(pre_nms_topk), n)
  # The threshold is traced, so sweeping it does not recompile.
  return _nms_fixed_jit(jnp.asarray(boxes), jnp.asarray(scores), valid,
                        jnp.float32(iou_threshold), int(max_output), k)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _nms_fixed_jit(boxes, scores, valid, iou_threshold, max_output, k):
  # Invalid boxes sort last; among equal scores lax.top_k keeps the lower index first, like the
  # stable argsort of `nms_np`.
  ranked = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
  _, order = jax.lax.top_k(ranked, k)
  cand = boxes[order].astype(jnp.float32)
  cand_valid = valid[order]
  over = box_lib.iou_matrix(cand, cand) > iou_threshold

  def step(i, keep):
    # Only earlier entries can already be kept, so this is "suppressed by a better kept box".
    hit = jnp.any(keep & over[:, i])
    return keep.at[i].set(cand_valid[i] & ~hit)

  keep = jax.lax.fori_loop(0, k, step, jnp.zeros((k,), bool))
  slots = jnp.nonzero(keep, size=max_output, fill_value=0)[0]
  mask = jnp.arange(max_output) < keep.sum()
  indices = jnp.where(mask, order[slots], 0).astype(jnp.int32)
  return indices, mask
