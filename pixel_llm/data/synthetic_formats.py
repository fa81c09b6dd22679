"""The synthetic world in the RefCOCO and COCO-captions formats (the images are `synthetic`'s).

  python -m pixel_llm.data.synthetic --out DIR --num_images 200 --split both \
      --formats ln,refcoco,coco_captions

Layout written next to the LN files:
  DIR/refcoco/instances.json, DIR/refcoco/refs(unc).p     (`write_refcoco`)
  DIR/annotations/captions_{split}2017.json, DIR/annotations/dataset_coco.json
                                                          (`write_coco_captions`; Karpathy format)
Image file names are COCO 2017's ({image_id:012d}.jpg, in DIR/images/{split}2017).
Visual Genome regions and WebLI-style pairs (--formats vg,webli): see `synthetic_regions`.

Referring expressions. Every object gets an annotation; an object is referred to (gets a ref) when
at least one expression picks it out alone, and then gets up to 3 of them, drawn from:
  attributes   "the red circle", "the large shape", "the small blue star" (no other object has the
               named attributes);
  extremes     "the circle on the left", "the red shape at the top" (among the objects with the
               named attributes, it is the furthest that way by a margin of EXTREME_MARGIN);
  relations    "the small shape to the left of the blue star": the object has that relation to
               the anchor (`synthetic._relation`), the anchor is named uniquely by its attributes,
               and the centre of no other object with the named attributes lies that way of the
               anchor's at all.
Splits (refs(unc).p): train images -> train; val images -> val, testA, testB by image id modulo 3.
Masks are the visible part of each rendered shape (later shapes occlude earlier ones), at image
size. Segmentations: polygons for unoccluded polygon shapes (square, triangle, star, diamond),
compressed-string RLE for circles and occluded polygon shapes, uncompressed-list RLE for rings.

Captions: 3-5 short sentences per image (what is there, how many shapes, where the first one is,
a relation, the background). Karpathy splits: train images -> train (restval for every fifth id),
val images -> val (even ids) or test (odd ids).

Text is drawn from a stream seeded by (seed, image_id, a constant of each format), so the LN
output of `synthetic` is untouched and each format is a pure function of (seed, image_id).
"""
import io
import itertools
import json
import os
import pickle
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pixel_llm.data import refcoco, synthetic

EXTREME_MARGIN = 0.08  # image sides
_REF_STREAM, _CAPTION_STREAM = 101, 102
_ATTRS = (("shape",), ("color",), ("size",), ("color", "shape"), ("size", "shape"),
          ("size", "color"), ("size", "color", "shape"), ())
_RELATION_ATTRS = (("size",), ("shape",), ("color",), ())  # "the small shape to the left of ..."
_DIRECTIONS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1),
               "below": (1, 1)}
_NUMBERS = ("No", "One", "Two", "Three", "Four")


def _rng(seed: int, image_id: int, stream: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, image_id, stream]))


def _image_size(ex: synthetic.Example) -> tuple[int, int]:
  with Image.open(io.BytesIO(ex.jpeg)) as im:
    return im.size


# -- masks ----------------------------------------------------------------------------------------

def _shape_mask(o: synthetic.SceneObject, size: int) -> np.ndarray:
  """bool[S, S]: the shape drawn as `synthetic.render` draws it (2x supersampled, alpha >= 0.5)."""
  return synthetic.coverage(o, size) >= 128


def visible_masks(objects: Sequence[synthetic.SceneObject], size: int
                  ) -> tuple[list[np.ndarray], list[bool]]:
  """Per object: bool[S, S] visible part, and whether a later (upper) shape covers part of it."""
  own = [_shape_mask(o, size) for o in objects]
  masks, occluded = [], []
  for k, m in enumerate(own):
    above = np.zeros_like(m)
    for later in own[k + 1:]:
      above |= later
    masks.append(m & ~above)
    occluded.append(bool((m & above).any()))
  return masks, occluded


def segmentation(o: synthetic.SceneObject, mask: np.ndarray, occluded: bool, size: int
                 ) -> tuple[object, list[float]]:
  """(COCO segmentation, bbox [x, y, w, h] in pixels) of one object."""
  poly = synthetic._polygon(o.shape, o.center[0] * size, o.center[1] * size, o.radius * size)
  if poly is not None and not occluded:
    lo, hi = poly.min(0), poly.max(0)
    return ([[round(v, 2) for v in poly.reshape(-1).tolist()]],
            [round(float(v), 2) for v in (lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1])])
  ys, xs = np.nonzero(mask)
  bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
          float(ys.max() - ys.min() + 1)]
  counts = refcoco.rle_encode(mask)
  if o.shape != "ring":
    counts = refcoco.counts_to_string(counts)
  return {"size": [size, size], "counts": counts}, bbox


