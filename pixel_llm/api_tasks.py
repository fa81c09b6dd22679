"""The downstream tasks of the Python API (`pixel_llm.load(...)` methods, kept here so that api.py
stays small): referring segmentation, location-conditioned captioning and dense object captioning.

  model.locate(image, "the red ball", mask=True)  # {"box": [x0, y0, x1, y1], "mask": bool[H, W]}
  model.describe(image, (10, 20, 200, 180))       # {"text", "words", "score"} of that region
  model.dense_caption(image, max_boxes=20)        # [{"box", "score", "text"}] best first

The paper's tasks (Sec. 4; `anchor_scenic_pixel_llm.md` 5.2): referring segmentation prompts SAM's
mask decoder with the box the location head predicts where EOS is predicted (the release's refseg
stage, `configs/refcoco_seg.py`); dense captioning captions each of the proposal head's top boxes
after NMS through the box-prompt path (the release's densecap stage, `configs/vg_densecap.py`).
Every location and mask comes back in pixels of the original image: the resize-and-pad of
preprocessing (`api._Image`) is undone.

Shapes: H/W original image height/width, S model image side, T decoder length, K points per token,
N boxes, L decode length.
"""
import functools
from typing import Any

import jax
import numpy as np

# What the training tasks put in the prompt text (pixel_llm/data/tasks_regions.py and
# tasks_refcoco.py): a region task is prompted with this, not with the captioning prompt.
REGION_PROMPT = "Describe the region."

_SEG_CONFIG = ("configs/refcoco_seg.py (model.mask_decoder.enabled, model.mask_adapter.enabled, "
               "model.segment_box='eos')")
_DENSE_CONFIG = "configs/vg_densecap.py (model.proposal_head.enabled)"


def region_prompt(config, prompt: str | None) -> str | None:
  """The prompt text of location-conditioned captioning: `prompt`, else the region tasks' prompt
  for a model trained on regions (VG / RefCOCO), else None (the captioning prompt)."""
  if prompt is not None:
    return prompt
  return REGION_PROMPT if config.data.get("task", "ln") in ("vg", "refcoco") else None


def locate_prompt(config, query: str, prompt: str | None) -> str | None:
  """The prompt text of referring localisation: `prompt`, else [prefix] + the expression for a
  model trained on RefCOCO "loc" (its training prompt, `data/tasks_refcoco.py`), else None."""
  if prompt is not None:
    return prompt
  d = config.data
  if d.get("task", "ln") == "refcoco" and d.get("refcoco_kind", "loc") == "loc":
    return d.get("refcoco_prompt_prefix", "") + query.strip()
  return None


def check_segmentation(network) -> None:
  if network.mask_decoder is None or network.segment_box != "eos":
    raise ValueError("locate(mask=True) needs a network with a mask decoder prompted by the box "
                     "at EOS; this checkpoint has "
                     + ("no mask decoder" if network.mask_decoder is None else
                        f"segment_box={network.segment_box!r}")
                     + f". Train one with {_SEG_CONFIG}.")


def check_dense(network) -> None:
  if network.proposal_head is None:
    raise ValueError("dense_caption needs a network with a proposal head; this checkpoint has "
                     f"none. Train one with {_DENSE_CONFIG}.")


# -- compiled programs ---------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("network",))
def _segment(network, params, batch):
  """(points float32[1, 1, T, K, 2], mask logits float32[1, 1, S, S]) of a teacher-forced pass."""
  from pixel_llm import mask_losses
  keys = ("prompt_boxes", "prompt_text", "image_mask")
  out, aux = network.apply({"params": params}, batch["image"], batch["decoder_input_tokens"],
                           **{k: batch[k] for k in keys})
  b, r, h, w = aux["masks"].shape
  s = batch["image"].shape[1]
  logits = mask_losses.upsample_logits(aux["masks"].reshape(b * r, 1, h, w), (s, s))
  return out["points"], logits.reshape(b, r, s, s)


@functools.partial(jax.jit, static_argnames=("network", "max_decode_len", "num_boxes",
                                             "iou_threshold"))
