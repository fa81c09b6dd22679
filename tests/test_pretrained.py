"""`python -m pixel_llm.tools.convert` and the trainer's `init_checkpoint`: public-format tiny
checkpoints of SAM (HF), EVA02 (timm) and T5 (HF) become PixelLLM's initial parameters."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import ln
from pixel_llm import train
from pixel_llm.models import build
from pixel_llm.models import eva02
from pixel_llm.models import pretrained
from pixel_llm.models import sam_image_encoder as sie
from pixel_llm.models import sam_mask_decoder as smd
from pixel_llm.models import sam_prompt_encoder as spe
from pixel_llm.models import t5
from pixel_llm.tools import convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # pylint: disable=wrong-import-position
import hf_reference  # pylint: disable=wrong-import-position  (tests/hf_reference.py)

IMAGE = 112  # SAM's 16-px and EVA02's 14-px patches both tile it (7x7 and 8x8 grids)


def _config():
  c = ln.get_config("toy")
  c.model.image_size = c.data.image_size = IMAGE
  c.model.sam = dict(width=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=2,
                     out_chans=16, patch_size=16, pretrain_img_size=IMAGE, drop_path_rate=0.0,
                     remat=False)
  c.model.eva02 = dict(width=32, depth=2, num_heads=2, patch_size=14, pretrain_img_size=IMAGE,
                       drop_path_rate=0.0, remat=False)
  c.model.prompt_encoder = dict(embed_dim=16)
  c.model.prompt_extractor.prompt_dim = 16
  c.model.t5 = dict(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                    num_decoder_layers=2, relative_attention_num_buckets=8,
                    relative_attention_max_distance=16, dropout_rate=0.0, lora_rank=4,
                    lora_scale=2.0)
  c.model.mask_decoder = dict(enabled=True, transformer_dim=16, transformer_mlp_dim=32,
                              transformer_num_heads=2)
  c.frozen_params = ()
  return c


def _save(state, path):
  save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, path)
  return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Tiny random checkpoints in the public layouts, sized like `_config()`."""
  d = tmp_path_factory.mktemp("public")
  torch.manual_seed(0)
  sam = transformers.SamModel(transformers.SamConfig(
      vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         global_attn_indexes=[1], window_size=2, image_size=IMAGE,
                         output_channels=16, mlp_dim=128, num_pos_feats=8),
      prompt_encoder_config=dict(hidden_size=16, image_size=IMAGE, patch_size=16,
                                 image_embedding_size=IMAGE // 16),
      mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_attention_heads=2)))
  eva = timm.models.eva.Eva(
      img_size=IMAGE, patch_size=14, embed_dim=32, depth=2, num_heads=2, qkv_fused=False,
      mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
      ref_feat_shape=(8, 8), num_classes=0, use_fc_norm=False)
  t5_ref = hf_reference.t5_v11(t5.T5Config(**{k: v for k, v in _config().model.t5.items()
                                              if k not in ("lora_rank", "lora_scale")}))
  with torch.no_grad():  # HF/timm inits hold many constants: make every tensor distinct
    for module in (sam, eva):
      for p in module.parameters():
        p.add_(torch.randn_like(p) * 0.1)
  t5_dir = d / "flan-t5-tiny"
  t5_ref.save_pretrained(str(t5_dir))
  return {"sam": _save(sam.state_dict(), str(d / "sam.safetensors")),
          "eva02": _save(eva.state_dict(), str(d / "eva02.safetensors")),
          "t5": str(t5_dir)}


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("converted") / "init")
  status = convert.run(_config(), sources, out)
  assert status == 0
  return out


def _zeros(config):
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                      nn.meta.unbox(build.abstract_params(config)))


def _flat(tree):
  return traverse_util.flatten_dict(tree)


