"""Tests for pixel_llm.models.mask_adapter (gated mask adapter + box-prompted SAM decoder).

- Gate 0: BoxSegmenter matches transformers' SamModel (tiny random config, its safetensors file
  read through our SAM converters) for the same boxes, and equals plain PromptEncoder +
  MaskDecoder bitwise.
- Gate != 0: the output moves, depends on real text but not on padded text (even NaN), and an
  all-padded row stays finite.
- Every parameter has logical axes; only the adapter is trainable; at gate 0 only the gate gets a
  gradient.
"""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixel_llm.models import checkpoint_io
from pixel_llm.models import mask_adapter as ma
from pixel_llm.models.sam_mask_decoder import MaskDecoder
from pixel_llm.models.sam_prompt_encoder import PromptEncoder

D, H, W, SIZE = 32, 4, 4, 64  # tiny SAM: width 32, 4x4 embedding grid, 64 px frame
DQ, DT, Q, T, B = 12, 10, 3, 5, 2
# One two-way layer (HF num_hidden_layers=1) keeps the compiles short.
DECODER = dict(transformer_dim=D, iou_head_hidden_dim=24, transformer_mlp_dim=64,
               transformer_num_heads=2, transformer_depth=1)
ADAPTER = dict(width=D, depth=1, num_heads=2, mlp_dim=48)


def _model():
  return ma.BoxSegmenter(PromptEncoder(embed_dim=D), MaskDecoder(**DECODER),
                         ma.MaskAdapter(**ADAPTER))


def _inputs(seed=0, q=Q):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(B, H, W, D)).astype(np.float32)
  boxes = np.array([[3.0, 5.0, 40.0, 50.0], [10.0, 0.0, 63.0, 31.0]], np.float32)
  prompt = rng.normal(size=(B, q, DQ)).astype(np.float32)
  text = rng.normal(size=(B, T, DT)).astype(np.float32)
  mask = np.array([[True] * 3 + [False] * 2, [True] * 5])
  return image, boxes, prompt, text, mask


@functools.cache
def _shapes():
  model = _model()
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *map(jnp.asarray, _inputs())))


@jax.jit
def _run(params, image, boxes, prompt, text, mask):
  return _model().apply({"params": params}, image, boxes, prompt, text, mask)


def _with_gate(params, value):
  """The adapter's gate [2, D] set to `value` (a scalar or an array of that shape)."""
  gate = jnp.broadcast_to(jnp.float32(value), np.shape(params["mask_adapter"]["gate"]))
  adapter = {**params["mask_adapter"], "gate": gate}
  return {**params, "mask_adapter": adapter}


def _tiny_hf_sam(torch, transformers):
  config = transformers.SamConfig(
      vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         global_attn_indexes=[0], window_size=2, image_size=SIZE,
                         output_channels=D, mlp_dim=32, num_pos_feats=D // 2),
      prompt_encoder_config=dict(hidden_size=D, image_size=SIZE, patch_size=16),
      # segment-anything's two-way-block eps, which our decoder uses (see sam_mask_decoder.py).
      mask_decoder_config=dict(hidden_size=D, mlp_dim=64, num_attention_heads=2,
                               num_hidden_layers=1, iou_head_hidden_dim=24, layer_norm_eps=1e-5))
  torch.manual_seed(0)
  model = transformers.SamModel(config).eval()
  with torch.no_grad():  # HF initialises some tensors to ~0: make every one non-trivial
    for p in model.parameters():
      p.add_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.3))
  return model


