"""PixelLLM losses: label-smoothed caption cross-entropy and per-token point L1.

Shapes: B batch, R prompts per image, T decoder length, V vocabulary, K points per token.
"""
import jax
import jax.numpy as jnp


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


def token_accuracy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Teacher-forced top-1 accuracy over weighted tokens."""
  correct = (logits.argmax(-1) == targets).astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  return (correct * weights).sum() / jnp.maximum(weights.sum(), 1.0)
