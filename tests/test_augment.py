"""Augmentation ops (pixel_llm/data/augment.py): determinism eagerly and inside tf.data, geometry
consistency (a filled rectangle in the image and mask stays where the transformed box says), the
crop keeping the referred regions, the left/right text swap and flip-twice identity.

An image H x W = 48 x 64 of dark noise with two bright rectangles: region 0 (kept) and region 1.
"""
import numpy as np
import pytest
import tensorflow as tf

from pixel_llm.data import augment, preprocess

H, W = 48, 64
RECTS = ((10, 8, 30, 20), (40, 28, 60, 44))  # pixel columns/rows [c0, c1) x [r0, r1): x0 y0 x1 y1


@pytest.fixture(scope="module")
def sample():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 40, (H, W, 3)).astype(np.uint8)
  masks = np.zeros((len(RECTS), H, W), bool)
  for k, (x0, y0, x1, y1) in enumerate(RECTS):
    image[y0:y1, x0:x1] = 255
    masks[k, y0:y1, x0:x1] = True
  boxes = np.array([[x0 / W, y0 / H, x1 / W, y1 / H] for x0, y0, x1, y1 in RECTS], np.float32)
  points = boxes.reshape(-1, 2, 2)  # K = 2 corners per region, like point_targets
  return {"image": tf.constant(image), "boxes": tf.constant(boxes), "points": tf.constant(points),
          "masks": tf.constant(masks)}


def _ops(sample):
  """name -> fn(seed) -> dict, the three ops on `sample` with settings that exercise them."""
  s = sample
  g = (s["image"], s["boxes"], s["points"], s["masks"])
  texts = {"target": tf.constant("the left square"), "context": tf.constant(["Left of it"])}
  return {
      "jitter": lambda seed: augment.scale_jitter(*g, seed, 0.5, 1.5, size=40),
      "crop": lambda seed: augment.random_crop_keeping(*g, [True, False], seed, 0.3),
      "flip": lambda seed: augment.horizontal_flip(*g, texts, seed, 0.5, "swap_left_right"),
  }


def _mask_box(mask: np.ndarray) -> np.ndarray | None:
  """x0, y0, x1, y1 (pixel edges) of a mask's pixels, None if empty."""
  ys, xs = np.nonzero(mask)
  return None if ys.size == 0 else np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def _check_consistent(out, side_hw, tol, before=None):
  """Each valid box (times the frame's pixels) is its mask's extent and its corner points; the
  image is bright inside it. `before`: the previous op's output, whose validity the chain keeps."""
  h, w = side_hw
  image, masks = out["image"].numpy(), out["masks"].numpy()
  if before is not None:  # a chain ANDs the validity masks
    out = {**out, "box_valid": out["box_valid"] & before["box_valid"],
           "point_valid": out["point_valid"] & before["point_valid"]}
  for k in range(len(RECTS)):
    found = _mask_box(masks[k])
    if not out["box_valid"][k]:
      assert found is None or min(found[2] - found[0], found[3] - found[1]) <= tol
      continue
    box = out["boxes"][k].numpy() * [w, h, w, h]
    np.testing.assert_allclose(found, box, atol=tol)
    x0, y0, x1, y1 = np.round(box).astype(int)
    if x1 - x0 > 2 and y1 - y0 > 2:  # the inside, away from resampled edges, is bright
      assert image[y0 + 1:y1 - 1, x0 + 1:x1 - 1].min() > 200
    pts_valid = out["point_valid"][k].numpy()
    if pts_valid.all():  # corners that survived clipping span the box (a flip swaps their order)
      pts = out["points"][k].numpy()
      np.testing.assert_allclose(np.concatenate([pts.min(0), pts.max(0)]), out["boxes"][k],
                                 atol=1e-6)


def test_same_seed_same_result_eagerly_and_in_dataset(sample):
  for name, fn in _ops(sample).items():
    seeds = tf.data.Dataset.range(4).map(lambda i: augment.example_seed(7, i))
    in_ds = list(seeds.map(lambda seed, fn=fn: fn(seed)).as_numpy_iterator())
    eager = [fn(augment.example_seed(7, i)) for i in range(4)]
    for a, b in zip(in_ds, eager):
      for key in ("image", "boxes", "points", "masks", "box_valid"):
        np.testing.assert_array_equal(a[key], b[key].numpy(), err_msg=f"{name} {key}")
    # Different seeds give different outcomes.
    key = {"jitter": "scale", "crop": "crop", "flip": "flipped"}[name]
    assert len({np.asarray(o[key]).tobytes() for o in in_ds}) > 1, name


