"""Tests for pixel_llm.mask_losses (SAM focal x20 + dice + IoU-prediction MSE).

Values are worked by hand on 1x2 / 2x4 masks: logits 0 and ln 3 give sigmoids 1/2 and 3/4.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixel_llm import mask_losses as ml

LN2 = math.log(2.0)
LOGITS = np.array([[[[0.0, math.log(3.0)]]]], np.float32)  # [B=1, M=1, 1, 2]
GT = np.array([[[1.0, 0.0]]], np.float32)  # [1, 1, 2]
# Pixel 1: p = 1/2, t = 1: ce = ln 2, (1 - p_t)^2 = 1/4, alpha_t = 1/4 -> ln2 / 16.
# Pixel 2: p = 3/4, t = 0: ce = ln 4, (1 - p_t)^2 = 9/16, alpha_t = 3/4 -> 27/32 ln 2.
FOCAL = (1 / 16 + 27 / 32) / 2 * LN2  # mean over the 2 pixels = 29/64 ln 2
# sum(p t) = 1/2, sum(p) = 5/4, sum(t) = 1: 1 - (1 + 1) / (9/4 + 1) = 5/13.
DICE = 5 / 13
# logits > 0 = [0, 1] vs GT [1, 0]: IoU 0; predicted 0.5 -> (0.5 - 0)^2.
IOU_MSE = 0.25
# One compile per shape beats op-by-op dispatch for these many tiny ops.
mask_loss = jax.jit(ml.mask_loss, static_argnames=("focal_weight", "dice_weight", "iou_weight",
                                                    "alpha", "gamma"))


def test_hand_computed_terms():
  loss, aux = mask_loss(LOGITS, np.array([[0.5]]), GT, np.ones(1))
  np.testing.assert_allclose(aux["focal"], FOCAL, rtol=1e-6)
  np.testing.assert_allclose(aux["dice"], DICE, rtol=1e-6)
  np.testing.assert_allclose(aux["iou_mse"], IOU_MSE, rtol=1e-6)
  assert float(aux["mask_iou"]) == 0.0
  np.testing.assert_allclose(loss, 20 * FOCAL + DICE + IOU_MSE, rtol=1e-6)
  # The per-pixel focal loss itself, and custom term weights / alpha.
  np.testing.assert_allclose(ml.sigmoid_focal(LOGITS, GT[:, None]).ravel(),
                             [LN2 / 16, 27 / 32 * LN2], rtol=1e-6)
  loss, _ = mask_loss(LOGITS, np.array([[0.5]]), GT, np.ones(1), focal_weight=1.0,
                         dice_weight=2.0, iou_weight=0.0, alpha=0.5)
  # alpha 1/2: pixel 1 -> ln2 / 8, pixel 2 -> 9/16 ln 2 * 1/2 * 2 = 9/16 ln 2.
  np.testing.assert_allclose(loss, (1 / 8 + 9 / 16) / 2 * LN2 + 2 * DICE, rtol=1e-6)


def test_perfect_mask_and_empty_masks():
  logits = np.array([[[[30.0, -30.0]]]], np.float32)
  loss, aux = mask_loss(logits, np.array([[1.0]]), GT, np.ones(1))
  assert float(aux["mask_iou"]) == 1.0 and float(aux["iou_mse"]) == 0.0
  assert float(aux["focal"]) < 1e-20
  # Dice keeps its +1 smoothing: 1 - (2 + 1) / (2 + 1) up to sigmoid(30) ~ 1 - 1e-13.
  assert abs(float(aux["dice"])) < 1e-6 and float(loss) < 1e-5
  # Empty GT and empty prediction: IoU counts as 1 (nothing to find, nothing found).
  _, aux = mask_loss(-np.abs(logits), np.array([[1.0]]), np.zeros_like(GT), np.ones(1))
  assert float(aux["mask_iou"]) == 1.0


def test_upsampling_is_half_pixel_bilinear():
  # 1D: [a, b] -> [a, 3a/4 + b/4, a/4 + 3b/4, b] (edges clamp), rows copied.
  up = ml.upsample_logits(np.array([[[[0.0, 4.0]]]], np.float32), (2, 4))
  np.testing.assert_allclose(up, [[[[0, 1, 3, 4], [0, 1, 3, 4]]]], atol=1e-6)
  gt = np.array([[[1, 1, 0, 0], [0, 1, 1, 0]]], np.float32)
  small, _ = mask_loss(np.array([[[[0.0, 4.0]]]], np.float32), np.array([[0.3]]), gt,
                          np.ones(1))
  full, aux = mask_loss(np.asarray(up), np.array([[0.3]]), gt, np.ones(1))
  np.testing.assert_allclose(small, full, rtol=1e-6)
  # Binarised [0,1,1,1] twice vs GT: intersection 3, union 7.
  np.testing.assert_allclose(aux["mask_iou"], 3 / 7, rtol=1e-6)


def test_weights_and_pixel_mask():
  other = np.array([[[[2.0, -1.0]]]], np.float32)
  logits = np.concatenate([LOGITS, other])
  iou = np.array([[0.5], [0.9]])
  gt = np.concatenate([GT, GT])
  one, _ = mask_loss(LOGITS, iou[:1], GT, np.ones(1))
  two, _ = mask_loss(other, iou[1:], GT, np.ones(1))
  zeroed, aux = mask_loss(logits, iou, gt, np.array([1.0, 0.0]))
  np.testing.assert_allclose(zeroed, one, rtol=1e-6)
  np.testing.assert_allclose(aux["dice"], DICE, rtol=1e-6)
  both, _ = mask_loss(logits, iou, gt, np.array([1.0, 1.0]))
  np.testing.assert_allclose(both, (one + two) / 2, rtol=1e-6)
  # An ignored example cannot poison the batch, and all-ignored gives 0.
  nan = np.concatenate([LOGITS, np.full_like(other, np.nan)])
  np.testing.assert_allclose(mask_loss(nan, iou, gt, np.array([1.0, 0.0]))[0], one, rtol=1e-6)
  assert float(mask_loss(logits, iou, gt, np.zeros(2))[0]) == 0.0

  # A padded third pixel (any logit, any GT) changes nothing.
  padded = np.array([[[[0.0, math.log(3.0), 7.0]]]], np.float32)
  pixel_mask = np.array([[[1, 1, 0]]], bool)
  loss, aux = mask_loss(padded, np.array([[0.5]]), np.array([[[1.0, 0.0, 0.0]]]), np.ones(1),
                           pixel_mask=pixel_mask)
  np.testing.assert_allclose(loss, 20 * FOCAL + DICE + IOU_MSE, rtol=1e-6)


def test_multimask_takes_the_best_mask():
  good = np.array([[30.0, -30.0]], np.float32)
  logits = np.stack([LOGITS[0, 0], good])[None]  # [1, 2, 1, 2]: mask 1 is perfect
  _, aux = mask_loss(logits, np.array([[0.5, 1.0]]), GT, np.ones(1))
  assert float(aux["focal"]) < 1e-20 and float(aux["mask_iou"]) == 1.0
  np.testing.assert_allclose(aux["iou_mse"], (IOU_MSE + 0.0) / 2, rtol=1e-6)


def test_gradients_are_finite_and_iou_target_is_constant():
  logits = jnp.asarray(np.array([[[[0.0, 100.0], [-100.0, 3.0]]]], np.float32))
  gt = jnp.asarray([[[1.0, 0.0], [1.0, 1.0]]])

  def loss(logits, iou):
    return ml.mask_loss(logits, iou, gt, jnp.ones(1))[0]

  g_logits, g_iou = jax.jit(jax.grad(loss, argnums=(0, 1)))(logits, jnp.asarray([[0.5]]))
  assert np.all(np.isfinite(g_logits)) and np.any(g_logits != 0)
  # IoU of [0,1;0,1] vs [1,0;1,1] = 1/4: d/dpred (pred - 1/4)^2 = 2 * (0.5 - 0.25).
  np.testing.assert_allclose(g_iou, [[0.5]], rtol=1e-6)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="mask_logits"):
    mask_loss(LOGITS[0], np.array([[0.5]]), GT, np.ones(1))
  with pytest.raises(ValueError, match="iou_pred"):
    mask_loss(LOGITS, np.array([0.5]), GT, np.ones(1))
  with pytest.raises(ValueError, match="weights"):
    mask_loss(LOGITS, np.array([[0.5]]), GT, np.ones(2))
  with pytest.raises(ValueError, match="gt_masks"):
    mask_loss(LOGITS, np.array([[0.5]]), GT[0], np.ones(1))
