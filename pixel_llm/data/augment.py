r"""Augmentation ops for the tf.data pipelines that keep image, boxes, points, masks and text
consistent: scale jitter, a random crop that keeps the regions the texts talk about, and a
horizontal flip that swaps "left" and "right" in the texts.

  seed = augment.example_seed(global_seed, index)     # one per example (ds.enumerate() gives index)
  image = preprocess.decode(encoded)                  # uint8[H, W, 3]
  out = augment.random_crop_keeping(image, boxes, points, masks, keep, seed, min_fraction=0.5)
  out = augment.horizontal_flip(out["image"], out["boxes"], out["points"], out["masks"], texts,
                                seed, prob=0.5, mode=augment.FLIP_DEFAULTS["vg"])
  out = augment.scale_jitter(out["image"], ..., seed, min_scale=0.75, max_scale=1.25, size=384)

Shape letters: H, W image height and width, S output side, R regions (boxes / masks), P points
(any leading shape). Conventions shared by every op:
  image   uint8[H, W, 3], the decoded image at any size
  boxes   float32[R, 4] x0, y0, x1, y1 and points float32[..., 2] x, y, normalised to the image
          (x right, y down; 0 and 1 are the image's outer pixel edges, so a box covering pixel
          columns [c0, c1) has x0 = c0 / W, x1 = c1 / W)
  masks   [R, H, W] of any dtype (bool, uint8), transformed like the image (nearest neighbour)
  seed    int32 / int64[2], the key of the stateless random ops; each op folds its own salt into
          it, so one seed per example serves all ops without correlating their draws
Each op returns a dict with the transformed image, boxes, points, masks, and box_valid bool[R] /
point_valid bool[...]: whether the box keeps some area (point: stays inside) after the op. Boxes
and points are clipped to the image; invalid ones are zeroed (as LN's weight-0 boxes), so losses
drop them by the validity masks (AND them over a chain of ops: an op cannot know that a zeroed
input was invalid). Points are single locations: the K = 2 box-corner point targets should go in
as boxes, since a flip makes the top-left corner the top-right one.

The final step is `preprocess.resize_and_pad` (longer side to S, pad bottom/right). A pipeline
without augmentation calls it on the encoded image; one with augmentation ends with
`scale_jitter`, which at min_scale = max_scale = 1 gives resize_and_pad's image and mask (bit for
bit when shrinking, tested; within one grey level when enlarging, where it skips antialiasing),
and at other scales resizes the longer side to scale * S and random-crops / pads to S.

Horizontal flip defaults (FLIP_DEFAULTS): "off" for referring expressions (RefCOCO/+/g), LN and
COCO captions (the release flips none of them; a flip cannot fix descriptions such as mirrored
writing), "swap_left_right" for Visual Genome (the release flips VG but leaves "left" / "right" in
the text, which then contradicts the image half the time).
"""
import tensorflow as tf

from pixel_llm.data import preprocess

FLIP_MODES = ("off", "swap_left_right")
FLIP_DEFAULTS = {"refcoco": "off", "refcoco+": "off", "refcocog": "off", "ln": "off",
                 "coco_captions": "off", "vg": "swap_left_right"}

# The ops are plain TF (explicit tf.cond); autograph would only turn their argument checks into
# graph ops.
_plain_tf = tf.autograph.experimental.do_not_convert

# Salts folded into the example seed, one per op.
_JITTER, _CROP, _FLIP = 1, 2, 3


def example_seed(global_seed, index) -> tf.Tensor:
  """int64[2] stateless seed of example `index` (scalar) under `global_seed` (scalar)."""
  return tf.stack([tf.cast(global_seed, tf.int64), tf.cast(index, tf.int64)])


def _uniform(seed, salt: int, n: int) -> tf.Tensor:
  return tf.random.stateless_uniform([n], seed=tf.random.experimental.stateless_fold_in(seed, salt))


def _int_in(u: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor) -> tf.Tensor:
  """An integer in [lo, hi] (int32) from u in [0, 1)."""
  span = tf.cast(hi - lo + 1, tf.float32)
  return lo + tf.minimum(tf.cast(tf.floor(u * span), tf.int32), hi - lo)


def _check(image, boxes, points, masks) -> None:
  if image.dtype != tf.uint8:
    raise ValueError(f"augment: image should be uint8 (decoded), got {image.dtype.name}")
  for name, x, rank, last in (("image", image, 3, 3), ("boxes", boxes, 2, 4),
                              ("points", points, None, 2), ("masks", masks, 3, None)):
    shape = x.shape
    if shape.rank is None:
      continue
    if (rank is not None and shape.rank != rank) or (last is not None and shape[-1] not in
                                                     (None, last)):
      want = f"rank {rank}" if rank else "rank >= 1"
      raise ValueError(f"augment: {name} should have {want}"
                       f"{f' and last dimension {last}' if last else ''}, got shape {shape}")


