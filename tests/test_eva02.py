"""Tests for `pixel_llm.models.eva02`: shapes, gradients, exact sizes, parity with timm's Eva."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixel_llm.models import eva02, layers

TINY = dict(width=32, depth=2, num_heads=2, pretrain_img_size=56, drop_path_rate=0.0)
# timm `eva02_{large,base}_patch14_224`(pretrained=False, num_classes=0) parameter counts.
L_PARAMS = 303_268_800
B_PARAMS = 85_758_720


def _images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


def _param_shapes(model: eva02.Eva02, size: int):
  """Boxed abstract parameters (`nn.Partitioned` leaves) from `jax.eval_shape(model.init)`."""
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))["params"]


def _random_params(model: eva02.Eva02, size: int = 56, seed: int = 0):
  """Deterministic numpy-filled parameters (compiling `init`'s RNG costs seconds on CPU)."""
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      std, base = 1.0 / np.sqrt(np.prod(shape[:-1])), 0.0
    else:
      std, base = 0.1, (1.0 if name == "scale" else 0.0)
    return (base + std * rng.randn(*shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(_param_shapes(model, size)))


# One jitted apply for every tiny test, so each input size compiles once per session.
_TINY_MODEL = eva02.Eva02(**TINY)
_tiny_apply = jax.jit(_TINY_MODEL.apply)


def _import_timm():
  """torch and timm, or skip (conftest.py installs the torchvision shim timm needs)."""
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  return torch, timm


def test_forward_shapes():
  params = {"params": _random_params(_TINY_MODEL)}
  feats, aux = _tiny_apply(params, _images(56))
  assert feats.shape == (2, 4, 4, 32) and feats.dtype == jnp.float32
  assert aux["cls"].shape == (2, 32)
  assert np.isfinite(np.asarray(feats)).all()
  # A larger input reuses the same parameters (pos embed and RoPE follow the grid).
  feats84, _ = _tiny_apply(params, _images(84))
  assert feats84.shape == (2, 6, 6, 32)
  # Pixels beyond the last full patch are dropped (384 px -> 27x27 in the real setting); the
  # gradient test checks they have no influence.
  feats62, _ = jax.eval_shape(_TINY_MODEL.apply, params, _images(62))
  assert feats62.shape == (2, 4, 4, 32)


def _loss_fn(model: eva02.Eva02):
  def loss_fn(params, images):
    feats, aux = model.apply({"params": params}, images, train=True,
                             rngs={"dropout": jax.random.key(1)})
    return jnp.mean(feats ** 2) + jnp.mean(aux["cls"] ** 2)
  return loss_fn


def test_gradients_finite_and_nonzero_with_drop_path():
  model = eva02.Eva02(**{**TINY, "drop_path_rate": 0.1})
  params = _random_params(model)
  loss, (grads, image_grad) = jax.jit(jax.value_and_grad(_loss_fn(model), argnums=(0, 1)))(
      params, _images(62))
  assert np.isfinite(float(loss))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.isfinite(g).all(), path
    assert np.abs(g).max() > 0, path
  # Pixels beyond the last full patch (56 of 62) have no influence.
  image_grad = np.asarray(image_grad)
  assert image_grad[:, :56, :56].any()
  assert not image_grad[:, 56:].any() and not image_grad[:, :, 56:].any()
  # The rematerialised model traces to the same gradient tree (tracing only: compiling it twice
  # would double this test's cost).
  remat = eva02.Eva02(**{**TINY, "drop_path_rate": 0.1, "remat": True})
  remat_grads = jax.eval_shape(jax.grad(_loss_fn(remat)), params, _images(62))
  assert jax.tree.map(jnp.shape, remat_grads) == jax.tree.map(jnp.shape, grads)


def test_full_size_parameter_counts():
  assert layers.count_params(_param_shapes(eva02.Model("B"), 224)) == B_PARAMS
  # Built at the PixelLLM input (384 px, 27x27 grid): the parameters must not depend on it.
  boxed = _param_shapes(eva02.Model("L"), 384)
  assert layers.count_params(boxed) == L_PARAMS
  assert boxed["pos_embed"].value.shape == (1, 257, 1024)
  assert boxed["blocks_23"]["mlp"]["fc1_g"]["kernel"].value.shape == (1024, 2730)
  # Every parameter carries logical axis names.
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves)


@pytest.mark.parity
def test_full_size_counts_match_timm():
  torch, timm = _import_timm()
  for name, ours in (("eva02_base_patch14_224", B_PARAMS), ("eva02_large_patch14_224", L_PARAMS)):
    with torch.device("meta"):
      ref = timm.create_model(name, pretrained=False, num_classes=0)
    assert sum(p.numel() for p in ref.parameters()) == ours, name


def test_pos_embed_resample():
  posemb = jnp.asarray(np.random.RandomState(0).randn(1, 17, 8).astype(np.float32))
  assert eva02.resample_pos_embed(posemb, (4, 4), (4, 4)) is posemb
  # Channels 8: carry a constant grid, which must stay constant (interpolation weights sum to one).
  posemb = jnp.concatenate([posemb, jnp.full((1, 17, 4), 0.5)], axis=-1)
  out = jax.jit(eva02.resample_pos_embed, static_argnums=(1, 2))(posemb, (6, 5), (4, 4))
  assert out.shape == (1, 31, 12)
  np.testing.assert_array_equal(np.asarray(out[:, :1]), np.asarray(posemb[:, :1]))
  np.testing.assert_allclose(np.asarray(out[..., 8:]), 0.5, atol=1e-6)
  assert np.abs(np.asarray(out[:, 1:, :8])).max() > 0.1


def test_rope_tables():
  sin, cos = eva02.rope_sincos((4, 4), (4, 4), 16)
  assert sin.shape == cos.shape == (16, 16)
  np.testing.assert_allclose(sin ** 2 + cos ** 2, 1.0, atol=1e-6)
  # Rescaling is the identity at the reference grid; elsewhere positions span the reference grid.
  np.testing.assert_array_equal(sin, eva02.rope_sincos((4, 4), None, 16)[0])
  sin6, _ = eva02.rope_sincos((6, 6), (4, 4), 16)
  y_last = np.arcsin(sin6[-1, 0])  # last row, first (unit) frequency: 5/6*4
  np.testing.assert_allclose(y_last, np.arcsin(np.sin(5 / 6 * 4)), atol=1e-6)


def _timm_tiny(timm, img_size: int):
  # eva02_base_patch14_224's options at tiny size. `use_fc_norm=False` keeps the MIM checkpoint's
  # final `norm` on all tokens (timm's default 'avg' pool would move it to a pooled `fc_norm`).
  return timm.models.eva.Eva(
      img_size=img_size, patch_size=14, embed_dim=32, depth=2, num_heads=2, qkv_fused=False,
      mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
      ref_feat_shape=(4, 4), num_classes=0, use_fc_norm=False).eval()


@pytest.mark.parity
def test_parity_with_timm_at_pretrain_and_larger_size(tmp_path):
  torch, timm = _import_timm()
  from timm.models.eva import checkpoint_filter_fn  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  ref = _timm_tiny(timm, 56)
  with torch.no_grad():  # make every weight (biases and norms too) non-trivial
    for p in ref.parameters():
      p.add_(0.2 * torch.randn_like(p))
  # Through the real converter (official-name and error cases: tests/test_vision_convert.py).
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  save_file(ref.state_dict(), str(tmp_path / "eva.safetensors"))
  shapes = nn.meta.unbox(_param_shapes(_TINY_MODEL, 56))
  params = eva02.load(shapes, str(tmp_path / "eva.safetensors"))

  # Larger size: build timm at 84 px and load the 56-px weights the way timm loads a checkpoint
  # (checkpoint_filter_fn bicubic-resamples pos_embed); RoPE stays referenced to the 4x4 grid.
  ref84 = _timm_tiny(timm, 84)
  ref84.load_state_dict(checkpoint_filter_fn(ref.state_dict(), ref84))

  for size, ref_model in ((56, ref), (84, ref84)):
    images = _images(size, seed=size)
    with torch.no_grad():
      tokens = ref_model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    feats, aux = _tiny_apply({"params": params}, images)
    g = size // 14
    np.testing.assert_allclose(np.asarray(feats), tokens[:, 1:].reshape(2, g, g, 32), atol=1e-4,
                               rtol=0, err_msg=f"size {size}")
    np.testing.assert_allclose(np.asarray(aux["cls"]), tokens[:, 0], atol=1e-4, rtol=0)
