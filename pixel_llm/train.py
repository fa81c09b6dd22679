r"""Trains PixelLLM, sharded over a (data, fsdp, tensor) device mesh (pjit style).

  python -m pixel_llm.train --config=configs/ln.py:toy --workdir=workdirs/ln_toy

The workdir receives: model-info.txt (every parameter's shape, logical axes and sharding),
checkpoints/ (orbax; a rerun of the same command resumes from the latest), train_metrics.jsonl (one
JSON line per logged step), metrics.json (the final evaluation: {eval name: metrics}, steps) and
eval/<name>.json + eval/<name>.predictions.jsonl (as `pixel_llm.eval` writes), visualizations/*.png (each
generated word's location in its colour), tensorboard/ (the same scalars). Multi-host: run the
same command on every host (`jax.distributed` is initialised from the environment on TPU pods and
SLURM, see launch/); each process reads its shard of every batch and only process 0 writes files.

Resumable: each checkpoint stores the train state and how many batches the input has delivered;
a rerun (after a crash, kill -9 or preemption) restores both and continues with the same batches
an uninterrupted run would have seen. SIGTERM saves a checkpoint at the current step and returns.
`config.grad_accum_steps` splits each batch into microbatches (the same update, less memory).

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
import signal
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from clu import metric_writers
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import optax
from jax.sharding import Mesh

from pixel_llm import checkpoints
from pixel_llm import evaluation
from pixel_llm import optim
from pixel_llm import partitioning
from pixel_llm import sharding
from pixel_llm.data import pipeline
from pixel_llm.models import build
from pixel_llm.models import pretrained

# Peak dense bf16 FLOP/s per device (datasheets), by a substring of jax's device_kind; for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v4": 275e12,
              "TPU v6 lite": 918e12}


def _define_flags():
  """Flags are defined only when run as a binary, so `train_and_evaluate` imports cleanly."""
  global _CONFIG, _WORKDIR
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/ln.py:toy.",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and pictures go.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs "
                      "without a cluster environment jax detects by itself).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
  """`jax.distributed.initialize` when this is one process of several: explicit addresses, or the
  cluster environments jax detects (TPU pod slices, SLURM with several tasks, PIXEL_LLM_DISTRIBUTED=1).
  A plain single-host run initialises nothing."""
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return
  cluster = (os.environ.get("PIXEL_LLM_DISTRIBUTED") == "1"
             or int(os.environ.get("SLURM_NTASKS", "1")) > 1
             or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))
  if cluster:
    jax.distributed.initialize()


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
  # Converted weights are stored unrolled; scanned towers are restored through that view.
  params = build.convert_layout(params, config.model, "unrolled")
  params, kept = pretrained.restore_into(params, init_checkpoint,
                                         config.get("init_patterns", ("",)))
  print(f"Initialised from {init_checkpoint}"
        + (f"; {len(kept)} parameters not in it keep their fresh init, e.g. {kept[0]}"
           if kept else ""), flush=True)
  if config.get("sam_checkpoint", ""):  # referring segmentation: SAM's own mask decoder
    params, kept = pretrained.restore_into(params, config.sam_checkpoint, (r"^mask_decoder/",))
    if any(k.startswith("mask_decoder/") for k in kept):
      raise ValueError(f"{config.sam_checkpoint} has no mask decoder (missing e.g. {kept[0]}).")
    print(f"Mask decoder from {config.sam_checkpoint}", flush=True)
  return build.convert_layout(params, config.model, "scanned")


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
    with _mesh_context(self.mesh):
      compiled = self.jitted_step.lower(state, batch).compile()
    return _in_mesh(self.mesh, compiled)


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
  with _mesh_context(mesh):
    abstract_state = partitioning.with_shardings(jax.eval_shape(init, key), state_sh)
  return Training(model, mesh, tx, schedule, boxed, labels, param_sh, state_sh, abstract_state,
                  _in_mesh(mesh, init), _in_mesh(mesh, step), cast_frozen, step)


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


class _Preemption:
  """SIGTERM (what TPU/GPU schedulers send before preemption) sets a flag; the loop then saves a
  checkpoint at the current step and returns cleanly instead of dying mid-step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler, no flag
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _peak_flops(config) -> float | None:
  """Peak dense bf16 FLOP/s of one device (config.peak_flops_per_device overrides the table)."""
  if config.get("peak_flops_per_device"):
    return float(config.peak_flops_per_device)
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