def _geometry(boxes, points, scale, offset, extent) -> dict:
  """new = old * scale + offset (float32[2] each, x then y), clipped to [0, extent]."""
  scale, offset, extent = (tf.cast(v, tf.float32) for v in (scale, offset, extent))
  b = tf.clip_by_value(tf.cast(boxes, tf.float32) * tf.tile(scale, [2]) + tf.tile(offset, [2]),
                       0.0, tf.tile(extent, [2]))
  box_valid = (b[..., 2] > b[..., 0]) & (b[..., 3] > b[..., 1])
  p = tf.cast(points, tf.float32) * scale + offset
  point_valid = tf.reduce_all((p >= 0.0) & (p <= extent), -1)
  p = tf.clip_by_value(p, 0.0, extent)
  return {"boxes": b * tf.cast(box_valid, tf.float32)[..., None],
          "points": p * tf.cast(point_valid, tf.float32)[..., None],
          "box_valid": box_valid, "point_valid": point_valid}


def _resize_masks(masks: tf.Tensor, new_hw: tf.Tensor) -> tf.Tensor:
  as_int = tf.cast(masks, tf.uint8)[..., None]
  return tf.cast(tf.image.resize(as_int, new_hw, method="nearest")[..., 0], masks.dtype)


@_plain_tf
def scale_jitter(image, boxes, points, masks, seed, min_scale: float = 0.75,
                 max_scale: float = 1.25, size: int = 384) -> dict:
  """Resizes the longer side to s * size (s uniform in [min_scale, max_scale]), random-crops the
  parts beyond size and pads bottom/right to size x size.

  Returns image uint8[S, S, 3], image_mask bool[S, S] (False on padding), masks [R, S, S], boxes
  float32[R, 4] / points float32[..., 2] in the padded square's [0, 1] frame (the model's),
  box_valid, point_valid, scale float32[] (s).
  """
  if not 0 < min_scale <= max_scale:
    raise ValueError(f"scale_jitter: need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
  _check(image, boxes, points, masks)
  u = _uniform(seed, _JITTER, 3)
  s = min_scale + (max_scale - min_scale) * u[0]
  hw = tf.shape(image)[:2]
  hw_f = tf.cast(hw, tf.float32)
  new_hw = tf.maximum(tf.cast(tf.round(hw_f * (size * s / tf.reduce_max(hw_f))), tf.int32), 1)
  crop_hw = tf.minimum(new_hw, size)
  oy = _int_in(u[1], 0, new_hw[0] - crop_hw[0])
  ox = _int_in(u[2], 0, new_hw[1] - crop_hw[1])
  img = preprocess.resize_image(image, new_hw)[oy:oy + crop_hw[0], ox:ox + crop_hw[1]]
  m = _resize_masks(masks, new_hw)[:, oy:oy + crop_hw[0], ox:ox + crop_hw[1]]
  pad = [[0, size - crop_hw[0]], [0, size - crop_hw[1]]]
  rows = tf.range(size)[:, None] < crop_hw[0]
  cols = tf.range(size)[None, :] < crop_hw[1]
  new_wh = tf.cast(new_hw[::-1], tf.float32)
  out = _geometry(boxes, points, new_wh / size, -tf.cast(tf.stack([ox, oy]), tf.float32) / size,
                  tf.cast(crop_hw[::-1], tf.float32) / size)
  out.update(image=tf.ensure_shape(tf.pad(img, pad + [[0, 0]]), [size, size, 3]),
             image_mask=rows & cols, masks=tf.pad(m, [[0, 0]] + pad), scale=s)
  return out


@_plain_tf
def random_crop_keeping(image, boxes, points, masks, keep, seed, min_fraction: float = 0.5
                        ) -> dict:
  """A random crop that contains the union of the boxes where `keep` (bool[R]) is True.

  Each side of the crop is uniform in [max(min_fraction * side, union's side), side] pixels and
  its position uniform among those that contain the union (any position when nothing is kept).
  Returns image uint8[h, w, 3], masks [R, h, w], boxes / points renormalised to the crop,
  box_valid, point_valid, crop int32[4] (x0, y0, x1, y1 in input pixels).
  """
  if not 0 < min_fraction <= 1:
    raise ValueError(f"random_crop_keeping: min_fraction should be in (0, 1], got {min_fraction}")
  _check(image, boxes, points, masks)
  boxes = tf.cast(boxes, tf.float32)
  hw = tf.shape(image)[:2]
  wh = hw[::-1]
  wh_f = tf.cast(wh, tf.float32)
  kept = tf.boolean_mask(boxes, tf.cast(keep, tf.bool) & (boxes[:, 2] > boxes[:, 0])
                         & (boxes[:, 3] > boxes[:, 1]))
  any_kept = tf.shape(kept)[0] > 0
  # The union in whole pixels, rounded outwards.
  u0 = tf.cast(tf.floor(tf.reduce_min(kept[:, :2], 0) * wh_f), tf.int32)
  u1 = tf.cast(tf.math.ceil(tf.reduce_max(kept[:, 2:], 0) * wh_f), tf.int32)
  u0 = tf.where(any_kept, tf.clip_by_value(u0, 0, wh - 1), tf.zeros_like(wh))
  u1 = tf.where(any_kept, tf.clip_by_value(u1, u0 + 1, wh), tf.zeros_like(wh))
  least = tf.maximum(tf.maximum(tf.cast(tf.math.ceil(min_fraction * wh_f), tf.int32), u1 - u0), 1)
  u = _uniform(seed, _CROP, 4)
  size = tf.stack([_int_in(u[0], least[0], wh[0]), _int_in(u[1], least[1], wh[1])])
  lo = tf.maximum(u1 - size, 0)
  hi = tf.where(any_kept, tf.minimum(u0, wh - size), wh - size)
  xy0 = tf.stack([_int_in(u[2], lo[0], hi[0]), _int_in(u[3], lo[1], hi[1])])
  size_f = tf.cast(size, tf.float32)
  out = _geometry(boxes, points, wh_f / size_f, -tf.cast(xy0, tf.float32) / size_f, [1.0, 1.0])
  out.update(image=image[xy0[1]:xy0[1] + size[1], xy0[0]:xy0[0] + size[0]],
             masks=masks[:, xy0[1]:xy0[1] + size[1], xy0[0]:xy0[0] + size[0]],
             crop=tf.concat([xy0, xy0 + size], 0))
  return out


# "right" as an intensifier ("right next to") and "left" as a verb ("has left") are not directions.
_SUFFIX = r"((?i:most|wards?|hand(?:ed)?)?)"
_KEEP_RIGHT = (r"\b([Rr])ight(\s+(?:next|behind|beside|above|below|there|here|now|away|after|"
               r"before)\b)")
_KEEP_ALL_RIGHT = r"\b([Aa]ll\s+[Rr])ight\b"
_KEEP_LEFT = r"\b((?:[Hh]a[sd]|[Hh]ave|[Hh]aving|[Bb]een)\s+[Ll])eft\b"
_CASES = (("left", "right", "\x01"), ("Left", "Right", "\x02"), ("LEFT", "RIGHT", "\x03"))
_HOLD = "\x04"  # stands for the protected "ight" / "eft" until the swap is done


@_plain_tf
def swap_left_right(text: tf.Tensor) -> tf.Tensor:
  """Swaps left <-> right (also leftmost, leftward(s), left-hand, lefthanded) in a string tensor of
  any shape; whole words only ("cleft", "leftover", "bright" stay), the case of "left" / "Left" /
  "LEFT" is kept. Exceptions: "right next to" (and behind, above, there, now ...), "all right",
  "has / had / have / been left". Text containing control characters \\x01-\\x05 is not supported.
  """
  t = tf.strings.regex_replace(text, _KEEP_RIGHT, "\\1" + _HOLD + "\\2")
  t = tf.strings.regex_replace(t, _KEEP_ALL_RIGHT, "\\1" + _HOLD)
  t = tf.strings.regex_replace(t, _KEEP_LEFT, "\\1\x05")
  for left, _, mark in _CASES:
    t = tf.strings.regex_replace(t, rf"\b{left}{_SUFFIX}\b", mark + "\\1")
  for left, right, _ in _CASES:
    t = tf.strings.regex_replace(t, rf"\b{right}{_SUFFIX}\b", left + "\\1")
  for _, right, mark in _CASES:
    t = tf.strings.regex_replace(t, mark, right)
  t = tf.strings.regex_replace(t, _HOLD, "ight")
  return tf.strings.regex_replace(t, "\x05", "eft")


@_plain_tf
def horizontal_flip(image, boxes, points, masks, texts: dict, seed, prob: float = 0.5,
                    mode: str = "off") -> dict:
  """Mirrors image, boxes, points and masks left-right with probability `prob`; with mode
  "swap_left_right" the flip also applies `swap_left_right` to every tensor of `texts` (a dict of
  string tensors of any shape: targets and contexts / prompts alike); mode "off" never flips.

  Returns image, masks, boxes, points, texts (same shapes), box_valid, point_valid, flipped bool[].
  """
  if mode not in FLIP_MODES:
    raise ValueError(f"horizontal_flip: mode should be one of {FLIP_MODES}, got {mode!r}")
  if not 0 <= prob <= 1:
    raise ValueError(f"horizontal_flip: prob should be in [0, 1], got {prob}")
  _check(image, boxes, points, masks)
  texts = dict(texts)
  flipped = (tf.constant(False) if mode == "off" else _uniform(seed, _FLIP, 1)[0] < prob)

  def flip():
    b, p = tf.cast(boxes, tf.float32), tf.cast(points, tf.float32)
    # tf.reverse: a ::-1 strided slice is ~10x slower on CPU.
    return {"image": tf.reverse(image, [1]), "masks": tf.reverse(masks, [2]),
            "boxes": tf.stack([1.0 - b[..., 2], b[..., 1], 1.0 - b[..., 0], b[..., 3]], -1),
            "points": tf.stack([1.0 - p[..., 0], p[..., 1]], -1),
            "texts": {k: swap_left_right(v) for k, v in texts.items()}}

  def keep():
    return {"image": image, "masks": masks, "boxes": tf.cast(boxes, tf.float32),
            "points": tf.cast(points, tf.float32), "texts": texts}

  out = tf.cond(flipped, flip, keep)
  geometry = _geometry(out["boxes"], out["points"], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0])
  out.update(geometry, flipped=flipped)
  return out
