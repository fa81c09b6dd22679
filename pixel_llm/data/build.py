r"""Dataset builders: raw annotations -> sharded TFRecords of the data contract.

  python -m pixel_llm.data.build ln --annotations 'LN/coco_train_localized_narratives-*.jsonl' \
      --images COCO/train2017 --out OUT [--split train] [--num_shards 64] [--strict]

writes OUT/ln_{split}.tfrecord-{i:05d}-of-{n:05d}: one tf.train.Example per narrative (features
in `ln_example`), records dealt round-robin over the shards. Images are looked up as
IMAGES/{image_id:012d}.jpg (COCO) or IMAGES/{image_id}.jpg.

Bad input never passes silently. Each problem is logged as `FILE:LINE: KIND: message` and counted;
a summary (counts per kind, records written) is printed at the end. Kinds that skip the record:
`ln.RECORD_ERRORS` plus missing_image and bad_image (the file does not decode). Kinds that keep it:
`ln.RECORD_ISSUES` (no_traces records stay usable for captioning). With --strict the first problem
of any kind stops the build with exit status 1; shards are only renamed into place on success.

  python -m pixel_llm.data.build refcoco --refs 'refcoco/refs(unc).p' \
      --instances refcoco/instances.json --images COCO/train2014 --out OUT/refcoco --split val
  python -m pixel_llm.data.build refcoco --mdetr mdetr/finetune_refcoco_val.json \
      --images COCO/train2014 --out OUT/refcoco --split val
  python -m pixel_llm.data.build coco_captions --captions annotations/captions_val2017.json \
      --images COCO/val2017 --out OUT/coco --split val
  python -m pixel_llm.data.build coco_captions --karpathy dataset_coco.json \
      --images COCO/train2017 COCO/val2017 --out OUT/karpathy --split test

write OUT/{refcoco,coco_captions}_{split}.tfrecord-*: one example per image with all its referred
objects and their expressions (`refcoco_example`; images in the order the refs file first names
them), or per image with all its captions (`coco_captions_example`). One example per image
rather than per expression stores the image once for its ~7 expressions (RefCOCO: 142,209 for
19,994 images) and lets training put several of them, with their boxes, beside one image
encoding (the release's up to 16 refexps per image); evaluation unrolls them.
--images takes several directories; an image is looked up by the annotation's file name (also
under Karpathy's filepath) and then as COCO 2017's {image_id:012d}.jpg, in each directory in turn.
RefCOCO splits: train, val, testA, testB (UNC), test (UMD); Karpathy: train (with restval, the
usual 113k-image train set), val, test, restval. Whole-file problems (missing or malformed JSON,
an unsafe or unreadable pickle, an unknown --split) stop the build with exit status 1, --strict
or not; record problems are those of `refcoco.py` / `coco_captions.py`, plus missing_image,
bad_image and (RefCOCO) size_mismatch: the image's size differs from the annotation file's.

Visual Genome (`vg`) and image-text pairs (`webli`): see `build_regions.py`.

Adding a dataset: write `_add_<name>_args(parser)` and `_build_<name>(args, problems, writer,
progress)` and list them in `SUBCOMMANDS`; the output, strictness and reporting code is shared.
"""
import argparse
import dataclasses
import glob
import io
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator

from PIL import Image

from pixel_llm.data import build_regions
from pixel_llm.data import coco_captions
from pixel_llm.data import ln
from pixel_llm.data import refcoco

_LOG = logging.getLogger("pixel_llm.data.build")


class BuildError(RuntimeError):
  """Stops a build: the first problem of a --strict build, or unusable arguments."""


@dataclasses.dataclass
class Problems:
  """Counts problems per kind: `records` (records affected) and `items` (e.g. points dropped)."""
  strict: bool = False
  records: Counter = dataclasses.field(default_factory=Counter)
  items: Counter = dataclasses.field(default_factory=Counter)

  def report(self, kind: str, where: str, message: str, *, kept: bool, count: int = 1):
    if self.strict:
      raise BuildError(f"{where}: {kind}: {message}")
    _LOG.warning("%s: %s: %s (record %s)", where, kind, message, "kept" if kept else "skipped")
    self.records[kind] += 1
    self.items[kind] += count


