"""Localized Narratives (LN): JSON lines -> the per-narrative record of the data contract.

Each timed utterance is located in the caption by character offsets (a left-to-right search), and
gets the box (min/max) and point (mean) of the mouse-trace points recorded while it was spoken.
Token-level alignment later happens through these offsets (see `tasks.py`), not through the
release's proportional index mapping (reference: anchor_scenic_pixel_llm.md, section 4.3).

Pure Python and numpy (no TensorFlow), so the builder and the tests use it cheaply.

Shape letters: U utterances of a narrative, N trace points.

Problems a record can have. `RecordError.kind` (the record is unusable and skipped):
  bad_json       the line is not JSON (or not a JSON object)
  missing_field  a required field (image_id, caption, timed_caption, traces, or a key inside an
                 utterance / trace point) is absent
  wrong_type     a field has the wrong type (e.g. caption not a string, x not a number)
  empty_caption  the caption is empty or only whitespace
`LNRecord.issues` (the record is kept; counts):
  no_traces            no utterance holds a trace point (every has_trace is 0)
  nan_points           trace points dropped because x, y or t is NaN or infinite
  empty_utterance      utterances that are empty or whitespace (skipped)
  unlocated_utterance  utterances not found in the caption (skipped)
  bad_utterance_time   utterances whose start/end is not finite or end < start (has_trace = 0)
"""
import dataclasses
import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np

RECORD_ERRORS = ("bad_json", "missing_field", "wrong_type", "empty_caption")
RECORD_ISSUES = ("no_traces", "nan_points", "empty_utterance", "unlocated_utterance",
                 "bad_utterance_time")


