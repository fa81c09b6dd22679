"""COCO captions: `captions_{train,val}2017.json` and Karpathy's `dataset_coco.json` -> one record
per image with all its captions. Also the COCO-JSON basics the RefCOCO reader shares (`load_json`,
`FileError`, `Problem`, `find_file`).

Formats (users_formats_metrics.md, section 2.6):
  captions_*.json   {"images": [{"id", "file_name", "width", "height", ...}],
                     "annotations": [{"id", "image_id", "caption"}], ...}
  dataset_coco.json {"images": [{"filepath": "val2014", "filename": "COCO_val2014_...jpg",
                     "cocoid", "split": train | val | test | restval,
                     "sentences": [{"raw", "tokens", "sentid", ...}], ...}], "dataset": "coco"}

The readers yield `CaptionRecord`s and `Problem`s in file order; a whole file that cannot be used
(missing, not JSON, not the expected top-level layout) raises `FileError`. Captions are stripped of
surrounding whitespace (COCO's have trailing spaces and newlines). Problem kinds (the item named in
`Problem.where` is skipped):
  missing_field, wrong_type  an image entry, annotation or sentence lacks a key / has a wrong type
  empty_caption              a caption that is empty or only whitespace (the caption is skipped)
  unknown_image              an annotation whose image_id is not in "images"
  unknown_split              a Karpathy image whose split is not one of KARPATHY_SPLITS
  no_captions                an image left without any caption (skipped)
"""
import dataclasses
import json
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence

from pixel_llm.data.ln import RecordError
from pixel_llm.data.ln import _require as require

KARPATHY_SPLITS = ("train", "val", "test", "restval")


def feature_description() -> dict:
  """tf.io parsing spec of the builder's records (`build.py coco_captions`)."""
  import tensorflow as tf
  fixed, var = tf.io.FixedLenFeature, tf.io.VarLenFeature
  return {"image/encoded": fixed([], tf.string), "image/id": fixed([], tf.string),
          "image/width": fixed([], tf.int64), "image/height": fixed([], tf.int64),
          "captions": var(tf.string), "caption/id": var(tf.int64), "split": fixed([], tf.string)}


class FileError(ValueError):
  """A whole annotation file is unusable; the message names it."""


@dataclasses.dataclass(frozen=True)
class Problem:
  """A skipped (or, with kept=True, a kept but flawed) item of an annotation file."""
  where: str
  kind: str
  message: str
  kept: bool = False


@dataclasses.dataclass
class CaptionRecord:
  """One image and its captions. `file_names` are the image's candidate paths relative to an
  image directory, in the order they are tried."""
  where: str
  image_id: int
  file_names: tuple[str, ...]
  captions: list[str]
  caption_ids: list[int]
  split: str

  def issue_sources(self) -> list:
    """(where, kept issues) pairs for the build report: a caption record keeps none (its flawed
    captions are skipped as Problems by the reader)."""
    return []


