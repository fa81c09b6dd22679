"""T5 v1.1 / Flan-T5 (+ LoRA): parameter counts, HF parity, padding invariance, LoRA behaviour."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixel_llm.models import t5
from pixel_llm.models.layers import count_params
from pixel_llm.models.lora import LoraDense

# tests/conftest.py installs the torchvision import shim that transformers needs on CPU.
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.t5 import modeling_t5 as hf_t5  # pylint: disable=wrong-import-position
import hf_reference  # pylint: disable=wrong-import-position  (tests/hf_reference.py)

TINY = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                   num_decoder_layers=2, relative_attention_num_buckets=8,
                   relative_attention_max_distance=16, dropout_rate=0.0)


# XLA's CPU compile time dominates these tests; -O0 halves it and tiny programs run fast anyway.
# One jitted apply per config so tests that share input shapes share one compilation.
_JIT = dict(static_argnames=("method", "train"),
            compiler_options={"xla_backend_optimization_level": 0})
APPLY = jax.jit(t5.T5(TINY).apply, **_JIT)
ENC_LEN, DEC_LEN = 18, 8  # Long enough for the log-spaced and capped buckets of TINY (8, 16).


@functools.cache
def _init_shapes(cfg: t5.T5Config):
  tok = jnp.ones((1, 1), jnp.int32)
  return jax.eval_shape(lambda: t5.T5(cfg).init(jax.random.key(0), tok, tok))["params"]


def _lora_count(params) -> int:
  flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]
  return sum(int(np.prod(x.shape)) for p, x in flat if "lora" in jax.tree_util.keystr(p))


@pytest.mark.parametrize("variant,expected", [
    ("small", 76_961_152), ("base", 247_577_856), ("large", 783_150_080),
    ("xl", 2_849_757_184), ("xxl", 11_135_332_352)])
def test_param_counts_match_flan_t5(variant, expected):
  params = _init_shapes(t5.T5Config.preset(variant))
  assert count_params(params) == expected
  assert _lora_count(params) == 0


def test_lora_param_count_xl():
  params = _init_shapes(t5.T5Config.preset("xl", lora_rank=32))
  assert _lora_count(params) == 144 * 32 * (2048 + 2048) == 18_874_368
  assert count_params(params) == 2_849_757_184 + 18_874_368
  q = params["decoder"]["block_23"]["layer_1"]["EncDecAttention"]["q"]
  assert q["lora_a"].names == ("embed", "lora") and q["lora_b"].names == ("lora", "heads")
  assert "lora_a" not in params["encoder"]["block_0"]["layer_0"]["SelfAttention"]["k"]


def test_unknown_lora_target_rejected():
  with pytest.raises(ValueError):
    t5.T5Config(lora_targets=("encoder.cross.q",))


@pytest.mark.parity
def test_relative_position_bucket_matches_hf():
  rel = np.arange(-400, 400)[None, :] - np.arange(0, 3)[:, None]
  for bidirectional in (True, False):
    for nb, md in ((32, 128), (8, 16)):
      ref = hf_t5.T5Attention._relative_position_bucket(  # pylint: disable=protected-access
          torch.from_numpy(rel), bidirectional=bidirectional, num_buckets=nb, max_distance=md)
      got = t5.relative_position_bucket(jnp.asarray(rel, jnp.int32), bidirectional=bidirectional,
                                        num_buckets=nb, max_distance=md)
      np.testing.assert_array_equal(np.asarray(got), ref.numpy())


def test_lora_dense_init_and_forward():
  layer = LoraDense(6, ("embed", "heads"), rank=3, scale=2.0)
  x = jax.random.normal(jax.random.key(0), (2, 5))
  p = jax.jit(layer.init)(jax.random.key(1), x)["params"]
  assert p["lora_a"].names == ("embed", "lora") and p["lora_b"].names == ("lora", "heads")
  p = nn.meta.unbox(p)
  assert p["lora_a"].shape == (5, 3) and np.abs(p["lora_a"]).min() > 0
  np.testing.assert_array_equal(p["lora_b"], np.zeros((3, 6)))  # Starts as the base layer.
  p["lora_b"] = np.ones((3, 6), np.float32)
  np.testing.assert_allclose(jax.jit(layer.apply)({"params": p}, x),
                             x @ (p["kernel"] + 2.0 * p["lora_a"] @ p["lora_b"]), atol=1e-5)


# ---------------------------------------------------------------- HF parity


@pytest.fixture(scope="module")
def hf_model():
  return hf_reference.t5_v11(TINY)


@pytest.fixture(scope="module")
def tiny_params(hf_model, tmp_path_factory):
  """The tiny HF model through a real safetensors file and the real converter `t5.load`."""
  from safetensors.torch import save_model  # pylint: disable=import-outside-toplevel
  path = str(tmp_path_factory.mktemp("hf_t5") / "model.safetensors")
  save_model(hf_model, path)
  return t5.load(nn.meta.unbox(_init_shapes(TINY)), path)


def _tokens(rng, batch, length, low=1):
  return rng.integers(low, TINY.vocab_size, (batch, length)).astype(np.int32)


def _batch(seed):
  """Encoder tokens (2, ENC_LEN) with trailing padding in row 0; decoder tokens (2, DEC_LEN)."""
  rng = np.random.default_rng(seed)
  enc, dec = _tokens(rng, 2, ENC_LEN), _tokens(rng, 2, DEC_LEN, low=0)
  enc[0, 13:] = 0
  dec[:, 0] = 0  # T5's decoder start token is the pad id.
  return enc, dec


@pytest.mark.parity
def test_matches_hf_t5_v11(hf_model, tiny_params):
  def shapes(tree):
    return jax.tree.map(lambda x: x.shape, nn.meta.unbox(tree))
  assert shapes(tiny_params) == shapes(_init_shapes(TINY))  # The mapping covers every parameter.

  enc, dec = _batch(0)
  with torch.no_grad():
    out = hf_model(input_ids=torch.from_numpy(enc).long(),
                   attention_mask=torch.from_numpy(enc != 0),
                   decoder_input_ids=torch.from_numpy(dec).long(), output_hidden_states=True)
  logits, aux = APPLY({"params": tiny_params}, enc, dec)

  valid = enc != 0
  ref_encoded = out.encoder_last_hidden_state.numpy()
  for got, ref in ((np.asarray(aux["encoded"])[valid], ref_encoded[valid]),
                   (np.asarray(aux["hidden"]), out.decoder_hidden_states[-1].numpy()),
                   (np.asarray(logits), out.logits.numpy())):
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
  assert logits.dtype == jnp.float32 and logits.shape == (2, DEC_LEN, TINY.vocab_size)


# ---------------------------------------------------------------- behaviour


def test_trailing_padding_does_not_change_outputs(tiny_params):
  enc, dec = _batch(1)
  enc[:, 12:] = 0  # Both rows: 12 real tokens, then padding.
  logits, aux = APPLY({"params": tiny_params}, enc, dec)
  logits_short, aux_short = APPLY({"params": tiny_params}, enc[:, :12], dec)
  # Another length is another XLA program (other reduction blocking): float32 round-off reaches
  # ~1.4e-6 on these logits (|x| up to ~3; seen in CI). The same 6 positions as real tokens
  # instead of padding move them by 2.5.
  np.testing.assert_allclose(logits, logits_short, atol=1e-5, rtol=0)
  np.testing.assert_allclose(aux["encoded"][:, :12], aux_short["encoded"], atol=1e-5, rtol=0)


def test_methods_compose_like_call(tiny_params):
  variables = {"params": tiny_params}
  enc, dec = _batch(2)
  logits, aux = APPLY(variables, enc, dec)
  emb = APPLY(variables, enc, method="embed")
  assert emb.shape == (2, ENC_LEN, TINY.d_model)
  encoded = APPLY(variables, emb, enc != 0, method="encode")
  # A decoder key mask hides padded decoder positions from later queries only.
  dmask = np.ones(dec.shape, bool)
  dmask[0, 5] = False
  logits_m, hidden_m = APPLY(variables, encoded, enc != 0, dec, decoder_mask=dmask, method="decode")
  np.testing.assert_allclose(encoded, aux["encoded"], atol=1e-6)
  np.testing.assert_allclose(logits_m[1], logits[1], atol=1e-6)
  np.testing.assert_allclose(hidden_m[1], aux["hidden"][1], atol=1e-6)
  np.testing.assert_allclose(logits_m[0, :5], logits[0, :5], atol=1e-6)
  assert not np.allclose(logits_m[0, 6:], logits[0, 6:])


def _one_layer(params):
  """TINY's parameters cut to 1 encoder + 1 decoder block (halves compile time)."""
  def cut(sub):
    return {b: v for b, v in sub.items() if b != "block_1"}
  return {k: cut(sub) if k in ("encoder", "decoder") else sub for k, sub in params.items()}