# -- referring expressions ------------------------------------------------------------------------

def _phrase(o: synthetic.SceneObject, attrs: Sequence[str]) -> str:
  words = [getattr(o, a) for a in ("size", "color") if a in attrs]
  return " ".join(words + [o.shape if "shape" in attrs else "shape"])


def _matching(objects, target, attrs) -> list[int]:
  return [j for j, o in enumerate(objects) if all(getattr(o, a) == getattr(target, a)
                                                  for a in attrs)]


def _loosely(o: synthetic.SceneObject, anchor: synthetic.SceneObject, rel: str) -> bool:
  """Whether a reader could take `o` to be `rel` the anchor: its centre lies that way at all."""
  axis, sign = _DIRECTIONS[rel]
  return sign * (o.center[axis] - anchor.center[axis]) > 0


def _extreme(objects, k: int, group: list[int]) -> list[str]:
  """Directions in which object k is the extreme of `group` by EXTREME_MARGIN."""
  out = []
  for axis, (low, high) in enumerate((("on the left", "on the right"),
                                      ("at the top", "at the bottom"))):
    mine = objects[k].center[axis]
    others = [objects[j].center[axis] for j in group if j != k]
    if mine < min(others) - EXTREME_MARGIN:
      out.append(low)
    if mine > max(others) + EXTREME_MARGIN:
      out.append(high)
  return out


def referring_expressions(objects: Sequence[synthetic.SceneObject]) -> list[list[str]]:
  """Per object, every expression (module docstring) that picks it out alone, without the article:
  ["red circle", "circle on the left", ...]."""
  unique = [[a for a in _ATTRS if a and _matching(objects, o, a) == [k]]
            for k, o in enumerate(objects)]
  out = []
  for k, o in enumerate(objects):
    exprs = [_phrase(o, a) for a in unique[k]]
    for attrs in _ATTRS:
      group = _matching(objects, o, attrs)
      if len(group) > 1:
        exprs += [f"{_phrase(o, attrs)} {d}" for d in _extreme(objects, k, group)]
    for j, anchor in enumerate(objects):
      rel = synthetic._relation(o, anchor) if j != k and unique[j] else None
      if rel is None:
        continue
      anchor_phrase = _phrase(anchor, ("color", "shape") if ("color", "shape") in unique[j]
                              else unique[j][0])
      for attrs in _RELATION_ATTRS:
        rivals = [i for i in _matching(objects, o, attrs)
                  if i != j and _loosely(objects[i], anchor, rel)]
        if rivals == [k]:
          exprs.append(f"{_phrase(o, attrs)} {rel} the {anchor_phrase}")
          break
    out.append(list(dict.fromkeys(exprs)))
  return out


def _sentence(text: str, rng: np.random.Generator, sent_id: int) -> dict:
  """A refs sentence: `raw` as typed (sometimes without the article, sometimes capitalised),
  `sent` lower-case without punctuation, `tokens` its words."""
  raw = text if rng.random() < 0.3 else f"the {text}"
  if rng.random() < 0.3:
    raw = raw[0].upper() + raw[1:]
  sent = raw.lower()
  return {"tokens": sent.split(), "raw": raw, "sent_id": sent_id, "sent": sent}


# -- writers --------------------------------------------------------------------------------------

