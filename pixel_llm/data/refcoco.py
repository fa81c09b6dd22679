"""RefCOCO / RefCOCO+ / RefCOCOg: `refs(unc|umd|google).p` + COCO `instances.json` (or the
MDETR-style json) -> one record per referred object with all its expressions, box and mask
(`read_refcoco`, `read_mdetr`); `build.py refcoco` writes the objects of one image as one record
(`feature_description`), as the release's TFRecords hold an image's objects and refexps together.

Formats (users_formats_metrics.md, sections 2.2, 2.3, 2.5):
  refs(*).p       a Python 2 pickle (read with `safe_pickle`): a list of {ref_id, ann_id, image_id,
                  category_id, split, file_name, sent_ids,
                  sentences: [{raw, sent, sent_id, tokens}]}
  instances.json  COCO: images [{id, file_name, width, height}], annotations [{id, image_id,
                  category_id, bbox [x, y, w, h] in pixels, iscrowd, segmentation}], where the
                  segmentation is a list of polygons [x1, y1, x2, y2, ...] or an RLE
                  {size: [h, w], counts}; counts is a list (uncompressed) or a string (compressed)
  MDETR json      COCO-style with one image entry per expression: images [{id, original_id,
                  file_name, width, height, caption}], annotations [{image_id, original_id, bbox,
                  segmentation (optional)}]

Masks are decoded with numpy only, bit-exact with pycocotools (the official conversion uses
`frPyObjects` + `merge` + `decode`): `polygon_counts` ports its polygon rasteriser (`rleFrPoly`),
`counts_from_string` / `counts_to_string` its compressed-counts codec. RLE runs are column-major
(Fortran order) and start with a run of zeros.

Boxes: x0, y0, x1, y1 normalised by the image size. A box may stick out of the image by up to
BOX_TOLERANCE pixels (float rounding in the real files) and is clipped; further out is an error.

Problem kinds (`coco_captions.Problem`; the record is skipped unless kept):
  missing_field, wrong_type  a ref, sentence, annotation or image entry lacks a key / has a bad type
  unknown_split              a ref's split is not one of SPLITS (reported whatever split is built)
  empty_expression           no non-empty sentence;  empty_sentence (kept): some sentences dropped
  unknown_annotation         ann_id not in instances.json, or it belongs to another image
  unknown_image              image_id not in instances.json
  bad_box                    zero or negative width / height, or not finite
  box_outside                the box extends outside the image by more than BOX_TOLERANCE pixels
  bad_mask                   a segmentation that does not decode (bad polygon, RLE of another size,
                             counts that do not add up to h * w)
  empty_mask (kept)          the mask decodes to no pixel; the box is still usable

Shape letters: H, W image height and width; V polygon vertices.
"""
import dataclasses
import math
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence

import numpy as np

from pixel_llm.data import safe_pickle
from pixel_llm.data.coco_captions import FileError, Problem, coco_names, entry, load_json
from pixel_llm.data.ln import RecordError
from pixel_llm.data.ln import _require as require

SPLITS = ("train", "val", "testA", "testB", "test")
BOX_TOLERANCE = 1.0  # pixels


def feature_description() -> dict:
  """tf.io parsing spec of the builder's records (`build.py refcoco`): one record per image with
  its N referred objects and their M expressions. Per object: ref/id, ann/id, category/id, box
  (4 floats each, flattened), mask (a 1-bit PNG, b"" when the source has none); per expression:
  expression/raw, expression/sent, expression/id and expression/object (the index of its object
  in the record). Records of the earlier one-object format (no expression/object) parse too:
  their expressions all belong to object 0."""
  import tensorflow as tf
  fixed, var = tf.io.FixedLenFeature, tf.io.VarLenFeature
  return {"image/encoded": fixed([], tf.string), "image/id": fixed([], tf.string),
          "image/width": fixed([], tf.int64), "image/height": fixed([], tf.int64),
          "split": fixed([], tf.string), "ref/id": var(tf.int64), "ann/id": var(tf.int64),
          "category/id": var(tf.int64), "box": var(tf.float32), "mask": var(tf.string),
          "expression/raw": var(tf.string), "expression/sent": var(tf.string),
          "expression/id": var(tf.int64), "expression/object": var(tf.int64)}


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)} "
                     "(testA/testB: RefCOCO and RefCOCO+ UNC; test: RefCOCOg UMD)")


