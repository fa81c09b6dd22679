"""Builds the PixelLLM network and model adapter from a config (`configs/*.py`).

Only this file turns ConfigDicts into modules; the modules themselves take plain fields.
"""
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from pixel_llm.model import LossConfig, PixelLLMModel
from pixel_llm.models import eva02 as eva02_lib
from pixel_llm.models import location_head as location_head_lib
from pixel_llm.models import prompt_extractor as prompt_extractor_lib
from pixel_llm.models import mask_adapter as mask_adapter_lib
from pixel_llm.models import proposal_head as proposal_head_lib
from pixel_llm.models import roi_head as roi_head_lib
from pixel_llm.models import sam_mask_decoder as mask_decoder_lib
from pixel_llm.models import sam_image_encoder as sam_lib
from pixel_llm.models import sam_prompt_encoder as prompt_encoder_lib
from pixel_llm.models import t5 as t5_lib
from pixel_llm.models.pixel_llm import PixelLLM, VisualProjection

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _fields(cfg: Any) -> dict[str, Any]:
  d = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def build_network(model: ml_collections.ConfigDict) -> PixelLLM:
  """PixelLLM network from `config.model` (see `configs/common.model_config`)."""
  dtype = DTYPES[model.get("dtype", "float32")]
  t5_config = t5_lib.T5Config(**_fields(model.t5), dtype=dtype)
  sam = model.get("sam")
  eva = model.get("eva02")
  mask_decoder = dict(model.get("mask_decoder") or {})
  enabled = mask_decoder.pop("enabled", False)
  if enabled and (not sam or sam.get("out_chans", 256) != mask_decoder.get("transformer_dim", 256)
                  or model.prompt_encoder.embed_dim != mask_decoder.get("transformer_dim", 256)):
    raise ValueError("The mask decoder needs SAM with out_chans == prompt_encoder.embed_dim == "
                     "mask_decoder.transformer_dim (SAM's 256).")
  adapter = dict(model.get("mask_adapter") or {})
  adapter_on = adapter.pop("enabled", False)
  if adapter_on and not enabled:
    raise ValueError("model.mask_adapter.enabled needs model.mask_decoder.enabled.")
  segment_box = model.get("segment_box", "prompt")
  proposals = dict(model.get("proposal_head") or {})
  proposals_on = proposals.pop("enabled", False)
  caption_proposals = int(model.get("caption_proposals", 0))
  if caption_proposals and not proposals_on:
    raise ValueError("model.caption_proposals needs model.proposal_head.enabled.")
  roi = dict(model.get("roi_head") or {})
  roi_on = roi.pop("enabled", False)
  if roi_on and not proposals_on:
    raise ValueError("model.roi_head.enabled needs model.proposal_head.enabled (it refines the "
                     "proposal head's boxes).")
  if segment_box not in ("prompt", "eos"):
    raise ValueError(f"model.segment_box must be 'prompt' or 'eos', not {segment_box!r}.")
  return PixelLLM(
      sam_image_encoder=sam_lib.SamImageEncoder(**_fields(sam), dtype=dtype) if sam else None,
      eva02=eva02_lib.Eva02(**_fields(eva), dtype=dtype) if eva else None,
      prompt_encoder=prompt_encoder_lib.PromptEncoder(**_fields(model.prompt_encoder)),
      prompt_extractor=prompt_extractor_lib.PromptFeatureExtractor(
          **_fields(model.prompt_extractor), dtype=dtype),
      visual_projection=VisualProjection(t5_config.d_model, dtype=dtype),
      t5=t5_lib.T5(t5_config),
      location_head=location_head_lib.LocationHead(**_fields(model.location_head)),
      image_size=model.image_size,
      attention_impl=model.get("attention_impl", "xla"),
      mask_decoder=(mask_decoder_lib.MaskDecoder(**_fields(mask_decoder), dtype=dtype)
                    if enabled else None),
      mask_adapter=(mask_adapter_lib.MaskAdapter(
          width=mask_decoder.get("transformer_dim", 256), **_fields(adapter), dtype=dtype)
                    if adapter_on else None),
      segment_box=segment_box,
      proposal_head=(proposal_head_lib.ProposalHead(**_fields(proposals), dtype=dtype)
                     if proposals_on else None),
      caption_proposals=caption_proposals,
      roi_head=roi_head_lib.RoIBoxHead(**_fields(roi), dtype=dtype) if roi_on else None,
  )


