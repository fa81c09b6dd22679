"""Losses against hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np

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


def test_place_bce_targets_the_cells_inside_weighted_boxes():
  # A 4x4 grid (cell centres 0.125, 0.375, ...); prompt 0's weighted token spans the top-left
  # 2x2 cells, its unweighted token (other corners) adds nothing; prompt 1 has no weighted token.
  targets = np.zeros((1, 2, 2, 2, 2), np.float32)
  targets[0, 0, 0] = [[0.5, 0.5], [0.0, 0.0]]  # corners in either order
  targets[0, 0, 1] = [[0.5, 0.5], [1.0, 1.0]]
  weights = np.array([[[1.0, 0.0], [0.0, 0.0]]], np.float32)
  want = np.zeros((4, 4), np.float32)
  want[:2, :2] = 1.0
  perfect = np.zeros((1, 2, 4, 4), np.float32)
  perfect[0, 0] = np.where(want > 0, 20.0, -20.0)
  perfect[0, 1] = 20.0  # prompt 1 is ignored whatever its logits
  loss, m = losses.place_bce(jnp.asarray(perfect), jnp.asarray(targets), jnp.asarray(weights))
  assert float(loss) < 1e-6 and float(m["place_accuracy"]) == 1.0
  assert float(m["place_prompts"]) == 1.0
  # Zero logits: log 2 over the positives plus log 2 over the negatives (class-balanced).
  loss, m = losses.place_bce(jnp.zeros((1, 2, 4, 4)), jnp.asarray(targets), jnp.asarray(weights))
  np.testing.assert_allclose(float(loss), 2 * np.log(2.0), rtol=1e-6)
  # Everything predicted inside: the 12 negatives are wrong.
  loss, m = losses.place_bce(jnp.full((1, 2, 4, 4), 20.0), jnp.asarray(targets),
                             jnp.asarray(weights))
  np.testing.assert_allclose(float(m["place_accuracy"]), 4 / 16)
  np.testing.assert_allclose(float(loss), 20.0, rtol=1e-6)
  # No prompt with a weighted token: 0, not NaN.
  loss, m = losses.place_bce(jnp.zeros((1, 2, 4, 4)), jnp.asarray(targets), jnp.zeros((1, 2, 2)))
  assert float(loss) == 0.0 and float(m["place_prompts"]) == 0.0


def test_box_giou_spans_the_two_points_and_is_masked():
  # Token 0: the same box with its corners swapped -> 0. Token 1: [0, 0, .5, .5] vs
  # [.5, .5, 1, 1] touch at a corner: IoU 0, hull 1, union .5 -> GIoU -.5 -> loss 1.5.
  # Token 2 is unweighted (anything).
  pred = jnp.asarray([[[0.6, 0.7], [0.1, 0.2]], [[0.0, 0.0], [0.5, 0.5]], [[0.0, 0.0], [1.0, 1.0]]])
  target = jnp.asarray([[[0.1, 0.2], [0.6, 0.7]], [[0.5, 0.5], [1.0, 1.0]], [[0.2, 0.2], [0.3, 0.3]]])
  loss, n = losses.box_giou(pred, target, jnp.asarray([1.0, 1.0, 0.0]))
  np.testing.assert_allclose(float(loss), (0.0 + 1.5) / 2, rtol=1e-6)
  assert float(n) == 2.0
  loss, n = losses.box_giou(pred, target, jnp.zeros(3))
  assert float(loss) == 0.0 and float(n) == 0.0
  grad = jax.grad(lambda p: losses.box_giou(p, target, jnp.ones(3))[0])(pred)
  assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad[1]).sum()) > 0
  with np.testing.assert_raises_regex(ValueError, "2 points"):
    losses.box_giou(jnp.zeros((1, 3, 2)), jnp.zeros((1, 3, 2)), jnp.ones(1))
