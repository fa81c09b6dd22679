"""PixelLLM's initial parameters from the public checkpoints of its towers.

PixelLLM starts from SAM (image encoder + prompt encoder), EVA02 and Flan-T5; the prompt feature
extractor, visual projection, LoRA factors and location head are new and start from their fresh
initialisation. `convert` assembles that tree, `save` writes it as an orbax checkpoint, and
`restore_into` is how the trainer starts from one (`config.init_checkpoint`).

Each source fills the top-level modules listed in `SOURCES` through the `load_tensors` of the
model file that owns them, so the tensors stream one at a time and every missing, unexpected or
mis-shaped key is reported by name. Parameters no source fills are initialised fresh inside one
jitted `init` whose unused outputs XLA drops, so the full-size towers are never initialised.
"""
import dataclasses
import json
import os
import re
from typing import Any, Callable, Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from pixel_llm.models import build
from pixel_llm.models import checkpoint_io
from pixel_llm.models import eva02 as eva02_lib
from pixel_llm.models import sam_image_encoder as sam_lib
from pixel_llm.models import sam_mask_decoder as mask_decoder_lib
from pixel_llm.models import sam_prompt_encoder as prompt_encoder_lib
from pixel_llm.models import t5 as t5_lib

PARAMS_DIR = "params"  # inside the converted checkpoint folder
REPORT = "convert_report.json"


# Source name -> {top-level parameter collection: model file with `SKIPPED` and `load_tensors`}.
SOURCES: dict[str, Callable[[], dict[str, Any]]] = {
    "sam": lambda: {"sam_image_encoder": sam_lib, "prompt_encoder": prompt_encoder_lib,
                    "mask_decoder": mask_decoder_lib},
    "eva02": lambda: {"eva02": eva02_lib},
    "t5": lambda: {"t5": t5_lib},
}


@dataclasses.dataclass
class SourceReport:
  """What one checkpoint contributed: filled modules and every problem by name."""

  path: str
  modules: list[str] = dataclasses.field(default_factory=list)
  num_params: int = 0
  missing: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  mismatched: list[str] = dataclasses.field(default_factory=list)
  errors: list[str] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.mismatched or self.errors)


def _prune(tree: dict, prefix: str, patterns: Sequence[re.Pattern]) -> dict:
  """`tree` without the leaves whose path `prefix/...` matches one of `patterns`."""
  flat = traverse_util.flatten_dict(tree)
  keep = {k: v for k, v in flat.items()
          if not any(p.search("/".join((prefix, *k))) for p in patterns)}
  return traverse_util.unflatten_dict(keep)


def _tensors(module_lib, path: str, ignore: Sequence[str]):
  """Stream a checkpoint (file, folder or index) minus the keys this module never reads."""
  skipped = (*getattr(module_lib, "SKIPPED", ()), *ignore)
  # T5 folders may hold sharded `.bin` files with an index, which only t5 knows how to list.
  files = getattr(module_lib, "checkpoint_files", lambda p: [p])(path)
  for file in files:
    yield from checkpoint_io.iter_tensors(file, ignore=skipped)


def _load_module(name: str, module_lib, init: dict, path: str, ignore: Sequence[str],
                 eva02_img_size: int | None):
  tensors = _tensors(module_lib, path, ignore)
  if module_lib is eva02_lib:
    return eva02_lib.load_tensors(init, tensors, path, img_size=eva02_img_size)
  return module_lib.load_tensors(init, tensors, f"{path} ({name})")


def convert(config, paths: dict[str, str], *, ignore: dict[str, Sequence[str]] | None = None,
            allow_missing: Sequence[str] = (), eva02_img_size: int | None = None,
            seed: int | None = None) -> tuple[dict, dict[str, SourceReport]]:
  """The full PixelLLM parameter tree for `config`, towers from `paths`, the rest fresh.

  Args:
    config: a training config (`configs/*.py`); only `config.model` and `config.seed` are read.
    paths: source name (`SOURCES`: sam, eva02, t5) -> checkpoint path; absent sources start fresh.
    ignore: source name -> regexes of checkpoint keys to skip (e.g. a head you do not use).
    allow_missing: regexes of OUR parameter paths (`t5/encoder/...`) that a source need not
      provide; they keep their fresh initialisation.
    eva02_img_size: pretraining side of the EVA02 checkpoint when it is not the model's
      `pretrain_img_size` (its position embedding is then resampled, as timm does).
    seed: init seed for the fresh parameters (default `config.seed`, the trainer's).
  Returns:
    (params: nested dict of float32 numpy arrays, or None when any source failed,
     {source: SourceReport} naming every problem).
  """
  unknown = set(paths) - set(SOURCES)
  if unknown:
    raise ValueError(f"Unknown checkpoint sources {sorted(unknown)}; known: {sorted(SOURCES)}")
  ignore = ignore or {}
  keep_fresh = [re.compile(p) for p in allow_missing]
  shapes = nn.meta.unbox(build.abstract_params(config))
  loaded: dict[str, Any] = {}
  reports = {}
  for source, path in paths.items():
    report = reports[source] = SourceReport(path)
    if not os.path.exists(path):
      report.errors.append(f"{path}: no such file or folder")
      continue
    for name, module_lib in SOURCES[source]().items():
      if name not in shapes:
        continue  # e.g. a SAM checkpoint's mask decoder when the network has none
      init = _prune(shapes[name], name, keep_fresh)
      try:
        loaded[name] = _load_module(name, module_lib, init, path, ignore.get(source, ()),
                                    eva02_img_size)
      except checkpoint_io.CheckpointMismatchError as e:
        report.missing += [f"{name}/{m}" for m in e.missing]
        report.unexpected += list(e.unexpected)
        report.mismatched += list(e.mismatched)
        continue
      except (checkpoint_io.CheckpointError, OSError) as e:
        report.errors.append(str(e))
        break  # unreadable file: the other modules would fail the same way
      report.modules.append(name)
      report.num_params += sum(int(np.size(x)) for x in jax.tree.leaves(loaded[name]))
  if not all(r.ok for r in reports.values()):
    return None, reports
  return _fill_fresh(config, shapes, loaded, seed), reports


