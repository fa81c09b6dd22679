r"""Analytic FLOPs of one PixelLLM training example, counted from the config's shapes (for MFU).

  python -m pixel_llm.tools.flops --config=configs/ln.py
  python -m pixel_llm.tools.flops --config=configs/ln.py:toy --json

Model FLOPs, not hardware FLOPs: XLA's cost analysis (what `train.py` and `tools/aot.py` report)
also counts rematerialisation and every elementwise op, so MFU from it overstates useful work.
Here a FLOP is half a multiply-add (a [M, K] x [K, N] matmul is 2MKN). Counted: matmuls,
convolutions (2 x the kernel taps that land on the input x in x out channels, as XLA counts them:
SAM's 3x3 neck conv skips its zero padding), attention score and value matmuls over the full square
(masks skip no work; SAM's windows include the padding to multiples of the window) and the
constant-matrix resamplings of position tables and of SAM's map to EVA02's grid. Ignored:
elementwise ops (norms, softmax, activations, residual adds, RoPE, masks, biases), gathers
(embeddings, T5's relative-position buckets) and the loss. On the toy sizes the count is 96-99 % of
XLA's `cost_analysis()` flops and equals XLA's dot FLOPs exactly (tests/test_flops.py).

Per example: the image towers (SAM, EVA02) run once per image, everything after them once per
prompt (R prompts share one image encoding). Terms that do not depend on the batch (resampled
position tables, the prompt encoder's dense positional encoding and its projection in the
extractor) are counted once per example, which is exact at batch size 1 and an overcount of at
most those (small) terms above it. The task heads count where the config enables them:
segmentation's SAM mask decoder and mask adapter per prompt (the decoder's low-res logits; their
upsampling to the image belongs to the loss), dense captioning's proposal head per image and its
RoI head per image on the training samples (RoIAlign is a gather; NMS and box decoding are
elementwise).

Training multipliers (per component, decided from `config.frozen_params` matched against the
parameter paths and the data-flow graph `UPSTREAM`, not per config):
  - no trainable parameter in the component or upstream of it: forward only, 1x (frozen SAM);
  - otherwise backward computes activation gradients: 1x more of each weight matmul, 2x more of
    each activation x activation matmul (attention: gradients for both operands), plus weight
    gradients (1x more) of the trainable weights. All trainable: exactly 3x. A frozen tower that
    gradients flow through (T5 with LoRA): 2x its frozen matmuls, 3x its attention matmuls and
    LoRA branches, i.e. a bit above 2x.
  Not modelled: the first layer of a tower needs no input gradient (EVA02's patch embedding costs
  2x, not 3x); a component with some but not all kernels trainable gets weight gradients in
  proportion to its trainable kernel parameters (exact when all kernels see the same tokens).

Shapes: R prompts per image, C prompt-text length, T decoder length, Q visual tokens per prompt,
P patches, L tokens (T5 encoder: Q + C; extractor: feature-grid cells), D width, F MLP width,
V vocabulary, S sparse prompt tokens (2 box corners), K points per token.
"""
import json
import math
import re
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags


def _define_flags():
  """Flags are defined only when run as a binary, so the functions below import cleanly."""
  global _CONFIG, _JSON
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/ln.py:toy.",
                                            lock_config=True)
  _JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")


COMPONENTS = ("sam_image_encoder", "eva02", "prompt_encoder", "prompt_extractor",
              "visual_projection", "t5_encoder", "t5_decoder", "location_head")
