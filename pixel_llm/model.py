"""The PixelLLM model adapter: everything the binaries need, nothing about how the network is built.

The train, eval and infer binaries talk only to `PixelLLMModel`:
  init_variables(rng, batch)           -> variables (boxed with logical axis names)
  loss_fn(params, batch, rng, train)   -> (loss, metrics)
  predict_batch(params, batch, ...)    -> greedy tokens and one location per generated token
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
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pixel_llm import losses
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


class PixelLLMModel:
  """Adapter around a `PixelLLM` network (t5x `BaseModel` style)."""

  def __init__(self, network: PixelLLM, loss: LossConfig = LossConfig()):
    self.network = network
    self.loss_config = loss

  # -- helpers ---------------------------------------------------------------------------------
  @staticmethod
  def _prompt_kwargs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in _PROMPT_KEYS if batch.get(k) is not None}

  def _apply(self, params, batch, *, train: bool, rng: jax.Array | None):
    # One "dropout" stream serves dropout and the towers' stochastic depth. (The split keeps the
    # key streams, and so the README's measured toy results, unchanged.)
    rngs = {"dropout": jax.random.split(rng)[0]} if train and rng is not None else {}
    return self.network.apply({"params": params}, batch["image"], batch["decoder_input_tokens"],
                              train=train, rngs=rngs, **self._prompt_kwargs(batch))

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
    out, _ = self._apply(params, batch, train=train, rng=rng)
    targets = batch["decoder_target_tokens"]
    text_w = (targets > 0).astype(jnp.float32)
    if batch.get("caption_weights") is not None:
      text_w = text_w * batch["caption_weights"][..., None].astype(jnp.float32)
    ce, n_text = losses.label_smoothed_cross_entropy(out["logits"], targets, text_w,
                                                     cfg.label_smoothing)
    l1, n_points = losses.point_l1(out["points"], batch["point_targets"], batch["point_weights"])
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
    return loss, metrics

  def score_batch(self, params, batch: dict[str, Any]) -> jax.Array:
    """Summed log-probability of `decoder_target_tokens` per prompt: float32[B, R]."""
    out, _ = self._apply(params, batch, train=False, rng=None)
    logp = jax.nn.log_softmax(out["logits"].astype(jnp.float32), -1)
    targets = batch["decoder_target_tokens"]
    tok = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return (tok * (targets > 0)).sum(-1)

  def predict_batch(self, params, batch: dict[str, Any], *, max_decode_len: int) -> dict[str, Any]:
    """Greedy captioning with a location per generated token (no KV cache yet: each step re-runs
    the decoder over the whole buffer; the image towers and T5 encoder run once).

    Returns {"tokens": int32[B, R, L], "points": float32[B, R, L, K, 2], "scores": float32[B, R]}:
    tokens after the first EOS are 0, and points[t] is the location of tokens[t].
    """
    net = self.network
    variables = {"params": params}
    r = batch["decoder_input_tokens"].shape[1] if "decoder_input_tokens" in batch else 1
    b = batch["image"].shape[0]
    kw = self._prompt_kwargs(batch)

    def encode(mdl):
      feats = mdl.encode_image(batch["image"], kw.get("image_mask"))
      visual = mdl.encode_prompts(feats, boxes=kw.get("prompt_boxes"), points=kw.get("prompt_points"),
                                  point_labels=kw.get("prompt_point_labels"), num_prompts=r)
      return mdl.encode_prefix(visual, kw.get("prompt_text"))

    encoded, enc_mask = net.apply(variables, method=encode)
    n = encoded.shape[0]
    length = max_decode_len + 1  # + BOS

    def step(i, state):
      buf, done, score = state
      logits, _, _ = net.apply(variables, encoded, enc_mask, buf, method=net.decode)
      logp = jax.nn.log_softmax(logits[:, i].astype(jnp.float32), -1)
      nxt = jnp.where(done, 0, logp.argmax(-1))
      score = score + jnp.where(done, 0.0, logp.max(-1))
      buf = buf.at[:, i + 1].set(nxt)
      return buf, done | (nxt == EOS_ID), score

    buf = jnp.zeros((n, length), jnp.int32)
    state = (buf, jnp.zeros((n,), bool), jnp.zeros((n,), jnp.float32))
    buf, _, score = jax.lax.fori_loop(0, max_decode_len, step, state)
    # One more pass with the generated tokens as inputs: the location of token t is read where t
    # is the decoder input (see models/pixel_llm.py).
    _, _, points = net.apply(variables, encoded, enc_mask, buf, method=net.decode)
    tokens = buf[:, 1:]
    points = points[:, 1:]
    return {"tokens": tokens.reshape(b, r, -1),
            "points": points.reshape(b, r, *points.shape[1:]),
            "scores": score.reshape(b, r)}
