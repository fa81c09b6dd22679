"""Captioning-with-trace evaluation on held-out images (used by the trainer; later by pixel_llm.eval).

Metrics:
  token_accuracy  teacher-forced top-1 accuracy over target tokens (EOS included)
  trace_l1        teacher-forced mean |predicted - target| over the K points of every token that has
                  a trace target, in normalised image coordinates (the release's point L1)
  cider           CIDEr-D of greedy-decoded captions against the reference caption(s) of each image
"""
import os

import jax
import numpy as np

from pixel_llm import metrics
from pixel_llm import visualize
from pixel_llm.data import pipeline


class Evaluator:
  """Runs the captioning-with-trace evaluation over `data.eval_batches()`."""

  def __init__(self, model, data, config, num_visualizations: int = 4):
    self.model = model
    self.data = data
    self.max_decode_len = config.input.max_target_len
    self.num_visualizations = num_visualizations
    self._loss = jax.jit(lambda p, b: model.loss_fn(p, b, None, train=False)[1])
    self._predict = jax.jit(lambda p, b: model.predict_batch(p, b, max_decode_len=self.max_decode_len))

  def run(self, params, step: int, vis_dir: str | None = None) -> dict[str, float]:
    acc_sum = acc_n = l1_sum = l1_n = 0.0
    predictions, references, shown = {}, {}, 0
    for batch in self.data.eval_batches():
      model_batch = {k: v for k, v in batch.items() if k in pipeline.MODEL_KEYS}
      m = jax.device_get(self._loss(params, model_batch))
      acc_sum += float(m["token_accuracy"]) * float(m["num_text_tokens"])
      acc_n += float(m["num_text_tokens"])
      l1_sum += float(m["point_loss"]) * float(m["num_point_tokens"])
      l1_n += float(m["num_point_tokens"])
      pred = jax.device_get(self._predict(params, model_batch))
      for i, image_id in enumerate(batch["image_id"]):
        key = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
        words, word_points = visualize.words_from_tokens(self.data.vocab, pred["tokens"][i, 0],
                                                          pred["points"][i, 0])
        predictions[key] = " ".join(words)
        references[key] = [c.decode() if isinstance(c, bytes) else str(c)
                           for c in np.ravel(batch["caption"][i]) if len(c)]
        if vis_dir and shown < self.num_visualizations:
          os.makedirs(vis_dir, exist_ok=True)
          visualize.save_caption_png(os.path.join(vis_dir, f"step{step:06d}_{key}.png"),
                                     batch["image"][i], words, word_points,
                                     title=f"step {step} | image {key}")
          shown += 1
    return {
        "token_accuracy": acc_sum / max(acc_n, 1.0),
        "trace_l1": l1_sum / max(l1_n, 1.0),
        "cider": metrics.cider_d(predictions, references) if predictions else 0.0,
        "num_images": float(len(predictions)),
    }
