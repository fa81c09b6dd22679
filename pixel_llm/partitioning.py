"""How the trainer lays its state out on a device mesh (the pjit recipe), kept out of train.py.

  mesh_from_config     the (data, fsdp, tensor) mesh of `config.mesh` (-1 = the rest), over
                       jax.devices() or given devices (e.g. a TPU topology's, `tools/aot.py`)
  split_frozen/merge   the parameter tree <-> (trainable, frozen) subtrees by the frozen labels
  opt_state_shardings  the optimizer state's shardings, each moment as its parameter
  batch_shardings      the batch split over (data, fsdp) on its leading axis
  model_info           WORKDIR/model-info.txt: every parameter's shape, logical axes and sharding
  check_replication    stops the run when most parameter bytes end up replicated on a mesh that
                       asks for fsdp or tensor parallelism

Shapes: parameter trees are nested dicts of arrays; the batch is the model adapter's (B leading).
"""
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import traverse_util
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixel_llm import sharding


def mesh_from_config(config, devices: Sequence[Any] | None = None) -> Mesh:
  """`config.mesh` (dict of data/fsdp/tensor sizes, one may be -1); default all data-parallel.

  Given TPU `devices` (a topology's, for ahead-of-time compiles), they are laid out along the
  physical torus as `jax.make_mesh` does, so each mesh axis must be a product of torus axis sizes.

  Multi-slice (TPU slices over the data-centre network, or GPU nodes): `config.mesh_dcn` gives
  each axis's size across slices (e.g. {"data": 2} for two slices doing data parallelism) and
  `config.mesh` then the sizes within one slice; each global axis is their product, laid out so
  that the slow network carries only the dcn part (`hybrid_device_array`).
  """
  shape = config.get("mesh", None)
  shape = dict(shape) if shape is not None else {"data": -1}
  dcn = {k: int(v) for k, v in dict(config.get("mesh_dcn", None) or {}).items()}
  if any(v != 1 for v in dcn.values()):
    all_devices = list(jax.devices() if devices is None else devices)
    return Mesh(hybrid_device_array(shape, dcn, all_devices), sharding.MESH_AXES)
  mesh = sharding.make_mesh(shape, devices)
  if devices is None or mesh.devices.flat[0].platform != "tpu":
    return mesh
  try:
    ordered = mesh_utils.create_device_mesh(mesh.devices.shape, list(devices))
  except (NotImplementedError, ValueError, AssertionError) as e:
    torus = [max(c) + 1 for c in zip(*(d.coords for d in devices))]
    raise ValueError(
        f"Mesh {dict(mesh.shape)} does not fit the TPU torus {'x'.join(map(str, torus))} "
        f"({len(devices)} devices): each mesh axis size must be a product of torus axis sizes. "
        f"({e})") from e
  return Mesh(ordered, mesh.axis_names)


def hybrid_device_array(ici: Mapping[str, int], dcn: Mapping[str, int],
                        devices: Sequence[Any]) -> np.ndarray:
  """Devices as a [data, fsdp, tensor] array whose axis sizes are ici x dcn: the devices of one
  slice (`slice_index`; the process where devices have none, e.g. GPU nodes) fill one ici block,
  and the blocks are tiled over the dcn shape. ici sizes may hold one -1 (the rest of a slice)."""
  unknown = (set(ici) | set(dcn)) - set(sharding.MESH_AXES)
  if unknown:
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}; the mesh axes are "
                     f"{sharding.MESH_AXES}.")
  by_slice = "slice_index" if hasattr(devices[0], "slice_index") else "process_index"
  slices = sorted({getattr(d, by_slice) for d in devices})
  dcn_shape = [int(dcn.get(a, 1)) for a in sharding.MESH_AXES]
  if int(np.prod(dcn_shape)) != len(slices):
    raise ValueError(f"mesh_dcn {dict(zip(sharding.MESH_AXES, dcn_shape))} needs "
                     f"{int(np.prod(dcn_shape))} slices; the devices form {len(slices)} "
                     f"(by {by_slice}).")
  per_slice = len(devices) // len(slices)
  ici_shape = sharding.resolve_shape(ici, per_slice)
  try:
    return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, list(devices),
                                                process_is_granule=by_slice == "process_index")
  except (NotImplementedError, ValueError, AssertionError) as e:
    raise ValueError(f"Cannot lay out mesh {dict(zip(sharding.MESH_AXES, ici_shape))} per slice "
                     f"x mesh_dcn {dict(zip(sharding.MESH_AXES, dcn_shape))} over "
                     f"{len(devices)} devices: {e}") from e