# Direct data-flow parents ("t5_embedding" is T5's shared token embedding: a gather, 0 FLOPs).
# The task heads below are in a breakdown only where the config enables them.
UPSTREAM = {
    "sam_image_encoder": (), "eva02": (), "prompt_encoder": (), "t5_embedding": (),
    "prompt_extractor": ("sam_image_encoder", "eva02", "prompt_encoder"),
    "visual_projection": ("prompt_extractor",),
    "t5_encoder": ("visual_projection", "t5_embedding"),
    "t5_decoder": ("t5_encoder", "t5_embedding"),
    "location_head": ("t5_decoder",),
    # The adapter reads the visual tokens and T5's decoder states; the mask decoder SAM's neck
    # output and the (adapted) box tokens. The box itself comes without gradient.
    "mask_adapter": ("visual_projection", "t5_decoder", "prompt_encoder"),
    "mask_decoder": ("sam_image_encoder", "prompt_encoder", "mask_adapter"),
    # Proposals read the fused image features; the RoI head pools the proposal pyramid (its
    # boxes come without gradient).
    "proposal_head": ("sam_image_encoder", "eva02"),
    "roi_head": ("proposal_head",),
}
# Buckets of forward FLOPs: matmuls with a parameter (or constant) operand, LoRA branches, and
# matmuls of two activations (attention scores and values).
BUCKETS = ("weights", "lora", "attention")
BOX_TOKENS = 2  # SAM's prompt encoder turns a box into two corner tokens


def _mm(m: float, k: float, n: float) -> float:
  """FLOPs of [M, K] x [K, N]."""
  return 2.0 * m * k * n


def _zero() -> dict[str, float]:
  return dict.fromkeys(BUCKETS, 0.0)


