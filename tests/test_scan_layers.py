"""Tests for scan over layers (`pixel_llm.models.scan`) in T5, EVA02 and the SAM image encoder.

For each tower, with the same weights (the unrolled tree put through `scan.stack_layers`), the
scanned model must give the unrolled model's outputs and gradients; remat inside the scan must
not change them; checkpoint trees load into the scanned layout; every stacked parameter carries
the `layers` logical axis first. Weights are numpy noise in the `eval_shape` tree (a jitted init
costs seconds of compile on CPU).
"""
import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from pixel_llm.models import eva02, layers, scan, t5
from pixel_llm.models import sam_image_encoder as sie

T5_TINY = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=3,
                      num_decoder_layers=2, relative_attention_num_buckets=8,
                      relative_attention_max_distance=16, dropout_rate=0.0, lora_rank=2,
                      lora_targets=("encoder.self.v", "decoder.cross.q"))
# Inputs at the pretraining size: resampling tables is tested elsewhere and costs compile time.
EVA_TINY = dict(width=32, depth=3, num_heads=2, mlp_dim=40, patch_size=4, pretrain_img_size=24,
                drop_path_rate=0.0)
# Period 2 (windowed, global) in 2 groups; the 6x6 grid of a 24-px image pads to 8x8 for the
# windows of 4.
SAM_TINY = dict(width=16, depth=4, num_heads=2, global_attn_indexes=(1, 3), patch_size=4,
                window_size=4, pretrain_img_size=24, out_chans=8)
ENC = np.array([[5, 9, 13, 2, 7, 0], [3, 3, 8, 1, 0, 0]], np.int32)
DEC = np.array([[0, 4, 6, 11], [0, 12, 1, 9]], np.int32)
IMG = np.random.RandomState(1).randn(2, 24, 24, 3).astype(np.float32)
# Compiling dominates these tests; XLA's backend optimisations change no value checked here.
_jit = functools.partial(jax.jit, static_argnums=0,
                         compiler_options={"xla_backend_optimization_level": 0})


