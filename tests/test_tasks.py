"""Multi-task seqio Tasks and Mixtures (tasks_common, tasks_caption, tasks_refcoco, tasks_regions,
mixtures): the common feature set, per-example task masks, the box-at-EOS position, Mixture rates
and determinism. Records: the synthetic world built with `build.py` (LN, COCO captions,
RefCOCO) and hand-written VG records in `visual_genome.feature_description`'s schema.
"""
import io
import json

import numpy as np
import pytest
from PIL import Image

from pixel_llm.data import build, synthetic, synthetic_formats

SEED = 3
S = 32  # image side of the tasks
COMMON = {  # key -> (shape without B, dtype) for R regions, T, C
    "image": lambda r, t, c: ((S, S, 3), "float32"), "image_mask": lambda r, t, c: ((S, S), "bool"),
    "prompt_boxes": lambda r, t, c: ((r, 4), "float32"),
    "prompt_text": lambda r, t, c: ((r, c), "int32"),
    "decoder_target_tokens": lambda r, t, c: ((r, t), "int32"),
    "decoder_input_tokens": lambda r, t, c: ((r, t), "int32"),
    "point_targets": lambda r, t, c: ((r, t, 2, 2), "float32"),
    "point_weights": lambda r, t, c: ((r, t), "float32"),
    "caption_weights": lambda r, t, c: ((r,), "float32"),
    "image_id": lambda r, t, c: ((), "object"), "caption": lambda r, t, c: ((r,), "object"),
    "task": lambda r, t, c: ((), "object")}
VG = [  # image id, (w, h), regions (box normalised xyxy, phrase, id)
    ("7", (40, 20), [((0.0, 0.0, 0.5, 0.5), "a red circle", 70),
                     ((0.5, 0.5, 1.0, 1.0), "blue square", 71),
                     ((0.1, 0.2, 0.3, 0.4), "a star", 72)]),
    ("8", (20, 40), [((0.0, 0.5, 0.5, 1.0), "green ring on the left", 80)]),
    ("9", (20, 20), []),  # no regions: skipped
]


def _batches(name, r=1, t=16, c=8, **kw):
  from pixel_llm.data import tasks_common
  kw = {"split": "train", "batch_size": 4, "shuffle": False, "num_epochs": 1,
        "drop_remainder": False, **kw}
  return list(tasks_common.get_batches(name, max_target_len=t, max_context_len=c,
                                       num_regions=r, **kw))


def _examples(batches):
  return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["image_id"]))]


def _check_common(batches, r, t, c):
  for b in batches:
    n = len(b["image_id"])
    for key, spec in COMMON.items():
      shape, dtype = spec(r, t, c)
      assert (b[key].shape, b[key].dtype.name) == ((n, *shape), dtype), key
    np.testing.assert_array_equal(b["decoder_input_tokens"][..., 1:],
                                  b["decoder_target_tokens"][..., :-1])
    assert not b["decoder_input_tokens"][..., 0].any()
    assert 0 <= b["image"].min() and b["image"].max() <= 1 and b["image"].max() > 0.2
    assert not b["image"][~b["image_mask"]].any()
    assert ((b["decoder_target_tokens"] == 1).sum(-1) == (b["caption"] != b"")).all()  # one EOS