def write_refcoco(out_dir: str, examples: Sequence[synthetic.Example], seed: int) -> dict:
  """Writes DIR/refcoco/{instances.json, refs(unc).p}; returns their paths and counts."""
  images, anns, refs = [], [], []
  sent_ids = itertools.count()
  for ex in examples:
    width, height = _image_size(ex)
    images.append({"id": ex.image_id, "file_name": f"{ex.image_id:012d}.jpg", "width": width,
                   "height": height})
    masks, occluded = visible_masks(ex.objects, width)
    exprs = referring_expressions(ex.objects)
    rng = _rng(seed, ex.image_id, _REF_STREAM)
    for k, (o, mask) in enumerate(zip(ex.objects, masks)):
      if not mask.any():
        continue
      ann_id = ex.image_id * 10 + k
      seg, bbox = segmentation(o, mask, occluded[k], width)
      category = synthetic.SHAPES.index(o.shape) + 1
      anns.append({"id": ann_id, "image_id": ex.image_id, "category_id": category, "bbox": bbox,
                   "area": float(mask.sum()), "iscrowd": 0, "segmentation": seg})
      if not exprs[k]:
        continue
      chosen = rng.permutation(len(exprs[k]))[:int(rng.integers(1, 4))]
      sentences = [_sentence(exprs[k][c], rng, next(sent_ids)) for c in sorted(chosen)]
      split = "train" if ex.split == "train" else ("val", "testA", "testB")[ex.image_id % 3]
      refs.append({"sent_ids": [s["sent_id"] for s in sentences],
                   "file_name": f"COCO_train2014_{ex.image_id:012d}_{ann_id}.jpg",
                   "ann_id": ann_id, "ref_id": len(refs), "image_id": ex.image_id,
                   "split": split, "sentences": sentences, "category_id": category})
  root = os.path.join(out_dir, "refcoco")
  os.makedirs(root, exist_ok=True)
  instances = {"info": {"description": "pixel_llm synthetic world"}, "images": images,
               "annotations": anns, "licenses": [],
               "categories": [{"id": i + 1, "name": s, "supercategory": "shape"}
                              for i, s in enumerate(synthetic.SHAPES)]}
  paths = {"instances": os.path.join(root, "instances.json"),
           "refs": os.path.join(root, "refs(unc).p")}
  with open(paths["instances"], "w", encoding="utf-8") as f:
    json.dump(instances, f)
  with open(paths["refs"], "wb") as f:
    pickle.dump(refs, f, protocol=2)  # Plain opcodes only, as the Python 2 originals.
  return {**paths, "num_refs": len(refs), "num_annotations": len(anns)}


def _a(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def captions(ex: synthetic.Example, seed: int) -> list[str]:
  """3-5 distinct one-sentence captions of the image."""
  objs, rng = ex.objects, _rng(seed, ex.image_id, _CAPTION_STREAM)
  things = [f"{_a(o.color)} {o.color} {o.shape}" for o in objs]
  listing = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
  n = len(objs)
  plural = "shapes" if n != 1 else "shape"
  options = [
      f"{listing[0].upper()}{listing[1:]}.",
      f"{_NUMBERS[n]} {plural} on a background with {ex.stripes} stripes.",
      f"A {objs[0].size} {objs[0].color} {objs[0].shape} {synthetic._position(objs[0])}.",
      f"{_NUMBERS[n]} colourful {plural}.",
      f"Some shapes over a {ex.stripes} striped background.",
  ]
  for k in range(1, n):
    rel = synthetic._relation(objs[k], objs[k - 1])
    if rel:
      a, b = objs[k], objs[k - 1]
      options.append(f"{_a(a.color).title()} {a.color} {a.shape} {rel} {_a(b.color)} {b.color} "
                     f"{b.shape}.")
      break
  chosen = rng.permutation(len(options))[:int(rng.integers(3, 6))]
  return [options[c] for c in chosen]


def write_coco_captions(out_dir: str, examples: Sequence[synthetic.Example], seed: int
                        ) -> list[str]:
  """Writes DIR/annotations/captions_{split}2017.json per split present and dataset_coco.json."""
  root = os.path.join(out_dir, "annotations")
  os.makedirs(root, exist_ok=True)
  per_split: dict[str, dict] = {}
  karpathy = []
  sent_ids = itertools.count()
  for ex in examples:
    width, height = _image_size(ex)
    caps = captions(ex, seed)
    name = f"{ex.image_id:012d}.jpg"
    data = per_split.setdefault(ex.split, {"info": {"description": "pixel_llm synthetic world"},
                                           "images": [], "annotations": [], "licenses": []})
    data["images"].append({"id": ex.image_id, "file_name": name, "width": width,
                           "height": height})
    data["annotations"] += [{"image_id": ex.image_id, "id": ex.image_id * 10 + c, "caption": cap}
                            for c, cap in enumerate(caps)]
    if ex.split == "train":
      split = "restval" if ex.image_id % 5 == 0 else "train"
    else:
      split = "test" if ex.image_id % 2 else "val"
    sentences = [{"tokens": cap.lower().rstrip(".").replace(",", "").split(), "raw": cap,
                  "imgid": len(karpathy), "sentid": next(sent_ids)} for cap in caps]
    karpathy.append({"filepath": f"{ex.split}2017", "sentids": [s["sentid"] for s in sentences],
                     "filename": name, "imgid": len(karpathy), "split": split,
                     "sentences": sentences, "cocoid": ex.image_id})
  paths = []
  for split, data in per_split.items():
    paths.append(os.path.join(root, f"captions_{split}2017.json"))
    with open(paths[-1], "w", encoding="utf-8") as f:
      json.dump(data, f)
  paths.append(os.path.join(root, "dataset_coco.json"))
  with open(paths[-1], "w", encoding="utf-8") as f:
    json.dump({"images": karpathy, "dataset": "coco"}, f)
  return paths