def _random_params(model, *args, seed=0, **kw):
  """Numpy noise in the (unboxed) tree `model.init(key, *args, **kw)` builds."""
  shapes = nn.meta.unbox(jax.eval_shape(functools.partial(model.init, **kw),
                                        jax.random.key(0), *args)["params"])
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name = path[-1].key
    std = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if name == "kernel" else 0.1
    base = 1.0 if name in ("scale", "weight") else 0.0
    return (base + std * rng.randn(*leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _assert_trees_close(a, b, tol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=tol, atol=tol,
                               err_msg=jax.tree_util.keystr(path))


def _value_and_grad(model, params, *args, **kw):
  """((mean squared first output, that output), gradients) of model.apply."""
  def loss(p):
    out = model.apply({"params": p}, *args, **kw)[0]
    return jnp.mean(out.astype(jnp.float32) ** 2), out
  return _jit(lambda _, p: jax.value_and_grad(loss, has_aux=True)(p))(model, params)


def _check_layers_axis(model, stacked, *args):
  """Boxed abstract params: leaves under `stacked` are named ("layers", ...), others are not."""
  boxed = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
  flat = traverse_util.flatten_dict(boxed)
  assert flat
  for path, leaf in flat.items():
    assert isinstance(leaf, nn.Partitioned), path
    assert (leaf.names[0] == "layers") == (stacked in path), (path, leaf.names)
    assert len(leaf.names) == leaf.value.ndim


def _torch_state(params, renames=()):
  """Unrolled flax tree -> torch-style (key, array) pairs as the towers' converters expect:
  `blocks_3` -> `blocks.3`, kernel/scale -> weight, Linear kernels and conv kernels transposed."""
  renames = dict(renames)
  for path, value in traverse_util.flatten_dict(params).items():
    *mods, leaf = path
    if leaf.startswith("lora"):
      continue
    key = ".".join(re.sub(r"^(blocks?|layer)_(\d+)$", r"\1.\2", m) for m in mods)
    key = renames.get(key, key)
    if leaf in ("kernel", "scale", "embedding"):
      value = value.T if value.ndim == 2 and leaf == "kernel" else value
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
      leaf = "weight"
    yield (f"{key}.{leaf}" if key else leaf), value


# ---------------------------------------------------------------------------------------------
# T5
# ---------------------------------------------------------------------------------------------
T5_PARAMS = _random_params(t5.T5(T5_TINY), ENC, DEC)


@functools.cache
def _t5_unrolled():
  """((loss, logits [B, T, V]), grads) of the unrolled tiny T5, shared by the T5 tests."""
  return _value_and_grad(t5.T5(T5_TINY), T5_PARAMS, ENC, DEC)


def test_t5_scan_with_remat_matches_unrolled_with_lora():
  scanned_params = scan.stack_layers(T5_PARAMS)
  assert scanned_params["encoder"]["block"]["layer_0"]["SelfAttention"]["v"]["lora_a"].shape == (
      3, 32, 2)
  (loss, _), grads = _t5_unrolled()
  cfg = dataclasses.replace(T5_TINY, scan_layers=True, remat=True, remat_policy="dots_saveable")
  (loss_s, _), grads_s = _value_and_grad(t5.T5(cfg), scanned_params, ENC, DEC)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
  _assert_trees_close(grads, scan.unstack_layers(grads_s))
  # The LoRA factors and the last encoder block take part in the gradient.
  assert np.abs(grads["encoder"]["block_2"]["layer_0"]["SelfAttention"]["v"]["lora_b"]).max() > 0


def test_t5_scanned_cached_decoding_matches_teacher_forcing():
  cfg = dataclasses.replace(T5_TINY, scan_layers=True)
  model, params = t5.T5(cfg), scan.stack_layers(T5_PARAMS)
  (_, expected), _ = _t5_unrolled()

  @_jit
  def cached(m, p):
    mask = ENC != 0
    encoded = m.apply({"params": p}, m.apply({"params": p}, ENC, method="embed"), mask,
                      method="encode")
    _, cache = m.apply({"params": p}, encoded, mask, DEC.shape[1], method="init_cache",
                       mutable=["cache"])
    logits = []
    for lo, hi in ((0, 1), (1, 4)):  # one token, then three at once
      (step, _), cache = m.apply({"params": p, **cache}, DEC[:, lo:hi], method="decode_step",
                                 mutable=["cache"])
      logits.append(step)
    return jnp.concatenate(logits, axis=1), cache

  logits, cache = cached(model, params)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  blocks = cache["cache"]["decoder"]["block"]
  assert blocks["layer_0"]["SelfAttention"]["cached_key"].shape == (2, 2, 4, 4, 8)  # [L,B,N,T,Dh]
  assert blocks["layer_1"]["EncDecAttention"]["cached_value"].shape == (2, 2, 4, 6, 8)
  # map_cache sees batch-major slices of the stacked caches: a beam reorder swaps examples.
  swapped = t5.map_cache(lambda x: x[::-1], cache)
  key = swapped["cache"]["decoder"]["block"]["layer_0"]["SelfAttention"]["cached_key"]
  np.testing.assert_array_equal(key, blocks["layer_0"]["SelfAttention"]["cached_key"][:, ::-1])
  np.testing.assert_array_equal(swapped["cache"]["decoder"]["decoder_mask"],
                                cache["cache"]["decoder"]["decoder_mask"][::-1])


def test_t5_load_fills_a_scanned_tree():
  renames = {f"{s}.relative_attention_bias": f"{s}.block.0.layer.0.SelfAttention."
             "relative_attention_bias" for s in ("encoder", "decoder")}
  tensors = list(_torch_state(T5_PARAMS, renames))
  assert ("lm_head.weight", ) == tuple(k for k, _ in tensors if k.startswith("lm_head"))
  for k, _ in tensors:
    assert t5.hf_key_to_flax(k) is not None, k
  cfg = dataclasses.replace(T5_TINY, scan_layers=True)
  init = nn.meta.unbox(jax.eval_shape(t5.T5(cfg).init, jax.random.key(0), ENC, DEC)["params"])
  loaded = t5.load_tensors(init, iter(tensors))
  expected = scan.stack_layers(T5_PARAMS)
  flat, flat_expected = (traverse_util.flatten_dict(t) for t in (loaded, expected))
  assert flat.keys() == flat_expected.keys()
  for path, value in flat.items():
    if "lora" in path[-1]:  # not in checkpoints: keeps its (abstract) init, stacked
      assert value.shape == flat_expected[path].shape
    else:
      np.testing.assert_array_equal(value, flat_expected[path], err_msg=str(path))
  # The unrolled init still loads the unrolled layout.
  unrolled = t5.load_tensors(nn.meta.unbox(jax.eval_shape(
      t5.T5(T5_TINY).init, jax.random.key(0), ENC, DEC)["params"]), iter(tensors))
  assert "block_2" in unrolled["encoder"] and "block" not in unrolled["encoder"]


# ---------------------------------------------------------------------------------------------
# EVA02
# ---------------------------------------------------------------------------------------------
def test_eva02_scan_matches_unrolled():
  """Forward only (gradients: the next test); three blocks, so the stacking order shows."""
  params = _random_params(eva02.Eva02(**EVA_TINY), IMG)
  stacked = scan.stack_layers(params, "blocks_{i}", "blocks")
  assert stacked["blocks"]["mlp"]["fc2"]["kernel"].shape == (3, 40, 32)
  forward = _jit(lambda m, p: m.apply({"params": p}, IMG))
  (feats, aux), (feats_s, aux_s) = (forward(eva02.Eva02(**EVA_TINY), params),
                                    forward(eva02.Eva02(**EVA_TINY, scan_layers=True), stacked))
  np.testing.assert_allclose(feats_s, feats, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux_s["cls"], aux["cls"], rtol=1e-5, atol=1e-5)


def test_eva02_scanned_drop_path_rates_follow_the_layer_with_remat():
  """Rates linear over depth 2 with drop_path_rate 1: block 0 never drops and block 1 always does,
  so training equals evaluating block 0 alone, gradients included (a wrong per-layer rate order
  would drop block 0 instead); the dropped block gets zero, not NaN, gradients."""
  cfg = dict(EVA_TINY, depth=2, drop_path_rate=1.0)
  params = _random_params(eva02.Eva02(**cfg), IMG)
  model = eva02.Eva02(**cfg, scan_layers=True, remat=True, remat_policy="dots_saveable")
  (loss, _), grads = _value_and_grad(model, scan.stack_layers(params, "blocks_{i}", "blocks"),
                                     IMG, train=True, rngs={"dropout": jax.random.key(3)})
  block0 = {k: v for k, v in params.items() if k != "blocks_1"}
  (loss0, _), grads0 = _value_and_grad(eva02.Eva02(**dict(cfg, depth=1)), block0, IMG)
  np.testing.assert_allclose(loss, loss0, rtol=1e-6)
  grads = scan.unstack_layers(grads, "blocks_{i}", "blocks")
  assert not any(x.any() for x in jax.tree.leaves(grads.pop("blocks_1")))
  _assert_trees_close(grads0, grads)


def test_eva02_load_fills_a_scanned_tree():
  params = _random_params(eva02.Eva02(**EVA_TINY), IMG)
  model = eva02.Eva02(**EVA_TINY, scan_layers=True)
  init = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), IMG)["params"])
  loaded = eva02.load_tensors(init, _torch_state(params), "test")
  _assert_trees_close(scan.stack_layers(params, "blocks_{i}", "blocks"), loaded, tol=0)


