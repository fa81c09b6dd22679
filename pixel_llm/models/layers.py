"""Small building blocks shared by every network in `pixel_llm.models`.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`), so one rules
table (`pixel_llm.sharding.LOGICAL_RULES`) decides how it is laid out on a device mesh. The names:

  embed    model width D of a tower (sharded over `fsdp`)
  mlp      hidden width of an MLP (sharded over `tensor`)
  heads    joined heads x head_dim of attention projections (sharded over `tensor`)
  kv       per-head width (replicated)
  vocab    vocabulary (sharded over `tensor`)
  norm     scales and biases of norms (replicated)
  lora     LoRA rank (replicated)
  conv_h, conv_w, conv_in  spatial/input dims of conv kernels (replicated)
  relpos   relative-position tables and buckets (replicated)
  pos      position-embedding grids (replicated)
  tokens   learned token tables such as output tokens or point-type embeddings (replicated)
  layers   the leading layer axis of parameters stacked by a scan over layers (replicated)

Activations use `batch`, `length`, `act_embed`, `act_mlp`, `act_heads` (see `constrain`).

Shape legend used across the package: B batch, R prompts per image, T target text length,
C context (prompt-text) length, P image patches, Q prompt (visual) tokens, K points per token,
H/W grid height/width, D width, N heads.
"""
import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

# PyTorch's nn.Linear / nn.Conv2d default init is kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), ...),
# i.e. variance_scaling(1/3, fan_in, uniform). Used where we mirror torch modules initialised from scratch.
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
default_kernel_init = nn.initializers.lecun_normal()


REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


