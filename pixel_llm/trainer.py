"""The train step and its compiled, sharded pieces (no input pipeline, no files).

`build_training(config, mesh, rng)` gives the model, the optimizer, the shardings and the jitted
init / train step that `pixel_llm.train` runs, `pixel_llm.eval` restores into, `pixel_llm.tools.aot`
compiles for TPU topologies and `benchmarks/train_step.py` times. Kept apart from the binary so that
these import only JAX, Flax and optax (a GPU benchmark machine needs no TensorFlow).
"""
import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from pixel_llm import chips
from pixel_llm import optim
from pixel_llm import partitioning
from pixel_llm import sharding
from pixel_llm.models import build

@dataclasses.dataclass
class Training:
  """The compiled pieces of a training run on one mesh (shared by the binary and the tests).

  init(rng) -> state and step(state, batch) -> (state, metrics) are jitted with explicit in/out
  shardings; `step` donates its state. state = {params, opt_state, step, skipped_steps,
  consecutive_skips}; opt_state covers the trainable parameters only.
  """
  model: Any
  mesh: Mesh
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  boxed_params: Any  # ShapeDtypeStructs boxed with logical axis names
  labels: Any  # "train" / "frozen" per parameter
  param_shardings: Any
  state_shardings: Any
  abstract_state: Any  # ShapeDtypeStructs with the state's shardings (the restore target)
  init: Any
  step: Any
  cast_frozen: Any  # params -> params with the frozen leaves in config.frozen_dtype
  jitted_step: Any  # the jax.jit object behind `step` (for .lower(...).compile())

  def compile_step(self, state, batch):
    """The train step compiled for these shapes (cost analysis available), run in the mesh."""
    with mesh_context(self.mesh):
      compiled = self.jitted_step.lower(state, batch).compile()
    step = in_mesh(self.mesh, compiled)
    step.cost_analysis, step.memory_analysis = compiled.cost_analysis, compiled.memory_analysis
    return step


def _microbatches(batch: dict, n: int) -> dict:
  """[B, ...] -> [n, B / n, ...] with microbatch i = examples i, i + n, ...: each device keeps its
  own rows (the batch is sharded over B), so splitting moves no data."""
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps {n}")
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(model, tx, schedule, labels, rng: jax.Array, accum_steps: int = 1):
  """The update step (not jitted): gradients of the trainable subtree only, frozen parameters enter
  as plain inputs; non-finite loss or gradient norm leaves params and optimizer state unchanged.

  accum_steps > 1 splits the batch into that many microbatches, run one after another (a scan)
  with their gradients averaged: the memory of a microbatch, the update of the whole batch. Each
  microbatch normalises its loss by its own token count, so with uneven counts the result differs
  slightly from one large batch (as in t5x). Metrics are averaged, `num_*` counts summed.
  """

  def grads_of(trainable, frozen, batch, step_rng):
    return jax.value_and_grad(
        lambda t: model.loss_fn(partitioning.merge(t, frozen), batch, step_rng, train=True),
        has_aux=True)(trainable)

  def accumulated(trainable, frozen, batch, step_rng):
    def body(total, xs):
      i, micro = xs
      out = grads_of(trainable, frozen, micro, jax.random.fold_in(step_rng, i))
      return jax.tree.map(jnp.add, total, out), None
    micro = _microbatches(batch, accum_steps)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grads_of, trainable, frozen, first, step_rng))
    (loss, metrics), grads = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))[0]
    metrics = {k: v if k.startswith("num_") else v / accum_steps for k, v in metrics.items()}
    return (loss / accum_steps, metrics), jax.tree.map(lambda g: g / accum_steps, grads)

  def train_step(state, batch):
    step_rng = jax.random.fold_in(rng, state["step"])
    trainable, frozen = partitioning.split_frozen(state["params"], labels)
    compute = grads_of if accum_steps == 1 else accumulated
    (loss, metrics), grads = compute(trainable, frozen, batch, step_rng)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    trainable = keep_if_bad(optax.apply_updates(trainable, updates), trainable)
    skipped = state["skipped_steps"] + (~ok).astype(jnp.int32)
    consecutive = jnp.where(ok, 0, state["consecutive_skips"] + 1)
    metrics.update(learning_rate=schedule(state["step"]), grad_norm=grad_norm,
                   skipped_steps=skipped, consecutive_skips=consecutive)
    return {"params": partitioning.merge(trainable, frozen),
            "opt_state": keep_if_bad(opt_state, state["opt_state"]),
            "step": state["step"] + 1, "skipped_steps": skipped,
            "consecutive_skips": consecutive}, metrics

  return train_step


