"""T5 v1.1 / Flan-T5 encoder-decoder (gated-GELU, untied head) with optional LoRA.

Mirrors HF `T5ForConditionalGeneration` with `feed_forward_proj="gated-gelu"` and an untied,
unscaled `lm_head`. Parameter paths follow HF's module names so a checkpoint converter is a
rename plus a kernel transpose:

  shared/embedding                                   (vocab, D)
  {encoder,decoder}/relative_attention_bias/embedding (buckets, N)  (HF: in block.0's SelfAttention)
  encoder/block_{i}/layer_0/{SelfAttention/{q,k,v,o}, layer_norm}
  encoder/block_{i}/layer_1/{DenseReluDense/{wi_0,wi_1,wo}, layer_norm}
  decoder/block_{i}/layer_0/SelfAttention, layer_1/EncDecAttention, layer_2/DenseReluDense
  {encoder,decoder}/final_layer_norm, lm_head          (D, vocab)
  LoRA adds `lora_a` (Din, r) and `lora_b` (r, Dout) next to a targeted projection's `kernel`.

`scan_layers=True` runs each stack's blocks under `nn.scan` (models/scan.py): `block_{i}` becomes
one `{encoder,decoder}/block` subtree whose leaves (LoRA factors and decoding caches included)
have a leading [layers] axis; `scan.stack_layers` / `unstack_layers` convert between the layouts
and `load` fills either. `remat` rematerialises each block with `remat_policy`.

Cached decoding (apply with `mutable=["cache"]`): `T5.init_cache(encoded, encoder_mask,
max_length)` creates a "cache" collection (projected cross-attention keys/values and the encoder
mask, computed once; zeroed self-attention key/value buffers of `max_length` positions; a write
index), then each `T5.decode_step(tokens)` feeds S >= 1 new tokens at the index and returns
their logits and hidden states, equal to the teacher-forced `decode` at those positions. Layout:

  decoder/index                                          int32[] (next position to write)
  decoder/{encoder_mask, decoder_mask}                   bool[B, L], bool[B, T] (written keys)
  decoder/block_{i}/layer_0/SelfAttention/cached_{key,value}    [B, N, T, Dh]
  decoder/block_{i}/layer_1/EncDecAttention/cached_{key,value}  [B, N, L, Dh]
  (with scan_layers: decoder/block/layer_{0,1}/..., the same arrays stacked: [layers, B, ...])

`map_cache` applies a function to every per-sequence cache array (beam search reorders them).

`load(init_params, path)` reads HF checkpoints (safetensors, sharded or `pytorch_model.bin`) into
that tree; `hf_key_to_flax` is its key mapping, and models/manifests/flan_t5_*.json list the
published checkpoints' keys and shapes.

Shapes: B batch, L encoder length, T decoder length, D d_model, N heads, Dh d_kv, F d_ff, V vocab.
"""
import dataclasses
import json
import math
import os
import re
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pixel_llm.models import checkpoint_io, layers, scan
from pixel_llm.models.layers import with_axes
from pixel_llm.models.lora import LoraDense

Dtype = Any

LORA_TARGETS = tuple(f"{s}.{p}" for s in ("encoder.self", "decoder.self", "decoder.cross")
                     for p in "qkvo")
