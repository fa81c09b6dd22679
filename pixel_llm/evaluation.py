"""Evaluators: the plug-ins that `pixel_llm.eval` and the trainer run on held-out data.

`config.evals` names the evaluations to run, each a dict with its `kind` (a key of `EVALUATORS`)
and options; without it every config gets `DEFAULT_EVALS`:

  config.evals = {"ln_val": {"kind": "caption_trace",
                             "metrics": ("token_accuracy", "trace_l1", "cider", "bleu", "rouge_l")}}

An evaluator's `run(params, step, vis_dir)` returns (metrics: dict[str, float], predictions: list of
per-example JSON-able dicts). `run_all` runs them all and, given an output folder, writes
`<name>.json` (the metrics and the step) and `<name>.predictions.jsonl` (one line per example) for
each; the trainer's final evaluation and the eval binary both go through it, so their numbers are
the same for the same checkpoint.

caption_trace metrics (the paper's LN captioning + trace evaluation, on the held-out split):
  token_accuracy  teacher-forced top-1 accuracy over target tokens (EOS included)
  trace_l1        teacher-forced mean |predicted - target| over the K points of every token that has
                  a trace target, in normalised image coordinates (the release's point L1)
  cider           CIDEr-D of greedy-decoded captions against the reference caption(s) of each image
  bleu            BLEU-1..4 (reported as bleu_1 .. bleu_4), rouge_l, meteor (needs Java): the COCO
                  caption toolkit's definitions (`pixel_llm.metrics`)

referring metrics (RefCOCO/+/g box protocol): precision_at_0.5 (P@1, IoU > 0.5), mean_iou; with a
mask decoder segmenting the predicted box (referring segmentation) also mask_ciou (total
intersection / total union) and mask_miou (mean per-expression IoU), masks compared on the padded
input's valid pixels; each prediction row then carries its mask_intersection / mask_union pixel
counts.

densecap metrics (Visual Genome, GRiT's test split): map (DenseCap mAP, needs Java for METEOR),
detection_map (METEOR ignored).
"""
import functools
import json
import os
from typing import Any, Callable

import jax
import numpy as np

from pixel_llm import metrics as metrics_lib
from pixel_llm import visualize
from pixel_llm.data import pipeline

DEFAULT_EVALS = {"ln_val": {"kind": "caption_trace"}}
CAPTION_METRICS = ("token_accuracy", "trace_l1", "cider")
KNOWN_METRICS = ("token_accuracy", "trace_l1", "cider", "bleu", "rouge_l", "meteor", "spice")


def _text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def _caption_scores(name: str, predictions: dict, references: dict) -> dict[str, float]:
  """One generated-text metric over the whole corpus (corpus-level, as the toolkit scores)."""
  if not predictions:
    return {name: 0.0}
  if name == "cider":
    return {"cider": metrics_lib.cider_d(predictions, references)}
  if name == "bleu":
    return {f"bleu_{n}": v for n, v in enumerate(metrics_lib.bleu(predictions, references), 1)}
  if name == "rouge_l":
    return {"rouge_l": metrics_lib.rouge_l(predictions, references)}
  if name == "meteor":
    return {"meteor": metrics_lib.meteor(predictions, references)}
  if name == "spice":  # needs the CoreNLP jars ($PIXEL_LLM_CORENLP_DIR)
    return {"spice": metrics_lib.spice(predictions, references)}
  raise AssertionError(name)  # names are checked against KNOWN_METRICS up front


def _example_key(batch: dict, i: int, r: int, num_prompts: int) -> str:
  """A unique name per prediction: the image id, the expression id (RefCOCO: one example per
  expression) and the region index when an image has several prompts."""
  key = _text(batch["image_id"][i])
  if "expression_id" in batch:
    key += f"/e{int(np.ravel(batch['expression_id'])[i])}"
  return key + (f"/r{r}" if num_prompts > 1 else "")


def _references(batch: dict, i: int, r: int, num_prompts: int) -> list[str]:
  """Every reference of prediction (i, r): all expressions of the object where the task gives
  them (RefCOCO's `references`), else the example's caption(s)."""
  if "references" in batch:
    texts = np.ravel(batch["references"][i])
  elif num_prompts > 1:
    texts = [batch["caption"][i, r]]
  else:
    texts = np.ravel(batch["caption"][i])
  return [_text(c) for c in texts if len(c)]


