"""CIDEr-D and COCO-style tokenisation: hand-computed cases and parity with pycocoevalcap."""
import math
import random
import shutil

import pytest

from pixel_llm.metrics import PUNCTUATIONS, cider_d, cider_d_per_image, coco_tokenize, ptb_tokenize

# Plain caption-like sentences on which the pure-Python tokenizer must equal the Java PTBTokenizer.
PLAIN_SENTENCES = [
    "A man riding a wave on top of a surfboard.",
    "Two giraffes standing next to each other in a field",
    "A close up of a plate of food with broccoli, rice and meat.",
    "a black and white photo of a man's bike parked on the street.",
    "There's a dog sitting in the front seat of a car.",
    "A woman holding an umbrella in the rain...",
    "A young boy (wearing a red shirt) swinging a baseball bat.",
    "Is that a bird? It's sitting on a wire!",
    "A man in a t-shirt and jeans, standing next to a fire-hydrant.",
    "People walking down a city street at 5 p.m. on a Sunday.",
    'A sign that reads "STOP" on a pole.',
    "A street sign for St. Mark's Place and 3rd Ave.",
    "The U.S. flag waving in front of a building.",
    "A bowl of fruit: apples, bananas, and oranges.",
    "An old-fashioned clock tower; the time is 10:30.",
    "A couple of zebras grazing -- one is looking up.",
    "A bathroom with a sink, toilet & shower.",
    "In this image we can see a person standing on the road. In the background there are trees.",
    "In this image I can see a woman who is smiling and she's wearing a black color dress.",
    "the woman on the right side, with the hat",
    "Dogs' toys are scattered on the floor.",
    "A man can't believe he caught a fish!!",
    "We'll be going to the zoo; it's a sunny day.",
    "A cat that's sleeping on a couch, isn't it cute?",
    "A 1.5 liter bottle of soda and a 3.5mm jack [left].",
    "Mr. and Mrs. Smith cut their wedding cake.",
    "A black dog--with a white spot--runs.",
    "A bus that says 'Downtown' on the front.",
    "There are 3 dogs, 2 cats and 1 bird at 30,000 feet.",
    "A man wearing a hat, glasses, etc. walks down the street.",
    "Food, e.g. pizza and pasta, on the table {yum}.",
    "A young child brushing his/her teeth.",
    "THE MAN IS HOLDING A BASEBALL BAT.",
    "A  man   with extra   spaces and I cannot see, I'd say.",
    "The boy's and girl's bikes, 'em and the '90s; rock 'n' roll.",
]


# -- tokenisation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("A man's hat (red).", "a man 's hat -lrb- red -rrb-"),  # the toolkit keeps "-lrb-" (see docs)
    ("Don't stop, they're here!", "do n't stop they 're here"),
    ("Mr. Smith's U.S. flag.", "mr. smith 's u.s. flag"),
    ("1,000 people at 10:30.", "1,000 people at 10:30"),
    ("A black-and-white cat cannot sleep...", "a black-and-white cat can not sleep"),
    ("Hello!! \"Yes\" -- 'no'", "hello !! yes no"),
    ("a dog.\nA cat", "a dog a cat"),
    # Unicode quotes/dashes/ellipsis are normalised first (the jar's output, checked by hand).
    ("It\u2019s a \u201cquoted\u201d caf\u00e9 \u2014 with a dash\u2026", "it 's a quoted caf\u00e9 with a dash"),
    ("", ""),
])
def test_coco_tokenize_cases(text, expected):
  assert coco_tokenize(text) == expected


def test_ptb_tokenize_keeps_punctuation_tokens():
  toks = ptb_tokenize('He said "hi." (ok)')
  assert toks == ["he", "said", "``", "hi", ".", "''", "-lrb-", "ok", "-rrb-"]
  assert {"``", ".", "''"} <= PUNCTUATIONS and "-lrb-" not in PUNCTUATIONS


# -- CIDEr-D, hand-computed -----------------------------------------------------------------------
def test_identical_candidates_score_ten():
  # Disjoint vocabularies across images: every n-gram has df = 1, every cosine is 1, penalty 1.
  refs = {"a": ["red bus on road"], "b": ["green tree in park"], "c": ["dog eats big bone"]}
  preds = {k: v[0] for k, v in refs.items()}
  assert cider_d(preds, refs) == pytest.approx(10.0, abs=1e-12)
  # Three words: no 4-grams, so that order contributes 0 -> 7.5.
  refs3 = {"a": ["red bus now"], "b": ["green tree here"]}
  assert cider_d({k: v[0] for k, v in refs3.items()}, refs3) == pytest.approx(7.5, abs=1e-12)


def test_disjoint_and_single_image_score_zero():
  refs = {"a": ["red bus on road"], "b": ["green tree in park"]}
  assert cider_d({"a": "purple cat", "b": "yellow sun"}, refs) == 0.0
  assert cider_d({"a": ""}, {"a": ["x"]}) == 0.0
  # One image: log(N) = log(1) = 0 zeroes every weight (a known property of corpus IDF).
  assert cider_d({"a": "red bus"}, {"a": ["red bus"]}) == 0.0
  assert cider_d({}, {}) == 0.0


