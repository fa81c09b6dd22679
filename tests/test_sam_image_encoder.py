"""Tests for the SAM image encoder (`pixel_llm.models.sam_image_encoder`).

Tiny configs only; full-size variants are built with `jax.eval_shape` to check the exact
parameter counts of the public segment-anything checkpoints. The parity test compares against
timm's `VisionTransformerSAM` (a port of segment-anything's `ImageEncoderViT`) on random weights,
loaded through `sam_image_encoder.load` (converter tests: tests/test_vision_convert.py).
"""
import functools
import sys
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixel_llm.models import sam_image_encoder as sie
from pixel_llm.models.layers import count_params

# Grid 5x3 from an 80x48 image: not square, not a multiple of the window (pads 5->6, 3->4), and
# not the pretraining grid 4x4 (pos_embed is resized, global tables of length 7 -> 9 and 5).
TINY = dict(width=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=2,
            out_chans=16, pretrain_img_size=64)


def _image(shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


def _random_params(model, image, seed=0):
  """Random values in the tree `model.init` would build (its tree comes from `eval_shape`).

  Compiling a jitted `init` costs seconds of CPU (threefry), so the forward tests fill the
  abstract tree with numpy noise; every table is non-zero, unlike the SAM init.
  """
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), image)["params"]
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    std = 1.0 / np.sqrt(np.prod(shape[:-1])) if name == "kernel" else 0.2
    base = 1.0 if name in ("scale", "weight") else 0.0  # LayerNorm / LayerNorm2d scales
    return jnp.asarray(base + std * rng.randn(*shape).astype(np.float32))

  return jax.tree_util.tree_map_with_path(fill, flax.linen.meta.unbox(shapes))


def test_forward_grads_and_drop_path():
  # One remat model serves every check: each jitted variant costs seconds of XLA compile on CPU
  # (remat=False is exercised by the timm parity test).
  model = sie.SamImageEncoder(**TINY, drop_path_rate=0.5, remat=True)
  image = _image((2, 80, 48, 3))
  params = _random_params(model, image)
  proj = _image((2, 5, 3, 16), seed=1)

  def loss(params):
    feats, aux = model.apply({"params": params}, image)
    # A fixed random projection: a plain sum would be ~constant after the channel LayerNorm.
    return (feats * proj).sum(), (feats, aux)

  (_, (feats, aux)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert feats.shape == (2, 5, 3, 16) and feats.dtype == jnp.float32
  assert aux["pre_neck"].shape == (2, 5, 3, 32)
  assert np.isfinite(np.asarray(feats)).all()
  flat = flax.traverse_util.flatten_dict(grads, sep="/")
  assert len(flat) == len(jax.tree.leaves(params))
  for name, g in flat.items():
    g = np.asarray(g)
    assert np.isfinite(g).all(), name
    assert np.abs(g).max() > 0, name

  # Stochastic depth only acts with train=True, reproducibly for a given rng.
  apply = jax.jit(functools.partial(model.apply, train=True))
  rngs = {"dropout": jax.random.PRNGKey(3)}
  train_a, _ = apply({"params": params}, image, rngs=rngs)
  train_b, _ = apply({"params": params}, image, rngs=rngs)
  np.testing.assert_array_equal(train_a, train_b)
  assert np.abs(np.asarray(train_a - feats)).max() > 1e-3


@pytest.mark.parametrize("variant,expected", [
    ("vit_b", 89_670_912), ("vit_l", 308_278_272), ("vit_h", 637_026_048)])
def test_full_size_param_counts(variant, expected):
  model = sie.Model(variant)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
  assert count_params(shapes) == expected
  cfg = sie.VARIANTS[variant]
  width, head_dim = cfg["width"], cfg["width"] // cfg["num_heads"]
  assert shapes["pos_embed"].value.shape == (1, 64, 64, width)
  for i in range(cfg["depth"]):
    side = 64 if i in cfg["global_attn_indexes"] else 14
    assert shapes[f"blocks_{i}"]["attn"]["rel_pos_h"].value.shape == (2 * side - 1, head_dim)
  if variant == "vit_b":  # parameter shapes must not depend on the input size
    other = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 384, 240, 3)))
    assert jax.tree.map(jnp.shape, other["params"]) == jax.tree.map(jnp.shape, shapes)


