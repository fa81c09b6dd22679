"""The composed PixelLLM network and its model adapter on the toy config."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ln
from pixel_llm.models import build

B, R = 2, 2


@functools.lru_cache(maxsize=None)
def _setup():
  config = ln.get_config("toy")
  config.unlock()
  config.model.image_size = 64  # 4x4 token grids keep compiles short
  config.input.num_prompts = R
  config.input.max_target_len = 6
  config.input.max_context_len = 5
  model = build.build_model(config)
  batch = _batch(config, jax.random.key(1))
  params = model.init_variables(jax.random.key(0), batch)["params"]
  import flax.linen as nn
  params = nn.meta.unbox(params)
  # LoRA B starts at zero; perturb it so LoRA contributes and gets non-trivial gradients everywhere.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.01 if "lora_b" in jax.tree_util.keystr(p) else x, params)
  return config, model, params, batch


def _batch(config, key):
  s = config.model.image_size
  t = config.input.max_target_len
  c = config.input.max_context_len
  v = config.model.t5.vocab_size
  k = config.model.location_head.num_points
  keys = jax.random.split(key, 5)
  targets = jax.random.randint(keys[0], (B, R, t), 2, v)
  targets = targets.at[:, :, -1].set(1).at[1, 1, 3:].set(0).at[1, 1, 2].set(1)  # EOS, padding
  boxes = jnp.array([[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.6, 0.7]])
  return {
      "image": jax.random.uniform(keys[1], (B, s, s, 3)),
      "prompt_boxes": jnp.broadcast_to(boxes, (B, R, 4)),
      "prompt_text": jnp.concatenate(
          [jax.random.randint(keys[2], (B, R, 3), 2, v), jnp.zeros((B, R, c - 3), jnp.int32)], -1),
      "decoder_input_tokens": jnp.concatenate(
          [jnp.zeros((B, R, 1), jnp.int32), targets[..., :-1]], -1),
      "decoder_target_tokens": targets,
      "point_targets": jax.random.uniform(keys[3], (B, R, t, k, 2)),
      "point_weights": (targets > 1).astype(jnp.float32),
  }


def _forward(model, params, batch):
  kw = {k: batch[k] for k in ("prompt_boxes", "prompt_text") if k in batch}
  return _jit_apply(model.network)(params, batch["image"], batch["decoder_input_tokens"], **kw)


@functools.lru_cache(maxsize=None)
def _jit_apply(network):
  return jax.jit(lambda params, *a, **kw: network.apply({"params": params}, *a, **kw))


def test_forward_shapes_and_finite():
  config, model, params, batch = _setup()
  out, aux = _forward(model, params, batch)
  t, v = config.input.max_target_len, config.model.t5.vocab_size
  assert out["logits"].shape == (B, R, t, v)
  assert out["points"].shape == (B, R, t, 2, 2)
  assert aux["hidden"].shape == (B, R, t, config.model.t5.d_model)
  q = config.model.prompt_extractor.num_output_tokens
  assert aux["visual_tokens"].shape == (B, R, q, config.model.t5.d_model)
  assert np.isfinite(out["logits"]).all() and np.isfinite(out["points"]).all()


def test_every_trainable_component_gets_a_gradient():
  _, model, params, batch = _setup()
  grads = jax.jit(jax.grad(lambda p: model.loss_fn(p, batch, jax.random.key(2))[0]))(params)
  for name, sub in grads.items():
    leaves = jax.tree.leaves(sub)
    assert all(np.isfinite(x).all() for x in leaves), name
    total = sum(float(jnp.abs(x).sum()) for x in leaves)
    assert total > 0, f"{name} has an all-zero gradient"


def test_padded_prompt_text_does_not_change_outputs():
  config, model, params, batch = _setup()
  out, _ = _forward(model, params, batch)
  longer = dict(batch, prompt_text=jnp.concatenate(
      [batch["prompt_text"], jnp.zeros((B, R, 4), jnp.int32)], -1))
  out2, _ = _forward(model, params, longer)
  np.testing.assert_allclose(out["logits"], out2["logits"], atol=1e-5)
  np.testing.assert_allclose(out["points"], out2["points"], atol=1e-6)
  # And the text does matter when it is not padding.
  other = dict(batch, prompt_text=batch["prompt_text"].at[:, :, 0].add(1))
  assert not np.allclose(_forward(model, params, other)[0]["logits"], out["logits"], atol=1e-5)


def test_several_prompts_per_image_equal_one_at_a_time():
  _, model, params, batch = _setup()
  out, _ = _forward(model, params, batch)
  for r in range(R):
    single = {k: v[:, r:r + 1] if v.ndim >= 2 and k != "image" else v for k, v in batch.items()}
    one, _ = _forward(model, params, single)
    np.testing.assert_allclose(one["logits"][:, 0], out["logits"][:, r], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(one["points"][:, 0], out["points"][:, r], atol=1e-5)
  # Different boxes give different visual tokens.
  assert not np.allclose(out["logits"][:, 0], out["logits"][:, 1], atol=1e-4)


def test_no_location_prompt_means_the_whole_image_box():
  _, model, params, batch = _setup()
  whole = dict(batch, prompt_boxes=jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0, 1.0]), (B, R, 4)))
  no_box = {k: v for k, v in batch.items() if k != "prompt_boxes"}
  np.testing.assert_allclose(_forward(model, params, whole)[0]["logits"],
                             _forward(model, params, no_box)[0]["logits"], atol=1e-6)


def test_loss_metrics_and_caption_mask():
  _, model, params, batch = _setup()
  loss_fn = jax.jit(lambda p, b: model.loss_fn(p, b, None, train=False))
  loss, metrics = loss_fn(params, batch)
  assert np.isfinite(loss)
  # The point term is in pixels of the 64-px toy image, as the release's (weight 0.1).
  np.testing.assert_allclose(loss, metrics["caption_loss"] + 0.1 * 64 * metrics["point_loss"],
                             rtol=1e-6)
  assert metrics["num_text_tokens"] == float((batch["decoder_target_tokens"] > 0).sum())
  # A referring-style batch: caption loss switched off, only the point loss remains.
  off = dict(batch, caption_weights=jnp.zeros((B, R)))
  loss_off, m_off = loss_fn(params, off)
  assert m_off["num_text_tokens"] == 0
  np.testing.assert_allclose(loss_off, 0.1 * 64 * m_off["point_loss"], rtol=1e-6)


def test_place_loss_trains_the_place_head_through_the_extractor():
  """loss.place_weight with the extractor's place_logits: the term joins the loss and its
  gradient reaches the place head and the extractor's transformer; without the head it is a
  clear error. (loss.giou_weight's term joins the same loss.)"""
  config, _, _, batch = _setup()
  config = config.copy_and_resolve_references()
  config.model.prompt_extractor.place_logits = True
  config.loss.place_weight = 0.5
  config.loss.giou_weight = 2.0  # the box GIoU deviation rides along: one more compile saved
  model = build.build_model(config)
  import flax.linen as nn
  params = nn.meta.unbox(model.init_variables(jax.random.key(0), batch)["params"])
  loss_fn = lambda p: model.loss_fn(p, batch, None, train=False)  # noqa: E731
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert metrics["place_prompts"] == B * R  # every prompt has weighted (random) boxes
  np.testing.assert_allclose(loss, metrics["caption_loss"] + 0.1 * 64 * metrics["point_loss"]
                             + 0.5 * metrics["place_loss"] + 2.0 * metrics["giou_loss"],
                             rtol=1e-6)
  assert 0.0 < metrics["giou_loss"] < 2.0
  extractor = grads["prompt_extractor"]
  assert float(jnp.abs(extractor["place_head"]["kernel"]).sum()) > 0
  assert float(jnp.abs(extractor["image_projection_mlp"]["kernel"]).sum()) > 0
  config.model.prompt_extractor.place_logits = False
  with pytest.raises(ValueError, match="place_logits"):
    build.build_model(config).loss_fn(params, batch, None, train=False)


def test_a_few_adam_steps_reduce_the_loss():
  import optax
  _, model, params, batch = _setup()
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(lambda p: model.loss_fn(p, batch, None, train=False)[0])(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  losses = []
  for _ in range(8):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], losses


def test_greedy_prediction_shapes_and_eos_handling():
  config, model, params, batch = _setup()
  pred = jax.jit(lambda p, b: model.predict_batch(p, b, max_decode_len=5))(params, batch)
  assert pred["tokens"].shape == (B, R, 5)
  assert pred["points"].shape == (B, R, 5, 2, 2)
  assert pred["scores"].shape == (B, R)
  tokens = np.asarray(pred["tokens"])
  for row in tokens.reshape(-1, 5):
    eos = np.where(row == 1)[0]
    if eos.size:
      assert (row[eos[0] + 1:] == 0).all()


def test_wrong_image_size_is_a_clear_error():
  _, model, params, batch = _setup()
  bad = dict(batch, image=jnp.zeros((B, 32, 32, 3)))
  with pytest.raises(ValueError, match="Expected images of 64x64"):
    _forward(model, params, bad)


def test_mask_decoder_segments_each_prompt_box():
  config = ln.get_config("toy")
  config.model.image_size = 64
  config.model.sam.out_chans = config.model.prompt_encoder.embed_dim
  config.model.mask_decoder = dict(enabled=True, transformer_dim=config.model.sam.out_chans,
                                   transformer_mlp_dim=32, transformer_num_heads=2,
                                   iou_head_hidden_dim=16)
  config.input.num_prompts = R
  config.input.max_target_len = 6
  config.input.max_context_len = 5
  model = build.build_model(config)
  batch = _batch(config, jax.random.key(1))
  params = jax.jit(model.init_variables)(jax.random.key(0), batch)["params"]
  import flax.linen as nn
  params = nn.meta.unbox(params)
  (_, aux) = _forward(model, params, batch)
  grid = 64 // 16
  assert aux["masks"].shape == (B, R, 4 * grid, 4 * grid)
  assert aux["iou_predictions"].shape == (B, R)
  assert np.isfinite(np.asarray(aux["masks"])).all()
  # The two prompt boxes of one image give different masks.
  assert np.abs(np.asarray(aux["masks"][:, 0] - aux["masks"][:, 1])).max() > 1e-4
  config.model.sam.out_chans = 256
  with pytest.raises(ValueError, match="out_chans"):
    build.build_model(config)