def _vg_records(path):
  import tensorflow as tf
  with tf.io.TFRecordWriter(str(path)) as w:
    for image_id, (width, height), regions in VG:
      buf = io.BytesIO()
      Image.fromarray(np.full((height, width, 3), 200, np.uint8)).save(buf, format="PNG")
      f = build._feature  # pylint: disable=protected-access
      feats = {"image/encoded": f("bytes", [buf.getvalue()]),
               "image/id": f("bytes", [image_id.encode()]), "image/width": f("int", [width]),
               "image/height": f("int", [height]),
               "region/box": f("float", [x for box, _, _ in regions for x in box]),
               "region/phrase": f("bytes", [p.encode() for _, p, _ in regions]),
               "region/id": f("int", [i for _, _, i in regions]),
               "split": f("bytes", [b"train"])}
      w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Registers every task over tiny records; returns (vocab, records dir)."""
  import seqio
  from pixel_llm.data import mixtures, tasks, tasks_caption, tasks_refcoco, tasks_regions
  root = tmp_path_factory.mktemp("world")
  examples = []
  synthetic.generate(str(root), 4, SEED, image_size=48, on_example=examples.append)
  synthetic.generate(str(root), 6, SEED, image_size=48, split="val", on_example=examples.append)
  info = synthetic_formats.write_refcoco(str(root), examples, SEED)
  synthetic_formats.write_coco_captions(str(root), examples, SEED)
  out = root / "records"
  images = [str(root / "images" / "train2017"), str(root / "images" / "val2017")]
  for split in ("train", "val"):
    assert build.main(["coco_captions", "--captions",
                       str(root / "annotations" / f"captions_{split}2017.json"), "--images",
                       images[split == "val"], "--out", str(out), "--split", split]) == 0
  assert build.main(["ln", "--annotations", synthetic.annotation_path(str(root), "train"),
                     "--images", images[0], "--out", str(out)]) == 0
  for split in ("train", "testA"):
    assert build.main(["refcoco", "--refs", info["refs"], "--instances", info["instances"],
                       "--images", *images, "--out", str(out), "--split", split]) == 0
  _vg_records(out / "vg_train.tfrecord-00000-of-00001")
  spm = str(root / "spiece.model")
  small = {"image_size": S, "shuffle_buffer_size": 16}  # a full buffer is read before the first
  tasks_caption.register_caption_task("t_cap", str(out / "coco_captions_{split}.tfrecord-*"),
                                      spm, **small)
  tasks_caption.register_caption_task("t_cap_jitter",
                                      str(out / "coco_captions_{split}.tfrecord-*"), spm,
                                      scale_jitter=(0.5, 1.5), **small)
  tasks.register_ln_task("t_ln_base", str(out / "ln_train.tfrecord-*"), spm, splits=("train",),
                         **small)
  tasks_caption.register_ln_common_task("t_ln", "t_ln_base")
  pattern = str(out / "refcoco_{split}.tfrecord-*")
  for name, kw in {"t_loc": {}, "t_loc_cap": {"caption_loss": True},
                   "t_loco": {"kind": "loco"}}.items():
    tasks_refcoco.register_refcoco_task(name, pattern, spm, splits=("train", "testA"), **small,
                                        **kw)
  tasks_refcoco.register_refcoco_task("t_loc_jitter", pattern, spm, splits=("train", "testA"),
                                      scale_jitter=(0.5, 1.5), **small)
  tasks_refcoco.register_refcoco_task("t_loc_group", pattern, spm, splits=("train", "testA"),
                                      scale_jitter=(0.5, 1.5), expressions_per_image=3, **small)
  # A 4x zoom: the crop often misses the referred object, so the plain-resize fallback runs.
  tasks_refcoco.register_refcoco_task("t_loc_zoom", pattern, spm, splits=("train",),
                                      scale_jitter=(4.0, 4.0), **small)
  tasks_regions.register_vg_task("t_vg", str(out / "vg_{split}.tfrecord-*"), spm,
                                 splits=("train",), **small)
  vg_train = str(out / "vg_train.tfrecord-*")
  for name, kw in {"t_vg_flip": {"flip": True},
                   "t_vg_aug": {"flip": True, "scale_jitter": (0.3, 1.8)},
                   "t_vg_zoom": {"scale_jitter": (6.0, 6.0)}}.items():
    tasks_regions.register_vg_task(name, {"train": vg_train, "val": vg_train}, spm, **small, **kw)
  mixtures.register_trace_stage("t_trace", "t_cap", "t_ln")
  mixtures.register_mixture("t_joint", [("t_loc_cap", 1), ("t_vg", 1)])
  return seqio.SentencePieceVocabulary(spm), out


def test_caption_task_train_and_eval(world):
  from pixel_llm.data import tasks_caption
  vocab, out = world
  prompt = vocab.encode(tasks_caption.DEFAULT_CAPTION_PROMPT)[:7] + [1]
  for split, per_caption in (("train", True), ("val", False)):
    data = json.loads((out.parent / "annotations" / f"captions_{split}2017.json").read_text())
    refs = {}
    for a in data["annotations"]:
      refs.setdefault(str(a["image_id"]).encode(), []).append(a["caption"].encode())
    batches = _batches("t_cap", r=2, t=12, split=split)
    _check_common(batches, 2, 12, 8)
    examples = _examples(batches)
    for e in examples:
      assert [x for x in e["references"] if x] == refs[e["image_id"]]
    # Train: one example per caption; eval: one per image, the first caption.
    want = [(i, c) for i, cs in refs.items() for c in (cs if per_caption else cs[:1])]
    assert sorted((e["image_id"], e["caption"][0]) for e in examples) == sorted(want)
    for e in examples:
      caption = e["caption"][0].decode()
      assert e["caption"][1] == b""
      ids = vocab.encode(caption)[:11] + [1]
      assert e["decoder_target_tokens"][0].tolist() == ids + [0] * (12 - len(ids))
      assert not e["decoder_target_tokens"][1].any() and not e["prompt_text"][1].any()
      assert e["prompt_text"][0].tolist() == prompt + [0] * (8 - len(prompt))
      np.testing.assert_array_equal(e["caption_weights"], [1, 0])  # task mask: caption only
      assert not e["point_weights"].any() and not e["point_targets"].any()
      np.testing.assert_array_equal(e["prompt_boxes"], [[0, 0, 1, 1]] * 2)
      assert e["task"] == b"t_cap"


def test_caption_scale_jitter(world):
  """Train images are jittered (one draw per image, shared by its captions; the same seed gives
  the same images); val images are the plain task's, bit for bit."""
  kw = dict(split="train", shuffle=True, seed=2, num_epochs=2)
  jittered = _examples(_batches("t_cap_jitter", **kw))
  plain = _examples(_batches("t_cap", **{**kw, "num_epochs": 1}))
  assert len(jittered) == 2 * len(plain)
  assert len({int(e["image_mask"].sum()) for e in jittered}) > 3  # the scale varies
  for a, b in zip(jittered, _examples(_batches("t_cap_jitter", **kw)), strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
  for e in jittered:
    assert not e["image"][~e["image_mask"]].any()
  by_image = {}
  for e in _examples(_batches("t_cap_jitter", split="train", seed=2)):  # one epoch, in order
    by_image.setdefault(e["image_id"], []).append(e["image"])
  assert max(len(v) for v in by_image.values()) > 1
  for images in by_image.values():
    for image in images[1:]:
      np.testing.assert_array_equal(image, images[0])
  for a, b in zip(_examples(_batches("t_cap_jitter", split="val")),
                  _examples(_batches("t_cap", split="val")), strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["decoder_target_tokens"], b["decoder_target_tokens"])


def test_refcoco_box_at_eos_and_masks(world):
  vocab, _ = world
  t = 8  # some expressions are cut: their box moves to the new EOS position
  batches = _batches("t_loc", t=t, c=12, split="testA")
  _check_common(batches, 1, t, 12)
  examples = _examples(batches)
  assert len(examples) >= 5 and len({int(e["ref_id"]) for e in examples}) < len(examples)
  lengths = []
  for e in examples:
    expression = e["caption"][0].decode()
    assert expression.encode() in list(e["references"])
    ids = vocab.encode(expression)
    lengths.append(len(ids))
    context = ids[:11] + [1]  # the expression, cut to C - 1 tokens + EOS
    assert e["prompt_text"][0].tolist() == context + [0] * (12 - len(context))
    targets = e["decoder_target_tokens"][0]
    (eos,) = np.flatnonzero(targets == 1)
    assert eos == min(len(ids), t - 1) and targets[:eos].tolist() == ids[:eos]
    # The position predicting EOS (its input is the last kept expression token) holds the box.
    assert e["decoder_input_tokens"][0, eos] == ids[eos - 1]
    np.testing.assert_array_equal(e["point_weights"][0], np.eye(t)[eos])
    np.testing.assert_allclose(e["point_targets"][0, eos].reshape(4), e["gt_boxes"][0], atol=1e-6)
    assert not np.delete(e["point_targets"][0], eos, 0).any()
    np.testing.assert_array_equal(e["caption_weights"], [0])  # caption loss off by default
    np.testing.assert_array_equal(e["prompt_boxes"], [[0, 0, 1, 1]])
    # The mask (nearest-neighbour resize) lies inside the box, give or take a pixel.
    mask = e["masks"][0]
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1} and mask.any()
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = e["gt_boxes"][0] * S
    assert xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1
    assert e["mask_weights"][0] == 1
  assert min(lengths) < t - 1 < max(lengths)