DEFAULT_LORA_TARGETS = ("encoder.self.q", "encoder.self.v", "decoder.self.q", "decoder.self.v",
                        "decoder.cross.q", "decoder.cross.v")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Sizes and options; `T5Config.preset("xl", lora_rank=32)` gives a Flan-T5 variant."""

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  num_heads: int = 6
  d_ff: int = 1024
  num_layers: int = 8
  num_decoder_layers: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora_rank: int = 0  # 0 = no LoRA; PixelLLM uses 32.
  lora_scale: float = 2.0
  lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
  remat: bool = False  # rematerialise each block in the backward pass (training memory)
  remat_policy: str = "nothing_saveable"  # what a remat block keeps (layers.REMAT_POLICIES)
  scan_layers: bool = False  # nn.scan over each stack's blocks: `block` with leading [layers]

  def __post_init__(self):
    layers.remat_policy(self.remat_policy)  # fails early on an unknown policy name
    unknown = set(self.lora_targets) - set(LORA_TARGETS)
    if unknown:
      raise ValueError(f"unknown lora_targets {sorted(unknown)}; choose from {LORA_TARGETS}")

  @classmethod
  def preset(cls, variant: str, **overrides) -> "T5Config":
    return dataclasses.replace(PRESETS[variant], **overrides)

  def lora_projections(self, stack: str, kind: str) -> tuple[str, ...]:
    """Projections ('q', 'k', 'v', 'o') of `{stack}.{kind}` attention that carry LoRA."""
    if self.lora_rank <= 0:
      return ()
    return tuple(t.rsplit(".", 1)[1] for t in self.lora_targets if t.startswith(f"{stack}.{kind}."))


PRESETS = {
    "small": T5Config(d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8,
                      num_decoder_layers=8),
    "base": T5Config(d_model=768, d_kv=64, num_heads=12, d_ff=2048, num_layers=12,
                     num_decoder_layers=12),
    "large": T5Config(d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=24,
                      num_decoder_layers=24),
    "xl": T5Config(d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24,
                   num_decoder_layers=24),
    "xxl": T5Config(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                    num_decoder_layers=24),
}


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> jax.Array:
  """HF/Mesh-TF `T5Attention._relative_position_bucket`; relative_position = key - query."""
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(relative_position.dtype) * num_buckets
    n = jnp.abs(relative_position)
  else:
    n = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  # Clamp at 1 so log(0) never reaches the int cast (those positions take the exact branch).
  ratio = jnp.maximum(n, 1).astype(jnp.float32) / max_exact
  large = max_exact + (jnp.log(ratio) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(relative_position.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(n < max_exact, n, large)


class RelativePositionBias(nn.Module):
  """Learned per-head bias over bucketed (key - query) offsets -> float32[1, N, Tq, Tk]."""

  num_heads: int
  bidirectional: bool
  num_buckets: int = 32
  max_distance: int = 128
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_len: int, k_len: int, q_offset: int | jax.Array = 0) -> jax.Array:
    # q_offset lets a cached decoder step ask for the bias of its absolute query position.
    table = self.param("embedding", with_axes(
        nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"), ("relpos", None)),
                       (self.num_buckets, self.num_heads), self.param_dtype)
    rel = jnp.arange(k_len)[None, :] - (jnp.arange(q_len) + q_offset)[:, None]
    buckets = relative_position_bucket(rel, bidirectional=self.bidirectional,
                                       num_buckets=self.num_buckets, max_distance=self.max_distance)
    return jnp.take(table, buckets, axis=0).astype(jnp.float32).transpose(2, 0, 1)[None]


def _dropout(x: jax.Array, rate: float, train: bool) -> jax.Array:
  """nn.Dropout bound to the calling module; skipped (no submodule) when inactive."""
  # Tracing the 48 layers of xl/xxl builds ~1k modules; not creating idle dropouts keeps init fast.
  return nn.Dropout(rate)(x, deterministic=False) if train and rate > 0 else x


class RMSNorm(nn.Module):
  """T5LayerNorm: scale-only, no mean subtraction, variance in float32."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", with_axes(nn.initializers.ones_init(), ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.epsilon)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Attention(nn.Module):
  """T5 multi-head attention: no biases, no 1/sqrt(Dh) logit scale (it lives in the q init).

  x: [B, Tq, D], kv: [B, Tk, D], bias: float32[1|B, N, Tq, Tk], mask: bool[B|1, 1|N, Tq, Tk].
  Returns [B, Tq, D]. With `decode`, self-attention writes the new keys/values into its cache at
  `cache_index` and attends over all `max_length` cached positions (bias/mask cover them all);
  cross-attention projects `kv` into its cache when given (init) and reads the cache otherwise.
  """

  config: T5Config
  lora_projections: tuple[str, ...] = ()
  cross: bool = False

  def _proj(self, name: str, features: int, axes, init) -> LoraDense:
    cfg = self.config
    rank = cfg.lora_rank if name in self.lora_projections else 0
    return LoraDense(features, axes, rank=rank, scale=cfg.lora_scale, kernel_init=init,
                     dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)

  def _cached_kv(self, x, kv, heads, k_proj, v_proj, cache_index, max_length):
    if self.cross:  # Encoder keys/values: projected once per sequence, at init_cache.
      if kv is not None:
        self.put_variable("cache", "cached_key", heads(k_proj(kv)))
        self.put_variable("cache", "cached_value", heads(v_proj(kv)))
      elif not self.has_variable("cache", "cached_key"):
        raise ValueError("No decoding cache: run T5.init_cache (mutable=['cache']) first.")
      return self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")
    k_new, v_new = heads(k_proj(x)), heads(v_proj(x))
    if max_length is None and not self.has_variable("cache", "cached_key"):
      raise ValueError("No decoding cache: run T5.init_cache (mutable=['cache']) first.")
    shape = k_new.shape[:2] + (max_length, k_new.shape[3])
    out = []
    for name, new in (("cached_key", k_new), ("cached_value", v_new)):
      var = self.variable("cache", name, jnp.zeros, shape, new.dtype)
      var.value = jax.lax.dynamic_update_slice(var.value, new.astype(var.value.dtype),
                                               (0, 0, cache_index, 0))
      out.append(var.value)
    return tuple(out)

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array | None, *, bias: jax.Array | None,
               mask: jax.Array | None, train: bool = False, decode: bool = False,
               cache_index: jax.Array | None = None,
               max_length: int | None = None) -> jax.Array:
    cfg = self.config
    inner = cfg.num_heads * cfg.d_kv
    init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

    def q_init(*args):  # T5's 1/sqrt(Dh) attention scale, folded into the query kernel.
      return init(*args) / math.sqrt(cfg.d_kv)

    def heads(t):  # [B, T, N * Dh] -> [B, N, T, Dh]
      return t.reshape(t.shape[:-1] + (cfg.num_heads, cfg.d_kv)).swapaxes(-2, -3)

    q = heads(self._proj("q", inner, ("embed", "heads"), q_init)(x))
    k_proj = self._proj("k", inner, ("embed", "heads"), init)
    v_proj = self._proj("v", inner, ("embed", "heads"), init)
    if decode:
      k, v = self._cached_kv(x, kv, heads, k_proj, v_proj, cache_index, max_length)
    else:
      k, v = heads(k_proj(kv)), heads(v_proj(kv))
    if layers.current_attention_implementation() != "xla" and not (train and cfg.dropout_rate):
      # A fused kernel has no attention-probability dropout, so only where none is applied.
      out = layers.attention(q.swapaxes(-2, -3), k.swapaxes(-2, -3), v.swapaxes(-2, -3),
                             bias=bias, mask=mask, scale=1.0)
      return self._proj("o", cfg.d_model, ("heads", "embed"), init)(
          out.reshape(x.shape[:-1] + (inner,)))
    logits = (q @ k.swapaxes(-1, -2)).astype(jnp.float32)
    if bias is not None:
      logits = logits + bias
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    # HF and t5x both drop attention probabilities, so layers.attention (no dropout) is not used.
    weights = _dropout(jax.nn.softmax(logits, axis=-1), cfg.dropout_rate, train).astype(v.dtype)
    out = (weights @ v).swapaxes(-2, -3).reshape(x.shape[:-1] + (inner,))
    return self._proj("o", cfg.d_model, ("heads", "embed"), init)(out)


