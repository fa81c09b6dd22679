"""Web-scale image-text pairs (WebLI-style) for caption pre-training -> records of the COCO-captions
schema (`coco_captions.feature_description`), so one caption task reads COCO captions and these.

Inputs:
  JSON lines   one object per line: {"image": "relative/path.jpg", "caption": "..."}; instead of
               "caption", "text" (a string) or "captions" (a list of strings) are accepted, and an
               optional "id" (string or int) names the image (default: its path). Paths are
               relative to an image root; absolute paths and ".." are refused (bad_path).
  TFRecords    already-sharded tf.train.Examples with "image/encoded" (one JPEG/PNG) and the texts
               under "caption", "captions" or "texts" (bytes, UTF-8); "image/id" (bytes or int)
               is kept when present (default: FILE:INDEX). `read_tfrecords` validates them.
Caption ids are numbered 0, 1, ... over the captions kept, in reading order.

Problem kinds (`coco_captions.Problem`; the record is skipped unless kept):
  bad_json       a line that is not a JSON object
  missing_field  no "image", no caption key (or, TFRecords, no "image/encoded")
  wrong_type     a value of the wrong type (caption not a string, "image/encoded" not one bytes
                 value, texts not UTF-8, ...)
  bad_path       an absolute image path or one that leaves the root
  empty_caption  the only caption is empty; (kept) some captions of a list are empty and dropped
  no_captions    an empty list of captions, or one with only empty captions
  bad_record     (TFRecords) a record that is not a tf.train.Example
  corrupt_shard  (TFRecords) the shard is cut or fails its checksum; the rest of it is lost
The builder adds missing_image and bad_image (the file or the bytes do not decode).
"""
import dataclasses
import itertools
import os
from collections.abc import Iterator, Sequence

from pixel_llm.data import ln
from pixel_llm.data.coco_captions import CaptionRecord, FileError, Problem
from pixel_llm.data.ln import RecordError
from pixel_llm.data.ln import _require as require

TEXT_KEYS = ("caption", "captions", "texts")  # TFRecord features, first present wins


def feature_description() -> dict:
  """tf.io parsing spec of the builder's records (`build.py webli`): COCO captions' schema."""
  from pixel_llm.data import coco_captions
  return coco_captions.feature_description()


@dataclasses.dataclass
class EncodedRecord(CaptionRecord):
  """A caption record that carries its image (TFRecord input); `file_names` is empty. empty: the
  number of empty captions dropped."""
  image: bytes = b""
  empty: int = 0


def _texts(values, what: str) -> tuple[list[str], int]:
  """(non-empty stripped texts, number of empty ones); raises RecordError."""
  if not values:
    raise RecordError("no_captions", f"{what}: the list of captions is empty")
  texts = [t.strip() for t in values]
  kept = [t for t in texts if t]
  if not kept:
    kind = "empty_caption" if len(texts) == 1 else "no_captions"
    raise RecordError(kind, f"{what}: all {len(texts)} caption(s) are empty")
  return kept, len(texts) - len(kept)


def _json_captions(raw: dict) -> list[str]:
  if "caption" in raw:
    return [require(raw, "caption", str, "")]
  if "text" in raw:
    return [require(raw, "text", str, "")]
  if "captions" not in raw:
    raise RecordError("missing_field", "no 'caption', 'text' or 'captions' field")
  caps = require(raw, "captions", list, "")
  for j, c in enumerate(caps):
    if not isinstance(c, str):
      raise RecordError("wrong_type", f"captions[{j}] should be str, got {type(c).__name__}")
  return caps


def _relative(path: str) -> str:
  norm = os.path.normpath(path)
  if not path.strip() or os.path.isabs(path) or norm == ".." or norm.startswith(".." + os.sep):
    raise RecordError("bad_path", f"image path {path!r} is not relative to the image root")
  return norm


