"""ROUGE-L (Lin, 2004) with beta = 1.2, as the COCO caption toolkit computes it.

For every image i with candidate c and references s_1..s_m (pycocoevalcap `Rouge`):

  P = max_j LCS(c, s_j) / |c|,   R = max_j LCS(c, s_j) / |s_j|    (maxima taken separately)
  ROUGE-L_i = (1 + beta^2) P R / (R + beta^2 P)   if P and R are both non-zero, else 0

and the corpus score is the mean over images. LCS is the longest common subsequence of words.

Reproduced quirk: the toolkit splits on single spaces (`str.split(" ")`), so an empty caption is one
empty "word" (an empty candidate against an empty reference scores 1) and double spaces in untokenised
text make empty words. `coco_tokenize` output never has either except for the empty caption.
"""
from typing import Mapping, Sequence

from pixel_llm.metrics.bleu import prepare_captions

BETA = 1.2


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest common subsequence (O(|a||b|) time, O(|b|) memory)."""
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l_per_image(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
                      tokenize: bool = True, beta: float = BETA) -> dict[str, float]:
  """ROUGE-L of each image's prediction against its references (same arguments as `rouge_l`)."""
  ids, cands, refs = prepare_captions(predictions, references, tokenize)
  scores = {}
  for k in ids:
    cand = cands[k].split(" ")
    prec = rec = 0.0
    for ref in refs[k]:
      ref_words = ref.split(" ")
      lcs = _lcs_length(ref_words, cand)
      prec = max(prec, lcs / len(cand))
      rec = max(rec, lcs / len(ref_words))
    scores[k] = ((1 + beta ** 2) * prec * rec / (rec + beta ** 2 * prec)
                 if prec > 0 and rec > 0 else 0.0)
  return scores


def rouge_l(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
            tokenize: bool = True, beta: float = BETA) -> float:
  """Corpus ROUGE-L: the mean over images of `rouge_l_per_image`.

  Args:
    predictions: image id -> one predicted caption (raw text).
    references: image id -> reference captions (raw text), same ids, at least one each.
    tokenize: run the COCO-style PTB tokenisation; False for already tokenised text.
    beta: recall weight of the F-measure (1.2 in the toolkit).
  Returns:
    Mean ROUGE-L in [0, 1]; 0.0 for an empty corpus.
  """
  scores = rouge_l_per_image(predictions, references, tokenize=tokenize, beta=beta)
  return sum(scores.values()) / len(scores) if scores else 0.0