class CaptionTraceEvaluator:
  """Captioning with a trace: teacher-forced accuracy and point L1, greedy captions scored against
  the references of `data.eval_batches()`."""

  def __init__(self, model, data, config, *, metrics=CAPTION_METRICS, num_visualizations: int = 4,
               max_decode_len: int | None = None, split: str = "val"):
    unknown = [m for m in metrics if m not in KNOWN_METRICS]
    if unknown:
      raise ValueError(f"Unknown caption_trace metrics {unknown}; known: {KNOWN_METRICS}.")
    self.model = model
    self.data = data
    self.metrics = tuple(metrics)
    self.max_decode_len = max_decode_len or config.input.max_target_len
    self.num_visualizations = num_visualizations
    self.split = split
    self._loss = jax.jit(lambda p, b: model.loss_fn(p, b, None, train=False)[1])
    self._predict = jax.jit(lambda p, b: model.predict_batch(p, b, max_decode_len=self.max_decode_len))

  def run(self, params, step: int, vis_dir: str | None = None) -> tuple[dict[str, float], list]:
    acc_sum = acc_n = l1_sum = l1_n = 0.0
    predictions, references, rows, shown, images = {}, {}, [], 0, set()
    for batch in self.data.eval_batches(self.split):
      model_batch = {k: v for k, v in batch.items() if k in pipeline.MODEL_KEYS}
      m = jax.device_get(self._loss(params, model_batch))
      acc_sum += float(m["token_accuracy"]) * float(m["num_text_tokens"])
      acc_n += float(m["num_text_tokens"])
      l1_sum += float(m["point_loss"]) * float(m["num_point_tokens"])
      l1_n += float(m["num_point_tokens"])
      pred = jax.device_get(self._predict(params, model_batch))
      tokens, points = pred["tokens"], pred["points"]  # [B, R, L], [B, R, L, K, 2]
      weights = np.asarray(batch.get("caption_weights", np.ones(tokens.shape[:2])))
      for i, image_id in enumerate(batch["image_id"]):
        images.add(_text(image_id))
        for r in range(tokens.shape[1]):
          if tokens.shape[1] > 1 and weights[i, r] <= 0:  # a padding region
            continue
          key = _example_key(batch, i, r, tokens.shape[1])
          words, word_points = visualize.words_from_tokens(self.data.vocab, tokens[i, r],
                                                            points[i, r])
          predictions[key] = " ".join(words)
          references[key] = _references(batch, i, r, tokens.shape[1])
          rows.append({"image_id": _text(image_id), "key": key, "prediction": predictions[key],
                       "references": references[key],
                       "points": np.round(np.asarray(word_points, np.float64), 5).tolist()})
          if vis_dir and shown < self.num_visualizations:
            os.makedirs(vis_dir, exist_ok=True)
            visualize.save_caption_png(
                os.path.join(vis_dir, f"step{step:06d}_{key.replace('/', '_')}.png"),
                batch["image"][i], words, word_points, title=f"step {step} | {key}")
            shown += 1
    result = {}
    for name in self.metrics:
      if name == "token_accuracy":
        result[name] = acc_sum / max(acc_n, 1.0)
      elif name == "trace_l1":
        result[name] = l1_sum / max(l1_n, 1.0)
      else:
        result.update(_caption_scores(name, predictions, references))
    result["num_images"] = float(len(images))
    result["num_predictions"] = float(len(predictions))
    return result, rows


