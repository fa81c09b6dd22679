"""Scan over layers: run a tower's identical blocks under `nn.scan`, and convert parameter trees
between the unrolled layout (`block_0`, `block_1`, ...) and the stacked one.

Unrolling L blocks makes XLA trace and compile L copies of the block (the full PixelLLM train step
took 33 min to compile ahead of time with SAM ViT-H, EVA02-L and Flan-T5-XL unrolled). Under
`nn.scan` the block is traced once and its parameters carry a leading [L] axis, named `layers`
(replicated by `pixel_llm.sharding`). This is the t5x / MaxText `scan_layers` scheme.

Layouts (`stack_layers` <-> `unstack_layers`, exact inverses):
  unrolled  {..., "block_0": t_0, ..., "block_{L-1}": t_{L-1}}
  stacked   {..., "block": t} with every leaf of t = stack([t_0 leaf, ..., t_{L-1} leaf]) [L, ...]
  grouped   (period p, e.g. SAM's 7 windowed + 1 global) {..., "blocks": {"blocks_{j}": t_j}}
            where t_j stacks blocks j, p + j, 2p + j, ... -> leaves [L / p, ...]

Checkpoint converters produce the unrolled layout; `stack_layers` after `load` (or the towers'
`load`, which does it when `init_params` is stacked) gives the scanned one.

Shapes: L layers (or groups), B batch; leaves keep their own shapes behind the [L] axis.
"""
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pixel_llm.models import layers

SPLIT_RNGS = {"params": True, "dropout": True}


def remat_block(block_cls: type[nn.Module], remat: bool, policy: str,
                static_argnums: tuple[int, ...], scanned: bool = False) -> type[nn.Module]:
  """`block_cls`, rematerialised with the named `jax.checkpoint_policies` entry when `remat`.

  static_argnums count `self` as 0 (Flax's convention for `nn.remat` of a class). `scanned`: the
  block runs inside `nn.scan`, whose loop already keeps XLA from merging the recomputation into
  the forward pass, so remat's CSE barriers are left out (the JAX docs' advice for scan).
  """
  policy_fn = layers.remat_policy(policy)  # a bad name is an error even while remat is off
  if not remat:
    return block_cls
  return nn.remat(block_cls, policy=policy_fn, static_argnums=static_argnums,
                  prevent_cse=not scanned)


def _default_call(module: nn.Module, x: jax.Array, broadcast: tuple, per_layer: tuple) -> jax.Array:
  return module(x, *broadcast, *per_layer)


def scan_blocks(block: nn.Module, x: jax.Array, *, length: int, broadcast: Any = (),
                per_layer: Any = (), call: Callable[..., jax.Array] = _default_call,
                collections: tuple[str, ...] = ("params",)) -> jax.Array:
  """Applies the unbound module `block` `length` times: x <- call(block_l, x, broadcast, xs_l).

  x: the carry [B, ...] (same shape in and out); broadcast: a pytree of arrays every layer sees
  (None leaves allowed); per_layer: a pytree of arrays [L, ...], layer l gets index l (e.g. a
  drop-path rate); call(module, x, broadcast, per_layer_l) -> x runs one layer (Python values
  such as `train` flags are closed over in `call`). The variables of `collections` get a leading
  [L] axis named "layers"; the params and dropout rngs are split per layer.
  """
  def body(module, carry, bcast, xs):
    return call(module, carry, bcast, xs), None

  scanned = nn.scan(body, variable_axes={c: 0 for c in collections}, split_rngs=SPLIT_RNGS,
                    in_axes=(nn.broadcast, 0), length=length,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  x, _ = scanned(block, x, broadcast, per_layer)
  return x


# ---------------------------------------------------------------------------------------------
# Parameter-tree layouts.
# ---------------------------------------------------------------------------------------------
def _regex(pattern: str) -> re.Pattern:
  if pattern.count("{i}") != 1:
    raise ValueError(f"pattern must hold one '{{i}}' (e.g. 'block_{{i}}'), got {pattern!r}")
  head, tail = pattern.split("{i}")
  return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))


def _stack(*leaves):
  if all(isinstance(v, jax.ShapeDtypeStruct) for v in leaves):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), leaves[0].dtype)
  if all(isinstance(v, np.ndarray) for v in leaves):
    return np.stack(leaves)
  return jnp.stack([jnp.asarray(v) for v in leaves])


