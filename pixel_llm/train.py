r"""Trains PixelLLM, sharded over a (data, fsdp, tensor) device mesh (pjit style).

  python -m pixel_llm.train --config=configs/ln.py:toy --workdir=workdirs/ln_toy

The workdir receives: model-info.txt (every parameter's shape, logical axes and sharding),
checkpoints/ (orbax; a rerun of the same command resumes from the latest), train_metrics.jsonl (one
JSON line per logged step), metrics.json (the final evaluation), visualizations/*.png (each
generated word's location in its colour). Single host for now.

Parameters are laid out by their logical axis names (`pixel_llm/sharding.py` LOGICAL_RULES), the
optimizer moments like their parameters, the batch (B leading) over (data, fsdp). Frozen parameters
(`config.frozen_params`) get neither gradients nor optimizer state. A step whose loss or gradient
norm is not finite is skipped (counted in `skipped_steps`); `config.max_consecutive_skips` in a row
stop the run.
"""
import contextlib
import dataclasses
import json
import os
import shutil
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from pixel_llm import evaluation
from pixel_llm import optim
from pixel_llm import partitioning
from pixel_llm import sharding
from pixel_llm.data import pipeline
from pixel_llm.models import build
from pixel_llm.models import pretrained



def _define_flags():
  """Flags are defined only when run as a binary, so `train_and_evaluate` imports cleanly."""
  global _CONFIG, _WORKDIR
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/ln.py:toy.",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and pictures go.")


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def _initial_params(config, params):
  """`params` with the parts matching `config.init_patterns` read from `config.init_checkpoint`."""
  init_checkpoint = config.get("init_checkpoint", "")
  if not init_checkpoint:
    if config.frozen_params:
      raise ValueError(
          f"{config.name}: frozen_params {tuple(config.frozen_params)} but no init_checkpoint, so "
          "the frozen towers would stay random. Convert the public weights with `python -m "
          "pixel_llm.tools.convert` and pass --config.init_checkpoint=DIR (or set "
          "PIXEL_LLM_INIT_CHECKPOINT), or train everything with --config.frozen_params='()'.")
    return params
  params, kept = pretrained.restore_into(params, init_checkpoint,
                                         config.get("init_patterns", ("",)))
  print(f"Initialised from {init_checkpoint}"
        + (f"; {len(kept)} parameters not in it keep their fresh init, e.g. {kept[0]}"
           if kept else ""), flush=True)
  return params


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


def make_train_step(model, tx, schedule, labels, rng: jax.Array):
  """The update step (not jitted): gradients of the trainable subtree only, frozen parameters enter
  as plain inputs; non-finite loss or gradient norm leaves params and optimizer state unchanged."""

  def train_step(state, batch):
    step_rng = jax.random.fold_in(rng, state["step"])
    trainable, frozen = partitioning.split_frozen(state["params"], labels)
    (loss, metrics), grads = jax.value_and_grad(
        lambda t: model.loss_fn(partitioning.merge(t, frozen), batch, step_rng, train=True),
        has_aux=True)(trainable)
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
      grad_clip_norm=config.get("grad_clip_norm", 1.0))

  replicated = sharding.replicated(mesh)
  param_sh = sharding.logical_to_mesh_sharding(boxed, mesh)
  trainable_sh, _ = partitioning.split_frozen(param_sh, labels)
  state_sh = {"params": param_sh,
              "opt_state": partitioning.opt_state_shardings(tx, abstract_trainable, trainable_sh,
                                                            mesh),
              "step": replicated, "skipped_steps": replicated, "consecutive_skips": replicated}
  example = build.example_batch(config, 1, abstract=False)

  def init(rng):
    params = nn.meta.unbox(model.init_variables(rng, example)["params"])
    zero = jnp.zeros((), jnp.int32)
    return {"params": params, "opt_state": tx.init(partitioning.split_frozen(params, labels)[0]),
            "step": zero, "skipped_steps": zero, "consecutive_skips": zero}

  # One sharding for the whole batch: P((data, fsdp)) splits every feature's leading axis.
  batch_sh = sharding.batch_sharding(mesh, 1)
  init = jax.jit(init, out_shardings=state_sh)
  step = jax.jit(make_train_step(model, tx, schedule, labels, train_rng),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                 donate_argnums=0)
  with _mesh_context(mesh):
    abstract_state = partitioning.with_shardings(jax.eval_shape(init, jax.random.key(0)), state_sh)
  return Training(model, mesh, tx, schedule, boxed, labels, param_sh, state_sh, abstract_state,
                  _in_mesh(mesh, init), _in_mesh(mesh, step))


def _mesh_context(mesh: Mesh):
  """The mesh and logical rules that activation constraints (`layers.constrain`) resolve against."""
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_RULES))
  return stack


