"""Class-agnostic CenterNet proposal head for dense captioning (anchor section 2.11).

The release's `FpnCenterNet2` proposal stage (its second-stage RoI head is
`models/roi_head.py`):

- `SimpleFeaturePyramid` (ViTDet, Li et al. 2022): one stride-16 map -> strides 8 / 16 / 32 via a
  2x2 stride-2 transposed conv (to D // 2 channels) / identity / 2x2 max-pool, each followed by a
  1x1 conv + LayerNorm and a 3x3 conv + LayerNorm (no bias, as ViTDet with norm); then
  `num_top_levels` extra levels by stride-2 subsampling of the last one (detectron2's
  `LastLevelMaxPool`). The release uses 2 top levels (strides up to 128); the default here is 1,
  giving strides 8 / 16 / 32 / 64.
- `CenterNetHead` (CenterNet2 proposal-only): a tower of `num_convs` 3x3 conv + GroupNorm + ReLU
  shared by all levels, then a 3x3 conv to 1 heatmap logit (bias -log(99), prior 0.01) and a 3x3
  conv to 4 ltrb distances, scaled per level by a learned scalar and passed through ReLU. The
  distances are in units of the level's stride (CenterNet2 divides its targets by the stride).
- `decode_proposals`: sigmoid scores, per-level top-k, boxes = point -/+ ltrb * stride clipped to
  the image, class-agnostic NMS at 0.9 -> a fixed number of boxes with a validity mask.

Input: the fused image features float[B, H, W, D] (prompt feature extractor output as a grid),
treated as stride 16 like the release (whose EVA grid is really stride 14).

Training: `proposal_loss` (targets and losses from `pixel_llm.detection.centernet`). NMS cost:
`decode_proposals` runs a sequential suppression over all per-level candidates (about 2,000 with
the release's 1000-per-level setting on a 27x27 grid) with an [N, N] IoU matrix per image.

Shape legend: B batch, H/W input grid, D width, H_l/W_l level grid, M GT boxes, K kept proposals.
"""
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixel_llm.detection import boxes as box_lib
from pixel_llm.detection import centernet
from pixel_llm.detection import nms as nms_lib
from pixel_llm.models.layers import LayerNorm2d, conv, with_axes

Dtype = Any
INPUT_STRIDE = 16
_PYRAMID_SCALES = (2.0, 1.0, 0.5)


def pyramid_strides(num_top_levels: int = 1) -> tuple[int, ...]:
  """Strides of the pyramid levels: (8, 16, 32) then doubling `num_top_levels` times."""
  base = tuple(int(INPUT_STRIDE / s) for s in _PYRAMID_SCALES)
  return base + tuple(base[-1] * 2 ** (i + 1) for i in range(num_top_levels))


