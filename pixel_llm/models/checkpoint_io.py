"""Reading public checkpoints tensor by tensor, safely, for the models' `load()` converters.

Formats: safetensors (single file, or sharded with `model.safetensors.index.json`), read without
torch; PyTorch `.pth` / `.bin` state dicts, read only through `torch.load(weights_only=True)` so a
pickle cannot execute code. Every converter reports all missing, unexpected and mis-shaped keys by
name in one `CheckpointMismatchError`.
"""
import json
import os
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np


class CheckpointError(ValueError):
  """A checkpoint file that cannot be read (corrupt, truncated, unsafe, unknown format)."""


class CheckpointMismatchError(ValueError):
  """Keys of a checkpoint that do not fit the network, listed by name."""

  def __init__(self, source: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
               mismatched: Sequence[str] = ()):
    self.source, self.missing = source, list(missing)
    self.unexpected, self.mismatched = list(unexpected), list(mismatched)
    parts = [f"{source} does not fit the network:"]
    for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                        ("mis-shaped", self.mismatched)):
      if keys:
        shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
        parts.append(f"  {label} ({len(keys)}): {shown}")
    super().__init__("\n".join(parts))


def _safetensors_files(path: str) -> list[str]:
  if os.path.isdir(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
      path = index
    elif os.path.exists(os.path.join(path, "model.safetensors")):
      return [os.path.join(path, "model.safetensors")]
    else:
      raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json inside.")
  if path.endswith(".index.json"):
    try:
      with open(path) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
      raise CheckpointError(f"{path}: unreadable safetensors index ({e}).") from e
    root = os.path.dirname(path)
    return [os.path.join(root, name) for name in sorted(set(weight_map.values()))]
  return [path]


def iter_tensors(path: str, ignore: Sequence[str] = ()) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (key, float32/int numpy array) one tensor at a time; keys matching `ignore` are skipped.

  `path`: a .safetensors file, a sharded index json, a folder holding either, or a .pth/.bin/.pt.
  """
  skip = [re.compile(p) for p in ignore]
  if not os.path.exists(path):
    raise FileNotFoundError(f"Checkpoint {path!r} does not exist.")
  is_torch = path.endswith((".pth", ".pt", ".bin")) and not path.endswith(".safetensors")
  if is_torch:
    for key, value in _torch_state_dict(path).items():
      if not any(p.search(key) for p in skip):
        yield key, value.float().numpy() if value.is_floating_point() else value.numpy()
    return
  from safetensors import safe_open
  for file in _safetensors_files(path):
    try:
      handle = safe_open(file, framework="np")
    except Exception as e:  # safetensors raises its own error types for truncated headers
      raise CheckpointError(f"{file}: not a readable safetensors file ({e}).") from e
    with handle as f:
      for key in f.keys():
        if any(p.search(key) for p in skip):
          continue
        try:
          value = f.get_tensor(key)
        except Exception as e:
          raise CheckpointError(f"{file}: tensor {key!r} cannot be read ({e}); the file may be "
                                "truncated.") from e
        yield key, value.astype(np.float32, copy=False) if value.dtype.kind == "f" else value


def _torch_state_dict(path: str) -> Mapping[str, Any]:
  import pickle
  import torch

  try:
    try:  # memory-map zip-format checkpoints, so the host holds about one copy of the weights
      obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise
      obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
  except pickle.UnpicklingError as e:
    raise CheckpointError(f"{path}: refused to unpickle: it holds objects other than tensors and "
                          f"plain containers (weights_only=True). Nothing was executed. ({e})") from e
  except (RuntimeError, EOFError, OSError) as e:
    raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e}).") from e
  # Training checkpoints wrap the weights (DeepSpeed "module", EVA/timm "model", "model_ema").
  for wrapper in ("state_dict", "model", "module", "model_ema"):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
      break
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}.")
  # Non-tensor entries (epoch counters, args) are not weights.
  return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def drop_aliases(tensors: Iterator[tuple[str, np.ndarray]], groups: Sequence[Sequence[str]],
                 source: str) -> Iterator[tuple[str, np.ndarray]]:
  """Passes on the first key of each group of tied names and drops the rest after checking that
  they hold the same values (files saved from tied modules carry one tensor under several names)."""
  first: dict[int, np.ndarray] = {}
  group_of = {key: i for i, group in enumerate(groups) for key in group}
  for key, value in tensors:
    i = group_of.get(key)
    if i is None:
      yield key, value
    elif i not in first:
      first[i] = value
      yield key, value
    elif first[i].shape != value.shape or not np.array_equal(first[i], value):
      raise CheckpointError(f"{source}: {key} should equal its tied alias but differs.")


def fill(init_params: Any, tensors: Iterator[tuple[str, np.ndarray]],
         convert: Callable[[str, np.ndarray], list[tuple[tuple[str, ...], np.ndarray]]],
         source: str, allow_missing: Sequence[str] = ()) -> Any:
  """Builds a parameter tree shaped like `init_params` from checkpoint tensors.

  convert(key, value) -> [(flax path tuple, array), ...]; [] marks an unexpected key; None marks a
  key consumed on purpose without filling anything (e.g. a verified alias of a tied tensor). A path
  filled twice is an error (two source keys for one parameter). Flax leaves no
  tensor fills are missing unless they match an `allow_missing` regex (then they keep their init).
  Raises CheckpointMismatchError listing every problem at once.
  """
  from flax import traverse_util

  flat_init = traverse_util.flatten_dict(init_params)
  out, unexpected, mismatched, duplicated, misfit = {}, [], [], [], set()
  for key, value in tensors:
    targets = convert(key, value)
    if targets is None:
      continue
    if not targets:
      unexpected.append(key)
      continue
    for path, array in targets:
      if path in out:
        duplicated.append(f"{key} -> {'/'.join(path)} (already filled)")
      elif path not in flat_init:
        unexpected.append(f"{key} -> {'/'.join(path)}")
      elif tuple(np.shape(flat_init[path])) != tuple(array.shape):
        mismatched.append(f"{key} {tuple(array.shape)} vs {'/'.join(path)} "
                          f"{tuple(np.shape(flat_init[path]))}")
        misfit.add(path)  # Reported as mis-shaped, not again as missing.
      else:
        out[path] = np.asarray(array, dtype=np.float32)
  keep = [re.compile(p) for p in allow_missing]
  missing = []
  for path, value in flat_init.items():
    if path not in out and path not in misfit:
      if any(p.search("/".join(path)) for p in keep):
        out[path] = value
      else:
        missing.append("/".join(path))
  if missing or unexpected or mismatched or duplicated:
    raise CheckpointMismatchError(source, missing, unexpected + duplicated, mismatched)
  return traverse_util.unflatten_dict(out)