def test_dropout_and_bfloat16(tiny_params):
  model = t5.T5(dataclasses.replace(TINY, num_layers=1, num_decoder_layers=1, dropout_rate=0.3,
                                    dtype=jnp.bfloat16))
  params = _one_layer(tiny_params)
  enc, dec = _batch(3)

  @functools.partial(jax.jit, compiler_options=_JIT["compiler_options"])
  @jax.vmap
  def train(key):
    return model.apply({"params": params}, enc, dec, train=True, rngs={"dropout": key})

  logits, aux = train(jax.random.split(jax.random.key(1), 2))
  assert logits.dtype == jnp.float32 and aux["hidden"].dtype == jnp.bfloat16
  assert np.isfinite(logits).all() and not np.allclose(logits[0], logits[1])


# ---------------------------------------------------------------- LoRA


LORA = dataclasses.replace(TINY, lora_rank=4, lora_targets=t5.LORA_TARGETS)
LORA_APPLY = jax.jit(t5.T5(LORA).apply, **_JIT)


def _split_lora(cfg, base_params, b_scale=0.0):
  """(LoRA factors, join) for `cfg`: A ~ N(0, 1/Din), B = b_scale * N(0, 1); join(lora) gives
  the full tree with the LoRA-off model's base weights."""
  shapes = nn.meta.unbox(_init_shapes(cfg))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  base_flat = dict(jax.tree_util.tree_flatten_with_path(base_params)[0])
  lora = {}
  for key, (path, x) in zip(keys, leaves):
    name = jax.tree_util.keystr(path)
    if name.endswith("'lora_a']"):
      lora[name] = jax.random.normal(key, x.shape) / np.sqrt(x.shape[0])
    elif name.endswith("'lora_b']"):
      lora[name] = b_scale * jax.random.normal(key, x.shape)
  def join(lo):
    return jax.tree_util.tree_unflatten(treedef, [
        lo[jax.tree_util.keystr(p)] if "lora" in jax.tree_util.keystr(p) else base_flat[p]
        for p, _ in leaves])
  return lora, join