def pyramid_shapes(height: int, width: int, num_top_levels: int = 1) -> tuple[tuple[int, int], ...]:
  """Level grids for an input grid H x W: (2H, 2W), (H, W), floor halves, then ceil halves."""
  shapes = [(2 * height, 2 * width), (height, width), (height // 2, width // 2)]
  for _ in range(num_top_levels):
    h, w = shapes[-1]
    shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
  return tuple(shapes)


class SimpleFeaturePyramid(nn.Module):
  """features float[B, H, W, D] -> tuple of float[B, H_l, W_l, out_dim] (strides 8, 16, 32, ...)."""

  out_dim: int = 256
  num_top_levels: int = 1
  deconv_dim: int | None = None  # D // 2 when None (ViTDet)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    if x.ndim != 4:
      raise ValueError(f"SimpleFeaturePyramid takes features [B, H, W, D]; got {x.shape}.")
    if x.shape[1] < 2 or x.shape[2] < 2:
      raise ValueError(f"The feature grid must be at least 2x2 for the stride-32 level; got "
                       f"{x.shape[1:3]}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    outs = []
    for i, scale in enumerate(_PYRAMID_SCALES):
      y = x
      if scale == 2.0:
        y = nn.ConvTranspose(
            self.deconv_dim or x.shape[-1] // 2, (2, 2), strides=(2, 2), padding="VALID",
            kernel_init=with_axes(nn.initializers.lecun_normal(),
                                  ("conv_h", "conv_w", "conv_in", "embed")),
            bias_init=with_axes(nn.initializers.zeros_init(), ("embed",)),
            name=f"level{i}_deconv", **kw)(y)
      elif scale == 0.5:
        y = nn.max_pool(y, (2, 2), strides=(2, 2), padding="VALID")
      y = conv(self.out_dim, (1, 1), use_bias=False, name=f"level{i}_lateral", **kw)(y)
      y = LayerNorm2d(param_dtype=self.param_dtype, name=f"level{i}_lateral_norm")(y)
      y = conv(self.out_dim, (3, 3), padding="SAME", use_bias=False, name=f"level{i}_output",
               **kw)(y)
      y = LayerNorm2d(param_dtype=self.param_dtype, name=f"level{i}_output_norm")(y)
      outs.append(y)
    for _ in range(self.num_top_levels):
      outs.append(outs[-1][:, ::2, ::2])  # max-pool with a 1x1 window and stride 2
    return tuple(outs)


class CenterNetHead(nn.Module):
  """Levels float[B, H_l, W_l, C] -> (logits tuple of float32[B, H_l, W_l],
  ltrb tuple of float32[B, H_l, W_l, 4] in stride units, >= 0)."""

  num_convs: int = 4
  num_groups: int = 32
  prior_prob: float = 0.01
  reg_bias_init: float = 8.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array]) -> tuple[tuple[jax.Array, ...], ...]:
    width = levels[0].shape[-1]
    if width % self.num_groups:
      raise ValueError(f"GroupNorm needs the width {width} divisible by num_groups "
                       f"{self.num_groups}; change one of them.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    head_init = nn.initializers.normal(0.01)  # CenterNet2 initialises every head conv N(0, 0.01)
    tower = []
    for i in range(self.num_convs):
      tower.append((conv(width, (3, 3), padding="SAME", kernel_init=head_init, name=f"tower{i}",
                         **kw),
                    nn.GroupNorm(self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype,
                                 scale_init=with_axes(nn.initializers.ones_init(), ("norm",)),
                                 bias_init=with_axes(nn.initializers.zeros_init(), ("norm",)),
                                 name=f"tower{i}_norm")))
    hm_conv = nn.Conv(
        1, (3, 3), padding="SAME",
        kernel_init=with_axes(head_init, ("conv_h", "conv_w", "conv_in", None)),
        bias_init=with_axes(nn.initializers.constant(-math.log((1 - self.prior_prob)
                                                                / self.prior_prob)), (None,)),
        name="heatmap", **kw)
    reg_conv = nn.Conv(
        4, (3, 3), padding="SAME",
        kernel_init=with_axes(head_init, ("conv_h", "conv_w", "conv_in", None)),
        bias_init=with_axes(nn.initializers.constant(self.reg_bias_init), (None,)),
        name="regression", **kw)
    scales = self.param("level_scales", with_axes(nn.initializers.ones_init(), ("norm",)),
                        (len(levels),), self.param_dtype)
    logits, ltrb = [], []
    for l, y in enumerate(levels):
      for c, norm in tower:
        y = nn.relu(norm(c(y)))
      logits.append(hm_conv(y)[..., 0].astype(jnp.float32))
      ltrb.append(nn.relu(reg_conv(y).astype(jnp.float32) * scales[l]))
    return tuple(logits), tuple(ltrb)


class ProposalHead(nn.Module):
  """Pyramid + CenterNet head: features float[B, H, W, D] -> dict with
  "logits" tuple of float32[B, H_l, W_l], "ltrb" tuple of float32[B, H_l, W_l, 4]
  (stride units) and the pyramid "levels" tuple of float[B, H_l, W_l, width] (what the RoI head
  pools), levels at `pyramid_strides(num_top_levels)` / `pyramid_shapes(H, W, ...)`."""

  width: int = 256
  num_top_levels: int = 1
  num_convs: int = 4
  num_groups: int = 32
  deconv_dim: int | None = None  # D // 2 when None; the release fixes 384 (its `in_dim` 768 // 2)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def strides(self) -> tuple[int, ...]:
    return pyramid_strides(self.num_top_levels)

  @nn.compact
  def __call__(self, features: jax.Array) -> dict[str, tuple[jax.Array, ...]]:
    if self.width % self.num_groups:
      raise ValueError(f"GroupNorm needs width {self.width} divisible by num_groups "
                       f"{self.num_groups}; change one of them.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    levels = SimpleFeaturePyramid(self.width, self.num_top_levels, self.deconv_dim, name="pyramid",
                                  **kw)(features)
    logits, ltrb = CenterNetHead(self.num_convs, self.num_groups, name="head", **kw)(levels)
    return {"logits": logits, "ltrb": ltrb, "levels": levels}


def proposal_loss(outputs: dict[str, Sequence[jax.Array]], gt_boxes: jax.Array,
                  gt_valid: jax.Array, strides: Sequence[int], *,
                  size_ranges: Sequence[tuple[float, float]] | None = None,
                  hm_weight: float = 0.5,
                  reg_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CenterNet proposal loss of `ProposalHead` outputs against padded GT boxes.

  Args:
    outputs: `ProposalHead` output ("logits" per level [B, H_l, W_l], "ltrb" [B, H_l, W_l, 4]).
    gt_boxes: float[B, M, 4] xyxy pixels of the model input.
    gt_valid: bool[B, M], False for padding rows.
    strides: the head's `strides`.
    size_ranges: per-level half-diagonal ranges; None = `centernet.default_size_ranges`.
    hm_weight, reg_weight: the release's 0.5 and 1.0.

  Returns:
    (loss scalar, metrics) from `centernet.centernet_loss`.
  """
  shapes = tuple(tuple(m.shape[1:3]) for m in outputs["logits"])
  targets = jax.vmap(lambda b, v: centernet.centernet_targets(b, v, shapes, strides, size_ranges))(
      gt_boxes, gt_valid)
  logits = centernet.flatten_levels([m[..., None] for m in outputs["logits"]])[..., 0]
  ltrb = centernet.flatten_levels(outputs["ltrb"])
  return centernet.centernet_loss(logits, ltrb, targets, hm_weight=hm_weight,
                                  reg_weight=reg_weight)


def decode_proposals(logits: Sequence[jax.Array], ltrb: Sequence[jax.Array],
                     strides: Sequence[int], image_size: tuple[float, float], *,
                     pre_nms_topk: int = 1000, post_nms_topk: int = 256,
                     iou_threshold: float = 0.9,
                     score_threshold: float = 1e-4) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-scoring proposals after NMS, fixed size (jit-able; the release's test setting 1000/256).

  Args:
    logits: per level float[B, H_l, W_l] heatmap logits.
    ltrb: per level float[B, H_l, W_l, 4] distances in stride units.
    strides: stride per level.
    image_size: (height, width) in pixels of the model input, to clip boxes.
    pre_nms_topk: candidates kept per level before NMS.
    post_nms_topk: K, boxes kept after NMS.
    iou_threshold: NMS IoU.
    score_threshold: candidates with sigmoid score <= this are dropped.

  Returns:
    (boxes float32[B, K, 4] xyxy pixels, scores float32[B, K], valid bool[B, K]); invalid slots
    have zero boxes and scores.
  """
  if not len(logits) == len(ltrb) == len(strides):
    raise ValueError(f"Got {len(logits)} logit maps, {len(ltrb)} ltrb maps and {len(strides)} "
                     "strides; give one of each per level.")
  return _decode_jit(tuple(logits), tuple(ltrb), tuple(int(s) for s in strides),
                     (float(image_size[0]), float(image_size[1])), int(pre_nms_topk),
                     int(post_nms_topk), float(iou_threshold), float(score_threshold))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _decode_jit(logits, ltrb, strides, image_size, pre_nms_topk, post_nms_topk, iou_threshold,
                score_threshold):
  shapes = [tuple(m.shape[1:3]) for m in logits]
  points, _, _ = centernet.grid_points(shapes, strides)
  cand_boxes, cand_scores = [], []
  start = 0
  for m, r, s, (h, w) in zip(logits, ltrb, strides, shapes):
    scores = jax.nn.sigmoid(m.reshape(m.shape[0], -1).astype(jnp.float32))
    k = min(pre_nms_topk, h * w)
    top, idx = jax.lax.top_k(scores, k)  # [B, k]
    pts = jnp.asarray(points[start:start + h * w])[idx]  # [B, k, 2]
    dist = jnp.take_along_axis(r.reshape(r.shape[0], -1, 4), idx[..., None], axis=1) * s
    cand_boxes.append(box_lib.decode_ltrb(pts, dist))
    cand_scores.append(top)
    start += h * w
  cand_boxes = box_lib.clip_boxes(jnp.concatenate(cand_boxes, 1), *image_size)
  cand_scores = jnp.concatenate(cand_scores, 1)

  def one(b, sc):
    idx, mask = nms_lib.nms_fixed(b, sc, iou_threshold, post_nms_topk, valid=sc > score_threshold)
    return (jnp.where(mask[:, None], b[idx], 0.0), jnp.where(mask, sc[idx], 0.0), mask)

  return jax.vmap(one)(cand_boxes, cand_scores)
