r"""Parameter counts of a PixelLLM config, computed with `jax.eval_shape` (nothing is allocated).

  python -m pixel_llm.tools.model_info --config=configs/ln.py --json
  python -m pixel_llm.tools.model_info --config=configs/ln.py:toy --top=15

With --json: one JSON object {component: parameter count, ..., "total", "trainable"}. Without it a
readable table, plus the largest tensors with their logical axes (the names the sharding rules use).
"""
import json
import math
import re

from absl import app
from absl import flags
from ml_collections import config_flags



def _define_flags():
  """Flags are defined only when run as a binary, so the functions below import cleanly."""
  global _CONFIG, _JSON, _TOP
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/ln.py:toy.",
                                            lock_config=True)
  _JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
  _TOP = flags.DEFINE_integer("top", 12, "How many of the largest tensors to list.")

COMPONENTS = ("sam_image_encoder", "eva02", "prompt_encoder", "prompt_extractor",
              "visual_projection", "t5", "lora", "location_head")


def flat_shapes(abstract_params) -> dict[str, tuple[tuple[int, ...], tuple]]:
  """{"a/b/kernel": (shape, logical axes)} for a boxed abstract parameter tree."""
  import flax.linen as nn
  import jax

  out = {}
  leaves = jax.tree_util.tree_flatten_with_path(
      abstract_params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]
  for path, leaf in leaves:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    axes = tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else ()
    value = leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf
    out[name] = (tuple(value.shape), axes)
  return out


def component_counts(shapes: dict, frozen_patterns) -> dict[str, int]:
  """Per-component counts; LoRA is split out of T5; `trainable` excludes frozen regexes."""
  counts = {c: 0 for c in COMPONENTS}
  total = trainable = 0
  frozen = [re.compile(p) for p in frozen_patterns]
  for name, (shape, _) in shapes.items():
    n = math.prod(shape)
    top = name.split("/")[0]
    key = "lora" if top == "t5" and "lora" in name else top
    counts[key] = counts.get(key, 0) + n
    total += n
    if not any(p.search(name) for p in frozen):
      trainable += n
  counts["total"] = total
  counts["trainable"] = trainable
  return counts


def main(argv):
  del argv
  from pixel_llm.models import build

  config = _CONFIG.value
  shapes = flat_shapes(build.abstract_params(config))
  counts = component_counts(shapes, config.frozen_params)
  if _JSON.value:
    print(json.dumps(counts))
    return
  print(f"PixelLLM parameters ({config.get('name', 'config')}; image {config.model.image_size} px)")
  for key, n in counts.items():
    print(f"  {key:<20} {n:>16,}")
  print(f"\nLargest {_TOP.value} tensors (shape, logical axes):")
  largest = sorted(shapes.items(), key=lambda kv: -math.prod(kv[1][0]))[:_TOP.value]
  for name, (shape, axes) in largest:
    print(f"  {name:<72} {str(shape):<22} {axes}")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flag_as_required("config")
  app.run(main)
