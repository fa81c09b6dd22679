"""METEOR 1.5 (Denkowski & Lavie, 2014) through the jar bundled with pycocoevalcap.

There is no faithful pure-Python METEOR 1.5 (nltk's `meteor_score` uses other parameters and no
paraphrase table, so its numbers are not comparable; see users_formats_metrics.md §3.1). Like the COCO
toolkit, this runs `java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm` and talks to it line by
line:

  SCORE ||| ref_1 ||| ... ||| ref_m ||| hypothesis   ->  one line of sufficient statistics
  EVAL ||| stats_1 ||| ... ||| stats_n               ->  n per-segment scores, then the corpus score

The corpus score (`meteor`) is computed by the jar from the *summed* statistics, as pycocoevalcap
does: it is not the mean of sentence scores. DenseCap's mAP uses per-sentence scores instead
(`MeteorScorer.score`), as Johnson et al.'s `meteor_bridge.py` does.

Starting the JVM and loading the paraphrase table takes ~10 s, so `MeteorScorer` keeps one process
open for many calls; use it as a context manager (or call `close`).
"""
import importlib.util
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Mapping, Optional, Sequence

from pixel_llm.metrics.bleu import prepare_captions

JAR_NAME = "meteor-1.5.jar"


class MeteorUnavailableError(RuntimeError):
  """Java or the METEOR jar (shipped with pycocoevalcap) cannot be found or started."""


def find_meteor_jar() -> str:
  """Path of pycocoevalcap's meteor-1.5.jar; raises MeteorUnavailableError when it is missing."""
  spec = importlib.util.find_spec("pycocoevalcap")
  # pycocoevalcap is a namespace package (no __init__.py), so look at its search locations.
  dirs = list(spec.submodule_search_locations or []) if spec else []
  for d in dirs:
    path = os.path.join(d, "meteor", JAR_NAME)
    if os.path.isfile(path):
      return path
  raise MeteorUnavailableError(
      f"{JAR_NAME} not found: install pycocoevalcap (`pip install pycocoevalcap`, it bundles the "
      f"jar and data/paraphrase-en.gz) or pass jar_path= "
      f"(searched: {dirs or 'pycocoevalcap is not installed'})")


def _clean(text: str) -> str:
  # '|||' separates fields and a newline ends a request: either would desynchronise the protocol.
  return " ".join(text.replace("|||", "").split("\n")).replace("  ", " ")


class MeteorScorer:
  """One METEOR 1.5 JVM kept open for many (candidate, references) pairs.

  Usage:
    with MeteorScorer() as scorer:
      s = scorer("a man on a horse", ["a man riding a horse", "a rider"])

  Text is passed as is (the jar's `-norm` lower-cases and tokenises); tokenise beforehand to match
  the COCO toolkit exactly. Thread-safe: one request at a time.
  """

  def __init__(self, jar_path: Optional[str] = None, java: str = "java", memory: str = "2G"):
    java_path = shutil.which(java)
    if java_path is None:
      raise MeteorUnavailableError(
          f"METEOR needs a Java runtime but `{java}` is not on PATH: install one (e.g. "
          "`apt-get install default-jre-headless`) or pass java=<the java binary>")
    jar_path = jar_path or find_meteor_jar()
    if not os.path.isfile(jar_path):
      raise MeteorUnavailableError(f"METEOR jar {jar_path!r} does not exist")
    self._lock = threading.Lock()
    self._stderr = tempfile.TemporaryFile()  # a pipe could fill up and block the JVM
    cmd = [java_path, "-jar", f"-Xmx{memory}", os.path.basename(jar_path), "-", "-", "-stdio",
           "-l", "en", "-norm"]
    # cwd = the jar's folder, where it finds data/paraphrase-en.gz.
    self._proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.abspath(jar_path)),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self._stderr)

  def _request(self, line: str, num_lines: int) -> list[str]:
    if self._proc is None:
      raise RuntimeError("MeteorScorer is closed")
    try:
      self._proc.stdin.write((line + "\n").encode("utf-8"))
      self._proc.stdin.flush()
      out = [self._proc.stdout.readline().decode("utf-8").strip() for _ in range(num_lines)]
    except BrokenPipeError:
      out = [""]
    if any(not o for o in out):
      self._stderr.seek(0)
      err = self._stderr.read().decode("utf-8", "replace")[-2000:]
      raise MeteorUnavailableError(f"the METEOR jar stopped answering; its stderr:\n{err}")
    return out

  def _stats(self, candidate: str, references: Sequence[str]) -> str:
    if isinstance(references, str) or not references:
      raise ValueError(f"METEOR needs a non-empty list of reference strings, got {references!r}")
    fields = ["SCORE"] + [_clean(r) for r in references] + [_clean(candidate)]
    return self._request(" ||| ".join(fields), 1)[0]

  def score(self, candidate: str, references: Sequence[str]) -> float:
    """Sentence-level METEOR of `candidate` against `references` (a list of strings)."""
    with self._lock:
      stats = self._stats(candidate, references)
      # One segment: the jar answers its score, then the (identical) aggregate.
      return float(self._request(f"EVAL ||| {stats}", 2)[0])

  __call__ = score

  def corpus_score(self, candidates: Sequence[str],
                   references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """(score from the summed statistics, per-sentence scores), like pycocoevalcap's compute_score.

    Shapes: candidates [n] strings, references [n] lists of strings.
    """
    if len(candidates) != len(references):
      raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
      return 0.0, []
    with self._lock:
      stats = [self._stats(c, r) for c, r in zip(candidates, references)]
      out = self._request("EVAL ||| " + " ||| ".join(stats), len(stats) + 1)
    return float(out[-1]), [float(o) for o in out[:-1]]

  def close(self):
    """Ends the JVM (idempotent)."""
    proc, self._proc = getattr(self, "_proc", None), None
    if proc is not None:
      proc.stdin.close()
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      proc.stdout.close()
      self._stderr.close()

  def __enter__(self) -> "MeteorScorer":
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  # interpreter shutdown: nothing to report to
      pass


def meteor(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
           tokenize: bool = True, scorer: Optional[MeteorScorer] = None) -> float:
  """Corpus METEOR 1.5 of one prediction per image, as pycocoevalcap's `Meteor` computes it.

  Args:
    predictions: image id -> one predicted caption (raw text).
    references: image id -> reference captions (raw text), same ids, at least one each.
    tokenize: run the COCO-style PTB tokenisation first; False for already tokenised text.
    scorer: an open `MeteorScorer` to reuse; by default one is started and closed here (~10 s).
  Returns:
    The jar's aggregate METEOR in [0, 1]; 0.0 for an empty corpus.
  Raises:
    MeteorUnavailableError: java or the jar is missing.
  """
  ids, cands, refs = prepare_captions(predictions, references, tokenize)
  if not ids:
    return 0.0
  if scorer is not None:
    return scorer.corpus_score([cands[k] for k in ids], [refs[k] for k in ids])[0]
  with MeteorScorer() as own:
    return own.corpus_score([cands[k] for k in ids], [refs[k] for k in ids])[0]
