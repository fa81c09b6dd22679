"""Bias-free dense layer with an optional LoRA branch: y = x @ W + scale * (x @ A) @ B.

Shapes: x: [..., Din] -> y: [..., Dout]; W: (Din, Dout), A: (Din, r), B: (r, Dout).

`lora_a` is drawn with the base kernel's initializer and `lora_b` starts at zero, so a freshly
initialised LoRA layer computes exactly the base layer. Every LoRA parameter name contains
"lora" so an optimizer can freeze the base with a regex such as `^(?!.*lora).*t5`.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixel_llm.models.layers import Initializer, default_kernel_init, with_axes

Dtype = Any


class LoraDense(nn.Module):
  """`x @ kernel (+ scale * x @ lora_a @ lora_b when rank > 0)`; no bias, no LoRA dropout.

  `axes` names the kernel (in, out); LoRA factors are named (in, 'lora') and ('lora', out).
  """

  features: int
  axes: tuple[str | None, str | None]
  rank: int = 0
  scale: float = 2.0
  kernel_init: Initializer = default_kernel_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_in = x.shape[-1]
    kernel = self.param("kernel", with_axes(self.kernel_init, self.axes),
                        (d_in, self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = x @ kernel
    if self.rank > 0:
      a = self.param("lora_a", with_axes(self.kernel_init, (self.axes[0], "lora")),
                     (d_in, self.rank), self.param_dtype)
      b = self.param("lora_b", with_axes(nn.initializers.zeros_init(), ("lora", self.axes[1])),
                     (self.rank, self.features), self.param_dtype)
      a, b = nn.dtypes.promote_dtype(a, b, dtype=self.dtype)
      y = y + self.scale * ((x @ a) @ b)
    return y
