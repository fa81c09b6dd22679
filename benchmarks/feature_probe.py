r"""Can an object's colour, shape and size be read from a checkpoint's features at its place?

  python benchmarks/feature_probe.py --checkpoint=/tmp/refK4r4n32k \
      --out=benchmarks/results/feature_probe_refK4r4n32k.json

For the synthetic world only (the scenes are regenerated from their ids, as
`referring_binding.py`). Each object is read at the feature-grid cell holding its centre, from
  towers     the fused image features (`encode_image`: SAM + EVA02, [h, w, C]);
  extractor  the prompt feature extractor's image tokens after its two-way transformer, with the
             whole-image box prompt that referring uses ([h, w, D]; not for a text-conditioned
             extractor, whose image tokens depend on the expression).
A ridge classifier (one-vs-rest least squares on standardised features, closed form) is fitted
on the objects of `--train_images` train images and scored on those of `--val_images` held-out
images; the majority class is the baseline. Near-perfect accuracy says the words' meaning is
there at the object's place, so a referring box that ignores colour words (see
`referring_binding.py`) fails in matching words to places, not in seeing.
"""
import argparse
import io
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prediction_files  # pylint: disable=g-import-not-at-top

from pixel_llm.data import synthetic  # pylint: disable=g-import-not-at-top

ATTRIBUTES = ("color", "shape", "size")


def scenes(seed: int, split: str, ids, size: int):
  """(images float32[N, S, S, 3] in [0, 1], objects per image)."""
  from PIL import Image
  images, objects = [], []
  for i in ids:
    ex = synthetic.make_example(seed, int(i), split, image_size=size)
    image = np.asarray(Image.open(io.BytesIO(ex.jpeg)).convert("RGB"), np.float32) / 255.0
    if image.shape[:2] != (size, size):
      raise SystemExit(f"world image {i} is {image.shape[:2]}, the model takes {size} px")
    images.append(image)
    objects.append(ex.objects)
  return np.stack(images), objects


def _features(model, images: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
  """{level: float32[N, h, w, F]} (module docstring)."""
  import jax
  import jax.numpy as jnp
  net, params = model.network, model.params

  @jax.jit
  def run(x):
    feats = net.apply({"params": params}, x, method=net.encode_image)
    if net.prompt_extractor.text_conditioned:  # its image tokens depend on an expression
      return feats, None
    _, aux = net.apply({"params": params}, feats, num_prompts=1, return_aux=True,
                       method=net.encode_prompts)  # the whole-image box, as referring
    return feats, aux["image_tokens"][:, 0]

  out = {"towers": [], "extractor": []}
  for i in range(0, len(images), batch):
    feats, tokens = run(jnp.asarray(images[i:i + batch]))
    out["towers"].append(np.asarray(feats, np.float32))
    if tokens is not None:
      out["extractor"].append(np.asarray(tokens, np.float32))
  return {k: np.concatenate(v) for k, v in out.items() if v}


def _at_objects(maps: np.ndarray, objects) -> np.ndarray:
  """The feature at each object's centre cell: float32[sum of objects, F]."""
  _, h, w, _ = maps.shape
  rows = []
  for n, objs in enumerate(objects):
    for o in objs:
      cx, cy = o.center
      rows.append(maps[n, min(int(cy * h), h - 1), min(int(cx * w), w - 1)])
  return np.stack(rows)


def ridge_accuracy(x_train, y_train, x_val, y_val, ridge: float = 1.0) -> float:
  """Accuracy of a one-vs-rest ridge classifier (features standardised on the train set)."""
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  a, b = (x_train - mean) / std, (x_val - mean) / std
  a, b = np.concatenate([a, np.ones((len(a), 1))], 1), np.concatenate([b, np.ones((len(b), 1))], 1)
  classes = sorted(set(y_train) | set(y_val))
  onehot = np.asarray([[c == y for c in classes] for y in y_train], np.float64)
  w = np.linalg.solve(a.T @ a + ridge * len(a) / 100 * np.eye(a.shape[1]), a.T @ onehot)
  pred = np.asarray(classes)[np.argmax(b @ w, 1)]
  return float(np.mean(pred == np.asarray(y_val)))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="a trainer workdir or checkpoint folder")
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--train_images", type=int, default=1000)
  p.add_argument("--val_images", type=int, default=256)
  p.add_argument("--seed", type=int, default=0, help="the world's config.data.seed")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  from pixel_llm import api
  model = api.load(args.checkpoint, args.step)
  size = int(model.image_size)
  data = {}
  for split, n in (("train", args.train_images), ("val", args.val_images)):
    start = synthetic.TRAIN_START_ID if split == "train" else synthetic.VAL_START_ID
    images, objects = scenes(args.seed, split, range(start, start + n), size)
    maps = _features(model, images)
    labels = {a: [getattr(o, a) for objs in objects for o in objs] for a in ATTRIBUTES}
    data[split] = ({k: _at_objects(v, objects) for k, v in maps.items()}, labels)
  (train_x, train_y), (val_x, val_y) = data["train"], data["val"]
  table = {}
  for a in ATTRIBUTES:
    values, counts = np.unique(val_y[a], return_counts=True)
    row = {"majority": round(float(counts.max() / counts.sum()), 3)}
    for level in train_x:
      row[level] = round(ridge_accuracy(train_x[level], train_y[a], val_x[level], val_y[a]), 3)
    table[a] = row
  n_train, n_val = len(train_y["color"]), len(val_y["color"])
  print(f"{n_train} train objects ({args.train_images} images), {n_val} held-out objects "
        f"({args.val_images} images); held-out accuracy")
  print(f"{'attribute':10s} {'majority':>9s} " + " ".join(f"{k:>10s}" for k in train_x))
  for a, row in table.items():
    print(f"{a:10s} {row['majority']:>9.3f} " + " ".join(f"{row[k]:>10.3f}" for k in train_x))
  if args.out:
    prediction_files.write(args.out, args.checkpoint, "attributes", table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