def _in_mesh(mesh: Mesh, fn):
  def wrapped(*args):
    with _mesh_context(mesh):
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


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs the whole job; returns the final evaluation metrics."""
  # ---------------------------------------------------------------------------------------------
  # Set up the workdir and logging.
  # ---------------------------------------------------------------------------------------------
  os.makedirs(workdir, exist_ok=True)
  start_time = time.time()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  # ---------------------------------------------------------------------------------------------
  # Input pipeline: the embedded synthetic world unless the config points at real data.
  # ---------------------------------------------------------------------------------------------
  data = pipeline.prepare(config, workdir)
  # The workdir is self-contained for `pixel_llm.load`: the vocabulary travels with the weights.
  vocab_copy = os.path.join(workdir, "spiece.model")
  if jax.process_index() == 0 and not os.path.exists(vocab_copy):
    shutil.copyfile(data.vocab.sentencepiece_model_file, vocab_copy)

  # ---------------------------------------------------------------------------------------------
  # Mesh, model, optimizer and the sharded init / train step; WORKDIR/model-info.txt.
  # ---------------------------------------------------------------------------------------------
  mesh = partitioning.mesh_from_config(config)
  data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % data_ways:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the mesh's data x fsdp "
                     f"= {data_ways} (config.mesh {dict(mesh.shape)}).")
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  training = build_training(config, mesh, train_rng)
  info, stats = partitioning.model_info(training.boxed_params, training.param_shardings, mesh,
                                        training.labels)
  info_path = os.path.join(workdir, "model-info.txt")
  with open(info_path, "w") as f:
    f.write(info)
  print(info.split("\n\n")[0], flush=True)
  partitioning.check_replication(stats, mesh, config.get("max_replicated_fraction", 0.5),
                                 info_path)

  # ---------------------------------------------------------------------------------------------
  # Resume precedence: the workdir's latest checkpoint, else the config's init checkpoint
  # (converted public weights, `python -m pixel_llm.tools.convert`), else a fresh init.
  # ---------------------------------------------------------------------------------------------
  ckpt = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  if ckpt.latest_step() is not None:
    state = ckpt.restore(ckpt.latest_step(),
                         args=ocp.args.StandardRestore(training.abstract_state))
    logging.info("Resumed from step %d", int(state["step"]))
    print(f"Resumed from {workdir}/checkpoints at step {int(state['step'])}", flush=True)
  else:
    state = training.init(init_rng)
    if config.get("init_checkpoint", "") or config.frozen_params:
      params = _initial_params(config, jax.device_get(state["params"]))
      state["params"] = jax.device_put(params, training.param_shardings)
  first_step = int(state["step"])
  train_iter = data.train_batches(first_step)
  evaluator = evaluation.Evaluator(training.model, data, config)

  # ---------------------------------------------------------------------------------------------
  # Train loop: log, evaluate and checkpoint periodically. The skip guard reads the previous
  # step's counters, so one step stays in flight while the host checks.
  # ---------------------------------------------------------------------------------------------
  log_path = os.path.join(workdir, "train_metrics.jsonl")
  max_skips = config.get("max_consecutive_skips", 10)
  total = config.total_steps
  t0, steps_since, previous = time.time(), 0, None
  print(f"Training {total} steps (batch {config.batch_size}, mesh {dict(mesh.shape)}) from step "
        f"{first_step}; workdir {workdir}", flush=True)
  for step in range(first_step + 1, total + 1):
    batch = next(train_iter)
    state, metrics = training.step(state, {k: v for k, v in batch.items()
                                           if k in pipeline.MODEL_KEYS})
    if previous is not None:
      check_skips(previous, max_skips)
    previous = metrics
    steps_since += 1
    if step % config.log_every_steps == 0 or step == total:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      rate = steps_since / (time.time() - t0)
      t0, steps_since = time.time(), 0
      record = {"step": step, **metrics, "steps_per_second": rate}
      with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
      print(f"step {step}/{total} loss {metrics['loss']:.4f} (caption {metrics['caption_loss']:.4f}"
            f" point {metrics['point_loss']:.4f}) acc {metrics['token_accuracy']:.3f} "
            f"lr {metrics['learning_rate']:.2e} skipped {int(metrics['skipped_steps'])} "
            f"{rate:.2f} steps/s ETA {_format_eta((total - step) / max(rate, 1e-9))}", flush=True)
    if step % config.checkpoint_every_steps == 0 or step == total:
      ckpt.save(step, args=ocp.args.StandardSave(state))
    if step % config.eval_every_steps == 0 and step != total:
      result = evaluator.run(state["params"], step, os.path.join(workdir, "visualizations"))
      print(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in result.items()),
            flush=True)
  if previous is not None:
    check_skips(previous, max_skips)
  ckpt.wait_until_finished()

  # ---------------------------------------------------------------------------------------------
  # Final evaluation.
  # ---------------------------------------------------------------------------------------------
  result = evaluator.run(state["params"], total, os.path.join(workdir, "visualizations"))
  result.update(steps=total, wall_seconds=time.time() - start_time)
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(result, f, indent=2)
  print("final eval: " + json.dumps(result), flush=True)
  return result


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; progress is printed
    logging.set_verbosity(logging.WARNING)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