# -- masks ----------------------------------------------------------------------------------------

def rle_decode(counts: Sequence[int], height: int, width: int) -> np.ndarray:
  """bool[H, W] of column-major runs (zeros first); raises ValueError if they do not cover H * W."""
  counts = np.asarray(counts, np.int64).reshape(-1)
  if (counts < 0).any() or counts.sum() != height * width:
    raise ValueError(f"RLE counts add up to {int(counts.sum())} ({int((counts < 0).sum())} "
                     f"negative), expected {height} * {width} = {height * width}")
  flat = np.repeat((np.arange(len(counts)) % 2).astype(bool), counts)
  return flat.reshape(width, height).T


def rle_encode(mask: np.ndarray) -> list[int]:
  """Uncompressed COCO counts of bool[H, W]."""
  flat = np.asarray(mask, bool).T.reshape(-1)
  bounds = np.r_[0, np.flatnonzero(flat[1:] != flat[:-1]) + 1, flat.size]
  counts = np.diff(bounds).tolist()
  return [0] + counts if flat.size and flat[0] else counts


def counts_to_string(counts: Sequence[int]) -> str:
  """COCO's compressed counts: each count (from the third on, minus the count two before) in
  6-bit groups, 5 data bits + a continuation bit, sign-extended, offset by 48 ('0')."""
  out = []
  for i, c in enumerate(counts):
    x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
    more = True
    while more:
      ch = x & 0x1F
      x >>= 5
      more = x != -1 if ch & 0x10 else x != 0
      out.append(chr((ch | 0x20 if more else ch) + 48))
  return "".join(out)


def counts_from_string(s: str | bytes) -> list[int]:
  """Inverse of `counts_to_string`; raises ValueError on characters outside '0'..'o' or a cut."""
  data = s.encode("ascii", "replace") if isinstance(s, str) else bytes(s)
  counts, p = [], 0
  while p < len(data):
    x = k = 0
    more = True
    while more:
      if p >= len(data):
        raise ValueError("compressed RLE counts end inside a number")
      c = data[p] - 48
      if not 0 <= c < 64:
        raise ValueError(f"compressed RLE counts hold the character {chr(data[p])!r}")
      x |= (c & 0x1F) << (5 * k)
      more = bool(c & 0x20)
      p, k = p + 1, k + 1
      if not more and c & 0x10:
        x |= -1 << (5 * k)
    counts.append(x + (counts[-2] if len(counts) > 2 else 0))
  return counts


