"""SAM's mask decoder (segment-anything `modeling/mask_decoder.py`) in Flax.

Output tokens (one IoU token, 1 + num_multimask_outputs mask tokens) and the prompt tokens attend
to the image embedding in the `TwoWayTransformer`; the image embedding is upscaled 4x and each mask
token's hypernetwork MLP turns it into per-pixel weights of a low-res mask; an MLP on the IoU token
predicts each mask's quality.

Shape legend: B prompt batch, S sparse prompt tokens, H/W image-embedding grid, D width (256),
M masks returned (3 with multimask_output, else 1), T = 1 + num_multimask_outputs mask tokens.

Parameters (segment-anything key under `mask_decoder.` -> ours):
  iou_token.weight [1, D], mask_tokens.weight [T, D] -> iou_token, mask_tokens (same shapes)
  transformer.*                            -> transformer/* (see two_way_transformer.py)
  output_upscaling.{0,1,3}                 -> output_upscaling/layers_{0,1,3}
  output_hypernetworks_mlps.{i}.layers.{j} -> output_hypernetworks_mlps_{i}/layers_{j}
  iou_prediction_head.layers.{j}           -> iou_prediction_head/layers_{j}
Linear weights are transposed; ConvTranspose2d weights [in, out, kh, kw] become HWIO kernels,
spatially flipped (see `conv_transpose`). `load` also reads HF `facebook/sam-vit-*` safetensors
(`upscale_conv1/2`, `upscale_layer_norm`, `layer_norm{k}`, MLPs as `proj_in`/`layers.{j}`/`proj_out`).

HF's `SamTwoWayAttentionBlock` normalises with its config's eps (1e-6); segment-anything, which
trained the weights, uses 1e-5 as this module (via TwoWayTransformer) does. Outputs therefore
differ slightly from HF's `SamMaskDecoder` unless its config says `layer_norm_eps=1e-5`.
"""
import functools
import itertools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pixel_llm.models import checkpoint_io
from pixel_llm.models.layers import LayerNorm2d, default_kernel_init, with_axes
from pixel_llm.models.location_head import Mlp
from pixel_llm.models.two_way_transformer import TwoWayTransformer

Dtype = Any

HYPERNETWORK_DEPTH = 3  # fixed in segment-anything


def _gelu(x):
  return nn.gelu(x, approximate=False)  # torch nn.GELU is the exact erf form


