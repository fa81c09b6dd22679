"""Tests for pixel_llm.models.sam_prompt_encoder (SAM PromptEncoder).

Parameters come from numpy on the `eval_shape`d init (no RNG compiles) and applies are jitted,
so each test costs about one small XLA compile. The HF shim lives in conftest.py.
"""
import functools
import math
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixel_llm.models.layers import count_params
from pixel_llm.models.sam_prompt_encoder import PromptEncoder


D, MASK_CH, GRID, SIZE = 16, 8, (4, 4), (64, 64)


@functools.cache
def _init():
  model = PromptEncoder(embed_dim=D, mask_in_chans=MASK_CH)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), image_grid=GRID, input_size=SIZE))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32),
                        flax.linen.meta.unbox(abstract["params"]))
  return model, {"params": params}


def _apply(model, variables, **prompts):
  fn = lambda v, p: model.apply(v, **p, image_grid=GRID, input_size=SIZE)
  return jax.jit(fn)(variables, prompts)


def _np_pe(params, xy_pixels, size=SIZE):
  """Numpy SAM PE of pixel coords (already shifted by 0.5)."""
  h, w = size
  coords = np.asarray(xy_pixels, np.float64) / np.array([w, h])
  proj = 2 * math.pi * ((2 * coords - 1) @ np.asarray(
      params["pe_layer"]["positional_encoding_gaussian_matrix"], np.float64))
  return np.concatenate([np.sin(proj), np.cos(proj)], -1)


def test_param_count_default_and_all_keys_from_any_init():
  # SAM vit_h prompt encoder: Gaussian matrix 2*128 = 256; 4 point embeddings 4*256 = 1,024;
  # not_a_point + no_mask 2*256 = 512; mask_downscaling conv 2*2*1*4+4 = 20, LN 2*4 = 8,
  # conv 2*2*4*16+16 = 272, LN 2*16 = 32, conv 1*1*16*256+256 = 4,352. Total 6,476.
  model = PromptEncoder()
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), image_grid=(24, 24), input_size=(384, 384)))
  assert count_params(variables) == 6476
  keys = set(flax.traverse_util.flatten_dict(variables["params"], sep="/"))
  assert {"pe_layer/positional_encoding_gaussian_matrix", "point_embeddings_3",
          "not_a_point_embed", "no_mask_embed", "mask_downscaling/layers_6/kernel",
          "mask_downscaling/layers_4/weight"} <= keys
  boxed = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  assert boxed["pe_layer/positional_encoding_gaussian_matrix"].names == (None, None)
  assert boxed["point_embeddings_0"].names == ("embed",)
  assert boxed["mask_downscaling/layers_0/kernel"].names == ("conv_h", "conv_w", "conv_in", "embed")
  # A box-only init also creates every key (the mask path runs on a dummy while initialising).
  boxed_init = jax.eval_shape(lambda: model.init(
      jax.random.key(0), boxes=jnp.zeros((1, 4)), image_grid=(24, 24), input_size=(384, 384)))
  assert jax.tree.structure(boxed_init) == jax.tree.structure(variables)


def test_box_prompt_is_two_corner_tokens():
  model, v = _init()
  p = v["params"]
  boxes = jnp.array([[3.0, 5.0, 40.0, 50.0], [0.0, 0.0, 63.0, 31.0]])
  sparse, dense = _apply(model, v, boxes=boxes)
  assert sparse.shape == (2, 2, D) and sparse.dtype == jnp.float32
  corners = np.asarray(boxes).reshape(2, 2, 2) + 0.5
  want = _np_pe(p, corners) + np.stack([p["point_embeddings_2"], p["point_embeddings_3"]])
  np.testing.assert_allclose(sparse, want, rtol=1e-5, atol=1e-5)
  assert dense.shape == (2, *GRID, D)
  np.testing.assert_array_equal(dense, np.broadcast_to(p["no_mask_embed"], dense.shape))


