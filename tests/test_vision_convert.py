"""Checkpoint converters of the image towers: SAM (image + prompt encoder) and EVA02.

- Manifests (key names and shapes of the public full-size checkpoints) map completely onto
  `jax.eval_shape` of the full-size modules: full-size loading proven without the files.
- The real `load()` on tiny reference models written in the real formats (HF safetensors,
  segment-anything / official EVA02 `.pth`) gives the reference outputs or the same parameters as
  an already output-checked layout (tests/test_sam_image_encoder.py, tests/test_eva02.py).
- Error cases: truncated file, code-executing pickle, wrong model size, missing/unexpected keys.
"""
import functools
import json
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixel_llm.models import checkpoint_io, eva02
from pixel_llm.models import sam_image_encoder as sie
from pixel_llm.models import sam_prompt_encoder as spe
from pixel_llm.models.layers import count_params

MANIFESTS = os.path.join(os.path.dirname(sie.__file__), "manifests")
SAM_ENCODER_PARAMS = {"b": 89_670_912, "l": 308_278_272, "h": 637_026_048}
# Tiny SAM: 64 px -> 4x4 grid, windows of 2, one global block.
TINY_SAM = dict(width=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=2,
                out_chans=16, pretrain_img_size=64)


def _manifest(name):
  with open(os.path.join(MANIFESTS, f"{name}.json")) as f:
    return json.load(f)


def _fake_tensors(manifest, ignore):
  """The manifest as zero-stride arrays, filtered like `checkpoint_io.iter_tensors`."""
  skip = [re.compile(p) for p in ignore]
  for key, shape in manifest["tensors"].items():
    if not any(p.search(key) for p in skip):
      yield key, np.broadcast_to(np.float32(0), shape)


def _shapes(model, *args, **kwargs):
  init = functools.partial(model.init, **kwargs)
  return flax.linen.meta.unbox(jax.eval_shape(init, jax.random.PRNGKey(0), *args)["params"])


@functools.lru_cache(maxsize=None)
def _sam_shapes(variant):
  return _shapes(sie.Model(f"vit_{variant}"), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))


def _prompt_shapes(embed_dim=256):
  return _shapes(spe.PromptEncoder(embed_dim), boxes=jnp.zeros((1, 4)), image_grid=(4, 4),
                 input_size=(64, 64))


def _assert_same_shapes(loaded, shapes):
  assert jax.tree.structure(loaded) == jax.tree.structure(shapes)
  assert jax.tree.map(np.shape, loaded) == jax.tree.map(np.shape, shapes)


# ----------------------------------------------------------------------------------------------
# Full-size manifests.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["b", "l", "h"])
@pytest.mark.parametrize("suffix", ["", "_hf"])
def test_sam_manifest_maps_onto_full_size(variant, suffix):
  manifest = _manifest(f"sam_vit_{variant}{suffix}")
  shapes = _sam_shapes(variant)
  loaded = sie.load_tensors(shapes, _fake_tensors(manifest, sie.SKIPPED), "manifest")
  _assert_same_shapes(loaded, shapes)
  assert count_params(loaded) == SAM_ENCODER_PARAMS[variant]
  # The prompt encoder part of the same file fills the prompt encoder.
  prompt = _prompt_shapes()
  loaded = spe.load_tensors(prompt, _fake_tensors(manifest, spe.SKIPPED), "manifest")
  _assert_same_shapes(loaded, prompt)
  # What both loaders skip is exactly the mask decoder.
  convert = sie.converter()
  rest = [k for k, v in _fake_tensors(manifest, ()) if not convert(k, v) and not spe.convert(k, v)]
  assert rest and all(k.startswith("mask_decoder.") for k in rest)


@pytest.mark.parametrize("name,variant", [("eva02_base_patch14_224", "B"),
                                          ("eva02_large_patch14_224", "L")])
def test_eva02_manifest_maps_onto_full_size(name, variant):
  manifest = _manifest(name)
  shapes = _shapes(eva02.Model(variant), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  loaded = eva02.load_tensors(shapes, _fake_tensors(manifest, eva02.SKIPPED), "manifest")
  _assert_same_shapes(loaded, shapes)
  assert "fc_norm.weight" in manifest["tensors"]  # timm's hub files name the final norm so


# ----------------------------------------------------------------------------------------------
# SAM: HF SamModel (safetensors) parity, segment-anything .pth layout.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_sam(tmp_path_factory):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import hf_reference  # pylint: disable=import-outside-toplevel  (tests/hf_reference.py)
  model = hf_reference.sam(vision_config=dict(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=[1],
      window_size=2, image_size=64, output_channels=16, mlp_dim=128))
  state, path = hf_reference.saved_safetensors(model, tmp_path_factory.mktemp("hf_sam"))
  return torch, model, state, path


def test_sam_hf_safetensors_parity(hf_sam):
  torch, ref, _, path = hf_sam
  model = sie.SamImageEncoder(**TINY_SAM)
  image = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  params = sie.load(_shapes(model, jnp.zeros((1, 64, 64, 3))), path)
  with torch.no_grad():
    expected = ref.vision_encoder(torch.from_numpy(image).permute(0, 3, 1, 2)).last_hidden_state
  got, _ = jax.jit(model.apply)({"params": params}, image)
  expected = expected.permute(0, 2, 3, 1).numpy()
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)