class GatedMlp(nn.Module):
  """T5DenseGatedActDense: wo(dropout(gelu_tanh(x @ wi_0) * (x @ wi_1))). x: [..., D]."""

  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    cfg = self.config
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    dense = lambda f, axes, name: LoraDense(  # pylint: disable=unnecessary-lambda-assignment
        f, axes, kernel_init=init, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)
    h = jax.nn.gelu(dense(cfg.d_ff, ("embed", "mlp"), "wi_0")(x), approximate=True)
    h = h * dense(cfg.d_ff, ("embed", "mlp"), "wi_1")(x)
    h = _dropout(h, cfg.dropout_rate, train)
    return dense(cfg.d_model, ("mlp", "embed"), "wo")(h)


class SubLayer(nn.Module):
  """Pre-norm residual sub-layer (HF T5LayerSelfAttention / T5LayerCrossAttention / T5LayerFF)."""

  config: T5Config
  kind: str  # "self", "cross" or "ff"
  lora_projections: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x: jax.Array, *, kv: jax.Array | None = None, bias: jax.Array | None = None,
               mask: jax.Array | None = None, train: bool = False, **cache_kw) -> jax.Array:
    cfg = self.config
    h = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype, name="layer_norm")(x)
    if self.kind == "ff":
      h = GatedMlp(cfg, name="DenseReluDense")(h, train=train)
    else:
      cross = self.kind == "cross"
      name = "EncDecAttention" if cross else "SelfAttention"
      # A cached cross-attention step gets kv=None: its keys/values come from the cache.
      h = Attention(cfg, self.lora_projections, cross, name=name)(
          h, kv if cross else h, bias=bias, mask=mask, train=train, **cache_kw)
    return x + _dropout(h, cfg.dropout_rate, train)