class RecordError(ValueError):
  """A raw narrative that cannot be converted; `kind` is one of `RECORD_ERRORS`."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


@dataclasses.dataclass
class LNRecord:
  """One narrative in the contract's terms (utterances that could not be located are dropped).

  starts, ends: int[U] character offsets [start, end) inside `caption`, increasing and disjoint.
  boxes: float[U, 4] x0, y0, x1, y1 in [0, 1]; points: float[U, 2]; zeros where has_trace is 0.
  has_trace: int[U] 1 when the utterance's time window holds at least one trace point.
  """
  image_id: str
  caption: str
  starts: list[int]
  ends: list[int]
  boxes: list[list[float]]
  points: list[list[float]]
  has_trace: list[int]
  issues: Counter = dataclasses.field(default_factory=Counter)


# -- reading and validation ----------------------------------------------------------------------

def read_jsonl(path: str) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, line) for every non-blank line of a JSON-lines file."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        yield number, line


def parse_line(line: str) -> dict:
  """JSON object of one line; raises RecordError('bad_json')."""
  try:
    raw = json.loads(line)  # Python's json accepts NaN / Infinity, which LN dumps can contain.
  except json.JSONDecodeError as e:
    raise RecordError("bad_json", f"malformed JSON: {e}") from None
  if not isinstance(raw, dict):
    raise RecordError("bad_json", f"expected a JSON object, got {type(raw).__name__}")
  return raw


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _require(obj: dict, key: str, kinds, where: str):
  if key not in obj:
    raise RecordError("missing_field", f"missing field {where}{key!r}")
  value = obj[key]
  ok = _is_number(value) if kinds == "number" else isinstance(value, kinds)
  if not ok:
    want = kinds if kinds == "number" else "/".join(
        k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
    raise RecordError("wrong_type", f"field {where}{key!r} should be {want}, got "
                                    f"{type(value).__name__} ({str(value)[:40]!r})")
  return value


def validate(raw: dict) -> dict:
  """Checks the fields the conversion reads; returns them normalised (image_id as a string).

  Raises RecordError('missing_field' | 'wrong_type' | 'empty_caption').
  """
  image_id = _require(raw, "image_id", (str, int), "")
  if isinstance(image_id, bool) or not str(image_id).strip():
    raise RecordError("wrong_type", f"field 'image_id' should be a non-empty id, got {image_id!r}")
  caption = _require(raw, "caption", str, "")
  if not caption.strip():
    raise RecordError("empty_caption", "the caption is empty")
  timed = _require(raw, "timed_caption", list, "")
  for i, u in enumerate(timed):
    if not isinstance(u, dict):
      raise RecordError("wrong_type", f"timed_caption[{i}] should be an object, got "
                                      f"{type(u).__name__}")
    _require(u, "utterance", str, f"timed_caption[{i}].")
    _require(u, "start_time", "number", f"timed_caption[{i}].")
    _require(u, "end_time", "number", f"timed_caption[{i}].")
  traces = _require(raw, "traces", list, "")
  for i, segment in enumerate(traces):
    if not isinstance(segment, list):
      raise RecordError("wrong_type", f"traces[{i}] should be a list, got {type(segment).__name__}")
    for j, p in enumerate(segment):
      if not isinstance(p, dict):
        raise RecordError("wrong_type", f"traces[{i}][{j}] should be an object, got "
                                        f"{type(p).__name__}")
      for key in ("x", "y", "t"):
        _require(p, key, "number", f"traces[{i}][{j}].")
  return {"image_id": str(image_id).strip(), "caption": caption, "timed_caption": timed,
          "traces": traces}


# -- utterances -> character spans ----------------------------------------------------------------

def _word_pattern(words: Sequence[str]) -> str:
  body = r"\s+".join(re.escape(w) for w in words)
  # Word guards only where the utterance itself starts/ends with a word character, so that "a"
  # does not match inside "standing" while "grass." still matches before a space.
  head = r"(?<!\w)" if re.match(r"\w", words[0]) else ""
  tail = r"(?!\w)" if re.search(r"\w$", words[-1]) else ""
  return head + body + tail


def _find(caption: str, utterance: str, cursor: int) -> tuple[int, int] | None:
  words = utterance.split()
  # Exact, case-insensitive, and without the punctuation around each word (transcripts and
  # captions can disagree on case and punctuation).
  stripped = [s for s in (re.sub(r"^\W+|\W+$", "", w) for w in words) if s]
  attempts = [(words, 0), (words, re.IGNORECASE)]
  if stripped and stripped != words:
    attempts.append((stripped, re.IGNORECASE))
  # The earliest match wins: an exact match far ahead must not skip a near case-insensitive one
  # ("a" spoken for the caption's "A"); a skipped stretch would lose every utterance inside it.
  best = None
  for ws, flags in attempts:
    m = re.compile(_word_pattern(ws), flags).search(caption, cursor)
    if m and (best is None or m.start() < best[0]):
      best = (m.start(), m.end())
  return best


def locate_utterances(caption: str, utterances: Sequence[str]) -> list[tuple[int, int] | None]:
  """Character spans [start, end) of each utterance in `caption`, searched left to right.

  Each search starts where the previous located utterance ended, so spans are disjoint and
  increasing. None for an empty or not-found utterance.
  """
  spans, cursor = [], 0
  for utterance in utterances:
    span = _find(caption, utterance, cursor) if utterance.strip() else None
    if span is not None:
      cursor = span[1]
    spans.append(span)
  return spans


# -- traces -> boxes ------------------------------------------------------------------------------

def flatten_traces(traces: Sequence[Sequence[dict]]) -> tuple[np.ndarray, int]:
  """All segments' points as float64[N, 3] (x, y, t), without non-finite points; and how many
  points were dropped."""
  pts = np.asarray([(p["x"], p["y"], p["t"]) for seg in traces for p in seg],
                   np.float64).reshape(-1, 3)
  finite = np.isfinite(pts).all(axis=1)
  return pts[finite], int((~finite).sum())


def window_box(points: np.ndarray, start: float, end: float
               ) -> tuple[list[float], list[float]] | None:
  """(box [x0, y0, x1, y1], mean point [x, y]) of the points with start <= t <= end, clipped to
  [0, 1]; None when the window holds no point."""
  inside = points[(points[:, 2] >= start) & (points[:, 2] <= end), :2]
  if not len(inside):
    return None
  xy = np.clip(inside, 0.0, 1.0)  # Clip first, so the mean always lies inside the box.
  lo, hi = xy.min(0), xy.max(0)
  return [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])], xy.mean(0).tolist()


def narrative_to_record(raw: dict) -> LNRecord:
  """Converts a parsed LN JSON object; raises RecordError when it is unusable."""
  r = validate(raw)
  caption, issues = r["caption"], Counter()
  points, dropped = flatten_traces(r["traces"])
  if dropped:
    issues["nan_points"] += dropped
  texts = [u["utterance"] for u in r["timed_caption"]]
  spans = locate_utterances(caption, texts)
  rec = LNRecord(image_id=r["image_id"], caption=caption, starts=[], ends=[], boxes=[], points=[],
                 has_trace=[], issues=issues)
  for u, text, span in zip(r["timed_caption"], texts, spans):
    if not text.strip():
      issues["empty_utterance"] += 1
      continue
    if span is None:
      issues["unlocated_utterance"] += 1
      continue
    start, end = float(u["start_time"]), float(u["end_time"])
    found = None
    if not (math.isfinite(start) and math.isfinite(end)) or end < start:
      issues["bad_utterance_time"] += 1
    else:
      found = window_box(points, start, end)
    rec.starts.append(span[0])
    rec.ends.append(span[1])
    rec.boxes.append(found[0] if found else [0.0] * 4)
    rec.points.append(found[1] if found else [0.0] * 2)
    rec.has_trace.append(int(found is not None))
  if not any(rec.has_trace):
    issues["no_traces"] += 1
  return rec
