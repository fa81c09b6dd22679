"""BLEU, ROUGE-L, CIDEr-D and METEOR: hand-computed cases and parity with pycocoevalcap.

Both sides get the same COCO-tokenised text (pycocoevalcap's scorers take tokenised captions; our
functions tokenise with `coco_tokenize` by default), as tests/test_cider.py does.
"""
import math
import random
import shutil
import threading

import pytest

from pixel_llm.metrics import (MeteorScorer, MeteorUnavailableError, bleu, cider_d, coco_tokenize,
                               meteor, rouge_l, rouge_l_per_image)

HAS_JAVA = shutil.which("java") is not None


def _corpus(num_images: int = 300, seed: int = 1):
  """Seeded caption corpus with 1..5 references per image and edge cases mixed in."""
  rng = random.Random(seed)
  vocab = ["man", "woman", "dog", "cat", "bus", "red", "big", "small", "on", "in", "a", "the",
           "riding", "holding", "next", "to", "street", "table", "field", "kite", "two", "white"]
  punct = ["", ".", "!", ",", "?", " ...", ";"]

  def sentence(lo=1, hi=14):
    words = [rng.choice(vocab) for _ in range(rng.randint(lo, hi))]
    if rng.random() < 0.3:
      words.insert(rng.randrange(len(words)), ",")
    text = " ".join(words) + rng.choice(punct)
    return text.capitalize() if rng.random() < 0.5 else text

  refs = {f"im{i}": [sentence() for _ in range(rng.randint(1, 5))] for i in range(num_images)}
  preds = {}
  for k, rs in refs.items():
    r = rng.random()
    if r < 0.05:
      preds[k] = ""  # empty candidate
    elif r < 0.12:
      preds[k] = rs[0]  # exact copy of a reference
    elif r < 0.2:
      w = rng.choice(vocab)
      preds[k] = " ".join([w] * rng.randint(2, 6))  # repeated words (clipping)
    elif r < 0.27:
      preds[k] = "... , ; ."  # punctuation only: empty after tokenisation
    else:
      preds[k] = sentence()
  preds["im0"] = "A man's dog (red) -- on the bus."
  refs["im0"] = ["a man 's dog on the bus", "a dog"]
  return preds, refs


def _tokenised(preds, refs):
  gts = {k: [coco_tokenize(r) for r in v] for k, v in refs.items()}
  res = {k: [coco_tokenize(v)] for k, v in preds.items()}
  return gts, res


# -- hand-computed --------------------------------------------------------------------------------
def test_bleu_hand_cases():
  # Identical 4-word caption: every precision is n/n (up to the 1e-15 / 1e-9 constants), BP = 1.
  assert bleu({"a": "a b c d"}, {"a": ["a b c d"]}) == pytest.approx([1.0] * 4, abs=1e-8)
  # "a b" vs "a b c d": p1 = p2 = 1, no 3/4-grams (0 + 1e-15) / (0 + 1e-9) = 1e-6 each;
  # ratio 2/4 -> BP = exp(1 - 2) = e^-1.
  got = bleu({"a": "a b"}, {"a": ["a b c d"]})
  bp = math.exp(-1)
  assert got[0] == pytest.approx(bp, rel=1e-8) and got[1] == pytest.approx(bp, rel=1e-8)
  assert got[2] == pytest.approx(bp * (1e-6) ** (1 / 3), rel=1e-6)
  assert got[3] == pytest.approx(bp * (1e-12) ** (1 / 4), rel=1e-6)
  # "closest" ties go to the shorter reference: 3 words vs refs of 2 and 4 words -> reflen 2, no BP;
  # clipping: "x x x" vs "x y" has 1 correct unigram of 3.
  got = bleu({"a": "x x x"}, {"a": ["x y", "z w v u"]})
  assert got[0] == pytest.approx(1 / 3, rel=1e-8)
  # Corpus sums, not a mean of sentence scores: correct 1 + 2 over guess 2 + 2 -> 3/4;
  # testlen 4 vs reflen 2 + 2 -> BP 1.
  assert bleu({"a": "p q", "b": "r s"}, {"a": ["p z"], "b": ["r s"]})[0] == pytest.approx(0.75)


