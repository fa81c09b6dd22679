"""Referring segmentation: SAM's mask decoder prompted with a box, plus a gated mask adapter.

PixelLLM's refseg stage (anchor section 2.10) segments a referred object by prompting SAM's frozen
mask decoder with the predicted box, after nudging the box's two corner tokens with a residual
computed from what the language model saw: the visual prompt tokens and the text hidden states.

`MaskAdapter` design (ours; the release's `SamMaskAdaptor` differs as noted):
  1. Memory. Prompt tokens [B, Q, Dq] and text states [B, T, Dt] each go through LayerNorm +
     Dense -> D (as in the release), plus a learned source embedding (visual / text) so attention
     can tell them apart, and are concatenated into [B, Q + T, D]. No position encoding: the
     (contextual) language-model states already carry word order, as in the release's zero PE.
  2. `depth` pre-LN blocks: the S sparse SAM tokens (the 2 box corners) cross-attend to the memory,
     then an MLP; a final LayerNorm + Dense gives `update` [B, S, D].
     Padded text positions are masked out of the attention keys (the release has no padding mask
     and instead fills post-EOS tokens with pad at inference). Their values are also zeroed before
     projection, so neither finite nor NaN garbage there can reach the output. A row whose memory is
     entirely padded (Q = 0 and all text padded) gets a zero attention output, not NaN.
  3. Gate: sparse' = sparse + tanh(gate) * update, `gate` float[S, D] (one per prompt token and
     channel, S = 2 box corners: the release's [2, D] alpha) initialised to 0. At gate 0 the sum
     adds exactly 0.0 (the
     update is finite for finite inputs), so the path is bitwise plain SAM and training starts
     from it. tanh rather than a bare multiplier:
     identical at the start (d tanh / dg = 1 at 0) but bounded in (-1, 1), so the 10x adapter
     learning rate cannot blow the prompt scale up. At init only `gate` gets a gradient (the
     update is scaled by tanh(0) = 0); the update's output layer is therefore NOT zero-initialised,
     else gate and update would both stay at zero forever.

`BoxSegmenter` composes the existing modules: `PromptEncoder` (box -> 2 corner tokens + no-mask
dense prompt), `MaskAdapter`, `MaskDecoder`. Pass the modules in; PixelLLM can pass its own
(shared) prompt encoder. `load_sam` fills the SAM parts from a SAM checkpoint and leaves the
adapter at its init. For the refseg stage freeze `prompt_encoder/*` and `mask_decoder/*` (see
`trainable_mask`) and train `mask_adapter/*` (the release: 10x learning rate). Size at the
defaults (D 256, depth 2, MLP 2048) with Dq = Dt = 2048: 3,754,241 parameters (release: ~4.3 M).

Shape legend: B batch (one row per prompt), S sparse prompt tokens (2 for a box), Q visual prompt
tokens, T text length, H/W image-embedding grid, D SAM width (256), M masks returned.
"""
import re
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pixel_llm.models import sam_mask_decoder, sam_prompt_encoder
from pixel_llm.models.layers import dense, layer_norm, with_axes
from pixel_llm.models.two_way_transformer import Attention, MLPBlock

Dtype = Any

SAM_PATCH = 16  # SAM's image encoder stride: the input frame is 16x the embedding grid
TRAINABLE = "mask_adapter"