def _dense(network, params, batch, *, max_decode_len, num_boxes, iou_threshold):
  from pixel_llm.model import PixelLLMModel
  return PixelLLMModel(network).dense_caption_batch(
      params, batch, max_decode_len=max_decode_len, num_boxes=num_boxes,
      iou_threshold=iou_threshold)


def _batch(im, text: np.ndarray) -> dict[str, np.ndarray]:
  """One preprocessed image (`api._Image`) and its prompt text int32[C] as a batch of one."""
  return {"image": im.pixels[None].astype(np.float32) / 255.0, "image_mask": im.mask[None],
          "prompt_text": text[None, None]}


# -- tasks ---------------------------------------------------------------------------------------
def mask_to_original(logits: np.ndarray, im) -> np.ndarray:
  """Mask logits float[S, S] of the padded square -> bool[H, W] of the original image: the valid
  (unpadded) region is cropped and the logits resized bilinearly before thresholding at 0, so the
  mask's edge is placed at sub-pixel precision of the model's grid."""
  from PIL import Image
  valid = np.ascontiguousarray(np.asarray(logits, np.float32)[:im.nh, :im.nw])
  resized = Image.fromarray(valid).resize((im.w, im.h), Image.BILINEAR)
  return np.asarray(resized) > 0


def locate_with_mask(model, im, ids: list[int], prompt: str | None) -> dict[str, Any]:
  """Referring segmentation of one image: {"box": [x0, y0, x1, y1] pixels (the box at EOS, the
  one `locate` returns, which prompted SAM), "mask": bool[H, W]}."""
  check_segmentation(model.network)
  t = int(model.config.input.max_target_len)
  tokens = np.zeros((1, 1, t), np.int32)
  tokens[0, 0, 1:len(ids) + 1] = ids
  batch = dict(_batch(im, model.prompt_tokens(prompt)), decoder_input_tokens=tokens,
               prompt_boxes=np.array([[[0.0, 0.0, 1.0, 1.0]]], np.float32))
  points, logits = _segment(model.network, model.params, batch)
  box = model._location(np.asarray(points)[0, 0, len(ids)], im)["box"]
  return {"box": box, "mask": mask_to_original(np.asarray(logits)[0, 0], im)}


def dense_caption(model, im, *, max_boxes: int, min_score: float, iou_threshold: float,
                  max_len: int | None, prompt: str | None) -> list[dict[str, Any]]:
  """Dense captioning of one image: [{"box": [x0, y0, x1, y1] pixels, "score", "text"}], best
  first. Proposals that lie in the padding (empty once clipped to the image) are dropped."""
  from pixel_llm import visualize
  check_dense(model.network)
  if not isinstance(max_boxes, (int, np.integer)) or max_boxes < 1:
    raise ValueError(f"max_boxes must be a positive integer, got {max_boxes!r}.")
  if not np.isfinite(min_score):
    raise ValueError(f"min_score must be a finite number, got {min_score!r}.")
  max_len = int(max_len or model.config.input.max_target_len)
  pred = _dense(model.network, model.params,
                _batch(im, model.prompt_tokens(region_prompt(model.config, prompt))),
                max_decode_len=max_len, num_boxes=int(max_boxes),
                iou_threshold=float(iou_threshold))
  pred = {k: np.asarray(v)[0] for k, v in pred.items()}
  results = []
  for n in np.argsort(-pred["scores"], kind="stable"):
    score = float(pred["scores"][n])
    if not pred["valid"][n] or score < min_score:
      continue
    corners = im.to_pixels(pred["boxes"][n].reshape(2, 2))
    (x0, y0), (x1, y1) = corners.min(0), corners.max(0)
    if x1 <= x0 or y1 <= y0:
      continue
    words, _ = visualize.words_from_tokens(model.vocab, pred["tokens"][n])
    results.append({"box": [float(x0), float(y0), float(x1), float(y1)], "score": score,
                    "text": " ".join(words)})
  return results
