"""PixelLLM's location head (the release's `MlpPointPredictor`, anchor section 2.8).

Maps each text hidden state to K points: LayerNorm(eps 1e-6) -> `depth` Dense layers with an
activation between them -> K * 2 values -> (raw + 1) / 2, normalised image coordinates (x, y).

Shape legend: `...` any leading dims (e.g. B, T), D input width, K points per token.

Parameter names follow the release (`LayerNorm_0`, `mlp/layers.{i}` -> `mlp/layers_{i}`).
Deviations: the release's last layer emits K * (2 + 1 + num_classes) values whose per-point
logits are never used in any loss; here it emits only K * 2 (a converter keeps columns
[4k, 4k+1] of the release's last kernel for point k). Like the release, the coordinates are not
clipped by default (`clip=False`), so they may leave [0, 1].
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixel_llm.models.layers import dense, layer_norm

Dtype = Any

ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # the release uses exact erf GELU
    "relu": nn.relu,
}


class Mlp(nn.Module):
  """`num_layers` Dense layers `layers_{i}`, the activation between them."""

  hidden_dim: int
  output_dim: int
  num_layers: int
  activation: str = "gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = ACTIVATIONS[self.activation]
    for i in range(self.num_layers - 1):
      x = act(dense(self.hidden_dim, ("embed", "mlp") if i == 0 else ("mlp", None),
                    name=f"layers_{i}", **kw)(x))
    axes = ("mlp", None) if self.num_layers > 1 else ("embed", None)
    return dense(self.output_dim, axes, name=f"layers_{self.num_layers - 1}", **kw)(x)


class LocationHead(nn.Module):
  """hidden float[..., D] -> (points float32[..., K, 2] in [0, 1] (not clipped), aux)."""

  hidden_dim: int = 512
  depth: int = 4
  num_points: int = 2
  activation: str = "gelu"
  pre_norm: bool = True
  clip: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array) -> tuple[jax.Array, dict]:
    """hidden: float[..., D] -> points float32[..., K, 2] (x, y); aux["raw"] float32[..., K, 2]."""
    x = hidden.astype(self.dtype)
    if self.pre_norm:
      x = layer_norm(1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name="LayerNorm_0")(x)
    raw = Mlp(self.hidden_dim, self.num_points * 2, self.depth, self.activation, self.dtype,
              self.param_dtype, name="mlp")(x)
    raw = raw.astype(jnp.float32).reshape(*raw.shape[:-1], self.num_points, 2)
    points = (raw + 1.0) * 0.5
    if self.clip:
      points = jnp.clip(points, 0.0, 1.0)
    return points, {"raw": raw}
