r"""Does a trained checkpoint look at the image? Eval losses with the images as given, shuffled
across the batch, and flat grey.

  python benchmarks/blindness_probe.py --config=configs/ln.py:toy --workdir=workdirs/ln_toy

If token accuracy and caption loss barely move when the images are shuffled, the captions come from
the language prior. Prints one line per condition and writes JSON with --out.
"""
import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import ln  # pylint: disable=g-import-not-at-top
from pixel_llm import checkpoints  # pylint: disable=g-import-not-at-top
from pixel_llm import partitioning  # pylint: disable=g-import-not-at-top
from pixel_llm import trainer  # pylint: disable=g-import-not-at-top
from pixel_llm.data import pipeline  # pylint: disable=g-import-not-at-top
from pixel_llm.models import build  # pylint: disable=g-import-not-at-top

CONDITIONS = {
    "real": lambda image: image,
    "shuffled": lambda image: np.roll(image, 1, axis=0),
    "grey": lambda image: np.full_like(image, 0.5),
}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="configs/ln.py:toy")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", default="")
  args = p.parse_args()
  if not args.config.startswith("configs/ln.py"):
    raise SystemExit("only configs/ln.py variants are supported")
  config = ln.get_config(args.config.partition(":")[2] or None)
  data = pipeline.prepare(config, args.workdir)
  model = build.build_model(config)
  manager = checkpoints.manager(args.workdir)
  training = trainer.build_training(config, partitioning.mesh_from_config(config), jax.random.key(0))
  state = checkpoints.restore(manager, training.abstract_state)[0]
  params, step = state["params"], int(state["step"])
  metrics = jax.jit(lambda p, b: model.loss_fn(p, b, jax.random.key(0), train=False)[1])
  sums = {name: {"caption_loss": [], "token_accuracy": [], "point_loss": []} for name in CONDITIONS}
  for batch in data.eval_batches():
    batch = {k: v for k, v in batch.items() if k in pipeline.MODEL_KEYS}
    for name, change in CONDITIONS.items():
      m = metrics(params, dict(batch, image=change(np.asarray(batch["image"]))))
      for k, values in sums[name].items():
        values.append(float(m[k]))
  result = {"command": " ".join(sys.argv), "step": step,
            **{name: {k: float(np.mean(v)) for k, v in s.items()} for name, s in sums.items()}}
  for name in CONDITIONS:
    print(f"{name:9s} " + " ".join(f"{k} {v:.4f}" for k, v in result[name].items()))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