def polygon_counts(xy: Sequence[float], height: int, width: int) -> list[int]:
  """RLE counts of one polygon [x1, y1, x2, y2, ...] (pixel coordinates), as pycocotools'
  `rleFrPoly`: the outline is walked at 5x resolution, and a pixel is inside when its centre lies
  between the outline's crossings of its column."""
  scale = 5.0
  xy = np.asarray(xy, np.float64)
  x = np.trunc(scale * xy[0::2] + 0.5).astype(np.int64)  # C's (int) cast truncates
  y = np.trunc(scale * xy[1::2] + 0.5).astype(np.int64)
  x, y = np.r_[x, x[:1]], np.r_[y, y[:1]]
  us, vs = [], []
  for j in range(len(x) - 1):
    xs, xe, ys, ye = x[j], x[j + 1], y[j], y[j + 1]
    dx, dy = abs(xe - xs), abs(ys - ye)
    flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
    if flip:
      xs, xe, ys, ye = xe, xs, ye, ys
    if dx >= dy:
      t = np.arange(dx + 1)[::-1] if flip else np.arange(dx + 1)
      s = (ye - ys) / dx if dx else 0.0
      us.append(t + xs)
      vs.append(np.trunc(ys + s * t + 0.5).astype(np.int64))
    else:
      t = np.arange(dy + 1)[::-1] if flip else np.arange(dy + 1)
      vs.append(t + ys)
      us.append(np.trunc(xs + (xe - xs) / dy * t + 0.5).astype(np.int64))
  u, v = np.concatenate(us), np.concatenate(vs)
  j = np.flatnonzero(u[1:] != u[:-1]) + 1  # the outline crosses into another column
  xd = (np.where(u[j] < u[j - 1], u[j], u[j] - 1) + 0.5) / scale - 0.5
  keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)
  yd = np.ceil(np.clip((np.minimum(v[j], v[j - 1]) + 0.5) / scale - 0.5, 0, height))
  a = np.sort(np.r_[xd[keep].astype(np.int64) * height + yd[keep].astype(np.int64),
                    height * width])
  a = np.diff(np.r_[0, a]).tolist()
  counts, i = [a[0]], 1
  while i < len(a):  # Two crossings at one pixel cancel: merge the runs around them.
    if a[i] > 0:
      counts.append(a[i])
      i += 1
    else:
      if i + 1 < len(a):
        counts[-1] += a[i + 1]
      i += 2
  return counts


def decode_segmentation(seg, height: int, width: int) -> np.ndarray:
  """bool[H, W] of a COCO segmentation (polygons are merged); raises ValueError."""
  if isinstance(seg, list):
    if not seg:
      raise ValueError("the polygon list is empty")
    mask = np.zeros((height, width), bool)
    for k, ring in enumerate(seg):
      if not (isinstance(ring, list) and all(isinstance(v, (int, float)) and
                                             not isinstance(v, bool) for v in ring)):
        raise ValueError(f"polygon {k} should be a list of numbers")
      if len(ring) < 6 or len(ring) % 2 or not all(math.isfinite(v) for v in ring):
        raise ValueError(f"polygon {k} needs an even number (>= 6) of finite coordinates, got "
                         f"{len(ring)}")
      mask |= rle_decode(polygon_counts(ring, height, width), height, width)
    return mask
  if isinstance(seg, dict):
    size, counts = seg.get("size"), seg.get("counts")
    if list(size or ()) != [height, width]:
      raise ValueError(f"RLE size {size} differs from the image's [height, width] "
                       f"[{height}, {width}]")
    if isinstance(counts, (str, bytes)):
      counts = counts_from_string(counts)
    elif not (isinstance(counts, list) and all(isinstance(c, int) for c in counts)):
      raise ValueError("RLE counts should be a list of ints or a compressed string")
    return rle_decode(counts, height, width)
  raise ValueError(f"segmentation should be polygons or an RLE object, got {type(seg).__name__}")


# -- records --------------------------------------------------------------------------------------

@dataclasses.dataclass
class RefRecord:
  """One referred object. box: float[4] x0, y0, x1, y1 in [0, 1]; mask: bool[H, W] (None when the
  source has no segmentation); raw / sents / sent_ids: one per expression."""
  where: str
  ref_id: int
  ann_id: int
  image_id: int
  category_id: int
  split: str
  file_names: tuple[str, ...]
  width: int
  height: int
  box: list[float]
  mask: np.ndarray | None
  raw: list[str]
  sents: list[str]
  sent_ids: list[int]
  issues: Counter = dataclasses.field(default_factory=Counter)


def _image_entry(images: dict, image_id: int, path: str) -> tuple[str, int, int]:
  img = images.get(image_id)
  if img is None:
    raise RecordError("unknown_image", f"image {image_id} is not in {path}")
  img = entry(img, f"image {image_id}")
  size = tuple(require(img, k, int, f"image {image_id} ") for k in ("width", "height"))
  return require(img, "file_name", str, f"image {image_id} "), *size