# ----------------------------------------------------------------------------------------------
# Resampling and windows against direct numpy re-implementations of the torch code.
# ----------------------------------------------------------------------------------------------
def _np_interp_linear(table, out_len):
  """torch F.interpolate(mode='linear', align_corners=False) along axis 0, loop by loop.

  Scalar math in float32 like torch's CPU kernel (UpSampleKernel.cpp): ratio = in / out,
  src = max(ratio * (i + 0.5) - 0.5, 0), i0 = floor(src), i1 = i0 + (i0 < in - 1).
  """
  f32 = np.float32
  in_len = table.shape[0]
  ratio = f32(in_len) / f32(out_len)
  out = np.zeros((out_len, table.shape[1]), np.float32)
  for i in range(out_len):
    src = max(ratio * (f32(i) + f32(0.5)) - f32(0.5), f32(0))
    i0 = int(np.floor(src))
    i1 = i0 + 1 if i0 < in_len - 1 else i0
    lam = src - f32(i0)
    out[i] = (f32(1) - lam) * table[i0] + lam * table[i1]
  return out


def _np_get_rel_pos(q_size, k_size, table):
  length = 2 * max(q_size, k_size) - 1
  if table.shape[0] != length:
    table = _np_interp_linear(table, length)
  out = np.zeros((q_size, k_size, table.shape[1]))
  for i in range(q_size):
    for j in range(k_size):
      coord = (i * max(k_size / q_size, 1.0) - j * max(q_size / k_size, 1.0)
               + (k_size - 1) * max(q_size / k_size, 1.0))
      out[i, j] = table[int(coord)]
  return out


def test_get_rel_pos_uses_matching_table_unchanged():
  table = np.random.RandomState(0).randn(2 * 5 - 1, 4).astype(np.float32)
  got = np.asarray(sie.get_rel_pos(5, 5, jnp.asarray(table)))
  expected = np.stack([np.stack([table[i - j + 4] for j in range(5)]) for i in range(5)])
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("q_size,k_size,length", [
    (24, 24, 127),  # PixelLLM: a global table stored for 64x64, used on a 24x24 grid
    (5, 5, 7), (3, 3, 27), (4, 6, 7), (6, 4, 11), (3, 7, 13)])
def test_get_rel_pos_interpolation_matches_torch_math(q_size, k_size, length):
  table = np.random.RandomState(length).randn(length, 8).astype(np.float32)
  got = np.asarray(sie.get_rel_pos(q_size, k_size, jnp.asarray(table)))
  np.testing.assert_allclose(got, _np_get_rel_pos(q_size, k_size, table), atol=1e-5)


def test_jax_resize_impl_matches_torch_when_upsampling_linear():
  # Documented behaviour: the two implementations agree for linear upsampling (rel-pos tables
  # at inputs larger than pretraining) and differ when downsampling (antialiasing).
  table = jnp.asarray(np.random.RandomState(0).randn(7, 4).astype(np.float32))
  np.testing.assert_allclose(sie.get_rel_pos(6, 6, table, "jax"), sie.get_rel_pos(6, 6, table),
                             atol=1e-6)


def test_resize_matrices_match_torch_interpolate():
  torch = pytest.importorskip("torch")
  f = torch.nn.functional
  x = np.random.RandomState(0).randn(1, 3, 64, 64).astype(np.float32)
  # Matrices only (numpy): `resize_pos_embed` applying them is covered by the timm parity test.
  for out_hw in [(24, 24), (64, 64), (5, 3), (96, 80)]:
    ref = f.interpolate(torch.from_numpy(x), size=out_hw, mode="bicubic", align_corners=False)
    rows, cols = (sie.cubic_resize_matrix(64, n) for n in out_hw)
    got = np.einsum("yh,xw,bchw->bcyx", rows, cols, x)
    np.testing.assert_allclose(got, ref.numpy(), atol=2e-5)
  for in_len, out_len in [(127, 47), (7, 9), (27, 9), (15, 15)]:
    t = np.random.RandomState(in_len).randn(1, 4, in_len).astype(np.float32)
    ref = f.interpolate(torch.from_numpy(t), size=out_len, mode="linear")
    got = sie.linear_resize_matrix(in_len, out_len) @ t[0].T
    np.testing.assert_allclose(got, ref.numpy()[0].T, atol=1e-5)