def load_json(path: str, keys: Sequence[str] = ()) -> dict:
  """The JSON object in `path`, which must hold a list under each of `keys`; raises FileError."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise FileError(f"{path}: no such file") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise FileError(f"{path}: malformed JSON: {e}") from None
  if not isinstance(data, dict):
    raise FileError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
  for key in keys:
    if not isinstance(data.get(key), list):
      raise FileError(f"{path}: expected a list under {key!r}, got "
                      f"{type(data.get(key)).__name__ if key in data else 'nothing'}")
  return data


def find_file(dirs: Sequence[str], names: Sequence[str]) -> str | None:
  """The first DIR/NAME that exists, trying every name in each directory in turn."""
  for d in dirs:
    for name in names:
      path = os.path.join(d, name)
      if os.path.isfile(path):
        return path
  return None


def coco_names(image_id: int, file_name: str | None = None) -> tuple[str, ...]:
  """Candidate file names: the annotation's, then COCO 2017's `{id:012d}.jpg` (same ids as 2014)."""
  return tuple(dict.fromkeys(([file_name] if file_name else []) + [f"{image_id:012d}.jpg"]))


def entry(obj, what: str = "the entry") -> dict:
  """`obj` if it is a dict; raises RecordError('wrong_type')."""
  if not isinstance(obj, dict):
    raise RecordError("wrong_type", f"{what} should be an object, got {type(obj).__name__}")
  return obj


def _caption(text: str) -> str | None:
  text = text.strip()
  return text or None


def read_coco_captions(path: str, split: str) -> Iterator[CaptionRecord | Problem]:
  """Records of a `captions_*.json` file, in the order of its "images"; `split` names them."""
  data = load_json(path, ("images", "annotations"))
  by_image: dict[int, list[tuple[int, str]]] = defaultdict(list)
  images: list[tuple[str, int, str]] = []
  for i, raw in enumerate(data["images"]):
    where = f"{path}:images[{i}]"
    try:
      img = entry(raw)
      images.append((where, require(img, "id", int, ""), require(img, "file_name", str, "")))
    except RecordError as e:
      yield Problem(where, e.kind, str(e))
  known = {image_id for _, image_id, _ in images}
  for i, raw in enumerate(data["annotations"]):
    where = f"{path}:annotations[{i}]"
    try:
      ann = entry(raw)
      image_id = require(ann, "image_id", int, "")
      caption = require(ann, "caption", str, "")
      ann_id = require(ann, "id", int, "") if "id" in ann else -1
      if image_id not in known:
        raise RecordError("unknown_image", f"image_id {image_id} is not in {path}'s images")
      if _caption(caption) is None:
        raise RecordError("empty_caption", f"annotation {ann_id}: the caption is empty")
    except RecordError as e:
      yield Problem(where, e.kind, str(e))
      continue
    by_image[image_id].append((ann_id, _caption(caption)))
  for where, image_id, file_name in images:
    caps = by_image.get(image_id)
    if not caps:
      yield Problem(where, "no_captions", f"image {image_id} has no usable caption")
      continue
    yield CaptionRecord(where, image_id, coco_names(image_id, file_name), [c for _, c in caps],
                        [a for a, _ in caps], split)


def read_karpathy(path: str, splits: Sequence[str]) -> Iterator[CaptionRecord | Problem]:
  """Records of Karpathy's `dataset_coco.json` whose split is in `splits`."""
  bad = [s for s in splits if s not in KARPATHY_SPLITS]
  if bad:
    raise FileError(f"unknown Karpathy split(s) {bad}; valid: {', '.join(KARPATHY_SPLITS)}")
  data = load_json(path, ("images",))
  for i, raw in enumerate(data["images"]):
    where = f"{path}:images[{i}]"
    try:
      img = entry(raw)
      split = require(img, "split", str, "")
      if split not in KARPATHY_SPLITS:
        raise RecordError("unknown_split", f"split {split!r} is not one of "
                                           f"{', '.join(KARPATHY_SPLITS)}")
      if split not in splits:
        continue
      image_id = require(img, "cocoid", int, "")
      filename = require(img, "filename", str, "")
      filepath = require(img, "filepath", str, "") if "filepath" in img else ""
      sentences = require(img, "sentences", list, "")
      captions, ids = [], []
      for j, s in enumerate(sentences):
        s = entry(s, f"sentences[{j}]")
        raw_text = require(s, "raw", str, f"sentences[{j}].")
        sent_id = require(s, "sentid", int, f"sentences[{j}].")
        if _caption(raw_text) is None:
          yield Problem(f"{where}.sentences[{j}]", "empty_caption",
                        f"image {image_id}: sentence {sent_id} is empty")
          continue
        captions.append(_caption(raw_text))
        ids.append(sent_id)
      if not captions:
        raise RecordError("no_captions", f"image {image_id} has no usable caption")
    except RecordError as e:
      yield Problem(where, e.kind, str(e))
      continue
    names = ([f"{filepath}/{filename}"] if filepath else []) + list(coco_names(image_id, filename))
    yield CaptionRecord(where, image_id, tuple(dict.fromkeys(names)), captions, ids, split)
