"""Losses against hand-computed values."""
import numpy as np
import jax.numpy as jnp

from pixel_llm import losses


def test_label_smoothed_cross_entropy_matches_hand_computation():
  logits = jnp.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])
  targets = jnp.array([[0, 2]])
  weights = jnp.array([[1.0, 0.0]])  # second token is padding
  loss, count = losses.label_smoothed_cross_entropy(logits, targets, weights, 0.1)
  lp = np.log(np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum())
  expected = -(0.9 * lp[0] + 0.05 * lp[1] + 0.05 * lp[2])
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert count == 1


def test_cross_entropy_without_smoothing_is_nll():
  logits = jnp.array([[1.0, 3.0]])
  loss, _ = losses.label_smoothed_cross_entropy(logits, jnp.array([1]), jnp.ones(1), 0.0)
  np.testing.assert_allclose(loss, -np.log(np.exp(3) / (np.exp(1) + np.exp(3))), rtol=1e-6)


def test_point_l1_is_masked_and_normalised_by_valid_tokens():
  pred = jnp.zeros((1, 3, 2, 2))
  target = jnp.stack([jnp.full((2, 2), 0.1), jnp.full((2, 2), 0.3), jnp.full((2, 2), 9.0)])[None]
  loss, count = losses.point_l1(pred, target, jnp.array([[1.0, 1.0, 0.0]]))
  np.testing.assert_allclose(loss, 0.2, rtol=1e-6)
  assert count == 2


def test_empty_weights_give_zero_not_nan():
  loss, count = losses.point_l1(jnp.ones((2, 2, 2)), jnp.zeros((2, 2, 2)), jnp.zeros(2))
  assert float(loss) == 0.0 and float(count) == 0.0


def test_token_accuracy():
  logits = jnp.array([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
  acc = losses.token_accuracy(logits, jnp.array([[1, 1, 0]]), jnp.array([[1.0, 1.0, 0.0]]))
  np.testing.assert_allclose(acc, 0.5)
