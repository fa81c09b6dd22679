r"""A synthetic Localized-Narratives world: shape scenes, spoken-style captions and mouse traces.

  python -m pixel_llm.data.synthetic --out /tmp/synth --num_images 2000 --seed 0 --split both
      [--formats ln,refcoco,coco_captions,vg,webli]   (other formats than LN: see
      `synthetic_formats`, `synthetic_regions`)

Each image holds 1-4 shapes (circle, square, triangle, star, ring, diamond; seven colours; small or
large; later shapes may occlude earlier ones) over a noisy striped background. Its narrative has one
sentence per shape, large shapes first and then in reading order (or, with
`narration="shuffled"`, in a random order: see NARRATIONS), from a few templates (absolute
positions such as "in the top left corner" and relations to the previous shape such as "to the
right of it"), sometimes a sentence about the background. The caption is cut into timed utterances of 1-4 words spoken at 2-3 words/s, and a
simulated mouse dwells inside shape k's box while an utterance about shape k is spoken, moving
between shapes in the pauses. Records follow the published LN schema (see the data contract);
`make_example` also returns the ground truth the JSON does not hold: each utterance's object and
each object's box.

Layout written by `generate` (COCO style):
  DIR/images/{split}2017/{image_id:012d}.jpg
  DIR/annotations/coco_{split}_localized_narratives-00000-of-00001.jsonl
  DIR/spiece.model, DIR/spiece.vocab      (train split only: train captions + TASK_PROMPTS)

Everything is a function of (seed, image_id): image i does not depend on how many are generated.
Coordinates are normalised to [0, 1] of the image (x right, y down); boxes are x0, y0, x1, y1.
"""
import dataclasses
import functools
import io
import json
import os

import numpy as np
from PIL import Image

# Part of the data cache key: bump it whenever the same (seed, image_id) would give another example.
VERSION = 2
from PIL import ImageDraw

from pixel_llm.data import vocab as vocab_lib

SHAPES = ("circle", "square", "triangle", "star", "ring", "diamond")
COLORS = {"red": (215, 35, 35), "green": (40, 170, 50), "blue": (40, 80, 225),
          "yellow": (240, 215, 30), "purple": (140, 50, 175), "orange": (245, 130, 20),
          "white": (245, 245, 245)}
SIZES = {"small": (0.07, 0.10), "large": (0.14, 0.20)}  # Radius range, in image sides.
# 3 x 3 grid of the object centre -> phrase; rows top to bottom.
POSITIONS = (("in the top left corner", "at the top", "in the top right corner"),
             ("on the left", "in the middle", "on the right"),
             ("in the bottom left corner", "at the bottom", "in the bottom right corner"))
STRIPES = ("horizontal", "vertical", "diagonal")
TASK_PROMPTS = ("Describe the image in detail.", "Describe the region.", "Where is it?")
# Order in which a narrative visits the shapes. "salient": large first, then reading order, as
# annotators tend to; then the k-th object named is predictable from the layout alone, so a
# model can point at it without reading its colour or shape. "shuffled": a uniformly random
# order per image (drawing order unchanged), so pointing at "a small red circle" needs those
# words (benchmarks/grounding_probe.py measures which a checkpoint does).
NARRATIONS = ("salient", "shuffled")

NO_OBJECT = -1   # Utterance about no object ("In this image I can see").
BACKGROUND = -2  # Utterance about the background; the mouse sweeps the image.
TRAIN_START_ID = 1
VAL_START_ID = 1_000_001  # Val ids are train-style ids offset by 1e6, so the splits never share one.
TRACE_HZ = 20.0
VOCAB_SIZE = 256


@dataclasses.dataclass(frozen=True)
class SceneObject:
  shape: str
  color: str
  size: str
  center: tuple[float, float]
  radius: float
  box: tuple[float, float, float, float]  # Tight box of the drawn shape.

  @property
  def name(self) -> str:
    return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Example:
  """One image with its LN record and the ground truth behind it."""
  image_id: int
  split: str
  objects: tuple[SceneObject, ...]
  stripes: str
  record: dict                        # The LN JSON record.
  utterance_objects: tuple[int, ...]  # Per timed utterance: object index, NO_OBJECT or BACKGROUND.
  jpeg: bytes


