"""Manifest generators for the image towers (SAM ViT-B/L/H, EVA02 B/L); see make_manifests.py.

- `sam_vit_{b,l,h}`: segment-anything's `sam_vit_*.pth` layout. There is no segment_anything
  package on the index, so the key list is written out from its module structure
  (`modeling/image_encoder.py`, `prompt_encoder.py`, `mask_decoder.py`, `transformer.py`) with the
  `build_sam.py` settings: prompt embedding 256, mask decoder = TwoWayTransformer(depth 2, width
  256, MLP 2048, 8 heads, cross-attention downsample 2), 3 + 1 mask tokens, IoU head 256 wide.
- `sam_vit_{b,l,h}_hf`: transformers `SamModel` state dict with the facebook/sam-vit-* configs. It
  lists both the Gaussian matrix `shared_image_embedding.positional_embedding` and its tied alias
  `prompt_encoder.shared_embedding.positional_embedding`; the loaders accept either.
- `eva02_{base,large}_patch14_224`: timm `create_model(name, num_classes=0)`, the MIM in22k files
  (final norm named `fc_norm`, as timm's hub files store it).
"""
import sys
import types
from typing import Callable

SAM_VARIANTS = {  # width, depth, heads, global-attention blocks (segment-anything build_sam.py)
    "b": (768, 12, 12, (2, 5, 8, 11)),
    "l": (1024, 24, 16, (5, 11, 17, 23)),
    "h": (1280, 32, 16, (7, 15, 23, 31)),
}


def _shim_torchvision():
  # The index's torchvision is CUDA-linked; see tests/conftest.py.
  if "torchvision" not in sys.modules:
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
      sys.modules.setdefault(name, types.ModuleType(name))


def _linear(prefix: str, n_out: int, n_in: int) -> dict:
  return {f"{prefix}.weight": [n_out, n_in], f"{prefix}.bias": [n_out]}


def _norm(prefix: str, n: int) -> dict:
  return {f"{prefix}.weight": [n], f"{prefix}.bias": [n]}


def sam_image_encoder_keys(variant: str) -> dict:
  """segment-anything `image_encoder.*` keys -> shapes (1024 px, patch 16, window 14)."""
  width, depth, heads, global_attn = SAM_VARIANTS[variant]
  head_dim, grid, window, out = width // heads, 64, 14, 256
  t = {"image_encoder.pos_embed": [1, grid, grid, width],
       "image_encoder.patch_embed.proj.weight": [width, 3, 16, 16],
       "image_encoder.patch_embed.proj.bias": [width]}
  for i in range(depth):
    b = f"image_encoder.blocks.{i}"
    side = grid if i in global_attn else window
    t.update(_norm(f"{b}.norm1", width))
    t.update(_linear(f"{b}.attn.qkv", 3 * width, width))
    t.update(_linear(f"{b}.attn.proj", width, width))
    t[f"{b}.attn.rel_pos_h"] = [2 * side - 1, head_dim]
    t[f"{b}.attn.rel_pos_w"] = [2 * side - 1, head_dim]
    t.update(_norm(f"{b}.norm2", width))
    t.update(_linear(f"{b}.mlp.lin1", 4 * width, width))
    t.update(_linear(f"{b}.mlp.lin2", width, 4 * width))
  t["image_encoder.neck.0.weight"] = [out, width, 1, 1]
  t.update(_norm("image_encoder.neck.1", out))
  t["image_encoder.neck.2.weight"] = [out, out, 3, 3]
  t.update(_norm("image_encoder.neck.3", out))
  return t