def test_partial_overlap_and_mean():
  # Image a: unigram cosine {a,b}.{a,c} = 1/2, no shared bigram -> 10 * 0.5 / 4 = 1.25.
  # Image b: unigram and bigram cosines 1 -> 10 * 2 / 4 = 5.
  per = cider_d_per_image({"a": "a b", "b": "x y"}, {"a": ["a c"], "b": ["x y"]})
  assert per == pytest.approx({"a": 1.25, "b": 5.0}, abs=1e-12)
  assert cider_d({"a": "a b", "b": "x y"}, {"a": ["a c"], "b": ["x y"]}) == pytest.approx(3.125)


def test_clipping():
  # Candidate "dog dog" vs ref "dog cat": weights (2w) vs (w, w); clipped dot min(2w, w) * w = w^2,
  # norms 2w and sqrt(2) w -> cosine 1 / (2 sqrt 2) (0.707 without clipping).
  per = cider_d_per_image({"a": "dog dog", "b": "zebra"}, {"a": ["dog cat"], "b": ["zebra"]})
  assert per["a"] == pytest.approx(10 / (8 * math.sqrt(2)), abs=1e-12)
  assert per["b"] == pytest.approx(2.5, abs=1e-12)


def test_length_penalty():
  # 10-word candidate containing the 4-word ref: cosines 4/(sqrt10*2), 3/(3*sqrt3), 2/(sqrt8*sqrt2),
  # 1/sqrt7, times exp(-6^2 / (2 * 6^2)).
  cand = "a b c d e f g h i j"
  per = cider_d_per_image({"a": cand, "b": "zebra"}, {"a": ["a b c d"], "b": ["zebra"]})
  cosines = [2 / math.sqrt(10), 1 / math.sqrt(3), 0.5, 1 / math.sqrt(7)]
  assert per["a"] == pytest.approx(10 * math.exp(-0.5) * sum(cosines) / 4, abs=1e-12)


def test_multiple_references_are_averaged():
  per = cider_d_per_image({"a": "a b", "b": "zebra"}, {"a": ["a b", "c d"], "b": ["zebra"]})
  assert per["a"] == pytest.approx((5.0 + 0.0) / 2, abs=1e-12)


def test_raw_text_is_tokenised():
  refs = {"a": ["A man's red hat."], "b": ["The green tree, in a park!"]}
  preds = {"a": "a man's red HAT", "b": "the green tree in a park"}
  tok_refs = {k: [coco_tokenize(r) for r in v] for k, v in refs.items()}
  tok_preds = {k: coco_tokenize(v) for k, v in preds.items()}
  assert cider_d(preds, refs) == pytest.approx(10.0)
  assert cider_d(tok_preds, tok_refs, tokenize=False) == cider_d(preds, refs)


def test_bad_inputs_raise():
  with pytest.raises(ValueError):
    cider_d({"a": "x"}, {"b": ["x"]})
  with pytest.raises(ValueError):
    cider_d({"a": "x", "b": "y"}, {"a": ["x"], "b": []})


# -- parity with pycocoevalcap --------------------------------------------------------------------
def _generated_corpus(num_images: int = 300, seed: int = 0):
  rng = random.Random(seed)
  subjects = ["a man", "A woman", "two dogs", "the cat", "a young boy", "a group of people",
              "an elephant", "a red bus", "the girl's kite", "someone"]
  verbs = ["riding", "sitting on", "standing next to", "holding", "looking at", "walking past",
           "doesn't like", "is near"]
  objects = ["a horse", "a wooden bench", "a surfboard", "the table", "a large umbrella",
             "a green field", "the street", "two bikes", "a 12-year-old's toy", "Mr. Lee's car"]
  tails = ["", ".", " in the park.", " at night!", ", smiling.", " (outside).", " on a sunny day",
           " -- again", "; it's cold.", " with 3 friends"]

  def caption():
    words = [rng.choice(subjects), rng.choice(verbs), rng.choice(objects)]
    if rng.random() < 0.3:
      words.insert(2, rng.choice(["a", "the", "very", "big"]))
    return " ".join(words) + rng.choice(tails)

  refs = {f"img{i}": [caption() for _ in range(rng.randint(1, 5))] for i in range(num_images)}
  preds = {}
  for k, rs in refs.items():
    r = rng.random()
    preds[k] = rs[0] if r < 0.1 else "" if r < 0.12 else caption()  # some exact, some empty
  return preds, refs


def test_matches_pycocoevalcap_cider():
  cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
  preds, refs = _generated_corpus()
  gts = {k: [coco_tokenize(r) for r in v] for k, v in refs.items()}
  res = {k: [coco_tokenize(v)] for k, v in preds.items()}
  theirs, theirs_per = cider_mod.Cider().compute_score(gts, res)
  ours_per = cider_d_per_image(preds, refs)
  assert abs(cider_d(preds, refs) - theirs) <= 1e-6
  assert max(abs(ours_per[k] - t) for k, t in zip(gts, theirs_per)) <= 1e-6
  assert 0.3 < theirs < 10  # a non-degenerate corpus


@pytest.mark.skipif(shutil.which("java") is None, reason="java not installed: cannot run the PTBTokenizer jar")
def test_tokenizer_matches_java_ptbtokenizer():
  ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
  captions = {str(i): [{"caption": s}] for i, s in enumerate(PLAIN_SENTENCES)}
  java = ptb.PTBTokenizer().tokenize(captions)
  mismatches = [(s, java[str(i)][0], coco_tokenize(s)) for i, s in enumerate(PLAIN_SENTENCES)
                if java[str(i)][0] != coco_tokenize(s)]
  assert not mismatches, "\n".join(f"{s!r}\n  java: {j}\n  ours: {o}" for s, j, o in mismatches)
