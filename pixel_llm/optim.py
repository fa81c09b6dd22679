"""Optimizer: AdamW with linear warmup + cosine decay, no weight decay on 1-D parameters, frozen
parameters selected by regex (they get no optimizer state and no update), and per-parameter
learning-rate multipliers: regex rules and layer-wise decay of one ViT tower (the dense-captioning
recipe's lower rates for the pretrained image backbone, as in GRiT / ViTDet fine-tuning).

Layer decay with rate d over a tower of L blocks: block i (0-based) gets d ** (L - i), the tower's
embeddings (everything in the tower outside `blocks_*`) d ** (L + 1); parameters outside the tower
keep 1. Multipliers scale the whole AdamW update (so weight decay too), i.e. they act as a
per-parameter learning rate."""
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


def lr_multipliers(params: Any, rules: Sequence[tuple[str, float]] = (),
                   layer_decay: float = 0.0, tower: str = "eva02") -> Any:
  """A tree of floats like `params`: the first matching `rules` regex's multiplier, times the
  layer decay (see the module docstring) for parameters under `tower`."""
  compiled = [(re.compile(pattern), float(m)) for pattern, m in rules]
  paths = param_paths(params)
  num_layers = 0
  if layer_decay:
    blocks = {int(m.group(1)) for p in jax.tree.leaves(paths)
              for m in [re.search(rf"(?:^|/){re.escape(tower)}/blocks_(\d+)/", p)] if m}
    if not blocks and any(re.search(rf"(?:^|/){re.escape(tower)}/blocks/", p)
                          for p in jax.tree.leaves(paths)):
      raise ValueError(f"layer_decay {layer_decay} gives each block of {tower} its own rate, but "
                       f"{tower}'s blocks are scanned (one stacked parameter per weight): set "
                       f"--config.model.{tower}.scan_layers=False or --config.layer_decay=0.")
    if not blocks:
      raise ValueError(f"layer_decay {layer_decay}: no parameters match {tower}/blocks_<i>/ "
                       "(is config.layer_decay_tower the right module?)")
    num_layers = max(blocks) + 1

  def multiplier(path: str) -> float:
    m = next((mult for pattern, mult in compiled if pattern.search(path)), 1.0)
    if layer_decay and re.search(rf"(?:^|/){re.escape(tower)}/", path):
      block = re.search(rf"(?:^|/){re.escape(tower)}/blocks_(\d+)/", path)
      depth = int(block.group(1)) if block else -1
      m *= layer_decay ** (num_layers - depth)
    return m

  return jax.tree.map(multiplier, paths)


def scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update by its fixed multiplier (no state)."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m if m != 1.0 else u, updates, multipliers), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def learning_rate_schedule(base: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, base, max(warmup_steps, 1), max(total_steps, 2),
                                            end_value=0.0)


def make_optimizer(params: Any, *, learning_rate: float, total_steps: int, warmup_steps: int,
                   weight_decay: float = 0.0, grad_clip_norm: float | None = 1.0,
                   frozen_patterns: Sequence[str] = (),
                   lr_rules: Sequence[tuple[str, float]] = (), layer_decay: float = 0.0,
                   layer_decay_tower: str = "eva02") -> tuple[optax.GradientTransformation,
                                                              optax.Schedule]:
  """AdamW for trainable leaves, nothing for frozen ones. Returns (optimizer, schedule)."""
  schedule = learning_rate_schedule(learning_rate, total_steps, warmup_steps)
  decay_mask = jax.tree.map(lambda x: x.ndim > 1, params)
  chain = []
  if grad_clip_norm:
    chain.append(optax.clip_by_global_norm(grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay,
                           mask=decay_mask))
  if lr_rules or layer_decay:
    chain.append(scale_by_tree(lr_multipliers(params, lr_rules, layer_decay, layer_decay_tower)))
  trainable = optax.chain(*chain)
  labels = frozen_labels(params, frozen_patterns)
  return optax.multi_transform({"train": trainable, "frozen": optax.set_to_zero()}, labels), schedule
