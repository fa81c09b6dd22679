r"""Builder subcommands `vg` (Visual Genome regions) and `webli` (image-text pairs) of `build.py`.

  python -m pixel_llm.data.build vg --regions VG/region_descriptions.json \
      --image_data VG/image_data.json --images VG [--split_file densecap_splits.json] \
      --out OUT/vg --split train
  python -m pixel_llm.data.build vg --grit GRiT/test.json --images VG --out OUT/vg --split test
  python -m pixel_llm.data.build webli --jsonl 'pairs/*.jsonl' --images ROOT --out OUT/webli
  python -m pixel_llm.data.build webli --tfrecords 'webli/*.tfrecord*' --out OUT/webli

vg writes one example per image with all its regions (`vg_example`, `visual_genome.
feature_description`); webli one per JSON line / input record, in COCO captions' schema
(`build.coco_captions_example`). An image is looked up under each --images directory as the url's
VG_100K*/NAME, VG_100K/NAME, VG_100K_2/NAME and NAME (NAME: {image_id}.jpg or GRiT's file_name),
or (webli) as the line's relative path. --split_file keeps the images of --split only.

Problems: those of `visual_genome.py` / `webli.py`, plus missing_image and bad_image (skipped) and
for vg size_mismatch (skipped: the image file's aspect ratio differs from the annotated size's)
and rescaled_image (kept: the file is the annotated image scaled uniformly, as DenseCap's 720-pixel
copies; normalised boxes stay right). Region issues are counted per region (the "items" of the
summary). Whole-file problems stop the build with exit status 1.

The functions import `build` when called: build.py imports this module to list the subcommands.
"""
import argparse
import glob
import io

from pixel_llm.data import coco_captions, visual_genome, webli


def vg_example(rec: visual_genome.RegionRecord, image_bytes: bytes, width: int, height: int):
  """tf.train.Example of one image and its regions (`visual_genome.feature_description`)."""
  import tensorflow as tf
  from pixel_llm.data import build
  f = build._feature
  feats = build._image_features(rec.image_id, image_bytes, width, height)
  feats.update({"region/box": f("float", [v for box in rec.boxes for v in box]),
                "region/phrase": f("bytes", [p.encode("utf-8") for p in rec.phrases]),
                "region/id": f("int", rec.region_ids),
                "split": f("bytes", [rec.split.encode()])})
  return tf.train.Example(features=tf.train.Features(feature=feats))


def rescaled(file_size: tuple[int, int], annotated: tuple[int, int]) -> bool:
  """Whether a `file_size` (w, h) image is the annotated one scaled uniformly (1 px rounding)."""
  scale = max(file_size) / max(annotated)
  return all(abs(f - a * scale) <= 1 for f, a in zip(file_size, annotated))


def _add_vg_args(p: argparse.ArgumentParser) -> None:
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--regions", help="VG region_descriptions.json (with --image_data)")
  src.add_argument("--grit", help="GRiT-style train.json / test.json (instead of --regions)")
  p.add_argument("--image_data", help="VG image_data.json of the region file")
  p.add_argument("--split_file", help="densecap_splits.json: keep the image ids under --split")
  p.add_argument("--images", required=True, nargs="+",
                 help="directories holding VG_100K/ and VG_100K_2/ (or the images)")


def _build_vg(args, problems, writer, progress) -> None:
  from pixel_llm.data import build
  build._check_dirs(args.images)
  try:
    ids = (visual_genome.load_split_ids(args.split_file, args.split) if args.split_file
           else None)
    if args.grit:
      items = visual_genome.read_grit(args.grit, args.split, ids)
    elif not args.image_data:
      raise build.BuildError("--regions needs --image_data (VG's image_data.json)")
    else:
      items = visual_genome.read_vg(args.regions, args.image_data, args.split, ids)
    cache = {}
    for item in items:
      progress.tick(writer.written)
      if isinstance(item, coco_captions.Problem):
        problems.report(item.kind, item.where, item.message, kept=item.kept)
        continue
      entry = build._checked_image(cache, args.images, item.image_id, item.file_names)
      if len(entry) == 2:
        problems.report(entry[0], item.where, entry[1], kept=False)
        continue
      path, width, height = entry
      if (width, height) != (item.width, item.height):
        if not rescaled((width, height), (item.width, item.height)):
          problems.report("size_mismatch", item.where, f"{path} is {width}x{height}, the "
                          f"annotations say {item.width}x{item.height}", kept=False)
          continue
        problems.report("rescaled_image", item.where, f"{path} is {width}x{height}, annotated "
                        f"at {item.width}x{item.height}", kept=True)
      for kind, regions in sorted(item.issues.items()):
        problems.report(kind, item.where, visual_genome.issue_message(kind, regions), kept=True,
                        count=len(regions))
      with open(path, "rb") as f:
        writer.write(vg_example(item, f.read(), width, height))
  except coco_captions.FileError as e:
    raise build.BuildError(str(e)) from None


def _add_webli_args(p: argparse.ArgumentParser) -> None:
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--jsonl", help="glob of JSON-lines files of image-text pairs (with --images)")
  src.add_argument("--tfrecords", help="glob of TFRecord shards with image/encoded + texts")
  p.add_argument("--images", nargs="+", help="image root(s) the JSON lines' paths are relative to")


def _build_webli(args, problems, writer, progress) -> None:
  from pixel_llm.data import build
  pattern = args.jsonl or args.tfrecords
  files = sorted(glob.glob(pattern))
  if not files:
    raise build.BuildError(f"--{'jsonl' if args.jsonl else 'tfrecords'} {pattern!r} matches no "
                           "file")
  if args.jsonl:
    if not args.images:
      raise build.BuildError("--jsonl needs --images (the root of the images' relative paths)")
    build._check_dirs(args.images)
    items = webli.read_jsonl(files, args.split)
  else:
    items = webli.read_tfrecords(files, args.split)
  try:
    for item in items:
      progress.tick(writer.written)
      if isinstance(item, coco_captions.Problem):
        problems.report(item.kind, item.where, item.message, kept=item.kept)
        continue
      if isinstance(item, webli.EncodedRecord):
        data = item.image
        try:
          width, height = build.check_image(io.BytesIO(data))
        except (OSError, ValueError, SyntaxError) as e:
          problems.report("bad_image", item.where, f"image/encoded does not decode: {e}",
                          kept=False)
          continue
      else:
        # No cache of checked images (unlike _write_records): web-scale sets hold each image
        # about once, and the cache would grow with all of them.
        entry = build._checked_image({}, args.images, item.image_id, item.file_names)
        if len(entry) == 2:
          problems.report(entry[0], item.where, entry[1], kept=False)
          continue
        with open(entry[0], "rb") as f:
          data = f.read()
        width, height = entry[1:]
      writer.write(build.coco_captions_example(item, data, width, height))
  except coco_captions.FileError as e:
    raise build.BuildError(str(e)) from None


# name -> (help, add_args, build), merged into build.SUBCOMMANDS.
SUBCOMMANDS = {
    "vg": ("Visual Genome region_descriptions.json + image_data.json, or GRiT train/test.json",
           _add_vg_args, _build_vg),
    "webli": ("image-text pairs: JSON lines + image root, or TFRecords with image/encoded",
              _add_webli_args, _build_webli),
}