class ShardedWriter:
  """Round-robin TFRecord writer; files get their final names only when `close(ok=True)`.

  TensorFlow is imported at the first write, so a build that stops early stays cheap.
  """

  def __init__(self, out_dir: str, prefix: str, num_shards: int):
    if num_shards < 1:
      raise ValueError(f"--num_shards must be >= 1, got {num_shards}")
    self.out_dir = out_dir
    self.paths = [os.path.join(out_dir, f"{prefix}.tfrecord-{i:05d}-of-{num_shards:05d}")
                  for i in range(num_shards)]
    self._writers = None
    self.written = 0

  def _open(self):
    import tensorflow as tf
    os.makedirs(self.out_dir, exist_ok=True)
    self._writers = [tf.io.TFRecordWriter(p + ".tmp") for p in self.paths]

  def write(self, example) -> None:
    if self._writers is None:
      self._open()
    self._writers[self.written % len(self._writers)].write(example.SerializeToString())
    self.written += 1

  def close(self, ok: bool) -> None:
    if self._writers is None:
      if not ok:
        return
      self._open()  # empty shards, so readers still find all of them
    for w, path in zip(self._writers, self.paths):
      w.close()
      if ok:
        os.replace(path + ".tmp", path)
      else:
        os.remove(path + ".tmp")


class Progress:
  """Logs records/s every `every_s` seconds."""

  def __init__(self, every_s: float = 10.0):
    self.every_s, self.start, self.last, self.read = every_s, time.time(), time.time(), 0

  def tick(self, written: int) -> None:
    self.read += 1
    now = time.time()
    if now - self.last >= self.every_s:
      self.last = now
      rate = self.read / max(now - self.start, 1e-9)
      _LOG.info("%d records read, %d written, %.1f records/s", self.read, written, rate)


# -- images ---------------------------------------------------------------------------------------

def find_image(images_dir: str, image_id: str) -> str | None:
  """IMAGES/{id:012d}.jpg (COCO file names) or IMAGES/{id}.jpg (Open Images hex ids, Flickr30k,
  ADE20k "ADE_train_00000001"); None when neither exists."""
  names = [f"{int(image_id):012d}.jpg"] if image_id.isdigit() else []
  for name in names + [f"{image_id}.jpg"]:
    path = os.path.join(images_dir, name)
    if os.path.isfile(path):
      return path
  return None


def check_image(path: str) -> tuple[int, int]:
  """(width, height) of an image that fully decodes; raises OSError/ValueError otherwise."""
  with Image.open(path) as img:
    size = img.size
    # Decoding at 1/8 scale (JPEG DCT scaling) still reads every entropy-coded block, so
    # truncated or corrupt files fail here, at a fraction of the cost of a full decode.
    img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
    img.load()
  return size


# -- Localized Narratives -------------------------------------------------------------------------

def ln_example(rec: ln.LNRecord, image_bytes: bytes, width: int, height: int):
  """tf.train.Example with the contract's LN features."""
  import tensorflow as tf
  f = tf.train.Feature

  def b(v):
    return f(bytes_list=tf.train.BytesList(value=[v]))

  def i(v):
    return f(int64_list=tf.train.Int64List(value=list(v)))

  def fl(v):
    return f(float_list=tf.train.FloatList(value=[x for row in v for x in row]))

  return tf.train.Example(features=tf.train.Features(feature={
      "image/encoded": b(image_bytes), "image/id": b(rec.image_id.encode()),
      "image/width": i([width]), "image/height": i([height]),
      "caption": b(rec.caption.encode("utf-8")),
      "utterance/start": i(rec.starts), "utterance/end": i(rec.ends),
      "utterance/box": fl(rec.boxes), "utterance/point": fl(rec.points),
      "utterance/has_trace": i(rec.has_trace),
  }))


_ISSUE_TEXT = {
    "no_traces": "no utterance has trace points; usable for captioning only",
    "nan_points": "{n} trace point(s) with NaN/infinite x, y or t dropped",
    "empty_utterance": "{n} empty utterance(s) skipped",
    "unlocated_utterance": "{n} utterance(s) not found in the caption, skipped",
    "bad_utterance_time": "{n} utterance(s) with a non-finite or reversed time window (no trace)",
}


def _add_ln_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--annotations", required=True, help="glob of LN .jsonl files")
  p.add_argument("--images", required=True, help="directory with the images (COCO file names)")


