"""Visual Genome region descriptions: VG v1.2 `region_descriptions.json` + `image_data.json`, or
GRiT's COCO-style `train.json` / `test.json` -> one record per image with all its regions.

Formats (users_formats_metrics.md, section 2.4):
  region_descriptions.json  [{"id": image_id, "regions": [{"region_id", "image_id", "phrase",
                            "x", "y", "width", "height"}]}]   (v1.0 names the image "image_id")
  image_data.json           [{"image_id" (v1.0: "id"), "width", "height", "url", "coco_id",
                            "flickr_id"}]; the image is {image_id}.jpg in VG_100K/ or VG_100K_2/
                            (the url's last two path components name the right one)
  GRiT train.json/test.json {"images": [{"id", "file_name", "height", "width"}],
                            "annotations": [{"id", "image_id", "bbox": [x, y, w, h], "caption",
                            "category_id"}], "categories": [...]}
  densecap_splits.json      {"train": [image_id, ...], "val": [...], "test": [...]} (optional)

Boxes are x0, y0, x1, y1 in pixels of the annotated image size (image_data.json / the images
entry), normalised here to [0, 1]. Both json files are loaded whole (the real region file is
~700 MB of JSON; expect a few GB of memory), as the official tools do.

Per-region issues (`RegionRecord.issues`: kind -> the regions, e.g. "regions[3] (id 1382)", with
the reason for bad_region; the region is dropped unless said otherwise, the record is kept):
  bad_region   a region that is not an object, lacks x / y / width / height / phrase, or has a
               value of the wrong type (non-finite numbers included)
  empty_phrase the phrase is empty or only whitespace
  empty_box    zero or negative width or height
  box_outside  the box lies entirely outside the image
  box_clipped  (kept, clipped) the box sticks out of the image by more than BOX_TOLERANCE pixels;
               within the tolerance it is clipped without notice (rounding in the real files)
Record problems (`coco_captions.Problem`, the image is skipped):
  missing_field, wrong_type  an image entry (or a GRiT annotation) lacks a key / has a bad type;
                             regions of an image whose image_data entry is unusable are skipped
                             without a second report
  unknown_image              regions (a GRiT annotation) of an image id that has no image entry
  duplicate_image            a second image entry (image_data, regions or GRiT images) with an id
                             already seen
  no_regions                 an image without regions, or none left after dropping
A whole file that cannot be used raises `coco_captions.FileError`.

Shape letters: R regions of an image.
"""
import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

from pixel_llm.data.coco_captions import FileError, Problem, entry, load_json
from pixel_llm.data.ln import RecordError
from pixel_llm.data.ln import _is_number
from pixel_llm.data.ln import _require as require
from pixel_llm.data.refcoco import BOX_TOLERANCE

VG_DIRS = ("VG_100K", "VG_100K_2")
ISSUE_TEXT = {"bad_region": "malformed region(s) dropped",
              "empty_phrase": "region(s) with an empty phrase dropped",
              "empty_box": "region(s) with zero or negative width/height dropped",
              "box_outside": "region(s) entirely outside the image dropped",
              "box_clipped": "region(s) sticking out of the image clipped"}


def feature_description() -> dict:
  """tf.io parsing spec of the builder's records (`build.py vg`). region/box is R x 4 flattened
  (x0, y0, x1, y1 in [0, 1]): `tf.reshape(tf.sparse.to_dense(ex["region/box"]), [-1, 4])`."""
  import tensorflow as tf
  fixed, var = tf.io.FixedLenFeature, tf.io.VarLenFeature
  return {"image/encoded": fixed([], tf.string), "image/id": fixed([], tf.string),
          "image/width": fixed([], tf.int64), "image/height": fixed([], tf.int64),
          "region/box": var(tf.float32), "region/phrase": var(tf.string),
          "region/id": var(tf.int64), "split": fixed([], tf.string)}