@pytest.fixture(scope="module")
def sam(tmp_path_factory):
  """(torch, HF SamModel, our params with SAM loaded from its safetensors and a random adapter,
  the HF state dict as numpy)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  ref = _tiny_hf_sam(torch, transformers)
  state = {k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()}
  path = str(tmp_path_factory.mktemp("sam") / "model.safetensors")
  save_file(state, path)
  rng = np.random.default_rng(1)
  shapes = flax.linen.meta.unbox(_shapes()["params"])
  # Non-trivial adapter values (norm scales included); SAM parts are overwritten by the load.
  params = jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(np.float32), shapes)
  params = ma.load_sam(_with_gate(params, 0.0), path)
  numpy_state = {k: v.numpy() for k, v in state.items()}
  return torch, ref, jax.tree.map(jnp.asarray, params), numpy_state


def _hf(torch, ref, image, boxes):
  with torch.no_grad():
    out = ref(image_embeddings=torch.from_numpy(image).permute(0, 3, 1, 2),
              input_boxes=torch.from_numpy(boxes)[:, None], multimask_output=False)
  return out.pred_masks[:, 0].numpy(), out.iou_scores[:, 0].numpy()


def test_gate_zero_is_sam(sam):
  torch, ref, params, _ = sam
  inputs = _inputs()
  masks, iou, aux = _run(params, *inputs)
  assert masks.shape == (B, 1, 4 * H, 4 * W) and iou.shape == (B, 1)
  assert np.all(aux["gate"] == 0.0) and np.abs(aux["update"]).max() > 0.1
  want_masks, want_iou = _hf(torch, ref, *inputs[:2])
  assert np.abs(want_masks).max() > 1.0 and np.abs(want_iou).max() > 0.05
  scale = float(np.abs(want_masks).max())
  np.testing.assert_allclose(masks, want_masks, rtol=0, atol=1e-4 * scale)
  np.testing.assert_allclose(iou, want_iou, rtol=0, atol=1e-4)

  # Bitwise: plain PromptEncoder + MaskDecoder.
  def plain(params, image, boxes):
    pe, dec = PromptEncoder(embed_dim=D), MaskDecoder(**DECODER)
    v = {"params": params["prompt_encoder"]}
    sparse, dense = pe.apply(v, boxes=boxes, image_grid=(H, W), input_size=(SIZE, SIZE))
    image_pe = pe.apply(v, (H, W), method=PromptEncoder.get_dense_pe)
    return dec.apply({"params": params["mask_decoder"]}, image, image_pe, sparse, dense, False)

  plain_masks, plain_iou = jax.jit(plain)(params, *inputs[:2])
  np.testing.assert_array_equal(masks, plain_masks)
  np.testing.assert_array_equal(iou, plain_iou)


def test_gate_open_uses_real_text_only(sam):
  _, _, params, _ = sam
  image, boxes, prompt, text, mask = _inputs()
  gated = _with_gate(params, 0.5)
  base, _, aux0 = _run(params, image, boxes, prompt, text, mask)
  masks, iou, aux = _run(gated, image, boxes, prompt, text, mask)
  # sparse' = sparse + tanh(0.5) * update, the update being the same as at gate 0.
  np.testing.assert_allclose(aux["gate"], np.tanh(0.5), rtol=1e-6)
  np.testing.assert_array_equal(aux["update"], aux0["update"])
  # One gate per corner token and channel: open only corner 0, channel 0 and nothing else moves.
  one = _with_gate(params, np.pad(np.float32([[0.5]]), ((0, 1), (0, D - 1))))
  _, _, aux1 = _run(one, image, boxes, prompt, text, mask)
  moved = np.asarray(aux1["sparse"]) != np.asarray(aux0["sparse"])
  assert moved[:, 0, 0].all() and moved.sum() == moved[:, 0, 0].sum()
  np.testing.assert_allclose(aux["sparse"], aux0["sparse"] + np.tanh(0.5) * aux["update"],
                             rtol=1e-6, atol=1e-6)
  assert np.abs(masks - base).max() > 1e-2

  # Padded positions (row 0, tokens 3-4): new values, even NaN, change nothing.
  garbage = text.copy()
  garbage[0, 3:] = np.nan
  garbage[0, 4] = 1e6
  same, same_iou, _ = _run(gated, image, boxes, prompt, garbage, mask)
  np.testing.assert_array_equal(same, masks)
  np.testing.assert_array_equal(same_iou, iou)
  # A real position does change the output, of that row only.
  moved = text.copy()
  moved[0, 1] = np.random.default_rng(5).normal(size=DT)
  changed, _, _ = _run(gated, image, boxes, prompt, moved, mask)
  assert np.abs(changed[0] - masks[0]).max() > 1e-3
  np.testing.assert_array_equal(changed[1], masks[1])


def _adapter(params, sparse, prompt, text, mask):
  return ma.MaskAdapter(**ADAPTER).apply({"params": params}, sparse, prompt, text, mask)


def test_all_padded_row_is_finite(sam):
  _, _, params, _ = sam
  adapter = _with_gate(params, 0.5)["mask_adapter"]
  _, _, _, text, _ = _inputs()
  sparse = np.random.default_rng(2).normal(size=(B, 2, D)).astype(np.float32)
  empty = np.zeros((B, 0, DQ), np.float32)  # no prompt tokens: the text is the only memory
  none = np.zeros((B, T), bool)
  run = jax.jit(_adapter)
  out, aux = run(adapter, sparse, empty, text, none)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(aux["update"]))
  # Nothing to attend to: the text values are irrelevant, yet the gate still acts (the MLP path).
  other, _ = run(adapter, sparse, empty, np.full_like(text, np.nan), none)
  np.testing.assert_array_equal(other, out)
  assert np.abs(out - sparse).max() > 1e-2


def test_gradients_at_gate_zero_reach_only_the_gate(sam):
  _, _, params, _ = sam
  _, _, prompt, text, mask = _inputs()
  sparse = np.random.default_rng(3).normal(size=(B, 2, D)).astype(np.float32)
  loss = lambda p: jnp.sum(jnp.sin(_adapter(p, sparse, prompt, text, mask)[0]))
  grad = jax.jit(jax.grad(loss))
  flat = lambda p: flax.traverse_util.flatten_dict(grad(p["mask_adapter"]), sep="/")
  closed, opened = flat(params), flat(_with_gate(params, 0.5))
  assert set(closed) == set(opened) and "gate" in closed
  for name, g in closed.items():
    assert np.all(np.isfinite(g)), name
    assert np.any(g != 0) == (name == "gate"), name  # tanh(0) = 0 scales every other path
  for name, g in opened.items():
    assert np.all(np.isfinite(g)) and np.any(g != 0), name


def test_logical_axes_trainable_mask_and_load_errors(sam):
  boxed = _shapes()["params"]
  assert set(boxed) == {"prompt_encoder", "mask_adapter", "mask_decoder"}
  flat = flax.traverse_util.flatten_dict(boxed, sep="/")
  for path, leaf in flat.items():
    assert isinstance(leaf, flax.linen.LogicallyPartitioned), path
    assert len(leaf.names) == len(leaf.value.shape), path
  assert flat["mask_adapter/gate"].value.shape == (2, D)  # per box corner and channel
  assert flat["mask_adapter/prompt_proj/kernel"].names == (None, "embed")
  assert flat["mask_adapter/source_embed"].names == ("tokens", "embed")

  _, _, params, state = sam
  trainable = flax.traverse_util.flatten_dict(ma.trainable_mask(params), sep="/")
  assert set(trainable) == set(flax.traverse_util.flatten_dict(params, sep="/"))
  assert all(v == k.startswith("mask_adapter/") for k, v in trainable.items())

  # A missing SAM tensor is named; the adapter is never looked for in a SAM checkpoint.
  shapes = flax.linen.meta.unbox(boxed)
  tensors = [(k, v) for k, v in state.items() if k != "mask_decoder.mask_tokens.weight"]
  with pytest.raises(checkpoint_io.CheckpointMismatchError) as err:
    ma.load_sam_tensors(shapes, tensors, "partial")
  assert err.value.missing == ["mask_tokens"] and not err.value.unexpected
  with pytest.raises(ValueError, match="mask_decoder"):
    ma.load_sam_tensors({"prompt_encoder": {}}, tensors, "partial")


def test_bad_inputs_raise():
  model = _model()
  image, boxes, prompt, text, mask = map(jnp.asarray, _inputs())
  init = functools.partial(jax.eval_shape, model.init, jax.random.key(0))
  with pytest.raises(ValueError, match="boxes"):
    init(image, boxes[:, :2], prompt, text, mask)
  with pytest.raises(ValueError, match="text_mask"):
    init(image, boxes, prompt, text, mask[:, :2])
  with pytest.raises(ValueError, match="batch"):
    init(image, boxes, prompt[:1], text, mask)
  with pytest.raises(ValueError, match="needs prompt_tokens"):
    init(image, boxes)
