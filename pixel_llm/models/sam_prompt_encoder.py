"""SAM's prompt encoder (segment-anything `modeling/prompt_encoder.py`) in Flax.

Turns point / box / mask prompts into SAM's sparse tokens and dense map. Coordinates are PIXELS
(x, y) of the padded input frame, exactly as SAM takes them; `input_size` = (h, w) of that frame
normalises them. PixelLLM uses it frozen, with box prompts (anchor section 2.3).

Shape legend: B batch, N points per prompt, S sparse tokens, H/W embedding grid, D width (256).

Parameters (torch key -> ours; torch `nn.Embedding(1, D)` weights become (D,) vectors):
  pe_layer.positional_encoding_gaussian_matrix -> pe_layer/positional_encoding_gaussian_matrix
  point_embeddings.{i}.weight                  -> point_embeddings_{i}   (i = 0..3)
  not_a_point_embed.weight, no_mask_embed.weight -> not_a_point_embed, no_mask_embed
  mask_downscaling.{0,1,3,4,6}                 -> mask_downscaling/layers_{0,1,3,4,6}
                                                  (conv kernels OIHW -> HWIO)

`load(init_params, path)` reads these from segment-anything's `sam_vit_*.pth` (`prompt_encoder.*`)
or Hugging Face `facebook/sam-vit-*` safetensors (`prompt_encoder.point_embed.{i}`,
`.mask_embed.{conv1, layer_norm1, conv2, layer_norm2, conv3}`, the Gaussian matrix as
`shared_image_embedding.positional_embedding` and/or its tied alias
`prompt_encoder.shared_embedding.positional_embedding`).

`init` creates EVERY parameter (mask_downscaling and the Gaussian matrix included) whatever prompts
it is given: while initialising, the PE and the mask path also run on dummy inputs. So e.g.
`PromptEncoder().init(rng, boxes=b, image_grid=(24, 24), input_size=(384, 384))` yields all
checkpoint keys.
"""
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pixel_llm.models import checkpoint_io
from pixel_llm.models.layers import LayerNorm2d, conv, torch_linear_init, with_axes

Dtype = Any

# SAM's point labels.
LABEL_PAD = -1
LABEL_NEGATIVE = 0
LABEL_POSITIVE = 1


class PositionEmbeddingRandom(nn.Module):
  """Random Fourier features of (x, y) in [0, 1] (SAM's `PositionEmbeddingRandom`).

  The Gaussian matrix is a torch buffer, fixed after init; here it is a parameter (so checkpoints
  load) used under `stop_gradient`. Optimisers must still leave it alone (no weight decay).
  """

  num_pos_feats: int = 128
  scale: float = 1.0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, coords: jax.Array) -> jax.Array:
    """coords: float[..., 2] (x, y) in [0, 1] -> float32[..., 2 * num_pos_feats] = [sin, cos]."""
    matrix = self.param("positional_encoding_gaussian_matrix",
                        with_axes(nn.initializers.normal(self.scale), (None, None)),
                        (2, self.num_pos_feats), self.param_dtype)
    matrix = jax.lax.stop_gradient(matrix).astype(jnp.float32)
    coords = 2.0 * coords.astype(jnp.float32) - 1.0
    coords = 2.0 * math.pi * (coords @ matrix)
    return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)


def dense_grid(grid: tuple[int, int]) -> jax.Array:
  """Cell centres of an (h, w) grid as float32[h, w, 2] (x, y) in (0, 1): ((j+0.5)/w, (i+0.5)/h)."""
  h, w = grid
  ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
  xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
  return jnp.stack(jnp.meshgrid(xs, ys, indexing="xy"), axis=-1)