def test_sam_prompt_encoder_hf_parity(hf_sam):
  torch, ref, state, path = hf_sam
  params = spe.load(_prompt_shapes(), path)
  np.testing.assert_array_equal(params["point_embeddings_2"],
                                state["prompt_encoder.point_embed.2.weight"].numpy()[0])
  masks = np.random.RandomState(1).randn(2, 16, 12).astype(np.float32)
  encoder = spe.PromptEncoder()
  _, dense = encoder.apply({"params": params}, masks=masks, image_grid=(4, 3), input_size=(64, 48))
  with torch.no_grad():
    expected = ref.prompt_encoder.mask_embed(torch.from_numpy(masks)[:, None])
  np.testing.assert_allclose(np.asarray(dense), expected.permute(0, 2, 3, 1).numpy(), atol=1e-4)
  grid = np.array(spe.dense_grid((3, 5)))
  pe = encoder.apply({"params": params}, (3, 5), method=spe.PromptEncoder.get_dense_pe)
  with torch.no_grad():
    expected = ref.shared_image_embedding(torch.from_numpy(grid))
  np.testing.assert_allclose(np.asarray(pe), expected.numpy(), atol=1e-4)


def _to_segment_anything(state):
  """HF SamModel state dict -> segment-anything `sam_vit_*.pth` names (mask decoder dropped)."""
  renames = [(r"^vision_encoder\.", "image_encoder."), (r"\.layers\.(\d+)\.", r".blocks.\1."),
             (r"\.layer_norm([12])\.", r".norm\1."),
             (r"patch_embed\.projection", "patch_embed.proj"),
             (r"neck\.conv1", "neck.0"), (r"neck\.norm1", "neck.1"), (r"neck\.conv2", "neck.2"),
             (r"neck\.norm2", "neck.3"), (r"\.point_embed\.", ".point_embeddings."),
             (r"mask_embed\.conv1", "mask_downscaling.0"),
             (r"mask_embed\.norm1", "mask_downscaling.1"),
             (r"mask_embed\.conv2", "mask_downscaling.3"),
             (r"mask_embed\.norm2", "mask_downscaling.4"),
             (r"mask_embed\.conv3", "mask_downscaling.6"),
             (r"^shared_image_embedding\.positional_embedding",
              "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")]
  out = {}
  for key, value in state.items():
    if key.startswith("prompt_encoder.shared_embedding"):
      continue
    for pattern, repl in renames:
      key = re.sub(pattern, repl, key)
    out[key] = value
  return out


def test_sam_original_pth_layout_matches_hf(hf_sam, tmp_path):
  torch, _, state, path = hf_sam
  original = _to_segment_anything(state)
  assert "image_encoder.neck.3.weight" in original
  assert "image_encoder.blocks.1.mlp.lin2.bias" in original
  pth = str(tmp_path / "sam_vit_tiny.pth")
  torch.save(original, pth)
  shapes = _shapes(sie.SamImageEncoder(**TINY_SAM), jnp.zeros((1, 64, 64, 3)))
  jax.tree.map(np.testing.assert_array_equal, sie.load(shapes, pth), sie.load(shapes, path))
  prompt = _prompt_shapes()
  jax.tree.map(np.testing.assert_array_equal, spe.load(prompt, pth), spe.load(prompt, path))
  # A forced layout that does not match the file's keys reports them all.
  with pytest.raises(checkpoint_io.CheckpointMismatchError) as err:
    sie.load(shapes, pth, layout="hf")
  assert "image_encoder.pos_embed" in err.value.unexpected and "pos_embed" in err.value.missing


# ----------------------------------------------------------------------------------------------
# EVA02: official names, fc_norm, pos_embed from another pretraining size.
# ----------------------------------------------------------------------------------------------
def _tiny_timm_eva(img_size):
  pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  return timm.models.eva.Eva(
      img_size=img_size, patch_size=14, embed_dim=32, depth=2, num_heads=2, qkv_fused=False,
      mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
      ref_feat_shape=(4, 4), num_classes=0, use_fc_norm=False)


