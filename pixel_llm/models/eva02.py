"""EVA02 ViT (B/14, L/14), the PixelLLM image tower.

Mirrors timm's `eva02_{base,large}_patch14_224` (`timm.models.eva.Eva`, MIM in22k weights):
patch-14 conv stem, class token, absolute position embedding stored on the 224-px grid
(bicubic-resampled to the input grid), 2-D rotary embedding on the patch tokens' q/k, SwiGLU MLP
with a LayerNorm on the hidden units, and a final LayerNorm on all tokens (the MIM checkpoint's
`norm`; timm renames it `fc_norm` for its pooled classifier, we keep it on the tokens as PixelLLM
does).

Parameter tree (timm names with `.` -> `/`, `blocks.i` -> `blocks_i`, weight -> kernel/scale):
  cls_token [1, 1, D], pos_embed [1, 1 + H0*W0, D], patch_embed/proj,
  blocks_i/{norm1, attn/{q_proj, k_proj (no bias), v_proj, proj}, norm2,
            mlp/{fc1_g, fc1_x, norm, fc2}},
  norm.
With `scan_layers` (models/scan.py) the blocks are one `blocks/...` subtree, leaves [depth, ...];
`scan.stack_layers(params, "blocks_{i}", "blocks")` converts, and `load` fills either layout.

`load(init_params, path)` reads timm's `eva02_{base,large}_patch14_*` files (safetensors or .pth;
`norm` or timm's `fc_norm`) and the official EVA02 MIM checkpoints (`attn.q_bias/v_bias`,
`mlp.ffn_ln`, `mlp.w1/w2/w3`; their `mask_token`, `lm_head`, `rope` buffers and any `head` are
skipped).

Shape letters: B batch, H/W patch grid of the input, H0/W0 patch grid at `pretrain_img_size`,
P = H*W patches, T = 1 + P tokens, D width, N heads, Dh head width, F MLP hidden width.
"""
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pixel_llm.models import checkpoint_io, layers, scan

Dtype = Any

VARIANTS = {
    "B": dict(width=768, depth=12, num_heads=12),
    "L": dict(width=1024, depth=24, num_heads=16),
}

_init = nn.initializers.truncated_normal(0.02)