class MaskDownscaling(nn.Module):
  """Low-res mask [B, 4H, 4W, 1] -> [B, H, W, D]; names follow torch's Sequential indices."""

  embed_dim: int = 256
  mask_in_chans: int = 16
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, masks: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=torch_linear_init)
    gelu = lambda x: nn.gelu(x, approximate=False)  # torch nn.GELU is the exact erf form.
    x = conv(self.mask_in_chans // 4, (2, 2), strides=(2, 2), name="layers_0", **kw)(masks)
    x = gelu(LayerNorm2d(param_dtype=self.param_dtype, name="layers_1")(x))
    x = conv(self.mask_in_chans, (2, 2), strides=(2, 2), name="layers_3", **kw)(x)
    x = gelu(LayerNorm2d(param_dtype=self.param_dtype, name="layers_4")(x))
    return conv(self.embed_dim, (1, 1), name="layers_6", **kw)(x)


class PromptEncoder(nn.Module):
  """SAM prompt encoder; sizes are fields, the frame and grid sizes are call arguments."""

  embed_dim: int = 256
  mask_in_chans: int = 16
  pe_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.pe_layer = PositionEmbeddingRandom(self.embed_dim // 2, self.pe_scale, self.param_dtype)
    # torch nn.Embedding initialises N(0, 1).
    emb = lambda name: self.param(name, with_axes(nn.initializers.normal(1.0), ("embed",)),
                                  (self.embed_dim,), self.param_dtype)
    self.point_embeddings = [emb(f"point_embeddings_{i}") for i in range(4)]
    self.not_a_point_embed = emb("not_a_point_embed")
    self.no_mask_embed = emb("no_mask_embed")
    self.mask_downscaling = MaskDownscaling(self.embed_dim, self.mask_in_chans, self.dtype,
                                            self.param_dtype)

  def _pe_pixels(self, coords: jax.Array, input_size: tuple[int, int]) -> jax.Array:
    h, w = input_size
    scale = jnp.array([1.0 / w, 1.0 / h], jnp.float32)
    return self.pe_layer(coords.astype(jnp.float32) * scale)

  def _embed_points(self, points, labels, pad, input_size):
    points = points.astype(jnp.float32) + 0.5  # pixel centre
    labels = labels.astype(jnp.int32)
    if pad:
      # SAM appends one "not a point" token when there is no box.
      b = points.shape[0]
      points = jnp.concatenate([points, jnp.zeros((b, 1, 2), jnp.float32)], axis=1)
      labels = jnp.concatenate([labels, jnp.full((b, 1), LABEL_PAD, jnp.int32)], axis=1)
    pe = self._pe_pixels(points, input_size)
    lab = labels[..., None]
    pt = lambda v: v.astype(jnp.float32)
    out = jnp.where(lab == LABEL_PAD, pt(self.not_a_point_embed), pe)
    out = out + jnp.where(lab == LABEL_NEGATIVE, pt(self.point_embeddings[0]), 0.0)
    return out + jnp.where(lab == LABEL_POSITIVE, pt(self.point_embeddings[1]), 0.0)

  def _embed_boxes(self, boxes, input_size):
    corners = boxes.astype(jnp.float32).reshape(boxes.shape[0], 2, 2) + 0.5
    pe = self._pe_pixels(corners, input_size)
    corner_type = jnp.stack([self.point_embeddings[2], self.point_embeddings[3]])
    return pe + corner_type.astype(jnp.float32)

  def __call__(self, *, points: jax.Array | None = None, point_labels: jax.Array | None = None,
               boxes: jax.Array | None = None, masks: jax.Array | None = None,
               image_grid: tuple[int, int], input_size: tuple[int, int]):
    """Embeds prompts.

    points: float[B, N, 2] (x, y) pixels; point_labels: int32[B, N] (1 positive, 0 negative,
      -1 padding). Without boxes, one padding point is appended (SAM), so S = N + 1.
    boxes: float[B, 4] xyxy pixels -> 2 corner tokens (after the points).
    masks: float[B, 4H, 4W] or [B, 4H, 4W, 1] low-res mask logits.
    image_grid: (H, W) of the image embedding; input_size: (h, w) pixels of the padded frame.
    Returns (sparse float32[B, S, D], dense float32[B, H, W, D]); S = 0 without points and boxes.
    """
    batch = next((x.shape[0] for x in (points, boxes, masks) if x is not None), 1)
    sparse = [jnp.zeros((batch, 0, self.embed_dim), jnp.float32)]
    if points is not None:
      if point_labels is None:
        raise ValueError("points need point_labels.")
      sparse.append(self._embed_points(points, point_labels, boxes is None, input_size))
    if boxes is not None:
      sparse.append(self._embed_boxes(boxes, input_size))
    sparse = jnp.concatenate(sparse, axis=1)

    if self.is_initializing():  # create every checkpoint key whatever the prompts
      self.pe_layer(jnp.zeros((1, 2), jnp.float32))
      if masks is None:
        self.mask_downscaling(jnp.zeros((1, 4, 4, 1), self.dtype))
    if masks is not None:
      if masks.ndim == 3:
        masks = masks[..., None]
      dense = self.mask_downscaling(masks.astype(self.dtype)).astype(jnp.float32)
      if dense.shape[1:3] != tuple(image_grid):
        raise ValueError(f"mask of {masks.shape} gives grid {dense.shape[1:3]}, not {image_grid}")
    else:
      dense = jnp.broadcast_to(self.no_mask_embed.astype(jnp.float32),
                               (batch, *image_grid, self.embed_dim))
    return sparse, dense

  def get_dense_pe(self, grid: tuple[int, int]) -> jax.Array:
    """Positional encoding of the image grid's cell centres: float32[H, W, D]."""
    return self.pe_layer(dense_grid(grid))


# ---------------------------------------------------------------------------------------------
# Checkpoint conversion.
# ---------------------------------------------------------------------------------------------
# A full SAM checkpoint also holds the image encoder and mask decoder: intentionally skipped.
SKIPPED = (r"^(image_encoder|vision_encoder|mask_decoder)\.",)
_HF_MASK = {"conv1": "0", "layer_norm1": "1", "conv2": "3", "layer_norm2": "4", "conv3": "6"}
_GAUSSIAN = ("pe_layer", "positional_encoding_gaussian_matrix")


def _to_sam_name(key: str) -> str | None:
  """HF key -> segment-anything name without the `prompt_encoder.` prefix (None: not ours)."""
  if key in ("shared_image_embedding.positional_embedding",
             "prompt_encoder.shared_embedding.positional_embedding"):
    return "pe_layer.positional_encoding_gaussian_matrix"
  if not key.startswith("prompt_encoder."):
    return None
  name = key[len("prompt_encoder."):]
  name = re.sub(r"^point_embed\.", "point_embeddings.", name)
  m = re.match(r"^mask_embed\.(\w+)\.(weight|bias)$", name)
  if m and m[1] in _HF_MASK:
    name = f"mask_downscaling.{_HF_MASK[m[1]]}.{m[2]}"
  return name


def convert(key: str, value: np.ndarray):
  """segment-anything / HF prompt-encoder key -> [(flax path, array)] ([] when not ours)."""
  name = _to_sam_name(key)
  if name is None:
    return []
  if name == "pe_layer.positional_encoding_gaussian_matrix":
    return [(_GAUSSIAN, value)]
  m = re.match(r"^(?:point_embeddings\.([0-3])|(not_a_point_embed|no_mask_embed))\.weight$", name)
  if m:  # nn.Embedding(1, D) weights [1, D] -> [D]
    return [((f"point_embeddings_{m[1]}" if m[1] else m[2],), value.reshape(-1))]
  m = re.match(r"^mask_downscaling\.([0-9])\.(weight|bias)$", name)
  if m and m[1] in ("0", "3", "6"):
    leaf, array = ("kernel", value.transpose(2, 3, 1, 0)) if m[2] == "weight" else ("bias", value)
    return [(("mask_downscaling", f"layers_{m[1]}", leaf), array)]
  if m and m[1] in ("1", "4"):  # LayerNorm2d keeps torch's weight / bias names
    return [(("mask_downscaling", f"layers_{m[1]}", m[2]), value)]
  return []


def load(init_params, path: str, *, ignore=()):
  """Prompt-encoder params shaped like `init_params` (unboxed) from a SAM checkpoint.

  path: segment-anything `sam_vit_*.pth` or HF `facebook/sam-vit-*` safetensors; the layout comes
  from the key names. `ignore`: extra regexes of keys to skip (`SKIPPED` always is).
  Raises CheckpointMismatchError naming every missing, unexpected and mis-shaped key.
  """
  return load_tensors(init_params, checkpoint_io.iter_tensors(path, ignore=(*SKIPPED, *ignore)),
                      path)


# HF SamModel ties the prompt encoder's positional matrix to the image-embedding one.
_TIED = (("shared_image_embedding.positional_embedding",
          "prompt_encoder.shared_embedding.positional_embedding"),)


def load_tensors(init_params, tensors, source: str):
  """`load` from an iterator of (key, array) instead of a file."""
  tensors = checkpoint_io.drop_aliases(tensors, _TIED, source)
  return checkpoint_io.fill(init_params, tensors, convert, source)
