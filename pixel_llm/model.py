"""The PixelLLM model adapter: everything the binaries need, nothing about how the network is built.

The train, eval and infer binaries talk only to `PixelLLMModel`:
  init_variables(rng, batch)           -> variables (boxed with logical axis names)
  loss_fn(params, batch, rng, train)   -> (loss, metrics)
  predict_batch(params, batch, ...)    -> tokens (greedy / beam / sampled, KV-cached) and one
                                          location per generated token
  score_batch(params, batch)           -> summed log-likelihood of each target

Batch features (B images, R prompts per image, T decoder length, C prompt-text length, K points):
  image                 float32[B, S, S, 3] in [0, 1]
  image_mask            bool[B, S, S] (optional; False on padding)
  prompt_boxes          float32[B, R, 4] xyxy in [0, 1] (optional; default the whole image)
  prompt_text           int32[B, R, C] (optional; 0 = padding)
  decoder_input_tokens  int32[B, R, T]  BOS (0) + targets shifted right
  decoder_target_tokens int32[B, R, T]  targets, EOS (1) last, 0 = padding
  point_targets         float32[B, R, T, K, 2] location of decoder_input_tokens[t], in [0, 1]
  point_weights         float32[B, R, T] 1 where a point target is valid
  caption_weights       float32[B, R] (optional) 0 switches the caption loss off for a prompt
  masks                 uint8[B, R, S, S] (optional; segmentation) the GT mask of each prompt
  mask_weights          float32[B, R] (with masks) 1 where the prompt has a GT mask
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pixel_llm import decode
from pixel_llm import losses
from pixel_llm import mask_losses
from pixel_llm.detection import boxes as box_lib
from pixel_llm.models.pixel_llm import PixelLLM

BOS_ID = 0
EOS_ID = 1

_PROMPT_KEYS = {"prompt_boxes": "prompt_boxes", "prompt_points": "prompt_points",
                "prompt_point_labels": "prompt_point_labels", "prompt_text": "prompt_text",
                "image_mask": "image_mask"}


@dataclasses.dataclass(frozen=True)
class LossConfig:
  label_smoothing: float = 0.1
  caption_weight: float = 1.0
  point_weight: float = 0.1
  # The release's point L1 is in pixels of the padded input (384 px), so its weight 0.1 acts on
  # ~384x larger numbers than a normalised L1. True keeps that balance: the weighted term is
  # point_weight * image_size * L1(normalised). The logged `point_loss` stays normalised.
  point_loss_in_pixels: bool = True
  # Segmentation (a network with a mask decoder, batches with masks): mask_weight x SAM's loss
  # (focal x20 + dice + IoU-prediction MSE, `mask_losses.py`); alpha 0.5 is the release's focal
  # alpha (scenic's default).
  mask_weight: float = 0.0
  mask_focal_alpha: float = 0.5
  # Dense captioning (a network with a proposal head): detection_weight x the CenterNet proposal
  # loss (heatmap focal x0.5 + GIoU), the prompt boxes with caption_weights > 0 as GT regions,
  # plus, with a RoI head, its Fast R-CNN loss (fg / bg cross-entropy + delta L1) as the release.
  detection_weight: float = 0.0
  # Not in the release (a deviation, 0 = off): place_weight x `losses.place_bce` of the prompt
  # feature extractor's per-place logits (`model.prompt_extractor.place_logits`) against the
  # located boxes of each prompt's targets: for referring, "which places hold the referred
  # object", a direct signal for binding the expression's words to places.
  place_weight: float = 0.0
  # Not in the release (a deviation, 0 = off): giou_weight x (1 - GIoU) of the box spanned by
  # each weighted token's 2 predicted points against its target's (`losses.box_giou`). The L1
  # weighs a corner error the same on a small and a large box; P@0.5 does not.
  giou_weight: float = 0.0
  # Which box prompts SAM's mask decoder in training (referring segmentation, segment_box="eos"):
  # "predicted" (the release: the box at EOS, no gradient) or "target" (not in the release, a
  # deviation: the referred GT box, each coordinate moved by Gaussian noise of
  # mask_box_noise x the box side, at most 20 px of the input, SAM's own box-prompt training;
  # for a mask decoder that starts untrained, as the toys' SAM-tiny does). Evaluation always
  # segments the predicted box.
  mask_train_box: str = "predicted"
  mask_box_noise: float = 0.1


def _jittered_target_box(batch: dict[str, Any], noise: float, image_size: float,
                         rng: jax.Array | None) -> jax.Array:
  """The referring GT box (the 2 target points of each prompt's weighted token, the one at EOS),
  corners ordered, each coordinate moved by N(0, noise x box side) clipped to 20 px (no noise
  without rng) and clipped to the image: float32[B, R, 4] xyxy in [0, 1]."""
  w = batch["point_weights"]  # [B, R, T]
  at = jnp.argmax(w, axis=-1)[..., None, None, None]  # [B, R, 1, 1, 1]
  box = box_lib.from_corners(jnp.take_along_axis(batch["point_targets"], at, axis=2)[:, :, 0])
  if rng is not None:
    side = jnp.concatenate([box[..., 2:] - box[..., :2]] * 2, -1)
    step = jax.random.normal(rng, box.shape) * noise * side
    box = box + jnp.clip(step, -20.0 / image_size, 20.0 / image_size)
    box = jnp.concatenate([jnp.minimum(box[..., :2], box[..., 2:]),
                           jnp.maximum(box[..., :2], box[..., 2:])], -1)
  return jnp.clip(box, 0.0, 1.0)


class PixelLLMModel:
  """Adapter around a `PixelLLM` network (t5x `BaseModel` style)."""

  def __init__(self, network: PixelLLM, loss: LossConfig = LossConfig()):
    self.network = network
    self.loss_config = loss
    if loss.mask_train_box not in ("predicted", "target"):
      raise ValueError("loss.mask_train_box must be 'predicted' or 'target', not "
                       f"{loss.mask_train_box!r}.")
    if loss.mask_train_box == "target" and network.segment_box != "eos":
      raise ValueError("loss.mask_train_box='target' replaces the predicted referring box: it "
                       "needs a mask decoder with model.segment_box='eos' (configs/refcoco_seg.py).")

  # -- helpers ---------------------------------------------------------------------------------
  @staticmethod
  def _prompt_kwargs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in _PROMPT_KEYS if batch.get(k) is not None}

  def _apply(self, params, batch, *, train: bool, rng: jax.Array | None):
    # One "dropout" stream serves dropout and the towers' stochastic depth. (The split keeps the
    # key streams, and so the README's measured toy results, unchanged.)
    rngs = {"dropout": jax.random.split(rng)[0]} if train and rng is not None else {}
    kwargs = self._prompt_kwargs(batch)
    if train and self.loss_config.mask_train_box == "target" and batch.get("masks") is not None:
      # (fold_in: a stream of its own, so the dropout keys do not change.)
      kwargs["mask_boxes"] = _jittered_target_box(
          batch, self.loss_config.mask_box_noise, float(self.network.image_size),
          jax.random.fold_in(rng, 1) if rng is not None else None)
    # Which prompt boxes are GT regions, for the training-time proposal matching and RoI
    # sampling (the tasks pad prompts with whole-image boxes of caption weight 0).
    if (train and batch.get("caption_weights") is not None
        and self.network.proposal_head is not None):
      kwargs["region_valid"] = batch["caption_weights"] > 0
    return self.network.apply({"params": params}, batch["image"], batch["decoder_input_tokens"],
                              train=train, rngs=rngs, **kwargs)

  # -- interface ---------------------------------------------------------------------------------
  def init_variables(self, rng: jax.Array, batch: dict[str, Any]) -> dict[str, Any]:
    """Variables for a batch of the given shapes (arrays or ShapeDtypeStructs); use under
    `jax.eval_shape` for a parameter tree without allocation."""
    params_rng, drop_rng, _ = jax.random.split(rng, 3)
    return self.network.init({"params": params_rng, "dropout": drop_rng},
                             batch["image"], batch["decoder_input_tokens"], train=False,
                             **self._prompt_kwargs(batch))

  def loss_fn(self, params, batch: dict[str, Any], rng: jax.Array | None, *,
              train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Caption cross-entropy (label smoothing) + weighted per-token point L1 (see LossConfig).

    Each term is normalised by its own count of valid tokens; a term with no valid token adds 0.
    """
    cfg = self.loss_config
    out, aux = self._apply(params, batch, train=train, rng=rng)
    # Dense captioning on matched proposals: each prompt's targets are its GT region's.
    tb = _follow_matches(batch, aux) if "prompt_gt_index" in aux else batch
    targets = tb["decoder_target_tokens"]
    text_w = (targets > 0).astype(jnp.float32)
    if tb.get("caption_weights") is not None:
      text_w = text_w * tb["caption_weights"][..., None].astype(jnp.float32)
    ce, n_text = losses.label_smoothed_cross_entropy(out["logits"], targets, text_w,
                                                     cfg.label_smoothing)
    l1, n_points = losses.point_l1(out["points"], tb["point_targets"], tb["point_weights"])
    point_scale = float(self.network.image_size) if cfg.point_loss_in_pixels else 1.0
    loss = cfg.caption_weight * ce + cfg.point_weight * point_scale * l1
    metrics = {
        "loss": loss,
        "caption_loss": ce,
        "point_loss": l1,
        "token_accuracy": losses.token_accuracy(out["logits"], targets, text_w),
        "num_text_tokens": n_text,
        "num_point_tokens": n_points,
    }
    if cfg.detection_weight > 0 and "proposals" in aux:
      d_loss, d_metrics = self._proposal_loss(aux, batch)
      loss = loss + cfg.detection_weight * d_loss
      metrics.update(loss=loss, detection_loss=d_loss, heatmap_loss=d_metrics["heatmap"],
                     box_loss=d_metrics["reg"])
    if cfg.detection_weight > 0 and "roi" in aux:
      from pixel_llm.models import roi_head as roi_lib
      r = aux["roi"]
      r_loss, r_metrics = roi_lib.roi_loss(r["logits"], r["pred_deltas"], r)
      loss = loss + cfg.detection_weight * r_loss
      metrics.update(loss=loss, roi_loss=r_loss, **r_metrics)
    if cfg.giou_weight > 0:
      g_loss, _ = losses.box_giou(out["points"], tb["point_targets"], tb["point_weights"])
      loss = loss + cfg.giou_weight * g_loss
      metrics.update(loss=loss, giou_loss=g_loss)
    if cfg.place_weight > 0:
      if "place_logits" not in aux:
        raise ValueError("loss.place_weight needs model.prompt_extractor.place_logits.")
      p_loss, p_metrics = losses.place_bce(aux["place_logits"], tb["point_targets"],
                                           tb["point_weights"])
      loss = loss + cfg.place_weight * p_loss
      metrics.update(loss=loss, place_loss=p_loss, **p_metrics)
    if cfg.mask_weight > 0 and "masks" in aux and batch.get("masks") is not None:
      m_loss, m_aux = self._mask_loss(aux, batch)
      loss = loss + cfg.mask_weight * m_loss
      metrics.update(loss=loss, mask_loss=m_loss, mask_iou=m_aux["mask_iou"])
    return loss, metrics

  def _proposal_loss(self, aux, batch):
    """CenterNet loss of the proposal head against the batch's region boxes [B, R, 4]."""
    from pixel_llm.models import pixel_llm as network_lib
    from pixel_llm.models import proposal_head as proposal_lib
    h, w = network_lib.proposal_frame(aux["image_features"])
    boxes = batch["prompt_boxes"] * jnp.asarray([w, h, w, h], jnp.float32)
    weights = batch.get("caption_weights")
    valid = network_lib.regions(boxes, None if weights is None else weights > 0)
    loss, metrics = proposal_lib.proposal_loss(aux["proposals"], boxes, valid,
                                               self.network.proposal_head.strides)
    return loss, {"heatmap": metrics["heatmap_pos"] + metrics["heatmap_neg"], "reg": metrics["reg"]}

  def dense_caption_batch(self, params, batch: dict[str, Any], *, max_decode_len: int,
                          num_boxes: int = 100, iou_threshold: float = 0.9) -> dict[str, Any]:
    """Dense object captioning: the proposal head's top `num_boxes` boxes (after NMS), each
    captioned greedily through the prompt path (the K boxes of an image share its encoding in
    the captioning pass; detection encodes the image once more). The prompt text is the batch's
    first prompt's (the region prompt).

    Returns {"boxes": float32[B, K, 4] xyxy in [0, 1], "scores": float32[B, K], "valid":
    bool[B, K], "tokens": int32[B, K, L], "points": float32[B, K, L, P, 2]}.
    """
    boxes, scores, valid = self.network.apply(
        {"params": params}, batch["image"], batch.get("image_mask"), num_boxes=num_boxes,
        iou_threshold=iou_threshold, method=self.network.detect)
    b, k = scores.shape
    caption_batch = {"image": batch["image"], "prompt_boxes": boxes}
    if batch.get("image_mask") is not None:
      caption_batch["image_mask"] = batch["image_mask"]
    if batch.get("prompt_text") is not None:
      text = batch["prompt_text"][:, :1]
      caption_batch["prompt_text"] = jnp.broadcast_to(text, (b, k, text.shape[-1]))
    pred = decode.generate(self.network, params, caption_batch, max_decode_len=max_decode_len,
                           method="greedy")
    return {"boxes": boxes, "scores": scores, "valid": valid, "tokens": pred["tokens"],
            "points": pred["points"]}

  def _mask_loss(self, aux, batch):
    """SAM's loss of the predicted masks [B, R, h, w] against the GT masks [B, R, S, S]."""
    b, r, h, w = aux["masks"].shape
    s = batch["masks"].shape[-1]
    pixel_mask = None
    if batch.get("image_mask") is not None:
      pixel_mask = jnp.repeat(batch["image_mask"], r, axis=0)
    return mask_losses.mask_loss(
        aux["masks"].reshape(b * r, 1, h, w), aux["iou_predictions"].reshape(b * r, 1),
        batch["masks"].reshape(b * r, s, s) > 0, batch["mask_weights"].reshape(b * r),
        pixel_mask=pixel_mask, alpha=self.loss_config.mask_focal_alpha)

  def segment_batch(self, params, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """Masks of a network with a mask decoder (referring segmentation: the box predicted at EOS,
    teacher forced): {"boxes": float32[B, R, 4] xyxy in [0, 1] (the boxes that prompted SAM),
    "masks": bool[B, R, S, S] (logits > 0, upsampled to the input image)}."""
    _, aux = self._apply(params, batch, train=False, rng=None)
    if "masks" not in aux:
      raise ValueError("segment_batch needs a network with a mask decoder "
                       "(config.model.mask_decoder.enabled).")
    b, r, h, w = aux["masks"].shape
    s = batch["image"].shape[1]
    logits = mask_losses.upsample_logits(aux["masks"].reshape(b * r, 1, h, w), (s, s))
    return {"boxes": aux["mask_boxes"].astype(jnp.float32),
            "masks": logits.reshape(b, r, s, s) > 0}

  def score_batch(self, params, batch: dict[str, Any]) -> jax.Array:
    """Summed log-probability of `decoder_target_tokens` per prompt: float32[B, R]."""
    out, _ = self._apply(params, batch, train=False, rng=None)
    logp = jax.nn.log_softmax(out["logits"].astype(jnp.float32), -1)
    targets = batch["decoder_target_tokens"]
    tok = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return (tok * (targets > 0)).sum(-1)

  def locate_batch(self, params, batch: dict[str, Any]) -> jax.Array:
    """Referring localization, teacher forced: the K points predicted at the position whose target
    is EOS (the last target token), i.e. where the decoder has read the whole expression: the
    release's convention and the "Box at EOS" of `data/tasks_common.py`.

    Returns float32[B, R, K, 2] in normalised coordinates of the padded image (x, y); with K = 2
    the box [x0, y0, x1, y1] is `reshape(B, R, 4)` (corners as predicted, not ordered).
    """
    out, _ = self._apply(params, batch, train=False, rng=None)
    n = (batch["decoder_target_tokens"] > 0).sum(-1)  # [B, R]; EOS is the last target token
    at = jnp.maximum(n - 1, 0)[..., None, None, None]
    return jnp.take_along_axis(out["points"], at, axis=2)[:, :, 0].astype(jnp.float32)

  def locate_generated_batch(self, params, batch: dict[str, Any], *,
                             max_decode_len: int) -> dict[str, jax.Array]:
    """Referring localization with a *generated* expression: the decoder writes the expression
    greedily from the prompt (the referring prompt holds the query) and the K points are read where
    it emits EOS, i.e. at the input position of the last generated token (the same position the
    teacher-forced `locate_batch` reads). With no token before EOS the first position is read.

    Returns {"points": float32[B, R, K, 2] (as `locate_batch`), "tokens": int32[B, R, L] (the
    generated expression, 0 after EOS), "eos_found": bool[B, R]}.
    """
    pred = self.predict_batch(params, batch, max_decode_len=max_decode_len)
    tokens = pred["tokens"]
    eos_found = (tokens == decode.EOS_ID).any(-1)
    # The expression ends at the first EOS (or a 0, which a decoder could emit), else it runs to
    # the decoder's length.
    stop = (tokens == decode.EOS_ID) | (tokens == 0)
    length = jnp.where(stop.any(-1), jnp.argmax(stop, -1), tokens.shape[-1])
    at = jnp.maximum(length - 1, 0)[..., None, None, None]
    points = jnp.take_along_axis(pred["points"], at, axis=2)[:, :, 0]
    return {"points": points, "tokens": tokens, "eos_found": eos_found}

  def predict_batch(self, params, batch: dict[str, Any], *, max_decode_len: int,
                    method: str = "greedy", beam_size: int = 4, length_penalty: float = 0.6,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    rng: jax.Array | None = None, no_repeat: bool = False) -> dict[str, Any]:
    """Captioning with a location per generated token, on a KV cache (`pixel_llm.decode`).

    method: "greedy", "beam" (beam_size beams, t5x brevity penalty ((5 + len) / 6) **
    length_penalty) or "sample" (temperature, top_k (0 = off), top_p (1 = off), rng); no_repeat
    forbids emitting the token just fed. The image towers run once per image, the T5 encoder once
    per prompt. Settings other than params/batch/rng are static (Python values).

    Returns {"tokens": int32[B, R, L], "points": float32[B, R, L, K, 2], "scores": float32[B, R]}:
    tokens after the first EOS are 0 (their points too), and points[t] is the location of
    tokens[t]. Scores: summed log-probability (beam: divided by the brevity penalty).
    """
    return decode.generate(self.network, params, batch, max_decode_len=max_decode_len,
                           method=method, beam_size=beam_size, length_penalty=length_penalty,
                           temperature=temperature, top_k=top_k, top_p=top_p, rng=rng,
                           no_repeat=no_repeat)

  def predict_batch_uncached(self, params, batch: dict[str, Any], *, max_decode_len: int,
                             no_repeat: bool = False) -> dict[str, Any]:
    """Greedy `predict_batch` without a KV cache: the decoder re-runs over the whole buffer at each
    step. Slow; the reference the cached path is tested against."""
    return decode.generate_uncached(self.network, params, batch, max_decode_len=max_decode_len,
                                    no_repeat=no_repeat)


def _follow_matches(batch: dict[str, Any], aux: dict[str, Any]) -> dict[str, Any]:
  """The batch's per-prompt targets re-indexed to the matched prompts (aux "prompt_gt_index"
  int32[B, R], "prompt_valid" bool[B, R]); an invalid prompt gets caption weight 0."""
  from pixel_llm.models import pixel_llm as network_lib
  index, valid = aux["prompt_gt_index"], aux["prompt_valid"]
  out = {k: network_lib.gather_prompts(batch[k], index)
         for k in ("decoder_target_tokens", "point_targets", "point_weights")}
  weights = batch.get("caption_weights")
  weights = (network_lib.gather_prompts(weights, index) if weights is not None
             else jnp.ones(index.shape, jnp.float32))
  out["caption_weights"] = weights * valid.astype(weights.dtype)
  out["point_weights"] = out["point_weights"] * valid[..., None].astype(out["point_weights"].dtype)
  return out