def geometry(ann: dict, width: int, height: int, what: str
             ) -> tuple[list[float], np.ndarray | None]:
  """(normalised box, mask or None) of a COCO annotation; raises RecordError."""
  if width <= 0 or height <= 0:
    raise RecordError("wrong_type", f"the image of {what} has size {width}x{height}")
  bbox = require(ann, "bbox", list, f"{what} ")
  if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                               for v in bbox):
    raise RecordError("wrong_type", f"{what} bbox should be 4 numbers [x, y, w, h], got {bbox}")
  x, y, w, h = bbox
  if not all(math.isfinite(v) for v in bbox) or w <= 0 or h <= 0:
    raise RecordError("bad_box", f"{what} bbox {bbox} has no area")
  t = BOX_TOLERANCE
  if x < -t or y < -t or x + w > width + t or y + h > height + t:
    raise RecordError("box_outside", f"{what} bbox {bbox} (x, y, w, h) extends outside the "
                                     f"{width}x{height} image")
  box = [min(max(v / s, 0.0), 1.0) for v, s in zip((x, y, x + w, y + h), (width, height) * 2)]
  if box[2] <= box[0] or box[3] <= box[1]:
    raise RecordError("bad_box", f"{what} bbox {bbox} has no area inside the image")
  mask = None
  if "segmentation" in ann:
    try:
      mask = decode_segmentation(ann["segmentation"], height, width)
    except ValueError as e:
      raise RecordError("bad_mask", f"{what} segmentation: {e}") from None
  return box, mask


def _sentences(ref: dict, rec_issues: Counter) -> tuple[list[str], list[str], list[int]]:
  sentences = require(ref, "sentences", list, "")
  raw, sents, ids = [], [], []
  for j, s in enumerate(sentences):
    s = entry(s, f"sentences[{j}]")
    sent = require(s, "sent", str, f"sentences[{j}].").strip()
    text = require(s, "raw", str, f"sentences[{j}].").strip() if "raw" in s else sent
    sent_id = require(s, "sent_id", int, f"sentences[{j}].")
    if not sent:
      rec_issues["empty_sentence"] += 1
      continue
    raw.append(text or sent)
    sents.append(sent)
    ids.append(sent_id)
  if not sents:
    raise RecordError("empty_expression", f"none of the {len(sentences)} sentence(s) has text")
  return raw, sents, ids


def _instances(path: str) -> tuple[dict, dict]:
  data = load_json(path, ("images", "annotations"))
  index = []
  for key in ("images", "annotations"):
    index.append({e["id"]: e for e in data[key] if isinstance(e, dict) and
                  isinstance(e.get("id"), int)})
  return index[0], index[1]


def load_refs(path: str) -> list:
  """The refs list of a refs(*).p file; raises FileError (unsafe/unreadable pickle, not a list)."""
  try:
    refs = safe_pickle.load(path)
  except OSError as e:
    raise FileError(f"{path}: cannot read: {e}") from None
  except safe_pickle.PickleLoadError as e:
    raise FileError(str(e)) from None
  if not isinstance(refs, list):
    raise FileError(f"{path}: expected a list of refs, got {type(refs).__name__}")
  return refs


