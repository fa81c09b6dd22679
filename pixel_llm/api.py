"""The Python API for a person at a notebook: load a trained PixelLLM, caption with a location per
word, caption a region (box or point prompt), locate (and segment) an expression, dense captioning.

  model = pixel_llm.load("workdirs/ln_toy")            # a trainer workdir (latest checkpoint)
  model.caption("cat.jpg")                            # {"text", "words": [{"word", "box"}], "score"}
  model.caption(["a.jpg", "b.png"], method="beam")    # a batch: one result per image
  model.caption(image, box=(10, 20, 200, 180))        # location-conditioned (pixels of `image`)
  model.caption(image, point=(120, 64))
  model.locate(image, "the red ball")                 # {"box": [x0, y0, x1, y1]} in pixels
  model.locate(image, "the red ball", mask=True)      # {"box", "mask": bool[H, W]} (refcoco_seg)
  model.describe(image, (10, 20, 200, 180))           # the region's caption (caption with box=)
  model.dense_caption(image, max_boxes=20)            # [{"box", "score", "text"}] (vg_densecap)

Images are file paths, PIL images, uint8[H, W(, C)] or float[H, W(, C)] arrays in [0, 1]. They go
through the training pipeline's preprocessing (`data/preprocess.resize_and_pad`, here in PIL:
longer side resized to the model's S, zero-padded bottom/right), and every location comes back in
pixels of the original image, clipped to it. With K = 2 points per token (the paper's setting) a
word's location is a box x0, y0, x1, y1 (corners ordered); with K = 1 a point x, y.

Shapes: B images, R prompts per image (1 here), S model image side, L decode length, K points per
token, T decoder length.
"""
import functools
import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from pixel_llm import workdir as layout

InputError = ValueError  # bad images, boxes, points or queries raise ValueError naming the input


class CheckpointNotFoundError(FileNotFoundError):
  """No config.json / checkpoint where `load` was pointed."""


# -- checkpoints ----------------------------------------------------------------------------------
def _find_checkpoint(path: str, step: int | None) -> tuple[str, str, str | None]:
  """(config.json path, orbax folder, key of the params inside it or None for a bare params tree).

  `path`: a trainer workdir (config.json + checkpoints/<step>/), its checkpoints/ folder, one
  checkpoints/<step>/ folder, or a `pixel_llm.tools.convert` output (config.json + params/).
  """
  if not os.path.isdir(path):
    raise CheckpointNotFoundError(f"Checkpoint {os.path.abspath(path)!r} does not exist.")
  path, step_in_path, _ = layout.locate(path)
  step = step_in_path if step is None else step
  config = os.path.join(path, layout.CONFIG)
  if not os.path.exists(config):
    raise CheckpointNotFoundError(f"{path} has no config.json: pass a trainer workdir "
                                  "(`python -m pixel_llm.train --workdir=...`).")
  if os.path.isdir(os.path.join(path, "params")) and not os.path.isdir(
      os.path.join(path, layout.CHECKPOINTS)):
    return config, os.path.join(path, "params"), None
  root = os.path.join(path, layout.CHECKPOINTS)
  steps = sorted(int(s) for s in os.listdir(root) if s.isdigit()) if os.path.isdir(root) else []
  if not steps:
    raise CheckpointNotFoundError(f"{path} has no checkpoints/<step>/ folder.")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointNotFoundError(f"{path} has no checkpoint at step {step} (it has {steps}).")
  folder = os.path.join(root, str(step))
  for item in layout.PARAMS_ITEMS:
    if os.path.isdir(os.path.join(folder, item)):
      folder = os.path.join(folder, item)
      break
  return config, folder, "params"


