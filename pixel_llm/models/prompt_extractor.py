"""PixelLLM's prompt feature extractor (the release's `PromptAdaptor`, anchor section 2.4).

Learnable output tokens plus the SAM sparse prompt tokens attend to the image features (plus the
SAM dense prompt) through a SAM two-way transformer; each output token then gets its own linear
head, giving Q visual tokens per prompt for the language model.

Shape legend: B batch (one row per prompt), H/W feature grid, C image feature width, S sparse
prompt tokens, Q output tokens, E prompt width (SAM, 256), D transformer width, F output width.

Parameter names follow the release (`output_tokens.weight` -> `output_tokens`,
`{image_projection,prompt_embedding_projection,image_pe_projection}_mlp/layers.0` -> `*_mlp`,
`transformer/layers.{i}` -> `transformer/layers_{i}`, `output_hypernetworks_mlps.{i}/layers.0`
-> row i of the stacked `output_hypernetworks_mlps/{kernel,bias}`).
Deviations: the release holds a `dense_output_mlp` (Linear D->F on the image tokens, 525,312
params at the release size) that its forward pass never uses; here it exists only with
`dense_output_tokens` on (a deviation, off by default), which appends the H*W image tokens, each
with its place added, to the Q output tokens. As in the release, one projection serves both the
sparse and the dense prompt, and the prompt projections are skipped when E == D.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixel_llm.models import layers
from pixel_llm.models.two_way_transformer import TwoWayTransformer

Dtype = Any

# The release configs use depth 6; the paper describes a 2-layer extractor and gives
# no other size, so "paper" only changes the depth.
PRESETS = {
    "release": dict(depth=6, width=512, num_heads=8, mlp_dim=2048),
    "paper": dict(depth=2, width=512, num_heads=8, mlp_dim=2048),
}


class PromptFeatureExtractor(nn.Module):
  """Prompt-conditioned visual tokens: [B, H, W, C] + SAM prompt -> float32[B, Q, F]."""

  depth: int = 6
  width: int = 512
  num_heads: int = 8
  mlp_dim: int = 2048
  num_output_tokens: int = 32
  output_dim: int = 1024
  prompt_dim: int = 256
  attention_downsample_rate: int = 2
  # Off in the release (SAM's convention: the dense PE enters attention keys only). On, the PE is
  # also added to the image tokens themselves, so what a visual token reads says where it was read:
  # a deviation for networks whose towers carry little absolute position (the from-scratch toys).
  image_pe_in_values: bool = False
  # Off in the release. On, the transformer's H*W image tokens plus their dense PE go to the
  # language model too (through `dense_output_mlp`), after the Q learnt ones: the language model
  # can then match words against every place in the image instead of a Q-token summary that was
  # written before the text was seen (the referring toy's colour / shape words otherwise do not
  # steer the box; benchmarks/RESULTS.md).
  dense_output_tokens: bool = False
  # Off in the release. On, the prompt text's token embeddings join the sparse prompt tokens
  # (through `text_projection_mlp`), so the output tokens are read with the words in view: a
  # referring expression can then pick its object inside the extractor, as SAM's prompt tokens
  # pick theirs (the towers see colour at an object's place, yet the toy's colour words do not
  # steer its box; benchmarks/RESULTS.md). A deviation for the from-scratch toys.
  text_conditioned: bool = False
  # Off in the release. On, a linear head on the transformer's image tokens gives one logit per
  # place, aux["place_logits"]: "is this place inside what the prompt is about" (trained by
  # `loss.place_weight`, `losses.place_bce`). With `text_conditioned`, the image tokens have read
  # the words, so the head asks the extractor itself to bind words to places; a deviation for the
  # from-scratch referring toy, whose box L1 alone does not teach colour words (RESULTS.md).
  place_logits: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_features: jax.Array, image_pe: jax.Array, sparse: jax.Array,
               dense: jax.Array, text: jax.Array | None = None,
               text_mask: jax.Array | None = None, *, train: bool = False
               ) -> tuple[jax.Array, dict]:
    """Extracts Q tokens per prompt.

    image_features: float[B, H, W, C]; image_pe: float[H, W, E] (SAM dense PE);
    sparse: float[B, S, E]; dense: float[B, H, W, E] (SAM dense prompt embedding);
    text float[B, C, Dt] with text_mask bool[B, C]: the prompt text's token embeddings (read only
    with `text_conditioned`, which needs them).
    Returns (tokens float32[B, Q', F], aux) with Q' = Q (+ H*W with `dense_output_tokens`),
    aux["output_tokens"] float[B, Q, D] (transformer outputs before the heads),
    aux["image_tokens"] float[B, H, W, D] and, with `place_logits`, aux["place_logits"]
    float32[B, H, W].
    """
    del train  # no dropout in the release
    b, h, w, _ = image_features.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Inputs come from other towers, so their width axis stays unnamed (replicated).
    proj = lambda name: layers.dense(self.width, (None, "embed"), name=name, **kw)
    if self.prompt_dim != self.width:
      prompt_proj = proj("prompt_embedding_projection_mlp")
      image_pe_proj = proj("image_pe_projection_mlp")
    else:
      prompt_proj = image_pe_proj = lambda x: x
    src = proj("image_projection_mlp")(image_features)
    src = src + prompt_proj(dense)
    pos = image_pe_proj(image_pe)
    if self.image_pe_in_values:
      src = src + pos.astype(src.dtype)

    out_tokens = self.param(
        "output_tokens", layers.with_axes(nn.initializers.normal(1.0), ("tokens", "embed")),
        (self.num_output_tokens, self.width), self.param_dtype)
    out_tokens = jnp.broadcast_to(out_tokens.astype(self.dtype),
                                  (b, self.num_output_tokens, self.width))
    tokens = jnp.concatenate([out_tokens, prompt_proj(sparse).astype(self.dtype)], axis=1)
    token_mask = None
    if self.text_conditioned:
      if text is None or text_mask is None:
        raise ValueError("A text-conditioned prompt feature extractor needs the prompt text.")
      words = layers.dense(self.width, (None, "embed"), name="text_projection_mlp", **kw)(text)
      token_mask = jnp.concatenate([jnp.ones(tokens.shape[:2], bool), text_mask], axis=1)
      tokens = jnp.concatenate([tokens, words.astype(self.dtype)], axis=1)

    hs, keys = TwoWayTransformer(
        depth=self.depth, embedding_dim=self.width, num_heads=self.num_heads,
        mlp_dim=self.mlp_dim, attention_downsample_rate=self.attention_downsample_rate,
        name="transformer", **kw)(src, pos, tokens, token_mask=token_mask)
    hs = hs[:, :self.num_output_tokens]

    out = OutputHeads(self.num_output_tokens, self.output_dim, name="output_hypernetworks_mlps",
                      **kw)(hs)
    if self.dense_output_tokens:
      placed = keys + pos.reshape(1, h * w, -1).astype(keys.dtype)
      dense_out = layers.dense(self.output_dim, ("embed", "mlp"), name="dense_output_mlp",
                               **kw)(placed)
      out = jnp.concatenate([out, dense_out.astype(out.dtype)], axis=1)
    aux = {"output_tokens": hs, "image_tokens": keys.reshape(b, h, w, -1)}
    if self.place_logits:
      place = layers.dense(1, ("embed", None), name="place_head", **kw)(keys)
      aux["place_logits"] = place.reshape(b, h, w).astype(jnp.float32)
    return out.astype(jnp.float32), aux


def tokens_per_prompt(num_output_tokens: int, dense_output_tokens: bool, grid: tuple[int, int]
                      ) -> int:
  """Q': visual tokens per prompt for the language model (grid = the image feature map's H, W)."""
  return num_output_tokens + (grid[0] * grid[1] if dense_output_tokens else 0)


class OutputHeads(nn.Module):
  """One Dense(D -> F) per token, stored stacked: kernel [Q, D, F], bias [Q, F]."""

  num_tokens: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, Q, D] -> [B, Q, F]."""
    # Same per-head fan-in as the release's separate nn.Dense heads (lecun normal over D).
    init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    kernel = self.param("kernel", layers.with_axes(init, ("tokens", "embed", "mlp")),
                        (self.num_tokens, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", layers.with_axes(nn.initializers.zeros_init(), ("tokens", "mlp")),
                      (self.num_tokens, self.features), self.param_dtype)
    y = jnp.einsum("bqd,qdf->bqf", x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)