def remat_policy(name: str):
  """The `jax.checkpoint_policies` entry called `name` (what a rematerialised block keeps from the
  forward pass; "nothing_saveable" recomputes everything and stores only block inputs)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat policy {name!r}; choose one of {REMAT_POLICIES}.")
  return getattr(jax.checkpoint_policies, name)


def with_axes(init: Initializer, axes: Sequence[str | None]) -> Initializer:
  """Wraps an initializer so the created parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(axes))


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Initializer = default_kernel_init,
    name: str | None = None,
) -> nn.Dense:
  """`nn.Dense` whose kernel is named `axes` = (in, out) and bias is named (out,)."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=with_axes(kernel_init, axes),
      bias_init=with_axes(nn.initializers.zeros_init(), axes[1:]),
      name=name,
  )


def layer_norm(
    epsilon: float = 1e-6,
    *,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.LayerNorm:
  """LayerNorm over the last axis with `norm`-named scale and bias (computed in float32)."""
  return nn.LayerNorm(
      epsilon=epsilon,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      scale_init=with_axes(nn.initializers.ones_init(), ("norm",)),
      bias_init=with_axes(nn.initializers.zeros_init(), ("norm",)),
      name=name,
  )


def conv(
    features: int,
    kernel_size: tuple[int, int],
    *,
    strides: tuple[int, int] = (1, 1),
    padding: Any = "VALID",
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Initializer = default_kernel_init,
    name: str | None = None,
) -> nn.Conv:
  """NHWC conv; kernel (kh, kw, in, out) named (conv_h, conv_w, conv_in, embed)."""
  return nn.Conv(
      features,
      kernel_size,
      strides=strides,
      padding=padding,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=with_axes(kernel_init, ("conv_h", "conv_w", "conv_in", "embed")),
      bias_init=with_axes(nn.initializers.zeros_init(), ("embed",)),
      name=name,
  )


class PatchEmbed(nn.Module):
  """Non-overlapping patch conv (torch `patch_embed.proj`); pixels past the last full patch are
  dropped (VALID padding). SAM and EVA02 differ only in the kernel init."""

  width: int
  patch_size: int
  kernel_init: Initializer = default_kernel_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    """image: [B, H*p, W*p, 3] -> [B, H, W, D]."""
    p = self.patch_size
    return conv(self.width, (p, p), strides=(p, p), dtype=self.dtype,
                param_dtype=self.param_dtype, kernel_init=self.kernel_init, name="proj")(image)


class LayerNorm2d(nn.Module):
  """SAM's channel LayerNorm on NHWC maps (normalises the channel axis; eps 1e-6)."""

  epsilon: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = self.param("weight", with_axes(nn.initializers.ones_init(), ("norm",)),
                        (x.shape[-1],), self.param_dtype)
    bias = self.param("bias", with_axes(nn.initializers.zeros_init(), ("norm",)),
                      (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = ((xf - mean) ** 2).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * weight + bias).astype(x.dtype)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Activation sharding constraint by logical names; a no-op outside a mesh/rules context."""
  return nn.with_logical_constraint(x, axes)


# How `attention` computes softmax(q k^T * scale + bias) v (`attention_implementation`):
#   xla          explicit einsums, float32 logits (the default; what every parity test checks)
#   dot_product  jax.nn.dot_product_attention(implementation="xla"): the same maths through JAX's op
#   cudnn        jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's fused flash attention
#                (GPU only; bf16/fp16 inputs, head width <= 128 and a multiple of 8)
ATTENTION_IMPLS = ("xla", "dot_product", "cudnn")
_ATTENTION_IMPL = contextvars.ContextVar("pixel_llm_attention_impl", default="xla")


@contextlib.contextmanager
def attention_implementation(impl: str) -> Iterator[None]:
  """Selects the attention implementation for everything traced inside the block.

  The choice is read at trace time, so wrap the call that traces (the adapter's `loss_fn`, a
  benchmark's jit), not the execution of an already compiled function.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention implementation {impl!r} is not one of {ATTENTION_IMPLS}")
  token = _ATTENTION_IMPL.set(impl)
  try:
    yield
  finally:
    _ATTENTION_IMPL.reset(token)


def current_attention_implementation() -> str:
  """The implementation `attention` uses when traced here (for modules with their own kernels)."""
  return _ATTENTION_IMPL.get()


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None,
              mask: jax.Array | None = None, scale: float | None = None) -> jax.Array:
  """Softmax attention in float32 logits.

  q: [..., Tq, N, Dh], k/v: [..., Tk, N, Dh]; bias broadcastable to [..., N, Tq, Tk];
  mask: bool broadcastable to [..., N, Tq, Tk] (True = attend). Returns [..., Tq, N, Dh].
  `scale` defaults to Dh**-0.5 (T5 passes 1.0: its scaling lives in the query init).
  """
  if scale is None:
    scale = q.shape[-1] ** -0.5
  impl = _ATTENTION_IMPL.get()
  if impl != "xla" and q.size and k.size:  # empty (T5's cache set-up at Tq=0): the einsums below
    return _fused_attention(q, k, v, bias, mask, scale, impl)
  logits = jnp.einsum("...qnd,...knd->...nqk", q, k).astype(jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("...nqk,...knd->...qnd", weights, v)


def _fused_attention(q, k, v, bias, mask, scale, impl):
  """`attention` through jax.nn.dot_product_attention: leading dims folded into one batch axis."""
  lead = q.shape[:-3]
  tq, n, dh = q.shape[-3:]
  tk = k.shape[-3]

  def fold(x):  # [..., T, N, Dh] -> [B', T, N, Dh]
    return x.reshape((-1,) + x.shape[-3:])

  def fold_logit_shaped(x):  # broadcastable to [..., N, Tq, Tk] -> [B' or 1, N or 1, Tq, Tk]
    x = x.reshape((1,) * (len(lead) + 3 - x.ndim) + x.shape)
    heads = x.shape[-3]
    if all(d == 1 for d in x.shape[:-3]):  # shared across the batch: do not materialise it
      return jnp.broadcast_to(x, x.shape[:-2] + (tq, tk)).reshape((1, heads, tq, tk))
    return jnp.broadcast_to(x, lead + (heads, tq, tk)).reshape((-1, heads, tq, tk))

  if bias is not None:
    # cuDNN wants the bias in the inputs' dtype; XLA's path upcasts it to float32 itself.
    bias = fold_logit_shaped(bias.astype(q.dtype if impl == "cudnn" else jnp.float32))
  if mask is not None:
    mask = fold_logit_shaped(mask)
  args = (fold(q), fold(k), fold(v))
  try:
    out = jax.nn.dot_product_attention(*args, bias=bias, mask=mask, scale=scale,
                                       implementation="xla" if impl == "dot_product" else "cudnn")
  except NotImplementedError:
    # cuDNN refuses some shapes (e.g. the prompt extractor's 34 queries over 729 keys): those
    # few attentions run through XLA, the rest stay fused. Decided at trace time, per call.
    out = jax.nn.dot_product_attention(*args, bias=bias, mask=mask, scale=scale,
                                       implementation="xla")
  return out.reshape(lead + (tq, n, dh))


def drop_path(x: jax.Array, rate: jax.Array | float, deterministic: bool,
              rng: jax.Array | None) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per example with probability `rate`.

  x: [B, ...]. `rate` may be traced (a scanned per-layer input); rate 1 drops the branch with
  zero (not NaN) gradients.
  """
  if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
    return x
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / jnp.where(keep > 0, keep, 1.0), 0.0).astype(x.dtype)


def count_params(tree: Any) -> int:
  """Number of scalars in a (possibly boxed, possibly abstract) parameter tree."""
  leaves = jax.tree.leaves(nn.meta.unbox(tree))
  return int(sum(math.prod(x.shape) for x in leaves))
