r"""Trains PixelLLM.

  python -m pixel_llm.train --config=configs/ln.py:toy --workdir=workdirs/ln_toy

The workdir receives: checkpoints/ (orbax; a rerun of the same command resumes from the latest),
train_metrics.jsonl (one JSON line per logged step), metrics.json (the final evaluation),
visualizations/*.png (each generated word's location in its colour). Single host for now; the
sharded multi-host trainer builds on the same model adapter.
"""
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax
import orbax.checkpoint as ocp

from pixel_llm import evaluation
from pixel_llm import optim
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

  # ---------------------------------------------------------------------------------------------
  # Model, parameters and optimizer.
  # ---------------------------------------------------------------------------------------------
  model = build.build_model(config)
  rng = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  example = build.example_batch(config, config.batch_size, abstract=False)
  params = jax.jit(lambda r: nn.meta.unbox(model.init_variables(r, example)["params"]))(init_rng)

  # ---------------------------------------------------------------------------------------------
  # Resume precedence: the workdir's latest checkpoint, else the config's init checkpoint
  # (converted public weights, `python -m pixel_llm.tools.convert`), else the fresh init above.
  # ---------------------------------------------------------------------------------------------
  ckpt = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  resuming = ckpt.latest_step() is not None
  if not resuming:
    params = _initial_params(config, params)
  tx, schedule = optim.make_optimizer(
      params, learning_rate=config.learning_rate, total_steps=config.total_steps,
      warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
      grad_clip_norm=config.get("grad_clip_norm", 1.0), frozen_patterns=config.frozen_params)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  if resuming:
    state = ckpt.restore(ckpt.latest_step(), args=ocp.args.StandardRestore(state))
    logging.info("Resumed from step %d", int(state["step"]))
    print(f"Resumed from {workdir}/checkpoints at step {int(state['step'])}", flush=True)
  first_step = int(state["step"])
  train_iter = data.train_batches(first_step)

  # ---------------------------------------------------------------------------------------------
  # The update step.
  # ---------------------------------------------------------------------------------------------
  @jax.jit
  def train_step(state, batch):
    step_rng = jax.random.fold_in(train_rng, state["step"])
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: model.loss_fn(p, batch, step_rng, train=True), has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
    metrics["learning_rate"] = schedule(state["step"])
    metrics["grad_norm"] = optax.global_norm(grads)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  evaluator = evaluation.Evaluator(model, data, config)

  # ---------------------------------------------------------------------------------------------
  # Train loop: log, evaluate and checkpoint periodically.
  # ---------------------------------------------------------------------------------------------
  log_path = os.path.join(workdir, "train_metrics.jsonl")
  total = config.total_steps
  t0, steps_since = time.time(), 0
  print(f"Training {total} steps (batch {config.batch_size}) from step {first_step}; "
        f"workdir {workdir}", flush=True)
  for step in range(first_step + 1, total + 1):
    batch = next(train_iter)
    state, metrics = train_step(state, {k: v for k, v in batch.items() if k in pipeline.MODEL_KEYS})
    steps_since += 1
    if step % config.log_every_steps == 0 or step == total:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(metrics["loss"]):
        raise FloatingPointError(f"Non-finite loss {metrics['loss']} at step {step}.")
      rate = steps_since / (time.time() - t0)
      t0, steps_since = time.time(), 0
      record = {"step": step, **metrics, "steps_per_second": rate}
      with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
      print(f"step {step}/{total} loss {metrics['loss']:.4f} (caption {metrics['caption_loss']:.4f}"
            f" point {metrics['point_loss']:.4f}) acc {metrics['token_accuracy']:.3f} "
            f"lr {metrics['learning_rate']:.2e} {rate:.2f} steps/s "
            f"ETA {_format_eta((total - step) / max(rate, 1e-9))}", flush=True)
    if step % config.checkpoint_every_steps == 0 or step == total:
      ckpt.save(step, args=ocp.args.StandardSave(state))
    if step % config.eval_every_steps == 0 and step != total:
      result = evaluator.run(state["params"], step, os.path.join(workdir, "visualizations"))
      print(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in result.items()),
            flush=True)
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