def scanned_towers(model: ml_collections.ConfigDict) -> list[tuple[tuple[str, ...], str, str,
                                                                     int | None]]:
  """The towers `config.model` scans over layers: (path of the tower's subtree, unrolled layer
  name pattern, stacked name, group period) for `scan.stack_layers` / `unstack_layers`."""
  towers = []
  if model.t5.get("scan_layers", False):
    towers += [(("t5", "encoder"), "block_{i}", "block", None),
               (("t5", "decoder"), "block_{i}", "block", None)]
  if model.get("eva02") and model.eva02.get("scan_layers", False):
    towers.append((("eva02",), "blocks_{i}", "blocks", None))
  if model.get("sam") and model.sam.get("scan_layers", False):
    period = sam_lib.SamImageEncoder(**_fields(model.sam)).period
    towers.append((("sam_image_encoder",), "blocks_{i}", "blocks", period))
  return towers


def convert_layout(params: dict, model: ml_collections.ConfigDict, to: str) -> dict:
  """Moves the scanned towers of a params tree between layouts: to="unrolled" (the layout of
  converted public weights and of unscanned configs) or "scanned" (this config's)."""
  from pixel_llm.models import scan
  out = dict(params)
  for path, pattern, stacked, period in scanned_towers(model):
    parent = out
    for key in path[:-1]:
      parent[key] = dict(parent[key])
      parent = parent[key]
    node = parent[path[-1]]
    if to == "unrolled":
      parent[path[-1]] = scan.unstack_layers(node, pattern, stacked)
    elif to == "scanned":
      parent[path[-1]] = scan.stack_layers(node, pattern, stacked, period=period)
    else:
      raise ValueError(f"to must be 'unrolled' or 'scanned', not {to!r}")
  return out


def build_model(config: ml_collections.ConfigDict) -> PixelLLMModel:
  """The model adapter the binaries use."""
  return PixelLLMModel(build_network(config.model), LossConfig(**_fields(config.loss)))


def example_batch(config: ml_collections.ConfigDict, batch_size: int = 1,
                  abstract: bool = True) -> dict[str, Any]:
  """A batch of the config's shapes: ShapeDtypeStructs (abstract) or zeros/whole-image prompts."""
  s = config.model.image_size
  r = config.input.num_prompts
  c = config.input.max_context_len
  t = config.input.max_target_len
  k = config.model.location_head.num_points
  shapes = {
      "image": ((batch_size, s, s, 3), jnp.float32),
      "prompt_boxes": ((batch_size, r, 4), jnp.float32),
      "prompt_text": ((batch_size, r, c), jnp.int32),
      "decoder_input_tokens": ((batch_size, r, t), jnp.int32),
      "decoder_target_tokens": ((batch_size, r, t), jnp.int32),
      "point_targets": ((batch_size, r, t, k, 2), jnp.float32),
      "point_weights": ((batch_size, r, t), jnp.float32),
  }
  if abstract:
    return {n: jax.ShapeDtypeStruct(shape, dt) for n, (shape, dt) in shapes.items()}
  batch = {n: jnp.zeros(shape, dt) for n, (shape, dt) in shapes.items()}
  batch["prompt_boxes"] = batch["prompt_boxes"].at[..., 2:].set(1.0)
  return batch


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """The boxed parameter tree (shapes + logical axes) via `jax.eval_shape`: nothing is allocated."""
  model = build_model(config)
  variables = jax.eval_shape(model.init_variables, jax.random.key(0), example_batch(config))
  return variables["params"]
