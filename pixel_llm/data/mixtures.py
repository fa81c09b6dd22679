"""seqio Mixtures of common-format Tasks (`tasks_common`): examples of every task batch together,
each carrying its own task mask (caption_weights, point_weights).

  register_mixture("trace_stage", [("coco_cap", 1), ("ln_common", 2)])
  register_trace_stage("trace_stage", coco_task="coco_cap", ln_task="ln_common")  # the same
  for b in tasks_common.get_batches("trace_stage", split="train", batch_size=8): ...

Examples are drawn from the tasks in proportion to the rates (tf.data `sample_from_datasets`,
seeded by get_batches' seed, so the same seed gives the same sequence). Unlike the release's
`batch_before_merge` (one dataset per device batch), a batch mixes tasks; every loss term is
normalised by its own count of valid tokens, so the per-example weights carry the task masks.
The paper's stages: trace "COCO captions : LN = 1 : 2"; referring / joint stages mix the RefCOCO
kinds, VG and captions with rates of the user's choosing.
"""
from collections.abc import Sequence

import seqio

from pixel_llm.data import tasks_common


def register_mixture(name: str, tasks_and_rates: Sequence[tuple[str, float]]) -> seqio.Mixture:
  """Registers (or replaces) a Mixture of common-format Tasks with the given (positive) rates.

  Every task must be a registered common-format Task of the same image size.
  """
  if not tasks_and_rates:
    raise ValueError(f"mixture {name!r} needs at least one task")
  sizes = {}
  for task, rate in tasks_and_rates:
    if task not in seqio.TaskRegistry.names() or not tasks_common.is_common(task):
      raise ValueError(f"mixture {name!r}: {task!r} is not a registered common-format Task "
                       "(register it with tasks_caption / tasks_refcoco / tasks_regions)")
    if not rate > 0:
      raise ValueError(f"mixture {name!r}: rate of {task!r} must be positive, not {rate}")
    sizes[task] = tasks_common.IMAGE_SIZES[task]
  if len(set(sizes.values())) > 1:
    raise ValueError(f"mixture {name!r}: tasks have different image sizes {sizes}")
  seqio.MixtureRegistry.remove(name)
  mixture = seqio.MixtureRegistry.add(name, [(t, float(r)) for t, r in tasks_and_rates])
  tasks_common.IMAGE_SIZES[name] = next(iter(sizes.values()))
  return mixture


def register_trace_stage(name: str, coco_task: str, ln_task: str,
                         rates: tuple[float, float] = (1.0, 2.0)) -> seqio.Mixture:
  """The paper's trace-pretraining mixture: COCO captions : LN = 1 : 2 (by default)."""
  return register_mixture(name, [(coco_task, rates[0]), (ln_task, rates[1])])