def _polygon(shape: str, cx: float, cy: float, r: float) -> np.ndarray | None:
  """float[V, 2] vertices (None for round shapes)."""
  if shape == "square":
    s = 0.85 * r
    return np.array([[cx - s, cy - s], [cx + s, cy - s], [cx + s, cy + s], [cx - s, cy + s]])
  if shape == "triangle":
    return np.array([[cx, cy - r], [cx + r, cy + 0.8 * r], [cx - r, cy + 0.8 * r]])
  if shape == "diamond":
    return np.array([[cx, cy - r], [cx + 0.75 * r, cy], [cx, cy + r], [cx - 0.75 * r, cy]])
  if shape == "star":
    ang = np.deg2rad(-90 + 36 * np.arange(10))
    rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], -1)
  return None


def sample_scene(rng: np.random.Generator) -> tuple[tuple[SceneObject, ...], str]:
  """1-4 objects (in drawing and narration order) and the stripe orientation."""
  objects = []
  for _ in range(int(rng.integers(1, 5))):
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    size = "small" if rng.random() < 0.5 else "large"
    r = float(rng.uniform(*SIZES[size]))
    for _ in range(20):  # Partial occlusion is fine; a shape hidden behind another is not.
      c = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
      if all(np.hypot(*(c - o.center)) > 0.7 * (r + o.radius) for o in objects):
        break
    else:
      continue
    cx, cy = float(c[0]), float(c[1])
    poly = _polygon(shape, cx, cy, r)
    box = ((cx - r, cy - r, cx + r, cy + r) if poly is None else
           (*poly.min(0).tolist(), *poly.max(0).tolist()))
    objects.append(SceneObject(shape, color, size, (cx, cy), r, tuple(float(v) for v in box)))
  # Narration order: large shapes first, then reading order (3x3 cells), as annotators start with
  # the most salient shape; drawing in that order leaves small shapes on top of large ones.
  objects.sort(key=lambda o: (o.size != "large", min(int(o.center[1] * 3), 2),
                              min(int(o.center[0] * 3), 2), o.center[0]))
  return tuple(objects), STRIPES[rng.integers(len(STRIPES))]


@functools.lru_cache(maxsize=4)
def _stripe_coords(s: int) -> dict[str, np.ndarray]:
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
  return {"horizontal": yy, "vertical": xx, "diagonal": (xx + yy) / np.float32(np.sqrt(2))}


def coverage(o: SceneObject, s: int) -> np.ndarray:
  """uint8[s, s]: how much of each pixel the shape covers (0..255), from a 2x supersampled drawing,
  which gives anti-aliased edges."""
  ss = 2 * s
  mask = Image.new("L", (ss, ss), 0)
  draw = ImageDraw.Draw(mask)
  cx, cy, r = o.center[0] * ss, o.center[1] * ss, o.radius * ss
  if o.shape in ("circle", "ring"):
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    if o.shape == "ring":
      draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
  else:
    draw.polygon([tuple(p) for p in _polygon(o.shape, cx, cy, r).tolist()], fill=255)
  return np.asarray(mask.resize((s, s), Image.BOX))


