"""The synthetic world as Visual Genome region descriptions (VG v1.2 and GRiT layouts) and as
WebLI-style image-text pairs (the images and captions are `synthetic` / `synthetic_formats`').

  python -m pixel_llm.data.synthetic --out DIR --num_images 200 --split both --formats vg,webli

Layout written next to the LN files:
  DIR/vg/region_descriptions.json, DIR/vg/image_data.json, DIR/vg/densecap_splits.json,
  DIR/vg/VG_100K/{image_id}.jpg (even ids), DIR/vg/VG_100K_2/{image_id}.jpg (odd ids)
  DIR/vg/grit/train.json (train images), DIR/vg/grit/test.json (test images)  (`write_vg`)
  DIR/webli/pairs-00000-of-00001.jsonl, paths relative to DIR                 (`write_webli`)

Regions: every object gets "a {size} {colour} {shape}" and, about half the time, a second region
with the same box and one of its referring expressions ("the red circle to the left of the blue
star", `synthetic_formats.referring_expressions`); about half the images also get a whole-image
region about the background. Boxes are the objects' tight boxes widened to whole pixels.
Splits (densecap_splits.json): train images -> train; val images -> val (even ids), test (odd).
Pairs: one line per image with captions from `synthetic_formats.captions`: {"caption"} for ids
1 mod 3, {"text"} for 2 mod 3, {"captions": [two]} for 0 mod 3, so all three variants occur.
"""
import json
import math
import os
from collections.abc import Sequence

from pixel_llm.data import synthetic
from pixel_llm.data import synthetic_formats as formats

_REGION_STREAM, _PAIR_STREAM = 103, 104
_URL = "https://cs.stanford.edu/people/rak248/{dir}/{image_id}.jpg"


def _pixel_box(box: Sequence[float], size: int) -> list[int]:
  """[x, y, w, h] in whole pixels covering a normalised x0, y0, x1, y1 box."""
  x0, y0 = (max(0, math.floor(v * size)) for v in box[:2])
  x1, y1 = (min(size, math.ceil(v * size)) for v in box[2:])
  return [x0, y0, x1 - x0, y1 - y0]


def regions(ex: synthetic.Example, seed: int) -> list[tuple[list[int], str]]:
  """([x, y, w, h] in pixels, phrase) of the image's regions (module docstring)."""
  size = formats._image_size(ex)[0]
  rng = formats._rng(seed, ex.image_id, _REGION_STREAM)
  exprs = formats.referring_expressions(ex.objects)
  out = []
  for o, mine in zip(ex.objects, exprs):
    box = _pixel_box(o.box, size)
    out.append((box, f"{formats._a(o.size)} {formats._phrase(o, ('size', 'color', 'shape'))}"))
    if mine and rng.random() < 0.5:
      out.append((box, f"the {mine[int(rng.integers(len(mine)))]}"))
  if rng.random() < 0.5:
    out.append(([0, 0, size, size], f"{ex.stripes} stripes in the background"))
  return out


def _split(ex: synthetic.Example) -> str:
  return "train" if ex.split == "train" else ("test" if ex.image_id % 2 else "val")


def _dump(path: str, data) -> str:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)
  return path


def write_vg(out_dir: str, examples: Sequence[synthetic.Example], seed: int) -> list[str]:
  """Writes the VG and GRiT files and images (module docstring); returns the json paths."""
  root = os.path.join(out_dir, "vg")
  for d in ("VG_100K", "VG_100K_2", "grit"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  image_data, descriptions, splits = [], [], {"train": [], "val": [], "test": []}
  grit = {s: {"images": [], "annotations": [],
              "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}
          for s in ("train", "test")}
  for ex in examples:
    width, height = formats._image_size(ex)
    vg_dir = "VG_100K_2" if ex.image_id % 2 else "VG_100K"
    with open(os.path.join(root, vg_dir, f"{ex.image_id}.jpg"), "wb") as f:
      f.write(ex.jpeg)
    image_data.append({"width": width, "height": height, "image_id": ex.image_id,
                       "url": _URL.format(dir=vg_dir, image_id=ex.image_id),
                       "coco_id": None if ex.image_id % 2 else ex.image_id, "flickr_id": None})
    regs = [{"region_id": ex.image_id * 100 + k, "width": w, "height": h, "image_id": ex.image_id,
             "phrase": phrase, "y": y, "x": x}
            for k, ((x, y, w, h), phrase) in enumerate(regions(ex, seed))]
    descriptions.append({"regions": regs, "id": ex.image_id})
    split = _split(ex)
    splits[split].append(ex.image_id)
    if split in grit:
      grit[split]["images"].append({"id": ex.image_id, "file_name": f"{ex.image_id}.jpg",
                                    "height": height, "width": width})
      grit[split]["annotations"] += [
          {"id": r["region_id"], "image_id": ex.image_id, "category_id": 1,
           "bbox": [r["x"], r["y"], r["width"], r["height"]], "caption": r["phrase"],
           "area": r["width"] * r["height"], "iscrowd": 0} for r in regs]
  return [_dump(os.path.join(root, "region_descriptions.json"), descriptions),
          _dump(os.path.join(root, "image_data.json"), image_data),
          _dump(os.path.join(root, "densecap_splits.json"), splits)] + [
              _dump(os.path.join(root, "grit", f"{s}.json"), data) for s, data in grit.items()]


def pair(ex: synthetic.Example, seed: int) -> dict:
  """The JSON-lines object of one image (path relative to the world's root)."""
  caps = formats.captions(ex, seed)
  rng = formats._rng(seed, ex.image_id, _PAIR_STREAM)
  order = rng.permutation(len(caps))
  line = {"image": f"images/{ex.split}2017/{ex.image_id:012d}.jpg"}
  key = ("captions", "caption", "text")[ex.image_id % 3]
  line[key] = [caps[order[0]], caps[order[1]]] if key == "captions" else caps[order[0]]
  return line


def write_webli(out_dir: str, examples: Sequence[synthetic.Example], seed: int) -> str:
  """Writes DIR/webli/pairs-00000-of-00001.jsonl; returns its path."""
  os.makedirs(os.path.join(out_dir, "webli"), exist_ok=True)
  path = os.path.join(out_dir, "webli", "pairs-00000-of-00001.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for ex in examples:
      f.write(json.dumps(pair(ex, seed)) + "\n")
  return path


def write(out_dir: str, examples: Sequence[synthetic.Example], seed: int,
          names: set[str]) -> list[str]:
  """The files of the formats in `names` ("vg", "webli"); returns their paths."""
  paths = write_vg(out_dir, examples, seed) if "vg" in names else []
  return paths + ([write_webli(out_dir, examples, seed)] if "webli" in names else [])
