"""Second-stage RoI box head of dense captioning (the release's single-stage CenterNet2 RoI head,
anchor section 2.11): proposals are pooled from the proposal head's pyramid, scored fg / bg and
their boxes refined.

- `RoIBoxHead`: RoIAlign 7 x 7 from each box's pyramid level (`detection/roi_align.py`), two
  fully connected layers (1024, ReLU), then a 2-way fg / bg classifier and 4 class-agnostic box
  deltas (detectron2's Fast R-CNN output layer and initialisation).
- Training (`sample_rois`, `roi_targets`, `roi_loss`): the head's proposals with the GT boxes
  appended are matched to the GT at IoU >= 0.6 and `samples_per_image` of them drawn, at most
  `positive_fraction` positive; loss = softmax cross-entropy over the samples + L1 on the encoded
  deltas of the positives, both normalised by the number of samples (detectron2's Fast R-CNN
  losses with smooth-L1 beta 0, as the release).
- Inference (`refine`): refined boxes, fg probability as the score (optionally the geometric mean
  with the proposal's score, CenterNet2's `mult_proposal_score`), score threshold 0.05, NMS 0.5.

Box deltas (`encode_deltas` / `decode_deltas`): detectron2's Box2BoxTransform with weights
(10, 10, 5, 5): dx = 10 (gx - px) / pw, dy = 10 (gy - py) / ph, dw = 5 log(gw / pw),
dh = 5 log(gh / ph) on centres and sizes; decoding clamps dw, dh at log(1000 / 16).

Shape legend: N boxes (candidates), M GT boxes, S sampled RoIs, P pooled bins per side,
C pyramid width.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixel_llm.detection import boxes as box_lib
from pixel_llm.detection import matching
from pixel_llm.detection import nms as nms_lib
from pixel_llm.detection import roi_align as roi_align_lib
from pixel_llm.models.layers import with_axes

Dtype = Any
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
_SCALE_CLAMP = math.log(1000.0 / 16)


def encode_deltas(proposals: jax.Array, targets: jax.Array) -> jax.Array:
  """Deltas taking proposals float[..., 4] to targets float[..., 4] (xyxy) -> float[..., 4]."""
  wx, wy, ww, wh = BOX_WEIGHTS
  pw = jnp.maximum(proposals[..., 2] - proposals[..., 0], 1e-6)
  ph = jnp.maximum(proposals[..., 3] - proposals[..., 1], 1e-6)
  gw = jnp.maximum(targets[..., 2] - targets[..., 0], 1e-6)
  gh = jnp.maximum(targets[..., 3] - targets[..., 1], 1e-6)
  dx = wx * ((targets[..., 0] + targets[..., 2]) - (proposals[..., 0] + proposals[..., 2])) / (2 * pw)
  dy = wy * ((targets[..., 1] + targets[..., 3]) - (proposals[..., 1] + proposals[..., 3])) / (2 * ph)
  return jnp.stack([dx, dy, ww * jnp.log(gw / pw), wh * jnp.log(gh / ph)], -1)


def decode_deltas(proposals: jax.Array, deltas: jax.Array) -> jax.Array:
  """Inverse of `encode_deltas`: proposals float[..., 4], deltas float[..., 4] -> boxes [..., 4]."""
  wx, wy, ww, wh = BOX_WEIGHTS
  pw = proposals[..., 2] - proposals[..., 0]
  ph = proposals[..., 3] - proposals[..., 1]
  cx = proposals[..., 0] + 0.5 * pw + deltas[..., 0] / wx * pw
  cy = proposals[..., 1] + 0.5 * ph + deltas[..., 1] / wy * ph
  w = pw * jnp.exp(jnp.minimum(deltas[..., 2] / ww, _SCALE_CLAMP))
  h = ph * jnp.exp(jnp.minimum(deltas[..., 3] / wh, _SCALE_CLAMP))
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


class RoIBoxHead(nn.Module):
  """Pyramid levels + boxes -> (fg / bg logits float32[B, N, 2], deltas float32[B, N, 4]).

  The other fields are the head's training and inference settings, read by the network
  (`pixel_llm.models.pixel_llm`): candidates per image, samples, thresholds.
  """

  fc_dim: int = 1024
  num_fc: int = 2
  output_size: int = 7
  sampling_ratio: int = 2
  train_proposals: int = 1000  # the release's post-NMS proposals in training (2000 pre-NMS)
  test_proposals: int = 256
  samples_per_image: int = 512
  positive_fraction: float = 0.25
  score_threshold: float = 0.05
  nms_threshold: float = 0.5
  mult_proposal_score: bool = False
  # Training prompts captioned per image with `caption_proposals` on: the first N RoI samples
  # (the release's 32 text proposals); 0 = R, the example's region count. N below R lets the
  # example carry all of an image's GT regions (the RoI and proposal targets) while only N of
  # them are decoded.
  text_proposals: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array], strides: Sequence[int],
               boxes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """levels: per level float[B, H_l, W_l, C]; boxes float[B, N, 4] xyxy pixels of the
    proposal frame. Returns (logits float32[B, N, 2], deltas float32[B, N, 4])."""
    pool = lambda lv, bx: roi_align_lib.roi_align(  # noqa: E731
        lv, strides, bx, output_size=self.output_size, sampling_ratio=self.sampling_ratio)
    pooled = jax.vmap(pool)(tuple(levels), boxes)  # [B, N, P, P, C]
    x = pooled.reshape(*pooled.shape[:2], -1).astype(self.dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_fc):
      x = nn.relu(nn.Dense(
          self.fc_dim, kernel_init=with_axes(nn.initializers.variance_scaling(
              1.0, "fan_in", "uniform"), ("embed", "mlp")),
          bias_init=with_axes(nn.initializers.zeros_init(), ("mlp",)), name=f"fc{i}", **kw)(x))
    logits = nn.Dense(2, kernel_init=with_axes(nn.initializers.normal(0.01), ("mlp", None)),
                      bias_init=with_axes(nn.initializers.zeros_init(), (None,)),
                      name="cls_score", **kw)(x)
    deltas = nn.Dense(4, kernel_init=with_axes(nn.initializers.normal(0.001), ("mlp", None)),
                      bias_init=with_axes(nn.initializers.zeros_init(), (None,)),
                      name="bbox_pred", **kw)(x)
    return logits.astype(jnp.float32), deltas.astype(jnp.float32)


def sample_rois(positive: jax.Array, valid: jax.Array, num_samples: int,
                positive_fraction: float, rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Which candidates train the head (one image; detectron2's `subsample_labels`).

  positive, valid: bool[N]. Returns (index int32[S], sampled bool[S]), S = num_samples: up to
  S * positive_fraction positives, the rest negatives, each group in random order (by index
  when rng is None); slots beyond the candidates are not sampled.
  """
  n = positive.shape[0]
  u = (jax.random.uniform(rng, (n,)) if rng is not None
       else jnp.arange(n, dtype=jnp.float32) / max(n, 1))
  pos = positive & valid
  neg = ~positive & valid
  num_pos = jnp.minimum(pos.sum(), int(num_samples * positive_fraction))
  num_neg = jnp.minimum(neg.sum(), num_samples - num_pos)
  pos_order = jnp.argsort(jnp.where(pos, u, 2.0))
  neg_order = jnp.argsort(jnp.where(neg, u, 2.0))
  slot = jnp.arange(num_samples)
  pad = max(num_samples - n, 0)
  pos_order = jnp.pad(pos_order, (0, pad))
  neg_order = jnp.pad(neg_order, (0, pad))
  index = jnp.where(slot < num_pos, pos_order[:num_samples],
                    neg_order[jnp.clip(slot - num_pos, 0, num_samples - 1)])
  return index.astype(jnp.int32), slot < num_pos + num_neg