def _build_ln(args, problems: Problems, writer: ShardedWriter, progress: Progress) -> None:
  files = sorted(glob.glob(args.annotations))
  if not files:
    raise BuildError(f"--annotations {args.annotations!r} matches no file")
  if not os.path.isdir(args.images):
    raise BuildError(f"--images {args.images!r} is not a directory")
  images: dict[str, tuple[str, int, int] | tuple[str, str]] = {}  # id -> checked once
  for path in files:
    _LOG.info("reading %s", path)
    for number, line in ln.read_jsonl(path):
      progress.tick(writer.written)
      where = f"{path}:{number}"
      try:
        rec = ln.narrative_to_record(ln.parse_line(line))
      except ln.RecordError as e:
        problems.report(e.kind, where, str(e), kept=False)
        continue
      if rec.image_id not in images:
        image_path = find_image(args.images, rec.image_id)
        if image_path is None:
          images[rec.image_id] = ("missing_image", f"no image {rec.image_id!r} in {args.images} "
                                                   f"(tried {{id:012d}}.jpg and {{id}}.jpg)")
        else:
          try:
            images[rec.image_id] = (image_path, *check_image(image_path))
          except (OSError, ValueError, SyntaxError) as e:
            images[rec.image_id] = ("bad_image", f"{image_path} does not decode: {e}")
      entry = images[rec.image_id]
      if len(entry) == 2:
        problems.report(entry[0], where, entry[1], kept=False)
        continue
      for kind in ln.RECORD_ISSUES:
        if rec.issues[kind]:
          n = rec.issues[kind]
          problems.report(kind, where, _ISSUE_TEXT[kind].format(n=n), kept=True, count=n)
      with open(entry[0], "rb") as f:
        writer.write(ln_example(rec, f.read(), entry[1], entry[2]))


# -- shared by RefCOCO and COCO captions ---------------------------------------------------------

_KEPT_TEXT = {"empty_sentence": "{n} empty sentence(s) dropped",
              "empty_mask": "the mask has no pixel; the box is still usable"}


def _checked_image(cache: dict, dirs: list[str], image_id: int, names: tuple[str, ...]):
  """(path, width, height) of the image, or (problem kind, message); checked once per image id."""
  if image_id not in cache:
    path = coco_captions.find_file(dirs, names)
    if path is None:
      cache[image_id] = ("missing_image", f"no image {image_id} in {', '.join(dirs)} "
                                          f"(tried {', '.join(names)})")
    else:
      try:
        cache[image_id] = (path, *check_image(path))
      except (OSError, ValueError, SyntaxError) as e:
        cache[image_id] = ("bad_image", f"{path} does not decode: {e}")
  return cache[image_id]


def _check_dirs(dirs: list[str]) -> None:
  for d in dirs:
    if not os.path.isdir(d):
      raise BuildError(f"--images {d!r} is not a directory")


def _feature(kind: str, values):
  import tensorflow as tf
  f = tf.train.Feature
  if kind == "bytes":
    return f(bytes_list=tf.train.BytesList(value=list(values)))
  if kind == "int":
    return f(int64_list=tf.train.Int64List(value=list(values)))
  return f(float_list=tf.train.FloatList(value=list(values)))


def _image_features(image_id: int, image_bytes: bytes, width: int, height: int) -> dict:
  return {"image/encoded": _feature("bytes", [image_bytes]),
          "image/id": _feature("bytes", [str(image_id).encode()]),
          "image/width": _feature("int", [width]), "image/height": _feature("int", [height])}


def _write_records(items, args, problems: Problems, writer: ShardedWriter, progress: Progress,
                   make_example, sizes_must_match: bool) -> None:
  """Reports the reader's Problems, finds and checks each record's image, writes the rest.

  items: reader Problems and records (RefImage, CaptionRecord) with `issue_sources()`.
  """
  cache = {}
  try:
    for item in items:
      progress.tick(writer.written)
      if isinstance(item, coco_captions.Problem):
        problems.report(item.kind, item.where, item.message, kept=item.kept)
        continue
      entry = _checked_image(cache, args.images, item.image_id, item.file_names)
      if len(entry) == 2:
        problems.report(entry[0], item.where, entry[1], kept=False)
        continue
      path, width, height = entry
      if sizes_must_match and (width, height) != (item.width, item.height):
        problems.report("size_mismatch", item.where, f"{path} is {width}x{height}, the "
                        f"annotations say {item.width}x{item.height}", kept=False)
        continue
      for where, issues in item.issue_sources():
        for kind, n in sorted(issues.items()):
          problems.report(kind, where, _KEPT_TEXT[kind].format(n=n), kept=True, count=n)
      with open(path, "rb") as f:
        writer.write(make_example(item, f.read(), width, height))
  except coco_captions.FileError as e:
    raise BuildError(str(e)) from None


# -- RefCOCO / RefCOCO+ / RefCOCOg ----------------------------------------------------------------

def _png(mask) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(mask).convert("1").save(buf, format="PNG")
  return buf.getvalue()