def _restore_params(folder: str, key: str | None, abstract: Any) -> Any:
  """Reads only the parameters (a partial restore: the optimizer state and counters are left on
  disk) after checking every stored shape against `abstract` (ShapeDtypeStructs)."""
  import jax
  import orbax.checkpoint as ocp
  from flax import traverse_util
  from pixel_llm.models import checkpoint_io

  from absl import logging
  checkpointer = ocp.PyTreeCheckpointer()
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax warns that a manager's item has no step metadata
  try:
    tree = checkpointer.metadata(folder).item_metadata.tree
  finally:
    logging.set_verbosity(verbosity)
  if key is not None:
    if key not in tree:
      raise checkpoint_io.CheckpointMismatchError(folder, missing=[key])
    tree = tree[key]
  stored = traverse_util.flatten_dict(tree)
  wanted = traverse_util.flatten_dict(abstract)
  missing = ["/".join(k) for k in wanted if k not in stored]
  unexpected = ["/".join(k) for k in stored if k not in wanted]
  mismatched = [f"{'/'.join(k)}: checkpoint {tuple(stored[k].shape)} vs config {v.shape}"
                for k, v in wanted.items() if k in stored and tuple(stored[k].shape) != v.shape]
  if missing or unexpected or mismatched:
    raise checkpoint_io.CheckpointMismatchError(
        f"{folder} (checked against its config.json)", missing, unexpected, mismatched)
  target = {key: abstract} if key is not None else abstract
  restored = checkpointer.restore(folder, args=ocp.args.PyTreeRestore(
      item=target, partial_restore=True,
      restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)))
  return restored[key] if key is not None else restored


def _vocab_path(config, workdir: str) -> str:
  """The SentencePiece model: WORKDIR/spiece.model, else where the trainer's data came from."""
  own = os.path.join(workdir, layout.VOCAB)
  if os.path.exists(own):
    return own
  d = config.data
  if d.source == "synthetic":
    from pixel_llm.data import pipeline  # imports no TensorFlow
    path = os.path.join(pipeline._synthetic_root(config), "spiece.model")
  else:
    path = d.get("vocab") or os.environ.get("PIXEL_LLM_VOCAB", "")
  if not path or not os.path.exists(path):
    where = path or "config.data.vocab / $PIXEL_LLM_VOCAB"
    raise CheckpointNotFoundError(f"No vocabulary for {workdir}: looked for {own} and {where}. "
                                  "Copy the training spiece.model next to config.json.")
  return path


def load(workdir_or_checkpoint: str, step: int | None = None, *,
         batch_size: int = 8) -> "PixelLLM":
  """A `PixelLLM` from a trainer workdir (latest checkpoint unless `step`), one of its
  checkpoints/<step>/ folders, or a `pixel_llm.tools.convert` output. `batch_size`: images per
  forward pass in `caption`."""
  import flax.linen as nn
  import jax
  import ml_collections
  import sentencepiece as spm
  from pixel_llm.models import build

  config_path, folder, key = _find_checkpoint(workdir_or_checkpoint, step)
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  workdir = os.path.dirname(config_path)
  network = build.build_network(config.model)
  abstract = nn.meta.unbox(build.abstract_params(config))
  params = _restore_params(folder, key, abstract)
  vocab = spm.SentencePieceProcessor(model_file=_vocab_path(config, workdir))
  if vocab.get_piece_size() > config.model.t5.vocab_size:
    raise ValueError(f"The vocabulary has {vocab.get_piece_size()} pieces but the model's "
                     f"vocab_size is {config.model.t5.vocab_size}.")
  return PixelLLM(network, jax.device_put(params), vocab, config, batch_size=batch_size)


# -- images ---------------------------------------------------------------------------------------
class _Image:
  """One preprocessed image: pixels uint8[S, S, 3] (padded), mask bool[S, S], original (h, w),
  resized content (nh, nw), the name used in errors, and the unpadded content for pictures."""

  def __init__(self, source: Any, size: int, name: str):
    from PIL import Image
    self.name = name
    array = _read(source, name)
    self.h, self.w = array.shape[:2]
    scale = size / max(self.h, self.w)
    self.nh, self.nw = max(int(round(self.h * scale)), 1), max(int(round(self.w * scale)), 1)
    content = np.asarray(Image.fromarray(array).resize((self.nw, self.nh), Image.BILINEAR))
    self.content = content
    self.pixels = np.zeros((size, size, 3), np.uint8)
    self.pixels[:self.nh, :self.nw] = content
    self.mask = np.zeros((size, size), bool)
    self.mask[:self.nh, :self.nw] = True
    self.size = size

  def to_model(self, xy: np.ndarray) -> np.ndarray:
    """Original pixels (x, y) [..., 2] -> [0, 1] of the padded square."""
    return np.asarray(xy, np.float32) * np.array([self.nw / self.w, self.nh / self.h]) / self.size

  def to_pixels(self, xy: np.ndarray) -> np.ndarray:
    """[0, 1] of the padded square [..., 2] -> original pixels, clipped to the image."""
    xy = np.asarray(xy, np.float32) * self.size * np.array([self.w / self.nw, self.h / self.nh])
    return np.clip(xy, 0.0, [self.w, self.h])

  def to_content(self, xy: np.ndarray) -> np.ndarray:
    """[0, 1] of the padded square -> [0, 1] of the unpadded content (for `visualize`)."""
    return np.asarray(xy, np.float32) * self.size / np.array([self.nw, self.nh], np.float32)