@dataclasses.dataclass
class RegionRecord:
  """One image and its regions. boxes: float[R][4] x0, y0, x1, y1 in [0, 1]; width, height: the
  annotated size; `file_names`: candidate image paths relative to an image directory."""
  where: str
  image_id: int
  file_names: tuple[str, ...]
  width: int
  height: int
  boxes: list[list[float]]
  phrases: list[str]
  region_ids: list[int]
  split: str
  issues: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def issue_message(kind: str, regions: Sequence[str]) -> str:
  """'3 region(s) with ... dropped: regions[0] (id 7); ...' (the first five named)."""
  more = f"; ... ({len(regions) - 5} more)" if len(regions) > 5 else ""
  return f"{len(regions)} {ISSUE_TEXT[kind]}: {'; '.join(regions[:5])}{more}"


def vg_names(image_id: int, file_name: str | None = None, url: str | None = None
             ) -> tuple[str, ...]:
  """Candidate paths of an image: the url's VG_100K*/NAME, then NAME in VG_100K, VG_100K_2 and the
  directory itself (NAME: the file name given, or {image_id}.jpg)."""
  name = file_name or f"{image_id}.jpg"
  first = []
  if url:
    parts = url.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] in VG_DIRS:
      first = ["/".join(parts[-2:])]
  return tuple(dict.fromkeys(first + [f"{d}/{name}" for d in VG_DIRS] + [name]))


def clip_box(x, y, w, h, width: int, height: int) -> tuple[list[float] | None, str | None]:
  """(normalised box or None, issue kind or None) of a pixel box [x, y, w, h]."""
  if w <= 0 or h <= 0:
    return None, "empty_box"
  x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
  if x1 <= x0 or y1 <= y0:
    return None, "box_outside"
  t = BOX_TOLERANCE
  clipped = x < -t or y < -t or x + w > width + t or y + h > height + t
  return [x0 / width, y0 / height, x1 / width, y1 / height], "box_clipped" if clipped else None


def _add_region(rec: RegionRecord, region, what: str, grit: bool) -> None:
  """Appends one region (a VG region or a GRiT annotation) to `rec`, or notes why it is dropped."""
  id_key = "id" if grit else "region_id"
  try:
    region = entry(region, "the region")
    region_id = require(region, id_key, int, "") if id_key in region else -1
    what = f"{what} (id {region_id})"
    if grit:
      bbox = require(region, "bbox", list, "")
      if len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise RecordError("wrong_type", f"bbox should be 4 numbers, got {str(bbox)[:40]}")
      phrase = require(region, "caption", str, "")
    else:
      bbox = [require(region, k, "number", "") for k in ("x", "y", "width", "height")]
      phrase = require(region, "phrase", str, "")
    if not all(math.isfinite(v) for v in bbox):
      raise RecordError("wrong_type", f"box {bbox} is not finite")
  except RecordError as e:
    rec.issues.setdefault("bad_region", []).append(f"{what}: {e}")
    return
  if not phrase.strip():
    rec.issues.setdefault("empty_phrase", []).append(what)
    return
  box, issue = clip_box(*bbox, rec.width, rec.height)
  if issue:
    rec.issues.setdefault(issue, []).append(what)
  if box is not None:
    rec.boxes.append(box)
    rec.phrases.append(phrase.strip())
    rec.region_ids.append(region_id)


def _size(img: dict, what: str) -> tuple[int, int]:
  width, height = (require(img, k, int, f"{what} ") for k in ("width", "height"))
  if width <= 0 or height <= 0:
    raise RecordError("wrong_type", f"{what} has size {width}x{height}")
  return width, height


def _finish(rec: RegionRecord, num_regions: int) -> RegionRecord | Problem:
  if rec.boxes:
    return rec
  if not num_regions:
    return Problem(rec.where, "no_regions", f"image {rec.image_id} has no region")
  return Problem(rec.where, "no_regions", f"image {rec.image_id}: all {num_regions} region(s) "
                 f"dropped ({'; '.join(issue_message(k, v) for k, v in rec.issues.items())})")


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileError(f"{path}: no such file") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise FileError(f"{path}: malformed JSON: {e}") from None


def _load_list(path: str) -> list:
  data = _read_json(path)
  if not isinstance(data, list):
    raise FileError(f"{path}: expected a JSON list at the top level, got {type(data).__name__}")
  return data


