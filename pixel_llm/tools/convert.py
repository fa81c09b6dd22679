r"""Converts the public SAM, EVA02 and Flan-T5 checkpoints into PixelLLM's initial parameters.

  python -m pixel_llm.tools.convert --config=configs/ln.py \
      --sam=sam_vit_h_4b8939.pth --eva02=eva02_large_patch14_224.mim_m38m/model.safetensors \
      --t5=flan-t5-xl/ --out=$PIXEL_LLM_WEIGHTS/pixel_llm_ln_init

Writes OUT/params (orbax), OUT/convert_report.json (per source: filled modules, every missing,
unexpected or mis-shaped key) and OUT/config.json. Train from it with
`--config.init_checkpoint=OUT`. Any problem in any source is printed by name and the exit status
is 1 with nothing written; `--ignore=SOURCE:REGEX` skips checkpoint keys, `--allow_missing=REGEX`
lets our parameters (paths as printed by `pixel_llm.tools.model_info`) keep their fresh init.
Tensors stream one at a time: host memory stays near the size of the result.
"""
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config, e.g. configs/ln.py.")
_SAM = flags.DEFINE_string("sam", None, "segment-anything sam_vit_*.pth or HF facebook/sam-vit-* "
                           "model.safetensors.")
_EVA02 = flags.DEFINE_string("eva02", None, "timm eva02_* model.safetensors / .pth or the "
                             "official EVA02 .pt.")
_T5 = flags.DEFINE_string("t5", None, "HF (Flan-)T5 folder, model.safetensors(.index.json) or "
                          "pytorch_model.bin(.index.json).")
_OUT = flags.DEFINE_string("out", None, "Output folder (must not hold a checkpoint yet).")
_IGNORE = flags.DEFINE_multi_string("ignore", [], "SOURCE:REGEX checkpoint keys to skip.")
_ALLOW_MISSING = flags.DEFINE_multi_string(
    "allow_missing", [], "REGEX of our parameter paths that may stay freshly initialised.")
_EVA02_IMG_SIZE = flags.DEFINE_integer(
    "eva02_img_size", None, "Pretraining side of the EVA02 checkpoint when it differs from the "
    "config's pretrain_img_size (e.g. 448): its position embedding is resampled.")
_SEED = flags.DEFINE_integer("seed", None, "Init seed of the new modules (default config.seed).")


def _parse_ignore(items: list[str]) -> dict[str, list[str]]:
  out: dict[str, list[str]] = {}
  for item in items:
    source, sep, regex = item.partition(":")
    if not sep or not regex:
      raise app.UsageError(f"--ignore={item!r}: expected SOURCE:REGEX, e.g. sam:^mask_decoder\\.")
    out.setdefault(source, []).append(regex)
  return out


def run(config, paths: dict[str, str], out: str, ignore=None, allow_missing=(),
        eva02_img_size=None, seed=None) -> int:
  """The binary's work; returns the exit status."""
  from pixel_llm.models import pretrained  # pylint: disable=import-outside-toplevel
  if not paths:
    print("No checkpoint given (--sam, --eva02, --t5): nothing to convert.", file=sys.stderr)
    return 2
  t0 = time.time()
  print(f"Converting {', '.join(f'{k}={v}' for k, v in paths.items())}", flush=True)
  params, reports = pretrained.convert(config, paths, ignore=ignore, allow_missing=allow_missing,
                                       eva02_img_size=eva02_img_size, seed=seed)
  failed = params is None
  for source, report in reports.items():
    status = "ok" if report.ok else "FAILED"
    print(f"[{source}] {status}: {report.path} -> {', '.join(report.modules) or 'nothing'} "
          f"({report.num_params:,} parameters)")
    for kind in ("errors", "missing", "unexpected", "mismatched"):
      for item in getattr(report, kind):
        print(f"  {kind[:-1] if kind.endswith('s') else kind}: {item}")
    failed |= not report.ok
  if failed:
    print("Conversion FAILED: nothing written. Fix the paths or pass --ignore / --allow_missing "
          "for what you mean to leave out.", file=sys.stderr)
    return 1
  loaded = {m for r in reports.values() for m in r.modules}
  fresh = [name for name in params if name not in loaded]
  print(f"Freshly initialised: {', '.join(fresh) or 'nothing'} (plus any LoRA factors).")
  target = pretrained.save(params, out, reports, config)
  print(f"Wrote {target} in {time.time() - t0:.0f} s. Train from it with "
        f"--config.init_checkpoint={out}")
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  paths = {name: flag.value for name, flag in (("sam", _SAM), ("eva02", _EVA02), ("t5", _T5))
           if flag.value}
  sys.exit(run(_CONFIG.value, paths, _OUT.value, ignore=_parse_ignore(_IGNORE.value),
               allow_missing=_ALLOW_MISSING.value, eva02_img_size=_EVA02_IMG_SIZE.value,
               seed=_SEED.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "out"])
  app.run(main)
