"""CIDEr-D (Vedantam et al., CVPR 2015), as the COCO caption toolkit computes it.

For every image i with candidate c_i and references S_i = {s_i1, ..., s_im}:

  g_n(x)[w]   = tf_x(w) * log(N / max(1, df(w)))       for every n-gram w of x, n = 1..4
  CIDEr-D_n   = 1/m sum_j  sum_w min(g_n(c)[w], g_n(s_j)[w]) * g_n(s_j)[w] / (|g_n(c)| |g_n(s_j)|)
                          * exp(-(l(c) - l(s_j))^2 / (2 sigma^2))
  CIDEr-D     = 10 * mean_n CIDEr-D_n

N is the number of images in the evaluated corpus and df(w) the number of images whose references
contain w, so a score depends on the whole corpus (scoring a subset gives other numbers, and a
corpus of one image always scores 0 because log(N) = 0). The "D" parts are the clipping of the
candidate's weights by the reference's (min) and the Gaussian length penalty (sigma = 6); l(x) is the
number of words. N-grams of the candidate that no reference contains get df = 1, as in the toolkit.

The toolkit counts l(x) as the number of bigrams, i.e. words - 1; that gives the same difference
whenever both sentences have a word, and an empty sentence has an all-zero vector and scores 0
either way, so words are used here.

Text goes through `tokenize.coco_tokenize` first (pass `tokenize=False` for text that is already
tokenised: lower-case, space-separated words, as the toolkit's scorer receives it).
"""
import collections
import math
from typing import Mapping, Sequence

from pixel_llm.metrics.tokenize import coco_tokenize

NGRAM_ORDER = 4
SIGMA = 6.0


def _ngram_counts(words: Sequence[str], order: int) -> collections.Counter:
  return collections.Counter(tuple(words[i:i + n]) for n in range(1, order + 1)
                             for i in range(len(words) - n + 1))


def _tfidf(counts: collections.Counter, idf, order: int):
  """Per-order {n-gram: weight} dicts and their L2 norms."""
  vecs = [{} for _ in range(order)]
  for gram, tf in counts.items():
    vecs[len(gram) - 1][gram] = tf * idf(gram)
  norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]
  return vecs, norms


def cider_d_per_image(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
                      tokenize: bool = True, sigma: float = SIGMA,
                      order: int = NGRAM_ORDER) -> dict[str, float]:
  """CIDEr-D of each image's prediction against its references, IDF over the whole corpus.

  Args:
    predictions: image id -> one predicted caption (raw text).
    references: image id -> reference captions (raw text); same ids as `predictions`, each with at
      least one reference (the toolkit rejects anything else too).
    tokenize: run the COCO-style PTB tokenisation; False for text that is already tokenised.
  Returns:
    image id -> score (on the toolkit's x10 scale, so a perfect match scores about 10 / image).
  """
  if set(predictions) != set(references):
    missing = set(predictions) ^ set(references)
    raise ValueError(f"predictions and references cover different images, e.g. {sorted(missing)[:5]}")
  empty = [k for k, refs in references.items() if not refs or isinstance(refs, str)]
  if empty:
    raise ValueError(f"every image needs a list of references; bad ids: {empty[:5]}")
  ids = list(predictions)
  if not ids:
    return {}
  prep = coco_tokenize if tokenize else (lambda text: text)
  cand = {k: prep(predictions[k]).split() for k in ids}
  refs = {k: [prep(r).split() for r in references[k]] for k in ids}
  ref_counts = {k: [_ngram_counts(r, order) for r in refs[k]] for k in ids}

  df = collections.Counter()
  for k in ids:
    df.update(set().union(*ref_counts[k]))
  log_n = math.log(len(ids))
  idf_table = {gram: log_n - math.log(count) for gram, count in df.items()}

  def idf(gram):  # n-grams in no reference count as df = 1, like the toolkit
    return idf_table.get(gram, log_n)

  scores = {}
  for k in ids:
    c_vecs, c_norms = _tfidf(_ngram_counts(cand[k], order), idf, order)
    total = 0.0
    for words, counts in zip(refs[k], ref_counts[k]):
      r_vecs, r_norms = _tfidf(counts, idf, order)
      penalty = math.exp(-((len(cand[k]) - len(words)) ** 2) / (2 * sigma ** 2))
      for n in range(order):
        if c_norms[n] == 0.0 or r_norms[n] == 0.0:
          continue  # an all-zero vector: the clipped dot product is 0 too
        dot = sum(min(v, r_vecs[n].get(g, 0.0)) * r_vecs[n].get(g, 0.0)
                  for g, v in c_vecs[n].items())
        total += dot / (c_norms[n] * r_norms[n]) * penalty
    scores[k] = 10.0 * total / order / len(refs[k])
  return scores


def cider_d(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
            tokenize: bool = True, sigma: float = SIGMA, order: int = NGRAM_ORDER) -> float:
  """Corpus CIDEr-D: the mean of `cider_d_per_image` over images (x10 scale, like the toolkit)."""
  scores = cider_d_per_image(predictions, references, tokenize=tokenize, sigma=sigma, order=order)
  return sum(scores.values()) / len(scores) if scores else 0.0