def test_geometry_consistent_after_each_op_and_a_chain(sample):
  s = sample
  for i in range(8):
    seed = augment.example_seed(1, i)
    crop = augment.random_crop_keeping(s["image"], s["boxes"], s["points"], s["masks"],
                                       [True, False], seed, 0.3)
    _check_consistent(crop, crop["image"].shape[:2], 1e-4)
    flip = augment.horizontal_flip(crop["image"], crop["boxes"], crop["points"], crop["masks"],
                                   {}, seed, 0.5, "swap_left_right")
    _check_consistent(flip, flip["image"].shape[:2], 1e-4, crop)
    flip = {**flip, "box_valid": flip["box_valid"] & crop["box_valid"],
            "point_valid": flip["point_valid"] & crop["point_valid"]}
    jit = augment.scale_jitter(flip["image"], flip["boxes"], flip["points"], flip["masks"], seed,
                               0.5, 1.5, size=40)
    _check_consistent(jit, (40, 40), 1.01, flip)  # nearest-neighbour masks: within a pixel
    assert jit["image"].shape == (40, 40, 3) and jit["masks"].shape == (2, 40, 40)
    valid_px = jit["image_mask"].numpy()
    ext = _mask_box(valid_px)  # content at the top left, zero padding elsewhere
    assert ext[0] == 0 and ext[1] == 0 and not jit["image"].numpy()[~valid_px].any()
    # Region 0 was kept by the crop; the jitter may still cut it, never lose it below scale 1.
    assert crop["box_valid"][0] and flip["box_valid"][0]
    if jit["scale"] <= 1.0:
      assert jit["box_valid"][0]


def test_crop_always_contains_kept_union(sample):
  s = sample
  boxes = tf.constant([[0.30, 0.25, 0.45, 0.40], [0.6, 0.5, 0.7, 0.9], [0.0, 0.0, 0.1, 0.1]])
  keep = tf.constant([True, True, False])
  masks = tf.zeros([3, H, W], tf.bool)
  crops = tf.data.Dataset.range(150).map(lambda i: augment.random_crop_keeping(
      s["image"], boxes, tf.zeros([0, 2]), masks, keep, augment.example_seed(3, i), 0.5))
  union = np.array([0.30 * W, 0.25 * H, 0.7 * W, 0.9 * H])
  seen = set()
  for out in crops.as_numpy_iterator():
    x0, y0, x1, y1 = out["crop"]
    seen.add((x0, y0, x1, y1))
    assert x0 <= union[0] and y0 <= union[1] and x1 >= union[2] and y1 >= union[3], out["crop"]
    assert 0 <= x0 and 0 <= y0 and x1 <= W and y1 <= H
    assert x1 - x0 >= 0.5 * W and y1 - y0 >= 0.5 * H
    assert out["image"].shape == (y1 - y0, x1 - x0, 3) and out["masks"].shape[1:] == (y1 - y0,
                                                                                       x1 - x0)
    assert out["box_valid"][:2].all()
    back = out["boxes"][:2] * np.tile([x1 - x0, y1 - y0], 2) + [x0, y0, x0, y0]
    np.testing.assert_allclose(back, boxes[:2].numpy() * [W, H, W, H], atol=1e-3)
    if not out["box_valid"][2]:
      assert not out["boxes"][2].any()  # invalid boxes are zeroed for the losses to drop
  assert len(seen) > 30
  # Nothing kept: any crop of at least min_fraction.
  none = augment.random_crop_keeping(s["image"], boxes, tf.zeros([0, 2]), masks,
                                     [False, False, False], augment.example_seed(0, 0), 0.9)
  x0, y0, x1, y1 = none["crop"].numpy()
  assert x1 - x0 >= 0.9 * W and y1 - y0 >= 0.9 * H and x1 <= W and y1 <= H