def test_eva02_official_names_and_fc_norm(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  state = {k: torch.randn_like(v) for k, v in _tiny_timm_eva(56).state_dict().items()}
  save_file(state, str(tmp_path / "timm.safetensors"))
  shapes = _shapes(eva02.Eva02(width=32, depth=2, num_heads=2, pretrain_img_size=56),
                   jnp.zeros((1, 56, 56, 3)))
  reference = eva02.load(shapes, str(tmp_path / "timm.safetensors"))
  assert np.array_equal(reference["blocks_1"]["attn"]["q_proj"]["kernel"],
                        state["blocks.1.attn.q_proj.weight"].numpy().T)

  renames = [(r"q_proj\.bias", "q_bias"), (r"v_proj\.bias", "v_bias"),
             (r"mlp\.norm", "mlp.ffn_ln"), (r"fc1_g", "w1"), (r"fc1_x", "w2"), (r"fc2", "w3")]
  official = {}
  for key, value in state.items():
    for pattern, repl in renames:
      key = re.sub(pattern, repl, key)
    official[key] = value
  assert "blocks.0.attn.q_bias" in official and "blocks.0.mlp.w3.weight" in official
  official.update({"mask_token": torch.zeros(1, 1, 32), "lm_head.weight": torch.zeros(8, 32),
                   "lm_head.bias": torch.zeros(8), "rope.freqs_cos": torch.zeros(16, 16)})
  torch.save(official, str(tmp_path / "eva02_official.pt"))
  official_params = eva02.load(shapes, str(tmp_path / "eva02_official.pt"))
  jax.tree.map(np.testing.assert_array_equal, official_params, reference)

  timm_hub = {re.sub(r"^norm\.", "fc_norm.", k): v for k, v in state.items()}
  timm_hub["head.weight"] = torch.zeros(5, 32)
  save_file(timm_hub, str(tmp_path / "hub.safetensors"))
  hub_params = eva02.load(shapes, str(tmp_path / "hub.safetensors"))
  jax.tree.map(np.testing.assert_array_equal, hub_params, reference)

  # A checkpoint pretrained at 84 px: a shape mismatch unless `img_size` asks for resampling.
  state84 = dict(state, pos_embed=torch.randn(1, 37, 32))
  save_file(state84, str(tmp_path / "eva84.safetensors"))
  with pytest.raises(checkpoint_io.CheckpointMismatchError) as err:
    eva02.load(shapes, str(tmp_path / "eva84.safetensors"))
  assert [m.split()[0] for m in err.value.mismatched] == ["pos_embed"]
  loaded = eva02.load(shapes, str(tmp_path / "eva84.safetensors"), img_size=84)
  expected = eva02.resample_pos_embed(state84["pos_embed"].numpy(), (4, 4), (6, 6))
  np.testing.assert_allclose(loaded["pos_embed"], expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------
def test_truncated_and_unsafe_files(hf_sam, tmp_path):
  _, _, _, path = hf_sam
  shapes = _shapes(sie.SamImageEncoder(**TINY_SAM), jnp.zeros((1, 64, 64, 3)))
  data = open(path, "rb").read()
  for cut in (40, len(data) // 2):  # inside the header, inside the tensor data
    bad = tmp_path / f"cut{cut}.safetensors"
    bad.write_bytes(data[:cut])
    with pytest.raises(checkpoint_io.CheckpointError, match=re.escape(str(bad))):
      sie.load(shapes, str(bad))

  marker = tmp_path / "executed"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  import torch  # pylint: disable=import-outside-toplevel
  evil = tmp_path / "evil.pth"
  torch.save({"image_encoder.pos_embed": Evil()}, str(evil))
  with pytest.raises(checkpoint_io.CheckpointError, match="evil.pth"):
    sie.load(shapes, str(evil))
  assert not marker.exists()


def test_wrong_size_missing_and_unexpected_keys(hf_sam, tmp_path):
  _, _, state, path = hf_sam
  wider = _shapes(sie.SamImageEncoder(**{**TINY_SAM, "width": 48}), jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(checkpoint_io.CheckpointMismatchError) as err:
    sie.load(wider, path)
  mismatched = [m.split()[0] for m in err.value.mismatched]
  assert "vision_encoder.pos_embed" in mismatched
  assert "vision_encoder.layers.1.attn.qkv.weight" in mismatched
  assert not err.value.missing and not err.value.unexpected

  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  edited = {k: v for k, v in state.items() if k != "vision_encoder.layers.0.mlp.lin1.bias"}
  edited["vision_encoder.layers.0.mlp.extra.weight"] = state["vision_encoder.pos_embed"].clone()
  save_file(edited, str(tmp_path / "edited.safetensors"))
  shapes = _shapes(sie.SamImageEncoder(**TINY_SAM), jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(checkpoint_io.CheckpointMismatchError) as err:
    sie.load(shapes, str(tmp_path / "edited.safetensors"))
  assert err.value.missing == ["blocks_0/mlp/lin1/bias"]
  assert err.value.unexpected == ["vision_encoder.layers.0.mlp.extra.weight"]
  # `ignore` skips keys on request.
  with pytest.raises(checkpoint_io.CheckpointMismatchError) as err:
    sie.load(shapes, str(tmp_path / "edited.safetensors"), ignore=(r"\.extra\.",))
  assert not err.value.unexpected
