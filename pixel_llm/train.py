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
import json
import os
import shutil
import signal
import time

from absl import app
from absl import flags
from absl import logging
from clu import metric_writers
import jax
from ml_collections import config_flags

from pixel_llm import checkpoints
from pixel_llm import evaluation
from pixel_llm import partitioning
from pixel_llm import prefetch
from pixel_llm import sharding
from pixel_llm import trainer
from pixel_llm import workdir as layout
from pixel_llm.data import pipeline
from pixel_llm.data import vocab as vocab_lib
from pixel_llm.models import build
from pixel_llm.models import pretrained
from pixel_llm.tools import flops
# Re-exported: callers (tests, tools) reach the step's pieces through the binary's module.

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


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs the whole job; returns the final evaluation metrics (or {"preempted_at_step": k})."""
  # ---------------------------------------------------------------------------------------------
  # Set up the workdir and logging. Only process 0 writes files; every process computes.
  # ---------------------------------------------------------------------------------------------
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  start_time = time.time()
  if lead:
    with open(os.path.join(workdir, layout.CONFIG), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = metric_writers.create_default_writer(os.path.join(workdir, "tensorboard"),
                                                just_logging=not lead, asynchronous=False)

  # ---------------------------------------------------------------------------------------------
  # Input pipeline: the embedded synthetic world unless the config points at real data. Each
  # process reads its own shard of every global batch.
  # ---------------------------------------------------------------------------------------------
  data = pipeline.prepare(config, workdir)
  vocab_file = data.vocab.sentencepiece_model_file

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
  training = trainer.build_training(config, mesh, train_rng)
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
    vocab_lib.check_matches(vocab_file, workdir, what="workdir's checkpoint")
    state, position = checkpoints.restore(ckpt, training.abstract_state)
    logging.info("Resumed from step %d", int(state["step"]))
    if lead:
      print(f"Resumed from {workdir}/checkpoints at step {int(state['step'])}", flush=True)
  else:
    state, position = training.init(init_rng), {"batches": 0}
    if config.get("init_checkpoint", ""):
      vocab_lib.check_matches(vocab_file, config.init_checkpoint)
    if config.get("init_checkpoint", "") or config.frozen_params:
      params = training.cast_frozen(_initial_params(config, jax.device_get(state["params"])))
      state["params"] = jax.device_put(params, training.param_shardings)
  # The workdir is self-contained for `pixel_llm.load`: the vocabulary travels with the weights.
  # Written only now, after the checks, so that a refused run leaves no other vocabulary behind.
  if lead:
    shutil.copyfile(vocab_file, os.path.join(workdir, layout.VOCAB))
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
  peak = trainer.peak_flops(config)
  # MFU counts the model's FLOPs from its shapes (pixel_llm/tools/flops.py): XLA's cost analysis
  # counts a scanned layer stack once and rematerialised work twice, so it cannot be the numerator.
  step_flops = None
  if peak:
    try:
      step_flops = flops.train_flops(config)["train"] * config.batch_size
    except Exception as e:  # pylint: disable=broad-except  (MFU is a report, not the job)
      logging.warning("No MFU: the FLOP counter failed on this config (%s).", e)
  step_fn = None
  t0, steps_since, previous = time.time(), 0, None
  if lead:
    print(f"Training {total} steps (batch {config.batch_size}, mesh {dict(mesh.shape)}, "
          f"{jax.process_count()} process(es)) from step {first_step}; workdir {workdir}",
          flush=True)
  # A thread prepares and transfers the next batches while the step runs (0: in the loop).
  batches = prefetch.prefetch_to_device(train_iter, config.get("prefetch_batches", 2), global_batch)
  with _Preemption() as preemption, batches:
    for step in range(first_step + 1, total + 1):
      batch = next(batches)
      if step_fn is None:  # compile once, ahead of the first step
        step_fn = training.compile_step(state, batch)
      state, metrics = step_fn(state, batch)
      if previous is not None:
        trainer.check_skips(previous, max_skips)
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
    trainer.check_skips(previous, max_skips)
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
