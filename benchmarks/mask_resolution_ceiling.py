r"""How much mask cIoU a low-resolution mask logit grid can reach at all (the seg toy's ceiling).

  python benchmarks/mask_resolution_ceiling.py --config=configs/refcoco_seg.py:toy \
      --workdir=W [--out=benchmarks/results/mask_resolution_ceiling.json]

SAM's mask decoder predicts logits at 4x its image-embedding grid (the seg toy: 8 x 8 -> 32 x 32
for 128-px images), upsampled bilinearly to the input (`mask_losses.upsample_logits`). Here the
GT masks of the referring evaluation split (the workdir's data) are pooled to grids of F x F
pixels per cell, turned into logits of the covered fraction, upsampled the same way and
thresholded at 0: the cIoU / mean IoU of a decoder that is perfect up to its resolution.
"""
import argparse
import json
import sys

import numpy as np


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/refcoco_seg.py:toy", help="file.py:variant")
  p.add_argument("--workdir", required=True, help="a run's workdir (its data and vocabulary)")
  p.add_argument("--split", default="val")
  p.add_argument("--factors", default="2,4,8", help="pixels per low-res cell, comma-separated")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  import importlib
  import jax.numpy as jnp
  from pixel_llm import mask_losses
  from pixel_llm.data import pipeline
  from pixel_llm.metrics import referring as metrics
  path, _, variant = args.config.partition(":")
  module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
  config = module.get_config(variant or None)
  data = pipeline.prepare(config, args.workdir)
  factors = [int(f) for f in args.factors.split(",")]
  preds, gts = {f: [] for f in factors}, []
  for batch in data.eval_batches(args.split):
    gt = np.asarray(batch["masks"])[:, 0] > 0  # [B, S, S]
    keep = np.flatnonzero(np.asarray(batch["mask_weights"])[:, 0] > 0)
    valid = np.asarray(batch["image_mask"], bool)
    b, s, _ = gt.shape
    for f in factors:
      frac = gt.reshape(b, s // f, f, s // f, f).mean((2, 4))
      frac = np.clip(frac, 1e-4, 1 - 1e-4)
      up = mask_losses.upsample_logits(jnp.asarray(np.log(frac / (1 - frac)))[:, None], (s, s))
      up = np.asarray(up)[:, 0] > 0
      preds[f] += [up[i] & valid[i] for i in keep]
    gts += [gt[i] for i in keep]
  table = {f"{s // f}x{s // f} grid ({f} px per cell)": {
      "ciou": round(metrics.mask_ciou(preds[f], gts), 3),
      "miou": round(metrics.mask_miou(preds[f], gts), 3)} for f in factors}
  print(f"{len(gts)} GT masks of {args.split}, mean area {np.mean([g.sum() for g in gts]):.0f} px")
  for name, m in table.items():
    print(f"{name:28s} cIoU {m['ciou']:.3f}  mean IoU {m['miou']:.3f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"config": args.config, "split": args.split, "num_masks": len(gts),
                 "grids": table, "command": " ".join(sys.argv)}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
