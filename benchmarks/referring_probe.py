r"""Can the referring path carry a location at all? Trains configs/refcoco.py:toy on its stream and
prints the training point L1 (normalised, mean of the last 100 steps) every 100 steps.

  python benchmarks/referring_probe.py --prompt_gt_box --learning_rate=1e-3 --steps=600
  python benchmarks/referring_probe.py --prompt_gt_box --learning_rate=3e-4 --steps=600
  python benchmarks/referring_probe.py --learning_rate=3e-4 --steps=1500

--prompt_gt_box gives the ground-truth box as the location prompt (instead of the whole image),
so the box at EOS only has to be copied from the prompt through the prompt feature extractor, T5
and the location head: no seeing or grounding involved. A constant box scores ~0.17-0.19. Writes
JSON with --out. The data is the toy's synthetic world (written on first use under --workdir).
"""
import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import refcoco  # pylint: disable=g-import-not-at-top
from pixel_llm import partitioning  # pylint: disable=g-import-not-at-top
from pixel_llm import trainer  # pylint: disable=g-import-not-at-top
from pixel_llm.data import pipeline  # pylint: disable=g-import-not-at-top


def gt_box_prompts(batch: dict) -> np.ndarray:
  """The box at EOS of every expression (its point targets where point_weights > 0) as that
  expression's location prompt: point_weights float[B, R, T], point_targets float[B, R, T, 2, 2]
  -> float32[B, R, 4] xyxy (a zero box for padded expressions, which carry no weight)."""
  weights = np.asarray(batch["point_weights"])
  at = weights.argmax(-1)  # [B, R]
  targets = np.asarray(batch["point_targets"])
  corners = np.take_along_axis(targets, at[..., None, None, None], axis=2)[:, :, 0]  # [B, R, 2, 2]
  boxes = np.concatenate([corners.min(2), corners.max(2)], -1)
  return np.where(weights.any(-1)[..., None], boxes, 0.0).astype(np.float32)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--learning_rate", type=float, default=3e-4)
  p.add_argument("--prompt_gt_box", action="store_true")
  p.add_argument("--scale_jitter", action="store_true",
                 help="Keep the config's train-time scale jitter (default: off, plain resize).")
  p.add_argument("--workdir", default="/tmp/referring_probe")
  p.add_argument("--out", default="")
  args = p.parse_args()
  c = refcoco.get_config("toy")
  c.total_steps, c.learning_rate = args.steps, args.learning_rate
  if not args.scale_jitter:
    c.data.refcoco_scale_jitter = ()
  data = pipeline.prepare(c, args.workdir)
  training = trainer.build_training(c, partitioning.mesh_from_config(c), jax.random.key(1))
  state = training.init(jax.random.key(0))
  batches = data.train_batches(0, 0, 1)
  step_fn, losses, curve, t0 = None, [], [], time.time()
  for step in range(1, args.steps + 1):
    batch = {k: v for k, v in next(batches).items() if k in pipeline.MODEL_KEYS}
    if args.prompt_gt_box:
      batch["prompt_boxes"] = gt_box_prompts(batch)
    if step_fn is None:
      step_fn = training.compile_step(state, batch)
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["point_loss"]))
    if step % 100 == 0 or step == args.steps:
      curve.append({"step": step, "point_l1": float(np.mean(losses[-100:]))})
      print(f"step {step}: point L1 (last 100 steps) {curve[-1]['point_l1']:.4f} "
            f"({time.time() - t0:.0f} s)", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"command": " ".join(sys.argv), "curve": curve, **vars(args)}, f, indent=2)


if __name__ == "__main__":
  main()