def _read(source: Any, name: str) -> np.ndarray:
  """uint8[H, W, 3] from a path, a PIL image or an array."""
  from PIL import Image
  if isinstance(source, (str, os.PathLike)):
    try:
      with Image.open(source) as im:
        source = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      raise InputError(f"Cannot read image {os.fspath(source)!r}: {e}") from e
  if isinstance(source, Image.Image):
    return np.asarray(source.convert("RGB"))
  array = np.asarray(source)
  if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
    array = array[..., :3] if array.shape[-1] != 1 else np.repeat(array, 3, -1)
  elif array.ndim == 2:
    array = np.repeat(array[..., None], 3, -1)
  else:
    raise InputError(f"Image {name}: expected an array [H, W], [H, W, 1], [H, W, 3] or "
                     f"[H, W, 4], got shape {array.shape}.")
  if min(array.shape[:2]) < 1:
    raise InputError(f"Image {name} is empty (shape {array.shape}).")
  if array.dtype == np.uint8:
    return array
  if not np.issubdtype(array.dtype, np.floating):
    raise InputError(f"Image {name}: expected uint8 or float pixels, got {array.dtype}.")
  if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0:
    raise InputError(f"Image {name}: float pixels must be finite and in [0, 1] (got "
                     f"[{np.nanmin(array):g}, {np.nanmax(array):g}]); pass uint8 for 0..255.")
  # Through uint8, as the training pipeline stores images.
  return (np.clip(np.round(array * 255.0), 0, 255)).astype(np.uint8)


def _check_box(box: Sequence[float], image: _Image) -> np.ndarray:
  b = np.asarray(box, np.float64).reshape(-1)
  if b.shape != (4,) or not np.all(np.isfinite(b)):
    raise InputError(f"box must be 4 finite numbers x0, y0, x1, y1, got {box!r}.")
  x0, y0, x1, y1 = b
  if x0 >= x1 or y0 >= y1:
    raise InputError(f"box {tuple(b)} is inverted or empty: need x0 < x1 and y0 < y1.")
  if x0 < 0 or y0 < 0 or x1 > image.w or y1 > image.h:
    raise InputError(f"box {tuple(b)} is outside image {image.name} ({image.w}x{image.h} px).")
  return b


def _check_point(point: Sequence[float], image: _Image) -> np.ndarray:
  p = np.asarray(point, np.float64).reshape(-1)
  if p.shape != (2,) or not np.all(np.isfinite(p)):
    raise InputError(f"point must be 2 finite numbers x, y, got {point!r}.")
  if not (0 <= p[0] <= image.w and 0 <= p[1] <= image.h):
    raise InputError(f"point {tuple(p)} is outside image {image.name} "
                     f"({image.w}x{image.h} px).")
  return p


def _per_image(value, n: int, what: str) -> list:
  """One box/point for every image, or a list of them (one per image)."""
  if value is None:
    return [None] * n
  first = value[0] if len(value) else None
  if isinstance(first, (int, float, np.integer, np.floating)):
    return [value] * n
  if len(value) != n:
    raise InputError(f"{len(value)} {what}es for {n} images.")
  return list(value)


# -- compiled programs (shared by every PixelLLM of the same network in a process) -----------------
@functools.partial(jax.jit,
                   static_argnames=("network", "max_decode_len", "method", "beam_size"))