def read_refcoco(refs_path: str, instances_path: str, split: str,
                 splits_seen: Counter | None = None) -> Iterator[RefRecord | Problem]:
  """Records of the refs whose split is `split`, in file order (see the module docstring).
  `splits_seen` (if given) counts the refs of every valid split."""
  check_split(split)
  splits_seen = Counter() if splits_seen is None else splits_seen
  refs = load_refs(refs_path)
  images, anns = _instances(instances_path)
  for i, ref in enumerate(refs):
    where = f"{refs_path}[{i}]"
    try:
      ref = entry(ref, "the ref")
      ref_id = require(ref, "ref_id", int, "")
      where = f"{refs_path}[{i}] (ref_id {ref_id})"
      ref_split = require(ref, "split", str, "")
      if ref_split not in SPLITS:
        raise RecordError("unknown_split", f"split {ref_split!r} is not one of {', '.join(SPLITS)}")
      splits_seen[ref_split] += 1
      if ref_split != split:
        continue
      ann_id, image_id = (require(ref, k, int, "") for k in ("ann_id", "image_id"))
      issues = Counter()
      raw, sents, sent_ids = _sentences(ref, issues)
      file_name, width, height = _image_entry(images, image_id, instances_path)
      if ann_id not in anns:
        raise RecordError("unknown_annotation", f"annotation {ann_id} is not in {instances_path}")
      ann = entry(anns[ann_id], f"annotation {ann_id}")
      if require(ann, "image_id", int, f"annotation {ann_id} ") != image_id:
        raise RecordError("unknown_annotation", f"annotation {ann_id} belongs to image "
                                                f"{ann['image_id']}, not {image_id}")
      box, mask = geometry(ann, width, height, f"annotation {ann_id}")
      if mask is None:
        raise RecordError("missing_field", f"annotation {ann_id} has no 'segmentation'")
      category = ref["category_id"] if "category_id" in ref else ann.get("category_id", -1)
      if not isinstance(category, int):
        raise RecordError("wrong_type", f"category_id should be int, got {category!r}")
    except RecordError as e:
      yield Problem(where, e.kind, str(e))
      continue
    if not mask.any():
      issues["empty_mask"] += 1
    yield RefRecord(where, ref_id, ann_id, image_id, category, split,
                    coco_names(image_id, file_name), width, height, box, mask, raw, sents,
                    sent_ids, issues)


def read_mdetr(path: str, split: str) -> Iterator[RefRecord | Problem]:
  """Records of an MDETR-style refexp json, grouped per (COCO image, COCO annotation): the file has
  one image entry per expression. ref_id is -1 (the format has none); sent_ids are the entries'
  `refexp_id` (their `id` when absent); `split` names the records (the file is one split)."""
  check_split(split)
  data = load_json(path, ("images", "annotations"))
  by_entry = defaultdict(list)
  for a in data["annotations"]:
    if isinstance(a, dict) and isinstance(a.get("image_id"), int):
      by_entry[a["image_id"]].append(a)
  groups: dict[tuple[int, int], RefRecord] = {}
  for i, img in enumerate(data["images"]):
    where = f"{path}:images[{i}]"
    try:
      img = entry(img, "the image entry")
      entry_id = require(img, "id", int, "")
      image_id = require(img, "original_img_id" if "original_img_id" in img else "original_id",
                         int, "")
      caption = require(img, "caption", str, "").strip()
      raw = require(img, "raw", str, "").strip() if "raw" in img else caption
      sent_id = require(img, "refexp_id", int, "") if "refexp_id" in img else entry_id
      if not caption:
        raise RecordError("empty_expression", f"entry {entry_id}: the caption is empty")
      file_name = require(img, "file_name", str, "")
      width, height = (require(img, k, int, "") for k in ("width", "height"))
      if not by_entry.get(entry_id):
        raise RecordError("unknown_annotation", f"entry {entry_id} has no annotation")
      ann = by_entry[entry_id][0]
      ann_id = require(ann, "original_id", int, "annotation ") if "original_id" in ann else -1
      key = (image_id, ann_id)
      if key not in groups:
        box, mask = geometry(ann, width, height, f"annotation of entry {entry_id}")
        category = ann.get("category_id", -1)
        groups[key] = RefRecord(where, -1, ann_id, image_id,
                                category if isinstance(category, int) else -1, split,
                                coco_names(image_id, file_name), width, height, box, mask, [], [],
                                [])
    except RecordError as e:
      yield Problem(where, e.kind, str(e))
      continue
    rec = groups[key]
    rec.raw.append(raw or caption)
    rec.sents.append(caption)
    rec.sent_ids.append(sent_id)
  for rec in groups.values():
    if rec.mask is not None and not rec.mask.any():
      rec.issues["empty_mask"] += 1
    yield rec