def test_lora_zero_b_is_identity_and_nonzero_b_is_merged_update(tiny_params):
  lora, join = _split_lora(LORA, tiny_params)
  # 2 layers x 3 attentions x 4 projections x rank 4 x (in + out).
  assert sum(x.size for x in lora.values()) == 2 * 3 * 4 * 4 * (32 + 32)
  enc, dec = _batch(4)
  base = APPLY({"params": tiny_params}, enc, dec)[0]
  np.testing.assert_array_equal(LORA_APPLY({"params": join(lora)}, enc, dec)[0], base)

  lora, join = _split_lora(LORA, tiny_params, b_scale=0.1)
  params = join(lora)
  out = LORA_APPLY({"params": params}, enc, dec)[0]
  assert np.abs(out - base).max() > 1e-3

  def merge(node):  # W + scale * A @ B in a LoRA-off model must give the same outputs.
    if "lora_a" in node:
      return {"kernel": node["kernel"] + LORA.lora_scale * node["lora_a"] @ node["lora_b"]}
    return {k: merge(v) if isinstance(v, dict) else v for k, v in node.items()}
  merged = APPLY({"params": merge(params)}, enc, dec)[0]
  np.testing.assert_allclose(out, merged, atol=1e-4 * float(np.abs(merged).max()))


def test_lora_gradients(tiny_params):
  cfg = dataclasses.replace(LORA, num_layers=1, num_decoder_layers=1)
  lora, join = _split_lora(cfg, _one_layer(tiny_params))
  enc, dec = _batch(6)
  targets = np.roll(dec, -1, axis=1)

  @functools.partial(jax.jit, compiler_options=_JIT["compiler_options"])
  @jax.grad
  def grad_fn(lo):  # Gradient w.r.t. the LoRA factors only, as in frozen-base training.
    logits = t5.T5(cfg).apply({"params": join(lo)}, enc, dec)[0]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

  for name, g in grad_fn(lora).items():
    assert np.isfinite(g).all(), name
    if name.endswith("'lora_b']"):
      assert np.abs(g).max() > 0, name
    else:  # B = 0 blocks A's gradient at the first step.
      assert np.abs(g).max() == 0, name


def test_remat_keeps_parameters_outputs_and_gradients():
  """remat=True: the same parameter tree (checkpoints still load), the same loss and gradients,
  in training mode with dropout (the same dropout masks: `train` stays a static argument)."""
  base = dataclasses.replace(TINY, num_layers=1, num_decoder_layers=1)
  plain, remat = t5.T5(base), t5.T5(dataclasses.replace(base, remat=True))
  enc, dec = _batch(4)
  assert jax.tree.structure(_init_shapes(base)) == jax.tree.structure(
      _init_shapes(dataclasses.replace(base, remat=True)))
  params = nn.meta.unbox(plain.init(jax.random.key(0), enc, dec)["params"])

  def loss(model, p):
    logits, _ = model.apply({"params": p}, enc, dec, train=True,
                            rngs={"dropout": jax.random.key(2)})
    return jnp.mean(jax.nn.logsumexp(logits, -1))

  (l0, g0), (l1, g1) = [jax.jit(jax.value_and_grad(functools.partial(loss, m)),
                                compiler_options=_JIT["compiler_options"])(params)
                        for m in (plain, remat)]
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
