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
import numpy as np
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
  """A tree like `params`: the first matching `rules` regex's multiplier, times the layer decay
  (see the module docstring) for parameters under `tower`. Leaves are floats; a scanned tower's
  stacked leaves (`tower/blocks/...`, leading layer axis; `tower/blocks/blocks_<j>/...` for a
  scan over groups of p blocks, layer g * p + j) get float32 arrays [G, 1, ...] of per-layer
  rates."""
  compiled = [(re.compile(pattern), float(m)) for pattern, m in rules]
  paths = param_paths(params)
  t = re.escape(tower)
  unrolled_re = re.compile(rf"(?:^|/){t}/blocks_(\d+)/")
  stacked_re = re.compile(rf"(?:^|/){t}/blocks/(?:blocks_(\d+)/)?")
  num_layers, period = 0, 1
  if layer_decay:
    named = list(zip(jax.tree.leaves(paths), jax.tree.leaves(params)))
    blocks = {int(m.group(1)) for p, _ in named for m in [unrolled_re.search(p)] if m}
    stacked = [(m, leaf) for p, leaf in named for m in [stacked_re.search(p)] if m]
    if blocks:
      num_layers = max(blocks) + 1
    elif stacked:
      inner = {int(m.group(1)) for m, _ in stacked if m.group(1) is not None}
      period = max(inner) + 1 if inner else 1
      num_layers = stacked[0][1].shape[0] * period
    else:
      raise ValueError(f"layer_decay {layer_decay}: no parameters match {tower}/blocks_<i>/ or a "
                       f"scanned {tower}/blocks/ (is config.layer_decay_tower the right module?)")

  def multiplier(path: str, leaf: Any) -> Any:
    m = next((mult for pattern, mult in compiled if pattern.search(path)), 1.0)
    if not (layer_decay and re.search(rf"(?:^|/){t}/", path)):
      return m
    block, scanned = unrolled_re.search(path), stacked_re.search(path)
    if scanned:
      depth = np.arange(leaf.shape[0]) * period + int(scanned.group(1) or 0)
      rates = m * layer_decay ** (num_layers - depth).astype(np.float64)
      return rates.astype(np.float32).reshape((-1,) + (1,) * (len(leaf.shape) - 1))
    return m * layer_decay ** (num_layers - (int(block.group(1)) if block else -1))

  return jax.tree.map(multiplier, paths, params)


def scale_by_tree(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update by its fixed multiplier (no state)."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u if isinstance(m, float) and m == 1.0 else u * m,
                        updates, multipliers), state
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
