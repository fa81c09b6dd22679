r"""Which object a referring box lands on, against what the expression's words say.

  python benchmarks/referring_binding.py --predictions=W/eval/refcoco_val.predictions.jsonl \
      [--out=benchmarks/results/referring_binding.json] [--seed=0]

For the synthetic world's held-out referring predictions (the evaluator's rows: image_id,
expression, box, gt_box, iou), the scene behind each image is regenerated
(`synthetic.make_example`, a pure function of seed and image id) and the predicted box is
assigned to the object it overlaps most (IoU; "none" below 0.1). Per kind of expression
(`referring_breakdown.kind`): the share of boxes on the referred object, on another object that
shares a colour / shape / size word of the expression, on another object sharing none, and on no
object; beside each, the share a box on a uniformly drawn object of the image would get (chance).
If the words steer the box, "another object sharing a word" beats its chance; if the model
points by position priors only, it does not. Rows of a segmentation evaluation (with mask pixel
counts) also get their mask cIoU split by whether the box was right (IoU > 0.5).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prediction_files  # pylint: disable=g-import-not-at-top
import referring_breakdown  # pylint: disable=g-import-not-at-top

from pixel_llm.data import synthetic  # pylint: disable=g-import-not-at-top
from pixel_llm.detection import boxes as box_lib  # pylint: disable=g-import-not-at-top

_ASSIGN_IOU = 0.1


def _iou(a, b: np.ndarray) -> np.ndarray:
  """IoU of box a[4] with boxes b[N, 4] (xyxy) -> [N]."""
  return box_lib.iou_matrix_np(np.asarray(a)[None], b)[0]


def _words(expression: str, obj: synthetic.SceneObject) -> set[str]:
  """Which of the object's attributes (colour, shape, size) the expression names."""
  text = expression.lower().split()
  return {a for a in ("color", "shape", "size") if getattr(obj, a) in text}


def classify(row: dict, objects, boxes: np.ndarray) -> tuple[str, dict[str, float]]:
  """(where the box landed, the chance of each outcome for a uniformly drawn object)."""
  target = int(np.argmax(_iou(row["gt_box"], boxes)))
  named = _words(row["expression"], objects[target])

  def outcome(k: int) -> str:
    if k == target:
      return "referred object"
    shared = {a for a in named if getattr(objects[k], a) == getattr(objects[target], a)}
    return "other, shares a word" if shared else "other, shares none"

  chance = {}
  for k in range(len(objects)):
    chance[outcome(k)] = chance.get(outcome(k), 0.0) + 1.0 / len(objects)
  ious = _iou(row["box"], boxes)
  landed = outcome(int(np.argmax(ious))) if ious.max() >= _ASSIGN_IOU else "no object"
  return landed, chance


OUTCOMES = ("referred object", "other, shares a word", "other, shares none", "no object")
PRECISE = "IoU > 0.5 when on the referred object"


def binding_table(rows, seed: int) -> dict[str, dict[str, float]]:
  """{group: {"n", each outcome's share, "chance: <outcome>"}} of rows with image_id, expression,
  box (where the model pointed) and gt_box, groups "all" and each `referring_breakdown.kind`;
  where the rows carry the box's "iou", also "IoU > 0.5 when on the referred object": P@0.5 is
  the share on the referred object times this (binding times precision)."""
  scenes, checked, tally = {}, [], {}
  for row in rows:
    image_id = int(row["image_id"])
    if image_id not in scenes:
      # The scene (and its boxes, fractions of the image side) does not depend on image_size.
      objects = synthetic.make_example(seed, image_id, "val").objects
      scenes[image_id] = objects, np.asarray([o.box for o in objects], np.float64)
    objects, boxes = scenes[image_id]
    checked.append(_iou(row["gt_box"], boxes).max())
    landed, chance = classify(row, objects, boxes)
    for group in ("all", referring_breakdown.kind(row["expression"])):
      t = tally.setdefault(group, {"n": 0, **{o: 0.0 for o in OUTCOMES},
                                   **{"chance: " + o: 0.0 for o in OUTCOMES[:3]}})
      t["n"] += 1
      t[landed] += 1
      if "iou" in row and landed == OUTCOMES[0]:
        t[PRECISE] = t.get(PRECISE, 0.0) + float(float(row["iou"]) > 0.5)
      for o, c in chance.items():
        t["chance: " + o] += c
  # (GT boxes are of the visible part: an occluded object's is smaller than its drawn box.)
  if np.median(checked) < 0.9 or np.min(checked) < 0.5:  # not the scene that was evaluated
    raise SystemExit("GT boxes do not match the regenerated scenes (median IoU "
                     f"{np.median(checked):.3f}, min {np.min(checked):.3f}): pass the world's "
                     "--seed.")
  for t in tally.values():  # a share of the boxes on the referred object, not of all
    if PRECISE in t:
      t[PRECISE] *= t["n"] / max(t[OUTCOMES[0]], 1.0)
  return {g: {k: (v if k == "n" else round(v / t["n"], 3)) for k, v in t.items()}
          for g, t in tally.items()}


def print_table(table: dict[str, dict[str, float]]) -> None:
  print(f"{'group':10s} {'n':>4s} " + " ".join(f"{o[:22]:>22s}" for o in OUTCOMES))
  for g, t in table.items():
    print(f"{g:10s} {t['n']:4d} " + " ".join(
        f"{t[o]:>10.3f} ({t.get('chance: ' + o, 0.0):.3f})".rjust(22) for o in OUTCOMES))
  print("(chance in brackets: a box on a uniformly drawn object of the image)")
  if all(PRECISE in t for t in table.values()):
    print(f"{PRECISE}: " + ", ".join(f"{g} {t[PRECISE]:.3f}" for g, t in table.items()))


def mask_split(rows) -> dict[str, dict[str, float]]:
  """Mask cIoU (total intersection / total union) of the rows that carry mask pixel counts (a
  segmentation evaluator's), over all of them and split by whether the box that prompted SAM
  was right (IoU > 0.5): how much of the cIoU gap is the box's and how much the masks'."""
  groups = {"all": lambda r: True, "box IoU > 0.5": lambda r: float(r["iou"]) > 0.5,
            "box IoU <= 0.5": lambda r: float(r["iou"]) <= 0.5}
  rows = [r for r in rows if "mask_union" in r]
  out = {}
  for name, keep in groups.items():
    kept = [r for r in rows if keep(r)]
    union = sum(r["mask_union"] for r in kept)
    out[name] = {"n": len(kept), "share": round(len(kept) / max(len(rows), 1), 3),
                 "ciou": round(sum(r["mask_intersection"] for r in kept) / union, 3)
                 if union else 0.0}
  return out if rows else {}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--predictions", required=True, help="W/eval/<name>.predictions.jsonl")
  p.add_argument("--out", default="")
  p.add_argument("--seed", type=int, default=0, help="the world's config.data.seed")
  args = p.parse_args(argv)
  rows = prediction_files.read(args.predictions, {"image_id", "expression", "box", "gt_box"},
                               "the referring evaluator's")
  table = binding_table(rows, args.seed)
  print_table(table)
  masks = mask_split(rows)
  for name, m in masks.items():
    print(f"mask cIoU, {name}: {m['ciou']:.3f} ({m['n']} expressions, {m['share']:.3f})")
  if args.out:
    prediction_files.write(args.out, args.predictions, "groups", table,
                           **({"mask_ciou": masks} if masks else {}))
  return 0

if __name__ == "__main__":
  sys.exit(main())
