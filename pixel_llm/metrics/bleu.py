"""Corpus BLEU-1..4 (Papineni et al., ACL 2002), as the COCO caption toolkit computes it.

pycocoevalcap's `Bleu` (David Chiang's `bleu_scorer`, option "closest") sums statistics over the whole
corpus before taking any ratio:

  correct_n = sum_i sum_{n-grams w of c_i} min(count_{c_i}(w), max_j count_{s_ij}(w))   (clipped)
  guess_n   = sum_i max(0, len(c_i) - n + 1)
  testlen   = sum_i len(c_i),   reflen = sum_i len(reference of image i closest in length to c_i)
  BLEU-N    = (prod_{n<=N} (correct_n + tiny) / (guess_n + small)) ** (1 / N) * BP
  BP        = exp(1 - 1 / ratio) if ratio < 1 else 1,  ratio = (testlen + tiny) / (reflen + small)

with tiny = 1e-15 and small = 1e-9 (so an order with no n-gram at all scores ~0, never a division by
zero). "Closest" breaks length ties towards the shorter reference. Words are whitespace-split.

Text goes through `tokenize.coco_tokenize` first (pass `tokenize=False` for text that is already
tokenised). `prepare_captions` holds the input checks shared by the other caption metrics.
"""
import collections
import math
from typing import Mapping, Sequence

from pixel_llm.metrics.tokenize import coco_tokenize

NGRAM_ORDER = 4
TINY = 1e-15
SMALL = 1e-9


def prepare_captions(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                     tokenize: bool) -> tuple[list, dict[str, str], dict[str, list[str]]]:
  """Checks one prediction and >= 1 references per image; returns (ids, candidates, references).

  Returned text is tokenised by `coco_tokenize` when `tokenize` is set, else passed through.
  """
  if set(predictions) != set(references):
    missing = set(predictions) ^ set(references)
    raise ValueError(f"predictions and references cover different images, e.g. {sorted(missing)[:5]}")
  bad = [k for k, refs in references.items() if not refs or isinstance(refs, str)]
  if bad:
    raise ValueError(f"every image needs a non-empty list of reference strings; bad ids: {bad[:5]}")
  not_str = [k for k, v in predictions.items() if not isinstance(v, str)]
  if not_str:
    raise ValueError(f"each prediction must be one string (not a list); bad ids: {not_str[:5]}")
  prep = coco_tokenize if tokenize else (lambda text: text)
  ids = list(predictions)
  cands = {k: prep(predictions[k]) for k in ids}
  return ids, cands, {k: [prep(r) for r in references[k]] for k in ids}


def _ngrams(words: Sequence[str], order: int) -> collections.Counter:
  return collections.Counter(tuple(words[i:i + n]) for n in range(1, order + 1)
                             for i in range(len(words) - n + 1))


def bleu(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
         tokenize: bool = True, order: int = NGRAM_ORDER) -> list[float]:
  """Corpus BLEU-1..`order` of one prediction per image against its references.

  Args:
    predictions: image id -> one predicted caption (raw text).
    references: image id -> reference captions (raw text), same ids, at least one each.
    tokenize: run the COCO-style PTB tokenisation; False for already tokenised text.
    order: the largest n-gram order.
  Returns:
    [BLEU-1, ..., BLEU-order] in [0, 1]; all 0.0 for an empty corpus.
  """
  ids, cands, refs = prepare_captions(predictions, references, tokenize)
  if not ids:
    return [0.0] * order
  correct = [0] * order
  guess = [0] * order
  testlen = reflen = 0
  for k in ids:
    words = cands[k].split()
    max_ref_counts = collections.Counter()
    ref_lens = []
    for ref in refs[k]:
      ref_words = ref.split()
      ref_lens.append(len(ref_words))
      max_ref_counts |= _ngrams(ref_words, order)  # `|` keeps the max count per n-gram
    testlen += len(words)
    reflen += min((abs(length - len(words)), length) for length in ref_lens)[1]
    for gram, count in _ngrams(words, order).items():
      correct[len(gram) - 1] += min(count, max_ref_counts[gram])
    for n in range(1, order + 1):
      guess[n - 1] += max(0, len(words) - n + 1)

  ratio = (testlen + TINY) / (reflen + SMALL)
  brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
  scores = []
  product = 1.0
  for n in range(order):
    product *= (correct[n] + TINY) / (guess[n] + SMALL)
    scores.append(product ** (1.0 / (n + 1)) * brevity)
  return scores