def conv_transpose(features: int, *, dtype: Dtype = jnp.float32,
                   param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.ConvTranspose:
  """2x2 stride-2 transposed conv (each input pixel -> a 2x2 output block), HWIO kernel named
  (conv_h, conv_w, conv_in, embed).

  Without `transpose_kernel` flax applies the kernel spatially flipped relative to torch's
  ConvTranspose2d, so torch weight [in, out, kh, kw] loads as `w.transpose(2, 3, 0, 1)[::-1, ::-1]`.
  """
  return nn.ConvTranspose(
      features, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype, param_dtype=param_dtype,
      kernel_init=with_axes(default_kernel_init, ("conv_h", "conv_w", "conv_in", "embed")),
      bias_init=with_axes(nn.initializers.zeros_init(), ("embed",)), name=name)


class OutputUpscaling(nn.Module):
  """[B, H, W, D] -> [B, 4H, 4W, D/8]; names follow torch's Sequential indices."""

  embed_dim: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv_transpose(self.embed_dim // 4, name="layers_0", **kw)(x)
    x = _gelu(LayerNorm2d(param_dtype=self.param_dtype, name="layers_1")(x))
    return _gelu(conv_transpose(self.embed_dim // 8, name="layers_3", **kw)(x))


class MaskDecoder(nn.Module):
  """SAM mask decoder; defaults are SAM's (all ViT sizes share them)."""

  transformer_dim: int = 256
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  transformer_depth: int = 2
  transformer_mlp_dim: int = 2048
  transformer_num_heads: int = 8
  attention_downsample_rate: int = 2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array,
               sparse_prompt_embeddings: jax.Array, dense_prompt_embeddings: jax.Array,
               multimask_output: bool, return_aux: bool = False):
    """Predicts masks from image and prompt embeddings.

    image_embeddings: float[1 or B, H, W, D] (batch 1 is shared by every prompt, as SAM's
      `repeat_interleave` does); image_pe: float[H, W, D] or [1 or B, H, W, D];
    sparse_prompt_embeddings: float[B, S, D] (S may be 0);
    dense_prompt_embeddings: float[B (or 1), H, W, D].
    Returns (masks float32[B, M, 4H, 4W] low-res logits, iou_pred float32[B, M]) and, with
    `return_aux`, a third value {"iou_token": [B, D], "mask_tokens": [B, T, D] (all T tokens,
    before slicing), "upscaled_embedding": [B, 4H, 4W, D/8]}, float32.
    """
    d = self.transformer_dim
    num_mask_tokens = self.num_multimask_outputs + 1
    b = sparse_prompt_embeddings.shape[0]
    _, h, w, _ = image_embeddings.shape
    if image_embeddings.shape[0] not in (1, b):
      raise ValueError(f"image batch {image_embeddings.shape[0]} is neither 1 nor the prompt "
                       f"batch {b}")

    def token(name, n):  # torch nn.Embedding: N(0, 1)
      init = with_axes(nn.initializers.normal(1.0), ("tokens", "embed"))
      return self.param(name, init, (n, d), self.param_dtype)

    output_tokens = jnp.concatenate([token("iou_token", 1), token("mask_tokens", num_mask_tokens)])
    output_tokens = jnp.broadcast_to(output_tokens.astype(self.dtype), (b, 1 + num_mask_tokens, d))
    tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings.astype(self.dtype)], axis=1)

    src = jnp.broadcast_to(image_embeddings, (b, h, w, d)) + dense_prompt_embeddings
    pos = jnp.broadcast_to(image_pe, (b, h, w, d))
    hs, src = TwoWayTransformer(
        self.transformer_depth, d, self.transformer_num_heads, self.transformer_mlp_dim,
        attention_downsample_rate=self.attention_downsample_rate, dtype=self.dtype,
        param_dtype=self.param_dtype, name="transformer")(src.astype(self.dtype), pos, tokens)
    iou_token_out = hs[:, 0]
    mask_tokens_out = hs[:, 1:1 + num_mask_tokens]

    upscaled = OutputUpscaling(d, self.dtype, self.param_dtype, name="output_upscaling")(
        src.reshape(b, h, w, d))
    kw = dict(activation="relu", dtype=self.dtype, param_dtype=self.param_dtype)
    hyper_in = jnp.stack([
        Mlp(d, d // 8, HYPERNETWORK_DEPTH, name=f"output_hypernetworks_mlps_{i}", **kw)(
            mask_tokens_out[:, i]) for i in range(num_mask_tokens)], axis=1)
    masks = jnp.einsum("btc,bhwc->bthw", hyper_in, upscaled).astype(jnp.float32)
    iou_pred = Mlp(self.iou_head_hidden_dim, num_mask_tokens, self.iou_head_depth,
                   name="iou_prediction_head", **kw)(iou_token_out).astype(jnp.float32)

    sl = slice(1, None) if multimask_output else slice(0, 1)
    if not return_aux:
      return masks[:, sl], iou_pred[:, sl]
    aux = {"iou_token": iou_token_out, "mask_tokens": mask_tokens_out,
           "upscaled_embedding": upscaled}
    return masks[:, sl], iou_pred[:, sl], jax.tree.map(lambda x: x.astype(jnp.float32), aux)


# ---------------------------------------------------------------------------------------------
# Checkpoint conversion.
# ---------------------------------------------------------------------------------------------
# A full SAM checkpoint also holds the image and prompt encoders: intentionally skipped.
SKIPPED = (r"^(image_encoder|vision_encoder|prompt_encoder|shared_image_embedding)\.",)
PREFIX = "mask_decoder."
_MLPS = r"^(iou_prediction_head|output_hypernetworks_mlps\.\d+)\."
# Names only one layout has. `<mlp>.layers.{j}` exists in both with different meanings.
_LAYOUT_KEYS = {
    "hf": re.compile(r"^vision_encoder\.|^shared_image_embedding\.|\.(proj_in|proj_out|"
                     r"upscale_conv[12]|upscale_layer_norm|layer_norm\d|layer_norm_final_attn)\."),
    "sam": re.compile(r"^image_encoder\.|\.(output_upscaling\.\d|norm\d|norm_final_attn|"
                      r"output_hypernetworks_mlps\.\d+\.layers\.[12])\."),
}
_HF_RENAMES = [(r"^upscale_conv1\.", "output_upscaling.0."),
               (r"^upscale_layer_norm\.", "output_upscaling.1."),
               (r"^upscale_conv2\.", "output_upscaling.3."),
               (r"^transformer\.layer_norm_final_attn\.", "transformer.norm_final_attn."),
               (r"^(transformer\.layers\.\d+)\.layer_norm(\d)\.", r"\1.norm\2.")]


def layout_of(key: str) -> str | None:
  """"sam" or "hf" when `key` exists in only one layout, else None."""
  for layout, pattern in _LAYOUT_KEYS.items():
    if pattern.search(key):
      return layout
  return None


def _hf_to_sam(name: str, iou_head_depth: int) -> str:
  for pattern, repl in _HF_RENAMES:
    name = re.sub(pattern, repl, name)
  m = re.match(_MLPS + r"(proj_in|proj_out|layers\.(\d+))\.(weight|bias)$", name)
  if m:  # HF: proj_in, layers.{0..depth-3}, proj_out = segment-anything layers.{0..depth-1}
    depth = iou_head_depth if m[1] == "iou_prediction_head" else HYPERNETWORK_DEPTH
    j = {"proj_in": 0, "proj_out": depth - 1}.get(m[2]) if m[3] is None else int(m[3]) + 1
    name = f"{m[1]}.layers.{j}.{m[4]}"
  return name


def convert(key: str, value: np.ndarray, *, layout: str | None = None, iou_head_depth: int = 3):
  """segment-anything / HF mask-decoder key -> [(flax path, array)] ([] when not ours).

  `layout` ("sam" / "hf") must be given for keys both layouts use with different meanings
  (`<mlp>.layers.{j}`); `load_tensors` detects it from the checkpoint's other keys.
  """
  if not key.startswith(PREFIX):
    return []
  layout = layout or layout_of(key)
  name = key[len(PREFIX):]
  if layout is None and re.match(_MLPS + r"layers\.", name):
    raise ValueError(f"{key} means different layers in the segment-anything and HF layouts: "
                     "pass layout='sam' or 'hf'.")
  if layout == "hf":
    name = _hf_to_sam(name, iou_head_depth)
  leaf = lambda s: {"weight": "kernel", "bias": "bias"}[s]
  if name in ("iou_token.weight", "mask_tokens.weight"):
    return [((name.split(".")[0],), value)]
  m = re.match(r"^output_upscaling\.([013])\.(weight|bias)$", name)
  if m and m[1] == "1":
    return [(("output_upscaling", "layers_1", m[2]), value)]
  if m:
    array = value.transpose(2, 3, 0, 1)[::-1, ::-1] if m[2] == "weight" else value
    return [(("output_upscaling", f"layers_{m[1]}", leaf(m[2])), array)]
  m = re.match(_MLPS + r"layers\.(\d+)\.(weight|bias)$", name)
  if m:
    module = m[1].replace(".", "_")
    return [((module, f"layers_{m[2]}", leaf(m[3])), value.T if m[3] == "weight" else value)]
  if name.startswith("transformer."):
    *modules, param = re.sub(r"layers\.(\d+)", r"layers_\1", name).split(".")[1:]
    if not modules or param not in ("weight", "bias"):
      return []
    if modules[-1].startswith("norm"):
      return [(("transformer", *modules, "scale" if param == "weight" else "bias"), value)]
    return [(("transformer", *modules, leaf(param)), value.T if param == "weight" else value)]
  return []


def load(init_params, path: str, *, ignore=(), layout: str | None = None):
  """Mask-decoder params shaped like `init_params` (unboxed) from a SAM checkpoint.

  path: segment-anything `sam_vit_*.pth` or HF `facebook/sam-vit-*` safetensors. `layout`: "sam",
  "hf" or None (detected from the key names). `ignore`: extra regexes of keys to skip (`SKIPPED`
  always is). Raises CheckpointMismatchError naming every missing, unexpected and mis-shaped key.
  """
  tensors = checkpoint_io.iter_tensors(path, ignore=(*SKIPPED, *ignore))
  return load_tensors(init_params, tensors, path, layout)


def load_tensors(init_params, tensors, source: str, layout: str | None = None):
  """`load` from an iterator of (key, array) instead of a file."""
  if layout not in (None, "sam", "hf"):
    raise ValueError(f"layout must be 'sam', 'hf' or None, got {layout!r}")
  tensors = iter(tensors)
  seen = []
  if layout is None:  # hold back the (few) keys read before one that tells the layout
    for key, value in tensors:
      seen.append((key, value))
      layout = layout_of(key)
      if layout:
        break
  head = init_params.get("iou_prediction_head", {})
  iou_head_depth = 1 + max((int(k.split("_")[1]) for k in head), default=2)
  convert_fn = functools.partial(convert, layout=layout or "sam", iou_head_depth=iou_head_depth)
  return checkpoint_io.fill(init_params, itertools.chain(seen, tensors), convert_fn, source)
