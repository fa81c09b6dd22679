r"""Evaluates a training checkpoint with the evaluators of its config (`config.evals`).

  python -m pixel_llm.eval --config=configs/ln.py:toy --checkpoint=workdirs/ln_toy
  python -m pixel_llm.eval --config=configs/ln.py:toy --checkpoint=workdirs/ln_toy/checkpoints/500 \
      --evals=ln_val --output_dir=/tmp/ln_eval

`--checkpoint` is a trainer workdir (its latest checkpoint unless --step) or one of its
checkpoints/<step>/ folders. For each evaluation NAME the binary writes OUT/NAME.json (metrics and
step) and OUT/NAME.predictions.jsonl (one line per example), OUT = --output_dir or WORKDIR/eval,
plus TensorBoard scalars under OUT/tensorboard. The evaluators, the mesh and the parameter layout
are the trainer's (`trainer.build_training`, `evaluation.run_all`), so the numbers equal those the
trainer logged at the same step (tests/test_train.py checks it).

Only the parameters are read (the optimizer state stays on disk), so the config must give the
same network as the run that wrote the checkpoint, but its freezing, learning rates and optimizer
may differ (a frozen stage's checkpoint evaluates under the plain stage config).
"""
import json
import os
import re
import sys
import time

import jax
from absl import app
from absl import flags
from absl import logging
from clu import metric_writers
from ml_collections import config_flags

from pixel_llm import checkpoints
from pixel_llm import evaluation
from pixel_llm import partitioning
from pixel_llm import train
from pixel_llm import trainer
from pixel_llm.data import pipeline


def resolve_checkpoint(path: str, step: int | None = None) -> tuple[str, int]:
  """(workdir, step) for a workdir, its checkpoints/ folder or a checkpoints/<step> folder."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--checkpoint {path} does not exist.")
  if re.fullmatch(r"\d+", os.path.basename(path)):
    if step is not None and step != int(os.path.basename(path)):
      raise ValueError(f"--checkpoint names step {os.path.basename(path)} but --step is {step}.")
    step, path = int(os.path.basename(path)), os.path.dirname(path)
  if os.path.basename(path) == "checkpoints":
    path = os.path.dirname(path)
  root = os.path.join(path, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(root) if s.isdigit()) if os.path.isdir(root) else []
  if not steps:
    raise FileNotFoundError(f"{path} has no checkpoints/<step>/ folder: pass the --workdir of "
                            "`python -m pixel_llm.train`.")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"{path} has no checkpoint at step {step} (it has {steps}).")
  return path, step


def evaluate(config, checkpoint: str, *, step: int | None = None, output_dir: str | None = None,
             only: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
  """Restores `checkpoint` into the trainer's layout for `config` and runs its evaluators."""
  workdir, step = resolve_checkpoint(checkpoint, step)
  out_dir = output_dir or os.path.join(workdir, "eval")
  lead = jax.process_index() == 0
  data = pipeline.prepare(config, workdir)
  mesh = partitioning.mesh_from_config(config)
  training = trainer.build_training(config, mesh, jax.random.key(config.seed))
  evaluators = evaluation.build_evaluators(training.model, data, config, only)
  mgr = checkpoints.manager(workdir, asynchronous=False)
  params = checkpoints.restore_params(mgr, training.abstract_state["params"], step)
  if lead:
    print(f"Evaluating {workdir} at step {step}: {', '.join(evaluators)}", flush=True)
  t0 = time.time()
  results = evaluation.run_all(evaluators, params, step,
                               out_dir=out_dir if lead else None)
  writer = metric_writers.create_default_writer(os.path.join(out_dir, "tensorboard"),
                                                just_logging=not lead, asynchronous=False)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in evaluation.flat(results).items()})
  writer.flush()
  if lead:
    for name, result in results.items():
      print(f"{name}: {json.dumps(result)} -> {os.path.join(out_dir, name + '.json')}", flush=True)
    print(f"Evaluated in {time.time() - t0:.1f} s", flush=True)
  return results


def _define_flags():
  """Defined only when run as a binary, so `evaluate` imports cleanly (tests, notebooks)."""
  global _CONFIG, _CHECKPOINT, _STEP, _OUTPUT_DIR, _EVALS
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/ln.py:toy.",
                                            lock_config=True)
  _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A trainer workdir or checkpoints/<step>.")
  _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  _OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write (default WORKDIR/eval).")
  _EVALS = flags.DEFINE_list("evals", [], "Names in config.evals to run (default: all).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  train.initialize_distributed()
  try:
    resolve_checkpoint(_CHECKPOINT.value, _STEP.value)
  except (FileNotFoundError, ValueError) as e:  # a wrong path is a usage error, not a crash
    sys.exit(f"pixel_llm.eval: {e}")
  evaluate(_CONFIG.value, _CHECKPOINT.value, step=_STEP.value, output_dir=_OUTPUT_DIR.value,
           only=tuple(_EVALS.value))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "checkpoint"])
  app.run(main)