def _taps(n: int, k: int) -> int:
  """Kernel taps that land inside an n-long axis, summed over the n outputs of a stride-1 'same'
  conv of odd size k: what XLA counts (taps on the zero padding are not multiply-adds)."""
  return sum(min(i + k // 2, n - 1) - max(i - k // 2, 0) + 1 for i in range(n))


def _resize(in_hw: tuple[int, int], out_hw: tuple[int, int], d: int) -> float:
  """A separable 2-D resampling of [in_h, in_w, D] to [out_h, out_w, D] as two constant matmuls
  (rows first, as SAM's torch-math resize and jax.image.resize's einsum do); 0 when no resize."""
  if tuple(in_hw) == tuple(out_hw):
    return 0.0
  (ih, iw), (oh, ow) = in_hw, out_hw
  return _mm(oh, ih, iw * d) + _mm(ow, iw, oh * d)


# ---------------------------------------------------------------------------------------------
# Per-component forward FLOPs, split in BUCKETS. Each returns (per image or prompt, per example).
# ---------------------------------------------------------------------------------------------
def _sam(enc, image_size: int, fused_grid: int) -> dict[str, float]:
  """SAM ImageEncoderViT over one image: windowed blocks pad the grid to multiples of the window
  (qkv, attention and proj run on the padded windows; the MLP on the real grid)."""
  f = _zero()
  p, d = enc.patch_size, enc.width
  h = w = image_size // p
  mlp = int(d * enc.mlp_ratio)
  f["weights"] += _mm(h * w, p * p * 3, d)  # patch conv
  g = enc.pretrain_img_size // p
  f["weights"] += _resize((g, g), (h, w), d)  # pos_embed, bicubic
  for i in range(enc.depth):
    if i in enc.global_attn_indexes:
      tokens, keys, sides = h * w, h * w, (h, w)
      # Tables stored for the pretraining grid, linearly resampled to 2 * side - 1 rows.
      f["weights"] += sum(_mm(2 * n - 1, 2 * g - 1, d // enc.num_heads) for n in (h, w) if n != g)
    else:
      ws = enc.window_size
      tokens, keys, sides = (-(-h // ws) * ws) * (-(-w // ws) * ws), ws * ws, (ws, ws)
    f["weights"] += _mm(tokens, d, 3 * d) + _mm(tokens, d, d)  # qkv, proj
    f["weights"] += sum(_mm(tokens, d, s) for s in sides)  # decomposed rel-pos: q x table
    f["attention"] += 2 * _mm(tokens, keys, d)  # scores + values, summed over heads
    f["weights"] += _mm(h * w, d, mlp) + _mm(h * w, mlp, d)
  c = enc.out_chans
  f["weights"] += _mm(h * w, d, c) + _mm(_taps(h, 3) * _taps(w, 3), c, c)  # neck: 1x1, 3x3
  f["weights"] += _resize((h, w), (fused_grid, fused_grid), c)  # to EVA02's grid, bicubic
  return f


def _eva02(enc, image_size: int) -> dict[str, float]:
  """EVA02 over one image: class token + P patches; SwiGLU (fc1_g, fc1_x: D -> F, fc2: F -> D)."""
  f = _zero()
  p, d = enc.patch_size, enc.width
  h = w = image_size // p
  t = h * w + 1
  mlp = enc.mlp_dim or int(d * (4 * 2 / 3))
  f["weights"] += _mm(h * w, p * p * 3, d)
  g = enc.pretrain_img_size // p
  f["weights"] += _resize((g, g), (h, w), d)
  per_block = 4 * _mm(t, d, d) + 2 * _mm(t, d, mlp) + _mm(t, mlp, d)
  f["weights"] += enc.depth * per_block
  f["attention"] += enc.depth * 2 * _mm(t, t, d)
  return f


def _prompt_encoder(enc, grid: int) -> tuple[dict[str, float], dict[str, float]]:
  """Random-Fourier positional encodings: the box corners (per prompt), the dense grid (once)."""
  half = enc.embed_dim // 2
  per_prompt, once = _zero(), _zero()
  per_prompt["weights"] = _mm(BOX_TOKENS, 2, half)
  once["weights"] = _mm(grid * grid, 2, half)
  return per_prompt, once


def _attn_layer(tq: int, tk: int, d: int, inner: int) -> dict[str, float]:
  """SAM two-way attention: q from Tq tokens, k/v from Tk tokens, D -> inner -> D."""
  return {"weights": _mm(tq, d, inner) + 2 * _mm(tk, d, inner) + _mm(tq, inner, d), "lora": 0.0,
          "attention": 2 * _mm(tq, tk, inner)}


def _add(a: dict[str, float], b: dict[str, float], times: float = 1.0) -> None:
  for k in BUCKETS:
    a[k] += times * b[k]


def _two_way(st: int, l: int, d: int, inner: int, mlp: int, depth: int) -> dict[str, float]:
  """SAM's two-way transformer: S tokens and L image tokens, `depth` blocks and the final
  token -> image attention (the prompt extractor's and the mask decoder's)."""
  f = _zero()
  for _ in range(depth):
    _add(f, _attn_layer(st, st, d, d))  # token self-attention
    _add(f, _attn_layer(st, l, d, inner))  # token -> image
    f["weights"] += _mm(st, d, mlp) + _mm(st, mlp, d)
    _add(f, _attn_layer(l, st, d, inner))  # image -> token
  _add(f, _attn_layer(st, l, d, inner))  # final token -> image
  return f


def _mlp(dims: list[int], tokens: int = 1) -> float:
  """A stack of dense layers dims[0] -> dims[1] -> ... on `tokens` tokens."""
  return sum(_mm(tokens, a, b) for a, b in zip(dims[:-1], dims[1:]))


def _mask_adapter(adapter, q: int, dq: int, t: int, dt: int) -> dict[str, float]:
  """Per prompt: the S box tokens attend to the Q visual tokens (width Dq) and the T decoder
  states (width Dt), each projected to the adapter's width D; MLP; the update projection."""
  f, d, keys = _zero(), adapter.width, q + t
  f["weights"] += _mm(q, dq, d) + _mm(t, dt, d)
  for _ in range(adapter.depth):
    _add(f, _attn_layer(BOX_TOKENS, keys, d, d))
    f["weights"] += _mlp([d, adapter.mlp_dim, d], BOX_TOKENS)
  f["weights"] += _mm(BOX_TOKENS, d, d)
  return f


def _mask_decoder(dec, grid: tuple[int, int]) -> dict[str, float]:
  """Per prompt: SAM's mask decoder on the h x w neck map: the IoU token, M mask tokens and the
  box tokens through the two-way transformer; two 2x2 stride-2 transposed convs (one kernel tap
  per output pixel) to 4h x 4w at D/8; a hypernetwork MLP per mask token (D -> D -> D -> D/8)
  dotted with the upscaled map; the IoU head. All M masks are computed (the single-mask output
  slices the first)."""
  d, (h, w) = dec.transformer_dim, grid
  m, l = dec.num_multimask_outputs + 1, h * w
  f = _two_way(1 + m + BOX_TOKENS, l, d, d // dec.attention_downsample_rate,
               dec.transformer_mlp_dim, dec.transformer_depth)
  f["weights"] += _mm(4 * l, d, d // 4) + _mm(16 * l, d // 4, d // 8)  # output upscaling
  f["weights"] += m * _mlp([d, d, d, d // 8])  # hypernetworks
  f["attention"] += _mm(m, d // 8, 16 * l)  # masks = hypernetwork outputs . upscaled map
  hid = dec.iou_head_hidden_dim
  f["weights"] += _mlp([d] + [hid] * (dec.iou_head_depth - 1) + [m])
  return f


def _prompt_extractor(ext, grid: int, in_dim: int, text_len: int, text_dim: int,
                      place_head: bool) -> tuple[dict[str, float], dict[str, float]]:
  """Two-way transformer of Q learnt + S prompt tokens (+ C words when text-conditioned) against
  the L = grid^2 image tokens (+ the place head, where a loss reads it)."""
  per_prompt, once = _zero(), _zero()
  l, d, e, q = grid * grid, ext.width, ext.prompt_dim, ext.num_output_tokens
  words = text_len if ext.text_conditioned else 0
  st = q + BOX_TOKENS + words
  per_prompt["weights"] += _mm(words, text_dim, d)  # text_projection_mlp
  inner = d // ext.attention_downsample_rate
  per_prompt["weights"] += _mm(l, in_dim, d)  # image projection
  if e != d:
    per_prompt["weights"] += _mm(l, e, d) + _mm(BOX_TOKENS, e, d)  # dense, sparse prompt
    once["weights"] += _mm(l, e, d)  # image PE, shared by all prompts
  _add(per_prompt, _two_way(st, l, d, inner, ext.mlp_dim, ext.depth))
  per_prompt["weights"] += _mm(q, d, ext.output_dim)  # one head per output token
  if ext.dense_output_tokens:
    per_prompt["weights"] += _mm(l, d, ext.output_dim)  # dense_output_mlp on the image tokens
  if place_head:
    per_prompt["weights"] += _mm(l, d, 1)  # place_head: one logit per image token
  return per_prompt, once


def _proposal_head(head, grid: int, in_dim: int) -> dict[str, float]:
  """Per image, on the G x G fused map of width D_in: the simple feature pyramid (stride 8: a 2x2
  stride-2 transposed conv to D_in / 2, one kernel tap per output pixel; stride 16: identity;
  stride 32: max-pool), each of those levels' 1x1 lateral and 3x3 output convs to the head's
  width W; then on every level (the top ones subsampled) the CenterNet tower's 3x3 W -> W convs
  and its 3x3 heatmap (1) and box (4) convs. 3x3 convs count the taps inside the map (`_taps`)."""
  from pixel_llm.models import proposal_head as proposal_head_lib
  f, w = _zero(), head.width
  deconv = head.deconv_dim or in_dim // 2
  shapes = proposal_head_lib.pyramid_shapes(grid, grid, head.num_top_levels)
  f["weights"] += _mm(4 * grid * grid, in_dim, deconv)
  for (h, wd), c in zip(shapes[:3], (deconv, in_dim, in_dim)):
    f["weights"] += _mm(h * wd, c, w) + _mm(_taps(h, 3) * _taps(wd, 3), w, w)
  for h, wd in shapes:
    f["weights"] += _mm(_taps(h, 3) * _taps(wd, 3), w, head.num_convs * w + 1 + 4)
  return f


def _roi_head(roi, width: int) -> dict[str, float]:
  """Per image in training: the `samples_per_image` sampled RoIs, each pooled to P x P x W (a
  gather), through the fully connected layers and the fg / bg (2) and box-delta (4) outputs."""
  f, p = _zero(), roi.output_size
  f["weights"] = _mlp([p * p * width] + [roi.fc_dim] * roi.num_fc + [2 + 4], roi.samples_per_image)
  return f


def _t5_attention(cfg, stack: str, kind: str, tq: int, tk: int) -> dict[str, float]:
  """T5 attention: q/o on the Tq queries, k/v on the Tk keys; LoRA on its configured projections."""
  d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
  rows = {"q": (tq, d, inner), "k": (tk, d, inner), "v": (tk, d, inner), "o": (tq, inner, d)}
  f = _zero()
  f["weights"] = sum(_mm(*r) for r in rows.values())
  f["attention"] = 2 * _mm(tq, tk, inner)  # the full square: masks do not skip work
  for name in cfg.lora_projections(stack, kind):
    m, din, dout = rows[name]
    f["lora"] += _mm(m, din, cfg.lora_rank) + _mm(m, cfg.lora_rank, dout)
  return f


def _t5_mlp(cfg, tokens: int) -> float:
  """Gated-GELU: wi_0, wi_1 (D -> F), wo (F -> D)."""
  return 3 * _mm(tokens, cfg.d_model, cfg.d_ff)


def _t5_encoder(cfg, l: int) -> dict[str, float]:
  f = _zero()
  for _ in range(cfg.num_layers):
    _add(f, _t5_attention(cfg, "encoder", "self", l, l))
    f["weights"] += _t5_mlp(cfg, l)
  return f


def _t5_decoder(cfg, t: int, l: int) -> dict[str, float]:
  f = _zero()
  for _ in range(cfg.num_decoder_layers):
    _add(f, _t5_attention(cfg, "decoder", "self", t, t))
    _add(f, _t5_attention(cfg, "decoder", "cross", t, l))
    f["weights"] += _t5_mlp(cfg, t)
  f["weights"] += _mm(t, cfg.d_model, cfg.vocab_size)  # LM head
  return f


def _location_head(head, d: int, t: int) -> dict[str, float]:
  f = _zero()
  f["weights"] = _mlp([d] + [head.hidden_dim] * (head.depth - 1) + [2 * head.num_points], t)
  return f


def _shapes(config, net) -> dict[str, int]:
  """R, C, T of one example, read from `build.example_batch` (the trainer's batch shapes); R is
  the prompts that are decoded (`PixelLLM.decoded_prompts`)."""
  from pixel_llm.models import build
  batch = build.example_batch(config, 1, abstract=True)
  _, r, c = batch["prompt_text"].shape
  return {"R": net.decoded_prompts(r), "C": c, "T": batch["decoder_input_tokens"].shape[-1]}


def forward_breakdown(config) -> dict[str, dict[str, float]]:
  """{component: {bucket: forward FLOPs of one example}} (see BUCKETS)."""
  from pixel_llm.models import build
  from pixel_llm.models import prompt_extractor as prompt_extractor_lib
  net = build.build_network(config.model)
  s = config.model.image_size
  shape = _shapes(config, net)
  r, c, t = shape["R"], shape["C"], shape["T"]
  sam, eva = net.sam_image_encoder, net.eva02
  grid = max((s // m.patch_size) for m in (sam, eva) if m is not None)
  in_dim = (sam.out_chans if sam is not None else 0) + (eva.width if eva is not None else 0)
  out = {k: _zero() for k in COMPONENTS}
  if sam is not None:
    out["sam_image_encoder"] = _sam(sam, s, grid)
  if eva is not None:
    out["eva02"] = _eva02(eva, s)
  for name, (per_prompt, once) in (
      ("prompt_encoder", _prompt_encoder(net.prompt_encoder, grid)),
      ("prompt_extractor", _prompt_extractor(
          net.prompt_extractor, grid, in_dim, c, net.t5.config.d_model,
          # Only the place loss reads the head's logits; without it XLA prunes the head.
          net.prompt_extractor.place_logits and config.loss.get("place_weight", 0.0) > 0))):
    _add(out[name], per_prompt, r)
    _add(out[name], once)
  ext = net.prompt_extractor
  q = prompt_extractor_lib.tokens_per_prompt(ext.num_output_tokens, ext.dense_output_tokens,
                                             (grid, grid))
  out["visual_projection"]["weights"] = r * _mm(q, net.prompt_extractor.output_dim,
                                                net.visual_projection.features)
  cfg = net.t5.config
  _add(out["t5_encoder"], _t5_encoder(cfg, q + c), r)
  _add(out["t5_decoder"], _t5_decoder(cfg, t, q + c), r)
  _add(out["location_head"], _location_head(net.location_head, cfg.d_model, t), r)
  if net.mask_decoder is not None:  # `predict_masks`: R boxes on SAM's neck map
    hs = s // sam.patch_size
    box, dense_pe = _prompt_encoder(net.prompt_encoder, hs)
    _add(out["prompt_encoder"], box, r)
    _add(out["prompt_encoder"], dense_pe)
    out["mask_decoder"] = _zero()
    _add(out["mask_decoder"], _mask_decoder(net.mask_decoder, (hs, hs)), r)
    if net.mask_adapter is not None:
      out["mask_adapter"] = _zero()
      _add(out["mask_adapter"], _mask_adapter(net.mask_adapter, q, net.visual_projection.features,
                                              t, cfg.d_model), r)
  if net.proposal_head is not None:
    out["proposal_head"] = _proposal_head(net.proposal_head, grid, in_dim)
    if net.roi_head is not None:
      out["roi_head"] = _roi_head(net.roi_head, net.proposal_head.width)
  return out


def forward_flops(config) -> dict[str, float]:
  """{component: forward FLOPs of one example} (matmuls, convs and attention; see the module
  docstring for what is and is not counted). Components absent from the config count 0."""
  return {k: sum(v.values()) for k, v in forward_breakdown(config).items()}


# ---------------------------------------------------------------------------------------------
# Training: which components train, which pass gradients.
# ---------------------------------------------------------------------------------------------
def component_of(path: str) -> str:
  """The COMPONENTS / UPSTREAM node a parameter path belongs to."""
  top, _, rest = path.partition("/")
  if top != "t5":
    return top
  sub = rest.split("/")[0]
  return {"encoder": "t5_encoder", "decoder": "t5_decoder", "lm_head": "t5_decoder",
          "shared": "t5_embedding"}.get(sub, "t5_embedding")


def trainable_summary(config) -> dict[str, dict[str, float]]:
  """Per node: {"any": 1.0 if any parameter trains, "kernels": trainable fraction of its non-LoRA
  kernel parameters, "lora": trainable fraction of its LoRA parameters} (fractions by count; 0 for
  a node without such parameters), from `config.frozen_params` on the abstract parameter tree."""
  import flax.linen as nn
  import jax
  from pixel_llm.models import build
  from pixel_llm import optim

  params = nn.meta.unbox(build.abstract_params(config))  # paths as model_info prints them
  labels = optim.frozen_labels(params, config.frozen_params)
  paths = optim.param_paths(params)
  sizes = jax.tree.map(lambda x: math.prod(x.shape), params)
  counts: dict[str, dict[str, list[float]]] = {}
  for path, label, n in zip(jax.tree.leaves(paths), jax.tree.leaves(labels),
                            jax.tree.leaves(sizes)):
    node = counts.setdefault(component_of(path), {"any": [0, 0], "kernels": [0, 0],
                                                  "lora": [0, 0]})
    train = label == "train"
    kinds = ["any"]
    if "lora" in path:
      kinds.append("lora")
    elif re.search(r"(^|/)kernel$", path):
      kinds.append("kernels")
    for kind in kinds:
      node[kind][0] += n * train
      node[kind][1] += n
  return {node: {"any": float(v["any"][0] > 0),
                 "kernels": v["kernels"][0] / v["kernels"][1] if v["kernels"][1] else 0.0,
                 "lora": v["lora"][0] / v["lora"][1] if v["lora"][1] else 0.0}
          for node, v in counts.items()}


def _needs_gradients(trainable: dict[str, dict[str, float]]) -> dict[str, bool]:
  """A node computes activation gradients iff it or anything upstream of it has a trainable
  parameter (every node lies upstream of the loss)."""
  memo: dict[str, bool] = {}

  def visit(node: str) -> bool:
    if node not in memo:
      memo[node] = bool(trainable.get(node, {}).get("any", 0.0)) or any(
          visit(u) for u in UPSTREAM.get(node, ()))
    return memo[node]
  return {node: visit(node) for node in UPSTREAM}


def train_flops(config, *, breakdown: dict | None = None,
                trainable: dict | None = None) -> dict[str, Any]:
  """Training FLOPs of one example (forward + backward), per component and in total.

  Returns {"components": {name: {"forward", "multiplier", "train", "trains", "gradients"}},
  "forward": total forward FLOPs, "train": total training FLOPs}.
  `breakdown` / `trainable` default to `forward_breakdown(config)` / `trainable_summary(config)`.
  """
  breakdown = breakdown if breakdown is not None else forward_breakdown(config)
  trainable = trainable if trainable is not None else trainable_summary(config)
  grads = _needs_gradients(trainable)
  comps = {}
  for name, f in breakdown.items():
    fwd = sum(f.values())
    total = fwd
    own = trainable.get(name, {"any": 0.0, "kernels": 0.0, "lora": 0.0})
    if grads[name]:
      total += f["weights"] + f["lora"] + 2 * f["attention"]  # activation gradients
      total += own["kernels"] * f["weights"] + own["lora"] * f["lora"]  # weight gradients
    comps[name] = {"forward": fwd, "multiplier": total / fwd if fwd else 0.0, "train": total,
                   "trains": bool(own["any"]), "gradients": grads[name]}
  return {"components": comps, "forward": sum(c["forward"] for c in comps.values()),
          "train": sum(c["train"] for c in comps.values())}


def main(argv):
  del argv
  config = _CONFIG.value
  result = train_flops(config)
  if _JSON.value:
    print(json.dumps(result))
    return
  from pixel_llm.models import build
  shape = _shapes(config, build.build_network(config.model))
  print(f"PixelLLM FLOPs per training example ({config.get('name', 'config')}; image "
        f"{config.model.image_size} px, R={shape['R']} prompts, C={shape['C']}, T={shape['T']})")
  print(f"  {'component':<20} {'forward GFLOPs':>15} {'multiplier':>11} {'training GFLOPs':>16}")
  for name, c in result["components"].items():
    print(f"  {name:<20} {c['forward'] / 1e9:>15.4f} {c['multiplier']:>10.3f}x "
          f"{c['train'] / 1e9:>16.4f}")
  print(f"  {'total':<20} {result['forward'] / 1e9:>15.4f} "
        f"{result['train'] / max(result['forward'], 1.0):>10.3f}x {result['train'] / 1e9:>16.4f}")
  print(f"Training: {result['train'] / 1e12:.4g} TFLOPs per example "
        f"(forward {result['forward'] / 1e12:.4g} TFLOPs).")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flag_as_required("config")
  app.run(main)
