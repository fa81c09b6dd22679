r"""How low can the toy's trace L1 go? Oracle predictors on the synthetic world's trace targets.

  python benchmarks/synthetic_oracle.py --num_images 500 --out /tmp/oracle.json

Each utterance's target is the box of its trace points (as `pixel_llm.data.ln` builds it); words
stand in for tokens as weights. Predictors, all fit on the same images (so slightly optimistic):
  constant       one box for every word (coordinate-wise median): a model that sees nothing
  oracle         knows which shape each word is about and that shape's true box: predicts the
                 shape's centre +/- a fitted fraction of its half-size for words about a shape, and
                 the median box for the other words ("In this image I can see", background)
The oracle's L1 is a floor for any model's `trace_l1` on this data: words that refer to no shape
have targets drawn from the simulated mouse's idle drift, which no image can predict.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pixel_llm.data import ln  # pylint: disable=g-import-not-at-top
from pixel_llm.data import synthetic  # pylint: disable=g-import-not-at-top


def collect(seed: int, num_images: int, first_id: int):
  """Per utterance with trace points: (target box, referent, referent's true box, words)."""
  rows = []
  for image_id in range(first_id, first_id + num_images):
    ex = synthetic.make_example(seed, image_id, split="val")
    points, _ = ln.flatten_traces(ex.record["traces"])
    for u, ref in zip(ex.record["timed_caption"], ex.utterance_objects):
      found = ln.window_box(points, u["start_time"], u["end_time"])
      if found is None:
        continue
      obj = ex.objects[ref] if ref >= 0 else None
      rows.append((found[0], ref, (obj.center, obj.box) if obj else None,
                   len(u["utterance"].split())))
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--num_images", type=int, default=500)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="")
  args = p.parse_args()
  rows = collect(args.seed, args.num_images, 1_000_000)
  targets = np.array([r[0] for r in rows])
  weights = np.array([r[3] for r in rows], np.float64)
  is_obj = np.array([r[1] >= 0 for r in rows])

  def l1(pred, mask):
    return float((np.abs(pred - targets)[mask].mean(1) * weights[mask]).sum() / weights[mask].sum())

  everything = np.ones(len(rows), bool)
  median = np.median(targets, axis=0)
  const = np.broadcast_to(median, targets.shape)
  other_median = np.median(targets[~is_obj], axis=0)
  centre = np.array([r[2][0] if r[2] else (0.5, 0.5) for r in rows])
  half = np.array([np.subtract(r[2][1][2:], r[2][1][:2]) / 2 if r[2] else (0, 0) for r in rows])
  best = None
  for a in np.linspace(0.0, 1.0, 21):
    pred = np.concatenate([centre - a * half, centre + a * half], axis=1)
    pred[~is_obj] = other_median
    score = l1(pred, everything)
    if best is None or score < best[0]:
      best = (score, a, pred)
  _, alpha, oracle = best
  result = {
      "command": " ".join(sys.argv), "num_images": args.num_images, "seed": args.seed,
      "word_fraction_about_a_shape": float(weights[is_obj].sum() / weights.sum()),
      "constant_l1": l1(const, everything),
      "oracle_l1": l1(oracle, everything),
      "oracle_l1_words_about_a_shape": l1(oracle, is_obj),
      "oracle_l1_other_words": l1(oracle, ~is_obj),
      "oracle_half_size_fraction": float(alpha),
  }
  for k, v in result.items():
    print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