# ---------------------------------------------------------------------------------------------
# SAM image encoder
# ---------------------------------------------------------------------------------------------
def test_sam_periods_of_public_variants():
  assert [sie.Model(v).period for v in ("vit_b", "vit_l", "vit_h")] == [3, 6, 8]
  assert sie.SamImageEncoder(depth=4, global_attn_indexes=()).period == 1
  assert sie.SamImageEncoder(depth=4, global_attn_indexes=(0, 3)).period == 4  # no repeat
  assert sie.SamImageEncoder(**SAM_TINY).period == 2


def test_sam_scan_matches_unrolled_and_loads():
  params = _random_params(sie.SamImageEncoder(**SAM_TINY), IMG)
  stacked = scan.stack_layers(params, "blocks_{i}", "blocks", period=2)
  # Group slot 1 holds the global blocks 1 and 3 (their tables span the 6x6 pretraining grid).
  assert stacked["blocks"]["blocks_1"]["attn"]["rel_pos_h"].shape == (2, 11, 8)
  assert stacked["blocks"]["blocks_0"]["attn"]["rel_pos_h"].shape == (2, 7, 8)
  np.testing.assert_array_equal(stacked["blocks"]["blocks_1"]["mlp"]["lin1"]["kernel"][1],
                                params["blocks_3"]["mlp"]["lin1"]["kernel"])
  (loss, _), grads = _value_and_grad(sie.SamImageEncoder(**SAM_TINY), params, IMG)
  model = sie.SamImageEncoder(**SAM_TINY, scan_layers=True)
  (loss_s, _), grads_s = _value_and_grad(model, stacked, IMG)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
  _assert_trees_close(grads, scan.unstack_layers(grads_s, "blocks_{i}", "blocks"))
  # Remat inside the group (values: the T5 and EVA02 tests) traces with drop path in training.
  remat = sie.SamImageEncoder(**SAM_TINY, scan_layers=True, remat=True, drop_path_rate=0.5)
  grad_fn = jax.grad(lambda p: remat.apply({"params": p}, IMG, train=True,
                                           rngs={"dropout": jax.random.key(0)})[0].sum())
  shapes = jax.eval_shape(grad_fn, stacked)
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(np.shape, stacked)

  init = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), IMG)["params"])
  neck = {f"neck.{n}": f"neck.{i}" for i, n in enumerate(("conv1", "ln1", "conv2", "ln2"))}
  loaded = sie.load_tensors(init, _torch_state(params, neck), "test", layout="timm")
  _assert_trees_close(stacked, loaded, tol=0)


