"""The trainer's workdir layout, in one place for the trainer, the loaders and the vocabulary check.

  WORKDIR/config.json                   the run's full config (`pixel_llm.train`)
  WORKDIR/spiece.model                  the vocabulary it trained with
  WORKDIR/checkpoints/<step>/state/     params + optimizer state (`pixel_llm.checkpoints`)
  WORKDIR/checkpoints/<step>/data/      the input pipeline's position

Checkpoints of early versions hold one unnamed item, <step>/default/, instead of state/ and data/.
Imports nothing heavy: `pixel_llm.api` and `pixel_llm.data.vocab` use it at import time.
"""
import os

CONFIG = "config.json"
VOCAB = "spiece.model"
CHECKPOINTS = "checkpoints"
PARAMS_ITEMS = ("state", "default")  # the item holding the params, newest layout first


def locate(path: str) -> tuple[str, int | None, str | None]:
  """(workdir, step or None, item or None) of a path into the layout above.

  path: WORKDIR, WORKDIR/checkpoints, WORKDIR/checkpoints/<step> or
  WORKDIR/checkpoints/<step>/<item>; any other path is returned as the workdir.
  """
  path = os.path.abspath(path)
  step = item = None
  head, tail = os.path.split(path)
  if tail in PARAMS_ITEMS and os.path.basename(head).isdigit():
    path, item = head, tail
  head, tail = os.path.split(path)
  if tail.isdigit() and os.path.basename(head) == CHECKPOINTS:
    path, step = head, int(tail)
  if os.path.basename(path) == CHECKPOINTS and not os.path.exists(os.path.join(path, CONFIG)):
    path = os.path.dirname(path)
  return path, step, item
