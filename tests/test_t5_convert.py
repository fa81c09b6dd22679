"""Flan-T5 checkpoint converter: full-size manifests, HF parity per file format, error reporting."""
import json
import os
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from pixel_llm.models import checkpoint_io
from pixel_llm.models import t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
import hf_reference  # pylint: disable=wrong-import-position  (tests/hf_reference.py)

MANIFESTS = os.path.join(os.path.dirname(t5.__file__), "manifests")
TINY = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                   num_decoder_layers=2, relative_attention_num_buckets=8,
                   relative_attention_max_distance=16, dropout_rate=0.0)
APPLY = jax.jit(t5.T5(TINY).apply, compiler_options={"xla_backend_optimization_level": 0})


def _shapes(cfg: t5.T5Config):
  tok = jnp.ones((1, 1), jnp.int32)
  return nn.meta.unbox(
      jax.eval_shape(lambda: t5.T5(cfg).init(jax.random.key(0), tok, tok))["params"])


# ---------------------------------------------------------------- full-size manifests


@pytest.mark.parametrize("variant", ["small", "base", "large", "xl", "xxl"])
def test_manifest_maps_onto_full_size_network(variant):
  with open(os.path.join(MANIFESTS, f"flan_t5_{variant}.json")) as f:
    manifest = json.load(f)
  assert manifest["source"] == t5.VANITY_NAMES[f"flan-t5-{variant}"]
  tensors = manifest["tensors"]
  for key in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
              "lm_head.weight"):
    assert tensors[key] == [32128, t5.PRESETS[variant].d_model]
  lora = variant == "xl"  # PixelLLM's configuration: LoRA r=32 on Flan-T5-XL.
  shapes = _shapes(t5.T5Config.preset(variant, lora_rank=32 if lora else 0))

  # The real converter, fed zero-stride stand-ins of the published tensors: nothing is allocated.
  fake = ((k, np.broadcast_to(np.float32(0), s)) for k, s in tensors.items())
  loaded = traverse_util.flatten_dict(t5.load_tensors(shapes, fake, f"flan_t5_{variant}.json"))
  flat = traverse_util.flatten_dict(shapes)
  assert loaded.keys() == flat.keys()
  for path, value in flat.items():
    assert tuple(loaded[path].shape) == value.shape, path
    if "lora" in path[-1]:
      assert loaded[path] is value  # Absent from checkpoints: keeps its init.
    else:
      assert isinstance(loaded[path], np.ndarray), path
  assert sum("lora" in p[-1] for p in flat) == (2 * 144 if lora else 0)


# ---------------------------------------------------------------- HF parity, per format


_hf_model = hf_reference.t5_v11


@pytest.fixture(scope="module")
def hf_model():
  return _hf_model(TINY)