def test_convert_writes_towers_from_sources_and_fresh_new_modules(sources, converted):
  config = _config()
  params, kept = pretrained.restore_into(_zeros(config), converted)
  assert not kept
  shapes = nn.meta.unbox(build.abstract_params(config))
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, shapes)
  # Each tower is exactly what its model file's own `load()` reads.
  expected = {
      "sam_image_encoder": sie.load(shapes["sam_image_encoder"], sources["sam"]),
      "prompt_encoder": spe.load(shapes["prompt_encoder"], sources["sam"]),
      "mask_decoder": smd.load(shapes["mask_decoder"], sources["sam"]),
      "eva02": eva02.load(shapes["eva02"], sources["eva02"]),
  }
  for name, tree in expected.items():
    for path, value in _flat(tree).items():
      np.testing.assert_array_equal(_flat(params[name])[path], value, err_msg=str((name, path)))
  t5_flat = _flat(params["t5"])
  for path, value in _flat(t5.load(shapes["t5"], sources["t5"])).items():
    if "lora" not in path[-1]:
      np.testing.assert_array_equal(t5_flat[path], value, err_msg=str(path))
  # New modules equal the trainer's from-scratch init of the same seed (up to float rounding:
  # XLA may fuse the init differently once the unused towers are dropped).
  model = build.build_model(config)
  example = build.example_batch(config, 1, abstract=False)
  fresh = jax.jit(lambda r: nn.meta.unbox(model.init_variables(r, example)["params"]))(
      pretrained.fresh_init_rng(config.seed))
  for name in ("prompt_extractor", "visual_projection", "location_head"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 params[name], jax.device_get(fresh[name]))
  lora = {p: v for p, v in t5_flat.items() if "lora" in p[-1]}
  assert lora and all(np.all(v == 0) for p, v in lora.items() if p[-1] == "lora_b")
  assert any(np.any(v != 0) for p, v in lora.items() if p[-1] == "lora_a")
  with open(os.path.join(converted, pretrained.REPORT)) as f:
    report = json.load(f)
  assert report["sam"]["modules"] == ["sam_image_encoder", "prompt_encoder", "mask_decoder"]
  assert report["t5"]["modules"] == ["t5"] and report["eva02"]["num_params"] > 0


def test_trainer_initial_params_honour_patterns(converted):
  config = _config()
  zeros = _zeros(config)
  stored, _ = pretrained.restore_into(zeros, converted)
  config.init_checkpoint = converted
  config.init_patterns = (r"^t5/(?!.*lora)",)
  params = train._initial_params(config, zeros)  # pylint: disable=protected-access
  for path, value in _flat(params).items():
    name = "/".join(path)
    want = _flat(stored)[path] if name.startswith("t5/") and "lora" not in name else 0.0
    np.testing.assert_array_equal(value, np.broadcast_to(want, value.shape), err_msg=name)
  # Frozen towers without weights to freeze are refused with a way out.
  config.init_checkpoint = ""
  config.frozen_params = (r"^t5/",)
  with pytest.raises(ValueError, match="init_checkpoint"):
    train._initial_params(config, zeros)  # pylint: disable=protected-access


def test_restore_into_rejects_a_checkpoint_of_another_size(converted):
  config = _config()
  config.model.location_head.hidden_dim = 64
  with pytest.raises(ValueError, match="location_head/.*checkpoint"):
    pretrained.restore_into(_zeros(config), converted)


def test_convert_reports_every_problem_and_writes_nothing(sources, tmp_path, capsys):
  config = _config()
  config.model.t5.d_ff = 48  # the T5 checkpoint now has the wrong size
  paths = dict(sources, eva02=str(tmp_path / "missing.safetensors"))
  out = str(tmp_path / "out")
  assert convert.run(config, paths, out) == 1
  printed = capsys.readouterr().out
  assert "[t5] FAILED" in printed and "DenseReluDense.wi_0.weight" in printed
  assert "[eva02] FAILED" in printed and "missing.safetensors" in printed
  assert "[sam] ok" in printed
  assert not os.path.exists(out)
  # Told to leave T5's feed-forward layers fresh, the same conversion succeeds.
  assert convert.run(config, dict(sources), out, ignore={"t5": [r"DenseReluDense"]},
                     allow_missing=[r"^t5/.*/DenseReluDense/"]) == 0
  assert os.path.isdir(os.path.join(out, pretrained.PARAMS_DIR))


def test_convert_binary_usage_errors(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "pixel_llm.tools.convert", "--config=configs/ln.py:toy",
       f"--out={tmp_path}/x", "--ignore=nocolon"], capture_output=True, text=True, env=env,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
  assert proc.returncode != 0 and "SOURCE:REGEX" in proc.stderr
