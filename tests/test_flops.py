"""Tests for `pixel_llm.tools.flops`: the analytic count against XLA's, hand-computed blocks, and
the training multipliers read from `frozen_params`.

  JAX_PLATFORMS=cpu python -m pytest -q tests/test_flops.py

Nothing is executed on arrays: XLA's numbers come from lowered (uncompiled) programs, whose
shapes come from `jax.eval_shape`.
"""
import json
import math
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from configs import common, ln
from pixel_llm import chips
from pixel_llm.models import build
from pixel_llm.models import sam_image_encoder
from pixel_llm.models import t5 as t5_lib
from pixel_llm.tools import flops

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _toy(image_size: int = 160, frozen=()):
  """The toy config (everything trainable). At 160 px SAM's 10x10 grid pads to 12x12 for its
  4x4 windows and is resized to EVA02's 11x11 grid, so both of those paths are counted."""
  config = ln.get_config("toy")
  config.model.image_size = image_size
  config.frozen_params = tuple(frozen)
  return config


def _hlo_ops(lowered, op: str):
  """(output shape, operand names, HLO line, {name: shape} so far) of every `op` instruction in
  the lowered (unoptimised) HLO."""
  shapes = {}
  for line in lowered.compiler_ir("hlo").as_hlo_text().splitlines():
    m = re.match(r"\s*(?:ROOT )?([\w.\-]+) = \w+\[([\d,]*)\]\S* ([\w\-]+)\((.*)", line)
    if not m:
      continue
    shapes[m[1]] = [int(x) for x in m[2].split(",") if x]
    if m[3] == op:
      yield shapes[m[1]], [x.strip() for x in m[4].split(")")[0].split(",")], line, shapes


def _dot_flops(lowered) -> int:
  """2 x output size x contracted size of every `dot` in the lowered HLO: XLA's matmul FLOPs
  without its elementwise ones (convolutions are not dots)."""
  total = 0
  for out, (lhs, _), line, shapes in _hlo_ops(lowered, "dot"):
    dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)[1]
    total += 2 * math.prod(out) * math.prod(shapes[lhs][int(i)] for i in dims.split(",") if i)
  return total


