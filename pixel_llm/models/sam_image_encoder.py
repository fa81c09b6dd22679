"""SAM image encoder: segment-anything's `ImageEncoderViT` (ViT-B/L/H with windowed attention).

Shape legend: B batch, H/W patch grid height/width (image size / 16), D width, N heads,
Dh head width (D / N), S window or grid side a relative-position table was stored for,
L table length (2 * S - 1), Bw batch of windows (B * windows per image).

Parameter tree (mirrors the torch module names so the checkpoint converter is a rename):
  patch_embed/proj/{kernel, bias}        conv 16x16 stride 16            (torch patch_embed.proj)
  pos_embed                              [1, 64, 64, D] at 1024 px       (torch pos_embed)
  blocks_{i}/norm1, norm2                LayerNorm eps 1e-6
  blocks_{i}/attn/qkv, attn/proj         Dense with bias
  blocks_{i}/attn/rel_pos_h, rel_pos_w   [2 * S - 1, Dh]: S = 14 windowed, 64 global
  blocks_{i}/mlp/lin1, mlp/lin2          Dense D -> 4D -> D, exact (erf) GELU
  neck/conv1, ln1, conv2, ln2            torch neck.0 .. neck.3 (conv kernels are torch's
                                         weight transposed to (kh, kw, in, out))

`scan_layers=True` (models/scan.py) scans over groups of `period` consecutive blocks, the
repeating windowed/global pattern (ViT-H: 4 groups of 7 windowed + 1 global): block g * period
+ j lives at `blocks/blocks_{j}` index g (leaves [depth / period, ...]). Convert with
`scan.stack_layers(params, "blocks_{i}", "blocks", period=model.period)`; `load` fills either.

Inputs that are not 1024 px (PixelLLM feeds 384 px) get the stored tables resampled at run time:
`pos_embed` bicubic and the relative-position tables linearly, both by default with the exact
sampling math of torch `F.interpolate(..., align_corners=False)` (bicubic A = -0.75, no
antialiasing), as segment-anything / timm code does. `resize_impl="jax"` instead uses
`jax.image.resize` (Keys cubic A = -0.5 and antialiased when downsampling), which is what
scenic's SAM port in the official PixelLLM release used. The two agree for linear upsampling
but differ when downsampling (PixelLLM's 64 -> 24 grid and 127 -> 47 tables): antialiasing
smooths the tables, so use "jax" only with weights trained through that path.

`load(init_params, path)` reads the public weights: segment-anything's `sam_vit_{b,l,h}_*.pth`
(`image_encoder.*`), Hugging Face `facebook/sam-vit-*` (`vision_encoder.*`) or timm's `samvit_*`
(no prefix, `mlp.fc1/fc2`); the prompt encoder and mask decoder keys of a full SAM file are skipped.
"""
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pixel_llm.models import checkpoint_io, scan
from pixel_llm.models.layers import (
    LayerNorm2d, PatchEmbed, attention, constrain, conv, dense, drop_path, layer_norm,
    torch_linear_init, with_axes)

Dtype = Any

