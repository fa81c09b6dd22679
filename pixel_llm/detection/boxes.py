"""Box geometry for the dense-captioning proposal path (GRiT / CenterNet2, anchor section 2.11).

Every box here is corner format xyxy = (x0, y0, x1, y1) with x0 <= x1, y0 <= y1, either in pixels of
the resized model input or normalised to [0, 1] (`to_pixels` / `to_normalized` convert; the
Visual Genome records store normalised yxyx, `yxyx_to_xyxy` reorders them).

CenterNet regresses a box from a grid point p = (px, py) as its four distances ltrb =
(px - x0, py - y0, x1 - px, y1 - py) (`encode_ltrb` / `decode_ltrb`); the head predicts them in
units of the level's stride.

Which version to use: the plain-named functions are jnp (jitted, used on the training path and
inside `decode_proposals`); the `*_np` twins are NumPy float64 for host-side inference and
evaluation. Both share one implementation, so they agree to float rounding. The converters
(`to_pixels`, `to_normalized`, `clip_boxes`, `yxyx_to_xyxy`) follow their input's array type.

Shape legend: N, M box counts; `...` any leading dims.
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any


def _check_boxes(boxes: Array, name: str = "boxes") -> None:
  if boxes.shape[-1] != 4:
    raise ValueError(f"{name} must end in 4 coordinates (x0, y0, x1, y1); got shape "
                     f"{tuple(boxes.shape)}.")


def _area(xp, boxes: Array) -> Array:
  return (xp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
          * xp.maximum(boxes[..., 3] - boxes[..., 1], 0.0))


def _pairwise_iou_union(xp, a: Array, b: Array) -> tuple[Array, Array]:
  """a: [N, 4], b: [M, 4] -> (iou [N, M], union [N, M])."""
  lt = xp.maximum(a[:, None, :2], b[None, :, :2])
  rb = xp.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = xp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = _area(xp, a)[:, None] + _area(xp, b)[None, :] - inter
  # Degenerate pairs (both boxes empty) get IoU 0 instead of 0/0.
  iou = inter / xp.where(union > 0, union, 1.0)
  return iou, union


def _iou_matrix(xp, a: Array, b: Array) -> Array:
  _check_boxes(a, "a")
  _check_boxes(b, "b")
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(f"iou_matrix takes a [N, 4] and b [M, 4]; got {a.shape} and {b.shape}.")
  return _pairwise_iou_union(xp, a, b)[0]


@jax.jit
def iou_matrix(a: Array, b: Array) -> jnp.ndarray:
  """jnp pairwise IoU: a float[N, 4], b float[M, 4] -> float[N, M] (0 where the union is 0)."""
  return _iou_matrix(jnp, jnp.asarray(a), jnp.asarray(b))


def iou_matrix_np(a: Array, b: Array) -> np.ndarray:
  """NumPy float64 twin of `iou_matrix`: [N, 4], [M, 4] -> [N, M]."""
  return _iou_matrix(np, np.asarray(a, np.float64), np.asarray(b, np.float64))


def _giou_pairs(xp, a: Array, b: Array) -> Array:
  lt = xp.maximum(a[..., :2], b[..., :2])
  rb = xp.minimum(a[..., 2:], b[..., 2:])
  wh = xp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = _area(xp, a) + _area(xp, b) - inter
  iou = inter / xp.where(union > 0, union, 1.0)
  hull_wh = xp.maximum(xp.maximum(a[..., 2:], b[..., 2:]) - xp.minimum(a[..., :2], b[..., :2]), 0.0)
  hull = hull_wh[..., 0] * hull_wh[..., 1]
  return iou - (hull - union) / xp.where(hull > 0, hull, 1.0)


@jax.jit
def giou(a: Array, b: Array) -> jnp.ndarray:
  """jnp generalised IoU of aligned pairs (Rezatofighi et al. 2019): a, b float[..., 4] -> [...].

  GIoU = IoU - (hull - union) / hull, in [-1, 1].
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  _check_boxes(a, "a")
  _check_boxes(b, "b")
  return _giou_pairs(jnp, a, b)


def giou_np(a: Array, b: Array) -> np.ndarray:
  """NumPy float64 twin of `giou`: a, b [..., 4] -> [...]."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  _check_boxes(a, "a")
  _check_boxes(b, "b")
  return _giou_pairs(np, a, b)


@jax.jit
def from_corners(points: Array) -> jnp.ndarray:
  """Two (x, y) corners in either order, float[..., 2, 2] -> the box float32[..., 4] xyxy they
  span (the location head's K = 2 points of a referring box, or their targets)."""
  points = jnp.asarray(points, jnp.float32)
  return jnp.concatenate([points.min(-2), points.max(-2)], -1)


def encode_ltrb(points: Array, boxes: Array) -> jnp.ndarray:
  """Distances from points to box sides: points float[..., 2] (x, y), boxes float[..., 4] ->
  ltrb float[..., 4] = (px - x0, py - y0, x1 - px, y1 - py); negative where p is outside."""
  points, boxes = jnp.asarray(points), jnp.asarray(boxes)
  _check_boxes(boxes)
  return jnp.concatenate([points - boxes[..., :2], boxes[..., 2:] - points], axis=-1)


@jax.jit
def decode_ltrb(points: Array, ltrb: Array) -> jnp.ndarray:
  """Inverse of `encode_ltrb`: points float[..., 2], ltrb float[..., 4] -> boxes float[..., 4]."""
  points, ltrb = jnp.asarray(points), jnp.asarray(ltrb)
  _check_boxes(ltrb, "ltrb")
  return jnp.concatenate([points - ltrb[..., :2], points + ltrb[..., 2:]], axis=-1)


def _scale(height: float, width: float) -> tuple[float, float, float, float]:
  if height <= 0 or width <= 0:
    raise ValueError(f"Image size must be positive; got height={height}, width={width}.")
  return (width, height, width, height)


def to_pixels(boxes: Array, height: float, width: float) -> Array:
  """Normalised [0, 1] xyxy -> pixel xyxy: [..., 4] -> [..., 4] (NumPy or jnp, follows input)."""
  _check_boxes(boxes)
  xp = np if isinstance(boxes, np.ndarray) else jnp
  return boxes * xp.asarray(_scale(height, width), dtype=boxes.dtype)


def to_normalized(boxes: Array, height: float, width: float) -> Array:
  """Pixel xyxy -> normalised [0, 1] xyxy: [..., 4] -> [..., 4] (NumPy or jnp, follows input)."""
  _check_boxes(boxes)
  xp = np if isinstance(boxes, np.ndarray) else jnp
  return boxes / xp.asarray(_scale(height, width), dtype=boxes.dtype)


def clip_boxes(boxes: Array, height: float, width: float) -> Array:
  """Clips xyxy pixel boxes to the image [0, width] x [0, height]: [..., 4] -> [..., 4]."""
  _check_boxes(boxes)
  xp = np if isinstance(boxes, np.ndarray) else jnp
  w, h = float(width), float(height)
  lo = xp.asarray([0.0, 0.0, 0.0, 0.0], dtype=boxes.dtype)
  hi = xp.asarray([w, h, w, h], dtype=boxes.dtype)
  return xp.clip(boxes, lo, hi)


def yxyx_to_xyxy(boxes: Array) -> Array:
  """Reorders (y0, x0, y1, x1) -> (x0, y0, x1, y1): [..., 4] -> [..., 4]."""
  _check_boxes(boxes)
  return boxes[..., [1, 0, 3, 2]]