def test_rouge_hand_cases():
  # "a b c d" vs "a c e": LCS "a c" = 2, P = 2/4, R = 2/3,
  # F = (1 + 1.44) P R / (R + 1.44 P) = 2.44 * (1/3) / (2/3 + 0.72) = 0.5865384615...
  assert rouge_l({"x": "a b c d"}, {"x": ["a c e"]}) == pytest.approx(0.8133333333 / 1.3866666667,
                                                                      rel=1e-8)
  # P and R are maxima over references taken separately: ref1 gives P = 1 (R = 1/4), ref2 R = 1.
  per = rouge_l_per_image({"x": "a b", "y": "q"}, {"x": ["a b c d", "a"], "y": ["z"]})
  assert per["x"] == pytest.approx(2.44 / (1 + 1.44), rel=1e-12) and per["y"] == 0.0
  # The toolkit's split(" ") makes "" one empty word: empty vs empty scores 1, empty vs words 0.
  assert rouge_l({"x": ""}, {"x": [""]}) == 1.0 and rouge_l({"x": ""}, {"x": ["a"]}) == 0.0


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="different images"):
    bleu({"a": "x"}, {"b": ["x"]})
  with pytest.raises(ValueError, match="non-empty list"):
    rouge_l({"a": "x"}, {"a": "x"})
  with pytest.raises(ValueError, match="one string"):
    bleu({"a": ["x"]}, {"a": ["x"]})


# -- parity with pycocoevalcap --------------------------------------------------------------------
def test_bleu_rouge_cider_match_pycocoevalcap():
  bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
  rouge_mod = pytest.importorskip("pycocoevalcap.rouge.rouge")
  cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
  preds, refs = _corpus()
  gts, res = _tokenised(preds, refs)
  assert sum(not v[0] for v in res.values()) >= 20  # empty candidates are in the corpus

  theirs_bleu, _ = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
  ours_bleu = bleu(preds, refs)
  assert max(abs(a - b) for a, b in zip(ours_bleu, theirs_bleu)) <= 1e-6
  assert bleu({k: v[0] for k, v in res.items()}, gts, tokenize=False) == ours_bleu
  assert 0.05 < theirs_bleu[3] < theirs_bleu[0] < 0.9  # non-degenerate

  theirs_rouge, _ = rouge_mod.Rouge().compute_score(gts, res)
  assert abs(rouge_l(preds, refs) - theirs_rouge) <= 1e-6
  assert 0.1 < theirs_rouge < 0.9

  theirs_cider, _ = cider_mod.Cider().compute_score(gts, res)
  assert abs(cider_d(preds, refs) - theirs_cider) <= 1e-6


def test_meteor_missing_java_is_a_clear_error():
  with pytest.raises(MeteorUnavailableError, match="Java runtime"):
    MeteorScorer(java="no-such-java-binary")
  with pytest.raises(MeteorUnavailableError, match="does not exist"):
    MeteorScorer(java="sh", jar_path="/nonexistent/meteor-1.5.jar")  # any binary found on PATH