# ------------------------------------------------------------------------------------------------
# Trainable / frozen split: gradients and optimizer state exist for the trainable subtree only.
# ------------------------------------------------------------------------------------------------
def split_frozen(params: Any, labels: Any) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts; each holds only its own leaves (labels from
  `optim.frozen_labels`, same structure as `params`)."""
  flat = traverse_util.flatten_dict(params)
  flat_labels = traverse_util.flatten_dict(labels)
  pick = lambda want: traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if flat_labels[k] == want})
  return pick("train"), pick("frozen")


def merge(trainable: dict, frozen: dict) -> dict:
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(trainable),
                                       **traverse_util.flatten_dict(frozen)})


# ------------------------------------------------------------------------------------------------
# Shardings.
# ------------------------------------------------------------------------------------------------
def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                        param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings of `tx.init(params)`: optax states mirror the parameter tree (Adam's mu, nu), so each
  parameter-shaped leaf takes its parameter's sharding; counts and other scalars are replicated."""
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_state, param_shardings,
      transform_non_params=lambda _: sharding.replicated(mesh))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
  return {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings (orbax restores straight into that layout)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


# ------------------------------------------------------------------------------------------------
# WORKDIR/model-info.txt and the replication check.
# ------------------------------------------------------------------------------------------------
def model_info(boxed_params: Any, param_shardings: Any, mesh: Mesh,
               labels: Any | None = None) -> tuple[str, dict[str, int]]:
  """A table of every parameter (path, shape, dtype, logical axes, PartitionSpec, trainable) and
  byte totals. Returns (text, {"replicated_bytes", "sharded_bytes", "per_device_bytes"}): a
  parameter counts as replicated when its PartitionSpec names no mesh axis of size > 1."""
  logical = traverse_util.flatten_dict(sharding.logical_partition_specs(boxed_params))
  abstract = traverse_util.flatten_dict(nn.meta.unbox(boxed_params))
  shards = traverse_util.flatten_dict(param_shardings)
  flat_labels = traverse_util.flatten_dict(labels) if labels is not None else {}
  stats = {"replicated_bytes": 0, "sharded_bytes": 0, "per_device_bytes": 0}
  rows = []
  for key in sorted(abstract):
    a, spec = abstract[key], shards[key].spec
    nbytes = int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
    ways = int(np.prod([mesh.shape[n] for n in _axis_names(spec)] or [1]))
    stats["sharded_bytes" if ways > 1 else "replicated_bytes"] += nbytes
    stats["per_device_bytes"] += nbytes // ways
    axes = tuple(logical[key]) if logical[key] is not None else ()
    rows.append(f"{'/'.join(key):<72} {str(tuple(a.shape)):<20} {np.dtype(a.dtype).name:<9} "
                f"{str(axes):<28} {str(spec):<34} {flat_labels.get(key, 'train')}")
  total = stats["replicated_bytes"] + stats["sharded_bytes"]
  header = [
      f"mesh {dict(mesh.shape)} on {mesh.devices.size} devices",
      f"parameters {len(rows)}, {total:,} bytes: sharded {stats['sharded_bytes']:,} "
      f"({_pct(stats['sharded_bytes'], total)}), replicated {stats['replicated_bytes']:,} "
      f"({_pct(stats['replicated_bytes'], total)}); per device {stats['per_device_bytes']:,}",
      "",
      f"{'path':<72} {'shape':<20} {'dtype':<9} {'logical axes':<28} {'sharding':<34} label",
  ]
  return "\n".join(header + rows) + "\n", stats


def check_replication(stats: Mapping[str, int], mesh: Mesh, max_replicated_fraction: float,
                      info_path: str = "model-info.txt") -> None:
  """Raises when the mesh asks for parameter sharding (fsdp or tensor > 1) but more than
  `max_replicated_fraction` of the parameter bytes would be replicated on every device."""
  if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
    return
  total = stats["replicated_bytes"] + stats["sharded_bytes"]
  fraction = stats["replicated_bytes"] / max(total, 1)
  if fraction > max_replicated_fraction:
    raise ValueError(
        f"{fraction:.0%} of the parameter bytes are replicated on mesh {dict(mesh.shape)} "
        f"(limit config.max_replicated_fraction={max_replicated_fraction}): the logical axis "
        f"rules (pixel_llm/sharding.py LOGICAL_RULES) or dims the mesh does not divide leave the "
        f"parameters unsharded. See {info_path} for each parameter's sharding.")


def _axis_names(spec: PartitionSpec) -> list[str]:
  names = []
  for axes in spec:
    names += [axes] if isinstance(axes, str) else list(axes or ())
  return names


def _pct(part: int, total: int) -> str:
  return f"{100 * part / max(total, 1):.1f}%"