def render(objects, stripes: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """uint8[S, S, 3]: smooth colour noise + stripes, shapes alpha-blended from 2x masks."""
  s = image_size
  base = (rng.uniform(40, 150, size=3) * rng.uniform(0.6, 1.0, size=3)).astype(np.float32)
  low = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8))
  noise = np.asarray(low.resize((s, s), Image.BICUBIC), np.float32) * np.float32(70 / 255)
  period = rng.uniform(6, 16) * s / 128
  phase = 2 * np.pi * _stripe_coords(s)[stripes] / np.float32(period) + rng.uniform(0, 2 * np.pi)
  wave = np.tanh(3 * np.sin(phase)) * np.float32(rng.uniform(10, 25))
  img = noise + (base - 35)
  img += wave[..., None]
  for o in objects:
    alpha = np.asarray(coverage(o, s), np.float32)[..., None] * np.float32(1 / 255)
    color = np.clip(np.array(COLORS[o.color]) + rng.normal(0, 10, size=3), 0, 255)
    img += alpha * (color.astype(np.float32) - img)
  img += (rng.random(img.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(12)  # Sensor noise.
  return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _position(o: SceneObject) -> str:
  col, row = (min(int(v * 3), 2) for v in o.center)
  return POSITIONS[row][col]


def _relation(o: SceneObject, ref: SceneObject) -> str | None:
  """Where `o` lies relative to `ref`, or None when no direction clearly dominates."""
  dx, dy = o.center[0] - ref.center[0], o.center[1] - ref.center[1]
  if max(abs(dx), abs(dy)) < 0.2 or min(abs(dx), abs(dy)) > 0.6 * max(abs(dx), abs(dy)):
    return None
  if abs(dx) > abs(dy):
    return "to the right of" if dx > 0 else "to the left of"
  return "below" if dy > 0 else "above"


def _cap(text: str) -> str:
  return text[0].upper() + text[1:]


def compose(objects, stripes: str, rng: np.random.Generator, narration: str = "salient"
            ) -> list[list[tuple[str, int]]]:
  """Sentences as lists of (phrase, referent): object index, NO_OBJECT or BACKGROUND."""
  if narration not in NARRATIONS:
    raise ValueError(f"narration must be one of {NARRATIONS}, got {narration!r}")
  # The salient order draws nothing, so its worlds stay as they were before "shuffled" existed.
  order = (list(range(len(objects))) if narration == "salient" else
           [int(i) for i in rng.permutation(len(objects))])
  sentences = []
  for n, k in enumerate(order):
    o = objects[k]
    desc, pos = f"a {o.size} {o.name}", _position(o)
    prev = order[n - 1] if n else None
    rel = _relation(o, objects[prev]) if n else None
    if n == 0:
      intro = ("In this image I can see", "In this picture there is", "In this image there is",
               "I can see")[rng.integers(4)]
      sentence = [(intro, NO_OBJECT), (f"{desc} {pos}", k)]
    elif rel is None or rng.random() < 0.3:
      v = rng.integers(4)
      if v == 3:
        sentence = [(_cap(pos), k), ("there is", NO_OBJECT), (desc, k)]
      else:
        sentence = [(("There is also", "I can also see", "We can also see")[v], NO_OBJECT),
                    (f"{desc} {pos}", k)]
    else:
      j, the = prev, f"the {objects[prev].name}"
      v = rng.integers(3)
      if v == 0:
        sentence = [(f"{_cap(rel)} it", j), ("there is", NO_OBJECT), (desc, k)]
      elif v == 1:
        sentence = [(f"{_cap(rel)} {the}", j), ("I can see", NO_OBJECT), (desc, k)]
      else:
        sentence = [("There is", NO_OBJECT), (desc, k), (f"{rel} {the}", j)]
    sentences.append(sentence)
  if rng.random() < 0.4:
    sentences.append([((f"In the background there are {stripes} stripes",
                        f"The background has {stripes} stripes")[rng.integers(2)], BACKGROUND)])
  return sentences


def speak(sentences, rng: np.random.Generator) -> list[tuple[str, int, float, float]]:
  """Timed utterances (text, referent, start, end): phrases cut into 1-4 words, contiguous time."""
  rate = rng.uniform(2.0, 3.0)  # Words per second.
  t, out = rng.uniform(0.3, 1.0), []
  for sentence in sentences:
    for p, (phrase, ref) in enumerate(sentence):
      words = phrase.split()
      if p == len(sentence) - 1:
        words[-1] += "."
      while words:
        n = min(int(rng.choice(4, p=(0.3, 0.35, 0.25, 0.1))) + 1, len(words))
        dur = n / rate * rng.uniform(0.8, 1.2)
        out.append((" ".join(words[:n]), ref, round(t, 3), round(t + dur, 3)))
        t += dur + rng.uniform(0.0, 0.12)
        words = words[n:]
      t += rng.uniform(0.05, 0.25)  # A phrase boundary: the mouse may move to another object.
    t += rng.uniform(0.2, 0.6)
  return out


def _dwell_point(o: SceneObject, rng) -> np.ndarray:
  """A point well inside the shape's box (its inner 45% around the centre)."""
  half = 0.45 * (np.array(o.box[2:]) - np.array(o.box[:2])) / 2
  return np.array(o.center) + rng.uniform(-1, 1, size=2) * half


def simulate_traces(utterances, objects, rng: np.random.Generator) -> list[list[dict]]:
  """1-3 trace segments of {x, y, t} at ~20 Hz; the mouse dwells on what is being spoken of."""
  t0 = max(0.0, utterances[0][2] - rng.uniform(0.2, 0.6))
  t1 = utterances[-1][3] + rng.uniform(0.1, 0.5)
  pos = np.clip(0.5 + rng.normal(0, 0.1, size=2), 0.1, 0.9)
  keys = [(t0, *pos)]
  if rng.random() < 0.6:  # Enter from just outside the image, as many LN traces do.
    edge = rng.integers(4)
    out = rng.uniform(0.1, 0.9, size=2)
    out[edge % 2] = (-1) ** (edge // 2 + 1) * rng.uniform(0.01, 0.04) + (edge // 2)
    keys = [(t0, *out)]
  refs = [u[1] for u in utterances]
  for i, (_, ref, start, end) in enumerate(utterances):
    dur = end - start
    if ref >= 0:
      o = objects[ref]
      first = start + min(0.1, 0.25 * dur) if ref != (refs[i - 1] if i else None) else start
      for t in np.arange(first, end, 0.3).tolist() + [end]:
        pos = _dwell_point(o, rng)
        keys.append((t, *pos))
    elif ref == BACKGROUND:
      for t in np.linspace(start, end, int(rng.integers(2, 5))).tolist():
        pos = rng.uniform(0.05, 0.95, size=2)
        keys.append((t, *pos))
    else:  # Idle: drift a little, leaning towards the next object if one follows.
      nxt = next((r for r in refs[i + 1:] if r != NO_OBJECT), None)
      if nxt is not None and nxt >= 0:
        pos = pos + 0.3 * (np.array(objects[nxt].center) - pos)
      pos = np.clip(pos + rng.normal(0, 0.02, size=2), -0.02, 1.02)
      keys.append((start + dur / 2, *pos))
      keys.append((end, *pos))
  keys.append((t1, *pos))
  kt = np.maximum.accumulate(np.array([k[0] for k in keys]))
  kt = kt + 1e-6 * np.arange(len(kt))  # np.interp needs increasing times.
  kx, ky = np.array([k[1] for k in keys]), np.array([k[2] for k in keys])
  n = int((t1 - t0) * TRACE_HZ) + 1
  ts = t0 + np.arange(n) / TRACE_HZ + rng.uniform(0, 0.01, size=n)
  xs = np.interp(ts, kt, kx) + rng.normal(0, 0.003, size=n)
  ys = np.interp(ts, kt, ky) + rng.normal(0, 0.003, size=n)
  # Lift the pen in 0-2 pauses between utterances: no points there, a new segment after.
  keep, seg = np.ones(n, bool), np.zeros(n, int)
  gaps = [(utterances[i][3], utterances[i + 1][2]) for i in range(len(utterances) - 1)]
  n_cuts = min(int(rng.choice(3, p=(0.5, 0.35, 0.15))), len(gaps))
  for g in sorted(rng.choice(len(gaps), size=n_cuts, replace=False).tolist()) if n_cuts else []:
    a, b = gaps[g]
    keep &= ~((ts > a + 0.01) & (ts < b - 0.01))
    seg += ts >= (a + b) / 2
  segments = []
  for s in np.unique(seg[keep]).tolist():
    m = keep & (seg == s)
    segments.append([{"x": round(x, 4), "y": round(y, 4), "t": round(t, 3)}
                     for x, y, t in zip(xs[m].tolist(), ys[m].tolist(), ts[m].tolist())])
  return segments


def make_example(seed: int, image_id: int, split: str = "train", image_size: int = 128,
                 narration: str = "salient") -> Example:
  """The example for `image_id`; a pure function of its arguments (NARRATIONS: `narration`)."""
  # Separate streams, so the narrative does not depend on the image size (or vice versa).
  scene_rng, pixel_rng, talk_rng = (np.random.default_rng(s) for s in
                                    np.random.SeedSequence([seed, image_id]).spawn(3))
  objects, stripes = sample_scene(scene_rng)
  pixels = render(objects, stripes, image_size, pixel_rng)
  utterances = speak(compose(objects, stripes, talk_rng, narration), talk_rng)
  traces = simulate_traces(utterances, objects, talk_rng)
  annotator = int(talk_rng.integers(100))
  record = {
      "dataset_id": f"mscoco_{split}2017",
      "image_id": str(image_id),
      "annotator_id": annotator,
      "caption": " ".join(u[0] for u in utterances),
      "timed_caption": [{"utterance": u[0], "start_time": u[2], "end_time": u[3]}
                        for u in utterances],
      "traces": traces,
      "voice_recording": f"coco_{split}/coco_{split}_{image_id}_{annotator}.ogg",
  }
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
  return Example(image_id, split, objects, stripes, record, tuple(u[1] for u in utterances),
                 buf.getvalue())


def annotation_path(out_dir: str, split: str) -> str:
  return os.path.join(out_dir, "annotations",
                      f"coco_{split}_localized_narratives-00000-of-00001.jsonl")


def generate(out_dir: str, num_images: int, seed: int, image_size: int = 128,
             split: str = "train", start_id: int | None = None,
             write_vocab: bool | None = None, on_example=None,
             narration: str = "salient") -> list[dict]:
  """Writes `num_images` images + one LN JSONL file for `split`; returns the records.

  Image ids are `start_id, start_id + 1, ...` (default TRAIN_START_ID or VAL_START_ID). The
  SentencePiece model (DIR/spiece.model) is trained on the captions + TASK_PROMPTS when
  `write_vocab` (default: for the train split). `on_example(example)` sees each `Example` (the
  other formats of `synthetic_formats` are written from them). `narration`: see NARRATIONS.
  """
  if split not in ("train", "val"):
    raise ValueError(f"split must be train or val, got {split!r}")
  start_id = (TRAIN_START_ID if split == "train" else VAL_START_ID) if start_id is None else start_id
  image_dir = os.path.join(out_dir, "images", f"{split}2017")
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
  records = []
  with open(annotation_path(out_dir, split), "w", encoding="utf-8") as f:
    for image_id in range(start_id, start_id + num_images):
      ex = make_example(seed, image_id, split, image_size, narration)
      with open(os.path.join(image_dir, f"{image_id:012d}.jpg"), "wb") as img:
        img.write(ex.jpeg)
      f.write(json.dumps(ex.record) + "\n")
      records.append(ex.record)
      if on_example is not None:
        on_example(ex)
  if write_vocab or (write_vocab is None and split == "train"):
    vocab_lib.train_spm([r["caption"] for r in records] + list(TASK_PROMPTS),
                        os.path.join(out_dir, "spiece"), vocab_size=VOCAB_SIZE)
  return records


FORMATS = ("ln", "refcoco", "coco_captions", "vg", "webli")


def main(argv):
  del argv
  from absl import app
  from absl import flags
  f = flags.FLAGS
  unknown = sorted(set(f.formats) - set(FORMATS))
  if unknown:
    raise app.UsageError(f"unknown --formats {unknown}; valid: {', '.join(FORMATS)}")
  counts = {"train": f.num_images} if f.split == "train" else {"val": f.num_images}
  if f.split == "both":
    counts = {"train": f.num_images,
              "val": max(1, f.num_images // 10) if f.val_images is None else f.val_images}
  examples = []
  extra = set(f.formats) - {"ln"}
  for split, n in counts.items():
    generate(f.out, n, f.seed, f.image_size, split, on_example=examples.append if extra else None,
             narration=f.narration)
    print(f"wrote {n} {split} images to {f.out}")
  if extra:
    from pixel_llm.data import synthetic_formats
    if "refcoco" in extra:
      out = synthetic_formats.write_refcoco(f.out, examples, f.seed)
      print(f"wrote {out['num_refs']} refs to {out['refs']} and {out['instances']}")
    if "coco_captions" in extra:
      for path in synthetic_formats.write_coco_captions(f.out, examples, f.seed):
        print(f"wrote {path}")
    if extra & {"vg", "webli"}:
      from pixel_llm.data import synthetic_regions
      for path in synthetic_regions.write(f.out, examples, f.seed, extra):
        print(f"wrote {path}")


if __name__ == "__main__":
  from absl import app
  from absl import flags
  flags.DEFINE_string("out", None, "Output directory.", required=True)
  flags.DEFINE_integer("num_images", 1000, "Images (of the train split; of val with --split=val).")
  flags.DEFINE_integer("seed", 0, "Seed; image i is a function of (seed, image id) only.")
  flags.DEFINE_integer("image_size", 128, "Side of the square images, in pixels.")
  flags.DEFINE_enum("narration", "salient", list(NARRATIONS),
                    "Order in which narratives visit the shapes (NARRATIONS).")
  flags.DEFINE_enum("split", "train", ["train", "val", "both"], "Split(s) to write.")
  flags.DEFINE_integer("val_images", None, "Val images with --split=both (default num_images/10).")
  flags.DEFINE_list("formats", ["ln"], "Annotation formats: ln (always written, with the images), "
                    "refcoco, coco_captions (see synthetic_formats), vg, webli (see "
                    "synthetic_regions).")
  app.run(main)
