"""PyTorch reference models shared by the parity tests (needs the test extra: torch, transformers)."""
import torch
from transformers.models.t5 import modeling_t5 as hf_t5
import transformers


def t5_v11(c, seed: int = 0):
  """A random v1.1-style (untied head, shared input embedding) HF T5 for config `c` (T5Config)."""
  torch.manual_seed(seed)
  hf_cfg = transformers.T5Config(
      vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, num_heads=c.num_heads, d_ff=c.d_ff,
      num_layers=c.num_layers, num_decoder_layers=c.num_decoder_layers,
      relative_attention_num_buckets=c.relative_attention_num_buckets,
      relative_attention_max_distance=c.relative_attention_max_distance,
      feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False)
  hf_cfg.tie_word_embeddings = False  # transformers 5.x forces it True in __init__.
  model = hf_t5.T5ForConditionalGeneration(hf_cfg).eval()
  if model.lm_head.weight is model.shared.weight:
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
  # Untying in transformers 5.x also unties encoder/decoder.embed_tokens from `shared`; v1.1
  # shares one input embedding, so re-share it.
  model.set_input_embeddings(model.shared)
  with torch.no_grad():  # Non-trivial norm scales and a distinct head so the mapping is exercised.
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.lm_head.weight.normal_(0.0, 0.2)
  assert model.lm_head.weight is not model.shared.weight
  assert model.encoder.embed_tokens.weight is model.shared.weight
  assert model.decoder.embed_tokens.weight is model.shared.weight
  return model


def sam(seed: int = 0, **config):
  """A random HF SamModel of `config` (SamConfig's sub-configs) with every tensor non-trivial: HF
  initialises some with std 1e-10, which would let a wrong mapping pass."""
  torch.manual_seed(seed)
  model = transformers.SamModel(transformers.SamConfig(**config)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.3))
  return model


def saved_safetensors(model, folder) -> tuple[dict, str]:
  """(state dict, path) of `model` written to folder/model.safetensors."""
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  # Clones: tied tensors (SAM's shared Gaussian matrix) are one storage under two names, which
  # save_file refuses.
  state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
  path = str(folder / "model.safetensors")
  save_file(state, path)
  return state, path