@dataclasses.dataclass
class RefImage:
  """The referred objects of one image, written as one record. objects: (record, mask PNG bytes)
  per object, the record's own mask dropped (PNG bytes keep a large split in memory)."""
  where: str
  image_id: int
  split: str
  file_names: tuple[str, ...]
  width: int
  height: int
  objects: list

  def issue_sources(self) -> list[tuple[str, Counter]]:
    """(where, kept issues) of each object's record, so reports name the ref they concern."""
    return [(rec.where, rec.issues) for rec, _ in self.objects]


def group_refs(items) -> Iterator:
  """Reader items (RefRecord | Problem) -> the Problems as they come, then one RefImage per image,
  in the order of each image's first record. A record whose image size differs from the one the
  image's first record gave is a size_mismatch Problem."""
  images: dict[int, RefImage] = {}
  for item in items:
    if isinstance(item, coco_captions.Problem):
      yield item
      continue
    group = images.setdefault(item.image_id, RefImage(
        item.where, item.image_id, item.split, item.file_names, item.width, item.height, []))
    if (item.width, item.height) != (group.width, group.height):
      yield coco_captions.Problem(item.where, "size_mismatch", f"image {item.image_id} is "
                                  f"{item.width}x{item.height} here, {group.width}x"
                                  f"{group.height} in {group.where}")
      continue
    png = b"" if item.mask is None else _png(item.mask)
    group.objects.append((dataclasses.replace(item, mask=None), png))
  yield from images.values()


def refcoco_example(group: RefImage, image_bytes: bytes, width: int, height: int):
  """tf.train.Example of one image's referred objects (`refcoco.feature_description`). mask: 1-bit
  PNG at image size (tf.io.decode_png gives uint8[H, W, 1] in {0, 255}); b"" when the source has
  none."""
  import tensorflow as tf
  recs = [rec for rec, _ in group.objects]
  feats = _image_features(group.image_id, image_bytes, width, height)
  feats.update({
      "ref/id": _feature("int", [r.ref_id for r in recs]),
      "ann/id": _feature("int", [r.ann_id for r in recs]),
      "category/id": _feature("int", [r.category_id for r in recs]),
      "split": _feature("bytes", [group.split.encode()]),
      "box": _feature("float", [v for r in recs for v in r.box]),
      "mask": _feature("bytes", [png for _, png in group.objects]),
      "expression/raw": _feature("bytes", [t.encode("utf-8") for r in recs for t in r.raw]),
      "expression/sent": _feature("bytes", [t.encode("utf-8") for r in recs for t in r.sents]),
      "expression/id": _feature("int", [i for r in recs for i in r.sent_ids]),
      "expression/object": _feature("int", [k for k, r in enumerate(recs) for _ in r.sent_ids])})
  return tf.train.Example(features=tf.train.Features(feature=feats))


def _add_refcoco_args(p: argparse.ArgumentParser) -> None:
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--refs", help="refs(unc).p / refs(umd).p / refs(google).p (with --instances)")
  src.add_argument("--mdetr", help="MDETR-style refexp json of one split (instead of --refs)")
  p.add_argument("--instances", help="COCO instances.json of the refs file")
  p.add_argument("--images", required=True, nargs="+", help="image directories (COCO train2014 "
                                                            "and/or train2017)")


def _build_refcoco(args, problems: Problems, writer: ShardedWriter, progress: Progress) -> None:
  try:
    refcoco.check_split(args.split)
  except ValueError as e:
    raise BuildError(f"--split: {e}") from None
  _check_dirs(args.images)
  seen = Counter()
  if args.mdetr:
    items = refcoco.read_mdetr(args.mdetr, args.split)
  elif not args.instances:
    raise BuildError("--refs needs --instances (the COCO instances.json of the refs)")
  else:
    items = refcoco.read_refcoco(args.refs, args.instances, args.split, seen)
  _write_records(group_refs(items), args, problems, writer, progress, refcoco_example,
                 sizes_must_match=True)
  if args.refs and not seen[args.split]:
    _LOG.warning("%s has no ref of split %r (refs per split: %s)", args.refs, args.split,
                 dict(seen) or "none")


# -- COCO captions --------------------------------------------------------------------------------

def coco_captions_example(rec: coco_captions.CaptionRecord, image_bytes: bytes, width: int,
                          height: int):
  """tf.train.Example of one image and all its captions (`coco_captions.feature_description`)."""
  import tensorflow as tf
  feats = _image_features(rec.image_id, image_bytes, width, height)
  feats.update({"captions": _feature("bytes", [c.encode("utf-8") for c in rec.captions]),
                "caption/id": _feature("int", rec.caption_ids),
                "split": _feature("bytes", [rec.split.encode()])})
  return tf.train.Example(features=tf.train.Features(feature=feats))