class Block(nn.Module):
  """One encoder (self, ff) or decoder (self, cross, ff) block. x: [B, T, D] -> [B, T, D]."""

  config: T5Config
  is_decoder: bool

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array,
               encoded: jax.Array | None = None, encoder_mask: jax.Array | None = None,
               train: bool = False, **cache_kw) -> jax.Array:
    """cache_kw: `decode`, `cache_index`, `max_length` of a cached decoder step (see Attention).
    Positional arguments, so that `nn.remat` can mark `train` (index 6 with self) static."""
    cfg = self.config
    stack = "decoder" if self.is_decoder else "encoder"
    x = SubLayer(cfg, "self", cfg.lora_projections(stack, "self"), name="layer_0")(
        x, bias=bias, mask=mask, train=train, **cache_kw)
    if self.is_decoder:
      x = SubLayer(cfg, "cross", cfg.lora_projections(stack, "cross"), name="layer_1")(
          x, kv=encoded, mask=encoder_mask, train=train, **cache_kw)
    x = SubLayer(cfg, "ff", name=f"layer_{2 if self.is_decoder else 1}")(x, train=train)
    # Block boundary: batch-sharded. Without it XLA's propagation from the fsdp-sharded weights
    # may leave activations split over D or replicated over the batch.
    return layers.constrain(x, ("batch", "length", "act_embed"))


class Stack(nn.Module):
  """Encoder or decoder stack over already-embedded inputs; returns the final-norm output.

  x: [B, T, D], mask: bool[B, T] (valid positions); for the decoder also encoded: [B, L, D] and
  encoder_mask: bool[B, L]. The relative-position bias is computed once and shared by all blocks.

  `decode=True` (decoder only) is one cached step: x: [B, S, D] are the S new positions starting at
  the cache index, `mask` is ignored, and `encoded`/`encoder_mask`/`max_length` are given only by
  `T5.init_cache` (with S = 0) to create the cache.
  """

  config: T5Config
  is_decoder: bool

  def _decode_masks(self, x, encoder_mask, max_length):
    """Creates/advances the step state -> (key length T, self mask bool[B, 1, S, T],
    encoder mask bool[B, 1, 1, L], index of the first new query) for S new queries."""
    b, s = x.shape[:2]
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if max_length is not None:
      self.put_variable("cache", "encoder_mask", encoder_mask)
    elif not self.has_variable("cache", "encoder_mask"):
      raise ValueError("No decoding cache: run T5.init_cache (mutable=['cache']) first.")
    written = self.variable("cache", "decoder_mask", jnp.zeros, (b, max_length), bool)
    i = index.value
    written.value = jax.lax.dynamic_update_slice(written.value, jnp.ones((b, s), bool), (0, i))
    index.value = i + s
    t = written.value.shape[1]
    query_pos = jnp.arange(s) + i
    causal = jnp.arange(t)[None, :] <= query_pos[:, None]  # [S, T]
    self_mask = written.value[:, None, None, :] & causal[None, None]
    return t, self_mask, self.get_variable("cache", "encoder_mask")[:, None, None, :], i

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, *, encoded: jax.Array | None = None,
               encoder_mask: jax.Array | None = None, train: bool = False, decode: bool = False,
               max_length: int | None = None) -> jax.Array:
    cfg = self.config
    t = x.shape[1]
    relpos = RelativePositionBias(cfg.num_heads, not self.is_decoder,
                                  cfg.relative_attention_num_buckets,
                                  cfg.relative_attention_max_distance, cfg.param_dtype,
                                  name="relative_attention_bias")
    cache_kw = {}
    if decode:
      if not self.is_decoder or train:
        raise ValueError("Cached decoding is for the decoder stack at inference only.")
      k_len, self_mask, encoder_mask, index = self._decode_masks(x, encoder_mask, max_length)
      # The bias of the new queries' absolute positions against every cached key position.
      bias = relpos(t, k_len, q_offset=index)
      cache_kw = dict(decode=True, cache_index=index, max_length=max_length)
    else:
      bias = relpos(t, t)
      self_mask = mask[:, None, None, :]
      if self.is_decoder:
        self_mask = self_mask & jnp.tril(jnp.ones((t, t), bool))[None, None]
        encoder_mask = encoder_mask[:, None, None, :]
    x = layers.constrain(_dropout(x, cfg.dropout_rate, train), ("batch", "length", "act_embed"))
    depth = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
    block_cls = scan.remat_block(Block, cfg.remat and not decode, cfg.remat_policy, (6,),
                                 scanned=cfg.scan_layers)
    if cfg.scan_layers:
      # Python values (train, decode, max_length) are closed over; arrays travel as broadcasts.
      index = cache_kw.pop("cache_index", None)

      def call(block, h, bcast, _):
        *args, cache_index = bcast
        kw = dict(cache_kw, cache_index=cache_index) if decode else {}
        return block(h, *args, train, **kw)

      x = scan.scan_blocks(block_cls(cfg, self.is_decoder, name="block"), x, length=depth,
                           broadcast=(bias, self_mask, encoded, encoder_mask, index), call=call,
                           collections=("params", "cache"))
    else:
      for i in range(depth):
        x = block_cls(cfg, self.is_decoder, name=f"block_{i}")(
            x, bias, self_mask, encoded, encoder_mask, train, **cache_kw)
    return RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype, name="final_layer_norm")(x)


