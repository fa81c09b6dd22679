"""Size presets and shared config pieces for every PixelLLM config.

Each preset is a plain dict of module fields, so any size can be changed from the command line,
e.g. `--config.model.t5.num_layers=2`. The full-size presets are the published architectures;
`tiny_*` presets exist for tests and the offline demo only.
"""
import ml_collections

# SAM image encoders (segment-anything ImageEncoderViT).
SAM = {
    "vit_b": dict(width=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(width=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(width=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "tiny": dict(width=64, depth=2, num_heads=4, global_attn_indexes=(1,), window_size=4),
}

# EVA02 ViTs (timm eva02_*_patch14_224: SwiGLU + sub-LN, 2-D RoPE, q/v biases).
EVA02 = {
    "B": dict(width=768, depth=12, num_heads=12),
    "L": dict(width=1024, depth=24, num_heads=16),
    "tiny": dict(width=64, depth=2, num_heads=4),
}

# T5 v1.1 / Flan-T5 (see pixel_llm.models.t5.T5Config); values are T5Config fields.
T5 = {
    "small": dict(d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8, num_decoder_layers=8),
    "base": dict(d_model=768, d_kv=64, num_heads=12, d_ff=2048, num_layers=12,
                 num_decoder_layers=12),
    "large": dict(d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=24,
                  num_decoder_layers=24),
    "xl": dict(d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24,
               num_decoder_layers=24),
    "xxl": dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                num_decoder_layers=24),
    "tiny": dict(d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2, num_decoder_layers=2),
}

# Prompt feature extractor: the official release (depth 6) and the paper's text (2 layers).
PROMPT_EXTRACTOR = {
    "release": dict(depth=6, width=512, num_heads=8, mlp_dim=2048, num_output_tokens=32,
                    output_dim=1024),
    "paper": dict(depth=2, width=512, num_heads=8, mlp_dim=2048, num_output_tokens=32,
                  output_dim=1024),
    "tiny": dict(depth=2, width=64, num_heads=4, mlp_dim=128, num_output_tokens=16, output_dim=64),
}

# Parameter-path regexes (as printed by model_info) of the frozen parts of the paper's setting:
# SAM (image encoder and prompt encoder) and every non-LoRA T5 weight.
FROZEN_SAM_AND_T5 = (r"^sam_image_encoder/", r"^prompt_encoder/", r"^mask_decoder/",
                     r"^t5/(?!.*lora)")


def model_config(*, sam="vit_h", eva02="L", t5="xl", prompt_extractor="release", image_size=384,
                 lora_rank=32, prompt_dim=256, vocab_size=32128,
                 mask_decoder=False) -> ml_collections.ConfigDict:
  """The network config: one sub-dict of module fields per component."""
  c = ml_collections.ConfigDict()
  c.image_size = image_size
  c.dtype = "float32"  # compute dtype; parameters stay float32
  # Attention kernel: "xla" (explicit einsums), "dot_product" (jax.nn.dot_product_attention) or
  # "cudnn" (its fused flash kernel: GPU, bf16; see benchmarks/RESULTS.md for measured speed).
  c.attention_impl = "xla"
  c.sam = dict(SAM[sam], patch_size=16, window_size=SAM[sam].get("window_size", 14),
               pretrain_img_size=1024, drop_path_rate=0.0, remat=False,
               remat_policy="nothing_saveable", scan_layers=False)
  c.eva02 = dict(EVA02[eva02], patch_size=14, pretrain_img_size=224,
                 drop_path_rate=0.1 if eva02 != "tiny" else 0.0, remat=False,
                 remat_policy="nothing_saveable", scan_layers=False)
  c.prompt_encoder = dict(embed_dim=prompt_dim)
  # image_pe_in_values, dense_output_tokens, text_conditioned, place_logits: deviations for the
  # from-scratch toys, off as in the release (models/prompt_extractor.py).
  c.prompt_extractor = dict(PROMPT_EXTRACTOR[prompt_extractor], prompt_dim=prompt_dim,
                            image_pe_in_values=False, dense_output_tokens=False,
                            text_conditioned=False, place_logits=False)
  c.t5 = dict(T5[t5], vocab_size=vocab_size, dropout_rate=0.1, lora_rank=lora_rank,
              lora_scale=2.0, remat=False, remat_policy="nothing_saveable", scan_layers=False)
  c.location_head = dict(hidden_dim=512 if t5 != "tiny" else 128, depth=4, num_points=2)
  # SAM's mask decoder (4.06 M parameters, from the SAM checkpoint); on for segmentation configs.
  c.mask_decoder = dict(enabled=mask_decoder, transformer_dim=prompt_dim)
  # The gated mask adapter of referring segmentation (models/mask_adapter.py; its width is the
  # mask decoder's) and which box prompts SAM: "prompt" or "eos" (the predicted referring box).
  c.mask_adapter = dict(enabled=False, **(dict(depth=1, num_heads=4, mlp_dim=128)
                                          if sam == "tiny" else dict(depth=2, num_heads=8,
                                                                     mlp_dim=2048)))
  c.segment_box = "prompt"
  # Dense captioning's class-agnostic proposal head (models/proposal_head.py; the release: 256
  # wide, 5 levels up to stride 128, deconv 384).
  c.proposal_head = dict(enabled=False, **(dict(width=32, num_top_levels=1, num_convs=2,
                                                num_groups=8) if sam == "tiny" else
                                           dict(width=256, num_top_levels=2, num_convs=4,
                                                num_groups=32, deconv_dim=384)))
  # Dense captioning's training prompts: > 0 captions proposals matched to the GT regions
  # (IoU >= 0.6, GT boxes appended) instead of the GT boxes: the RoI head's first samples when it
  # is on, else the proposal head's top N; 0 = the GT boxes.
  c.caption_proposals = 0
  # Dense captioning's second-stage RoI head (models/roi_head.py; the release: single stage,
  # fc 1024 x 2, 1000 train / 256 test proposals, 512 RoIs per image at 25% positive, score
  # threshold 0.05, NMS 0.5). mult_proposal_score: a detection's score is sqrt(proposal score x
  # RoI score) (CenterNet2's option) instead of the RoI score.
  sizes = (dict(fc_dim=64, train_proposals=64, test_proposals=64, samples_per_image=64)
           if sam == "tiny" else
           dict(fc_dim=1024, train_proposals=1000, test_proposals=256, samples_per_image=512))
  c.roi_head = dict(enabled=False, mult_proposal_score=False, **sizes)
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `file.py:a=1,b=x,flag` config arguments into a typed ConfigDict.

  A bare name means True (`toy` -> toy=True). Types follow the defaults; unknown keys are an error.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if not _:
      out[key] = True
    elif kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = kind(value)
  return out


def split_dataset_arg(arg: str | None, known, default: str) -> tuple[str, str]:
  """("dataset" of a `dataset=NAME,...` config argument (checked against `known`), the other
  items joined back for `parse_arg`)."""
  own, rest = [], []
  for item in filter(None, (arg or "").split(",")):
    (own if item.startswith("dataset=") else rest).append(item)
  dataset = own[-1].partition("=")[2] if own else default
  if dataset not in known:
    raise ValueError(f"Unknown dataset {dataset!r}; known: {sorted(known)}")
  return dataset, ",".join(rest)