class MaskAdapter(nn.Module):
  """Gated residual on SAM's sparse prompt tokens from prompt tokens and text states."""

  width: int = 256
  depth: int = 2
  num_heads: int = 8
  mlp_dim: int = 2048
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, sparse: jax.Array, prompt_tokens: jax.Array, text: jax.Array,
               text_mask: jax.Array) -> tuple[jax.Array, dict]:
    """Adds the gated update to the sparse tokens.

    sparse: float[B, S, D]; prompt_tokens: float[B, Q, Dq] (Q may be 0); text: float[B, T, Dt];
    text_mask: bool[B, T] (True = real token).
    Returns (sparse' float32[B, S, D], aux {"update": float32[B, S, D] before the gate,
    "gate": float32[S, D] = tanh(gate)}).
    """
    d = self.width
    if sparse.ndim != 3 or sparse.shape[-1] != d:
      raise ValueError(f"sparse prompt must be [B, S, {d}], got {sparse.shape}.")
    if prompt_tokens.ndim != 3 or text.ndim != 3:
      raise ValueError(f"prompt tokens [B, Q, Dq] and text [B, T, Dt] expected, got "
                       f"{prompt_tokens.shape} and {text.shape}.")
    if text_mask.shape != text.shape[:2]:
      raise ValueError(f"text_mask {text_mask.shape} must be text's [B, T] {text.shape[:2]}.")
    b = sparse.shape[0]
    if prompt_tokens.shape[0] != b or text.shape[0] != b:
      raise ValueError(f"batch sizes differ: sparse {b}, prompt tokens {prompt_tokens.shape[0]}, "
                       f"text {text.shape[0]}.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    text_mask = text_mask.astype(bool)

    source_init = with_axes(nn.initializers.normal(0.02), ("tokens", "embed"))
    source = self.param("source_embed", source_init, (2, d), self.param_dtype).astype(self.dtype)

    def project(x, name):  # inputs come from other towers: their width axis stays unnamed
      x = layer_norm(name=f"{name}_norm", **kw)(x.astype(self.dtype))
      return dense(d, (None, "embed"), name=f"{name}_proj", **kw)(x)

    # Zeroed first so padded garbage (even NaN) never enters the projections.
    text = jnp.where(text_mask[..., None], text, 0)
    memory = jnp.concatenate([project(prompt_tokens, "prompt") + source[0],
                              project(text, "text") + source[1]], axis=1)
    key_mask = jnp.concatenate([jnp.ones(prompt_tokens.shape[:2], bool), text_mask], axis=1)
    has_key = key_mask.any(axis=1)[:, None, None]

    x = sparse.astype(self.dtype)
    for i in range(self.depth):
      q = layer_norm(name=f"layers_{i}_norm1", **kw)(x)
      a = Attention(d, self.num_heads, name=f"layers_{i}_cross_attn", **kw)(
          q, memory, memory, mask=key_mask)
      x = x + jnp.where(has_key, a, 0)  # an all-padded row attends to nothing
      x = x + MLPBlock(d, self.mlp_dim, nn.gelu, name=f"layers_{i}_mlp", **kw)(
          layer_norm(name=f"layers_{i}_norm2", **kw)(x))
    update = dense(d, ("embed", None), name="update_proj", **kw)(
        layer_norm(name="final_norm", **kw)(x)).astype(jnp.float32)

    gate = jnp.tanh(self.param("gate", with_axes(nn.initializers.zeros_init(), (None, None)),
                               sparse.shape[1:], self.param_dtype).astype(jnp.float32))
    out = sparse.astype(jnp.float32) + gate * update
    return out, {"update": update, "gate": gate}


class BoxSegmenter(nn.Module):
  """SAM PromptEncoder (box) -> MaskAdapter -> SAM MaskDecoder.

  prompt_encoder / mask_decoder: `PromptEncoder` / `MaskDecoder` of the same width D;
  mask_adapter: `MaskAdapter` (width D) or None for plain SAM.
  input_size: (h, w) pixels of the frame the boxes live in; None = 16x the embedding grid (SAM).
  """

  prompt_encoder: nn.Module
  mask_decoder: nn.Module
  mask_adapter: nn.Module | None = None
  multimask_output: bool = False  # refseg: one mask per prompt
  input_size: tuple[int, int] | None = None

  @nn.compact
  def __call__(self, image_embeddings: jax.Array, boxes: jax.Array,
               prompt_tokens: jax.Array | None = None, text: jax.Array | None = None,
               text_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict]:
    """Segments each box.

    image_embeddings: float[1 or B, H, W, D] (SAM neck output); boxes: float[B, 4] xyxy pixels of
    the input frame; prompt_tokens: float[B, Q, Dq]; text: float[B, T, Dt]; text_mask: bool[B, T].
    The last three are needed with an adapter and ignored without one.
    Returns (mask logits float32[B, M, 4H, 4W], iou_pred float32[B, M], aux {"sparse": float32
    [B, 2, D] prompt given to the decoder, plus the adapter's "update" and "gate"}).
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
      raise ValueError(f"boxes must be [B, 4] xyxy pixels, got {boxes.shape}.")
    if image_embeddings.ndim != 4:
      raise ValueError(f"image_embeddings must be [B, H, W, D], got {image_embeddings.shape}.")
    grid = tuple(image_embeddings.shape[1:3])
    size = self.input_size or (SAM_PATCH * grid[0], SAM_PATCH * grid[1])
    sparse, dense_prompt = self.prompt_encoder(boxes=boxes, image_grid=grid, input_size=size)
    aux = {}
    if self.mask_adapter is not None:
      if prompt_tokens is None or text is None or text_mask is None:
        raise ValueError("The mask adapter needs prompt_tokens, text and text_mask; pass them, "
                         "or build BoxSegmenter with mask_adapter=None for plain SAM.")
      sparse, aux = self.mask_adapter(sparse, prompt_tokens, text, text_mask)
    image_pe = self.prompt_encoder.get_dense_pe(grid)
    masks, iou = self.mask_decoder(image_embeddings, image_pe, sparse, dense_prompt,
                                   self.multimask_output)
    return masks, iou, {"sparse": sparse, **aux}


# ---------------------------------------------------------------------------------------------
# Weights.
# ---------------------------------------------------------------------------------------------
def _without(tensors, patterns):
  return [(k, v) for k, v in tensors if not any(re.search(p, k) for p in patterns)]


def load_sam_tensors(params: dict, tensors: Iterable[tuple[str, np.ndarray]], source: str,
                     layout: str | None = None) -> dict:
  """BoxSegmenter params (unboxed) with `prompt_encoder` and `mask_decoder` filled from SAM
  checkpoint tensors (segment-anything or HF names, read once); `mask_adapter` keeps its values.

  Raises CheckpointMismatchError (from the SAM converters) on missing / mis-shaped keys.
  """
  for name in ("prompt_encoder", "mask_decoder"):
    if name not in params:
      raise ValueError(f"params have no {name!r} subtree: pass BoxSegmenter's unboxed params.")
  tensors = list(tensors)
  out = dict(params)
  out["prompt_encoder"] = sam_prompt_encoder.load_tensors(
      params["prompt_encoder"], _without(tensors, sam_prompt_encoder.SKIPPED), source)
  out["mask_decoder"] = sam_mask_decoder.load_tensors(
      params["mask_decoder"], _without(tensors, sam_mask_decoder.SKIPPED), source, layout)
  return out


def load_sam(params: dict, path: str, *, layout: str | None = None) -> dict:
  """`load_sam_tensors` from a segment-anything `.pth` or HF safetensors file (the image encoder's
  tensors are skipped while reading)."""
  from pixel_llm.models import checkpoint_io  # pylint: disable=import-outside-toplevel
  image = (r"^(image_encoder|vision_encoder)\.",)
  return load_sam_tensors(params, checkpoint_io.iter_tensors(path, ignore=image), path, layout)


def trainable_mask(params: dict) -> dict:
  """Bool tree like `params`: True under `mask_adapter` (trained), False for SAM (frozen)."""
  return {k: jax.tree.map(lambda _, t=(k == TRAINABLE): t, v) for k, v in params.items()}
