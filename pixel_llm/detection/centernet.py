"""CenterNet(2) training targets and losses for class-agnostic proposals (anchor section 2.11).

Follows CenterNet2's proposal-only head (Zhou et al. 2021, "Probabilistic two-stage detection"),
which the release's dense-captioning `FpnCenterNet2` uses:

- Grid points of level l (stride s) sit at (j * s + s // 2, i * s + s // 2).
- A GT box is assigned to every level whose size range holds half its diagonal (ranges overlap, so
  a box may live on two levels). `PIXEL_LLM_SIZE_RANGES` are the release's halved ranges.
- Heatmap target, all levels: exp(-min over boxes of d^2 / r^2), where d is the distance from the
  grid point to the box centre (0 at the cell that contains the centre, the "peak") and the squared
  Gaussian radius is r^2 = max(2 * delta^2 * area, min_radius^2), delta = (1 - 0.8) / (1 + 0.8),
  min_radius 4; values < 1e-4 become 0. Like CenterNet2, the heatmap is not restricted to the
  assigned levels; only the positives (peak cells) are.
- Regression target: ltrb distances / stride at the 3x3 cells around the peak that lie inside the
  box, on the assigned levels; a cell claimed by several boxes takes the one of smallest d^2 / r^2.
- Losses: the penalty-reduced focal loss of CenterNet (Zhou et al. 2019, eq. 1; alpha=2, beta=4,
  sigmoid clamped to [1e-4, 1 - 1e-4]) normalised by the number of positives, weighted 0.5; and
  1 - GIoU over the regression cells, normalised by their count, weighted 1.0. Deviation: GIoU has
  no +1 smoothing of CenterNet2's `IOULoss`.

Everything is jnp with static shapes: GT boxes are padded to M rows with a validity mask, and the
per-level maps are flattened and concatenated into L = sum_l H_l * W_l locations.

Shape legend: B batch, M GT boxes (padded), L locations over all levels, H_l/W_l a level's grid.
"""
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pixel_llm.detection import boxes as box_lib

Array = Any

PIXEL_LLM_STRIDES = (8, 16, 32, 64, 128)
PIXEL_LLM_SIZE_RANGES = ((0, 40), (32, 80), (64, 160), (128, 320), (256, 50000))
DELTA = (1.0 - 0.8) / (1.0 + 0.8)
MIN_RADIUS = 4.0
_INF = 1e8


class Targets(NamedTuple):
  """CenterNet targets over the flattened levels (add a leading B under vmap).

  heatmap: float32[L] in [0, 1]; reg: float32[L, 4] ltrb in stride units (0 where reg_mask is
  False); reg_mask: bool[L]; pos_mask: bool[L], the peak cells (heatmap == 1).
  """
  heatmap: Array
  reg: Array
  reg_mask: Array
  pos_mask: Array


def _check_levels(level_shapes: Sequence[tuple[int, int]], strides: Sequence[int],
                  size_ranges: Sequence[tuple[float, float]] | None = None) -> None:
  if len(level_shapes) != len(strides):
    raise ValueError(f"Got {len(level_shapes)} level shapes but {len(strides)} strides.")
  if size_ranges is not None and len(size_ranges) != len(strides):
    raise ValueError(f"Got {len(size_ranges)} size ranges for {len(strides)} levels; give one "
                     "(low, high) half-diagonal range per level.")


def default_size_ranges(num_levels: int) -> tuple[tuple[float, float], ...]:
  """The release's ranges for the first `num_levels` levels, the last one open-ended (so a 4-level
  pyramid still takes every large box)."""
  if not 1 <= num_levels <= len(PIXEL_LLM_SIZE_RANGES):
    raise ValueError(f"num_levels must be in [1, {len(PIXEL_LLM_SIZE_RANGES)}]; got {num_levels}; "
                     "pass size_ranges explicitly.")
  ranges = list(PIXEL_LLM_SIZE_RANGES[:num_levels])
  ranges[-1] = (ranges[-1][0], PIXEL_LLM_SIZE_RANGES[-1][1])
  return tuple(ranges)