def _add_coco_captions_args(p: argparse.ArgumentParser) -> None:
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--captions", help="captions_{train,val}2017.json (--split names the output)")
  src.add_argument("--karpathy", help="Karpathy's dataset_coco.json (--split picks the images)")
  p.add_argument("--images", required=True, nargs="+", help="image directories")


def _build_coco_captions(args, problems: Problems, writer: ShardedWriter,
                         progress: Progress) -> None:
  _check_dirs(args.images)
  if args.karpathy:
    if args.split not in coco_captions.KARPATHY_SPLITS:
      raise BuildError(f"--split: unknown Karpathy split {args.split!r}; valid splits: "
                       f"{', '.join(coco_captions.KARPATHY_SPLITS)} (train includes restval)")
    splits = ("train", "restval") if args.split == "train" else (args.split,)
    items = coco_captions.read_karpathy(args.karpathy, splits)
  else:
    items = coco_captions.read_coco_captions(args.captions, args.split)
  _write_records(items, args, problems, writer, progress, coco_captions_example,
                 sizes_must_match=False)


# name -> (help, add_args, build); the build gets the parsed args, a Problems, a ShardedWriter
# named "{name}_{split}" and a Progress.
SUBCOMMANDS = {
    "ln": ("Localized Narratives JSON lines + COCO images", _add_ln_args, _build_ln),
    "refcoco": ("RefCOCO/RefCOCO+/RefCOCOg refs(*).p + instances.json, or MDETR json",
                _add_refcoco_args, _build_refcoco),
    "coco_captions": ("COCO captions_*.json or Karpathy dataset_coco.json",
                      _add_coco_captions_args, _build_coco_captions),
    **build_regions.SUBCOMMANDS,
}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m pixel_llm.data.build", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="dataset", required=True)
  for name, (help_text, add_args, _) in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=help_text)
    add_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", default="train", help="split name used in the file names")
    p.add_argument("--num_shards", type=int, default=1, help="number of output files")
    p.add_argument("--strict", action="store_true", help="stop at the first problem (exit 1)")
    p.add_argument("--log_every_s", type=float, default=10.0, help="progress log interval")
  return parser.parse_args(argv)


def _summary(args, problems: Problems, written: int, seconds: float) -> str:
  lines = [f"{args.dataset} build summary (split {args.split}): {written} records written "
           f"to {args.num_shards} shard(s) in {args.out} in {seconds:.1f} s"]
  for kind in sorted(problems.records):
    n, items = problems.records[kind], problems.items[kind]
    detail = f" ({items} items)" if items != n else ""
    lines.append(f"  {kind}: {n} record(s){detail}")
  if not problems.records:
    lines.append("  no problems")
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  # Own stderr handler for this run (and no propagation), so messages show whatever logging setup
  # the process has (absl installs a root handler when TensorFlow is imported).
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(levelname)s build: %(message)s"))
  _LOG.addHandler(handler)
  _LOG.setLevel(logging.INFO)
  _LOG.propagate = False
  try:
    return _run(args)
  finally:
    _LOG.removeHandler(handler)


def _run(args) -> int:
  _, _, build = SUBCOMMANDS[args.dataset]
  problems = Problems(strict=args.strict)
  start = time.time()
  prefix = f"{args.dataset}_{args.split}"
  writer = ShardedWriter(args.out, prefix, args.num_shards)
  # Shards of an earlier build with another --num_shards would match the readers' pattern too.
  stale = sorted(p for p in glob.glob(os.path.join(args.out, f"{prefix}.tfrecord-*"))
                 if p not in writer.paths and not p.endswith(".tmp"))
  if stale:
    _LOG.error("%s already holds other %s shards (%s ...); remove them or use another --out",
               args.out, prefix, stale[0])
    return 1
  try:
    build(args, problems, writer, Progress(args.log_every_s))
  except BuildError as e:
    writer.close(ok=False)
    _LOG.error("build stopped: %s", e)
    return 1
  except BaseException:
    writer.close(ok=False)
    raise
  writer.close(ok=writer.written > 0)
  print(_summary(args, problems, writer.written, time.time() - start))
  if not writer.written:
    _LOG.error("no records written; no output files")
    return 1
  return 0


if __name__ == "__main__":
  # Run the importable module, whose BuildError/Problems the build_regions subcommands share.
  from pixel_llm.data import build
  sys.exit(build.main())