class T5(nn.Module):
  """T5 v1.1 encoder-decoder; `embed`/`encode`/`decode` are usable via `apply(method=...)`."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, name="shared",
                           embedding_init=with_axes(nn.initializers.normal(1.0),
                                                    ("vocab", "embed")))
    self.encoder = Stack(cfg, is_decoder=False, name="encoder")
    self.decoder = Stack(cfg, is_decoder=True, name="decoder")
    # float32 logits as in t5x; v1.1 has no d_model**-0.5 rescale because the head is untied.
    self.lm_head = LoraDense(cfg.vocab_size, ("embed", "vocab"), dtype=jnp.float32,
                             kernel_init=nn.initializers.variance_scaling(
                                 1.0, "fan_in", "truncated_normal"),
                             param_dtype=cfg.param_dtype, name="lm_head")
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """tokens: int32[B, L] -> float[B, L, D] (shared embedding)."""
    return self.shared(tokens)

  def encode(self, inputs_embeds: jax.Array, input_mask: jax.Array, *,
             train: bool = False) -> jax.Array:
    """inputs_embeds: float[B, L, D], input_mask: bool[B, L] -> encoded float[B, L, D]."""
    return self.encoder(inputs_embeds, input_mask, train=train)

  def decode(self, encoded: jax.Array, encoder_mask: jax.Array, decoder_input_tokens: jax.Array,
             *, decoder_mask: jax.Array | None = None,
             train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced decoder.

    encoded: float[B, L, D], encoder_mask: bool[B, L], decoder_input_tokens: int32[B, T],
    decoder_mask: bool[B, T] (valid decoder keys; default all). Returns (logits float32[B, T, V],
    hidden float[B, T, D]) where hidden is the final-norm output before dropout.
    """
    if decoder_mask is None:
      decoder_mask = jnp.ones(decoder_input_tokens.shape, bool)
    hidden = self.decoder(self.embed(decoder_input_tokens), decoder_mask, encoded=encoded,
                          encoder_mask=encoder_mask, train=train)
    logits = self.lm_head(self.dropout(hidden, deterministic=not train))
    return logits, hidden

  def init_cache(self, encoded: jax.Array, encoder_mask: jax.Array, max_length: int) -> None:
    """Creates the decoding cache; apply with `mutable=["cache"]` and keep `["cache"]`.

    encoded: float[B, L, D], encoder_mask: bool[B, L]; max_length: T, the number of decoder
    positions (BOS included) the cache holds. Cross-attention keys/values are projected here, once.
    """
    no_tokens = jnp.zeros((encoded.shape[0], 0), jnp.int32)  # the stack creates, feeds nothing
    self.decoder(self.embed(no_tokens), None, encoded=encoded, encoder_mask=encoder_mask,
                 decode=True, max_length=max_length)

  def decode_step(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cached decoder step; apply with {"params", "cache"} and `mutable=["cache"]`.

    tokens: int32[B, S], the decoder inputs at positions index..index+S-1 (first call: BOS). Returns
    (logits float32[B, S, V], hidden float[B, S, D]) as `decode` gives at those positions; the
    cache index advances by S. Writing past `max_length` is not checked (positions are clamped).
    """
    hidden = self.decoder(self.embed(tokens), None, decode=True)
    return self.lm_head(hidden), hidden

  def __call__(self, encoder_input_tokens: jax.Array, decoder_input_tokens: jax.Array, *,
               train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Plain seq2seq: tokens int32[B, L], int32[B, T] (pad id 0 masks encoder positions).

    Returns (logits float32[B, T, V], {"encoded": [B, L, D], "hidden": [B, T, D]}).
    """
    mask = encoder_input_tokens != 0
    encoded = self.encode(self.embed(encoder_input_tokens), mask, train=train)
    logits, hidden = self.decode(encoded, mask, decoder_input_tokens, train=train)
    return logits, {"encoded": encoded, "hidden": hidden}


def Model(variant: str = "xl", **overrides) -> T5:  # pylint: disable=invalid-name
  """T5 network for a preset name, e.g. `Model("xl", lora_rank=32)`."""
  return T5(T5Config.preset(variant, **overrides))


# Parameter/cache subtree of the blocks of a stack under `scan_layers` (leaves [layers, ...]).
SCANNED_BLOCK = "block"
# Cache entries fixed for a sequence's lifetime; the beams of one prompt share them.
STATIC_CACHE_NAMES = ("EncDecAttention", "encoder_mask")


def map_cache(fn, cache: Any, *, dynamic_only: bool = False) -> Any:
  """Applies fn to every batch-major array ([B, ...]) of a decoding cache (any tree holding T5
  caches); the shared scalar `index` is left as is, and with `dynamic_only` so are the entries in
  STATIC_CACHE_NAMES (a beam reorder within each prompt does not change them). Scanned caches
  ([layers, B, ...] under `block`) get `jax.vmap(fn)`, so fn must be traceable by jax."""
  def apply(path, x):
    keys = [str(getattr(p, "key", p)) for p in path]
    if x.ndim == 0 or (dynamic_only and any(k in STATIC_CACHE_NAMES for k in keys)):
      return x
    # Scanned blocks hold [layers, B, ...]: fn sees each layer's batch-major slice.
    return jax.vmap(fn)(x) if SCANNED_BLOCK in keys else fn(x)
  return jax.tree_util.tree_map_with_path(apply, cache)


# ---------------------------------------------------------------- Hugging Face checkpoints

VANITY_NAMES = {f"flan-t5-{v}": f"google/flan-t5-{v}" for v in PRESETS}

_BLOCK_KEY = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(?:"
                        r"(layer_norm)|(SelfAttention|EncDecAttention)\.([qkvo])|"
                        r"(DenseReluDense)\.(wi_0|wi_1|wo)|"
                        r"SelfAttention\.(relative_attention_bias))\.weight")
# HF itself drops this one: v1.0 checkpoints carry a cross-attention bias that no model uses.
SKIPPED = (r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",)


def hf_key_to_flax(key: str) -> tuple[tuple[str, ...], bool] | None:
  """HF `T5ForConditionalGeneration` key -> (Flax param path, transpose?); None if unknown.

  `{encoder,decoder}.embed_tokens.weight` are `shared.weight`'s tied aliases and map onto it too.
  """
  if key in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
    return ("shared", "embedding"), False
  if key == "lm_head.weight":
    return ("lm_head", "kernel"), True
  m = re.fullmatch(r"(encoder|decoder)\.final_layer_norm\.weight", key)
  if m:
    return (m[1], "final_layer_norm", "scale"), False
  m = _BLOCK_KEY.fullmatch(key)
  if not m:
    return None
  stack, block, layer = m[1], f"block_{m[2]}", f"layer_{m[3]}"
  if m[9]:  # Only block 0 holds the bias table that the whole stack shares.
    return ((stack, "relative_attention_bias", "embedding"), False) if m[2] == "0" else None
  if m[4]:
    return (stack, block, layer, "layer_norm", "scale"), False
  module, proj = (m[5], m[6]) if m[5] else (m[7], m[8])
  return (stack, block, layer, module, proj, "kernel"), True  # torch Linear is (out, in).


def load_tensors(init_params: Any, tensors: Iterator[tuple[str, np.ndarray]],
                 source: str = "checkpoint") -> dict:
  """`load` on (HF key, array) pairs; LoRA factors keep their values from `init_params`.

  `init_params` may be scanned (`scan_layers`): the HF keys fill its unrolled view, restacked.
  """
  return scan.load_unrolled(lambda init: _load_unrolled(init, tensors, source),
                            nn.meta.unbox(init_params), "block_{i}", SCANNED_BLOCK)


def _load_unrolled(init_params: dict, tensors: Iterator[tuple[str, np.ndarray]],
                   source: str) -> dict:
  embedding = []  # The first of the tied input embeddings; later aliases must equal it.

  def convert(key, value):
    target = hf_key_to_flax(key)
    if target is None:
      return []
    path, transpose = target
    if path == ("shared", "embedding"):
      if not embedding:
        embedding.append(value)
      elif embedding[0].shape == value.shape:
        if not np.array_equal(embedding[0], value):
          raise checkpoint_io.CheckpointError(
              f"{source}: {key} differs from the other input embedding; this T5 shares one "
              "embedding between encoder, decoder and `shared` (as every T5 v1.1 checkpoint does).")
        return None  # a verified alias of the tied embedding: nothing more to fill
    return [(path, value.T if transpose else value)]

  return checkpoint_io.fill(nn.meta.unbox(init_params), tensors, convert, source,
                            allow_missing=(r"/lora_[ab]$",))


def checkpoint_files(path: str) -> list[str]:
  """A folder -> its safetensors (preferred) or PyTorch weights; a `.bin` index -> its shards."""
  if os.path.isdir(path):
    for name in ("model.safetensors.index.json", "model.safetensors",
                 "pytorch_model.bin.index.json", "pytorch_model.bin"):
      if os.path.exists(os.path.join(path, name)):
        return checkpoint_files(os.path.join(path, name))
    raise checkpoint_io.CheckpointError(f"{path}: no model.safetensors[.index.json] or "
                                        "pytorch_model.bin[.index.json] inside.")
  if path.endswith(".bin.index.json"):
    try:
      with open(path) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError) as e:
      raise checkpoint_io.CheckpointError(f"{path}: unreadable checkpoint index ({e}).") from e
    return [os.path.join(os.path.dirname(path), shard) for shard in shards]
  return [path]


def load(init_params: Any, path: str, *, ignore: Sequence[str] = ()) -> dict:
  """Reads a Hugging Face (Flan-)T5 v1.1 checkpoint into a tree shaped like `init_params`.

  path: a model folder, `model.safetensors`, `model.safetensors.index.json`, `pytorch_model.bin`
  or `pytorch_model.bin.index.json`; tensors stream one at a time. `ignore`: regexes of HF keys to
  skip. Returns nested numpy arrays (kernels transposed to (in, out)); LoRA factors are not in
  public checkpoints and keep their init (B = 0, so the model starts as the checkpoint). Raises
  CheckpointMismatchError naming every missing, unexpected or mis-shaped key, and CheckpointError
  for unreadable or unsafe files. A scanned `init_params` (`block` subtrees) gives scanned params.
  """
  def tensors():
    for file in checkpoint_files(path):
      yield from checkpoint_io.iter_tensors(file, ignore=tuple(ignore) + SKIPPED)
  return load_tensors(init_params, tensors(), path)


def load_vocab(path: str) -> str:
  """The SentencePiece model (`spiece.model`) shipped beside a HF checkpoint (folder or file)."""
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  vocab = os.path.join(folder, "spiece.model")
  if not os.path.exists(vocab):
    raise FileNotFoundError(f"No spiece.model in {folder!r}: download it with the checkpoint "
                            "(every google/flan-t5-* repository holds one).")
  return vocab