def roi_targets(candidates: jax.Array, candidate_valid: jax.Array, gt_boxes: jax.Array,
                gt_valid: jax.Array, num_samples: int, positive_fraction: float,
                rng: jax.Array | None) -> dict[str, jax.Array]:
  """Sampled RoIs and their targets for one image.

  candidates: float[N, 4] (proposals with the GT boxes appended), candidate_valid bool[N];
  gt_boxes float[M, 4] (same coordinates), gt_valid bool[M].
  Returns {"boxes": [S, 4], "labels": int32[S] (1 fg, 0 bg), "deltas": [S, 4] (targets, zero
  for bg), "gt_index": int32[S] (the matched GT region, 0 for bg), "valid": bool[S]}; the
  positives come first (`sample_rois`).
  """
  match = matching.match_proposals(candidates, gt_boxes, proposal_valid=candidate_valid,
                                   gt_valid=gt_valid)
  index, sampled = sample_rois(match.positive, candidate_valid, num_samples, positive_fraction,
                               rng)
  boxes = candidates[index]
  fg = match.positive[index] & sampled
  gt = gt_boxes[jnp.maximum(match.gt_index[index], 0)]
  deltas = jnp.where(fg[:, None], encode_deltas(boxes, gt), 0.0)
  return {"boxes": boxes, "labels": fg.astype(jnp.int32), "deltas": deltas,
          "gt_index": jnp.where(fg, match.gt_index[index], 0).astype(jnp.int32), "valid": sampled}


def roi_loss(logits: jax.Array, deltas: jax.Array, targets: dict[str, jax.Array]
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Fast R-CNN losses over a batch of sampled RoIs: logits float[B, S, 2], deltas float[B, S, 4],
  targets from `roi_targets` (batched). Both terms are normalised by the number of samples."""
  valid = targets["valid"].astype(jnp.float32)
  n = jnp.maximum(valid.sum(), 1.0)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  ce = -(jnp.take_along_axis(logp, targets["labels"][..., None], -1)[..., 0] * valid).sum() / n
  fg = (targets["labels"] > 0).astype(jnp.float32) * valid
  l1 = (jnp.abs(deltas - targets["deltas"]).sum(-1) * fg).sum() / n
  accuracy = ((logits.argmax(-1) == targets["labels"]) * valid).sum() / n
  return ce + l1, {"roi_cls": ce, "roi_box": l1, "roi_accuracy": accuracy,
                   "roi_positive_fraction": fg.sum() / n}


def refine(head_out: tuple[jax.Array, jax.Array], proposals: jax.Array, proposal_scores: jax.Array,
           proposal_valid: jax.Array, frame: tuple[float, float], num_boxes: int, *,
           score_threshold: float, nms_threshold: float, mult_proposal_score: bool
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Final detections of one image from the head's output on its proposals.

  head_out: (logits [N, 2], deltas [N, 4]); proposals float[N, 4] pixels, proposal_scores [N],
  proposal_valid bool[N]; frame (height, width) to clip to. Returns (boxes float32[K, 4],
  scores float32[K], valid bool[K]), K = num_boxes, after the score threshold and NMS.
  """
  logits, deltas = head_out
  score = jax.nn.softmax(logits, -1)[:, 1]
  if mult_proposal_score:
    score = jnp.sqrt(score * proposal_scores)
  boxes = box_lib.clip_boxes(decode_deltas(proposals, deltas), *frame)
  keep = proposal_valid & (score > score_threshold)
  idx, mask = nms_lib.nms_fixed(boxes, score, nms_threshold, num_boxes, valid=keep)
  return (jnp.where(mask[:, None], boxes[idx], 0.0), jnp.where(mask, score[idx], 0.0), mask)
