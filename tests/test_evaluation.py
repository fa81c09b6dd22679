"""The evaluator plug-ins: config.evals validation, metric names, and the files run_all writes."""
import json

import ml_collections
import pytest

from pixel_llm import evaluation
from pixel_llm import metrics


class _FakeEvaluator:
  def __init__(self, model, data, config, *, value=1.0):
    del model, data, config
    self.value = value

  def run(self, params, step, vis_dir=None):
    del params, vis_dir
    return {"score": self.value * step}, [{"image_id": "a", "prediction": "x"}]


def _config(evals):
  return ml_collections.ConfigDict({"evals": evals, "input": {"max_target_len": 8}})


def test_unknown_kind_metric_or_name_is_a_clear_error(monkeypatch):
  with pytest.raises(ValueError, match="kind = 'nope' is not an evaluator"):
    evaluation.build_evaluators(None, None, _config({"a": {"kind": "nope"}}))
  with pytest.raises(ValueError, match="Unknown caption_trace metrics \\['cidr'\\]"):
    evaluation.build_evaluators(None, None, _config({"a": {"kind": "caption_trace",
                                                           "metrics": ("cidr",)}}))
  monkeypatch.setitem(evaluation.EVALUATORS, "fake", _FakeEvaluator)
  with pytest.raises(ValueError, match="No evaluation named \\['b'\\]"):
    evaluation.build_evaluators(None, None, _config({"a": {"kind": "fake"}}), only=("b",))


def test_run_all_writes_metrics_and_predictions(tmp_path, monkeypatch):
  monkeypatch.setitem(evaluation.EVALUATORS, "fake", _FakeEvaluator)
  evaluators = evaluation.build_evaluators(
      None, None, _config({"a": {"kind": "fake"}, "b": {"kind": "fake", "value": 2.0}}))
  results = evaluation.run_all(evaluators, None, 3, out_dir=str(tmp_path))
  assert results == {"a": {"score": 3.0}, "b": {"score": 6.0}}
  assert evaluation.flat(results) == {"a/score": 3.0, "b/score": 6.0}
  assert json.loads((tmp_path / "b.json").read_text()) == {"step": 3, "score": 6.0}
  lines = (tmp_path / "a.predictions.jsonl").read_text().splitlines()
  assert [json.loads(l) for l in lines] == [{"image_id": "a", "prediction": "x"}]


def test_caption_scores_are_the_metrics_functions():
  preds = {"1": "a red ball on the grass", "2": "two dogs", "3": "a cat"}
  refs = {"1": ["a red ball on green grass", "red ball"], "2": ["two brown dogs"],
          "3": ["a small cat sits"]}
  bleu = evaluation._caption_scores("bleu", preds, refs)
  assert list(bleu) == ["bleu_1", "bleu_2", "bleu_3", "bleu_4"]
  assert list(bleu.values()) == metrics.bleu(preds, refs)
  assert evaluation._caption_scores("rouge_l", preds, refs) == {"rouge_l": metrics.rouge_l(preds, refs)}
  assert evaluation._caption_scores("cider", preds, refs) == {"cider": metrics.cider_d(preds, refs)}
  assert evaluation._caption_scores("cider", {}, {}) == {"cider": 0.0}
