"""Matching dense-caption proposals to ground-truth regions (GRiT / PixelLLM, anchor section 2.11).

Each proposal is matched to the GT region of highest IoU; it is positive when that IoU is
>= `threshold` (0.6, the release's `match_gt_thresh`), and then the region's caption (and class)
becomes its caption target. Unmatched proposals get class 0 and an all-pad caption, which masks
their text loss (the text loss counts only tokens > 0 of captions with class > 0). Ties in IoU go to
the lower GT index. GT regions that no positive proposal picked are reported too (`gt_matched`).

`match_proposals_np` is the NumPy version for host-side use; `match_proposals` is the static-shape
jnp version for training, with padding masks for both proposals and GT regions;
`select_caption_prompts` picks the R matched boxes per image that the training step captions.

Shape legend: B images, N proposals (K from the head + M appended GT), M GT regions, R prompts,
T caption length.
"""
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pixel_llm.detection import boxes as box_lib

Array = Any
MATCH_THRESHOLD = 0.6


class Match(NamedTuple):
  """Per-proposal matches.

  gt_index: int[N], the best GT per proposal, -1 when not positive.
  iou: float[N], IoU with the best valid GT (0 without one).
  positive: bool[N], iou >= threshold (and both sides valid).
  gt_matched: bool[M], whether a positive proposal picked this GT.
  """
  gt_index: Array
  iou: Array
  positive: Array
  gt_matched: Array


def _check(proposals: Array, gt_boxes: Array, threshold: float) -> None:
  if proposals.ndim != 2 or proposals.shape[-1] != 4:
    raise ValueError(f"proposals must be [N, 4] xyxy; got {tuple(proposals.shape)}.")
  if gt_boxes.ndim != 2 or gt_boxes.shape[-1] != 4:
    raise ValueError(f"gt_boxes must be [M, 4] xyxy; got {tuple(gt_boxes.shape)}.")
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold must be in (0, 1]; got {threshold}.")


def match_proposals_np(proposals: Array, gt_boxes: Array,
                       threshold: float = MATCH_THRESHOLD) -> Match:
  """NumPy matching: proposals float[N, 4], gt_boxes float[M, 4] (same coordinates) -> `Match`."""
  proposals = np.asarray(proposals, np.float64)
  gt_boxes = np.asarray(gt_boxes, np.float64)
  _check(proposals, gt_boxes, threshold)
  n, m = len(proposals), len(gt_boxes)
  if m == 0:
    return Match(np.full(n, -1, np.int64), np.zeros(n), np.zeros(n, bool), np.zeros(0, bool))
  iou = box_lib.iou_matrix_np(proposals, gt_boxes)
  best = iou.argmax(axis=1)
  best_iou = iou[np.arange(n), best]
  positive = best_iou >= threshold
  gt_matched = np.zeros(m, bool)
  gt_matched[best[positive]] = True
  return Match(np.where(positive, best, -1), best_iou, positive, gt_matched)


@functools.partial(jax.jit, static_argnames=("threshold",))
def match_proposals(proposals: jax.Array, gt_boxes: jax.Array, *,
                    proposal_valid: jax.Array | None = None,
                    gt_valid: jax.Array | None = None,
                    threshold: float = MATCH_THRESHOLD) -> Match:
  """Static-shape jnp matching for one image (vmap over the batch).

  Args:
    proposals: float[N, 4] xyxy.
    gt_boxes: float[M, 4] xyxy, same coordinates; M >= 1 (pad with invalid rows).
    proposal_valid: bool[N] (padding False); all valid when None.
    gt_valid: bool[M] (padding False); all valid when None.
    threshold: positive when IoU >= this.

  Returns:
    `Match` of jnp arrays (gt_index int32[N], iou float32[N], positive bool[N], gt_matched bool[M]).
  """
  _check(proposals, gt_boxes, threshold)
  n, m = proposals.shape[0], gt_boxes.shape[0]
  if m == 0:
    raise ValueError("match_proposals needs M >= 1 GT rows; pad with gt_valid=False rows.")
  proposal_valid = jnp.ones((n,), bool) if proposal_valid is None else proposal_valid.astype(bool)
  gt_valid = jnp.ones((m,), bool) if gt_valid is None else gt_valid.astype(bool)
  iou = box_lib.iou_matrix(proposals.astype(jnp.float32), gt_boxes.astype(jnp.float32))
  # Padded GT rows get IoU -1 so they never win, not even against an all-zero IoU row.
  iou = jnp.where(gt_valid[None, :], iou, -1.0)
  best = jnp.argmax(iou, axis=1).astype(jnp.int32)
  best_iou = jnp.maximum(jnp.take_along_axis(iou, best[:, None], axis=1)[:, 0], 0.0)
  positive = (best_iou >= threshold) & proposal_valid & gt_valid[best]
  gt_matched = jnp.zeros((m,), bool).at[best].max(positive)
  return Match(jnp.where(positive, best, -1), best_iou, positive, gt_matched)