def read_jsonl(paths: Sequence[str], split: str) -> Iterator[CaptionRecord | Problem]:
  """Records of JSON-lines files in order; `split` names them. `file_names` holds the one path
  relative to the image root(s); image_id is the "id" or that path."""
  ids = itertools.count()  # caption ids, over all files
  for path in paths:
    if not os.path.isfile(path):
      raise FileError(f"{path}: no such file")
    try:
      for number, line in ln.read_jsonl(path):
        where = f"{path}:{number}"
        try:
          raw = ln.parse_line(line)
          image = _relative(require(raw, "image", str, ""))
          image_id = require(raw, "id", (str, int), "") if "id" in raw else image
          captions, empty = _texts(_json_captions(raw), f"line {number}")
        except RecordError as e:
          yield Problem(where, e.kind, str(e))
          continue
        if empty:
          yield Problem(where, "empty_caption", f"{empty} empty caption(s) dropped", kept=True)
        yield CaptionRecord(where, image_id, (image,), captions, [next(ids) for _ in captions],
                            split)
    except UnicodeDecodeError as e:
      raise FileError(f"{path}: not UTF-8 text: {e}") from None


def _one_bytes(feature, key: str) -> bytes:
  if feature.WhichOneof("kind") != "bytes_list" or len(feature.bytes_list.value) != 1:
    raise RecordError("wrong_type", f"{key!r} should hold one bytes value")
  return feature.bytes_list.value[0]


def parse_example(data: bytes, what: str, split: str, ids: Iterator[int]) -> EncodedRecord:
  """EncodedRecord of one serialised tf.train.Example; raises RecordError."""
  import tensorflow as tf
  try:
    ex = tf.train.Example.FromString(data)
  except Exception as e:  # protobuf's DecodeError
    raise RecordError("bad_record", f"not a tf.train.Example: {e}") from None
  feats = ex.features.feature
  if "image/encoded" not in feats:
    raise RecordError("missing_field", "no 'image/encoded' feature")
  image = _one_bytes(feats["image/encoded"], "image/encoded")
  key = next((k for k in TEXT_KEYS if k in feats), None)
  if key is None:
    raise RecordError("missing_field", f"no text feature (one of {', '.join(TEXT_KEYS)})")
  if feats[key].WhichOneof("kind") != "bytes_list":
    raise RecordError("wrong_type", f"{key!r} should be a bytes list, got "
                                    f"{feats[key].WhichOneof('kind')}")
  try:
    values = [v.decode("utf-8") for v in feats[key].bytes_list.value]
  except UnicodeDecodeError as e:
    raise RecordError("wrong_type", f"{key!r} is not UTF-8: {e}") from None
  image_id = what
  if "image/id" in feats:
    kind = feats["image/id"].WhichOneof("kind")
    if kind == "int64_list" and len(feats["image/id"].int64_list.value) == 1:
      image_id = str(feats["image/id"].int64_list.value[0])
    else:
      try:
        image_id = _one_bytes(feats["image/id"], "image/id").decode("utf-8")
      except UnicodeDecodeError:
        raise RecordError("wrong_type", "'image/id' is not UTF-8") from None
  captions, empty = _texts(values, what)
  return EncodedRecord(what, image_id, (), captions, [next(ids) for _ in captions], split, image,
                       empty)


def read_tfrecords(paths: Sequence[str], split: str) -> Iterator[EncodedRecord | Problem]:
  """Validated records of TFRecord shards in order (module docstring); `split` names them."""
  import tensorflow as tf
  ids = itertools.count()  # caption ids, over all files
  for path in paths:
    index = 0
    try:
      for data in tf.data.TFRecordDataset(path).as_numpy_iterator():
        where = f"{path}[{index}]"
        index += 1
        try:
          rec = parse_example(data, f"{os.path.basename(path)}:{index - 1}", split, ids)
        except RecordError as e:
          yield Problem(where, e.kind, str(e))
          continue
        rec.where = where
        if rec.empty:
          yield Problem(where, "empty_caption", f"{rec.empty} empty caption(s) dropped",
                        kept=True)
        yield rec
    except tf.errors.DataLossError as e:
      yield Problem(f"{path}[{index}]", "corrupt_shard",
                    f"cannot read on: {e.message.splitlines()[0]}")