def _conv_flops(lowered) -> int:
  """2 x batch x output features x input features x the kernel taps that land on real input
  (not on padding, nor on the holes of a transposed conv's dilated input) of every convolution
  in the lowered HLO (`dim_labels=b01f_01io->b01f`, as flax's NHWC convs lower)."""
  total = 0
  for out, (lhs, rhs), line, shapes in _hlo_ops(lowered, "convolution"):
    assert "dim_labels=b01f_01io->b01f" in line and "feature_group" not in line, line
    window = dict(re.findall(r"(\w+)=([\dx_]+)", re.search(r"window=\{([^}]*)\}", line)[1]))
    dims = len(shapes[rhs]) - 2
    per_dim = lambda key, default: window.get(key, "x".join([default] * dims)).split("x")
    taps = 1
    for i, (k, st, pad, ld, rd) in enumerate(zip(
        per_dim("size", "1"), per_dim("stride", "1"), per_dim("pad", "0_0"),
        per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1"))):
      k, st, ld, rd, lo = int(k), int(st), int(ld), int(rd), int(pad.split("_")[0])
      n = shapes[lhs][1 + i]
      taps *= sum(1 for o in range(out[1 + i]) for j in range(k)
                  if 0 <= o * st + j * rd - lo <= (n - 1) * ld and (o * st + j * rd - lo) % ld == 0)
    total += 2 * out[0] * out[-1] * shapes[rhs][-2] * taps
  return total


@pytest.fixture(scope="module")
def lowered():
  return _lowered_groups(_toy())


def _lowered_groups(config):
  """{group: (lowered program, analytic forward FLOPs)} for the network's pieces."""
  model = build.build_model(config)
  net = model.network
  batch = build.example_batch(config, 1)
  params = nn.meta.unbox(
      jax.eval_shape(model.init_variables, jax.random.key(0), batch)["params"])

  def lower(fn, *args):
    return jax.jit(fn).lower(*args)

  def method(name):
    return lambda p, *a, **kw: net.apply({"params": p}, *a, method=getattr(net, name), **kw)

  image = batch["image"]
  feats = jax.eval_shape(method("encode_image"), params, image)
  encode_prompts = lambda p, f, b, t: method("encode_prompts")(p, f, boxes=b, prompt_text=t)
  visual = jax.eval_shape(encode_prompts, params, feats, batch["prompt_boxes"],
                          batch["prompt_text"])
  encode_prefix = lambda p, v, t: method("encode_prefix")(p, v, t)[0]
  encoded, mask = jax.eval_shape(method("encode_prefix"), params, visual, batch["prompt_text"])
  tokens = batch["decoder_input_tokens"]
  tokens = jax.ShapeDtypeStruct((tokens.shape[0] * tokens.shape[1], tokens.shape[2]), tokens.dtype)
  f = flops.forward_flops(config)
  return {
      # SAM's count includes resizing its map to EVA02's grid, which `encode_image` does.
      "image_towers": (lower(method("encode_image"), params, image),
                       f["sam_image_encoder"] + f["eva02"]),
      "sam_image_encoder": (lower(lambda p, x: net.sam_image_encoder.apply({"params": p}, x)[0],
                                  params["sam_image_encoder"], image), f["sam_image_encoder"]),
      "eva02": (lower(lambda p, x: net.eva02.apply({"params": p}, x)[0], params["eva02"], image),
                f["eva02"]),
      "prompt": (lower(encode_prompts, params, feats, batch["prompt_boxes"], batch["prompt_text"]),
                 f["prompt_encoder"] + f["prompt_extractor"] + f["visual_projection"]),
      "t5_encoder": (lower(encode_prefix, params, visual, batch["prompt_text"]),
                     f["t5_encoder"]),
      "t5_decoder": (lower(method("decode"), params, encoded, mask, tokens),
                     f["t5_decoder"] + f["location_head"]),
      "loss": (lower(lambda p, b: model.loss_fn(p, b, None, train=False)[0], params, batch),
               sum(f.values())),
  }


def test_forward_count_is_just_below_xla_cost_analysis(lowered):
  # XLA's count adds elementwise ops (norms, softmax, GELU, RoPE, biases, the loss) to the same
  # matmuls; on the toy they are 1.5-4 % of it (measured: 0.961-0.985 per group).
  for name, (program, analytic) in lowered.items():
    ratio = analytic / program.cost_analysis()["flops"]
    assert 0.93 < ratio <= 1.0, (name, ratio)
    print(f"{name}: analytic / XLA = {ratio:.3f}")


def test_matmul_count_equals_xla_dots_exactly(lowered):
  # Pieces without convolutions: every counted FLOP is a dot, and every dot is counted.
  for name in ("prompt", "t5_encoder", "t5_decoder"):
    program, analytic = lowered[name]
    assert _dot_flops(program) == analytic, name
  # EVA02 = dots + its patch conv: 11x11 patches of 14x14x3 pixels into 64 channels.
  program, analytic = lowered["eva02"]
  assert _dot_flops(program) + 2 * 121 * (14 * 14 * 3) * 64 == analytic
  # SAM = dots (windowed blocks on the padded grid included) + its convs (patch 16x16x3 -> 64,
  # neck 1x1 64 -> 256 and 3x3 256 -> 256 with 28 of 30 taps per axis on the 10x10 grid) + the
  # bicubic resize of its 256-channel map from 10x10 to EVA02's 11x11 (done by encode_image).
  program, analytic = lowered["sam_image_encoder"]
  convs = 2 * 100 * (16 * 16 * 3) * 64 + 2 * 100 * 64 * 256 + 2 * (28 * 28) * 256 * 256
  resize = 2 * 11 * 10 * (10 * 256) + 2 * 11 * 10 * (11 * 256)
  assert _dot_flops(program) + convs + resize == analytic


@pytest.mark.parametrize("option", ["dense_output_tokens", "text_conditioned"])
def test_extractor_deviations_are_counted_exactly(option):
  # dense_output_tokens: the extractor's 11x11 image tokens join its 16 learnt ones (the
  # dense_output_mlp, the visual projection and T5 over 16 + 121 visual tokens);
  # text_conditioned: the C prompt words join its tokens (their projection, longer attention).
  # Either way every counted FLOP is still a dot and every dot is counted.
  config = _toy()
  config.model.prompt_extractor[option] = True
  groups = _lowered_groups(config)
  for name in ("prompt", "t5_encoder", "t5_decoder"):
    program, analytic = groups[name]
    assert _dot_flops(program) == analytic, name
  plain, changed = flops.forward_flops(_toy()), flops.forward_flops(config)
  if option == "dense_output_tokens":
    assert changed["t5_encoder"] > 3 * plain["t5_encoder"]
  else:
    assert changed["prompt_extractor"] > plain["prompt_extractor"]
    assert changed["t5_encoder"] == plain["t5_encoder"]


def test_place_head_is_counted_where_the_loss_reads_it():
  # One logit per image token of the 11x11 grid at the extractor's width 64; the place loss is
  # the head's only reader, so without it XLA drops the head and the count leaves it out too.
  def loss_dots(config):
    return _dot_flops(_lowered_groups(config)["loss"][0])

  plain = _toy()
  on = _toy()
  on.model.prompt_extractor.place_logits = True
  on.loss.place_weight = 1.0
  head = 2 * 121 * 64
  assert loss_dots(on) - loss_dots(plain) == head
  assert flops.forward_flops(on)["prompt_extractor"] == (
      flops.forward_flops(plain)["prompt_extractor"] + head)
  on.loss.place_weight = 0.0
  assert loss_dots(on) == loss_dots(plain)
  assert flops.forward_flops(on) == flops.forward_flops(plain)


def test_mask_decoder_and_adapter_are_counted_exactly():
  # The seg toy's mask path (`predict_masks`): R box prompts on SAM's 8x8 neck map, the adapter
  # reading the visual tokens and T5's decoder states. Every counted FLOP is a dot except the two
  # transposed convs (8x8 -> 16x16 at 64 -> 16 channels, 16x16 -> 32x32 at 16 -> 8, one kernel tap
  # per output pixel), and every dot is counted.
  from configs import refcoco_seg
  config = refcoco_seg.get_config("toy")
  net = build.build_network(config.model)
  batch = build.example_batch(config, 1)
  params = nn.meta.unbox(jax.eval_shape(build.build_model(config).init_variables,
                                        jax.random.key(0), batch)["params"])
  r, t = batch["decoder_input_tokens"].shape[1:]
  method = lambda name: lambda p, *a, **kw: net.apply({"params": p}, *a,
                                                      method=getattr(net, name), **kw)
  _, sam = jax.eval_shape(lambda p, x: method("encode_image")(p, x, return_sam=True), params,
                          batch["image"])
  visual = jax.eval_shape(lambda p, f, b, x: method("encode_prompts")(p, f, boxes=b,
                                                                      prompt_text=x),
                          params, jax.eval_shape(method("encode_image"), params, batch["image"]),
                          batch["prompt_boxes"], batch["prompt_text"])
  q, dq = visual.shape[2:]
  adapter_inputs = (jax.ShapeDtypeStruct((r, q, dq), visual.dtype),
                    jax.ShapeDtypeStruct((r, t, net.t5.config.d_model), visual.dtype),
                    jax.ShapeDtypeStruct((r, t), bool))
  program = jax.jit(method("predict_masks")).lower(params, sam, batch["prompt_boxes"],
                                                   adapter_inputs)
  f = flops.forward_breakdown(config)
  box, dense_pe = flops._prompt_encoder(net.prompt_encoder, 8)
  analytic = (f["mask_decoder"]["weights"] + f["mask_decoder"]["attention"]
              + sum(f["mask_adapter"].values()) + r * box["weights"] + dense_pe["weights"])
  convs = 2 * (16 * 16) * 64 * 16 + 2 * (32 * 32) * 16 * 8
  assert _dot_flops(program) + r * convs == analytic
  # XLA also counts the elementwise work, here a larger share than elsewhere (0.85 measured):
  # at width 64 the upscaled maps' norms and GELUs weigh more against the narrow matmuls.
  assert 0.8 < analytic / program.cost_analysis()["flops"] <= 1.0
  # Only the adapter and the location head train in the release's refseg stage: the decoder
  # passes gradients to the adapter (2x its weights, 3x its activation products), no more.
  config.frozen_params = (r"^(?!mask_adapter/|location_head/)",)
  c = flops.train_flops(config)["components"]
  dec = f["mask_decoder"]
  assert c["mask_decoder"]["gradients"] and not c["mask_decoder"]["trains"]
  assert c["mask_decoder"]["train"] == pytest.approx(2 * dec["weights"] + 3 * dec["attention"])
  assert c["mask_adapter"]["multiplier"] == pytest.approx(3.0)


def test_conv_counter_agrees_with_the_hand_counts():
  # The SAM convs hand-counted above (patch, neck 1x1 and 3x3 with 28 of 30 taps per axis).
  program, _ = _lowered_groups(_toy())["sam_image_encoder"]
  assert _conv_flops(program) == (2 * 100 * (16 * 16 * 3) * 64 + 2 * 100 * 64 * 256
                                  + 2 * (28 * 28) * 256 * 256)


def test_proposal_and_roi_heads_are_counted_exactly():
  # The dense-captioning toy's heads on its 9x9 fused map (SAM's 256 + EVA02's 64 channels): the
  # proposal head is all convs (the pyramid's transposed conv has one tap per output pixel, the
  # 3x3 convs lose their taps on the padding), the RoI head's fully connected layers are dots on
  # its training samples.
  from configs import vg_densecap
  config = vg_densecap.get_config("toy")
  net = build.build_network(config.model)
  f = flops.forward_breakdown(config)
  feats = jax.ShapeDtypeStruct((1, 9, 9, 320), jax.numpy.float32)
  params = jax.eval_shape(net.proposal_head.init, jax.random.key(0), feats)
  program = jax.jit(net.proposal_head.apply).lower(params, feats)
  assert _dot_flops(program) == 0
  assert _conv_flops(program) == f["proposal_head"]["weights"] == sum(f["proposal_head"].values())
  levels = jax.eval_shape(net.proposal_head.apply, params, feats)["levels"]
  strides = net.proposal_head.strides
  boxes = jax.ShapeDtypeStruct((1, net.roi_head.samples_per_image, 4), jax.numpy.float32)
  roi_params = jax.eval_shape(lambda: net.roi_head.init(jax.random.key(0), levels, strides,
                                                        boxes))
  program = jax.jit(lambda p, lv, b: net.roi_head.apply(p, lv, strides, b)).lower(
      roi_params, levels, boxes)
  assert _conv_flops(program) == 0
  assert _dot_flops(program) == sum(f["roi_head"].values()) > 0
  # Both train (the proposal head reads the towers, which train too: 3x), nothing is left out.
  c = flops.train_flops(config)["components"]
  assert c["proposal_head"]["multiplier"] == c["roi_head"]["multiplier"] == pytest.approx(3.0)


def test_hand_computed_sam_blocks_with_window_padding():
  # 160 px: a 10x10 grid; block 0 windowed (4x4 windows: the grid pads to 12x12 = 9 windows of
  # 16 tokens), block 1 global; tables stored for this grid, so nothing is resampled.
  enc = sam_image_encoder.SamImageEncoder(width=32, depth=2, num_heads=2, global_attn_indexes=(1,),
                                          window_size=4, pretrain_img_size=160, out_chans=16)
  f = flops._sam(enc, 160, fused_grid=10)
  patch = 2 * 100 * (16 * 16 * 3) * 32
  windowed = (2 * 144 * 32 * 96 + 2 * 144 * 32 * 32  # qkv, proj on the 144 padded tokens
              + 2 * (2 * 144 * 32 * 4)  # decomposed rel-pos: q x the 4-long h and w tables
              + 2 * 100 * 32 * 128 * 2)  # MLP on the 100 real tokens
  windowed_attn = 2 * (2 * 144 * 16 * 32)  # scores + values within the 16-token windows
  glob = 2 * 100 * 32 * 96 + 2 * 100 * 32 * 32 + 2 * (2 * 100 * 32 * 10) + 2 * 100 * 32 * 128 * 2
  glob_attn = 2 * (2 * 100 * 100 * 32)
  # Neck: conv 1x1, then 3x3 with padding 1 (3 * 10 - 2 = 28 taps per axis land on the grid).
  neck = 2 * 100 * 32 * 16 + 2 * (28 * 28) * 16 * 16
  assert f["attention"] == windowed_attn + glob_attn
  assert f["weights"] == patch + windowed + glob + neck
  assert f["lora"] == 0


def test_hand_computed_t5_encoder_layer_with_lora():
  cfg = t5_lib.T5Config(d_model=8, d_kv=2, num_heads=3, d_ff=16, num_layers=1, lora_rank=2)
  f = flops._t5_encoder(cfg, 5)  # 5 tokens; inner width 3 heads x 2 = 6
  assert f["weights"] == 3 * (2 * 5 * 8 * 6) + 2 * 5 * 6 * 8 + 3 * (2 * 5 * 8 * 16)
  assert f["attention"] == 2 * (2 * 5 * 5 * 6)
  assert f["lora"] == 2 * (2 * 5 * 8 * 2 + 2 * 5 * 2 * 6)  # q and v: x @ A (8->2) @ B (2->6)


def test_multipliers_follow_frozen_params_and_data_flow():
  config = _toy(128, frozen=common.FROZEN_SAM_AND_T5)  # the paper's split on the toy sizes
  breakdown = flops.forward_breakdown(config)
  result = flops.train_flops(config, breakdown=breakdown)
  c = result["components"]
  # Frozen with nothing trainable before it: forward only.
  for name in ("sam_image_encoder", "prompt_encoder"):
    assert not c[name]["gradients"] and c[name]["train"] == c[name]["forward"] > 0
  # Trainable: forward + activation gradients + weight gradients.
  for name in ("eva02", "prompt_extractor", "visual_projection", "location_head"):
    assert c[name]["trains"] and c[name]["multiplier"] == pytest.approx(3.0, rel=1e-12)
  # Frozen T5 that the loss's gradients cross to reach the LoRA factors and EVA02: 2x its frozen
  # matmuls, 3x its attention matmuls and its (trainable) LoRA branches.
  for name in ("t5_encoder", "t5_decoder"):
    f = breakdown[name]
    assert c[name]["gradients"] and f["lora"] > 0
    assert c[name]["train"] == pytest.approx(2 * f["weights"] + 3 * f["attention"] + 3 * f["lora"])
    assert 2.0 < c[name]["multiplier"] < 2.2
  assert result["train"] == pytest.approx(sum(x["train"] for x in c.values()))
  assert result["forward"] == pytest.approx(sum(flops.forward_flops(config).values()))


def test_only_the_location_head_trains():
  # Nothing upstream of the head trains, so no gradient enters T5: everything else is 1x.
  config = _toy(128, frozen=(r"^(?!location_head/)",))
  c = flops.train_flops(config)["components"]
  assert c["location_head"]["multiplier"] == pytest.approx(3.0)
  assert all(v["multiplier"] == 1.0 for k, v in c.items() if k != "location_head" and v["forward"])


def test_cli_json_on_toy_config():
  proc = subprocess.run([sys.executable, "-m", "pixel_llm.tools.flops",
                         "--config=configs/ln.py:toy", "--json"],
                        capture_output=True, text=True, check=True, timeout=300, cwd=ROOT)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(out["components"]) == set(flops.COMPONENTS)
  assert out["train"] == pytest.approx(3 * out["forward"])  # the toy trains everything


def test_chip_table_finds_gpus_by_substring_and_tpus_exactly():
  assert chips.lookup("NVIDIA H200").bf16_tflops == 989
  assert chips.lookup("NVIDIA A100-SXM4-80GB").bf16_tflops == 312
  assert chips.lookup("TPU v5 lite").hbm_gib == 16  # v5e, not v5p's "TPU v5"
  assert chips.lookup("TPU v7 something") is None and chips.lookup("cpu") is None
  with pytest.raises(ValueError, match="No datasheet figures"):
    chips.device_spec(jax.devices("cpu")[0])


def test_densecap_counts_the_decoded_text_proposals_not_the_regions():
  from configs import vg_densecap
  config = vg_densecap.get_config()
  assert config.input.num_prompts == 100  # regions per example (the heads' GT)
  shapes = lambda: flops._shapes(config, build.build_network(config.model))
  assert shapes()["R"] == 32  # decoded per example
  config.model.roi_head.text_proposals = 0
  assert shapes()["R"] == 100
  config.model.roi_head.text_proposals, config.model.caption_proposals = 32, 0
  assert shapes()["R"] == 100  # GT boxes as prompts: the RoI head's proposals are not decoded
