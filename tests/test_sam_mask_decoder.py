"""Tests for pixel_llm.models.sam_mask_decoder (SAM MaskDecoder and its checkpoint converter).

- Manifests of the public full-size checkpoints (segment-anything `.pth` and HF safetensors, ViT
  B/L/H) map completely onto `jax.eval_shape` of the full-size decoder.
- The real `load()` on a tiny random HF `SamModel` written as safetensors, and renamed to the
  segment-anything layout as a `.pth`, reproduces HF's `SamMaskDecoder` outputs.
- Missing, mis-shaped and unexpected keys are named in `CheckpointMismatchError`.
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

from pixel_llm.models import checkpoint_io
from pixel_llm.models import sam_mask_decoder as smd
from pixel_llm.models.layers import count_params
from pixel_llm.models.location_head import Mlp

MANIFESTS = os.path.join(os.path.dirname(smd.__file__), "manifests")
# segment-anything's mask decoder, identical for ViT-B/L/H: transformer 3,291,264 + tokens 1,280
# + upscaling 74,080 + 4 hypernetwork MLPs 4 * 139,808 + IoU head 132,612.
FULL_PARAMS = 4_058_340
D, H, W, S = 32, 4, 4, 3  # tiny: width 32, 4x4 grid, 3 sparse tokens
TINY = dict(transformer_dim=D, iou_head_hidden_dim=24, transformer_mlp_dim=64,
            transformer_num_heads=2)


def _shapes(model, b=1, d=256):
  args = (jnp.zeros((1, H, W, d)), jnp.zeros((H, W, d)), jnp.zeros((b, S, d)),
          jnp.zeros((b, H, W, d)), True)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"]


@functools.cache
def _full_shapes():
  return flax.linen.meta.unbox(_shapes(smd.MaskDecoder()))


def _fake_tensors(name, order):
  """The manifest as zero-stride arrays, filtered like `checkpoint_io.iter_tensors`."""
  with open(os.path.join(MANIFESTS, f"{name}.json")) as f:
    tensors = json.load(f)["tensors"]
  keys = sorted(tensors) if order == "sorted" else list(tensors)  # safetensors lists keys sorted
  for key in keys:
    if not re.search(smd.SKIPPED[0], key):
      yield key, np.broadcast_to(np.float32(0), tensors[key])


@pytest.mark.parametrize("variant", ["b", "l", "h"])
@pytest.mark.parametrize("suffix", ["", "_hf"])
def test_manifest_maps_onto_full_size(variant, suffix):
  name = f"sam_vit_{variant}{suffix}"
  shapes = _full_shapes()
  for order in ("file", "sorted"):
    tensors = list(_fake_tensors(name, order))
    assert sum(v.size for _, v in tensors) == FULL_PARAMS  # what the checkpoint holds
    loaded = smd.load_tensors(shapes, iter(tensors), name)
    assert jax.tree.structure(loaded) == jax.tree.structure(shapes)
    assert jax.tree.map(np.shape, loaded) == jax.tree.map(np.shape, shapes)
  assert count_params(shapes) == FULL_PARAMS


def test_every_parameter_has_logical_axes():
  boxed = flax.traverse_util.flatten_dict(_shapes(smd.MaskDecoder()), sep="/")
  for path, leaf in boxed.items():
    assert isinstance(leaf, flax.linen.LogicallyPartitioned), path
    assert len(leaf.names) == len(leaf.value.shape), path
  assert boxed["output_upscaling/layers_0/kernel"].value.shape == (2, 2, 256, 64)
  assert boxed["mask_tokens"].names == ("tokens", "embed")
  assert boxed["iou_prediction_head/layers_2/kernel"].value.shape == (256, 4)


# ----------------------------------------------------------------------------------------------
# Parity with transformers' SamMaskDecoder through the real `load()`.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_sam(tmp_path_factory):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import hf_reference  # pylint: disable=import-outside-toplevel  (tests/hf_reference.py)
  model = hf_reference.sam(
      vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         global_attn_indexes=[0], window_size=2, image_size=64,
                         output_channels=D, mlp_dim=32, num_pos_feats=D // 2),
      prompt_encoder_config=dict(hidden_size=D, image_size=64, patch_size=16),
      # segment-anything's eps in the two-way blocks (HF's default is 1e-6; see the module doc).
      mask_decoder_config=dict(hidden_size=D, mlp_dim=64, num_attention_heads=2,
                               iou_head_hidden_dim=24, layer_norm_eps=1e-5))
  state, path = hf_reference.saved_safetensors(model, tmp_path_factory.mktemp("hf_sam"))
  return torch, model, state, path


@functools.partial(jax.jit, static_argnums=5)
def _apply(params, image, pe, sparse, dense, multimask):
  """(masks, iou_pred, aux); always with aux, so the tests share compiles."""
  return smd.MaskDecoder(**TINY).apply({"params": params}, image, pe, sparse, dense, multimask,
                                       return_aux=True)


def _inputs(image_batch, prompt_batch, seed=0):
  rng = np.random.RandomState(seed)
  f = lambda *shape: rng.randn(*shape).astype(np.float32)
  dense_batch = image_batch  # HF adds the dense prompt per image, before repeating per prompt
  return f(image_batch, H, W, D), f(H, W, D), f(prompt_batch, S, D), f(dense_batch, H, W, D)


def _hf_outputs(torch, ref, image, pe, sparse, dense, multimask):
  """HF takes NCHW maps and a point-batch axis: [B_img, P, S, D] prompts per image."""
  nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)
  b_img = image.shape[0]
  sparse = torch.from_numpy(sparse).reshape(b_img, -1, S, D)
  with torch.no_grad():
    masks, iou = ref.mask_decoder(
        image_embeddings=nchw(image), image_positional_embeddings=nchw(np.stack([pe] * b_img)),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=nchw(dense),
        multimask_output=multimask)
  return masks.flatten(0, 1).numpy(), iou.flatten(0, 1).numpy()


def _assert_close(got, expected):
  got, expected = np.asarray(got), np.asarray(expected)
  assert got.shape == expected.shape
  scale = max(1.0, float(np.abs(expected).max()))
  assert np.abs(got - expected).max() <= 1e-4 * scale


@pytest.mark.parametrize("multimask", [True, False])
def test_hf_safetensors_parity(hf_sam, multimask):
  torch, ref, _, path = hf_sam
  params = smd.load(flax.linen.meta.unbox(_shapes(smd.MaskDecoder(**TINY), d=D)), path)
  m = 3 if multimask else 1
  # Two images with one prompt set each; then one image shared by two prompt sets.
  cases = ((2, 2), (1, 2)) if multimask else ((1, 2),)  # (1, 2): the image broadcasts
  for image_batch, prompt_batch in cases:
    inputs = _inputs(image_batch, prompt_batch)
    masks, iou, _ = _apply(params, *inputs, multimask)
    assert masks.shape == (prompt_batch, m, 4 * H, 4 * W) and iou.shape == (prompt_batch, m)
    expected_masks, expected_iou = _hf_outputs(torch, ref, *inputs, multimask)
    assert np.abs(expected_masks).max() > 1.0 and np.abs(expected_iou).max() > 0.1
    _assert_close(masks, expected_masks)
    _assert_close(iou, expected_iou)


def _mlp_to_segment_anything(name):
  """HF proj_in / layers.0 / proj_out -> segment-anything layers.0 / 1 / 2 (depth 3)."""
  m = re.match(r"^(.*\.(?:iou_prediction_head|output_hypernetworks_mlps\.\d+))\."
               r"(proj_in|layers\.0|proj_out)\.(weight|bias)$", name)
  if not m:
    return name
  return f"{m[1]}.layers.{ {'proj_in': 0, 'layers.0': 1, 'proj_out': 2}[m[2]] }.{m[3]}"


def _to_segment_anything(state):
  """HF SamModel state dict -> segment-anything `sam_vit_*.pth` names."""
  renames = [(r"^vision_encoder\.", "image_encoder."),
             (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
             (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
             (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
             (r"\.transformer\.layer_norm_final_attn\.", ".transformer.norm_final_attn."),
             (r"(\.transformer\.layers\.\d+)\.layer_norm(\d)\.", r"\1.norm\2.")]
  out = {}
  for key, value in state.items():
    if key.startswith(("shared_image_embedding.", "prompt_encoder.shared_embedding.")):
      continue  # segment-anything keeps it as prompt_encoder.pe_layer.*
    for pattern, repl in renames:
      key = re.sub(pattern, repl, key)
    out[_mlp_to_segment_anything(key)] = value
  return out


def test_segment_anything_pth_layout(hf_sam, tmp_path):
  torch, ref, state, path = hf_sam
  original = _to_segment_anything(state)
  with open(os.path.join(MANIFESTS, "sam_vit_b.json")) as f:
    manifest = json.load(f)["tensors"]
  # The renamed tiny file has exactly the published decoder's key names.
  assert ({k for k in original if k.startswith("mask_decoder.")}
          == {k for k in manifest if k.startswith("mask_decoder.")})
  pth = str(tmp_path / "sam_vit_tiny.pth")
  torch.save(original, pth)
  shapes = flax.linen.meta.unbox(_shapes(smd.MaskDecoder(**TINY), d=D))
  from_pth, from_hf = smd.load(shapes, pth), smd.load(shapes, path)
  jax.tree.map(np.testing.assert_array_equal, from_pth, from_hf)
  inputs = _inputs(2, 2, seed=1)  # shapes of a parity case: no new compile
  masks, iou, aux = _apply(from_pth, *inputs, True)
  expected_masks, expected_iou = _hf_outputs(torch, ref, *inputs, True)
  _assert_close(masks, expected_masks)
  _assert_close(iou, expected_iou)
  assert aux["mask_tokens"].shape == (2, 4, D) and aux["iou_token"].shape == (2, D)
  assert aux["upscaled_embedding"].shape == (2, 4 * H, 4 * W, D // 8)
  # The masks are the hypernetwork weights times the upscaled embedding.
  hyper = [np.asarray(Mlp(D, D // 8, 3, activation="relu").apply(
      {"params": from_pth[f"output_hypernetworks_mlps_{i}"]}, aux["mask_tokens"][:, i]))
           for i in range(1, 4)]
  np.testing.assert_allclose(
      np.einsum("btc,bhwc->bthw", np.stack(hyper, 1), aux["upscaled_embedding"]), masks,
      atol=1e-4 * float(np.abs(masks).max()))
  # Forcing the wrong layout reports the keys instead of mis-assigning the MLP layers.
  with pytest.raises(checkpoint_io.CheckpointMismatchError) as err:
    smd.load(shapes, path, layout="sam")
  assert "mask_decoder.upscale_conv1.weight" in err.value.unexpected


def test_gradients_reach_used_parameters(hf_sam):
  _, _, _, path = hf_sam
  params = smd.load(flax.linen.meta.unbox(_shapes(smd.MaskDecoder(**TINY), d=D)), path)
  inputs = _inputs(1, 2, seed=2)

  def loss(params):
    masks, iou = smd.MaskDecoder(**TINY).apply({"params": params}, *inputs, False)
    return jnp.mean(jnp.sin(masks)) + jnp.mean(jnp.sin(iou))

  grads = flax.traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params), sep="/")
  for name, g in grads.items():
    assert np.all(np.isfinite(g)), name
    # Single-mask output uses mask token 0 only: the other hypernetworks get no gradient.
    if re.match(r"output_hypernetworks_mlps_[123]/", name):
      assert not np.any(g), name
    else:
      assert np.any(g != 0), name


# ----------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------
def test_missing_misshaped_and_unexpected_keys(hf_sam, tmp_path):
  torch, _, state, _ = hf_sam
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  edited = {k: v for k, v in state.items() if k != "mask_decoder.mask_tokens.weight"}
  edited["mask_decoder.upscale_conv2.weight"] = torch.zeros(D // 4, D // 4, 2, 2)
  edited["mask_decoder.extra.weight"] = torch.zeros(3)
  bad = str(tmp_path / "edited.safetensors")
  save_file(edited, bad)
  shapes = flax.linen.meta.unbox(_shapes(smd.MaskDecoder(**TINY), d=D))
  with pytest.raises(checkpoint_io.CheckpointMismatchError) as err:
    smd.load(shapes, bad)
  assert err.value.missing == ["mask_tokens"]
  assert [m.split()[0] for m in err.value.mismatched] == ["mask_decoder.upscale_conv2.weight"]
  assert err.value.unexpected == ["mask_decoder.extra.weight"]
  assert "mask_decoder.upscale_conv2.weight" in str(err.value)
  # A wider decoder than the file: every D-sized tensor is reported.
  wider = flax.linen.meta.unbox(_shapes(smd.MaskDecoder(**{**TINY, "transformer_dim": 48}), d=48))
  with pytest.raises(checkpoint_io.CheckpointMismatchError) as err:
    smd.load(wider, bad, ignore=(r"\.extra\.",))
  assert not err.value.unexpected and err.value.missing == ["mask_tokens"]
  assert "mask_decoder.iou_token.weight" in [m.split()[0] for m in err.value.mismatched]
  # A key whose meaning depends on the layout needs one.
  with pytest.raises(ValueError, match="layout"):
    smd.convert("mask_decoder.iou_prediction_head.layers.0.weight", np.zeros((4, 4)))
