r"""Regenerates pixel_llm/models/manifests/*.json: key names and shapes of public checkpoints.

  python -m pixel_llm.tools.make_manifests              # all
  python -m pixel_llm.tools.make_manifests flan_t5_xl   # some

The checkpoints themselves are too large to download in tests, so each manifest is built from the
reference implementation's state dict on torch's meta device (nothing is allocated) with the
published config. Tests map every manifest key through the converters onto `jax.eval_shape` of the
full-size networks. Each entry of MANIFESTS is name -> function returning the JSON object
{"format": ..., "source": ..., "tensors": {key: shape}}.
"""
import json
import os
import sys
import types
from typing import Callable

from pixel_llm.tools import make_manifests_vision

OUT_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "models", "manifests")


def _import_transformers_t5():
  # The index's torchvision is CUDA-linked; with CPU torch two of its registration modules crash
  # at import and take transformers' modeling modules with them (see tests/conftest.py).
  if "torchvision" not in sys.modules:
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
      sys.modules.setdefault(name, types.ModuleType(name))
  import transformers  # pylint: disable=import-outside-toplevel
  from transformers.models.t5 import modeling_t5  # pylint: disable=import-outside-toplevel
  return transformers, modeling_t5


def flan_t5(variant: str) -> dict:
  """google/flan-t5-{variant}: T5 v1.1 sizes, vocab 32128, gated-GELU, untied head."""
  import torch  # pylint: disable=import-outside-toplevel
  from pixel_llm.models import t5  # pylint: disable=import-outside-toplevel
  transformers, modeling_t5 = _import_transformers_t5()
  c = t5.PRESETS[variant]
  config = transformers.T5Config(
      vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, num_heads=c.num_heads,
      d_ff=c.d_ff, num_layers=c.num_layers, num_decoder_layers=c.num_decoder_layers,
      relative_attention_num_buckets=c.relative_attention_num_buckets,
      relative_attention_max_distance=c.relative_attention_max_distance,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  config.tie_word_embeddings = False  # transformers 5.x forces it True in __init__.
  with torch.device("meta"):
    model = modeling_t5.T5ForConditionalGeneration(config)
  # The state dict lists the tied aliases (encoder/decoder.embed_tokens) that the published
  # safetensors files also hold, next to shared.weight and lm_head.weight.
  tensors = {k: list(v.shape) for k, v in model.state_dict().items()}
  return {"format": "hf_safetensors", "source": t5.VANITY_NAMES[f"flan-t5-{variant}"],
          "tensors": tensors}


MANIFESTS: dict[str, Callable[[], dict]] = {
    f"flan_t5_{v}": (lambda v=v: flan_t5(v)) for v in ("small", "base", "large", "xl", "xxl")}
MANIFESTS.update(make_manifests_vision.MANIFESTS)  # SAM and EVA02


def _dumps(manifest: dict) -> str:
  """JSON with one tensor a line, so diffs of regenerated manifests stay readable."""
  head = {k: v for k, v in manifest.items() if k != "tensors"}
  lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
  rows = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest["tensors"].items()]
  return "{\n" + "\n".join(lines) + '\n  "tensors": {\n' + ",\n".join(rows) + "\n  }\n}\n"


def main(names: list[str]) -> None:
  os.makedirs(OUT_DIR, exist_ok=True)
  for name in names or sorted(MANIFESTS):
    manifest = MANIFESTS[name]()
    path = os.path.join(OUT_DIR, f"{name}.json")
    with open(path, "w") as f:
      f.write(_dumps(manifest))
    print(f"{path}: {len(manifest['tensors'])} tensors")


if __name__ == "__main__":
  main(sys.argv[1:])