@pytest.mark.slow  # one JVM start: ~10 s on an idle machine, ~30 s on a loaded 2-core one
@pytest.mark.skipif(not HAS_JAVA, reason="java not installed: cannot run the METEOR 1.5 jar")
def test_meteor_matches_pycocoevalcap():
  meteor_mod = pytest.importorskip("pycocoevalcap.meteor.meteor")
  preds, refs = _corpus(num_images=20, seed=3)
  preds["im1"] = "a man riding a red bus"
  refs["im1"] = ["A man is riding on a big red bus.", "a man rides the bus"]
  gts, res = _tokenised(preds, refs)
  ids = list(gts)
  with MeteorScorer() as scorer:  # the only JVM started here (~10 s)
    ours = meteor(preds, refs, scorer=scorer)
    ours_corpus, ours_per = scorer.corpus_score([res[k][0] for k in ids], [gts[k] for k in ids])
    single = scorer(res["im1"][0], gts["im1"])
    # pycocoevalcap's wrapper logic driven against the same jar process.
    theirs_obj = meteor_mod.Meteor.__new__(meteor_mod.Meteor)
    # pylint: disable-next=protected-access
    theirs_obj.meteor_p, theirs_obj.lock = scorer._proc, threading.Lock()
    theirs, theirs_per = theirs_obj.compute_score(gts, res)
  assert abs(ours - theirs) <= 1e-6 and ours == ours_corpus
  assert max(abs(a - b) for a, b in zip(ours_per, theirs_per)) <= 1e-6
  assert single == pytest.approx(ours_per[ids.index("im1")], abs=1e-9)
  # Pinned from pycocoevalcap's own `Meteor()` (its own JVM launch) on this corpus: checks that our
  # launch flags (-l en -norm) give the toolkit's numbers.
  assert ours == pytest.approx(PINNED_METEOR, abs=1e-6)
  assert single == pytest.approx(PINNED_SINGLE, abs=1e-6)
  # Aggregated from summed statistics, not the mean of sentence scores.
  assert abs(ours - sum(ours_per) / len(ours_per)) > 1e-4
  with pytest.raises(RuntimeError, match="closed"):
    scorer("a", ["a"])


PINNED_METEOR = 0.17038503939485108  # mean of the sentence scores would be 0.18357
PINNED_SINGLE = 0.3671172948293855


def test_spice_without_corenlp_is_a_clear_error(monkeypatch, tmp_path):
  """SPICE is optional: without the user-supplied CoreNLP jars it says what to get and where."""
  from pixel_llm.metrics import SpiceUnavailableError, spice
  monkeypatch.delenv("PIXEL_LLM_CORENLP_DIR", raising=False)
  preds, refs = {"1": "a dog"}, {"1": ["a brown dog"]}
  if shutil.which("java") is not None:
    with pytest.raises(SpiceUnavailableError, match="PIXEL_LLM_CORENLP_DIR"):
      spice(preds, refs)
    with pytest.raises(SpiceUnavailableError, match="CoreNLP jars missing"):
      spice(preds, refs, corenlp_dir=str(tmp_path))
  with pytest.raises(SpiceUnavailableError, match="not found"):
    spice(preds, refs, java="no-such-java-binary")


def test_caption_attributes_scores_the_words_that_depend_on_the_image(tmp_path):
  """benchmarks/caption_attributes.py: per attribute the reference names, whether the
  prediction names the same value; attributes a reference leaves out are not counted."""
  import importlib.util
  import json
  import pathlib
  path = pathlib.Path(__file__).parent.parent / "benchmarks" / "caption_attributes.py"
  spec = importlib.util.spec_from_file_location("caption_attributes", path)
  attributes = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(attributes)
  assert attributes.named("A small Red ringed circle", ("circle", "ring")) == "circle"
  rows = [{"prediction": "a small red ring", "references": ["a small red circle"]},
          {"prediction": "a blue star", "references": ["the large blue star"]},
          {"prediction": "a red shape", "references": ["a green shape"]}]
  predictions = tmp_path / "p.jsonl"
  predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "a.json"
  assert attributes.main([f"--predictions={predictions}", f"--out={out}"]) == 0
  table = json.loads(out.read_text())["attributes"]
  assert table["colour"]["n"] == 3 and table["colour"]["accuracy"] == 2 / 3
  assert table["shape"] == {"n": 2, "accuracy": 0.5, "chance": 1 / 6}
  assert table["size"]["n"] == 2 and table["size"]["accuracy"] == 0.5