def test_window_partition_roundtrip():
  x = _image((2, 5, 7, 3))
  windows, pad_hw = sie.window_partition(x, 3)
  assert windows.shape == (2 * 2 * 3, 3, 3, 3) and pad_hw == (6, 9)
  np.testing.assert_array_equal(windows[0], x[0, :3, :3])  # row-major window order like SAM
  np.testing.assert_array_equal(windows[1], x[0, :3, 3:6])
  np.testing.assert_array_equal(windows[5][:, 1:], 0)  # padded columns 7, 8 of window (0, 2)
  np.testing.assert_array_equal(sie.window_unpartition(windows, 3, pad_hw, (5, 7)), x)


# ----------------------------------------------------------------------------------------------
# Numerical parity with timm's VisionTransformerSAM (segment-anything's ImageEncoderViT).
# ----------------------------------------------------------------------------------------------
def _import_timm_sam():
  pytest.importorskip("torch")
  # timm imports torchvision, whose op registrations fail against the CPU torch wheel.
  for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(name, types.ModuleType(name))
  return pytest.importorskip("timm.models.vision_transformer_sam")


def test_parity_with_timm_sam(monkeypatch, tmp_path):
  timm_sam = _import_timm_sam()
  import torch  # pylint: disable=g-import-not-at-top
  f = torch.nn.functional
  # timm resamples pos_embed with antialias=True; segment-anything / our default is plain
  # F.interpolate(bicubic, align_corners=False), so patch timm to that.
  monkeypatch.setattr(timm_sam, "resample_abs_pos_embed_nhwc", lambda pos, hw: f.interpolate(
      pos.permute(0, 3, 1, 2), size=tuple(hw), mode="bicubic", align_corners=False,
  ).permute(0, 2, 3, 1))
  cfg = dict(width=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=3,
             out_chans=16, pretrain_img_size=128)
  torch.manual_seed(0)
  ref = timm_sam.VisionTransformerSAM(
      img_size=cfg["pretrain_img_size"], patch_size=16, embed_dim=cfg["width"], depth=cfg["depth"],
      num_heads=cfg["num_heads"], global_attn_indexes=cfg["global_attn_indexes"],
      window_size=cfg["window_size"], use_rel_pos=True, neck_chans=cfg["out_chans"],
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), num_classes=0).eval()
  with torch.no_grad():  # zero-initialised tables and unit norms would hide layout mistakes
    for name, p in ref.named_parameters():
      if "pos" in name:  # pos_embed, rel_pos_h, rel_pos_w
        p.normal_(std=0.5)
      elif p.dim() == 1:  # norm scales / biases, linear biases
        p.add_(torch.randn_like(p) * 0.1)
  model = sie.SamImageEncoder(**cfg)
  # Through the real converter: timm's layout (no prefix, mlp.fc1/fc2) as a safetensors file.
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  save_file(ref.state_dict(), str(tmp_path / "samvit.safetensors"))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
  params = sie.load(flax.linen.meta.unbox(shapes), str(tmp_path / "samvit.safetensors"))

  # 128x128: the pretraining grid (8x8 padded to 9x9 windows); 80x48: pos_embed and the global
  # tables (length 15) resampled to a 5x3 grid, here through the remat path.
  for hw, remat in [((128, 128), False), ((80, 48), True)]:
    image = np.random.RandomState(hw[0]).randn(2, *hw, 3).astype(np.float32)
    with torch.no_grad():
      expected = ref.forward_features(torch.from_numpy(image).permute(0, 3, 1, 2))
    got, _ = jax.jit(model.clone(remat=remat).apply)({"params": params}, jnp.asarray(image))
    np.testing.assert_allclose(np.asarray(got), expected.permute(0, 2, 3, 1).numpy(), atol=2e-5,
                               err_msg=f"image {hw}")
