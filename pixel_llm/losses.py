"""PixelLLM losses: label-smoothed caption cross-entropy, per-token point L1, and two deviations
(off by default): the per-token box GIoU and the referred-place cross-entropy.

Shapes: B batch, R prompts per image, T decoder length, V vocabulary, K points per token.
"""
import jax
import jax.numpy as jnp
import optax

from pixel_llm.detection import boxes as box_lib


def label_smoothed_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                                 label_smoothing: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """GRiT-style smoothed softmax cross-entropy, averaged over valid tokens.

  The target distribution puts 1 - eps on the true token and eps / (V - 1) on every other token
  (the official release's form, not optax's eps / V on all tokens).

  Args:
    logits: float[..., V]
    targets: int32[...] token ids.
    weights: float[...] 1 for tokens that count, 0 for padding and switched-off tasks.
  Returns:
    (mean loss over weighted tokens, number of weighted tokens)
  """
  vocab = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  on = 1.0 - label_smoothing
  off = label_smoothing / (vocab - 1)
  true_lp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  per_token = -(on - off) * true_lp - off * log_probs.sum(-1)
  weights = weights.astype(jnp.float32)
  count = weights.sum()
  return (per_token * weights).sum() / jnp.maximum(count, 1.0), count


def point_l1(pred: jax.Array, target: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean absolute error between predicted and target points, in normalised image coordinates.

  Args:
    pred, target: float[..., K, 2]
    weights: float[...] per-token validity (0 ignores the token).
  Returns:
    (L1 averaged over the K*2 coordinates and over weighted tokens, number of weighted tokens)
  """
  per_token = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)).mean(axis=(-2, -1))
  weights = weights.astype(jnp.float32)
  count = weights.sum()
  return (per_token * weights).sum() / jnp.maximum(count, 1.0), count


def box_giou(pred: jax.Array, target: jax.Array, weights: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
  """1 - GIoU of the boxes spanned by K = 2 predicted and target points (corners in either
  order), averaged over weighted tokens.

  Args:
    pred, target: float[..., 2, 2] in [0, 1]; weights: float[...] (0 ignores the token).
  Returns:
    (mean 1 - GIoU over weighted tokens, in [0, 2]; 0 when none, number of weighted tokens)
  """
  if pred.shape[-2:] != (2, 2):
    raise ValueError(f"box_giou needs 2 points per token (a box), got {pred.shape[-2:]}.")
  per_token = 1.0 - box_lib.giou(box_lib.from_corners(pred), box_lib.from_corners(target))
  weights = weights.astype(jnp.float32)
  count = weights.sum()
  return (per_token * weights).sum() / jnp.maximum(count, 1.0), count


def place_bce(logits: jax.Array, point_targets: jax.Array, point_weights: jax.Array
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Class-balanced sigmoid cross-entropy of per-place logits against "inside the prompt's
  located boxes" (the referred object's box for a referring prompt).

  Args:
    logits: float[B, R, H, W], one per feature-grid cell (cell centres at (j + 0.5) / W, ...).
    point_targets: float[B, R, T, K, 2] in [0, 1]; each weighted token's K points span a box.
    point_weights: float[B, R, T]; a cell is positive if its centre is in any weighted box.
  Returns:
    (loss: per prompt the mean over positive cells plus the mean over negative cells, averaged
     over prompts with a weighted token and at least one positive cell; 0 if none,
     {"place_accuracy": cell accuracy at logit 0 over those prompts, "place_prompts": count})
  """
  _, _, h, w = logits.shape
  lo = point_targets.min(-2).astype(jnp.float32)  # [B, R, T, 2] xy
  hi = point_targets.max(-2).astype(jnp.float32)
  ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
  xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
  inside_x = (xs >= lo[..., None, 0:1]) & (xs <= hi[..., None, 0:1])  # [B, R, T, 1, W]
  inside_y = (ys[:, None] >= lo[..., None, None, 1]) & (ys[:, None] <= hi[..., None, None, 1])
  weighted = (point_weights > 0)[..., None, None]
  target = (inside_x & inside_y & weighted).any(axis=2).astype(jnp.float32)  # [B, R, H, W]
  pos = target.sum((-2, -1))
  valid = ((pos > 0) & (point_weights > 0).any(-1)).astype(jnp.float32)  # [B, R]
  logits = logits.astype(jnp.float32)
  ce = optax.sigmoid_binary_cross_entropy(logits, target)
  pos_mean = (ce * target).sum((-2, -1)) / jnp.maximum(pos, 1.0)
  neg_mean = (ce * (1 - target)).sum((-2, -1)) / jnp.maximum(h * w - pos, 1.0)
  count = valid.sum()
  loss = ((pos_mean + neg_mean) * valid).sum() / jnp.maximum(count, 1.0)
  correct = ((logits > 0) == (target > 0)).astype(jnp.float32).mean((-2, -1))
  accuracy = (correct * valid).sum() / jnp.maximum(count, 1.0)
  return loss, {"place_accuracy": accuracy, "place_prompts": count}


def token_accuracy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Teacher-forced top-1 accuracy over weighted tokens."""
  correct = (logits.argmax(-1) == targets).astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  return (correct * weights).sum() / jnp.maximum(weights.sum(), 1.0)
