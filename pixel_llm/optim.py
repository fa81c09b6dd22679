"""Optimizer: AdamW with linear warmup + cosine decay, no weight decay on 1-D parameters, frozen
parameters selected by regex (they get no optimizer state and no update)."""
import re
from typing import Any, Sequence

import jax
import optax


def param_paths(params: Any) -> Any:
  """A tree of "a/b/kernel" strings with the structure of `params` (the names model_info prints)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(str(getattr(k, "key", k)) for k in path), params)


def frozen_labels(params: Any, frozen_patterns: Sequence[str]) -> Any:
  """"frozen" / "train" per parameter leaf from regexes on the parameter path."""
  compiled = [re.compile(p) for p in frozen_patterns]
  return jax.tree.map(lambda name: "frozen" if any(p.search(name) for p in compiled) else "train",
                      param_paths(params))


def learning_rate_schedule(base: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, base, max(warmup_steps, 1), max(total_steps, 2),
                                            end_value=0.0)


def make_optimizer(params: Any, *, learning_rate: float, total_steps: int, warmup_steps: int,
                   weight_decay: float = 0.0, grad_clip_norm: float | None = 1.0,
                   frozen_patterns: Sequence[str] = ()) -> tuple[optax.GradientTransformation,
                                                                optax.Schedule]:
  """AdamW for trainable leaves, nothing for frozen ones. Returns (optimizer, schedule)."""
  schedule = learning_rate_schedule(learning_rate, total_steps, warmup_steps)
  decay_mask = jax.tree.map(lambda x: x.ndim > 1, params)
  chain = []
  if grad_clip_norm:
    chain.append(optax.clip_by_global_norm(grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay,
                           mask=decay_mask))
  trainable = optax.chain(*chain)
  labels = frozen_labels(params, frozen_patterns)
  return optax.multi_transform({"train": trainable, "frozen": optax.set_to_zero()}, labels), schedule