def _fill_fresh(config, shapes: dict, loaded: dict, seed: int | None) -> dict:
  """Merges `loaded` (numpy leaves; ShapeDtypeStructs where a loader kept the init) with a fresh
  initialisation of everything else, computed in one jit that returns only what is needed."""
  flat_shapes = traverse_util.flatten_dict(shapes)
  flat_loaded = traverse_util.flatten_dict(loaded)
  have = {k: v for k, v in flat_loaded.items() if isinstance(v, np.ndarray)}
  need = [k for k in flat_shapes if k not in have]
  if need:
    model = build.build_model(config)
    example = build.example_batch(config, 1, abstract=False)
    rng = fresh_init_rng(config.seed if seed is None else seed)

    def init_needed(rng):
      flat = traverse_util.flatten_dict(nn.meta.unbox(model.init_variables(rng, example)["params"]))
      return {"/".join(k): flat[k] for k in need}

    fresh = jax.device_get(jax.jit(init_needed)(rng))
    have.update({k: np.asarray(fresh["/".join(k)], np.float32) for k in need})
  return traverse_util.unflatten_dict({k: have[k] for k in flat_shapes})


def fresh_init_rng(seed: int) -> jax.Array:
  """The init key the trainer uses, so fresh modules match a from-scratch run of the same seed."""
  return jax.random.split(jax.random.key(seed))[0]


def save(params: dict, out_dir: str, reports: dict[str, SourceReport], config) -> str:
  """Writes `out_dir/params` (orbax) plus the per-source report and the config; returns the path.

  `params` is consumed (emptied) to keep host memory near one copy of the parameters.
  """
  out_dir = os.path.abspath(out_dir)
  target = os.path.join(out_dir, PARAMS_DIR)
  if os.path.exists(target):
    raise FileExistsError(f"{target} exists: choose a new --out or delete it.")
  os.makedirs(out_dir, exist_ok=True)
  # Orbax would copy every numpy leaf into a jax array next to it: move them one at a time
  # instead, so the host holds the parameters about once.
  flat = traverse_util.flatten_dict(params)
  params.clear()
  for k in list(flat):
    flat[k] = jax.device_put(flat.pop(k))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, traverse_util.unflatten_dict(flat))
  checkpointer.wait_until_finished()
  with open(os.path.join(out_dir, REPORT), "w") as f:
    json.dump({k: dataclasses.asdict(r) for k, r in reports.items()}, f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return target


def restore_into(params: dict, checkpoint: str, patterns: Sequence[str] = ("",)) -> tuple[dict, list]:
  """Replaces the parameters of `params` whose path matches a regex of `patterns` by the values
  stored in `checkpoint` (a `convert` output folder or its `params` subfolder, or the `state`
  item of a training checkpoint, WORKDIR/checkpoints/<step>/state).

  Only matching paths present in the checkpoint are read (partial restore). A matching path with
  another shape in the checkpoint is an error; matching paths absent from it keep their value and
  are returned, so the caller can say so. Returns (params, [paths kept from `params`]).
  """
  path = os.path.abspath(checkpoint)
  if os.path.isdir(os.path.join(path, PARAMS_DIR)):
    path = os.path.join(path, PARAMS_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"init checkpoint {checkpoint!r} not found (expected the folder "
                            "written by `python -m pixel_llm.tools.convert`).")
  checkpointer = ocp.PyTreeCheckpointer()
  stored = traverse_util.flatten_dict(checkpointer.metadata(path).item_metadata.tree)
  # A training checkpoint's `state` item (WORKDIR/checkpoints/<step>/state, e.g. stage 1 for
  # stage 2) holds the parameters under "params", beside the optimizer state.
  prefix = ("params",) if any(k[0] == "opt_state" for k in stored) else ()
  stored = {k[len(prefix):]: v for k, v in stored.items() if k[:len(prefix)] == prefix}
  regexes = [re.compile(p) for p in patterns]
  flat = traverse_util.flatten_dict(params)
  wanted, kept, mismatched = {}, [], []
  for k, v in flat.items():
    name = "/".join(k)
    if not any(r.search(name) for r in regexes):
      continue
    if k not in stored:
      kept.append(name)
    elif tuple(stored[k].shape) != tuple(np.shape(v)):
      mismatched.append(f"{name}: checkpoint {tuple(stored[k].shape)} vs model {np.shape(v)}")
    else:
      wanted[k] = jax.ShapeDtypeStruct(np.shape(v), np.float32)
  if mismatched:
    raise checkpoint_io.CheckpointMismatchError(path, mismatched=mismatched)
  if wanted:
    target = traverse_util.unflatten_dict({prefix + k: v for k, v in wanted.items()})
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, partial_restore=True,
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)))
    for k, v in traverse_util.flatten_dict(restored).items():
      k = k[len(prefix):]
      flat[k] = np.asarray(v, dtype=np.asarray(flat[k]).dtype)
  return traverse_util.unflatten_dict(flat), kept