def load_split_ids(path: str, split: str) -> set[int]:
  """Image ids of `split` in a DenseCap-style splits json; raises FileError."""
  data = _read_json(path)
  if not isinstance(data, dict) or not isinstance(data.get(split), list):
    keys = sorted(data) if isinstance(data, dict) else []
    raise FileError(f"{path}: no list of image ids under {split!r} (keys: {keys})")
  return {i for i in data[split] if isinstance(i, int)}


def read_vg(regions_path: str, image_data_path: str, split: str,
            image_ids: set[int] | None = None) -> Iterator[RegionRecord | Problem]:
  """Records of `region_descriptions.json` in file order (only `image_ids` when given); `split`
  names them. Problems of image_data.json entries are reported as they are met."""
  regions = _load_list(regions_path)
  images, reported = {}, set()  # reported: ids of image entries already reported as problems
  for i, img in enumerate(_load_list(image_data_path)):
    where = f"{image_data_path}[{i}]"
    try:
      img = entry(img, "the image entry")
      image_id = require(img, "image_id" if "image_id" in img else "id", int, "")
      if image_ids is not None and image_id not in image_ids:
        continue
      reported.add(image_id)
      size = _size(img, f"image {image_id}")
      url = require(img, "url", str, "") if img.get("url") is not None else None
      if image_id in images:
        raise RecordError("duplicate_image", f"image {image_id} is listed twice")
    except RecordError as e:
      yield Problem(where, e.kind, str(e))
      continue
    reported.discard(image_id)
    images[image_id] = (size, url)
  seen = set()
  for i, item in enumerate(regions):
    where = f"{regions_path}[{i}]"
    try:
      item = entry(item, "the image entry")
      image_id = require(item, "id" if "id" in item else "image_id", int, "")
      if image_ids is not None and image_id not in image_ids:
        continue
      where = f"{regions_path}[{i}] (image {image_id})"
      region_list = require(item, "regions", list, "")
      if image_id in reported and image_id not in images:
        continue  # its image entry is unusable and was reported already
      if image_id not in images:
        raise RecordError("unknown_image", f"image {image_id} is not in {image_data_path}")
      if image_id in seen:
        raise RecordError("duplicate_image", f"image {image_id} is listed twice")
    except RecordError as e:
      yield Problem(where, e.kind, str(e))
      continue
    seen.add(image_id)
    (width, height), url = images[image_id]
    rec = RegionRecord(where, image_id, vg_names(image_id, url=url), width, height, [], [], [],
                       split)
    for j, region in enumerate(region_list):
      _add_region(rec, region, f"regions[{j}]", grit=False)
    yield _finish(rec, len(region_list))


def read_grit(path: str, split: str, image_ids: set[int] | None = None
              ) -> Iterator[RegionRecord | Problem]:
  """Records of a GRiT-style COCO json, in the order of its "images"; `split` names them."""
  data = load_json(path, ("images", "annotations"))
  records: dict[int, RegionRecord] = {}
  for i, img in enumerate(data["images"]):
    where = f"{path}:images[{i}]"
    try:
      img = entry(img, "the image entry")
      image_id = require(img, "id", int, "")
      if image_ids is not None and image_id not in image_ids:
        continue
      where = f"{path}:images[{i}] (image {image_id})"
      file_name = require(img, "file_name", str, "")
      width, height = _size(img, f"image {image_id}")
      if image_id in records:
        raise RecordError("duplicate_image", f"image {image_id} is listed twice")
    except RecordError as e:
      yield Problem(where, e.kind, str(e))
      continue
    records[image_id] = RegionRecord(where, image_id, vg_names(image_id, file_name), width,
                                     height, [], [], [], split)
  counts = defaultdict(int)
  for i, ann in enumerate(data["annotations"]):
    where = f"{path}:annotations[{i}]"
    try:
      ann = entry(ann, "the annotation")
      image_id = require(ann, "image_id", int, "")
      if image_ids is not None and image_id not in image_ids:
        continue
      if image_id not in records:
        raise RecordError("unknown_image", f"image_id {image_id} is not in {path}'s images")
    except RecordError as e:
      yield Problem(where, e.kind, str(e))
      continue
    counts[image_id] += 1
    _add_region(records[image_id], ann, f"annotations[{i}]", grit=True)
  for image_id, rec in records.items():
    yield _finish(rec, counts[image_id])