def gather_targets(match: Match, gt_classes: Array, gt_captions: Array) -> tuple[Array, Array]:
  """Caption targets per proposal (jnp or NumPy, follows the inputs).

  Args:
    match: from `match_proposals` / `match_proposals_np`.
    gt_classes: int[M] (> 0 for real regions).
    gt_captions: int[M, T] token ids (0 = pad).

  Returns:
    (classes int[N], 0 where unmatched; captions int[N, T], all 0 where unmatched).
  """
  if gt_captions.ndim != 2 or gt_captions.shape[0] != gt_classes.shape[0]:
    raise ValueError(f"gt_captions must be [M, T] with M = {gt_classes.shape[0]}; got "
                     f"{tuple(gt_captions.shape)}.")
  xp = np if isinstance(match.positive, np.ndarray) else jnp
  if gt_classes.shape[0] == 0:
    n = match.positive.shape[0]
    return (xp.zeros((n,), gt_classes.dtype),
            xp.zeros((n, gt_captions.shape[1]), gt_captions.dtype))
  idx = xp.maximum(match.gt_index, 0)
  pos = match.positive
  classes = xp.where(pos, gt_classes[idx], 0)
  captions = xp.where(pos[:, None], gt_captions[idx], 0)
  return classes, captions


def select_caption_prompts(proposals: jax.Array, proposal_valid: jax.Array, gt_boxes: jax.Array,
                           gt_valid: jax.Array, num_prompts: int, rng: jax.Array | None = None,
                           threshold: float = MATCH_THRESHOLD
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Dense captioning's training prompts: proposals matched to GT regions (the release's text
  proposals, anchor section 2.11).

  The GT boxes are appended to the proposals (as the release's RoI head does), so every valid GT
  region has a positive (itself, IoU 1). Per image, `num_prompts` candidates are kept, positives
  first: in random order with `rng` (the release samples its RoI proposals at random), else in
  candidate order (proposals by score, then the GT boxes). A kept positive carries its GT region's
  caption; a slot with no positive left is invalid (its caption loss is masked).

  Args:
    proposals: float[B, K, 4] xyxy; proposal_valid: bool[B, K].
    gt_boxes: float[B, M, 4] xyxy, same coordinates; gt_valid: bool[B, M].
    num_prompts: R, prompts per image (<= K + M).
    rng: optional PRNG key for the order among positives.
    threshold: positive at IoU >= this (the release's `match_gt_thresh` 0.6).

  Returns:
    (boxes float32[B, R, 4], gt_index int32[B, R] into the M regions (0 where invalid),
    valid bool[B, R]).
  """
  b, k = proposals.shape[:2]
  m = gt_boxes.shape[1]
  if not 0 < num_prompts <= k + m:
    raise ValueError(f"num_prompts must be in [1, K + M = {k + m}]; got {num_prompts}.")
  candidates = jnp.concatenate([proposals, gt_boxes], axis=1).astype(jnp.float32)  # [B, N, 4]
  candidate_valid = jnp.concatenate([proposal_valid, gt_valid], axis=1).astype(bool)
  match = jax.vmap(lambda c, g, cv, gv: match_proposals(
      c, g, proposal_valid=cv, gt_valid=gv, threshold=threshold))(
          candidates, gt_boxes, candidate_valid, gt_valid.astype(bool))
  n = k + m
  if rng is None:
    order = -jnp.arange(n, dtype=jnp.float32) / n  # candidate order: higher first
  else:
    order = jax.random.uniform(rng, (b, n)) - 1.0  # in [-1, 0): random among equals
  _, idx = jax.lax.top_k(match.positive.astype(jnp.float32) * 2.0 + order, num_prompts)
  take = lambda x: jnp.take_along_axis(x, idx, axis=1)
  valid = take(match.positive)
  boxes = jnp.take_along_axis(candidates, idx[..., None], axis=1)
  return boxes, jnp.where(valid, take(match.gt_index), 0), valid