def grid_points(level_shapes: Sequence[tuple[int, int]],
                strides: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Static grid of every level, flattened row-major and concatenated.

  Returns (points float32[L, 2] pixel (x, y), stride float32[L], level int32[L]).
  """
  _check_levels(level_shapes, strides)
  points, point_strides, levels = [], [], []
  for l, ((h, w), s) in enumerate(zip(level_shapes, strides)):
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    points.append(np.stack([xs * s + s // 2, ys * s + s // 2], -1).reshape(-1, 2))
    point_strides.append(np.full(h * w, s))
    levels.append(np.full(h * w, l))
  return (np.concatenate(points).astype(np.float32), np.concatenate(point_strides).astype(
      np.float32), np.concatenate(levels).astype(np.int32))


def flatten_levels(maps: Sequence[Array]) -> jax.Array:
  """Per-level maps [B, H_l, W_l, C] -> [B, L, C] in `grid_points` order."""
  return jnp.concatenate([m.reshape(m.shape[0], -1, m.shape[-1]) for m in maps], axis=1)


def assign_levels(gt_boxes: Array, size_ranges: Sequence[tuple[float, float]]) -> jax.Array:
  """Levels whose range holds half the box diagonal: gt_boxes float[M, 4] -> bool[M, num_levels]."""
  return _assign_levels(jnp.asarray(gt_boxes, jnp.float32), jnp.asarray(size_ranges, jnp.float32))


@jax.jit
def _assign_levels(gt_boxes: jax.Array, ranges: jax.Array) -> jax.Array:
  half_diag = jnp.sqrt(((gt_boxes[:, 2:] - gt_boxes[:, :2]) ** 2).sum(-1)) / 2
  return (half_diag[:, None] >= ranges[None, :, 0]) & (half_diag[:, None] <= ranges[None, :, 1])


@functools.partial(jax.jit, static_argnames=("min_radius",))
def gaussian_radius2(gt_boxes: Array, min_radius: float = MIN_RADIUS) -> jax.Array:
  """Squared heatmap radius of CenterNet2: max(2 * DELTA^2 * area, min_radius^2); [M, 4] -> [M]."""
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  area = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
  return jnp.maximum(2.0 * DELTA ** 2 * area, min_radius ** 2)


def centernet_targets(gt_boxes: Array, gt_valid: Array, level_shapes: Sequence[tuple[int, int]],
                      strides: Sequence[int] = PIXEL_LLM_STRIDES,
                      size_ranges: Sequence[tuple[float, float]] | None = None,
                      min_radius: float = MIN_RADIUS) -> Targets:
  """Heatmap and regression targets for one image (vmap over B).

  Args:
    gt_boxes: float[M, 4] xyxy pixels of the model input.
    gt_valid: bool[M], False for padding rows.
    level_shapes: static (H_l, W_l) per level.
    strides: static stride per level.
    size_ranges: static (low, high) half-diagonal range per level; None takes
      `default_size_ranges(len(strides))`.
    min_radius: smallest Gaussian radius in pixels.

  Returns:
    `Targets` over L = sum_l H_l * W_l locations.
  """
  if size_ranges is None:
    size_ranges = default_size_ranges(len(strides))
  _check_levels(level_shapes, strides, size_ranges)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  if gt_boxes.ndim != 2 or gt_boxes.shape[-1] != 4:
    raise ValueError(f"gt_boxes must be [M, 4] xyxy pixels; got {tuple(gt_boxes.shape)}.")
  gt_valid = jnp.asarray(gt_valid, bool)
  if gt_valid.shape != gt_boxes.shape[:1]:
    raise ValueError(f"gt_valid must be [M] = {gt_boxes.shape[:1]}; got {gt_valid.shape}.")
  # One compiled program instead of dozens of eager ops (each eager op compiles on first use).
  return _targets_jit(gt_boxes, gt_valid, tuple(map(tuple, level_shapes)), tuple(strides),
                      tuple(map(tuple, size_ranges)), float(min_radius))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _targets_jit(gt_boxes, gt_valid, level_shapes, strides, size_ranges, min_radius) -> Targets:
  points, point_strides, point_levels = grid_points(level_shapes, strides)
  s = jnp.asarray(point_strides)[:, None, None]  # [L, 1, 1]
  ltrb = box_lib.encode_ltrb(jnp.asarray(points)[:, None, :], gt_boxes[None])  # [L, M, 4]
  centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # [M, 2]
  # Grid point of the cell that holds the centre, per level (CenterNet2's `centers_discret`).
  peak_xy = jnp.floor(centers[None] / s) * s + s / 2  # [L, M, 2]
  offset = jnp.abs(jnp.asarray(points)[:, None, :] - peak_xy)  # [L, M, 2]
  is_peak = jnp.all(offset == 0, axis=-1)
  in_box = ltrb.min(-1) > 0
  center3x3 = jnp.all(offset <= s, axis=-1) & in_box
  cared = assign_levels(gt_boxes, size_ranges)[:, point_levels].T  # [L, M]

  dist2 = ((jnp.asarray(points)[:, None, :] - centers[None]) ** 2).sum(-1)
  dist2 = jnp.where(is_peak, 0.0, dist2)
  weighted = dist2 / gaussian_radius2(gt_boxes, min_radius)[None]
  weighted = jnp.where(gt_valid[None], weighted, _INF)
  heatmap = jnp.exp(-weighted.min(-1))
  heatmap = jnp.where(heatmap < 1e-4, 0.0, heatmap)

  reg_pair = center3x3 & cared & gt_valid[None]
  owner = jnp.argmin(jnp.where(reg_pair, weighted, _INF), axis=-1)  # [L]
  reg_mask = reg_pair.any(-1)
  reg = jnp.take_along_axis(ltrb, owner[:, None, None], axis=1)[:, 0] / s[:, 0]
  reg = jnp.where(reg_mask[:, None], reg, 0.0)
  pos_mask = (is_peak & cared & gt_valid[None]).any(-1)
  return Targets(heatmap, reg, reg_mask, pos_mask)


@functools.partial(jax.jit, static_argnames=("alpha", "beta", "sigmoid_clamp"))
def heatmap_focal_loss(logits: Array, targets: Array, pos_mask: Array, *,
                       location_mask: Array | None = None, alpha: float = 2.0, beta: float = 4.0,
                       sigmoid_clamp: float = 1e-4) -> tuple[jax.Array, jax.Array]:
  """CenterNet's penalty-reduced focal loss, summed (not normalised).

  pos = -sum_{pos} (1 - p)^alpha log p;  neg = -sum_{all} (1 - y)^beta p^alpha log(1 - p), with
  p = clip(sigmoid(logit), clamp, 1 - clamp). Peaks have y = 1, so they add nothing to `neg`.

  Args:
    logits, targets: float[...] heatmap logits and Gaussian targets y in [0, 1].
    pos_mask: bool[...], the peak locations.
    location_mask: bool/float[...], 0 for locations to ignore (e.g. padding); all when None.

  Returns:
    (pos_loss, neg_loss) float32 scalars.
  """
  if logits.shape != targets.shape or logits.shape != pos_mask.shape:
    raise ValueError(f"logits {logits.shape}, targets {targets.shape} and pos_mask "
                     f"{pos_mask.shape} must have the same shape.")
  p = jnp.clip(jax.nn.sigmoid(logits.astype(jnp.float32)), sigmoid_clamp, 1.0 - sigmoid_clamp)
  weight = jnp.ones_like(p) if location_mask is None else location_mask.astype(jnp.float32)
  pos = jnp.log(p) * (1.0 - p) ** alpha * pos_mask.astype(jnp.float32)
  neg = jnp.log(1.0 - p) * p ** alpha * (1.0 - targets.astype(jnp.float32)) ** beta
  return -(pos * weight).sum(), -(neg * weight).sum()


@jax.jit
def giou_ltrb_loss(pred: Array, target: Array, mask: Array) -> jax.Array:
  """Sum over masked cells of 1 - GIoU between boxes given as ltrb from the same point.

  pred, target: float[..., 4] ltrb (same units); mask: bool[...]. Returns a float32 scalar.
  """
  def as_box(ltrb):
    return jnp.concatenate([-ltrb[..., :2], ltrb[..., 2:]], axis=-1).astype(jnp.float32)
  g = box_lib.giou(as_box(pred), as_box(target))
  return ((1.0 - g) * mask.astype(jnp.float32)).sum()


@functools.partial(jax.jit, static_argnames=("hm_weight", "reg_weight"))
def centernet_loss(logits: Array, ltrb: Array, targets: Targets, *, hm_weight: float = 0.5,
                   reg_weight: float = 1.0,
                   location_mask: Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CenterNet proposal loss over a batch.

  Args:
    logits: float[B, L] heatmap logits (`flatten_levels(...)[..., 0]`).
    ltrb: float[B, L, 4] predicted distances in stride units.
    targets: `Targets` with a leading B (vmap `centernet_targets`).
    hm_weight, reg_weight: the release's 0.5 and 1.0.
    location_mask: float/bool[B, L], 0 to ignore a location; all when None.

  Returns:
    (loss scalar, metrics {"heatmap_pos", "heatmap_neg", "reg", "num_pos"}). Both terms are
    normalised by max(count, 1) over the whole batch, like CenterNet2.
  """
  if logits.shape != targets.heatmap.shape or ltrb.shape != targets.reg.shape:
    raise ValueError(f"Predictions logits {logits.shape} / ltrb {ltrb.shape} do not match targets "
                     f"{targets.heatmap.shape} / {targets.reg.shape}; flatten the levels with "
                     "`flatten_levels` in `grid_points` order.")
  pos_loss, neg_loss = heatmap_focal_loss(logits, targets.heatmap, targets.pos_mask,
                                          location_mask=location_mask)
  num_pos = jnp.maximum(targets.pos_mask.sum().astype(jnp.float32), 1.0)
  num_reg = jnp.maximum(targets.reg_mask.sum().astype(jnp.float32), 1.0)
  reg = giou_ltrb_loss(ltrb, targets.reg, targets.reg_mask) / num_reg
  metrics = {"heatmap_pos": pos_loss / num_pos, "heatmap_neg": neg_loss / num_pos, "reg": reg,
             "num_pos": num_pos}
  loss = hm_weight * (metrics["heatmap_pos"] + metrics["heatmap_neg"]) + reg_weight * reg
  return loss, metrics