def sam_prompt_encoder_keys(dim: int = 256, mask_in_chans: int = 16) -> dict:
  p = "prompt_encoder"
  t = {f"{p}.pe_layer.positional_encoding_gaussian_matrix": [2, dim // 2]}
  for i in range(4):
    t[f"{p}.point_embeddings.{i}.weight"] = [1, dim]
  t[f"{p}.not_a_point_embed.weight"] = [1, dim]
  c = mask_in_chans
  for index, (n_out, n_in, k) in (("0", (c // 4, 1, 2)), ("3", (c, c // 4, 2)), ("6", (dim, c, 1))):
    t[f"{p}.mask_downscaling.{index}.weight"] = [n_out, n_in, k, k]
    t[f"{p}.mask_downscaling.{index}.bias"] = [n_out]
    if index != "6":
      t.update(_norm(f"{p}.mask_downscaling.{int(index) + 1}", n_out))
  t[f"{p}.no_mask_embed.weight"] = [1, dim]
  return t


def sam_mask_decoder_keys(dim: int = 256, mlp_dim: int = 2048, downsample: int = 2) -> dict:
  p = "mask_decoder"

  def attention(prefix, inner):
    t = {}
    for proj in ("q_proj", "k_proj", "v_proj"):
      t.update(_linear(f"{prefix}.{proj}", inner, dim))
    t.update(_linear(f"{prefix}.out_proj", dim, inner))
    return t

  def mlp(prefix, hidden, n_out, layers=3):
    sizes = [dim] + [hidden] * (layers - 1) + [n_out]
    t = {}
    for i in range(layers):
      t.update(_linear(f"{prefix}.layers.{i}", sizes[i + 1], sizes[i]))
    return t

  t = {}
  for i in range(2):
    layer = f"{p}.transformer.layers.{i}"
    t.update(attention(f"{layer}.self_attn", dim))
    t.update(_norm(f"{layer}.norm1", dim))
    t.update(attention(f"{layer}.cross_attn_token_to_image", dim // downsample))
    t.update(_norm(f"{layer}.norm2", dim))
    t.update(_linear(f"{layer}.mlp.lin1", mlp_dim, dim))
    t.update(_linear(f"{layer}.mlp.lin2", dim, mlp_dim))
    t.update(_norm(f"{layer}.norm3", dim))
    t.update(_norm(f"{layer}.norm4", dim))
    t.update(attention(f"{layer}.cross_attn_image_to_token", dim // downsample))
  t.update(attention(f"{p}.transformer.final_attn_token_to_image", dim // downsample))
  t.update(_norm(f"{p}.transformer.norm_final_attn", dim))
  t[f"{p}.iou_token.weight"] = [1, dim]
  t[f"{p}.mask_tokens.weight"] = [4, dim]
  # ConvTranspose2d weights are (in, out, kh, kw).
  t[f"{p}.output_upscaling.0.weight"] = [dim, dim // 4, 2, 2]
  t[f"{p}.output_upscaling.0.bias"] = [dim // 4]
  t.update(_norm(f"{p}.output_upscaling.1", dim // 4))
  t[f"{p}.output_upscaling.3.weight"] = [dim // 4, dim // 8, 2, 2]
  t[f"{p}.output_upscaling.3.bias"] = [dim // 8]
  for i in range(4):
    t.update(mlp(f"{p}.output_hypernetworks_mlps.{i}", dim, dim // 8))
  t.update(mlp(f"{p}.iou_prediction_head", 256, 4))
  return t


def sam_original(variant: str) -> dict:
  tensors = {**sam_image_encoder_keys(variant), **sam_prompt_encoder_keys(),
             **sam_mask_decoder_keys()}
  return {"format": "torch_pth", "source": f"segment-anything sam_vit_{variant}_*.pth",
          "tensors": tensors}


def sam_hf(variant: str) -> dict:
  _shim_torchvision()
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  width, depth, heads, global_attn = SAM_VARIANTS[variant]
  config = transformers.SamConfig(vision_config=dict(
      hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
      global_attn_indexes=list(global_attn), mlp_dim=4 * width, output_channels=256,
      image_size=1024, patch_size=16, window_size=14))
  with torch.device("meta"):
    model = transformers.SamModel(config)
  tensors = {k: list(v.shape) for k, v in model.state_dict().items()}
  name = {"b": "base", "l": "large", "h": "huge"}[variant]
  return {"format": "hf_safetensors", "source": f"facebook/sam-vit-{name}", "tensors": tensors}


def eva02(name: str) -> dict:
  _shim_torchvision()
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  with torch.device("meta"):
    model = timm.create_model(name, pretrained=False, num_classes=0)
  tensors = {k: list(v.shape) for k, v in model.state_dict().items()}
  return {"format": "timm_safetensors", "source": f"timm/{name}.mim_in22k", "tensors": tensors}


MANIFESTS: dict[str, Callable[[], dict]] = {
    **{f"sam_vit_{v}": (lambda v=v: sam_original(v)) for v in SAM_VARIANTS},
    **{f"sam_vit_{v}_hf": (lambda v=v: sam_hf(v)) for v in SAM_VARIANTS},
    **{n: (lambda n=n: eva02(n)) for n in ("eva02_base_patch14_224", "eva02_large_patch14_224")},
}