def test_refcoco_scale_jitter(world):
  """Train images are jittered (box and mask move with the image, fresh draws every epoch, the
  same for the same seed); eval splits are not."""
  kw = dict(split="train", shuffle=True, seed=3, num_epochs=2)
  plain = _examples(_batches("t_loc", **{**kw, "num_epochs": 1, "shuffle": False}))
  jittered = _examples(_batches("t_loc_jitter", **kw))
  assert len(jittered) == 2 * len(plain)
  again = _examples(_batches("t_loc_jitter", **kw))
  for a, b in zip(jittered, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  sizes = set()
  for e in jittered:
    # The mask lies inside the (moved) box, give or take a pixel, and the box at EOS is the GT box.
    ys, xs = np.nonzero(e["masks"][0])
    x0, y0, x1, y1 = e["gt_boxes"][0] * S
    assert xs.min() >= x0 - 1 and xs.max() <= x1 + 1 and ys.min() >= y0 - 1 and ys.max() <= y1 + 1
    eos = int(np.flatnonzero(e["point_weights"][0])[0])
    np.testing.assert_allclose(e["point_targets"][0, eos].reshape(4), e["gt_boxes"][0], atol=1e-6)
    assert not e["image"][~e["image_mask"]].any()
    sizes.add(int(e["image_mask"].sum()))
  assert len(sizes) > 3  # scales vary (a plain resize gives one valid area per aspect ratio)
  # One expression, two epochs: different draws.
  key = lambda e: (int(e["ref_id"]), int(e["expression_id"]))  # noqa: E731
  by_key = {}
  for e in jittered:
    by_key.setdefault(key(e), []).append(e["gt_boxes"][0])
  assert any(not np.allclose(*boxes) for boxes in by_key.values() if len(boxes) == 2)
  # Eval splits: the plain resize, bit for bit.
  for a, b in zip(_examples(_batches("t_loc_jitter", split="testA")),
                  _examples(_batches("t_loc", split="testA"))):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["gt_boxes"], b["gt_boxes"])


