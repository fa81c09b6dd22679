r"""Runs a trained PixelLLM's tasks on a set of images; writes JSON lines and pictures.

  python -m pixel_llm.infer --checkpoint=workdirs/ln_toy --images='photos/*.jpg' --out=/tmp/pred
  python -m pixel_llm.infer ... --box=10,20,200,180     # caption that region (pixels of each image)
  python -m pixel_llm.infer ... --point=120,64          # caption around that point
  python -m pixel_llm.infer ... --query='the red ball'  # locate the expression (--task=locate)
  python -m pixel_llm.infer ... --method=beam [--beam_size=4] [--step=N] [--max_len=N]
  python -m pixel_llm.infer ... --task=locate --query='the red ball' --mask   # + its mask
  python -m pixel_llm.infer ... --task=describe --box=10,20,200,180  # the region prompt's caption
  python -m pixel_llm.infer ... --task=dense_caption [--max_boxes=20] [--min_score=0.0]

--task is caption (default; --box/--point optional), locate (--query, optional --mask: a
checkpoint of configs/refcoco_seg.py), describe (--box; `PixelLLM.describe`) or dense_caption (a
checkpoint of configs/vg_densecap.py). OUT/predictions.jsonl, one line per image:
  caption/describe {"image": path, "text": ..., "words": [{"word", "box": [x0, y0, x1, y1]}],
    "score": ...} (with --box/--point also "prompt")
  locate {"image", "query", "box"} (with --mask also "mask": the file name of OUT/<name>.mask.png,
    the mask at the image's size, 255 inside; and "mask_area" in pixels)
  dense_caption {"image", "regions": [{"box", "score", "text"}]} best first
locations in pixels of the original image; and OUT/<image name>.png: the picture of the result
(`pixel_llm/visualize.py`: each word's location in its colour; the mask over the image; the
numbered boxes with their captions).

An image that cannot be read, or a box/point outside it, is reported on stderr and skipped (no line,
no picture); the others are still written and the exit status is 1. Bad flags or a checkpoint that
does not fit its config: a message and exit status 2, nothing written.
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

TASKS = ("caption", "locate", "describe", "dense_caption")


def _numbers(text: str, n: int, flag: str) -> tuple[float, ...]:
  try:
    values = tuple(float(v) for v in text.split(","))
  except ValueError:
    values = ()
  if len(values) != n:
    raise argparse.ArgumentTypeError(f"--{flag} needs {n} comma-separated numbers, got {text!r}")
  return values


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m pixel_llm.infer", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True,
                 help="A trainer workdir, one of its checkpoints/<step>/ or a converted checkpoint.")
  p.add_argument("--step", type=int, default=None, help="Checkpoint step (default: the latest).")
  p.add_argument("--images", required=True, help="A glob of image files.")
  p.add_argument("--out", required=True, help="Output folder.")
  where = p.add_mutually_exclusive_group()
  where.add_argument("--box", type=lambda s: _numbers(s, 4, "box"), default=None,
                     help="x0,y0,x1,y1 in pixels: caption that region.")
  where.add_argument("--point", type=lambda s: _numbers(s, 2, "point"), default=None,
                     help="x,y in pixels: caption around that point.")
  where.add_argument("--query", default=None, help="Locate this expression instead of captioning.")
  p.add_argument("--task", choices=TASKS, default=None,
                 help="Default: locate with --query, else caption.")
  p.add_argument("--mask", action="store_true",
                 help="--task=locate: also segment (a checkpoint of configs/refcoco_seg.py).")
  p.add_argument("--generate_expression", action="store_true",
                 help="--task=locate: the decoder writes the expression from the prompt and the "
                      "box is read where it emits EOS (default: teacher-forced, as the paper).")
  p.add_argument("--max_boxes", type=int, default=20, help="--task=dense_caption: boxes at most.")
  p.add_argument("--min_score", type=float, default=0.0,
                 help="--task=dense_caption: the lowest proposal score kept.")
  p.add_argument("--method", choices=("greedy", "beam"), default="greedy")
  p.add_argument("--beam_size", type=int, default=4)
  p.add_argument("--max_len", type=int, default=None)
  p.add_argument("--batch_size", type=int, default=8)
  return p


def _png_name(path: str, used: set) -> str:
  stem = os.path.splitext(os.path.basename(path))[0] or "image"
  name, i = stem, 1
  while name in used:
    name, i = f"{stem}_{i}", i + 1
  used.add(name)
  return name + ".png"


def _picture_scale(image) -> int:
  """Integer upscaling to show a model-sized image at about 512 px."""
  return max(1, 512 // max(image.nh, image.nw))


def _usage_error(args) -> str | None:
  """What is wrong with the combination of flags (None: nothing); `args.task` is resolved."""
  task = args.task
  if task == "locate" and args.query is None:
    return "--task=locate needs --query"
  if args.query is not None and task != "locate":
    return f"--query is for --task=locate, not --task={task}"
  if task == "describe" and args.box is None:
    return "--task=describe needs --box=x0,y0,x1,y1"
  if task in ("locate", "describe", "dense_caption") and args.point is not None:
    return f"--point is for --task=caption, not --task={task}"
  if task == "dense_caption" and args.box is not None:
    return "--task=dense_caption takes no --box: it finds the boxes"
  if args.mask and task != "locate":
    return f"--mask is for --task=locate, not --task={task}"
  if args.generate_expression and (task != "locate" or args.mask):
    return "--generate_expression is for --task=locate without --mask"
  if args.max_boxes < 1:
    return f"--max_boxes must be at least 1, got {args.max_boxes}"
  if not np.isfinite(args.min_score):
    return f"--min_score must be a finite number, got {args.min_score}"
  return None


def run(args) -> int:
  from pixel_llm import api
  from pixel_llm import api_tasks
  from pixel_llm import visualize

  if args.task is None:
    args.task = "locate" if args.query is not None else "caption"
  problem = _usage_error(args)
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  paths = sorted(glob.glob(args.images))
  if not paths:
    print(f"error: no image matches --images={args.images!r}", file=sys.stderr)
    return 2
  if args.query is not None and not args.query.strip():
    print("error: --query is empty", file=sys.stderr)
    return 2
  try:
    model = api.load(args.checkpoint, args.step, batch_size=args.batch_size)
  except (OSError, ValueError) as e:
    print(f"error: cannot load --checkpoint={args.checkpoint}: {e}", file=sys.stderr)
    return 2
  try:
    query_ids = model._query_ids(args.query) if args.query is not None else None
    if args.mask:
      api_tasks.check_segmentation(model.network)
    if args.task == "dense_caption":
      api_tasks.check_dense(model.network)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  # Read and check every image first: a bad one is reported and gets nothing written.
  good, failed = [], 0
  for path in paths:
    try:
      image = api._Image(path, model.image_size, path)
      if args.box is not None:
        api._check_box(args.box, image)
      if args.point is not None:
        api._check_point(args.point, image)
      good.append(image)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      failed += 1

  os.makedirs(args.out, exist_ok=True)
  used = set()
  with open(os.path.join(args.out, "predictions.jsonl"), "w") as f:
    if args.task == "locate":
      prompt = api_tasks.locate_prompt(model.config, args.query, None)
      for image in good:
        png = os.path.join(args.out, _png_name(image.name, used))
        if args.mask:
          f.write(json.dumps(_locate_with_mask(model, image, query_ids, prompt, args, png)) + "\n")
          continue
        got = model._locate_image(image, query_ids, prompt, generate=args.generate_expression)
        box = got.get("box", got.get("point"))
        f.write(json.dumps({"image": image.name, "query": args.query, **got}) + "\n")
        xy = np.asarray(box, np.float32).reshape(-1, 2) / np.array([image.w, image.h])
        visualize.save_caption_png(png, image.content, [args.query], xy[None],
                                   scale=_picture_scale(image), title=image.name)
    elif args.task == "dense_caption":
      for image in good:
        regions = api_tasks.dense_caption(model, image, max_boxes=args.max_boxes,
                                          min_score=args.min_score, iou_threshold=0.9,
                                          max_len=args.max_len, prompt=None)
        f.write(json.dumps({"image": image.name, "regions": regions}) + "\n")
        visualize.save_dense_caption_png(os.path.join(args.out, _png_name(image.name, used)),
                                         api._read(image.name, image.name), regions,
                                         title=image.name)
    else:
      prompt = api_tasks.region_prompt(model.config, None) if args.task == "describe" else None
      results = model._caption(good, box=args.box, point=args.point, method=args.method,
                               beam_size=args.beam_size, max_len=args.max_len, prompt=prompt)
      for image, result in zip(good, results):
        points = result.pop("_points")
        record = {"image": image.name, **result}
        if args.box is not None or args.point is not None:
          record["prompt"] = ({"box": list(args.box)} if args.box is not None
                              else {"point": list(args.point)})
        f.write(json.dumps(record) + "\n")
        words = [w["word"] for w in result["words"]]
        visualize.save_caption_png(os.path.join(args.out, _png_name(image.name, used)),
                                   image.content, words, image.to_content(points),
                                   scale=_picture_scale(image), title=image.name)
  print(f"Wrote {len(good)} predictions to {os.path.join(args.out, 'predictions.jsonl')}"
        + (f"; {failed} image(s) failed" if failed else ""))
  return 1 if failed else 0


def _locate_with_mask(model, image, query_ids, prompt, args, png: str) -> dict:
  """Segments one image; writes the picture to `png` and the mask beside it (<name>.mask.png)."""
  from PIL import Image
  from pixel_llm import api
  from pixel_llm import api_tasks
  from pixel_llm import visualize
  result = api_tasks.locate_with_mask(model, image, query_ids, prompt)
  mask_png = png[:-len(".png")] + ".mask.png"
  Image.fromarray(result["mask"].astype(np.uint8) * 255).save(mask_png, format="PNG")
  visualize.save_mask_png(png, api._read(image.name, image.name), result["box"], result["mask"],
                          title=f"{image.name}: {args.query}")
  return {"image": image.name, "query": args.query, "box": result["box"],
          "mask": os.path.basename(mask_png), "mask_area": int(result["mask"].sum())}


def main(argv=None) -> int:
  try:
    args = _parser().parse_args(argv)
  except SystemExit as e:  # argparse already printed the message
    return int(e.code or 0)
  return run(args)


if __name__ == "__main__":
  sys.exit(main())