VARIANTS = {
    "vit_b": dict(width=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(width=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(width=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


# ---------------------------------------------------------------------------------------------
# Resampling with torch's F.interpolate math. Sizes are static, so the sampling is a small
# constant matrix [out, in] built in numpy (float32 like torch's CPU kernels) and applied
# with a full-precision matmul.
# ---------------------------------------------------------------------------------------------
def linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """float32[out, in] weights of F.interpolate(mode='linear', align_corners=False)."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  src = np.maximum(src, np.float32(0.0))
  i0 = src.astype(np.int64)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0.astype(np.float32)
  mat = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(mat, (rows, i0), np.float32(1.0) - lam)
  np.add.at(mat, (rows, i1), lam)
  return mat


def cubic_resize_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """float32[out, in] weights of F.interpolate(mode='bicubic', align_corners=False) per axis."""
  a = np.float32(a)
  scale = np.float32(in_size) / np.float32(out_size)
  # Unlike linear, torch does not clamp the cubic source coordinate at 0.
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  i0 = np.floor(src)
  t = src - i0

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
  mat = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  for offset, w in zip((-1, 0, 1, 2), weights):
    idx = np.clip(i0.astype(np.int64) + offset, 0, in_size - 1)  # border replication
    np.add.at(mat, (rows, idx), w.astype(np.float32))
  return mat


def _apply(mat: np.ndarray, x: jax.Array, axis: int) -> jax.Array:
  """Resamples `x` along `axis` with the constant matrix `mat` [out, in]."""
  x = jnp.moveaxis(x, axis, 0)
  y = jnp.tensordot(jnp.asarray(mat, x.dtype), x, axes=1, precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(y, 0, axis)


def resize_pos_embed(pos: jax.Array, hw: tuple[int, int], impl: str = "torch") -> jax.Array:
  """Bicubic resize of an absolute position grid. pos: [1, Hs, Ws, D] -> [1, H, W, D]."""
  if pos.shape[1:3] == tuple(hw):
    return pos
  if impl == "jax":
    return jax.image.resize(pos, (1, *hw, pos.shape[-1]), method="bicubic")
  pos = _apply(cubic_resize_matrix(pos.shape[1], hw[0]), pos, 1)
  return _apply(cubic_resize_matrix(pos.shape[2], hw[1]), pos, 2)


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array, impl: str = "torch") -> jax.Array:
  """SAM's `get_rel_pos`: relative-position table [L, Dh] -> per-pair embeddings [q, k, Dh].

  The table is linearly resampled to length 2 * max(q, k) - 1 when it was stored for another
  size; coordinates of the shorter side are stretched when q_size != k_size.
  """
  length = 2 * max(q_size, k_size) - 1
  if rel_pos.shape[0] != length:
    if impl == "jax":
      rel_pos = jax.image.resize(rel_pos, (length, rel_pos.shape[1]), method="linear")
    else:
      rel_pos = _apply(linear_resize_matrix(rel_pos.shape[0], length), rel_pos, 0)
  # torch multiplies an int arange by a Python float in float32 and truncates with .long().
  q_scale = np.float32(max(k_size / q_size, 1.0))
  k_scale = np.float32(max(q_size / k_size, 1.0))
  q_coords = np.arange(q_size, dtype=np.float32)[:, None] * q_scale
  k_coords = np.arange(k_size, dtype=np.float32)[None, :] * k_scale
  coords = (q_coords - k_coords) + np.float32(k_size - 1) * k_scale
  return rel_pos[coords.astype(np.int64)]


def rel_pos_bias(q: jax.Array, rel_pos_h: jax.Array, rel_pos_w: jax.Array,
                 q_size: tuple[int, int], k_size: tuple[int, int],
                 impl: str = "torch") -> jax.Array:
  """MViTv2 decomposed relative position (SAM `add_decomposed_rel_pos`) as an attention bias.

  q: [B, qh * qw, N, Dh] (unscaled queries); returns float32[B, N, qh * qw, kh * kw].
  """
  (qh, qw), (kh, kw) = q_size, k_size
  rh = get_rel_pos(qh, kh, rel_pos_h, impl).astype(jnp.float32)
  rw = get_rel_pos(qw, kw, rel_pos_w, impl).astype(jnp.float32)
  r_q = q.astype(jnp.float32).reshape(q.shape[0], qh, qw, *q.shape[2:])
  rel_h = jnp.einsum("bhwnc,hkc->bnhwk", r_q, rh)
  rel_w = jnp.einsum("bhwnc,wkc->bnhwk", r_q, rw)
  bias = rel_h[..., :, None] + rel_w[..., None, :]
  return bias.reshape(q.shape[0], q.shape[2], qh * qw, kh * kw)


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
  """x: [B, H, W, D] -> (windows [Bw, window, window, D], padded (Hp, Wp)).

  The grid is zero-padded at the bottom/right to a multiple of `window`; as in SAM the padded
  tokens are not masked out of attention.
  """
  b, h, w, d = x.shape
  pad_h, pad_w = -h % window, -w % window
  x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  hp, wp = h + pad_h, w + pad_w
  x = x.reshape(b, hp // window, window, wp // window, window, d)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window, window, d), (hp, wp)


def window_unpartition(windows: jax.Array, window: int, pad_hw: tuple[int, int],
                       hw: tuple[int, int]) -> jax.Array:
  """Inverse of `window_partition`: windows [Bw, window, window, D] -> [B, H, W, D]."""
  (hp, wp), (h, w) = pad_hw, hw
  b = windows.shape[0] // (hp // window * (wp // window))
  x = windows.reshape(b, hp // window, wp // window, window, window, -1)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
  return x[:, :h, :w]


# ---------------------------------------------------------------------------------------------
# Modules.
# ---------------------------------------------------------------------------------------------
class Attention(nn.Module):
  """Multi-head self-attention over a 2D grid with decomposed relative positions.

  `rel_pos_size` is the side S the tables are stored for (the window, or the pretraining grid).
  """

  num_heads: int
  rel_pos_size: int
  resize_impl: str = "torch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, D] -> [B, H, W, D]."""
    b, h, w, d = x.shape
    head_dim = d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=torch_linear_init)
    qkv = dense(3 * d, ("embed", "heads"), name="qkv", **kw)(x)
    # torch reshapes the 3D output as (3, N, Dh), so the kernel columns are laid out the same.
    qkv = qkv.reshape(b, h * w, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    table = with_axes(nn.initializers.zeros_init(), ("relpos", "kv"))
    shape = (2 * self.rel_pos_size - 1, head_dim)
    rel_pos_h = self.param("rel_pos_h", table, shape, self.param_dtype)
    rel_pos_w = self.param("rel_pos_w", table, shape, self.param_dtype)
    bias = rel_pos_bias(q, rel_pos_h, rel_pos_w, (h, w), (h, w), self.resize_impl)
    out = attention(q, k, v, bias=bias).reshape(b, h, w, d)
    return dense(d, ("heads", "embed"), name="proj", **kw)(out)


class MlpBlock(nn.Module):
  """SAM's `MLPBlock`: lin1 -> exact GELU -> lin2."""

  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=torch_linear_init)
    y = dense(self.mlp_dim, ("embed", "mlp"), name="lin1", **kw)(x)
    y = nn.gelu(y, approximate=False)
    return dense(x.shape[-1], ("mlp", "embed"), name="lin2", **kw)(y)


class Block(nn.Module):
  """Pre-norm transformer block; `window_size` 0 means global attention over the whole grid."""

  num_heads: int
  mlp_ratio: float
  window_size: int
  rel_pos_size: int
  drop_path_rate: float = 0.0
  resize_impl: str = "torch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _drop(self, y: jax.Array, train: bool, rate: jax.Array | None) -> jax.Array:
    if rate is not None:  # a scanned layer's own rate (traced)
      return drop_path(y, rate, not train, self.make_rng("dropout") if train else None)
    use_rng = train and self.drop_path_rate > 0.0
    return drop_path(y, self.drop_path_rate, not train,
                     self.make_rng("dropout") if use_rng else None)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               drop_rate: jax.Array | None = None) -> jax.Array:
    """x: [B, H, W, D] -> [B, H, W, D]; drop_rate: float32[] replaces `drop_path_rate`."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = layer_norm(1e-6, name="norm1", **kw)(x)
    if self.window_size > 0:
      hw = y.shape[1:3]
      y, pad_hw = window_partition(y, self.window_size)
    y = Attention(self.num_heads, self.rel_pos_size, self.resize_impl, name="attn", **kw)(y)
    if self.window_size > 0:
      y = window_unpartition(y, self.window_size, pad_hw, hw)
    x = x + self._drop(y, train, drop_rate)
    y = layer_norm(1e-6, name="norm2", **kw)(x)
    y = MlpBlock(int(x.shape[-1] * self.mlp_ratio), name="mlp", **kw)(y)
    return x + self._drop(y, train, drop_rate)


class BlockGroup(nn.Module):
  """One period of the block pattern (ViT-H: 7 windowed + 1 global), the unit `scan_layers`
  repeats; block j is `blocks_{j}` and is global where `is_global[j]`. Only run under nn.scan
  (its remat leaves out CSE barriers)."""

  is_global: tuple[bool, ...]
  num_heads: int
  mlp_ratio: float
  window_size: int
  grid: int
  resize_impl: str = "torch"
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               drop_rates: jax.Array | None = None) -> jax.Array:
    """x: [B, H, W, D] -> [B, H, W, D]; drop_rates: float32[period] or None (no drop path)."""
    block_cls = scan.remat_block(Block, self.remat, self.remat_policy, (2,), scanned=True)
    for j, is_global in enumerate(self.is_global):
      x = block_cls(self.num_heads, self.mlp_ratio, 0 if is_global else self.window_size,
                    self.grid if is_global else self.window_size, resize_impl=self.resize_impl,
                    dtype=self.dtype, param_dtype=self.param_dtype, name=f"blocks_{j}")(
                        x, train, None if drop_rates is None else drop_rates[j])
      x = constrain(x, ("batch", None, None, "act_embed"))
    return x


class Neck(nn.Module):
  """conv 1x1 (no bias) -> LayerNorm2d -> conv 3x3 pad 1 (no bias) -> LayerNorm2d."""

  out_chans: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, D] -> [B, H, W, out_chans]."""
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=torch_linear_init)
    x = conv(self.out_chans, (1, 1), name="conv1", **kw)(x)
    x = LayerNorm2d(1e-6, self.param_dtype, name="ln1")(x)
    x = conv(self.out_chans, (3, 3), padding=((1, 1), (1, 1)), name="conv2", **kw)(x)
    return LayerNorm2d(1e-6, self.param_dtype, name="ln2")(x)


class SamImageEncoder(nn.Module):
  """segment-anything `ImageEncoderViT` (defaults: ViT-H; see `VARIANTS` / `Model`).

  Tables are stored for `pretrain_img_size` (the public checkpoints: 1024 px), so parameter
  shapes never depend on the input size.
  """

  width: int = 1280
  depth: int = 32
  num_heads: int = 16
  global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
  patch_size: int = 16
  window_size: int = 14
  mlp_ratio: float = 4.0
  out_chans: int = 256
  pretrain_img_size: int = 1024
  drop_path_rate: float = 0.0
  resize_impl: str = "torch"  # "torch" (F.interpolate math) or "jax" (scenic's jax.image.resize)
  remat: bool = False  # rematerialise each block, keeping what `remat_policy` names
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = False  # nn.scan over repeats of `period` blocks (see `period`)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict]:
    """image: float32[B, H*16, W*16, 3], already normalised.

    Returns (features float32[B, H, W, out_chans], {"pre_neck": [B, H, W, D]}).
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    x = PatchEmbed(self.width, p, torch_linear_init, name="patch_embed", **kw)(
        image.astype(self.dtype))
    grid = self.pretrain_img_size // p
    pos_init = with_axes(nn.initializers.zeros_init(), (None, "pos", None, "embed"))
    pos = self.param("pos_embed", pos_init, (1, grid, grid, self.width), self.param_dtype)
    x = x + resize_pos_embed(pos, x.shape[1:3], self.resize_impl).astype(self.dtype)

    if self.scan_layers:
      x = self._scanned_blocks(x, grid, train)
    else:
      x = self._unrolled_blocks(x, grid, train)
    features = Neck(self.out_chans, name="neck", **kw)(x)
    return features.astype(jnp.float32), {"pre_neck": x}

  @property
  def period(self) -> int:
    """Smallest p dividing depth with block i global iff block i mod p is (ViT-H/L: 8/6,
    ViT-B: 3; no global block: 1). A pattern without a shorter period gives one group of
    `depth` blocks: scanning that is correct but saves no compile time."""
    is_global = [i in self.global_attn_indexes for i in range(self.depth)]
    return next(p for p in range(1, self.depth + 1)
                if self.depth % p == 0 and is_global == is_global[:p] * (self.depth // p))

  def _scanned_blocks(self, x: jax.Array, grid: int, train: bool) -> jax.Array:
    """Scan over depth / period groups (`blocks/blocks_{j}`, leaves [groups, ...]); the
    per-block drop-path rates ([groups, period]) are a scanned input."""
    p = self.period
    rates = None
    if self.drop_path_rate > 0.0:
      rates = jnp.asarray(self.drop_path_rate * np.arange(self.depth) / max(self.depth - 1, 1),
                          jnp.float32).reshape(-1, p)
    group = BlockGroup(tuple(i in self.global_attn_indexes for i in range(p)), self.num_heads,
                       self.mlp_ratio, self.window_size, grid, self.resize_impl, self.remat,
                       self.remat_policy, self.dtype, self.param_dtype, name="blocks")
    return scan.scan_blocks(group, x, length=self.depth // p, per_layer=rates,
                            call=lambda m, h, _, r: m(h, train, r))

  def _unrolled_blocks(self, x: jax.Array, grid: int, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block_cls = scan.remat_block(Block, self.remat, self.remat_policy, (2,))
    for i in range(self.depth):
      is_global = i in self.global_attn_indexes
      x = block_cls(
          num_heads=self.num_heads,
          mlp_ratio=self.mlp_ratio,
          window_size=0 if is_global else self.window_size,
          rel_pos_size=grid if is_global else self.window_size,
          drop_path_rate=self.drop_path_rate * i / max(self.depth - 1, 1),
          resize_impl=self.resize_impl,
          name=f"blocks_{i}", **kw)(x, train)  # positional: remat's static_argnums
      x = constrain(x, ("batch", None, None, "act_embed"))
    return x


def Model(variant: str = "vit_h", **kw) -> SamImageEncoder:  # pylint: disable=invalid-name
  """`SamImageEncoder` for a named variant ("vit_b", "vit_l", "vit_h"); `kw` overrides fields."""
  return SamImageEncoder(**{**VARIANTS[variant], **kw})


# ---------------------------------------------------------------------------------------------
# Checkpoint conversion.
# ---------------------------------------------------------------------------------------------
# A full SAM checkpoint also holds the prompt encoder and mask decoder: intentionally skipped.
SKIPPED = (r"^(prompt_encoder|mask_decoder|shared_image_embedding)\.",)
LAYOUT_PREFIX = {"sam": "image_encoder.", "hf": "vision_encoder.", "timm": ""}
# Hugging Face / timm module names -> segment-anything's.
_RENAMES = {
    "hf": [(r"^neck\.conv1\.", "neck.0."), (r"^neck\.layer_norm1\.", "neck.1."),
           (r"^neck\.conv2\.", "neck.2."), (r"^neck\.layer_norm2\.", "neck.3."),
           (r"^patch_embed\.projection\.", "patch_embed.proj."), (r"^layers\.", "blocks."),
           (r"\.layer_norm([12])\.", r".norm\1.")],
    "timm": [(r"\.mlp\.fc([12])\.", r".mlp.lin\1.")],
    "sam": [],
}
_NECK = {"0": "conv1", "1": "ln1", "2": "conv2", "3": "ln2"}
_BLOCK_KEY = re.compile(
    r"^blocks\.(\d+)\.(?:(norm[12])\.(weight|bias)|attn\.(qkv|proj)\.(weight|bias)|"
    r"attn\.(rel_pos_[hw])|mlp\.(lin[12])\.(weight|bias))$")


def layout_of(key: str) -> str:
  """Checkpoint layout ("sam", "hf" or "timm") a key belongs to, from its prefix."""
  for layout in ("sam", "hf"):
    if key.startswith(LAYOUT_PREFIX[layout]):
      return layout
  return "timm"


def _sam_name_to_path(name: str, value: np.ndarray):
  """segment-anything image-encoder key (no prefix) -> (flax path, array) or None."""
  conv_kernel = lambda w: w.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
  if name in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
    leaf = "kernel" if name.endswith("weight") else "bias"
    return ("patch_embed", "proj", leaf), conv_kernel(value) if leaf == "kernel" else value
  if name == "pos_embed":
    return ("pos_embed",), value
  if name.startswith("neck.") and name.count(".") == 2:
    _, index, leaf = name.split(".")
    if index in ("0", "2") and leaf == "weight":
      return ("neck", _NECK[index], "kernel"), conv_kernel(value)
    if index in ("1", "3"):
      return ("neck", _NECK[index], leaf), value
    return None
  m = _BLOCK_KEY.match(name)
  if not m:
    return None
  block, (norm, norm_leaf, lin, lin_leaf, table, mlp, mlp_leaf) = f"blocks_{m[1]}", m.groups()[1:]
  if norm:
    return (block, norm, "scale" if norm_leaf == "weight" else "bias"), value
  if table:
    return (block, "attn", table), value
  module, leaf = (("attn", lin), lin_leaf) if lin else (("mlp", mlp), mlp_leaf)
  if leaf == "weight":
    return (block, *module, "kernel"), value.T  # torch Linear (out, in) -> (in, out)
  return (block, *module, "bias"), value


def converter(layout: str | None = None):
  """convert(key, value) for `checkpoint_io.fill`; `layout` None takes each key's own prefix."""

  def convert(key: str, value: np.ndarray):
    lay = layout or layout_of(key)
    prefix = LAYOUT_PREFIX[lay]
    if not key.startswith(prefix):
      return []
    name = key[len(prefix):]
    for pattern, repl in _RENAMES[lay]:
      name = re.sub(pattern, repl, name)
    target = _sam_name_to_path(name, value)
    return [target] if target else []

  return convert


def load_tensors(init_params, tensors, source: str, layout: str | None = None):
  """`load` from an iterator of (key, array) instead of a file; a scanned `init_params`
  (`blocks/blocks_{j}`, see `SamImageEncoder.period`) gives scanned params."""
  if layout is not None and layout not in LAYOUT_PREFIX:
    raise ValueError(f"layout must be one of {sorted(LAYOUT_PREFIX)} or None, got {layout!r}")
  init_params = nn.meta.unbox(init_params)
  period = len(init_params["blocks"]) if "blocks" in init_params else None
  return scan.load_unrolled(
      lambda init: checkpoint_io.fill(init, tensors, converter(layout), source), init_params,
      "blocks_{i}", "blocks", period)


def load(init_params, path: str, *, ignore=(), layout: str | None = None):
  """Image-encoder params shaped like `init_params` (unboxed tree) from a public checkpoint.

  path: segment-anything `.pth`, HF `model.safetensors` (file, folder or sharded index) or a timm
    samvit checkpoint. `layout`: "sam", "hf" or "timm"; None detects it from the key prefixes.
  ignore: extra regexes of checkpoint keys to skip (`SKIPPED` always is).
  Raises CheckpointMismatchError naming every missing, unexpected and mis-shaped key.
  """
  tensors = checkpoint_io.iter_tensors(path, ignore=(*SKIPPED, *ignore))
  return load_tensors(init_params, tensors, path, layout)
