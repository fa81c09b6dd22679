"""The attention implementations (`layers.attention_implementation`, `config.model.attention_impl`):
jax.nn.dot_product_attention computes what the explicit einsums compute, for every shape the
towers use (leading batch dims, per-batch and shared biases, key padding masks), and the whole
network's loss does not depend on the choice. cuDNN needs a GPU: benchmarks/gpu_suite.sh runs it.
Shapes: B batch, T query length, S key length, N heads, Dh head width."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ln
from pixel_llm.models import build
from pixel_llm.models import layers
from pixel_llm.models import t5

_FAST = {"xla_backend_optimization_level": 0}  # tiny programs: compile time dominates


def _qkv(rng, lead, t, s, n=4, dh=8):
  q = jnp.asarray(rng.normal(size=lead + (t, n, dh)), jnp.float32)
  k = jnp.asarray(rng.normal(size=lead + (s, n, dh)), jnp.float32)
  v = jnp.asarray(rng.normal(size=lead + (s, n, dh)), jnp.float32)
  return q, k, v


@pytest.mark.parametrize("case", ["plain", "shared_bias", "batch_bias", "key_mask", "scale_1",
                                  "two_lead_dims"])
def test_dot_product_equals_einsums(case):
  rng = np.random.default_rng(0)
  lead = (2, 3) if case == "two_lead_dims" else (3,)
  q, k, v = _qkv(rng, lead, 5, 7)
  kw = {}
  if case == "shared_bias":  # T5's relative position bias: [1, N, T, S]
    kw["bias"] = jnp.asarray(rng.normal(size=(1, 4, 5, 7)), jnp.float32)
  if case == "batch_bias":  # SAM's decomposed relative positions: [B, N, T, S]
    kw["bias"] = jnp.asarray(rng.normal(size=(3, 4, 5, 7)), jnp.float32)
  if case in ("key_mask", "two_lead_dims"):  # padding: [..., 1, 1, S], every row keeps a key
    mask = rng.random(lead + (1, 1, 7)) > 0.4
    mask[..., 0] = True
    kw["mask"] = jnp.asarray(mask)
  if case == "scale_1":
    kw["scale"] = 1.0
  expected = layers.attention(q, k, v, **kw)
  with layers.attention_implementation("dot_product"):
    got = layers.attention(q, k, v, **kw)
  assert layers.current_attention_implementation() == "xla"  # restored on exit
  assert got.shape == expected.shape == q.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_empty_queries_under_a_fused_implementation():
  """T5 sets up its decoding cache with zero query tokens; the fused path cannot fold an empty
  batch (reshape(-1) of size 0), so empty attentions take the einsum path under every impl."""
  q, k, v = _qkv(np.random.default_rng(3), (3,), 0, 7)
  kw = {"bias": jnp.zeros((1, 4, 0, 7)), "mask": jnp.ones((3, 1, 1, 7), bool)}
  with layers.attention_implementation("dot_product"):
    got = layers.attention(q, k, v, **kw)
  assert got.shape == (3, 0, 4, 8)


def test_unknown_implementation_is_an_error():
  with pytest.raises(ValueError, match="flash"):
    with layers.attention_implementation("flash"):
      pass


def test_cudnn_refusal_falls_back_to_xla(monkeypatch):
  """cuDNN refuses some shapes at trace time (NotImplementedError, e.g. 34 queries over 729
  keys on an H200): that call runs through XLA instead of failing the whole model."""
  original = jax.nn.dot_product_attention
  calls = []

  def refusing(*args, implementation=None, **kwargs):
    calls.append(implementation)
    if implementation == "cudnn":
      raise NotImplementedError("Unsupported sequence length Q 5, KV 7.")
    return original(*args, implementation=implementation, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", refusing)
  q, k, v = _qkv(np.random.default_rng(2), (3,), 5, 7)
  with layers.attention_implementation("cudnn"):
    got = layers.attention(q, k, v)
  assert calls == ["cudnn", "xla"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(layers.attention(q, k, v)), rtol=1e-5,
                             atol=1e-5)


def _toy():
  config = ln.get_config("toy")
  config.model.image_size = 64
  config.model.sam.update(depth=1, global_attn_indexes=(0,))
  config.model.eva02.depth = 1
  config.model.t5.num_layers = config.model.t5.num_decoder_layers = 1
  config.input.update(max_target_len=6, max_context_len=4)
  return config


def test_network_loss_is_the_same_with_dot_product_attention():
  """Every tower (SAM windows + global, EVA02, the two-way transformer, T5 both stacks) routed
  through jax.nn.dot_product_attention gives the same loss and metrics."""
  config = _toy()
  xla_model = build.build_model(config)
  config.model.attention_impl = "dot_product"
  dp_model = build.build_model(config)
  assert dp_model.network.attention_impl == "dot_product"
  batch = build.example_batch(config, 2, abstract=False)
  rng = np.random.default_rng(1)
  batch["image"] = jnp.asarray(rng.random(batch["image"].shape), jnp.float32)
  batch["decoder_input_tokens"] = jnp.asarray(rng.integers(2, 128, (2, 1, 6)), jnp.int32)
  batch["decoder_target_tokens"] = jnp.asarray(rng.integers(2, 128, (2, 1, 6)), jnp.int32)
  batch["point_weights"] = jnp.ones_like(batch["point_weights"])
  params = jax.jit(xla_model.init_variables, compiler_options=_FAST)(jax.random.key(0),
                                                                     batch)["params"]
  (a, aux_a), (b, aux_b) = [
      jax.jit(lambda p, m=m: m.loss_fn(p, batch, None, train=False),
              compiler_options=_FAST)(params) for m in (xla_model, dp_model)]
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
  for key in ("caption_loss", "point_loss"):
    np.testing.assert_allclose(float(aux_a[key]), float(aux_b[key]), rtol=1e-5, atol=1e-6)


def test_t5_keeps_its_kernel_under_attention_dropout():
  """A fused kernel has no attention-probability dropout: in training with dropout T5 must run
  its own kernel (bitwise the same output); without dropout it may use the fused one."""
  cfg = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1,
                    num_decoder_layers=1, relative_attention_num_buckets=8,
                    relative_attention_max_distance=16, dropout_rate=0.3)
  model = t5.T5(cfg)
  rng = np.random.default_rng(0)
  enc = jnp.asarray(rng.integers(1, 64, (2, 9)), jnp.int32)
  dec = jnp.asarray(rng.integers(1, 64, (2, 5)), jnp.int32)
  params = model.init(jax.random.key(0), enc, dec)["params"]

  def run(impl, train):
    with layers.attention_implementation(impl):
      fn = jax.jit(lambda p: model.apply({"params": p}, enc, dec, train=train,
                                         rngs={"dropout": jax.random.key(3)})[0],
                   compiler_options=_FAST)
      return np.asarray(fn(params))

  np.testing.assert_array_equal(run("dot_product", True), run("xla", True))
  np.testing.assert_allclose(run("dot_product", False), run("xla", False), rtol=1e-5, atol=1e-5)
