"""Tests for pixel_llm.models.location_head (PixelLLM MlpPointPredictor)."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import erf

from pixel_llm.models.layers import count_params
from pixel_llm.models.location_head import LocationHead


def _abstract(model, d):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, d))))


def test_param_count_t5_xl_and_bert():
  # D = 2048 (Flan-T5-XL): LayerNorm 2*2048 = 4,096; Dense 2048*512+512 = 1,049,088;
  # 2 x Dense 512*512+512 = 525,312; Dense 512*(2*2)+4 = 2,052. Total 1,580,548 (~1.6 M).
  # (The release's last layer emits 2*4 values incl. unused logits: +2,052 -> 1,582,600.)
  params = _abstract(LocationHead(), 2048)["params"]
  assert count_params(params) == 1_580_548
  assert set(params) == {"LayerNorm_0", "mlp"}
  assert set(params["mlp"]) == {f"layers_{i}" for i in range(4)}
  # D = 768 (GIT/BERT): 1,536 + 393,728 + 525,312 + 2,052 = 922,628 (~0.9 M).
  assert count_params(_abstract(LocationHead(), 768)) == 922_628


def _numpy_reference(p, x, eps=1e-6):
  x = np.asarray(x, np.float64)
  ln = p["LayerNorm_0"]
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  x = (x - mu) / np.sqrt(var + eps) * ln["scale"] + ln["bias"]
  layers = p["mlp"]
  for i in range(len(layers)):
    x = x @ np.asarray(layers[f"layers_{i}"]["kernel"]) + layers[f"layers_{i}"]["bias"]
    if i < len(layers) - 1:
      x = 0.5 * x * (1 + erf(x / np.sqrt(2)))
  return x


def test_forward_matches_numpy_and_gradients():
  d, k = 12, 3
  model = LocationHead(hidden_dim=16, depth=4, num_points=k)
  clipped = LocationHead(hidden_dim=16, depth=4, num_points=k, clip=True)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32),
                        flax.linen.meta.unbox(_abstract(model, d)["params"]))
  hidden = jnp.asarray(rng.normal(size=(2, 5, d)), jnp.float32)

  def loss(params, hidden):
    points, aux = model.apply({"params": params}, hidden)
    return jnp.sum(jnp.sin(points)), (points, aux, clipped.apply({"params": params}, hidden)[0])

  (_, (points, aux, clip_points)), grads = jax.jit(
      jax.value_and_grad(loss, (0, 1), has_aux=True))(params, hidden)
  assert points.shape == (2, 5, k, 2) and points.dtype == jnp.float32
  raw = _numpy_reference(params, hidden).reshape(2, 5, k, 2)
  np.testing.assert_allclose(aux["raw"], raw, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(points, (raw + 1) / 2, rtol=1e-4, atol=1e-4)
  # Unclipped by default (the release); with these weights some points leave [0, 1].
  assert np.any((points < 0) | (points > 1))
  np.testing.assert_allclose(clip_points, np.clip(points, 0, 1), rtol=1e-5, atol=1e-6)
  for name, g in flax.traverse_util.flatten_dict(grads[0], sep="/").items():
    assert np.all(np.isfinite(g)) and np.any(g != 0), name
  assert np.all(np.isfinite(grads[1])) and np.any(grads[1] != 0)
