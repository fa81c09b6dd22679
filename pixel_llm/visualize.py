"""Pictures of a caption with a location per word: each word and its box/point share a colour; and
of the downstream tasks' results (dense captions: numbered boxes with their captions; a referring
segmentation: the mask overlaid with its box).

Shapes: H/W image height/width, N words, K points per word (K = 2: two box corners, K = 1: a point),
T decoded tokens. Locations are (x, y) in [0, 1] of the image given to `render_caption` (for model
outputs: the padded square the model saw).
"""
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PAD_ID = 0
EOS_ID = 1
WORD_START = "\u2581"  # SentencePiece's "▁": the piece begins a new word

# Saturated colours that stay readable both on photos and as text on white; cycled per word.
PALETTE = [
    (230, 25, 75), (0, 130, 200), (60, 160, 40), (245, 130, 48), (145, 30, 180), (0, 150, 150),
    (240, 50, 230), (128, 128, 0), (170, 110, 40), (0, 0, 128), (200, 160, 0), (128, 0, 0),
]
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)
_NO_LOCATION = (150, 150, 150)  # caption colour of words without a location (nothing to match)


def word_colour(index: int) -> tuple[int, int, int]:
  return PALETTE[index % len(PALETTE)]


# -- tokens -> words ------------------------------------------------------------------------------
def _piece_table(vocab: Any):
  """(id -> piece or None, ids -> text or None) for a SentencePiece model, seqio vocab or piece list."""
  sp = vocab if hasattr(vocab, "id_to_piece") else getattr(vocab, "tokenizer", None)
  if sp is not None and hasattr(sp, "id_to_piece"):
    size = sp.get_piece_size()
    return (lambda i: sp.id_to_piece(i) if i < size else None), sp.decode
  pieces = list(vocab)
  return (lambda i: pieces[i] if i < len(pieces) else None), None


def words_from_tokens(vocab: Any, token_ids: Sequence[int], points: np.ndarray | None = None):
  """Merges SentencePiece pieces into words; a word is located where its first piece is.

  A piece starting with "▁" starts a new word, the others extend the current one. Decoding stops at
  EOS (id 1) and skips padding (id 0). Ids beyond the SentencePiece model (T5's extra ids) become
  words of their own. Taking the first piece's location (rather than e.g. the mean over pieces)
  matches how the trace targets are assigned: every piece of a word gets the same utterance point.

  Args:
    vocab: a `sentencepiece.SentencePieceProcessor`, a seqio `SentencePieceVocabulary` (anything
      with `.tokenizer`), or a sequence of piece strings indexed by id.
    token_ids: int[T] decoded tokens.
    points: float[T, K, 2] the location predicted with each token, or None.
  Returns:
    (words: list[str] of N words, word_points: float32[N, K, 2], or None when `points` is None)
  """
  piece_of, decode = _piece_table(vocab)
  token_ids = [int(t) for t in np.asarray(token_ids).reshape(-1)]
  groups = []  # (ids, first token index)
  for t, tok in enumerate(token_ids):
    if tok == EOS_ID:
      break
    if tok == PAD_ID:
      continue
    piece = piece_of(tok)
    if piece is None:  # an extra id: its own word, which the next piece must not extend
      groups.append(([tok], t))
      groups.append(([], t))
    elif piece.startswith(WORD_START) or not groups or not groups[-1][0]:
      groups.append(([tok], t))
    else:
      groups[-1][0].append(tok)

  extra_base = getattr(vocab, "vocab_size", None)  # seqio: an int including the extra ids
  if not isinstance(extra_base, (int, np.integer)):
    extra_base = None
  words, firsts = [], []
  for ids, t in groups:
    if not ids:
      continue
    if piece_of(ids[0]) is None:
      text = f"<extra_id_{extra_base - 1 - ids[0]}>" if extra_base else f"<{ids[0]}>"
    elif decode is not None:
      text = decode(ids).strip()
    else:
      text = "".join(piece_of(i) for i in ids).replace(WORD_START, " ").strip()
    if text:
      words.append(text)
      firsts.append(t)
  if points is None:
    return words, None
  points = np.asarray(points, np.float32)
  return words, points[np.asarray(firsts, np.int64)].reshape((len(words),) + points.shape[1:])


# -- drawing --------------------------------------------------------------------------------------
def _to_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.dtype != np.uint8:
    image = (np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  return image[..., :3]


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, ImportError, OSError):  # old Pillow or no FreeType: fixed bitmap font
    return ImageFont.load_default()


def _location(points, i: int) -> np.ndarray | None:
  """float[K, 2] location of word i, or None when missing/NaN."""
  if points is None:
    return None
  p = points[i]
  if p is None:
    return None
  p = np.asarray(p, np.float32).reshape(-1, 2)
  return None if p.size == 0 or not np.all(np.isfinite(p)) else p


