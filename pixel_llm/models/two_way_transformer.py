"""SAM's `TwoWayTransformer` (segment-anything `modeling/transformer.py`) in Flax.

Sparse tokens and an image map attend to each other: per block, token self-attention, token->image
cross-attention, an MLP on the tokens, and image->token cross-attention; then a final token->image
attention. Used by the PixelLLM prompt feature extractor and by SAM's mask decoder.

Shape legend: B batch, S tokens (queries), H/W image grid, L = H*W image tokens, D width.

Parameter names mirror the torch module (`layers.{i}.self_attn.q_proj` -> `layers_{i}/self_attn/
q_proj`, Linear weight transposed to the Dense kernel). All LayerNorms use torch's eps 1e-5 (HF's
`SamTwoWayAttentionBlock` uses its config's 1e-6 instead; the final norm is 1e-5 in both).
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixel_llm.models.layers import attention, default_kernel_init, dense, layer_norm

Dtype = Any


class Attention(nn.Module):
  """SAM attention: q/k/v project D -> D // downsample_rate, split into heads, project back."""

  embedding_dim: int
  num_heads: int
  downsample_rate: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable[..., jax.Array] = default_kernel_init

  @nn.compact
  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array,
               mask: jax.Array | None = None) -> jax.Array:
    """q: [B, Tq, D], k/v: [B, Tk, D], mask: bool[B, Tk] (True = attend) -> [B, Tq, D]."""
    internal = self.embedding_dim // self.downsample_rate
    if internal % self.num_heads:
      raise ValueError(f"num_heads {self.num_heads} must divide internal dim {internal}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    split = lambda x: x.reshape(*x.shape[:-1], self.num_heads, internal // self.num_heads)
    q = split(dense(internal, ("embed", "heads"), name="q_proj", **kw)(q))
    k = split(dense(internal, ("embed", "heads"), name="k_proj", **kw)(k))
    v = split(dense(internal, ("embed", "heads"), name="v_proj", **kw)(v))
    if mask is not None:
      mask = mask[:, None, None, :]
    out = attention(q, k, v, mask=mask)
    out = out.reshape(*out.shape[:-2], internal)
    return dense(self.embedding_dim, ("heads", "embed"), name="out_proj", **kw)(out)


class MLPBlock(nn.Module):
  """lin1 -> activation -> lin2."""

  embedding_dim: int
  mlp_dim: int
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable[..., jax.Array] = default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    x = self.activation(dense(self.mlp_dim, ("embed", "mlp"), name="lin1", **kw)(x))
    return dense(self.embedding_dim, ("mlp", "embed"), name="lin2", **kw)(x)


class TwoWayAttentionBlock(nn.Module):
  """One two-way block; layer 0 skips adding the query PE in self-attention (and its residual)."""

  embedding_dim: int
  num_heads: int
  mlp_dim: int = 2048
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  attention_downsample_rate: int = 2
  skip_first_layer_pe: bool = False
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable[..., jax.Array] = default_kernel_init

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe, key_mask=None, query_mask=None):
    """queries/query_pe: [B, S, D]; keys/key_pe: [B, L, D]; key_mask: bool[B, L] or None;
    query_mask: bool[B, S] or None (False: a padding token nothing attends to)."""
    akw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    nkw = dict(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    d, n, r = self.embedding_dim, self.num_heads, self.attention_downsample_rate

    self_attn = Attention(d, n, 1, name="self_attn", **akw)
    if self.skip_first_layer_pe:
      # SAM: no residual here, the first layer's tokens are the raw prompt embeddings.
      queries = self_attn(queries, queries, queries, mask=query_mask)
    else:
      q = queries + query_pe
      queries = queries + self_attn(q, q, queries, mask=query_mask)
    queries = layer_norm(name="norm1", **nkw)(queries)

    q, k = queries + query_pe, keys + key_pe
    queries = queries + Attention(d, n, r, name="cross_attn_token_to_image", **akw)(
        q, k, keys, mask=key_mask)
    queries = layer_norm(name="norm2", **nkw)(queries)

    queries = queries + MLPBlock(d, self.mlp_dim, self.activation, name="mlp", **akw)(queries)
    queries = layer_norm(name="norm3", **nkw)(queries)

    # Image tokens as queries: padded image positions still get (ignored) outputs.
    q, k = queries + query_pe, keys + key_pe
    keys = keys + Attention(d, n, r, name="cross_attn_image_to_token", **akw)(
        k, q, queries, mask=query_mask)
    keys = layer_norm(name="norm4", **nkw)(keys)
    return queries, keys


class TwoWayTransformer(nn.Module):
  """SAM TwoWayTransformer: `layers_{i}`, `final_attn_token_to_image`, `norm_final_attn`."""

  depth: int = 2
  embedding_dim: int = 256
  num_heads: int = 8
  mlp_dim: int = 2048
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  attention_downsample_rate: int = 2
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable[..., jax.Array] = default_kernel_init

  @nn.compact
  def __call__(self, image_embedding: jax.Array, image_pe: jax.Array, point_embedding: jax.Array,
               image_mask: jax.Array | None = None, token_mask: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Runs the two-way transformer.

    image_embedding: float[B, H, W, D]; image_pe: float[H, W, D] or [B, H, W, D];
    point_embedding: float[B, S, D] (also the query PE, as in SAM);
    image_mask: bool[B, H*W] (True = real token) or None: padded image tokens are never attended to;
    token_mask: bool[B, S] likewise for the prompt tokens (their outputs are then meaningless).
    Returns (queries float[B, S, D], keys float[B, H*W, D]).
    """
    b, h, w, d = image_embedding.shape
    if d != self.embedding_dim:
      raise ValueError(f"image width {d} != embedding_dim {self.embedding_dim}")
    keys = image_embedding.reshape(b, h * w, d).astype(self.dtype)
    key_pe = jnp.broadcast_to(image_pe, (b, h, w, d)).reshape(b, h * w, d).astype(self.dtype)
    point_embedding = point_embedding.astype(self.dtype)
    queries = point_embedding
    akw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    for i in range(self.depth):
      queries, keys = TwoWayAttentionBlock(
          d, self.num_heads, self.mlp_dim, self.activation, self.attention_downsample_rate,
          skip_first_layer_pe=(i == 0), layer_norm_eps=self.layer_norm_eps, name=f"layers_{i}",
          **akw)(queries, keys, point_embedding, key_pe, image_mask, token_mask)
    q, k = queries + point_embedding, keys + key_pe
    final_attn = Attention(d, self.num_heads, self.attention_downsample_rate,
                           name="final_attn_token_to_image", **akw)
    queries = queries + final_attn(q, k, keys, mask=image_mask)
    queries = layer_norm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="norm_final_attn")(queries)
    return queries, keys
