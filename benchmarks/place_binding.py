r"""Which object the prompt feature extractor's place map points at, against the expression's words.

  python benchmarks/place_binding.py --checkpoint=/tmp/refPlace \
      --predictions=/tmp/refPlace/eval/refcoco_val.predictions.jsonl \
      [--out=benchmarks/results/place_binding_refPlace_val256.json]

For a checkpoint with the referred-place head (`model.prompt_extractor.place_logits`, trained
by `loss.place_weight`) and the synthetic world's held-out referring rows (the evaluator's
predictions file gives image_id, expression and gt_box): each scene is regenerated, the extractor
runs with the expression as its prompt text and the whole-image box (as referring does), and each
object is scored by the mean place logit over the grid cells whose centres lie in its box (the
cell of its centre when none do). The top object is where the place map points, tallied as
`referring_binding.py` tallies the predicted box (referred object / another sharing a word /
another sharing none, with chance), so the two read side by side: a place map that follows the
words while the box does not says the binding is learnt in the extractor and lost on the way to
the box.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import feature_probe  # pylint: disable=g-import-not-at-top
import prediction_files  # pylint: disable=g-import-not-at-top
import referring_binding  # pylint: disable=g-import-not-at-top


def object_scores(place: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """Mean logit of place float[h, w] over each box's cells (boxes float[N, 4] xyxy in [0, 1]) ->
  float[N]; a box holding no cell centre takes the cell of its centre."""
  h, w = place.shape
  ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
  out = []
  for x0, y0, x1, y1 in boxes:
    rows, cols = (ys >= y0) & (ys <= y1), (xs >= x0) & (xs <= x1)
    if rows.any() and cols.any():
      out.append(place[np.ix_(rows, cols)].mean())
    else:
      out.append(place[min(int((y0 + y1) / 2 * h), h - 1), min(int((x0 + x1) / 2 * w), w - 1)])
  return np.asarray(out)


def place_maps(model, images: np.ndarray, texts: np.ndarray, batch: int = 32) -> np.ndarray:
  """images float32[N, S, S, 3], texts int32[N, C] -> place logits float32[N, h, w]."""
  import jax
  import jax.numpy as jnp
  net, params = model.network, model.params

  @jax.jit
  def run(x, text):
    feats = net.apply({"params": params}, x, method=net.encode_image)
    _, aux = net.apply({"params": params}, feats, num_prompts=1, prompt_text=text[:, None],
                       return_aux=True, method=net.encode_prompts)
    return aux["place_logits"][:, 0]

  out = []
  for i in range(0, len(images), batch):
    out.append(np.asarray(run(jnp.asarray(images[i:i + batch]), jnp.asarray(texts[i:i + batch]))))
  return np.concatenate(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="a trainer workdir or checkpoint folder")
  p.add_argument("--predictions", required=True, help="W/eval/<name>.predictions.jsonl")
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--seed", type=int, default=0, help="the world's config.data.seed")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  from pixel_llm import api
  from pixel_llm import api_tasks
  model = api.load(args.checkpoint, args.step)
  if not model.network.prompt_extractor.place_logits:
    raise SystemExit("This checkpoint's prompt feature extractor has no place head "
                     "(model.prompt_extractor.place_logits).")
  rows = prediction_files.read(args.predictions, {"image_id", "expression", "gt_box"},
                               "the referring evaluator's")
  ids = sorted({int(r["image_id"]) for r in rows})
  images, objects = feature_probe.scenes(args.seed, "val", ids, int(model.image_size))
  index = {i: n for n, i in enumerate(ids)}
  texts = np.stack([model.prompt_tokens(api_tasks.locate_prompt(model.config, r["expression"],
                                                              None)) for r in rows])
  maps = place_maps(model, images[[index[int(r["image_id"])] for r in rows]], texts)
  pointed = []
  for row, place in zip(rows, maps):
    boxes = np.asarray([o.box for o in objects[index[int(row["image_id"])]]], np.float64)
    row = {k: v for k, v in row.items() if k != "iou"}  # the predicted box's, not the map's
    pointed.append(dict(row, box=boxes[int(np.argmax(object_scores(place, boxes)))].tolist()))
  table = referring_binding.binding_table(pointed, args.seed)
  print("Where the place map points (its top object):")
  referring_binding.print_table(table)
  if args.out:
    prediction_files.write(args.out, args.checkpoint, "groups", table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