def _predict(network, params, batch, *, max_decode_len, method, beam_size):
  from pixel_llm.model import PixelLLMModel
  return PixelLLMModel(network).predict_batch(params, batch, max_decode_len=max_decode_len,
                                              method=method, beam_size=beam_size)


@functools.partial(jax.jit, static_argnames=("network", "max_decode_len"))
def _locate_generated(network, params, batch, *, max_decode_len):
  from pixel_llm.model import PixelLLMModel
  return PixelLLMModel(network).locate_generated_batch(params, batch,
                                                       max_decode_len=max_decode_len)


@functools.partial(jax.jit, static_argnames=("network",))
def _forward(network, params, batch):
  keys = ("prompt_boxes", "prompt_text", "image_mask")
  out, _ = network.apply({"params": params}, batch["image"], batch["decoder_input_tokens"],
                         **{k: batch[k] for k in keys})
  return out


class PixelLLM:
  """A loaded model: `caption`, `locate`, `describe`, `dense_caption` (see the module docstring;
  the task methods live in `api_tasks.py`). Build it with `load`."""

  def __init__(self, network, params, vocab, config, *, batch_size: int = 8):
    self.network, self.params, self.vocab, self.config = network, params, vocab, config
    self.batch_size = batch_size
    self.image_size = int(config.model.image_size)
    self.num_points = int(config.model.location_head.num_points)
    prompts = config.data.get("prompts") or ("Describe the image in detail.",)
    self.prompt = prompts[0]

  def prompt_tokens(self, prompt: str | None) -> np.ndarray:
    """int32[C]: a prompt's `prompt_text` exactly as training built it (encoded, truncated, EOS,
    padded; `data/tasks.py`); None means the config's first training prompt."""
    c = int(self.config.input.max_context_len)
    ids = self.vocab.encode(self.prompt if prompt is None else prompt)[:c - 1] + [1]
    return np.asarray(ids + [0] * (c - len(ids)), np.int32)

  def _images(self, images) -> tuple[list[_Image], bool]:
    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    if not items:
      raise InputError("No images given.")
    out = []
    for i, item in enumerate(items):
      name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"#{i}"
      out.append(_Image(item, self.image_size, name))
    return out, single

  def _location(self, points: np.ndarray, image: _Image) -> dict[str, list[float]]:
    """points float[K, 2] in [0, 1] of the padded square -> {"box"} (K = 2) or {"point"(s)}."""
    xy = image.to_pixels(points)
    if self.num_points == 2:
      lo, hi = xy.min(0), xy.max(0)
      return {"box": [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])]}
    if self.num_points == 1:
      return {"point": [float(xy[0, 0]), float(xy[0, 1])]}
    return {"points": xy.tolist()}

  def caption(self, images, *, box=None, point=None, method: str = "greedy", beam_size: int = 4,
              max_len: int | None = None, prompt: str | None = None):
    """Captions with a location per word.

    Args:
      images: one image or a list (path, PIL image, uint8 or [0, 1] float array).
      box: (x0, y0, x1, y1) in pixels of the original image (or a list, one per image): caption
        that region (the model's box prompt). point: (x, y) likewise (a positive point prompt).
        Neither: the whole image.
      method: "greedy" or "beam" (beam_size beams, length penalty 0.6).
      max_len: decoded tokens at most (default: the config's max_target_len).
      prompt: the prompt text (default: the first training prompt of the config).
    Returns:
      per image {"text": str, "words": [{"word": str, "box": [x0, y0, x1, y1]} (K = 2; "point"
      [x, y] for K = 1)], "score": float (log-probability; beam: length-normalised)}; a list for
      a list of images. A word is located where its first SentencePiece piece is.
    Raises:
      ValueError naming the image for an unreadable image or a box/point outside it or inverted.
    """
    imgs, single = self._images(images)
    results = self._caption(imgs, box=box, point=point, method=method, beam_size=beam_size,
                            max_len=max_len, prompt=prompt)
    for r in results:
      del r["_points"]
    return results[0] if single else results

  def _caption(self, imgs: list, *, box, point, method, beam_size, max_len, prompt) -> list:
    """`caption` on preprocessed images; each result also has "_points" float[N, K, 2] in [0, 1]
    of the padded square (for `infer`'s pictures)."""
    from pixel_llm import visualize
    if method not in ("greedy", "beam"):
      raise InputError(f"method must be 'greedy' or 'beam', got {method!r}.")
    if box is not None and point is not None:
      raise InputError("Give box or point, not both.")
    boxes = [None if b is None else _check_box(b, im)
             for b, im in zip(_per_image(box, len(imgs), "box"), imgs)]
    points = [None if p is None else _check_point(p, im)
              for p, im in zip(_per_image(point, len(imgs), "point"), imgs)]
    max_len = int(max_len or self.config.input.max_target_len)
    text = self.prompt_tokens(prompt)
    results = []
    for start in range(0, len(imgs), self.batch_size):
      chunk = slice(start, start + self.batch_size)
      ims = imgs[chunk]
      batch = {"image": np.stack([im.pixels for im in ims]).astype(np.float32) / 255.0,
               "image_mask": np.stack([im.mask for im in ims]),
               "prompt_text": np.broadcast_to(text, (len(ims), 1, text.size)).copy()}
      if point is not None:
        batch["prompt_points"] = np.stack([im.to_model(p)[None, None]
                                           for im, p in zip(ims, points[chunk])])
        batch["prompt_point_labels"] = np.ones((len(ims), 1, 1), np.int32)
      else:
        batch["prompt_boxes"] = np.stack([
            (im.to_model(b.reshape(2, 2)).reshape(1, 4) if b is not None else
             np.array([[0.0, 0.0, 1.0, 1.0]])) for im, b in zip(ims, boxes[chunk])]).astype(
                 np.float32)
      pred = _predict(self.network, self.params, batch, max_decode_len=max_len, method=method,
                      beam_size=beam_size)
      pred = {k: np.asarray(v) for k, v in pred.items()}
      for i, im in enumerate(ims):
        words, word_points = visualize.words_from_tokens(self.vocab, pred["tokens"][i, 0],
                                                          pred["points"][i, 0])
        results.append({
            "text": " ".join(words),
            "words": [{"word": w, **self._location(p, im)} for w, p in zip(words, word_points)],
            "score": float(pred["scores"][i, 0]),
            "_points": word_points,  # [0, 1] of the padded square, for `infer`'s pictures
        })
    return results

  def locate(self, image, query: str, *, mask: bool = False, prompt: str | None = None,
             generate: bool = False):
    """The box of the object `query` refers to, in pixels of the original image: {"box": [x0, y0,
    x1, y1]} (K = 2; {"point": [x, y]} for a one-point location head); with `mask` also its
    segmentation, with `generate` the expression the decoder wrote: always one dict.

    The query is the teacher-forced decoder input (BOS + its tokens, no EOS) and the location is
    read at the input position of its last token, where EOS is predicted: the release's
    referring-localisation convention (models/pixel_llm.py). The prompt text is `prompt`, else the
    training prompt of the checkpoint's task (for RefCOCO "loc": [prefix] + the query, as
    `data/tasks_refcoco.py`; otherwise the captioning prompt).
    With `generate`, the decoder instead writes the expression itself from that prompt (greedy)
    and the box is read where it emits EOS; the result then also has "expression": the words it
    wrote. The release's evaluation, and so the paper's RefCOCO numbers, teacher-force.

    Args:
      mask: also segment it (SAM's mask decoder prompted with this box; a network with a mask
        decoder in "eos" mode, `configs/refcoco_seg.py`). The result then also has "mask":
        bool[H, W] in pixels of the original image.
    Raises ValueError for an empty query, one longer than the decoder (max_target_len - 1
    tokens), an unreadable image (named), or `mask` on a network without that mask decoder.
    """
    from pixel_llm import api_tasks
    if isinstance(image, (list, tuple)):
      raise InputError("locate takes one image.")
    if mask and generate:
      raise InputError("locate: mask=True segments the teacher-forced box; use one of mask / "
                       "generate.")
    if mask:  # before reading anything: the checkpoint cannot do it at all
      api_tasks.check_segmentation(self.network)
    ids = self._query_ids(query)
    prompt = api_tasks.locate_prompt(self.config, query, prompt)
    (im,), _ = self._images([image])
    if mask:
      return api_tasks.locate_with_mask(self, im, ids, prompt)
    return self._locate_image(im, ids, prompt, generate=generate)

  def describe(self, image, box, *, method: str = "greedy", beam_size: int = 4,
               max_len: int | None = None, prompt: str | None = None) -> dict[str, Any]:
    """Location-conditioned captioning: what is in `box` (x0, y0, x1, y1 in pixels of the original
    image). `caption(image, box=box)` with the region tasks' prompt ("Describe the region.") for
    a model trained on regions (configs/loc_caption.py, vg_densecap.py, refcoco*.py).

    Returns {"text": str, "words": [{"word", "box"}], "score": float}, locations in pixels.
    """
    from pixel_llm import api_tasks
    if isinstance(image, (list, tuple)):
      raise InputError("describe takes one image.")
    if box is None:
      raise InputError("describe needs a box (x0, y0, x1, y1) in pixels; for the whole image "
                       "use caption().")
    return self.caption(image, box=box, method=method, beam_size=beam_size, max_len=max_len,
                        prompt=api_tasks.region_prompt(self.config, prompt))

  def dense_caption(self, image, *, max_boxes: int = 20, min_score: float = 0.0,
                    iou_threshold: float = 0.9, max_len: int | None = None,
                    prompt: str | None = None) -> list[dict[str, Any]]:
    """Dense object captioning: the proposal head's top `max_boxes` boxes after NMS
    (`iou_threshold`, the release's 0.9) with score >= `min_score`, each captioned greedily through
    the box prompt (a network with a proposal head: `configs/vg_densecap.py`).

    Returns [{"box": [x0, y0, x1, y1] pixels of the original image, "score": float (the proposal
    heatmap's sigmoid), "text": str}], sorted by score, best first; at most `max_boxes`.
    """
    from pixel_llm import api_tasks
    if isinstance(image, (list, tuple)):
      raise InputError("dense_caption takes one image.")
    api_tasks.check_dense(self.network)
    (im,), _ = self._images([image])
    return api_tasks.dense_caption(self, im, max_boxes=max_boxes, min_score=min_score,
                                   iou_threshold=iou_threshold, max_len=max_len, prompt=prompt)

  def _query_ids(self, query: str) -> list[int]:
    """The query's token ids, checked: not empty, and fits the decoder."""
    if not isinstance(query, str) or not query.strip():
      raise InputError(f"locate needs a non-empty query, got {query!r}.")
    ids = self.vocab.encode(query.strip())
    t = int(self.config.input.max_target_len)
    if not ids:
      raise InputError(f"The query {query!r} has no tokens.")
    if len(ids) > t - 1:
      raise InputError(f"The query has {len(ids)} tokens; this model reads at most {t - 1}.")
    return ids

  def _locate_image(self, im: _Image, ids: list[int], prompt: str | None = None, *,
                    generate: bool = False):
    t = int(self.config.input.max_target_len)
    # Padding after the query cannot change its positions: the decoder is causal.
    tokens = np.zeros((1, 1, t), np.int32)
    tokens[0, 0, 1:len(ids) + 1] = ids
    text = self.prompt_tokens(prompt)
    batch = {"image": im.pixels[None].astype(np.float32) / 255.0, "image_mask": im.mask[None],
             "prompt_boxes": np.array([[[0.0, 0.0, 1.0, 1.0]]], np.float32),
             "prompt_text": text[None, None], "decoder_input_tokens": tokens}
    if generate:
      from pixel_llm import visualize
      got = _locate_generated(self.network, self.params, batch, max_decode_len=t)
      words, _ = visualize.words_from_tokens(self.vocab, np.asarray(got["tokens"])[0, 0])
      loc = self._location(np.asarray(got["points"])[0, 0], im)
      return {**loc, "expression": " ".join(words)}
    points = np.asarray(_forward(self.network, self.params, batch)["points"])[0, 0, len(ids)]
    return self._location(points, im)