# ---------------------------------------------------------------------------------------------
# Shared: logical axes, layouts, errors
# ---------------------------------------------------------------------------------------------
def test_stacked_params_have_the_layers_axis_first():
  _check_layers_axis(t5.T5(dataclasses.replace(T5_TINY, scan_layers=True)), "block", ENC, DEC)
  _check_layers_axis(eva02.Eva02(**EVA_TINY, scan_layers=True), "blocks", IMG)
  _check_layers_axis(sie.SamImageEncoder(**SAM_TINY, scan_layers=True), "blocks", IMG)


def test_stack_unstack_roundtrip_is_exact():
  rng = np.random.RandomState(0)
  tree = {"emb": rng.randn(3), "stack": {f"b_{i}": {"w": rng.randn(2, 3), "n": {"s": rng.randn(4)}}
                                         for i in range(6)}}
  stacked = scan.stack_layers(tree, "b_{i}", "b")
  assert stacked["stack"]["b"]["w"].shape == (6, 2, 3)
  np.testing.assert_array_equal(stacked["stack"]["b"]["n"]["s"][4], tree["stack"]["b_4"]["n"]["s"])
  grouped = scan.stack_layers(tree, "b_{i}", "b", period=3)
  assert sorted(grouped["stack"]["b"]) == ["b_0", "b_1", "b_2"]
  np.testing.assert_array_equal(grouped["stack"]["b"]["b_2"]["w"][1], tree["stack"]["b_5"]["w"])
  for back in (scan.unstack_layers(stacked, "b_{i}", "b"),
               scan.unstack_layers(grouped, "b_{i}", "b")):
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
      np.testing.assert_array_equal(x, y)
  abstract = scan.stack_layers(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                            tree), "b_{i}", "b")
  assert abstract["stack"]["b"]["w"].shape == (6, 2, 3)
  assert scan.is_stacked(stacked, "b") and not scan.is_stacked(tree, "b")


def test_layout_errors():
  with pytest.raises(ValueError, match="without gaps"):
    scan.stack_layers({"b_0": np.zeros(1), "b_2": np.zeros(1)}, "b_{i}", "b")
  with pytest.raises(ValueError, match="groups of 4"):
    scan.stack_layers({f"b_{i}": np.zeros(1) for i in range(6)}, "b_{i}", "b", period=4)
  with pytest.raises(ValueError, match="one '\\{i\\}'"):
    scan.stack_layers({}, "block", "b")
  with pytest.raises(ValueError, match="leading layer axis"):
    scan.unstack_layers({"b": {"w": np.zeros((2, 1)), "v": np.zeros((3, 1))}}, "b_{i}", "b")


def test_bad_remat_policy_raises():
  with pytest.raises(ValueError, match="Unknown remat policy 'everything'"):
    t5.T5Config(remat_policy="everything")
  for model in (eva02.Eva02(**EVA_TINY, remat=True, remat_policy="dots"),
                sie.SamImageEncoder(**SAM_TINY, scan_layers=True, remat_policy="dots")):
    with pytest.raises(ValueError, match="Unknown remat policy 'dots'"):
      jax.eval_shape(model.init, jax.random.key(0), IMG)
  assert layers.remat_policy("dots_saveable") is jax.checkpoint_policies.dots_saveable


def test_config_scan_fields_and_layout_conversion_of_the_whole_network():
  """configs/common.py's scan_layers fields reach every tower, and build.convert_layout maps the
  scanned network's parameter tree onto the unrolled one (the layout of converted weights) and
  back, path for path and shape for shape."""
  import flax.linen as nn
  from flax import traverse_util

  from configs import ln
  from pixel_llm.models import build

  unrolled_config = ln.get_config("toy")
  unrolled_config.model.sam.update(depth=4, global_attn_indexes=(1, 3))
  scanned_config = ln.get_config("toy")
  scanned_config.model.sam.update(depth=4, global_attn_indexes=(1, 3))
  for tower in ("sam", "eva02", "t5"):
    scanned_config.model[tower].scan_layers = True
  shapes = lambda t: {k: v.shape for k, v in traverse_util.flatten_dict(t).items()}  # noqa: E731
  plain = nn.meta.unbox(build.abstract_params(unrolled_config))
  scanned = nn.meta.unbox(build.abstract_params(scanned_config))
  assert any(k[:3] == ("t5", "encoder", "block") for k in shapes(scanned))
  assert any(k[:2] == ("eva02", "blocks") for k in shapes(scanned))
  assert any(k[:3] == ("sam_image_encoder", "blocks", "blocks_1") for k in shapes(scanned))
  as_unrolled = build.convert_layout(scanned, scanned_config.model, "unrolled")
  assert shapes(as_unrolled) == shapes(plain)
  back = build.convert_layout(as_unrolled, scanned_config.model, "scanned")
  assert shapes(back) == shapes(scanned)