def _step_flops(compiled, accum_steps: int) -> float | None:
  """FLOPs of one train step from XLA's cost analysis (all devices). XLA counts a loop body once,
  so with gradient accumulation the (dominant) microbatch part is scaled by the trip count."""
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0))
  except Exception:  # some backends have no cost model
    return None
  return flops * accum_steps * jax.device_count() if flops > 0 else None


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs the whole job; returns the final evaluation metrics (or {"preempted_at_step": k})."""
  # ---------------------------------------------------------------------------------------------
  # Set up the workdir and logging. Only process 0 writes files; every process computes.
  # ---------------------------------------------------------------------------------------------
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  start_time = time.time()
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = metric_writers.create_default_writer(os.path.join(workdir, "tensorboard"),
                                                just_logging=not lead, asynchronous=False)

  # ---------------------------------------------------------------------------------------------
  # Input pipeline: the embedded synthetic world unless the config points at real data. Each
  # process reads its own shard of every global batch.
  # ---------------------------------------------------------------------------------------------
  data = pipeline.prepare(config, workdir)
  # The workdir is self-contained for `pixel_llm.load`: the vocabulary travels with the weights.
  vocab_copy = os.path.join(workdir, "spiece.model")
  if lead and not os.path.exists(vocab_copy):
    shutil.copyfile(data.vocab.sentencepiece_model_file, vocab_copy)

  # ---------------------------------------------------------------------------------------------
  # Mesh, model, optimizer and the sharded init / train step; WORKDIR/model-info.txt.
  # ---------------------------------------------------------------------------------------------
  mesh = partitioning.mesh_from_config(config)
  data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  accum = config.get("grad_accum_steps", 1)
  if config.batch_size % (data_ways * accum):
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the mesh's data x fsdp "
                     f"= {data_ways} (config.mesh {dict(mesh.shape)}) times grad_accum_steps "
                     f"{accum}.")
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  training = build_training(config, mesh, train_rng)
  info, stats = partitioning.model_info(training.boxed_params, training.param_shardings, mesh,
                                        training.labels)
  info_path = os.path.join(workdir, "model-info.txt")
  if lead:
    with open(info_path, "w") as f:
      f.write(info)
    print(info.split("\n\n")[0], flush=True)
  partitioning.check_replication(stats, mesh, config.get("max_replicated_fraction", 0.5),
                                 info_path)

  # ---------------------------------------------------------------------------------------------
  # Resume precedence: the workdir's latest checkpoint (state + input position), else the
  # config's init checkpoint (converted public weights, `python -m pixel_llm.tools.convert`),
  # else a fresh init.
  # ---------------------------------------------------------------------------------------------
  ckpt = checkpoints.manager(workdir, keep=config.get("keep_checkpoints", 2),
                             asynchronous=config.get("async_checkpoints", True))
  if ckpt.latest_step() is not None:
    state, position = checkpoints.restore(ckpt, training.abstract_state)
    logging.info("Resumed from step %d", int(state["step"]))
    if lead:
      print(f"Resumed from {workdir}/checkpoints at step {int(state['step'])}", flush=True)
  else:
    state, position = training.init(init_rng), {"batches": 0}
    if config.get("init_checkpoint", "") or config.frozen_params:
      params = training.cast_frozen(_initial_params(config, jax.device_get(state["params"])))
      state["params"] = jax.device_put(params, training.param_shardings)
  first_step = int(state["step"])
  train_iter = data.train_batches(position["batches"], jax.process_index(), jax.process_count())
  batch_sharding = sharding.batch_sharding(mesh, 1)

  def global_batch(local: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in local.items() if k in pipeline.MODEL_KEYS}

  evaluators = evaluation.build_evaluators(training.model, data, config)

  # ---------------------------------------------------------------------------------------------
  # Train loop: log, evaluate and checkpoint periodically. The skip guard reads the previous
  # step's counters, so one step stays in flight while the host checks. SIGTERM: save and stop.
  # ---------------------------------------------------------------------------------------------
  log_path = os.path.join(workdir, "train_metrics.jsonl")
  max_skips = config.get("max_consecutive_skips", 10)
  total = config.total_steps
  peak = _peak_flops(config)
  step_fn, step_flops = None, None
  t0, steps_since, previous = time.time(), 0, None
  if lead:
    print(f"Training {total} steps (batch {config.batch_size}, mesh {dict(mesh.shape)}, "
          f"{jax.process_count()} process(es)) from step {first_step}; workdir {workdir}",
          flush=True)
  with _Preemption() as preemption:
    for step in range(first_step + 1, total + 1):
      batch = global_batch(next(train_iter))
      if step_fn is None:  # compile once, ahead of the first step, to read its cost analysis
        step_fn = training.compile_step(state, batch)
        step_flops = _step_flops(step_fn, accum)
      state, metrics = step_fn(state, batch)
      if previous is not None:
        check_skips(previous, max_skips)
      previous = metrics
      steps_since += 1
      if step % config.log_every_steps == 0 or step == total:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        rate = steps_since / (time.time() - t0)
        t0, steps_since = time.time(), 0
        record = {"step": step, **metrics, "steps_per_second": rate,
                  "examples_per_second": rate * config.batch_size}
        if step_flops and peak:
          record["mfu"] = step_flops * rate / (peak * jax.device_count())
        writer.write_scalars(step, {k: v for k, v in record.items() if k != "step"})
        if lead:
          with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
          print(f"step {step}/{total} loss {metrics['loss']:.4f} (caption "
                f"{metrics['caption_loss']:.4f} point {metrics['point_loss']:.4f}) acc "
                f"{metrics['token_accuracy']:.3f} lr {metrics['learning_rate']:.2e} skipped "
                f"{int(metrics['skipped_steps'])} {rate:.2f} steps/s ETA "
                f"{_format_eta((total - step) / max(rate, 1e-9))}", flush=True)
      position = {"batches": position["batches"] + 1, "batch_size": config.batch_size,
                  "seed": config.seed}
      if preemption.requested or step % config.checkpoint_every_steps == 0 or step == total:
        checkpoints.save(ckpt, step, state, position)
      if preemption.requested:
        ckpt.wait_until_finished()
        writer.flush()
        if lead:
          print(f"SIGTERM: saved a checkpoint at step {step}; rerun the same command to resume.",
                flush=True)
        return {"preempted_at_step": step}
      if step % config.eval_every_steps == 0 and step != total:
        result = evaluation.flat(evaluation.run_all(
            evaluators, state["params"], step,
            vis_dir=os.path.join(workdir, "visualizations") if lead else None))
        writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()})
        if lead:
          print(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in result.items()),
                flush=True)
  if previous is not None:
    check_skips(previous, max_skips)
  ckpt.wait_until_finished()

  # ---------------------------------------------------------------------------------------------
  # Final evaluation (config.final_eval=False leaves it to `pixel_llm.eval`).
  # ---------------------------------------------------------------------------------------------
  writer.flush()
  if not config.get("final_eval", True):
    return {"steps": total, "wall_seconds": time.time() - start_time}
  # The same evaluators and files as `pixel_llm.eval --checkpoint=WORKDIR` (WORKDIR/eval/).
  results = evaluation.run_all(evaluators, state["params"], total,
                               out_dir=os.path.join(workdir, "eval") if lead else None,
                               vis_dir=os.path.join(workdir, "visualizations") if lead else None)
  writer.write_scalars(total, {f"eval/{k}": v for k, v in evaluation.flat(results).items()})
  writer.flush()
  result = {**results, "steps": total, "wall_seconds": time.time() - start_time}
  if lead:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(result, f, indent=2)
    print("final eval: " + json.dumps(result), flush=True)
  return result


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO; progress is printed
    logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
