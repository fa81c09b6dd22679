"""Tests for pixel_llm.models.prompt_extractor (PixelLLM prompt feature extractor).

Parameters come from numpy on the `eval_shape`d init (no RNG compiles); applies are jitted.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np

from pixel_llm.models.layers import count_params
from pixel_llm.models.prompt_extractor import PRESETS, PromptFeatureExtractor


ShapeDtype = jax.ShapeDtypeStruct


def _abstract(model, b=1, h=27, w=27, c=1280, s=2):
  e = model.prompt_dim
  args = (ShapeDtype((b, h, w, c), jnp.float32), ShapeDtype((h, w, e), jnp.float32),
          ShapeDtype((b, s, e), jnp.float32), ShapeDtype((b, h, w, e), jnp.float32))
  return jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *args)


def test_param_count_release_preset():
  # Release size (D 512, depth 6, 8 heads, MLP 2048, C 1280, E 256, F 1024, Q 32):
  #   two-way transformer: per block self_attn 4*(512*512+512) = 1,050,624; two cross attns
  #     (internal 256) 2*(3*(512*256+256) + 256*512+512) = 1,051,136; mlp 512*2048+2048 +
  #     2048*512+512 = 2,099,712; 4 norms 4,096 -> 4,205,568 per block, x6 = 25,233,408;
  #     + final attn 525,568 + final norm 1,024 = 25,760,000 (the anchor's ~25.8 M).
  #   32 heads: 32*(512*1024+1024) = 16,809,984 (the anchor's ~16.8 M).
  #   image_projection_mlp 1280*512+512 = 655,872; prompt_embedding_projection_mlp (shared by
  #     sparse and dense prompts, as in the release) and image_pe_projection_mlp 2*(256*512+512)
  #     = 263,168; output_tokens 32*512 = 16,384.
  #   Total 43,505,408. The release also holds the unused dense_output_mlp 512*1024+1024 =
  #   525,312 (dropped here), giving its 44,030,720 (the anchor's ~44.0 M).
  model = PromptFeatureExtractor(**PRESETS["release"], output_dim=1024)
  params = _abstract(model)["params"]
  assert count_params(params) == 43_505_408
  assert count_params(params["transformer"]) == 25_760_000
  assert count_params(params["output_hypernetworks_mlps"]) == 16_809_984
  assert params["output_hypernetworks_mlps"]["kernel"].value.shape == (32, 512, 1024)
  assert params["output_hypernetworks_mlps"]["kernel"].names == ("tokens", "embed", "mlp")
  assert count_params(params) + 525_312 == 44_030_720
  # Paper preset: depth 2 -> 4 blocks fewer = 43,505,408 - 4*4,205,568.
  paper = _abstract(PromptFeatureExtractor(**PRESETS["paper"]))["params"]
  assert count_params(paper) == 43_505_408 - 4 * 4_205_568


def test_same_width_skips_prompt_projections():
  model = PromptFeatureExtractor(depth=1, width=16, num_heads=2, mlp_dim=32, num_output_tokens=3,
                                 output_dim=8, prompt_dim=16)
  params = _abstract(model, h=2, w=2, c=5)["params"]
  assert set(params) == {"image_projection_mlp", "output_tokens", "transformer",
                         "output_hypernetworks_mlps"}


def test_shapes_gradients_and_per_token_heads():
  b, h, w, c, s, e, q, f = 2, 3, 3, 12, 5, 8, 3, 10
  model = PromptFeatureExtractor(depth=1, width=16, num_heads=2, mlp_dim=32, num_output_tokens=q,
                                 output_dim=f, prompt_dim=e)
  abstract = _abstract(model, b, h, w, c, s)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), jnp.float32),
                        flax.linen.meta.unbox(abstract["params"]))
  norm = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  feats, pe, sparse, dense = norm(b, h, w, c), norm(h, w, e), norm(b, s, e), norm(b, h, w, e)

  def loss(params, feats, sparse, dense):
    tokens, aux = model.apply({"params": params}, feats, pe, sparse, dense, train=True)
    return jnp.sum(jnp.sin(tokens)), (tokens, aux)

  (_, (tokens, aux)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(
      params, feats, sparse, dense)
  assert tokens.shape == (b, q, f) and tokens.dtype == jnp.float32
  assert aux["output_tokens"].shape == (b, q, 16) and aux["image_tokens"].shape == (b, h, w, 16)
  for name, g in flax.traverse_util.flatten_dict(grads[0], sep="/").items():
    assert np.all(np.isfinite(g)) and np.any(g != 0), name
  for g in grads[1:]:
    assert np.all(np.isfinite(g)) and np.any(g != 0)
  # Token i goes through head i only.
  heads = params["output_hypernetworks_mlps"]
  for i in range(q):
    want = np.asarray(aux["output_tokens"][:, i]) @ np.asarray(heads["kernel"][i])
    want = want + np.asarray(heads["bias"][i])
    np.testing.assert_allclose(tokens[:, i], want, rtol=1e-5, atol=1e-5)


def test_image_pe_in_values_adds_the_pe_to_the_image_tokens():
  # With E == D the prompt projections are identities, so the option equals adding the PE to the
  # dense prompt (which is added to the image tokens) with the option off.
  b, h, w, c, s, d = 2, 3, 3, 6, 2, 16
  kw = dict(depth=1, width=d, num_heads=2, mlp_dim=32, num_output_tokens=3, output_dim=8,
            prompt_dim=d)
  on, off = PromptFeatureExtractor(**kw, image_pe_in_values=True), PromptFeatureExtractor(**kw)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), jnp.float32),
                        flax.linen.meta.unbox(_abstract(off, b, h, w, c, s)["params"]))
  norm = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  feats, pe, sparse, dense = norm(b, h, w, c), norm(h, w, d), norm(b, s, d), norm(b, h, w, d)
  run = jax.jit(lambda m, dense: m.apply({"params": params}, feats, pe, sparse, dense)[0],
                static_argnums=0)
  np.testing.assert_allclose(run(on, dense), run(off, dense + pe), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(run(on, dense) - run(off, dense))).max() > 1e-3


def test_dense_output_tokens_append_the_placed_image_tokens():
  b, h, w, c, s, e, q, f = 2, 3, 4, 6, 2, 8, 3, 10
  kw = dict(depth=1, width=16, num_heads=2, mlp_dim=32, num_output_tokens=q, output_dim=f,
            prompt_dim=e)
  on, off = PromptFeatureExtractor(**kw, dense_output_tokens=True), PromptFeatureExtractor(**kw)
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), jnp.float32),
                        flax.linen.meta.unbox(_abstract(on, b, h, w, c, s)["params"]))
  assert set(params) - set(_abstract(off, b, h, w, c, s)["params"]) == {"dense_output_mlp"}
  norm = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  feats, pe, sparse, dense = norm(b, h, w, c), norm(h, w, e), norm(b, s, e), norm(b, h, w, e)
  tokens, aux = on.apply({"params": params}, feats, pe, sparse, dense)
  plain, _ = off.apply({"params": {k: v for k, v in params.items() if k != "dense_output_mlp"}},
                       feats, pe, sparse, dense)
  assert tokens.shape == (b, q + h * w, f)
  np.testing.assert_allclose(tokens[:, :q], plain, rtol=1e-5, atol=1e-5)
  # Token q + i is image cell i (row-major) plus its projected PE, through dense_output_mlp.
  pos = np.asarray(pe) @ np.asarray(params["image_pe_projection_mlp"]["kernel"])
  pos = pos + np.asarray(params["image_pe_projection_mlp"]["bias"])
  placed = np.asarray(aux["image_tokens"]).reshape(b, h * w, -1) + pos.reshape(1, h * w, -1)
  mlp = params["dense_output_mlp"]
  want = placed @ np.asarray(mlp["kernel"]) + np.asarray(mlp["bias"])
  np.testing.assert_allclose(tokens[:, q:], want, rtol=1e-4, atol=1e-4)


def test_text_conditioned_reads_the_words_and_ignores_padding():
  b, h, w, c, s, e, q, f, dt = 2, 3, 3, 6, 2, 8, 3, 10, 12
  kw = dict(depth=2, width=16, num_heads=2, mlp_dim=32, num_output_tokens=q, output_dim=f,
            prompt_dim=e, text_conditioned=True)
  model = PromptFeatureExtractor(**kw)
  rng = np.random.default_rng(2)
  norm = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  feats, pe, sparse, dense = norm(b, h, w, c), norm(h, w, e), norm(b, s, e), norm(b, h, w, e)
  text, mask = norm(b, 3, dt), jnp.asarray([[True, True, False], [True, False, False]])
  params = model.init(jax.random.key(0), feats, pe, sparse, dense, text, mask)["params"]
  assert "text_projection_mlp" in params
  run = jax.jit(lambda t, m: model.apply({"params": params}, feats, pe, sparse, dense, t, m)[0])
  out = run(text, mask)
  # Padding words change nothing: other values there, or no padding slot at all.
  np.testing.assert_allclose(run(text.at[0, 2].set(5.0).at[1, 1:].set(-3.0), mask), out,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(run(text[:, :2], mask[:, :2])[0], out[0], rtol=1e-5, atol=1e-5)
  # Real words do.
  assert np.abs(np.asarray(run(text.at[0, 1].set(5.0), mask) - out))[0].max() > 1e-3
  with np.testing.assert_raises_regex(ValueError, "needs the prompt text"):
    model.apply({"params": params}, feats, pe, sparse, dense)


def test_place_logits_are_a_linear_read_of_the_image_tokens():
  b, h, w, c, s, e, q, f = 2, 3, 4, 6, 2, 8, 3, 10
  kw = dict(depth=1, width=16, num_heads=2, mlp_dim=32, num_output_tokens=q, output_dim=f,
            prompt_dim=e)
  rng = np.random.default_rng(3)
  norm = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  inputs = (norm(b, h, w, c), norm(h, w, e), norm(b, s, e), norm(b, h, w, e))
  model = PromptFeatureExtractor(**kw, place_logits=True)
  params = flax.linen.meta.unbox(model.init(jax.random.key(0), *inputs)["params"])
  tokens, aux = model.apply({"params": params}, *inputs)
  assert aux["place_logits"].shape == (b, h, w)
  head = params["place_head"]
  want = np.asarray(aux["image_tokens"]) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  np.testing.assert_allclose(aux["place_logits"], want[..., 0], rtol=1e-5, atol=1e-5)
  # The head adds an output only: the tokens are those of the extractor without it.
  plain = PromptFeatureExtractor(**kw)
  no_head = {k: v for k, v in params.items() if k != "place_head"}
  np.testing.assert_allclose(plain.apply({"params": no_head}, *inputs)[0], tokens, rtol=1e-6)
  assert "place_logits" not in plain.apply({"params": no_head}, *inputs)[1]