def test_refcoco_jitter_that_loses_the_box_falls_back_to_the_plain_resize(world):
  key = lambda e: (int(e["ref_id"]), int(e["expression_id"]))  # noqa: E731
  plain = {key(e): e for e in _examples(_batches("t_loc"))}
  zoomed = _examples(_batches("t_loc_zoom", shuffle=True, seed=1, num_epochs=3))
  fallbacks = 0
  for e in zoomed:
    p = plain[key(e)]
    if np.array_equal(e["image"], p["image"]):  # the crop lost the box: the plain example
      fallbacks += 1
      np.testing.assert_array_equal(e["gt_boxes"], p["gt_boxes"])
      np.testing.assert_array_equal(e["masks"], p["masks"])
    else:  # a 4x crop: the whole frame is image, the box keeps some area
      assert e["image_mask"].all()
      x0, y0, x1, y1 = e["gt_boxes"][0]
      assert x1 > x0 and y1 > y0
  assert 0 < fallbacks < len(zoomed)


def test_refcoco_expressions_per_image(world):
  """expressions_per_image=3: a train example is one image with up to 3 of its expressions, each
  prompt with its own box at EOS, a fresh choice each epoch; eval stays one per expression."""
  vocab, out = world
  plain = _examples(_batches("t_loc", num_epochs=1))
  by_image = {}
  for e in plain:
    by_image.setdefault(e["image_id"], set()).add(e["caption"][0])
  grouped = _examples(_batches("t_loc_group", r=4, shuffle=True, seed=2, num_epochs=2))
  assert len(grouped) == 2 * len(by_image)  # one example per image and epoch
  chosen = {}
  for e in grouped:
    k = int((e["caption"] != b"").sum())
    assert 1 <= k <= min(3, len(by_image[e["image_id"]]))
    assert set(e["caption"][:k]) <= by_image[e["image_id"]] and len(set(e["caption"][:k])) == k
    assert not e["caption"][k:].astype(bool).any() and not e["point_weights"][k:].any()
    for j in range(k):
      eos = int(np.flatnonzero(e["point_weights"][j])[0])
      assert e["decoder_target_tokens"][j, eos] == 1
      np.testing.assert_allclose(e["point_targets"][j, eos].reshape(4), e["gt_boxes"][j],
                                 atol=1e-6)
      ids = vocab.encode(e["caption"][j].decode())
      assert e["prompt_text"][j, :min(len(ids), 7)].tolist() == ids[:7]
    np.testing.assert_array_equal(e["gt_boxes"][k:], [[0, 0, 1, 1]] * (4 - k))
    chosen.setdefault(e["image_id"], []).append(tuple(e["caption"][:k]))
  # Images with more than 3 expressions: the two epochs chose differently at least once.
  assert any(len(set(c)) > 1 for i, c in chosen.items() if len(by_image[i]) > 3)
  evals = _examples(_batches("t_loc_group", r=4, split="testA"))
  assert len(evals) == len(_examples(_batches("t_loc", split="testA")))
  assert all((e["caption"] != b"").sum() == 1 for e in evals)
  import tensorflow as tf
  with pytest.raises(tf.errors.InvalidArgumentError, match="expressions_per_image=3 needs"):
    _batches("t_loc_group", r=2)


