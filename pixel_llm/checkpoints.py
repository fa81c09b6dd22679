"""Training checkpoints: the sharded train state plus the input pipeline's position, via orbax.

  manager = checkpoints.manager(workdir, keep=2)
  checkpoints.save(manager, step, state, position)          # async; atomic on completion
  state, position = checkpoints.restore(manager, abstract_state)
  params = checkpoints.restore_params(manager, abstract_params)  # evaluation: params only

Each checkpoint directory WORKDIR/checkpoints/<step>/ holds two items: `state` (params, optimizer
state, step and skip counters; every process writes its own shards) and `data` (JSON: how far the
training input has been read, so a resumed run reads on from there instead of starting the data
over; see `pipeline.Data.train_batches`). Orbax writes to a temporary name and renames when the
save is complete, so a crash (even kill -9) mid-save leaves the previous checkpoint as the latest.
"""
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from pixel_llm import workdir as layout

# Orbax's default writes every replicated array "replica-parallel": each replica slices off its
# part, and each slice of a new shape is a new XLA program, so a model's first save compiles one
# program per distinct parameter shape (~20 s of a 4-step CPU test run; benchmarks/RESULTS.md).
# Slicing only pays for large arrays; below 1 MiB per replica the first replica writes it whole.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """The `state` item's handler: orbax's standard one (same files, same restore) except for the
  replica-parallel threshold above."""
  th = ocp.type_handlers
  array = th.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
  registry = th.create_type_handler_registry(*[
      (t, array if t is jax.Array else th.get_type_handler(t)) for t in th.supported_types()])
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def manager(workdir: str, keep: int = 2, asynchronous: bool = True) -> ocp.CheckpointManager:
  """asynchronous: training goes on while a checkpoint is written (False: `save` blocks)."""
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, layout.CHECKPOINTS)),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=asynchronous),
      item_handlers={"state": _state_handler(), "data": ocp.JsonCheckpointHandler()})


def save(mgr: ocp.CheckpointManager, step: int, state: Any, position: dict) -> None:
  """Starts an async save of `state` and the data `position` at `step` (no-op if it exists)."""
  if step in mgr.all_steps():
    return
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                         data=ocp.args.JsonSave(position)))


def _restore(mgr: ocp.CheckpointManager, step: int | None, args: ocp.args.Composite,
             mismatch: str) -> Any:
  """Restores `args` at `step` (default: the latest); a tree that does not fit raises ValueError
  naming the checkpoint, the cause and `mismatch` (what to do about it)."""
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {mgr.directory}")
  try:
    return mgr.restore(step, args=args)
  except (KeyError, ValueError, FileNotFoundError) as e:
    raise ValueError(f"{mgr.directory}/{step}: {mismatch} ({type(e).__name__}: {e})") from e


def restore(mgr: ocp.CheckpointManager, abstract_state: Any,
            step: int | None = None) -> tuple[Any, dict]:
  """(state laid out like `abstract_state` (ShapeDtypeStructs with shardings), data position)."""
  out = _restore(mgr, step, ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          abstract_state,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
      data=ocp.args.JsonRestore()),
      "not a pixel_llm training checkpoint of this version (it needs the items 'state' and "
      "'data'). Start a new workdir, or load its parameters with --config.init_checkpoint.")
  return out["state"], dict(out["data"])


def restore_params(mgr: ocp.CheckpointManager, abstract_params: Any,
                   step: int | None = None) -> Any:
  """Only the `params` of the state (laid out like `abstract_params`), leaving the optimizer state
  on disk: evaluation needs no optimizer, so a checkpoint reads under any config whose network
  matches (frozen parts, learning rates and optimizer may differ from the run that wrote it)."""
  target = {"params": abstract_params}
  out = _restore(mgr, step, ocp.args.Composite(state=ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)),
      "its parameters do not match this config's network. Pass the config (and the model "
      "overrides) it was trained with.")
  return out["state"]["params"]
