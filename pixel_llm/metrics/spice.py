"""SPICE (Anderson et al., ECCV 2016) through pycocoevalcap's spice-1.0.jar; optional.

SPICE parses captions into scene graphs with Stanford CoreNLP 3.6.0, whose jars
(`stanford-corenlp-3.6.0.jar`, `stanford-corenlp-3.6.0-models.jar`, ~400 MB) pycocoevalcap
downloads from nlp.stanford.edu on first use. Offline that download fails, so here the user
supplies the two jars: `corenlp_dir=` or $PIXEL_LLM_CORENLP_DIR. Nothing is written into
site-packages: the SPICE jar, its bundled libraries and the CoreNLP jars are linked into a
temporary folder laid out as the jar's manifest expects (lib/ beside the jar), and the jar runs
there (`java -jar -Xmx8G spice-1.0.jar IN -out OUT -subset -silent`, as the toolkit).

The score is the mean over images of SPICE's "All" F-score, as pycocoevalcap reports it; text goes
through `coco_tokenize` first like the other caption metrics (`tokenize=False` to skip).
"""
import json
import os
import shutil
import subprocess
import tempfile
from typing import Mapping, Optional, Sequence

import numpy as np

from pixel_llm.metrics.bleu import prepare_captions
from pixel_llm.metrics.meteor import MeteorUnavailableError, find_meteor_jar

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


class SpiceUnavailableError(RuntimeError):
  """Java, pycocoevalcap's SPICE jar or the CoreNLP jars cannot be found."""


def _spice_dir() -> str:
  try:
    meteor_jar = find_meteor_jar()  # pycocoevalcap/meteor/meteor-1.5.jar
  except MeteorUnavailableError as e:
    raise SpiceUnavailableError(f"pycocoevalcap is needed for SPICE: {e}") from None
  path = os.path.join(os.path.dirname(os.path.dirname(meteor_jar)), "spice")
  if not os.path.isfile(os.path.join(path, "spice-1.0.jar")):
    raise SpiceUnavailableError(f"{path}/spice-1.0.jar is missing: reinstall pycocoevalcap.")
  return path


def _corenlp(corenlp_dir: Optional[str]) -> list[str]:
  folder = corenlp_dir or os.environ.get("PIXEL_LLM_CORENLP_DIR", "")
  if not folder:
    raise SpiceUnavailableError(
        "SPICE needs Stanford CoreNLP 3.6.0 (stanford-corenlp-full-2015-12-09.zip from "
        "nlp.stanford.edu): pass corenlp_dir= or set PIXEL_LLM_CORENLP_DIR to a folder with "
        f"{' and '.join(CORENLP_JARS)}.")
  paths = [os.path.join(folder, name) for name in CORENLP_JARS]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise SpiceUnavailableError(f"CoreNLP jars missing: {missing}.")
  return paths


def spice(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
          tokenize: bool = True, corenlp_dir: Optional[str] = None, java: str = "java") -> float:
  """Mean SPICE F-score of one candidate per image against its references (module docstring)."""
  ids, candidates, refs = prepare_captions(predictions, references, tokenize)
  if shutil.which(java) is None:
    raise SpiceUnavailableError(f"{java!r} not found: SPICE runs on Java 8+.")
  corenlp = _corenlp(corenlp_dir)
  source = _spice_dir()
  with tempfile.TemporaryDirectory() as tmp:
    os.symlink(os.path.join(source, "spice-1.0.jar"), os.path.join(tmp, "spice-1.0.jar"))
    os.makedirs(os.path.join(tmp, "lib"))
    for name in os.listdir(os.path.join(source, "lib")):
      os.symlink(os.path.join(source, "lib", name), os.path.join(tmp, "lib", name))
    for path in corenlp:
      os.symlink(os.path.abspath(path), os.path.join(tmp, "lib", os.path.basename(path)))
    in_path, out_path = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
    with open(in_path, "w") as f:
      json.dump([{"image_id": i, "test": candidates[i], "refs": refs[i]} for i in ids], f)
    run = subprocess.run([java, "-jar", "-Xmx8G", "spice-1.0.jar", in_path, "-cache",
                          os.path.join(tmp, "cache"), "-out", out_path, "-subset", "-silent"],
                         cwd=tmp, capture_output=True, text=True)
    if run.returncode:
      raise SpiceUnavailableError(f"SPICE failed (exit {run.returncode}): {run.stderr[-2000:]}")
    with open(out_path) as f:
      results = json.load(f)
  scores = [float(r["scores"]["All"]["f"]) if r["scores"]["All"]["f"] is not None else np.nan
            for r in results]
  return float(np.nanmean(scores)) if scores else 0.0
