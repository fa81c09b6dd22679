r"""Where referring boxes miss: P@0.5 and mean IoU per kind of expression of the synthetic world.

  python benchmarks/referring_breakdown.py --predictions=W/eval/refcoco_val.predictions.jsonl \
      [--out=benchmarks/results/referring_breakdown.json]

Reads the referring evaluator's per-expression rows (`pixel_llm.evaluation.ReferringEvaluator`:
expression, box, gt_box, iou) and splits them by the synthetic world's expression kinds
(`pixel_llm.data.synthetic_formats.referring_expressions`):
  relation   "the small shape to the left of the blue star" (names an anchor object)
  extreme    "the circle on the left", "the red shape at the top"
  attribute  "the red circle", "the large shape" (no other object has those attributes)
and, within each, by axis words (left/right vs top/bottom/above/below). Also the mean absolute
error of box centre and size (fractions of the padded square's side), and how a miss splits into
picking the wrong object and drawing the right one badly: "on object" is the share of boxes whose
centre lies inside the GT box, "P@0.5 on obj." the precision among those. Prints a table; writes
JSON with --out.
"""
import argparse
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prediction_files  # pylint: disable=g-import-not-at-top

_RELATION = re.compile(r"\b(to the left of|to the right of|above|below)\b")
_EXTREME = re.compile(r"\b(on the left|on the right|at the top|at the bottom)\b")
_HORIZONTAL = re.compile(r"\b(left|right)\b")
_VERTICAL = re.compile(r"\b(top|bottom|above|below)\b")


def kind(expression: str) -> str:
  text = expression.lower()
  if _RELATION.search(text):
    return "relation"
  return "extreme" if _EXTREME.search(text) else "attribute"


def axis(expression: str) -> str:
  text = expression.lower()
  return ("x" if _HORIZONTAL.search(text) else "") + ("y" if _VERTICAL.search(text) else "") or "-"


def summarise(rows: list[dict]) -> dict:
  box, gt = np.array([r["box"] for r in rows]), np.array([r["gt_box"] for r in rows])
  iou = np.array([r["iou"] for r in rows])
  mid = (box[:, :2] + box[:, 2:]) / 2
  centre = np.abs(mid - (gt[:, :2] + gt[:, 2:]) / 2)
  size = np.abs((box[:, 2:] - box[:, :2]) - (gt[:, 2:] - gt[:, :2]))
  on = ((mid > gt[:, :2]) & (mid < gt[:, 2:])).all(-1)  # the box is centred on the GT object
  return {"n": len(rows), "precision_at_0.5": float((iou > 0.5).mean()),
          "mean_iou": float(iou.mean()), "centre_error_xy": centre.mean(0).round(4).tolist(),
          "size_error_wh": size.mean(0).round(4).tolist(), "on_object": float(on.mean()),
          "precision_at_0.5_on_object": float((iou[on] > 0.5).mean()) if on.any() else 0.0}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--predictions", required=True, help="W/eval/<name>.predictions.jsonl")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  rows = prediction_files.read(args.predictions, {"expression", "box", "gt_box", "iou"},
                              "a referring evaluator's")
  groups = {"all": rows}
  for r in rows:
    groups.setdefault(kind(r["expression"]), []).append(r)
    groups.setdefault(f"{kind(r['expression'])}/axis {axis(r['expression'])}", []).append(r)
  table = {name: summarise(g) for name, g in sorted(groups.items())}
  print(f"{'group':<24} {'n':>4} {'P@0.5':>6} {'mIoU':>6} {'centre err x/y':>15} {'size err w/h':>13} "
        f"{'on object':>9} {'P@0.5 on obj.':>13}")
  for name, s in table.items():
    print(f"{name:<24} {s['n']:>4} {s['precision_at_0.5']:>6.3f} {s['mean_iou']:>6.3f} "
          f"{s['centre_error_xy'][0]:>7.3f}/{s['centre_error_xy'][1]:<7.3f} "
          f"{s['size_error_wh'][0]:>6.3f}/{s['size_error_wh'][1]:<6.3f} "
          f"{s['on_object']:>9.3f} {s['precision_at_0.5_on_object']:>13.3f}")
  if args.out:
    prediction_files.write(args.out, args.predictions, "groups", table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
