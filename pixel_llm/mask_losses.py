"""SAM-style mask loss for the referring-segmentation stage (anchor section 3, "Mask (SAM)").

Per prompt, each predicted mask's low-res logits are bilinearly upsampled to the GT resolution
(half-pixel centres, torch's `F.interpolate(..., align_corners=False)`) and compared with the GT:

  focal  sigmoid focal loss (alpha 0.25, gamma 2; SAM paper), mean over valid pixels;
  dice   1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1), p = sigmoid(logits), over valid pixels;
  iou    (iou_pred - IoU(logits > 0, GT))^2, the target under stop_gradient.

  loss_b = min over masks m of (focal_weight * focal + dice_weight * dice)   (SAM trains only the
           best of its multimask outputs; with one mask this is just that mask)
           + iou_weight * mean over m of iou.

The batch loss is the validity-weighted mean sum_b w_b loss_b / sum_b w_b (0 when every weight
is 0). The anchor notes scenic's focal default alpha 0.5 in the release; SAM's paper value 0.25
is the default here (`alpha` sets it). An optional `pixel_mask` ignores padded pixels (the release
weights the upsampled masks by the image's padding mask).

Shape legend: B batch (one row per prompt), M masks per prompt, h/w logit grid, H/W GT grid.
"""
import jax
import jax.numpy as jnp

FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0
IOU_WEIGHT = 1.0


def upsample_logits(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
  """float[B, M, h, w] -> float32[B, M, H, W], bilinear with half-pixel centres."""
  logits = logits.astype(jnp.float32)
  if tuple(logits.shape[-2:]) == tuple(size):
    return logits
  return jax.image.resize(logits, (*logits.shape[:-2], *size), "bilinear", antialias=False)


def sigmoid_focal(logits: jax.Array, targets: jax.Array, alpha: float = 0.25,
                  gamma: float = 2.0) -> jax.Array:
  """Per-pixel focal loss (Lin et al. 2017), same shape as `logits`; targets in {0, 1}."""
  p = jax.nn.sigmoid(logits)
  ce = jax.nn.softplus(logits) - logits * targets  # BCE with logits, stable for large |x|
  p_t = p * targets + (1 - p) * (1 - targets)
  alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
  return alpha_t * ce * (1 - p_t) ** gamma


def mask_loss(mask_logits: jax.Array, iou_pred: jax.Array, gt_masks: jax.Array,
              weights: jax.Array, *, pixel_mask: jax.Array | None = None,
              focal_weight: float = FOCAL_WEIGHT, dice_weight: float = DICE_WEIGHT,
              iou_weight: float = IOU_WEIGHT, alpha: float = 0.25,
              gamma: float = 2.0) -> tuple[jax.Array, dict]:
  """SAM mask loss.

  mask_logits: float[B, M, h, w]; iou_pred: float[B, M]; gt_masks: bool/float[B, H, W] (one GT
  per prompt, shared by its M masks); weights: float[B] per-prompt validity (0 = ignore);
  pixel_mask: bool/float[B, H, W] (1 = real pixel) or None.
  Returns (scalar loss, aux of float32 scalars: "focal", "dice", "iou_mse" (the weighted means of
  each unscaled term for the chosen mask; iou_mse over all masks), "mask_iou" (actual IoU of the
  chosen mask)).
  """
  if mask_logits.ndim != 4:
    raise ValueError(f"mask_logits must be [B, M, h, w], got {mask_logits.shape}.")
  b, m = mask_logits.shape[:2]
  if gt_masks.ndim != 3 or gt_masks.shape[0] != b:
    raise ValueError(f"gt_masks must be [B={b}, H, W], got {gt_masks.shape}.")
  if iou_pred.shape != (b, m):
    raise ValueError(f"iou_pred must be [B, M] = {(b, m)}, got {iou_pred.shape}.")
  if weights.shape != (b,):
    raise ValueError(f"weights must be [B] = {(b,)}, got {weights.shape}.")
  if pixel_mask is not None and pixel_mask.shape != gt_masks.shape:
    raise ValueError(f"pixel_mask {pixel_mask.shape} must match gt_masks {gt_masks.shape}.")

  logits = upsample_logits(mask_logits, gt_masks.shape[1:])
  t = gt_masks.astype(jnp.float32)[:, None]
  valid = (jnp.ones_like(t) if pixel_mask is None
           else pixel_mask.astype(jnp.float32)[:, None])
  pix = lambda x: jnp.sum(x * valid, axis=(-2, -1))  # [B, M]

  focal = pix(sigmoid_focal(logits, t, alpha, gamma)) / jnp.maximum(pix(jnp.ones_like(logits)), 1)
  p = jax.nn.sigmoid(logits)
  dice = 1 - (2 * pix(p * t) + 1) / (pix(p) + pix(t) + 1)

  binary = (logits > 0).astype(jnp.float32)
  inter, union = pix(binary * t), pix(jnp.maximum(binary, t))
  actual_iou = jax.lax.stop_gradient(jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0))
  iou_mse = (iou_pred.astype(jnp.float32) - actual_iou) ** 2  # [B, M]

  mask_term = focal_weight * focal + dice_weight * dice
  best = jnp.argmin(mask_term, axis=1)  # [B]
  pick = lambda x: jnp.take_along_axis(x, best[:, None], axis=1)[:, 0]
  per_example = pick(mask_term) + iou_weight * iou_mse.mean(axis=1)

  w = weights.astype(jnp.float32)
  total = jnp.sum(w)
  # `where`, not just w * x: an ignored example's NaN (e.g. an empty padded row) stays out.
  mean = lambda x: jnp.sum(jnp.where(w > 0, w * x, 0.0)) / jnp.where(total > 0, total, 1.0)
  aux = {"focal": mean(pick(focal)), "dice": mean(pick(dice)), "iou_mse": mean(iou_mse.mean(1)),
         "mask_iou": mean(pick(actual_iou))}
  return mean(per_example), aux