def rope_sincos(grid: tuple[int, int], ref_grid: tuple[int, int] | None, head_dim: int,
                theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """2-D axial rotary tables (timm `RotaryEmbeddingCat`, interleaved layout), float32[P, Dh] each.

  Half of the head dims rotate with the row index, half with the column index, each with Dh/4
  frequencies theta^(-i/(Dh/4)). With `ref_grid`, positions are rescaled so the grid spans
  `ref_grid` (EVA02's `pt_seq_len` trick: a larger input keeps the pretraining position range).
  """
  if head_dim % 4:
    raise ValueError(f"head_dim must be a multiple of 4 for 2-D RoPE, got {head_dim}")
  num_bands = head_dim // 4
  bands = 1.0 / theta ** (np.arange(num_bands, dtype=np.float64) / num_bands)
  ref_grid = ref_grid or grid
  ys, xs = (np.arange(s, dtype=np.float64) / s * r for s, r in zip(grid, ref_grid))
  yy, xx = np.meshgrid(ys, xs, indexing="ij")
  angles = np.concatenate([yy.reshape(-1, 1) * bands, xx.reshape(-1, 1) * bands], axis=-1)
  angles = np.repeat(angles, 2, axis=-1)  # [a0, a0, a1, a1, ...] pairs rotate together
  return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """x: [B, P, N, Dh]; sin/cos: [P, Dh]. Each pair (x0, x1) of a head turns by its own angle."""
  xf = x.astype(jnp.float32)
  pairs = xf.reshape(*xf.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
  sin, cos = sin[:, None, :], cos[:, None, :]
  return (xf * cos + rotated * sin).astype(x.dtype)


def resample_pos_embed(posemb: jax.Array, new_grid: tuple[int, int], old_grid: tuple[int, int],
                       num_prefix: int = 1) -> jax.Array:
  """Bicubic resize of the grid part of `posemb: [1, num_prefix + H0*W0, D]` to `new_grid`.

  Matches timm's `resample_abs_pos_embed` (F.interpolate bicubic, antialias=True, i.e. Keys a=-0.5
  with renormalised border taps), which is what `jax.image.resize` computes. Prefix tokens are kept.
  """
  if tuple(new_grid) == tuple(old_grid):
    return posemb
  prefix, grid = posemb[:, :num_prefix], posemb[:, num_prefix:]
  d = grid.shape[-1]
  grid = grid.reshape(old_grid[0], old_grid[1], d).astype(jnp.float32)
  grid = jax.image.resize(grid, (new_grid[0], new_grid[1], d), method="bicubic", antialias=True)
  grid = grid.reshape(1, -1, d).astype(posemb.dtype)
  return jnp.concatenate([prefix, grid], axis=1)


class Attention(nn.Module):
  """EVA attention: separate q/k/v projections, q and v biases only, RoPE on patch tokens."""

  num_heads: int
  out_init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """x: [B, T, D] (class token first); sin/cos: [T-1, Dh] -> [B, T, D]."""
    b, t, d = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_init)
    q = layers.dense(d, ("embed", "heads"), name="q_proj", **kw)(x)
    k = layers.dense(d, ("embed", "heads"), use_bias=False, name="k_proj", **kw)(x)
    v = layers.dense(d, ("embed", "heads"), name="v_proj", **kw)(x)
    q, k, v = (y.reshape(b, t, self.num_heads, d // self.num_heads) for y in (q, k, v))
    # The class token has no grid position, so only patch tokens are rotated.
    q = jnp.concatenate([q[:, :1], apply_rope(q[:, 1:], sin, cos)], axis=1)
    k = jnp.concatenate([k[:, :1], apply_rope(k[:, 1:], sin, cos)], axis=1)
    out = layers.attention(q, k, v).reshape(b, t, d)
    out_init = nn.initializers.truncated_normal(0.02 * self.out_init_scale)
    return layers.dense(d, ("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=out_init, name="proj")(out)


class SwiGLU(nn.Module):
  """silu(fc1_g x) * fc1_x x -> LayerNorm (EVA02 sub-LN, timm `scale_mlp`) -> fc2."""

  mlp_dim: int
  out_init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, T, D] -> [B, T, D]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_init)
    gate = layers.dense(self.mlp_dim, ("embed", "mlp"), name="fc1_g", **kw)(x)
    hidden = layers.dense(self.mlp_dim, ("embed", "mlp"), name="fc1_x", **kw)(x)
    hidden = nn.silu(gate) * hidden
    hidden = layers.layer_norm(1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                               name="norm")(hidden)
    out_init = nn.initializers.truncated_normal(0.02 * self.out_init_scale)
    return layers.dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype,
                        param_dtype=self.param_dtype, kernel_init=out_init, name="fc2")(hidden)


class Block(nn.Module):
  """Pre-norm transformer block with stochastic depth on both residual branches."""

  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  out_init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _drop(self, y: jax.Array, train: bool, rate: jax.Array | None) -> jax.Array:
    # Each branch draws its own rng so the two residual branches drop independently.
    if rate is not None:  # a scanned layer's own rate (traced)
      return layers.drop_path(y, rate, not train, self.make_rng("dropout") if train else None)
    rng = self.make_rng("dropout") if train and self.drop_path > 0 else None
    return layers.drop_path(y, self.drop_path, not train, rng)

  @nn.compact
  def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, train: bool = False,
               drop_rate: jax.Array | None = None,
               init_scale: jax.Array | None = None) -> jax.Array:
    """x: [B, T, D]; sin/cos: [T-1, Dh] -> [B, T, D].

    drop_rate, init_scale: float32[] per-layer values that replace `drop_path` and
    `out_init_scale` (a scan over blocks feeds them as scanned inputs).
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    scale = self.out_init_scale if init_scale is None else init_scale
    y = layers.layer_norm(1e-6, name="norm1", **kw)(x)
    y = Attention(self.num_heads, scale, name="attn", **kw)(y, sin, cos)
    x = x + self._drop(y, train, drop_rate)
    y = layers.layer_norm(1e-6, name="norm2", **kw)(x)
    x = x + self._drop(SwiGLU(self.mlp_dim, scale, name="mlp", **kw)(y), train, drop_rate)
    return layers.constrain(x, ("batch", "length", "act_embed"))


class Eva02(nn.Module):
  """EVA02 ViT returning the final-normed patch grid and the class token.

  Attributes:
    width, depth, num_heads: D, number of blocks, N.
    mlp_dim: F; None gives timm's int(D * 4 * 2/3) (2048 for B, 2730 for L).
    patch_size: conv stem stride and kernel.
    pretrain_img_size: image side whose grid stores `pos_embed` and is the RoPE reference grid.
    rope_rescale: True (timm / EVA02 fine-tuning): RoPE positions are rescaled to span the
      pretraining grid at any input size. False: integer positions of the input grid, as the scenic
      PixelLLM release computes them (`pt_seq_len` = input grid); both agree at the pretrain size.
    rope_theta: RoPE temperature.
    drop_path_rate: stochastic depth of the last block; linear from 0 over depth.
    remat: rematerialise each block in the backward pass, keeping what `remat_policy` names.
    scan_layers: run the blocks under `nn.scan`; `blocks_i` become one `blocks` subtree whose
      leaves have a leading [depth] axis. The per-block drop-path rate and EVA's per-block output
      init scale are scanned inputs, so both match the unrolled model.
  """

  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_dim: int | None = None
  patch_size: int = 14
  pretrain_img_size: int = 224
  rope_rescale: bool = True
  rope_theta: float = 10000.0
  drop_path_rate: float = 0.1
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def pretrain_grid(self) -> tuple[int, int]:
    g = self.pretrain_img_size // self.patch_size
    return g, g

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict]:
    """image: float32[B, H*14 (+ up to 13), W*14 (+ up to 13), 3], already normalised.

    Returns (features float32[B, H, W, D], {"cls": float32[B, D]}).
    """
    d = self.width
    mlp_dim = self.mlp_dim or int(d * (4 * 2 / 3))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    x = layers.PatchEmbed(d, self.patch_size, _init, name="patch_embed", **kw)(
        image.astype(self.dtype))
    b, h, w, _ = x.shape
    x = x.reshape(b, h * w, d)

    g0 = self.pretrain_grid
    cls = self.param("cls_token", layers.with_axes(_init, (None, None, "embed")), (1, 1, d),
                     self.param_dtype)
    pos = self.param("pos_embed", layers.with_axes(_init, (None, "pos", "embed")),
                     (1, 1 + g0[0] * g0[1], d), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
    x = x + resample_pos_embed(pos, (h, w), g0).astype(x.dtype)

    sin, cos = rope_sincos((h, w), g0 if self.rope_rescale else None, d // self.num_heads,
                           self.rope_theta)
    sin, cos = jnp.asarray(sin), jnp.asarray(cos)

    block_cls = scan.remat_block(Block, self.remat, self.remat_policy, (4,),
                                 scanned=self.scan_layers)
    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    init_scales = 1.0 / np.sqrt(2.0 * np.arange(1, self.depth + 1))  # EVA's fix_init_weight
    if self.scan_layers:
      # Without drop path no rate is fed, so eval and rate-0 training need no dropout rng.
      per_layer = (jnp.asarray(rates, jnp.float32) if self.drop_path_rate > 0 else None,
                   jnp.asarray(init_scales, jnp.float32))

      def call(block, h, bcast, xs):
        return block(h, *bcast, train, *xs)

      x = scan.scan_blocks(block_cls(self.num_heads, mlp_dim, name="blocks", **kw), x,
                           length=self.depth, broadcast=(sin, cos), per_layer=per_layer,
                           call=call)
    else:
      for i in range(self.depth):
        x = block_cls(self.num_heads, mlp_dim, float(rates[i]),
                      out_init_scale=float(init_scales[i]), name=f"blocks_{i}", **kw)(
                          x, sin, cos, train)

    x = layers.layer_norm(1e-6, dtype=jnp.float32, param_dtype=self.param_dtype, name="norm")(x)
    return x[:, 1:].reshape(b, h, w, d), {"cls": x[:, 0]}


def Model(variant: str = "L", **kwargs) -> Eva02:  # pylint: disable=invalid-name
  """Eva02 from a preset name ("B" or "L"); `kwargs` override any field."""
  return Eva02(**{**VARIANTS[variant], **kwargs})


# ---------------------------------------------------------------------------------------------
# Checkpoint conversion.
# ---------------------------------------------------------------------------------------------
# MIM-only tensors and classifier heads: intentionally skipped.
SKIPPED = (r"^(mask_token|lm_head\..*|head\..*)$", r"(^|\.)rope\.")
# Official EVA02 names -> timm's (as timm's `checkpoint_filter_fn` renames them).
_RENAMES = [(r"\.attn\.q_bias$", ".attn.q_proj.bias"), (r"\.attn\.v_bias$", ".attn.v_proj.bias"),
            (r"\.mlp\.ffn_ln\.", ".mlp.norm."), (r"\.mlp\.w1\.", ".mlp.fc1_g."),
            (r"\.mlp\.w2\.", ".mlp.fc1_x."), (r"\.mlp\.w3\.", ".mlp.fc2."),
            (r"^fc_norm\.", "norm.")]
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(norm[12]|attn\.(?:[qkv]_proj|proj)|"
                        r"mlp\.(?:fc1_g|fc1_x|norm|fc2))\.(weight|bias)$")


def convert(key: str, value: np.ndarray):
  """timm / official EVA02 key -> [(flax path, array)] ([] when unknown)."""
  name = key
  for pattern, repl in _RENAMES:
    name = re.sub(pattern, repl, name)
  if name in ("cls_token", "pos_embed"):
    return [((name,), value)]
  if name == "patch_embed.proj.weight":  # (out, in, kh, kw) -> (kh, kw, in, out)
    return [(("patch_embed", "proj", "kernel"), value.transpose(2, 3, 1, 0))]
  if name == "patch_embed.proj.bias":
    return [(("patch_embed", "proj", "bias"), value)]
  if name in ("norm.weight", "norm.bias"):
    return [(("norm", "scale" if name.endswith("weight") else "bias"), value)]
  m = _BLOCK_KEY.match(name)
  if not m:
    return []
  module, leaf = (f"blocks_{m[1]}", *m[2].split(".")), m[3]
  if leaf == "bias":
    return [((*module, "bias"), value)]
  if value.ndim == 2:  # torch Linear (out, in) -> (in, out)
    return [((*module, "kernel"), value.T)]
  return [((*module, "scale"), value)]


def load_tensors(init_params, tensors, source: str, img_size: int | None = None,
                 patch_size: int = 14):
  """`load` from an iterator of (key, array) instead of a file; a scanned `init_params` (one
  `blocks` subtree) gives scanned params."""
  return scan.load_unrolled(
      lambda init: _load_unrolled(init, tensors, source, img_size, patch_size),
      nn.meta.unbox(init_params), "blocks_{i}", "blocks")


def _load_unrolled(init_params, tensors, source, img_size, patch_size):
  target_tokens = np.shape(init_params["pos_embed"])[1]

  def resampled(tensors):
    for key, value in tensors:
      if key == "pos_embed" and img_size is not None and value.shape[1] != target_tokens:
        old = img_size // patch_size
        new = math.isqrt(target_tokens - 1)
        value = np.asarray(resample_pos_embed(value, (new, new), (old, old)))
      yield key, value

  return checkpoint_io.fill(init_params, resampled(tensors), convert, source)


def load(init_params, path: str, *, ignore=(), img_size: int | None = None):
  """EVA02 params shaped like `init_params` (unboxed) from a timm or official EVA02 checkpoint.

  The model stores `pos_embed` on its `pretrain_img_size` grid (and resamples at run time), so a
  224-px checkpoint loads as is. `img_size`: the checkpoint's own pretraining side when it differs
  (e.g. 448); its `pos_embed` is then bicubic-resampled to the model's grid, as timm does at load.
  Without it such a checkpoint is a shape mismatch. `ignore`: extra regexes of keys to skip.
  Raises CheckpointMismatchError naming every missing, unexpected and mis-shaped key.
  """
  tensors = checkpoint_io.iter_tensors(path, ignore=(*SKIPPED, *ignore))
  return load_tensors(init_params, tensors, path, img_size)