def test_refcoco_loco(world):
  loco = _examples(_batches("t_loco", r=2, split="testA"))
  assert len(loco) >= 5
  for e in loco:
    np.testing.assert_allclose(e["prompt_boxes"], [e["gt_boxes"][0], [0, 0, 1, 1]])
    assert (e["gt_boxes"][0] != [0, 0, 1, 1]).any()
    np.testing.assert_array_equal(e["caption_weights"], [1, 0])
    assert not e["point_weights"].any()
    assert e["masks"].shape == (2, S, S) and not e["masks"][1].any()


def _check_vg(vocab, examples, r, t):
  examples = {e["image_id"].decode(): e for e in examples}
  assert sorted(examples) == ["7", "8"]  # "9" has no regions
  for image_id, (width, height), regions in VG[:2]:
    e = examples[image_id]
    kept = regions[:r]
    extent = np.array([width, height] * 2) / max(width, height)
    want_boxes = [np.array(b) * extent for b, _, _ in kept] + [[0, 0, 1, 1]] * (r - len(kept))
    np.testing.assert_allclose(e["prompt_boxes"], want_boxes, atol=1e-6)
    np.testing.assert_array_equal(e["caption_weights"], [1] * len(kept) + [0] * (r - len(kept)))
    for k, (_, phrase, _) in enumerate(kept):
      ids = vocab.encode(phrase)[:t - 1] + [1]
      assert e["decoder_target_tokens"][k].tolist() == ids + [0] * (t - len(ids))
      assert e["caption"][k].decode() == phrase
    assert not e["point_weights"].any()
    assert not e["decoder_target_tokens"][len(kept):].any()


def test_vg_flip_and_scale_jitter(world):
  """VG train augmentation: a mirrored image mirrors its boxes and swaps left/right in the
  phrases; jittered boxes stay in the image's valid area; the val split is the plain task's."""
  vocab, _ = world
  kw = dict(r=3, t=10, shuffle=True, seed=4, num_epochs=12)
  flips = []
  for e in _examples(_batches("t_vg_flip", **kw)):
    if e["image_id"] == b"8":
      flipped = e["prompt_boxes"][0, 0] > 0.2  # (0, .5, .5, 1) * extent (.5, 1) mirrors to x0 .25
      want_box = [0.25, 0.5, 0.5, 1.0] if flipped else [0.0, 0.5, 0.25, 1.0]
      np.testing.assert_allclose(e["prompt_boxes"][0], want_box, atol=1e-6)
      side = "right" if flipped else "left"
      assert e["caption"][0].decode() == f"green ring on the {side}"
      ids = vocab.encode(f"green ring on the {side}")
      assert e["decoder_target_tokens"][0, :len(ids)].tolist() == ids
      flips.append(bool(flipped))
  assert len(flips) == 12 and 0 < sum(flips) < 12
  aug = _examples(_batches("t_vg_aug", **kw))
  assert aug and len({int(e["image_mask"].sum()) for e in aug}) > 3  # the scale varies
  for e in aug:
    valid = e["caption_weights"] > 0
    boxes = e["prompt_boxes"][valid]
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    ys, xs = np.nonzero(e["image_mask"])
    assert (boxes[:, 2] <= (xs.max() + 1) / S + 1e-6).all()
    assert (boxes[:, 3] <= (ys.max() + 1) / S + 1e-6).all()
    assert set(e["region_ids"][valid].tolist()) <= {70, 71, 72, 80}
  again = _examples(_batches("t_vg_aug", **kw))
  for a, b in zip(aug, again, strict=True):
    np.testing.assert_array_equal(a["prompt_boxes"], b["prompt_boxes"])
    np.testing.assert_array_equal(a["image"], b["image"])
  _check_vg(vocab, _examples(_batches("t_vg_aug", r=3, t=10, split="val")), 3, 10)