def _state_dict(model):
  """Independent contiguous copies (safetensors' save_file refuses shared storage)."""
  return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _write(model, folder, fmt):
  """Saves `model` in one of the public layouts; returns the path to hand to `load`."""
  os.makedirs(folder, exist_ok=True)
  if fmt == "safetensors":
    path = os.path.join(folder, "model.safetensors")
    safetensors_torch.save_model(model, path)
    return path
  if fmt in ("sharded", "sharded_bin"):
    keys, weight_map = list(model.state_dict()), {}
    state = _state_dict(model)
    for i, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
      shard = {k: state[k] for k in part}
      if fmt == "sharded":
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        safetensors_torch.save_file(shard, os.path.join(folder, name))
      else:
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save(shard, os.path.join(folder, name))
      weight_map.update(dict.fromkeys(part, name))
    index = "model.safetensors.index.json" if fmt == "sharded" else "pytorch_model.bin.index.json"
    with open(os.path.join(folder, index), "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder  # A folder resolves to its index.
  path = os.path.join(folder, "pytorch_model.bin")
  torch.save(model.state_dict(), path)
  return path


def _batch():
  rng = np.random.default_rng(0)
  enc = rng.integers(1, TINY.vocab_size, (2, 18)).astype(np.int32)
  dec = rng.integers(0, TINY.vocab_size, (2, 8)).astype(np.int32)
  enc[0, 13:] = 0
  dec[:, 0] = 0
  return enc, dec


@pytest.mark.parity
@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin", "sharded_bin"])
def test_load_matches_hf(hf_model, tmp_path, fmt):
  params = t5.load(_shapes(TINY), _write(hf_model, str(tmp_path), fmt))
  enc, dec = _batch()
  with torch.no_grad():
    out = hf_model(input_ids=torch.from_numpy(enc).long(),
                   attention_mask=torch.from_numpy(enc != 0),
                   decoder_input_ids=torch.from_numpy(dec).long())
  logits, aux = APPLY({"params": params}, enc, dec)
  valid = enc != 0
  for got, ref in ((np.asarray(aux["encoded"])[valid], out.encoder_last_hidden_state.numpy()[valid]),
                   (np.asarray(logits), out.logits.numpy())):
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_lora_factors_keep_their_init(hf_model, tmp_path):
  shapes = _shapes(t5.T5Config(**{**TINY.__dict__, "lora_rank": 4}))
  rng = np.random.default_rng(0)
  init = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  params = t5.load(init, _write(hf_model, str(tmp_path), "safetensors"))
  q, q_init = (p["decoder"]["block_1"]["layer_1"]["EncDecAttention"]["q"] for p in (params, init))
  assert q["lora_a"] is q_init["lora_a"] and q["lora_b"] is q_init["lora_b"]
  np.testing.assert_array_equal(q["kernel"], hf_model.state_dict()[
      "decoder.block.1.layer.1.EncDecAttention.q.weight"].numpy().T)


def test_load_vocab(tmp_path):
  with pytest.raises(FileNotFoundError, match="spiece.model"):
    t5.load_vocab(str(tmp_path / "model.safetensors"))
  (tmp_path / "spiece.model").write_bytes(b"")
  assert t5.load_vocab(str(tmp_path)) == str(tmp_path / "spiece.model")
  assert t5.load_vocab(str(tmp_path / "model.safetensors")) == str(tmp_path / "spiece.model")


# ---------------------------------------------------------------- errors


def test_truncated_file_is_named(hf_model, tmp_path):
  path = _write(hf_model, str(tmp_path), "safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(checkpoint_io.CheckpointError, match="model.safetensors"):
    t5.load(_shapes(TINY), path)


def test_wrong_size_lists_mis_shaped_keys(tmp_path):
  other = _hf_model(t5.T5Config(**{**TINY.__dict__, "d_ff": 48}))
  with pytest.raises(checkpoint_io.CheckpointMismatchError) as err:
    t5.load(_shapes(TINY), _write(other, str(tmp_path), "safetensors"))
  # 2 encoder blocks x 3 + 2 decoder blocks x 3 feed-forward kernels.
  assert len(err.value.mismatched) == 12 and not err.value.missing and not err.value.unexpected
  assert any(m.startswith("decoder.block.1.layer.2.DenseReluDense.wo.weight ")
             and "decoder/block_1/layer_2/DenseReluDense/wo/kernel (64, 32)" in m
             for m in err.value.mismatched)


def test_missing_and_unexpected_keys_are_listed(hf_model, tmp_path):
  state = _state_dict(hf_model)
  del state["lm_head.weight"]
  state["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)
  state["extra.weight"] = torch.zeros(3)
  path = str(tmp_path / "pytorch_model.bin")
  torch.save(state, path)
  with pytest.raises(checkpoint_io.CheckpointMismatchError) as err:
    t5.load(_shapes(TINY), path)
  assert err.value.missing == ["lm_head/kernel"] and not err.value.mismatched
  assert sorted(err.value.unexpected) == [
      "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight", "extra.weight"]
  with pytest.raises(checkpoint_io.CheckpointMismatchError) as err:
    t5.load(_shapes(TINY), path, ignore=(r"^extra\.", r"block\.1\..*relative_attention_bias"))
  assert err.value.missing == ["lm_head/kernel"] and not err.value.unexpected


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_pickle_with_code_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  path = str(tmp_path / "pytorch_model.bin")
  with open(path, "wb") as f:
    pickle.dump({"shared.weight": _Exploit(marker)}, f, protocol=2)
  with pytest.raises(checkpoint_io.CheckpointError, match="pytorch_model.bin"):
    t5.load(_shapes(TINY), path)
  torch.save({"shared.weight": _Exploit(marker)}, path)  # The zip format too.
  with pytest.raises(checkpoint_io.CheckpointError, match="pytorch_model.bin"):
    t5.load(_shapes(TINY), path)
  assert not marker.exists()