class ReferringEvaluator:
  """Referring localization (RefCOCO protocol): the expression is the teacher-forced decoder input
  (`model.locate_batch`: the box read where EOS is predicted; the release's evaluation, hence the
  paper's numbers), or with expression="generated" the decoder writes it greedily from the prompt
  and the box is read where it emits EOS (`model.locate_generated_batch`; also reports
  generated_exact_match, the fraction written back word for word), scored against `gt_boxes` of the
  eval batches (the RefCOCO tasks' extra feature) by Precision@1 at IoU > 0.5 (strict, as the
  release) and mean IoU. Boxes are compared in the padded image's normalised frame: the resize is
  uniform, so IoU equals the IoU in original pixels. Corners are ordered before scoring."""

  def __init__(self, model, data, config, *, iou_threshold: float = 0.5, split: str = "val",
               expression: str = "teacher_forced"):
    if expression not in ("teacher_forced", "generated"):
      raise ValueError(f"expression must be 'teacher_forced' or 'generated', got {expression!r}.")
    self.data = data
    self.split = split
    self.iou_threshold = iou_threshold
    if expression == "generated":
      self._locate = jax.jit(functools.partial(model.locate_generated_batch,
                                               max_decode_len=int(config.input.max_target_len)))
    else:
      self._locate = jax.jit(lambda p, b: {"points": model.locate_batch(p, b)})
    network = model.network
    # Masks come from the teacher-forced box (segment_batch), so only that mode scores them.
    self.segment = (network.mask_decoder is not None and network.segment_box == "eos"
                    and expression == "teacher_forced")
    self._segment = jax.jit(model.segment_batch) if self.segment else None

  def run(self, params, step: int, vis_dir: str | None = None) -> tuple[dict[str, float], list]:
    del step, vis_dir
    predicted, truth, rows, pred_masks, gt_masks, generated_ok = [], [], [], [], [], []
    for batch in self.data.eval_batches(self.split):
      if "gt_boxes" not in batch:
        raise ValueError("The referring evaluator needs eval batches with gt_boxes (a RefCOCO "
                         "task: config.data.task='refcoco').")
      model_batch = {k: v for k, v in batch.items() if k in pipeline.MODEL_KEYS}
      located = jax.device_get(self._locate(params, model_batch))
      points = np.asarray(located["points"])[:, 0]  # [B, K, 2]
      if points.shape[1] != 2:
        raise ValueError(f"Referring boxes need a 2-point location head, not K={points.shape[1]}.")
      boxes = np.concatenate([points.min(1), points.max(1)], -1)  # [B, 4] x0 y0 x1 y1
      gt = np.asarray(batch["gt_boxes"])[:, 0]
      pixels = {}  # example -> (|P & G|, |P | G|) of its mask, for the rows
      if self.segment:
        masks = np.asarray(jax.device_get(self._segment(params, model_batch))["masks"])[:, 0]
        valid = np.asarray(batch["image_mask"], bool)
        for i in np.flatnonzero(np.asarray(batch["mask_weights"])[:, 0] > 0):
          pred_masks.append(masks[i] & valid[i])
          gt_masks.append(np.asarray(batch["masks"])[i, 0] > 0)
          pixels[i] = (int(np.sum(pred_masks[-1] & gt_masks[-1])),
                       int(np.sum(pred_masks[-1] | gt_masks[-1])))
      for i in range(len(boxes)):
        predicted.append(boxes[i])
        truth.append(gt[i])
        rows.append({"image_id": _text(batch["image_id"][i]),
                     "expression": _text(np.ravel(batch["caption"][i])[0]),
                     "box": np.round(boxes[i].astype(np.float64), 5).tolist(),
                     "gt_box": np.round(gt[i].astype(np.float64), 5).tolist()})
        if i in pixels:  # lets cIoU be split by whether the box was right (referring_binding)
          rows[-1]["mask_intersection"], rows[-1]["mask_union"] = pixels[i]
        if "tokens" in located:
          words, _ = visualize.words_from_tokens(self.data.vocab, located["tokens"][i, 0])
          rows[-1]["generated"] = " ".join(words)
          generated_ok.append(words == rows[-1]["expression"].split())
    if not predicted:
      return {"precision_at_0.5": 0.0, "mean_iou": 0.0, "num_expressions": 0.0}, rows
    predicted, truth = np.stack(predicted), np.stack(truth)
    ious = metrics_lib.paired_box_iou(predicted, truth)
    for row, iou in zip(rows, ious):
      row["iou"] = round(float(iou), 5)
    result = {f"precision_at_{self.iou_threshold:g}": metrics_lib.box_precision_at(
                  predicted, truth, iou=self.iou_threshold),
              "mean_iou": float(np.mean(ious)), "num_expressions": float(len(ious))}
    if generated_ok:  # how often the decoder wrote the query back word for word
      result["generated_exact_match"] = float(np.mean(generated_ok))
    if self.segment:
      result.update(mask_ciou=metrics_lib.mask_ciou(pred_masks, gt_masks) if gt_masks else 0.0,
                    mask_miou=metrics_lib.mask_miou(pred_masks, gt_masks) if gt_masks else 0.0,
                    num_masks=float(len(gt_masks)))
    return result, rows


