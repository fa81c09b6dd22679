"""RoIAlign over a feature pyramid: the pooling of the release's second-stage RoI head.

Detectron2's `ROIAlign(aligned=True)` (He et al. 2017, with the half-pixel correction of
detectron2): a box in input pixels is mapped to a level's grid (divide by the stride, shift by
-0.5 so that pixel centres land on grid points), cut into P x P bins, each bin averaged over
`sampling_ratio`^2 bilinear samples at regular positions. Samples more than one cell outside the
map read 0; samples in the border cell clamp to it (the detectron2 / torchvision kernel's rules).
Detectron2's `ROIPooler` with sampling_ratio=0 picks the samples per bin from the box size
(not jit-able); a fixed count is used here (2, the usual Mask R-CNN setting).

Each box is pooled from one pyramid level chosen by its size (`assign_levels`, the FPN rule of
Lin et al. 2017 as detectron2 writes it): level = floor(4 + log2(sqrt(area) / 224)), clamped to
the pyramid, with level 4 at stride 16. Levels of different sizes are stacked into one padded
array so every box is one gather, whatever its level (static shapes, jit / vmap).

Shape legend: N boxes, L levels, H_l / W_l level grid, C channels, P output bins per side.
"""
import math
from typing import Sequence

import jax
import jax.numpy as jnp

CANONICAL_BOX_SIZE = 224.0
CANONICAL_LEVEL = 4  # the FPN level whose stride is 16


def assign_levels(boxes: jax.Array, strides: Sequence[int]) -> jax.Array:
  """Pyramid level index (0-based into `strides`) of each box: boxes float[..., 4] xyxy pixels
  -> int32[...]. strides: increasing powers of two, e.g. (8, 16, 32, 64)."""
  levels = [int(round(math.log2(s))) for s in strides]
  if any(2 ** l != s for l, s in zip(levels, strides)) or levels != sorted(levels):
    raise ValueError(f"strides must be increasing powers of two; got {tuple(strides)}.")
  size = jnp.sqrt(jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
                  * jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0))
  level = jnp.floor(CANONICAL_LEVEL + jnp.log2(size / CANONICAL_BOX_SIZE + 1e-8))
  return (jnp.clip(level, levels[0], levels[-1]) - levels[0]).astype(jnp.int32)


def _bilinear(stack: jax.Array, shapes: jax.Array, level: jax.Array, y: jax.Array,
              x: jax.Array) -> jax.Array:
  """Samples of stack float[L, H, W, C] at (y, x) float[N, S] on level int32[N] whose real grid
  is shapes int32[L, 2] -> float[N, S, C] (detectron2's boundary rules)."""
  h = shapes[level, 0][:, None].astype(y.dtype)
  w = shapes[level, 1][:, None].astype(x.dtype)
  outside = (y < -1.0) | (y > h) | (x < -1.0) | (x > w)
  y = jnp.clip(y, 0.0, h - 1)
  x = jnp.clip(x, 0.0, w - 1)
  y0 = jnp.floor(y)
  x0 = jnp.floor(x)
  y1 = jnp.minimum(y0 + 1, h - 1)
  x1 = jnp.minimum(x0 + 1, w - 1)
  ly, lx = y - y0, x - x0
  lvl = level[:, None]

  def at(yy, xx):
    return stack[lvl, yy.astype(jnp.int32), xx.astype(jnp.int32)]  # [N, S, C]

  value = (((1 - ly) * (1 - lx))[..., None] * at(y0, x0) + ((1 - ly) * lx)[..., None] * at(y0, x1)
           + (ly * (1 - lx))[..., None] * at(y1, x0) + (ly * lx)[..., None] * at(y1, x1))
  return jnp.where(outside[..., None], 0.0, value)


def roi_align(levels: Sequence[jax.Array], strides: Sequence[int], boxes: jax.Array, *,
              output_size: int = 7, sampling_ratio: int = 2,
              level: jax.Array | None = None) -> jax.Array:
  """Pools each box from its pyramid level.

  Args:
    levels: per level float[H_l, W_l, C] (one image; vmap over a batch).
    strides: the levels' strides in input pixels.
    boxes: float[N, 4] xyxy in input pixels.
    output_size: P, bins per side.
    sampling_ratio: bilinear samples per bin side.
    level: int32[N] level index per box; `assign_levels` when None.

  Returns:
    float[N, P, P, C].
  """
  if len(levels) != len(strides):
    raise ValueError(f"Got {len(levels)} levels and {len(strides)} strides; give one per level.")
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must be [N, 4] xyxy pixels; got {tuple(boxes.shape)}.")
  if output_size < 1 or sampling_ratio < 1:
    raise ValueError(f"output_size and sampling_ratio must be >= 1; got {output_size}, "
                     f"{sampling_ratio}.")
  hmax = max(l.shape[0] for l in levels)
  wmax = max(l.shape[1] for l in levels)
  stack = jnp.stack([jnp.pad(l, ((0, hmax - l.shape[0]), (0, wmax - l.shape[1]), (0, 0)))
                     for l in levels])
  shapes = jnp.asarray([l.shape[:2] for l in levels], jnp.int32)
  level = assign_levels(boxes, strides) if level is None else level.astype(jnp.int32)
  scale = 1.0 / jnp.asarray(strides, jnp.float32)[level]  # [N]
  b = boxes.astype(jnp.float32) * scale[:, None] - 0.5
  bin_w = (b[:, 2] - b[:, 0]) / output_size
  bin_h = (b[:, 3] - b[:, 1]) / output_size
  # Sample offsets inside the box, in bins: bin p, sample i -> p + (i + 0.5) / sampling_ratio.
  steps = (jnp.arange(output_size)[:, None]
           + (jnp.arange(sampling_ratio)[None, :] + 0.5) / sampling_ratio).reshape(-1)  # [P*g]
  ys = b[:, 1:2] + steps[None] * bin_h[:, None]  # [N, P*g]
  xs = b[:, 0:1] + steps[None] * bin_w[:, None]
  n, pg = ys.shape
  y = jnp.broadcast_to(ys[:, :, None], (n, pg, pg)).reshape(n, -1)
  x = jnp.broadcast_to(xs[:, None, :], (n, pg, pg)).reshape(n, -1)
  samples = _bilinear(stack, shapes, level, y, x)  # [N, (P*g)^2, C]
  g, p, c = sampling_ratio, output_size, stack.shape[-1]
  samples = samples.reshape(n, p, g, p, g, c)
  return samples.mean(axis=(2, 4)).astype(levels[0].dtype)