def test_points_labels_and_padding_point():
  model, v = _init()
  p = v["params"]
  points = jnp.array([[[10.0, 20.0], [30.0, 5.0], [0.0, 0.0]]])
  labels = jnp.array([[1, 0, -1]], jnp.int32)
  sparse, _ = _apply(model, v, points=points, point_labels=labels)
  assert sparse.shape == (1, 4, D)  # SAM appends one padding point when there is no box
  pe = _np_pe(p, np.asarray(points[0]) + 0.5)
  np.testing.assert_allclose(sparse[0, 0], pe[0] + p["point_embeddings_1"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sparse[0, 1], pe[1] + p["point_embeddings_0"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(sparse[0, 2], p["not_a_point_embed"])
  np.testing.assert_array_equal(sparse[0, 3], p["not_a_point_embed"])
  # With a box there is no padding point: N points + 2 corners.
  boxes = jnp.array([[1.0, 2.0, 30.0, 40.0]])
  both, _ = _apply(model, v, points=points, point_labels=labels, boxes=boxes)
  assert both.shape == (1, 5, D)
  np.testing.assert_allclose(both[0, :3], sparse[0, :3], rtol=1e-6)
  # No prompt at all: zero sparse tokens.
  none, dense = _apply(model, v)
  assert none.shape == (1, 0, D) and dense.shape == (1, *GRID, D)


def test_mask_prompt_and_dense_pe():
  model, v = _init()
  masks = np.random.default_rng(1).normal(size=(3, 16, 16)).astype(np.float32)
  _, dense = _apply(model, v, masks=masks)
  assert dense.shape == (3, *GRID, D)
  assert not np.allclose(dense[0], dense[1])
  with pytest.raises(ValueError):
    jax.eval_shape(lambda: model.apply(v, masks=masks, image_grid=(5, 5), input_size=SIZE))
  pe = jax.jit(lambda v: model.apply(v, (3, 5), method=PromptEncoder.get_dense_pe))(v)
  assert pe.shape == (3, 5, D)
  # Cell (i, j) centre in pixels of a (3, 5)-cell frame is (j + 0.5, i + 0.5).
  want = _np_pe(v["params"], np.array([[[2.5, 1.5]]]), size=(3, 5))[0, 0]
  np.testing.assert_allclose(pe[1, 2], want, rtol=1e-5, atol=1e-5)


def test_gradients_and_frozen_gaussian():
  model, v = _init()
  points = jnp.array([[[10.0, 20.0], [30.0, 5.0]]])
  labels = jnp.array([[1, 0]], jnp.int32)
  boxes = jnp.array([[3.0, 5.0, 40.0, 50.0]])
  masks = np.random.default_rng(1).normal(size=(1, 16, 16)).astype(np.float32)

  def loss(params):
    sparse, dense = model.apply({"params": params}, points=points, point_labels=labels,
                                boxes=boxes, masks=masks, image_grid=GRID, input_size=SIZE)
    return jnp.sum(jnp.sin(sparse)) + jnp.sum(jnp.sin(dense))

  grads = flax.traverse_util.flatten_dict(jax.jit(jax.grad(loss))(v["params"]), sep="/")
  for name, g in grads.items():
    assert np.all(np.isfinite(g)), name
    frozen = name in ("pe_layer/positional_encoding_gaussian_matrix", "no_mask_embed",
                      "not_a_point_embed")  # buffer / unused with a mask and a box
    assert np.any(g != 0) != frozen, name


def test_parity_with_hf_sam_prompt_encoder():
  torch = pytest.importorskip("torch")
  sam = pytest.importorskip("transformers.models.sam.modeling_sam")
  from transformers import SamConfig

  cfg = SamConfig(
      vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         image_size=SIZE[0], patch_size=16, num_pos_feats=D // 2,
                         global_attn_indexes=(0,)),
      prompt_encoder_config=dict(hidden_size=D, image_size=SIZE[0], patch_size=16,
                                 mask_input_channels=MASK_CH))
  torch.manual_seed(0)
  ref = sam.SamPromptEncoder(cfg).eval()
  with torch.no_grad():
    for prm in ref.parameters():
      prm.normal_()
  t = {k: val.detach().numpy() for k, val in ref.state_dict().items()}
  hwio = lambda w: np.transpose(w, (2, 3, 1, 0))
  md = {}
  for ours, theirs in (("layers_0", "conv1"), ("layers_3", "conv2"), ("layers_6", "conv3")):
    md[ours] = {"kernel": hwio(t[f"mask_embed.{theirs}.weight"]),
                "bias": t[f"mask_embed.{theirs}.bias"]}
  for ours, theirs in (("layers_1", "layer_norm1"), ("layers_4", "layer_norm2")):
    md[ours] = {"weight": t[f"mask_embed.{theirs}.weight"], "bias": t[f"mask_embed.{theirs}.bias"]}
  params = {
      "pe_layer": {
          "positional_encoding_gaussian_matrix": t["shared_embedding.positional_embedding"]},
      "not_a_point_embed": t["not_a_point_embed.weight"][0],
      "no_mask_embed": t["no_mask_embed.weight"][0],
      "mask_downscaling": md,
      **{f"point_embeddings_{i}": t[f"point_embed.{i}.weight"][0] for i in range(4)},
  }
  model = PromptEncoder(embed_dim=D, mask_in_chans=MASK_CH)
  v = {"params": jax.tree.map(jnp.asarray, params)}

  rng = np.random.default_rng(0)
  points = rng.uniform(0, 63, (2, 3, 2)).astype(np.float32)
  labels = np.array([[1, 0, -1], [0, 1, 1]], np.int64)
  boxes = np.array([[3.0, 5.0, 40.0, 50.0], [0.0, 10.0, 63.0, 31.0]], np.float32)
  masks = rng.normal(size=(2, 16, 16)).astype(np.float32)
  tt = torch.from_numpy
  cases = [dict(points=points, point_labels=labels), dict(boxes=boxes),
           dict(points=points, point_labels=labels, boxes=boxes), dict(boxes=boxes, masks=masks)]
  for case in cases:
    with torch.no_grad():
      want_s, want_d = ref(
          tt(case["points"][:, None]) if "points" in case else None,
          tt(case["point_labels"][:, None]) if "points" in case else None,
          tt(case["boxes"][:, None]) if "boxes" in case else None,
          tt(case["masks"][:, None]) if "masks" in case else None)
    sparse, dense = _apply(model, v, **case)
    np.testing.assert_allclose(sparse, want_s[:, 0].detach().numpy(), rtol=1e-4, atol=1e-4)
    want_d = want_d.detach().permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(dense, want_d, rtol=1e-4, atol=1e-4)

  holder = types.SimpleNamespace(config=cfg, shared_image_embedding=ref.shared_embedding)
  with torch.no_grad():
    want_pe = sam.SamModel.get_image_wide_positional_embeddings(holder)[0].permute(1, 2, 0)
  pe = jax.jit(lambda v: model.apply(v, GRID, method=PromptEncoder.get_dense_pe))(v)
  np.testing.assert_allclose(pe, want_pe.numpy(), rtol=1e-4, atol=1e-4)