def build_training(config, mesh: Mesh, train_rng: jax.Array) -> Training:
  """Model, optimizer, shardings and the jitted init / train step for `config` on `mesh`."""
  model = build.build_model(config)
  boxed = build.abstract_params(config)
  abstract = nn.meta.unbox(boxed)
  labels = optim.frozen_labels(abstract, config.frozen_params)
  abstract_trainable, _ = partitioning.split_frozen(abstract, labels)
  tx, schedule = optim.make_optimizer(
      abstract_trainable, learning_rate=config.learning_rate, total_steps=config.total_steps,
      warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
      grad_clip_norm=config.get("grad_clip_norm", 1.0),
      lr_rules=tuple((k, v) for k, v in dict(config.get("lr_multipliers", {})).items()),
      layer_decay=config.get("layer_decay", 0.0),
      layer_decay_tower=config.get("layer_decay_tower", "eva02"))

  replicated = sharding.replicated(mesh)
  param_sh = sharding.logical_to_mesh_sharding(boxed, mesh)
  trainable_sh, _ = partitioning.split_frozen(param_sh, labels)
  state_sh = {"params": param_sh,
              "opt_state": partitioning.opt_state_shardings(tx, abstract_trainable, trainable_sh,
                                                            mesh),
              "step": replicated, "skipped_steps": replicated, "consecutive_skips": replicated}
  example = build.example_batch(config, 1, abstract=False)
  # Frozen towers need no fp32 master copy: config.frozen_dtype="bfloat16" halves their memory
  # (the modules cast parameters to the compute dtype anyway).
  frozen_dtype = jnp.dtype(config.get("frozen_dtype", "float32"))

  def cast_frozen(params):
    return jax.tree.map(lambda p, l: p.astype(frozen_dtype) if l == "frozen" else p,
                        params, labels)

  def init(rng):
    params = cast_frozen(nn.meta.unbox(model.init_variables(rng, example)["params"]))
    zero = jnp.zeros((), jnp.int32)
    return {"params": params, "opt_state": tx.init(partitioning.split_frozen(params, labels)[0]),
            "step": zero, "skipped_steps": zero, "consecutive_skips": zero}

  # One sharding for the whole batch: P((data, fsdp)) splits every feature's leading axis.
  batch_sh = sharding.batch_sharding(mesh, 1)
  init = jax.jit(init, out_shardings=state_sh)
  step = jax.jit(make_train_step(model, tx, schedule, labels, train_rng,
                                 config.get("grad_accum_steps", 1)),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                 donate_argnums=0)
  key = jax.random.key(0)  # outside the mesh: a TPU topology's abstract devices hold no arrays
  with mesh_context(mesh):
    abstract_state = partitioning.with_shardings(jax.eval_shape(init, key), state_sh)
  return Training(model, mesh, tx, schedule, boxed, labels, param_sh, state_sh, abstract_state,
                  in_mesh(mesh, init), in_mesh(mesh, step), cast_frozen, step)


def mesh_context(mesh: Mesh):
  """The mesh and logical rules that activation constraints (`layers.constrain`) resolve against."""
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_RULES))
  return stack


def in_mesh(mesh: Mesh, fn):
  def wrapped(*args):
    with mesh_context(mesh):
      return fn(*args)
  return wrapped


def check_skips(metrics: dict, max_consecutive_skips: int) -> None:
  """Stops the run after `max_consecutive_skips` non-finite steps in a row."""
  consecutive = int(metrics["consecutive_skips"])
  if consecutive >= max_consecutive_skips:
    raise FloatingPointError(
        f"{consecutive} steps in a row had a non-finite loss or gradient norm (loss "
        f"{float(metrics['loss'])}, grad norm {float(metrics['grad_norm'])}); they were skipped, "
        f"and config.max_consecutive_skips={max_consecutive_skips} stops the run here. Lower the "
        "learning rate, check the input data, or resume from an earlier checkpoint.")


def peak_flops(config) -> float | None:
  """Peak dense bf16 FLOP/s of one device (config.peak_flops_per_device overrides the table)."""
  if config.get("peak_flops_per_device"):
    return float(config.peak_flops_per_device)
  device = jax.devices()[0]
  return chips.device_spec(device)[1] if chips.lookup(device.device_kind) else None