def _wrap(words: Sequence[str], font, width: int) -> list[list[tuple[int, str, float]]]:
  """Greedy word wrap: lines of (word index, word, x offset)."""
  space = font.getlength(" ")
  lines, line, x = [], [], 0.0
  for i, w in enumerate(words):
    length = font.getlength(w)
    if line and x + length > width:
      lines.append(line)
      line, x = [], 0.0
    line.append((i, w, x))
    x += length + space
  if line:
    lines.append(line)
  return lines


def render_caption(image: np.ndarray, words: Sequence[str], points=None, *, boxes: bool = True,
                   scale: int = 4, title: str | None = None) -> Image.Image:
  """The image (upscaled) with each word's location drawn, and the caption coloured word by word.

  Args:
    image: uint8[H, W, 3] or float[H, W, 3] in [0, 1] (grey [H, W] works too).
    words: N words.
    points: float[N, K, 2] (x, y) in [0, 1], a length-N list with None for words without a location,
      or None. NaN anywhere in a word's points also means "no location".
    boxes: for K >= 2, draw the box spanned by the points (min/max corners) plus a dot at its
      centre; False draws the centre dot only. K = 1 is always a dot.
    scale: integer upscaling of the image (nearest neighbour, so small inputs stay crisp).
    title: optional line of text above the image.
  Words keep their palette colour (by position) whether or not they have a location; those without
  one are written in grey so that no one looks for a box that is not there.
  Returns:
    RGB image of width W * scale (the caption is wrapped to it).
  """
  if points is not None and len(points) != len(words):
    raise ValueError(f"{len(words)} words but {len(points)} locations")
  pixels = _to_uint8(image)
  h, w = pixels.shape[0] * scale, pixels.shape[1] * scale
  picture = Image.fromarray(pixels).resize((w, h), Image.NEAREST)

  font_size = int(np.clip(w // 24, 12, 36))
  font = _font(font_size)
  margin = max(4, font_size // 2)
  ascent, descent = font.getmetrics()
  line_h = ascent + descent + max(2, font_size // 4)
  lines = _wrap(words, font, w - 2 * margin)
  title_h = line_h + margin if title else 0
  caption_h = len(lines) * line_h + 2 * margin

  canvas = Image.new("RGB", (w, title_h + h + caption_h), _BACKGROUND)
  canvas.paste(picture, (0, title_h))
  draw = ImageDraw.Draw(canvas)
  if title:
    draw.text((margin, margin // 2), title, fill=_TEXT, font=font)

  line_w = max(1, scale // 2)
  radius = max(4, round(1.5 * scale))
  located = [False] * len(words)
  for i in range(len(words)):
    p = _location(points, i)
    if p is None:
      continue
    located[i] = True
    xy = np.clip(p, 0.0, 1.0) * np.array([w - 1, h - 1], np.float32) + np.array([0, title_h])
    colour = word_colour(i)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    if len(xy) >= 2 and boxes:
      draw.rectangle([float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])], outline=colour,
                     width=line_w)
    cx, cy = (lo + hi) / 2 if len(xy) >= 2 else xy[0]
    # A white ring keeps the dot visible on dark and saturated backgrounds alike.
    draw.ellipse([cx - radius - 1, cy - radius - 1, cx + radius + 1, cy + radius + 1],
                 fill=colour, outline=_BACKGROUND)

  y = title_h + h + margin
  for line in lines:
    for i, word, x in line:
      draw.text((margin + x, y), word, fill=word_colour(i) if located[i] else _NO_LOCATION,
                font=font)
    y += line_h
  return canvas


def save_caption_png(path: str, image: np.ndarray, words: Sequence[str], points=None,
                     **kwargs) -> Image.Image:
  """`render_caption(image, words, points, **kwargs)` written to `path` as PNG; returns the image."""
  rendered = render_caption(image, words, points, **kwargs)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  rendered.save(path, format="PNG")
  return rendered


# -- downstream tasks (pixels of the original image, as `pixel_llm.load(...)` returns them) --------
def _upscaled(image: np.ndarray, scale: int | None) -> tuple[Image.Image, float]:
  """The image as RGB, upscaled (nearest) to about 512 px on its longer side unless `scale`."""
  pixels = _to_uint8(image)
  h, w = pixels.shape[:2]
  s = scale or max(1, 512 // max(h, w))
  return Image.fromarray(pixels).resize((w * s, h * s), Image.NEAREST), float(s)


def _with_text(picture: Image.Image, title: str | None, lines: Sequence[tuple[str, tuple]]
               ) -> Image.Image:
  """`picture` with an optional title above and coloured, wrapped lines of text below it."""
  w, h = picture.size
  font_size = int(np.clip(w // 28, 12, 28))
  font = _font(font_size)
  margin = max(4, font_size // 2)
  ascent, descent = font.getmetrics()
  line_h = ascent + descent + max(2, font_size // 4)
  wrapped = []  # (text, colour): long lines are wrapped at word boundaries
  for text, colour in lines:
    for line in _wrap(text.split(" "), font, w - 2 * margin):
      wrapped.append((" ".join(word for _, word, _ in line), colour))
  title_h = line_h + margin if title else 0
  canvas = Image.new("RGB", (w, title_h + h + len(wrapped) * line_h + 2 * margin), _BACKGROUND)
  canvas.paste(picture, (0, title_h))
  draw = ImageDraw.Draw(canvas)
  if title:
    draw.text((margin, margin // 2), title, fill=_TEXT, font=font)
  for i, (text, colour) in enumerate(wrapped):
    draw.text((margin, title_h + h + margin + i * line_h), text, fill=colour, font=font)
  return canvas


def _save(picture: Image.Image, path: str) -> Image.Image:
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  picture.save(path, format="PNG")
  return picture


def render_dense_caption(image: np.ndarray, results: Sequence[dict], *, scale: int | None = None,
                         title: str | None = None) -> Image.Image:
  """Dense captions: each box numbered in its colour on the image, and "n. text (score)" below.

  image: uint8[H, W, 3] or float in [0, 1]; results: N dicts {"box": [x0, y0, x1, y1] in pixels of
  `image`, "text", "score"} (`PixelLLM.dense_caption`). Returns RGB of width W * scale.
  """
  picture, s = _upscaled(image, scale)
  draw = ImageDraw.Draw(picture)
  font = _font(int(np.clip(picture.size[0] // 32, 10, 24)))
  line_w = max(2, int(s) // 2)
  for i, r in enumerate(results):
    x0, y0, x1, y1 = (float(v) * s for v in r["box"])
    colour = word_colour(i)
    draw.rectangle([x0, y0, x1, y1], outline=colour, width=line_w)
    # The number sits on a filled tab inside the box's top-left corner, readable on any image.
    label = str(i + 1)
    lx, ly = x0 + line_w, y0 + line_w
    draw.rectangle([lx, ly, lx + font.getlength(label) + 4, ly + sum(font.getmetrics()) + 2],
                   fill=colour)
    draw.text((lx + 2, ly + 1), label, fill=_BACKGROUND, font=font)
  lines = [(f"{i + 1}. {r['text'] or '(empty)'} ({float(r['score']):.2f})", word_colour(i))
           for i, r in enumerate(results)] or [("(no boxes)", _NO_LOCATION)]
  return _with_text(picture, title, lines)


def save_dense_caption_png(path: str, image: np.ndarray, results: Sequence[dict],
                           **kwargs) -> Image.Image:
  """`render_dense_caption(image, results, **kwargs)` written to `path` as PNG; returns it."""
  return _save(render_dense_caption(image, results, **kwargs), path)


def render_mask(image: np.ndarray, box: Sequence[float] | None, mask: np.ndarray, *,
                title: str | None = None, scale: int | None = None,
                colour: tuple[int, int, int] = PALETTE[0], alpha: float = 0.5) -> Image.Image:
  """A segmentation: the mask blended over the image in `colour` with its outline drawn solid, and
  the box (pixels of `image`, or None) as a rectangle in a second colour.

  image: uint8[H, W, 3] or float in [0, 1]; mask: bool[H, W]. Returns RGB of width W * scale.
  """
  pixels = _to_uint8(image)
  mask = np.asarray(mask, bool)
  if mask.shape != pixels.shape[:2]:
    raise ValueError(f"mask {mask.shape} does not match image {pixels.shape[:2]}.")
  blend = pixels.astype(np.float32)
  blend[mask] = (1 - alpha) * blend[mask] + alpha * np.asarray(colour, np.float32)
  # Outline: mask pixels with a 4-neighbour outside it, so the extent reads even at small alpha.
  padded = np.pad(mask, 1)
  edge = mask & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
  blend[edge] = colour
  picture, s = _upscaled(blend.astype(np.uint8), scale)
  if box is not None:
    x0, y0, x1, y1 = (float(v) * s for v in box)
    ImageDraw.Draw(picture).rectangle([x0, y0, x1, y1], outline=PALETTE[1],
                                      width=max(2, int(s) // 2))
  area = f"mask {int(mask.sum())} px ({100.0 * mask.mean():.1f}% of the image)"
  return _with_text(picture, title, [(area, colour)] + ([("box", PALETTE[1])] if box is not None
                                                         else []))


def save_mask_png(path: str, image: np.ndarray, box: Sequence[float] | None, mask: np.ndarray,
                  title: str | None = None, **kwargs) -> Image.Image:
  """`render_mask(image, box, mask, title=title, **kwargs)` written to `path` as PNG."""
  return _save(render_mask(image, box, mask, title=title, **kwargs), path)
