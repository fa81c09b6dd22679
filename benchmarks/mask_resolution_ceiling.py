r"""How much mask cIoU a low-resolution mask logit grid can reach at all (the seg toy's ceiling).

  python benchmarks/mask_resolution_ceiling.py --workdir=W \
      [--out=benchmarks/results/mask_resolution_ceiling.json]

SAM's mask decoder predicts logits at 4x its image-embedding grid (the seg toy: 8 x 8 -> 32 x 32
for 128-px images), upsampled bilinearly to the input (`mask_losses.upsample_logits`). Here the
GT masks of the referring evaluation split (the workdir's data) are pooled to grids of F x F
pixels per cell, turned into logits of the covered fraction, upsampled the same way and
thresholded at 0: the cIoU / mean IoU of a decoder that is perfect up to its resolution. W is
a seg run's workdir: its config (WORKDIR/config.json) names the data.
"""
import argparse
import json
import os
import sys

import numpy as np


def pooled_masks(gt: np.ndarray, factor: int) -> np.ndarray:
  """The best a grid of `factor` x `factor`-pixel logit cells can draw of each mask.

  gt: bool[B, S, S] -> bool[B, S, S]: each cell's logit is the log-odds of the mask's covered
  fraction there, upsampled to S x S as the model's logits are, thresholded at 0."""
  import jax.numpy as jnp
  from pixel_llm import mask_losses
  b, s, _ = gt.shape
  if s % factor:
    raise ValueError(f"{factor} px per cell does not divide the {s}-px masks.")
  frac = gt.reshape(b, s // factor, factor, s // factor, factor).mean((2, 4))
  frac = np.clip(frac, 1e-4, 1 - 1e-4)
  up = mask_losses.upsample_logits(jnp.asarray(np.log(frac / (1 - frac)))[:, None], (s, s))
  return np.asarray(up)[:, 0] > 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="a seg run's workdir (config, data, vocabulary)")
  p.add_argument("--split", default="val")
  p.add_argument("--factors", default="2,4,8", help="pixels per low-res cell, comma-separated")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  import ml_collections
  from pixel_llm import workdir as layout
  from pixel_llm.data import pipeline
  from pixel_llm.metrics import referring as metrics
  config_path = os.path.join(args.workdir, layout.CONFIG)
  if not os.path.exists(config_path):
    raise SystemExit(f"{config_path} does not exist: pass a training run's workdir.")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  data = pipeline.prepare(config, args.workdir)
  factors = [int(f) for f in args.factors.split(",")]
  preds, gts = {f: [] for f in factors}, []
  for batch in data.eval_batches(args.split):
    gt = np.asarray(batch["masks"])[:, 0] > 0  # [B, S, S]
    keep = np.flatnonzero(np.asarray(batch["mask_weights"])[:, 0] > 0)
    valid = np.asarray(batch["image_mask"], bool)
    for f in factors:
      up = pooled_masks(gt, f)
      preds[f] += [up[i] & valid[i] for i in keep]
    gts += [gt[i] for i in keep]
  s = gts[0].shape[0]
  table = {f"{s // f}x{s // f} grid ({f} px per cell)": {
      "ciou": round(metrics.mask_ciou(preds[f], gts), 3),
      "miou": round(metrics.mask_miou(preds[f], gts), 3)} for f in factors}
  print(f"{len(gts)} GT masks of {args.split}, mean area {np.mean([g.sum() for g in gts]):.0f} px")
  for name, m in table.items():
    print(f"{name:28s} cIoU {m['ciou']:.3f}  mean IoU {m['miou']:.3f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"config": config.get("name", ""), "workdir": args.workdir, "split": args.split,
                 "num_masks": len(gts), "grids": table, "command": " ".join(sys.argv)}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
