"""Tests for pixel_llm.models.two_way_transformer (SAM TwoWayTransformer).

Parameters come from numpy on the `eval_shape`d init (no RNG compiles); applies are jitted.
"""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixel_llm.models.layers import count_params
from pixel_llm.models.two_way_transformer import TwoWayTransformer


B, H, W, S, D = 2, 3, 4, 5, 16
TINY = dict(depth=2, embedding_dim=D, num_heads=2, mlp_dim=32)


def _inputs(seed=0, b=B, h=H, w=W, s=S, d=D):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return f(b, h, w, d), f(h, w, d), f(b, s, d)


def _abstract(model, *args):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *args))


@functools.cache
def _tiny(depth=TINY["depth"]):
  model = TwoWayTransformer(**{**TINY, "depth": depth})
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), jnp.float32),
                        flax.linen.meta.unbox(_abstract(model, *_inputs())["params"]))
  return model, {"params": params}


def test_param_count_sam_mask_decoder_size():
  # depth 2, D 256, 8 heads, MLP 2048, cross-attention internal dim 128:
  # self_attn 4 * (256*256 + 256) = 263,168; each cross attn 3 * (256*128 + 128) + (128*256 + 256)
  # = 131,712 (x2 = 263,424); mlp 256*2048 + 2048 + 2048*256 + 256 = 1,050,880; 4 norms 2,048.
  # Per block 1,579,520; 2 blocks 3,159,040; + final attn 131,712 + final norm 512 = 3,291,264.
  model = TwoWayTransformer()
  v = _abstract(model, *_inputs(h=2, w=2, d=256))
  assert count_params(v) == 3_291_264
  flat = flax.traverse_util.flatten_dict(v["params"], sep="/")
  assert flat["layers_0/cross_attn_token_to_image/q_proj/kernel"].value.shape == (256, 128)
  assert flat["layers_1/mlp/lin1/kernel"].names == ("embed", "mlp")
  assert {"final_attn_token_to_image/out_proj/bias", "norm_final_attn/scale",
          "layers_1/norm4/bias", "layers_0/cross_attn_image_to_token/v_proj/kernel"} <= set(flat)


def test_shapes_and_gradients():
  model, v = _tiny()
  img, pe, pts = _inputs(2)

  def loss(params, img, pts):
    q, k = model.apply({"params": params}, img, pe, pts)
    return jnp.sum(jnp.sin(q)) + jnp.sum(jnp.sin(k)), (q, k)

  (_, (q, k)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
      v["params"], img, pts)
  assert q.shape == (B, S, D) and k.shape == (B, H * W, D)
  for name, g in flax.traverse_util.flatten_dict(grads[0], sep="/").items():
    assert np.all(np.isfinite(g)) and np.any(g != 0), name
  for g in grads[1:]:
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_image_mask_equals_dropping_padded_tokens():
  model, v = _tiny(depth=1)  # one block keeps the compile small; masking is per attention call
  rng = np.random.default_rng(3)
  real, pad = 7, 5
  img = jnp.asarray(rng.normal(size=(B, 1, real + pad, D)), jnp.float32)
  pe = jnp.asarray(rng.normal(size=(1, real + pad, D)), jnp.float32)
  pts = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
  mask = jnp.arange(real + pad)[None].repeat(B, 0) < real

  @jax.jit
  def run(img, pe):
    masked = model.apply(v, img, pe, pts, image_mask=mask)
    short = model.apply(v, img[:, :, :real], pe[:, :real], pts)
    # Garbage in padded positions cannot leak into the tokens.
    noisy = model.apply(v, img.at[:, :, real:].set(1e3), pe, pts, image_mask=mask)
    return masked, short, noisy

  (q_masked, k_masked), (q_short, k_short), (q_noise, _) = run(img, pe)
  np.testing.assert_allclose(q_masked, q_short, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(k_masked[:, :real], k_short, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(q_noise, q_masked, rtol=1e-5, atol=1e-5)


def _to_hf_state_dict(params):
  """Our params -> HF SamTwoWayTransformer state_dict (Linear weight = kernel.T)."""
  flat = flax.traverse_util.flatten_dict(params)
  out = {}
  for path, val in flat.items():
    path = list(path)
    if path[-1] in ("kernel", "scale"):
      path[-1] = "weight"
    val = np.asarray(val)
    if path[-1] == "weight" and val.ndim == 2:
      val = val.T
    path = [p.replace("layers_", "layers.") if p.startswith("layers_") else p for p in path]
    path = ["layer_" + p if p.startswith("norm") else p for p in path]
    out[".".join(path)] = val
  return out


def test_parity_with_hf_sam_two_way_transformer():
  torch = pytest.importorskip("torch")
  sam = pytest.importorskip("transformers.models.sam.modeling_sam")
  from transformers import SamMaskDecoderConfig

  model, v = _tiny()
  # SAM's torch LayerNorms use eps 1e-5; HF's blocks default to 1e-6, so set it.
  cfg = SamMaskDecoderConfig(hidden_size=D, num_hidden_layers=TINY["depth"],
                             num_attention_heads=TINY["num_heads"], mlp_dim=TINY["mlp_dim"],
                             attention_downsample_rate=2, layer_norm_eps=1e-5)
  cfg._attn_implementation = "eager"
  ref = sam.SamTwoWayTransformer(cfg).eval()
  sd = {k: torch.from_numpy(val.copy()) for k, val in _to_hf_state_dict(v["params"]).items()}
  missing, unexpected = ref.load_state_dict(sd, strict=True)
  assert not missing and not unexpected

  img, pe, pts = _inputs(4)
  with torch.no_grad():
    tt = lambda x: torch.from_numpy(np.array(x))
    # HF layout: tokens [B, point_batch, S, D], maps NCHW.
    want_q, want_k = ref(
        point_embeddings=tt(pts)[:, None], image_embeddings=tt(img).permute(0, 3, 1, 2),
        image_positional_embeddings=tt(pe).permute(2, 0, 1)[None].expand(B, -1, -1, -1),
        attention_similarity=None)
  q, k = jax.jit(lambda v: model.apply(v, img, pe, pts))(v)
  np.testing.assert_allclose(q, want_q[:, 0].numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(k, want_k[:, 0].numpy(), rtol=1e-4, atol=1e-4)