def test_vg_crop_without_regions_falls_back_to_the_plain_resize(world):
  """A crop that keeps no region would train on nothing (every caption weight 0): the image is
  placed plainly instead, with all its regions."""
  plain = {e["image_id"]: e for e in _examples(_batches("t_vg", r=3, t=10))}
  zoomed = _examples(_batches("t_vg_zoom", r=3, t=10, shuffle=True, seed=2, num_epochs=12))
  fallbacks = 0
  for e in zoomed:
    assert e["caption_weights"].sum() >= 1
    if np.array_equal(e["image"], plain[e["image_id"]]["image"]):  # padded: a 6x zoom is not
      fallbacks += 1
      np.testing.assert_array_equal(e["prompt_boxes"], plain[e["image_id"]]["prompt_boxes"])
  assert 0 < fallbacks < len(zoomed)


def test_joint_mixture_batches_all_kinds(world):
  """Referring localization (caption loss configured on) and VG regions (R = 2) in one batch,
  each with its own task mask (captions + LN: the trace-stage test); the same seed gives the same
  batches."""
  vocab, _ = world
  from pixel_llm.data import tasks

  def draw(seed):
    it = tasks.get_dataset("t_joint", split="train", batch_size=16, seed=seed,
                           max_target_len=10, num_regions=2)
    return [next(it) for _ in range(2)]
  joint, again = draw(1), draw(1)
  for x, y in zip(joint, again, strict=True):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)
  _check_common(joint, 2, 10, 8)
  assert set(joint[0]) == set(COMMON)  # a Mixture keeps the common features only
  by_task = {}
  for e in _examples(joint):
    by_task.setdefault(e["task"].decode(), []).append(e)
  assert set(by_task) == {"t_loc_cap", "t_vg"}
  for e in by_task["t_loc_cap"]:
    np.testing.assert_array_equal(e["caption_weights"], [1, 0])  # configured on
    (eos,) = np.flatnonzero(e["decoder_target_tokens"][0] == 1)
    np.testing.assert_array_equal(e["point_weights"][0], np.eye(10)[eos])
  vg = {e["image_id"]: e for e in by_task["t_vg"]}
  assert len(vg) == 2
  _check_vg(vocab, vg.values(), 2, 10)


def test_trace_stage_rate_and_ln(world):
  """COCO : LN = 1 : 2, and the LN examples are the LN task's (`tasks.register_ln_task`) with
  caption and trace masks."""
  import seqio
  from pixel_llm.data import tasks
  mixture = seqio.get_mixture_or_task("t_trace")
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {"t_cap": 1.0, "t_ln": 2.0}

  it = tasks.get_dataset("t_trace", split="train", batch_size=40, seed=5, max_target_len=24)
  a = [next(it) for _ in range(3)]
  _check_common(a, 1, 24, 8)
  names = np.concatenate([x["task"] for x in a])
  assert 0.55 < np.mean(names == b"t_ln") < 0.78, np.mean(names == b"t_ln")
  ln = {e["image_id"]: e for e in _examples(a) if e["task"] == b"t_ln"}
  old = _examples(tasks.get_dataset("t_ln_base", split="train", batch_size=4, shuffle=False,
                                    num_epochs=1, max_target_len=24, max_context_len=8,
                                    drop_remainder=False))
  assert sorted(ln) == sorted(e["image_id"] for e in old)
  for e in old:
    for key in e:
      np.testing.assert_array_equal(e[key], ln[e["image_id"]][key], err_msg=key)
    np.testing.assert_array_equal(ln[e["image_id"]]["caption_weights"], [1])
  assert any(e["point_weights"].any() for e in ln.values())


def test_errors(world):
  from pixel_llm.data import mixtures, tasks_common
  with pytest.raises(ValueError, match="not a registered common-format"):
    mixtures.register_mixture("t_bad", [("t_ln_base", 1)])
  with pytest.raises(ValueError, match="image_size=32"):
    tasks_common.get_batches("t_cap", batch_size=2, image_size=64)