class DenseCaptionEvaluator:
  """Dense object captioning (DenseCap / GRiT protocol): the proposal head's top `num_boxes` boxes
  per image, each captioned greedily (`model.dense_caption_batch`), scored against the image's
  regions in the eval batches (prompt_boxes with caption_weights > 0, their captions) by
  `metrics.densecap_map`: GT merged at IoU 0.7, AP over IoU x METEOR thresholds ("map", needs Java
  unless meteor=False) and detection-only AP ("detection_map"). The GT is the R regions per image
  the task delivers (`config.input.num_prompts`), as the release pads/truncates its GT."""

  def __init__(self, model, data, config, *, split: str = "val", num_boxes: int = 100,
               iou_threshold: float = 0.9, meteor: bool = True,
               max_decode_len: int | None = None):
    self.data = data
    self.split = split
    self.meteor = meteor
    dense = functools.partial(model.dense_caption_batch,
                              max_decode_len=max_decode_len or config.input.max_target_len,
                              num_boxes=num_boxes, iou_threshold=iou_threshold)
    self._dense = jax.jit(dense)

  def run(self, params, step: int, vis_dir: str | None = None) -> tuple[dict[str, float], list]:
    del step, vis_dir
    predictions, truths, rows = {}, {}, []
    for batch in self.data.eval_batches(self.split):
      model_batch = {k: v for k, v in batch.items() if k in pipeline.MODEL_KEYS}
      out = jax.device_get(self._dense(params, model_batch))
      weights = np.asarray(batch["caption_weights"])
      for i, image_id in enumerate(batch["image_id"]):
        key = _text(image_id)
        real = weights[i] > 0
        truths[key] = {"boxes": np.asarray(batch["prompt_boxes"][i])[real],
                       "captions": [_text(c) for c in np.asarray(batch["caption"][i])[real]]}
        keep = np.flatnonzero(out["valid"][i])
        captions = [" ".join(visualize.words_from_tokens(self.data.vocab, out["tokens"][i, k],
                                                         out["points"][i, k])[0]) for k in keep]
        predictions[key] = {"boxes": out["boxes"][i, keep], "scores": out["scores"][i, keep],
                            "captions": captions}
        rows.append({"image_id": key, "boxes": np.round(out["boxes"][i, keep].astype(
            np.float64), 5).tolist(), "scores": np.round(out["scores"][i, keep].astype(
                np.float64), 5).tolist(), "captions": captions,
                     "gt_boxes": np.round(truths[key]["boxes"].astype(np.float64), 5).tolist(),
                     "gt_captions": truths[key]["captions"]})
    kwargs = {} if self.meteor else {"meteor_thresholds": ()}
    scores = metrics_lib.densecap_map(predictions, truths, **kwargs)
    result = {"detection_map": float(scores["detection_map"]),
              "num_gt": float(scores["num_gt"]), "num_predictions": float(scores["num_predictions"])}
    if self.meteor:
      result["map"] = float(scores["map"])
    return result, rows


EVALUATORS: dict[str, Callable[..., Any]] = {"caption_trace": CaptionTraceEvaluator,
                                             "referring": ReferringEvaluator,
                                             "densecap": DenseCaptionEvaluator}


def build_evaluators(model, data, config, only: tuple[str, ...] = ()) -> dict[str, Any]:
  """{name: evaluator} from `config.evals` (default `DEFAULT_EVALS`); `only` picks some names."""
  specs = {k: dict(v) for k, v in dict(config.get("evals", None) or DEFAULT_EVALS).items()}
  unknown = [n for n in only if n not in specs]
  if unknown:
    raise ValueError(f"No evaluation named {unknown} in config.evals (it has {sorted(specs)}).")
  evaluators = {}
  for name, spec in specs.items():
    if only and name not in only:
      continue
    kind = spec.pop("kind", "caption_trace")
    if kind not in EVALUATORS:
      raise ValueError(f"config.evals.{name}.kind = {kind!r} is not an evaluator; known: "
                       f"{sorted(EVALUATORS)}.")
    evaluators[name] = EVALUATORS[kind](model, data, config, **spec)
  return evaluators


def run_all(evaluators: dict, params, step: int, *, out_dir: str | None = None,
            vis_dir: str | None = None) -> dict[str, dict[str, float]]:
  """Runs every evaluator; writes `<out_dir>/<name>.json` and `.predictions.jsonl` if given."""
  results = {}
  for name, evaluator in evaluators.items():
    result, rows = evaluator.run(params, step, vis_dir)
    results[name] = result
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
      with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"step": step, **result}, f, indent=2)
      with open(os.path.join(out_dir, f"{name}.predictions.jsonl"), "w") as f:
        for row in rows:
          f.write(json.dumps(row) + "\n")
  return results


def flat(results: dict[str, dict[str, float]]) -> dict[str, float]:
  """{"name/metric": value}, for TensorBoard and the console."""
  return {f"{name}/{k}": v for name, r in results.items() for k, v in r.items()}