def test_scale_one_is_resize_and_pad(sample):
  encoded = tf.io.encode_png(sample["image"])
  image, mask, extent = preprocess.resize_and_pad(encoded, 40)
  out = augment.scale_jitter(sample["image"], sample["boxes"], sample["points"], sample["masks"],
                             augment.example_seed(0, 5), 1.0, 1.0, size=40)
  np.testing.assert_array_equal(out["image"], image)
  np.testing.assert_array_equal(out["image_mask"], mask)
  np.testing.assert_allclose(out["boxes"], sample["boxes"] * tf.tile(extent, [2]), atol=1e-6)
  # Enlarging skips antialiasing: the same pixels within one grey level.
  big, _, _ = preprocess.resize_and_pad(encoded, 80)
  up = augment.scale_jitter(sample["image"], sample["boxes"], sample["points"], sample["masks"],
                            augment.example_seed(0, 5), 1.0, 1.0, size=80)
  assert np.abs(up["image"].numpy().astype(int) - big.numpy()).max() <= 1
  # No region: masks [0, H, W] pass through.
  empty = augment.scale_jitter(sample["image"], tf.zeros([0, 4]), tf.zeros([0, 2]),
                               tf.zeros([0, H, W], tf.uint8), augment.example_seed(0, 1), size=40)
  assert empty["masks"].shape == (0, 40, 40) and empty["boxes"].shape == (0, 4)


SWAPS = [("the left one", "the right one"), ("Left of the cup", "Right of the cup"),
         ("cleft palate, bright light", "cleft palate, bright light"),
         ("leftover rice", "leftover rice"), ("RIGHT side", "LEFT side"),
         ("leftmost and Rightmost", "rightmost and Leftmost"),
         ("the left-hand man", "the right-hand man"), ("moving leftwards", "moving rightwards"),
         ("right next to the left cup", "right next to the right cup"),
         ("He has left the right room.", "He has left the left room."),
         ("left's right", "right's left"), ("", "")]


def test_swap_left_right_words():
  got = augment.swap_left_right(tf.constant([a for a, _ in SWAPS])).numpy()
  assert [g.decode() for g in got] == [b for _, b in SWAPS]


def test_flip_twice_is_identity_and_off_never_flips(sample):
  s = sample
  g = (s["image"], s["boxes"], s["points"], s["masks"])
  texts = {"target": tf.constant([a for a, _ in SWAPS]), "prompt": tf.constant("Left?")}
  seed = augment.example_seed(0, 0)
  once = augment.horizontal_flip(*g, texts, seed, 1.0, "swap_left_right")
  assert once["flipped"] and once["texts"]["prompt"] == b"Right?"
  np.testing.assert_array_equal(once["image"][:, ::-1], s["image"])
  twice = augment.horizontal_flip(once["image"], once["boxes"], once["points"], once["masks"],
                                  once["texts"], seed, 1.0, "swap_left_right")
  for key in ("image", "masks"):
    np.testing.assert_array_equal(twice[key], s[key])
  np.testing.assert_allclose(twice["boxes"], s["boxes"], atol=1e-6)
  np.testing.assert_allclose(twice["points"], s["points"], atol=1e-6)
  np.testing.assert_array_equal(twice["texts"]["target"], texts["target"])
  for i in range(5):
    off = augment.horizontal_flip(*g, texts, augment.example_seed(0, i), 1.0, "off")
    assert not off["flipped"] and off["texts"]["prompt"] == b"Left?"
    np.testing.assert_array_equal(off["image"], s["image"])


def test_bad_arguments_raise(sample):
  s = sample
  g = (s["image"], s["boxes"], s["points"], s["masks"])
  seed = augment.example_seed(0, 0)
  with pytest.raises(ValueError, match="mode"):
    augment.horizontal_flip(*g, {}, seed, 0.5, "mirror")
  with pytest.raises(ValueError, match="min_fraction"):
    augment.random_crop_keeping(*g, [True, False], seed, 0.0)
  with pytest.raises(ValueError, match="min_scale"):
    augment.scale_jitter(*g, seed, 1.5, 1.0)
  with pytest.raises(ValueError, match="uint8"):
    augment.random_crop_keeping(tf.zeros([4, 4, 3]), *g[1:], [True, False], seed)
  with pytest.raises(ValueError, match="boxes"):
    augment.scale_jitter(s["image"], tf.zeros([2, 3]), s["points"], s["masks"], seed)
