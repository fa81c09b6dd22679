"""Device meshes and the one table that maps logical axis names to mesh axes.

Every parameter in `pixel_llm.models` is created with logical axis names (see `models/layers.py`).
`LOGICAL_RULES` maps those names to the mesh axes `data`, `fsdp` and `tensor`:

  data    pure data parallelism: the batch is split, parameters are replicated;
  fsdp    the batch is split and parameter `embed` dims are sharded (ZeRO-3 style);
  tensor  model parallelism over attention heads, MLP hidden and vocabulary.

A mesh always has all three axes (size 1 where unused), so the rules hold for every mesh shape.
"""
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None = replicated). The first rule that matches a name wins
# and a mesh axis is used at most once per array (flax drops later duplicates to None).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("norm", None),
    ("lora", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("relpos", None),
    ("pos", None),
    ("tokens", None),
    ("layers", None),  # the stacked-layer axis of scanned towers (scan over layers)
)


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh; one size may be -1 meaning "all remaining devices".

  `shape` is a dict such as {"data": 4, "tensor": 2} (missing axes are 1) or a 3-sequence.
  """
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices).reshape(resolve_shape(shape, len(devices))), MESH_AXES)


def resolve_shape(shape: Mapping[str, int] | Sequence[int], num_devices: int) -> list[int]:
  """The (data, fsdp, tensor) sizes of `shape` on `num_devices` devices (-1 = the rest), checked."""
  if isinstance(shape, Mapping):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"Unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}.")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
    if len(sizes) != len(MESH_AXES):
      raise ValueError(f"Mesh shape {tuple(sizes)} must have {len(MESH_AXES)} entries {MESH_AXES}.")
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    if num_devices % known:
      raise ValueError(f"{num_devices} devices cannot be split into {dict(zip(MESH_AXES, sizes))}.")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices; "
                     f"{num_devices} are available.")
  return sizes


def logical_partition_specs(abstract_tree: Any) -> Any:
  """PartitionSpecs of logical names for a boxed (LogicallyPartitioned) tree; None-named leaves -> P()."""
  return nn.get_partition_spec(abstract_tree)


def logical_to_mesh_sharding(abstract_tree: Any, mesh: Mesh,
                             rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """NamedShardings for every leaf of a boxed parameter tree (from `jax.eval_shape(model.init)`).

  A dimension whose size the mesh axes do not divide is replicated instead (e.g. EVA02-L's SwiGLU
  width 2730 on tensor=4), so every published size runs on every mesh.
  """
  specs = logical_partition_specs(abstract_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, list(rules))
  shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(abstract_tree))
  return jax.tree.map(lambda sh, shape: _divisible(sh, shape, mesh), shardings, shapes,
                      is_leaf=lambda x: isinstance(x, NamedSharding))


def _divisible(sharding: NamedSharding, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  spec = []
  for dim, axes in zip(shape, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    spec.append(axes if size > 1 and dim % size == 0 else None)
  return NamedSharding(mesh, PartitionSpec(*spec))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Shards the leading (batch) axis over the data-parallel axes; the rest is replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
