r"""Does a trace checkpoint point at the shape its words name, or at the shape narrated next?

  python benchmarks/grounding_probe.py --checkpoint=workdirs/ln_toy_long \
      [--num_images=64] [--out=benchmarks/results/grounding_probe.json]

For every shape k of the synthetic world's held-out images (the checkpoint's seed and image size),
the LN checkpoint reads its training prompt and, teacher-forced, a narrative opening that names
only that shape's attributes: "In this image I can see a small red circle" (how narratives start)
and "There is also a small red circle" (how they go on). The location head's box at the last word
(`PixelLLM.locate`'s reading position) is compared with the shapes' boxes: on images with two or
more shapes, is the shape nearest to its centre the named one ("named"), or the one a salient
narration (`synthetic.NARRATIONS`) would name first ("first")? Rows split by k's rank in the
salient order. A model that reads the words points at the named shape whatever its rank; one that
learnt the narration order points at rank 0 after "In this image I can see", whatever the words
say. "chance" is the mean of 1 / shapes.

Before pointing comes seeing: the checkpoint also captions each image (greedy) and the probe
counts the colours, shapes and "colour shape" pairs its narrative names against the image's
("precision": named ones that are there; "recall": ones there that it names; `caption_names`).
Prints both tables; writes JSON with --out.
"""
import argparse
import io
import os
import re
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hardware  # pylint: disable=g-import-not-at-top  (benchmarks/hardware.py)

OPENINGS = {"first": "In this image I can see a {}", "also": "There is also a {}"}


def nearest(boxes: np.ndarray, box: np.ndarray) -> int:
  """Index of the box (float[N, 4] xyxy) whose centre is nearest to `box`'s centre."""
  centres = (boxes[:, :2] + boxes[:, 2:]) / 2
  return int(np.argmin(np.hypot(*(centres - (box[:2] + box[2:]) / 2).T)))


def summarize(rows: list[dict]) -> dict:
  """rows of {"opening", "rank", "num_objects", "nearest"} -> per opening and rank (0, 1, 2+):
  n, named (nearest == rank), first (nearest == 0), chance (mean 1 / num_objects)."""
  out = {}
  for r in rows:
    if r["num_objects"] < 2:
      continue
    key = f"{r['opening']}/rank{min(r['rank'], 2)}" + ("+" if r["rank"] >= 2 else "")
    s = out.setdefault(key, {"n": 0, "named": 0.0, "first": 0.0, "chance": 0.0})
    s["n"] += 1
    s["named"] += r["nearest"] == r["rank"]
    s["first"] += r["nearest"] == 0
    s["chance"] += 1 / r["num_objects"]
  for s in out.values():
    for k in ("named", "first", "chance"):
      s[k] = round(s[k] / s["n"], 3)
  return dict(sorted(out.items()))


def caption_names(text: str, colors, shapes) -> dict[str, set]:
  """The colours, shapes and (colour, shape) pairs a narrative names."""
  text = text.lower()
  pair = re.compile(rf"\b({'|'.join(colors)}) ({'|'.join(shapes)})\b")
  return {"colour": set(re.findall(rf"\b({'|'.join(colors)})\b", text)),
          "shape": set(re.findall(rf"\b({'|'.join(shapes)})\b", text)),
          "pair": set(pair.findall(text))}


def precision_recall(named: list[dict], truth: list[dict], vocabulary: dict[str, int]
                     ) -> dict[str, dict]:
  """Per kind (colour / shape / pair), micro precision and recall over images; "chance" is the
  precision of names drawn uniformly from the kind's `vocabulary` size (mean present / size)."""
  out = {}
  for kind in ("colour", "shape", "pair"):
    hit = sum(len(n[kind] & t[kind]) for n, t in zip(named, truth))
    said, there = (sum(len(x[kind]) for x in xs) for xs in (named, truth))
    out[kind] = {"precision": round(hit / max(said, 1), 3), "recall": round(hit / max(there, 1), 3),
                 "named": said, "present": there,
                 "chance": round(there / max(len(truth), 1) / vocabulary[kind], 3)}
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--checkpoint", required=True, help="An LN trainer workdir or checkpoint.")
  p.add_argument("--num_images", type=int, default=64)
  p.add_argument("--out", default="")
  args = p.parse_args()
  from pixel_llm import api
  from pixel_llm.data import synthetic
  model = api.load(args.checkpoint)
  d = model.config.data
  prompt = d.prompts[0]
  rows, named, truth = [], [], []
  for i in range(args.num_images):
    ex = synthetic.make_example(d.seed, synthetic.VAL_START_ID + i, "val", d.image_size)
    image = np.asarray(Image.open(io.BytesIO(ex.jpeg)).convert("RGB"))
    h, w = image.shape[:2]
    boxes = np.array([o.box for o in ex.objects]) * np.array([w, h, w, h])
    named.append(caption_names(model.caption(image, prompt=prompt)["text"], synthetic.COLORS,
                               synthetic.SHAPES))
    truth.append({"colour": {o.color for o in ex.objects}, "shape": {o.shape for o in ex.objects},
                  "pair": {(o.color, o.shape) for o in ex.objects}})
    for rank, o in enumerate(ex.objects):
      for opening, text in OPENINGS.items():
        got = model.locate(image, text.format(f"{o.size} {o.name}"), prompt=prompt)
        rows.append({"image_id": ex.image_id, "opening": opening, "rank": rank,
                     "num_objects": len(ex.objects),
                     "nearest": nearest(boxes, np.asarray(got["box"]))})
  sizes = {"colour": len(synthetic.COLORS), "shape": len(synthetic.SHAPES),
           "pair": len(synthetic.COLORS) * len(synthetic.SHAPES)}
  seen = precision_recall(named, truth, sizes)
  print(f"{'caption names':16s} {'named':>6s} {'present':>7s} {'precision':>9s} {'recall':>6s} "
        f"{'chance':>6s}")
  for k, v in seen.items():
    print(f"{k:16s} {v['named']:6d} {v['present']:7d} {v['precision']:9.3f} {v['recall']:6.3f} "
          f"{v['chance']:6.3f}")
  table = summarize(rows)
  print(f"{'opening/rank':16s} {'n':>4s} {'named':>6s} {'first':>6s} {'chance':>6s}")
  for k, s in table.items():
    print(f"{k:16s} {s['n']:4d} {s['named']:6.3f} {s['first']:6.3f} {s['chance']:6.3f}")
  hardware.write_json(args.out, {
      **hardware.environment(), "table": table, "caption_names": seen,
      "checkpoint": args.checkpoint,
      "num_images": args.num_images, "narration": d.get("synthetic_narration", "salient"),
      "command": " ".join(sys.argv)})


if __name__ == "__main__":
  main()