def _index(leaf, i: int):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)
  return leaf[i]


def _layer_indices(node: Mapping, regex: re.Pattern, pattern: str) -> list[int]:
  found = sorted(int(m[1]) for k in node if (m := regex.fullmatch(str(k))))
  if found and found != list(range(len(found))):
    raise ValueError(f"layers {pattern!r} must be numbered 0..L-1 without gaps, got {found}")
  return found


def stack_layers(params: Any, pattern: str = "block_{i}", stacked: str = "block", *,
                 period: int | None = None) -> dict:
  """Unrolled -> stacked layout (see the module docstring), wherever `pattern` keys appear.

  params: a nested dict of arrays (numpy, jax or ShapeDtypeStruct; boxed trees are unboxed).
  period: None stacks every layer into `stacked`; p stacks layer g*p + j into `stacked/pattern(j)`
  (a scan over groups of p blocks, p = 1 included; L must be a multiple of p).
  """
  regex = _regex(pattern)
  if period is not None and period < 1:
    raise ValueError(f"period must be >= 1, got {period}")

  def walk(node):
    if not isinstance(node, Mapping):
      return node
    found = _layer_indices(node, regex, pattern)
    out = {k: walk(v) for k, v in node.items() if not regex.fullmatch(str(k))}
    if not found:
      return out
    if stacked in out:
      raise ValueError(f"both {pattern!r} layers and a {stacked!r} entry in one tree level")
    if len(found) % (period or 1):
      raise ValueError(f"{len(found)} layers do not split into groups of {period}")
    blocks = [node[pattern.format(i=i)] for i in found]
    if period is None:
      out[stacked] = jax.tree.map(_stack, *blocks)
    else:
      out[stacked] = {pattern.format(i=j): jax.tree.map(_stack, *blocks[j::period])
                      for j in range(period)}
    return out

  return walk(nn.meta.unbox(params))


def unstack_layers(params: Any, pattern: str = "block_{i}", stacked: str = "block") -> dict:
  """Stacked -> unrolled layout; the inverse of `stack_layers` (the period is read off the tree:
  a `stacked` entry whose keys all match `pattern` is a grouped one)."""
  regex = _regex(pattern)

  def split(tree, n):
    return [jax.tree.map(lambda v, i=i: _index(v, i), tree) for i in range(n)]

  def length(tree):
    sizes = {np.shape(v)[0] if np.ndim(v) else None for v in jax.tree.leaves(tree)}
    if len(sizes) != 1 or None in sizes:
      raise ValueError(f"{stacked!r} leaves must share one leading layer axis, got sizes {sizes}")
    return sizes.pop()

  def walk(node):
    if not isinstance(node, Mapping):
      return node
    out = {k: walk(v) for k, v in node.items() if k != stacked}
    if stacked not in node:
      return out
    if _layer_indices(node, regex, pattern):
      raise ValueError(f"both {pattern!r} layers and a {stacked!r} entry in one tree level")
    tree = node[stacked]
    grouped = isinstance(tree, Mapping) and tree and all(regex.fullmatch(str(k)) for k in tree)
    groups = ([tree[pattern.format(i=j)] for j in _layer_indices(tree, regex, pattern)]
              if grouped else [tree])
    per_group = [split(g, length(g)) for g in groups]
    for g in range(len(per_group[0])):
      for j, layers_j in enumerate(per_group):
        out[pattern.format(i=g * len(groups) + j)] = layers_j[g]
    return out

  return walk(nn.meta.unbox(params))


def is_stacked(params: Any, stacked: str) -> bool:
  """Whether any level of the nested dict `params` holds a `stacked` entry (scanned layout)."""
  if not isinstance(params, Mapping):
    return False
  return stacked in params or any(is_stacked(v, stacked) for v in params.values())


def load_unrolled(load_fn: Callable[[Any], Any], init_params: Any, pattern: str, stacked: str,
                  period: int | None = None) -> Any:
  """Runs a checkpoint converter `load_fn(unrolled_init) -> unrolled params` for an
  `init_params` in either layout; a stacked `init_params` gets a stacked result."""
  if not is_stacked(init_params, stacked):
    return load_fn(init_params)
  loaded = load_fn(unstack_layers(init_params, pattern, stacked))
  return stack_layers(loaded, pattern, stacked, period=period)
