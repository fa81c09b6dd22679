"""Cached decoding (pixel_llm.decode) against uncached recomputation: tiny PixelLLM and T5."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ln
from pixel_llm import decode
from pixel_llm.models import build
from pixel_llm.models import t5
from random_weights import random_params  # tests/random_weights.py

B, R, L, M, ALPHA = 2, 2, 6, 3, 0.6  # images, prompts per image, decode length, beams, alpha


@functools.lru_cache(maxsize=None)
def _setup():
  """A slimmed toy PixelLLM (64-px images), random weights, a batch, random encoder outputs."""
  config = ln.get_config("toy")
  config.unlock()
  config.model.image_size = 64
  # Fewer layers than the toy keep the compiles short; the decoder keeps two (a cache per layer).
  config.model.t5.num_layers = 1
  config.model.eva02.depth = config.model.prompt_extractor.depth = 1
  config.model.location_head.depth = 2
  model = build.build_model(config)
  rng = np.random.RandomState(1)
  v, s = config.model.t5.vocab_size, config.model.image_size
  text = np.concatenate([rng.randint(2, v, (B, R, 3)), np.zeros((B, R, 2))], -1).astype(np.int32)
  batch = {"image": rng.uniform(size=(B, s, s, 3)).astype(np.float32),
           "prompt_boxes": np.broadcast_to(np.array([[0, 0, 1, 1], [0.1, 0.2, 0.6, 0.7]],
                                                    np.float32), (B, R, 4)),
           "prompt_text": text, "decoder_input_tokens": np.zeros((B, R, L), np.int32)}
  shapes = jax.eval_shape(lambda: nn.meta.unbox(
      model.init_variables(jax.random.key(0), batch)["params"]))
  params = random_params(shapes)
  n, d = B * R, config.model.t5.d_model
  encoded = rng.normal(size=(n, 12, d)).astype(np.float32)
  mask = np.arange(12)[None] < np.array([12, 9, 5, 12])[:, None]
  return model, params, batch, encoded, mask


@functools.lru_cache(maxsize=None)
def _fns():
  """Jitted decoders on (params, encoded, mask); the settings are traced: one compile each."""
  net = _setup()[0].network

  @jax.jit
  def cached(params, encoded, mask, rng, temperature, top_k, top_p, no_repeat):
    cache = decode.init_cache(net, params, encoded, mask, L + 1)
    return decode.sample(decode.step_fn(net, params), cache, encoded.shape[0], L,
                         temperature=temperature, top_k=top_k, top_p=top_p, rng=rng,
                         no_repeat=no_repeat)

  @jax.jit
  def uncached(params, encoded, mask, no_repeat):
    return decode.greedy_uncached(decode.teacher_forced(net, params, encoded, mask),
                                  encoded.shape[0], L, no_repeat=no_repeat)

  @jax.jit
  def beam(params, encoded, mask):
    cache = decode.init_cache(net, params, encoded, mask, L + 1)
    return decode.beam_search(decode.step_fn(net, params), cache, encoded.shape[0], L,
                              beam_size=M, alpha=ALPHA)

  @jax.jit
  def full_logits(params, encoded, mask, buf):
    return net.apply({"params": params}, encoded, mask, buf, method=net.decode)[0]

  return cached, uncached, beam, full_logits


def _greedy(params, encoded, mask, no_repeat=False):
  return _fns()[0](params, encoded, mask, jax.random.key(0), 0.0, 0, 1.0, no_repeat)


@functools.lru_cache(maxsize=None)
def _eos_params():
  """Weights whose EOS logit copies (scaled) that of row 0's second greedy token, so that greedy
  decoding ends some rows early and not others."""
  _, params, _, encoded, mask = _setup()
  kernel = params["t5"]["lm_head"]["kernel"]
  tok = int(_greedy(params, encoded, mask)[0][0, 1])
  for scale in (1.05, 1.1, 1.2, 1.5, 2.0):
    eos = jax.tree.map(lambda x: x, params)
    eos["t5"]["lm_head"]["kernel"] = kernel.copy()
    eos["t5"]["lm_head"]["kernel"][:, decode.EOS_ID] = scale * kernel[:, tok]
    ended = (np.asarray(_greedy(eos, encoded, mask)[0])[:, :-1] == decode.EOS_ID).any(1)
    if ended.any() and not ended.all():
      return eos
  raise AssertionError("no EOS scale ends only some rows")


def test_cached_greedy_equals_uncached_token_for_token_and_point_for_point():
  _, params, _, encoded, mask = _setup()
  uncached = _fns()[1]
  for p in (params, _eos_params()):
    for no_repeat in (False, True):
      tokens, points, scores = _greedy(p, encoded, mask, no_repeat)
      ref_tokens, ref_points, ref_scores = uncached(p, encoded, mask, no_repeat)
      np.testing.assert_array_equal(tokens, ref_tokens)
      np.testing.assert_allclose(points, ref_points, atol=1e-5)
      np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
  # Rows that end early: tokens and points after EOS are 0, the EOS point and earlier are not.
  tokens, points, _ = (np.asarray(x) for x in _greedy(_eos_params(), encoded, mask))
  assert points.shape == (B * R, L, 2, 2)
  for row in range(len(tokens)):
    e = list(tokens[row]).index(1) if 1 in tokens[row] else L - 1
    assert (tokens[row, e + 1:] == 0).all() and (points[row, e + 1:] == 0).all()
    assert (np.abs(points[row, :e + 1]).sum(-1) > 0).all()


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference_beam(full_logits, params, encoded, mask, row):
  """Plain-Python beam search over uncached full-decoder logits (no early stop, same rules)."""
  enc, msk = jnp.repeat(encoded[row:row + 1], M, 0), jnp.repeat(mask[row:row + 1], M, 0)
  live, finished = [((), 0.0)], []
  for i in range(L):
    buf = np.zeros((M, L + 1), np.int32)
    for j, (seq, _) in enumerate(live):
      buf[j, 1:1 + len(seq)] = seq
    logp = _log_softmax(np.asarray(full_logits(params, enc, msk, jnp.asarray(buf)))[:, i])
    cands = sorted(((lp + logp[j, v], j * logp.shape[1] + v) for j, (_, lp) in enumerate(live)
                    for v in range(logp.shape[1])), key=lambda c: (-c[0], c[1]))[:2 * M]
    new_live = []
    for lp, flat in cands:
      j, v = divmod(flat, logp.shape[1])
      seq = live[j][0] + (v,)
      if v == decode.EOS_ID or i + 1 == L:
        finished.append((lp / ((5 + len(seq)) / 6) ** ALPHA, seq))
      elif len(new_live) < M:
        new_live.append((seq, lp))
    finished = sorted(finished, key=lambda f: -f[0])[:M]
    live = new_live
  score, seq = finished[0]
  return np.array(seq + (0,) * (L - len(seq))), score


def test_cached_beam_search_equals_uncached_reference():
  _, params, _, encoded, mask = _setup()
  _, _, beam, full_logits = _fns()
  ends = []
  for p in (params, _eos_params()):
    tokens, scores = (np.asarray(x) for x in beam(p, encoded, mask))
    for row in range(encoded.shape[0]):
      ref_tokens, ref_score = _reference_beam(full_logits, p, encoded, mask, row)
      np.testing.assert_array_equal(tokens[row], ref_tokens)
      np.testing.assert_allclose(scores[row], ref_score, rtol=1e-5)
    ends.append((tokens == decode.EOS_ID).any(1))
  ends = np.concatenate(ends)
  assert ends.any() and not ends.all(), ends  # both ways of finishing were exercised


def test_batch_equals_one_at_a_time():
  _, _, _, encoded, mask = _setup()
  eos_params, beam = _eos_params(), _fns()[2]
  tokens, points, scores = _greedy(eos_params, encoded, mask)
  beam_tokens, beam_scores = beam(eos_params, encoded, mask)
  for row in range(encoded.shape[0]):
    one = slice(row, row + 1)
    t1, p1, s1 = _greedy(eos_params, encoded[one], mask[one])
    np.testing.assert_array_equal(t1[0], tokens[row])
    np.testing.assert_allclose(p1[0], points[row], atol=1e-5)
    np.testing.assert_allclose(s1[0], scores[row], rtol=1e-5)
    bt1, bs1 = beam(eos_params, encoded[one], mask[one])
    np.testing.assert_array_equal(bt1[0], beam_tokens[row])
    np.testing.assert_allclose(bs1[0], beam_scores[row], rtol=1e-5)


def test_sampling_rules():
  _, params, _, encoded, mask = _setup()
  cached = _fns()[0]
  greedy = np.asarray(_greedy(params, encoded, mask)[0])
  key = jax.random.key(7)
  def run(key, t=1.0, k=0, p=1.0, nr=False):
    return np.asarray(cached(params, encoded, mask, key, t, k, p, nr)[0])

  first = run(key)
  np.testing.assert_array_equal(first, run(key))  # deterministic for an rng
  assert not np.array_equal(first, run(jax.random.key(8)))
  assert not np.array_equal(first, greedy)
  np.testing.assert_array_equal(run(key, t=1e-6), greedy)  # temperature -> 0
  np.testing.assert_array_equal(run(key, t=0.0), greedy)
  np.testing.assert_array_equal(run(key, k=1), greedy)
  np.testing.assert_array_equal(run(key, p=1e-6), greedy)  # the nucleus of one token
  # Greedy repeats a token on this model; no_repeat never emits the token it was just fed.
  assert (greedy[:, 1:] == greedy[:, :-1]).any()
  for tokens in (run(key, t=2.0, nr=True), run(jax.random.key(9), t=0.0, nr=True)):
    real = np.asarray(decode.real_tokens(jnp.asarray(tokens)))
    assert not ((tokens[:, 1:] == tokens[:, :-1]) & real[:, 1:]).any(), tokens


def test_predict_batch_through_the_model():
  model, params, batch, _, _ = _setup()

  @jax.jit
  def predict(p, b):
    # One beam without length penalty is greedy decoding too; the beam's points come from its
    # teacher-forced pass, greedy's from its steps.
    return (model.predict_batch(p, b, max_decode_len=L),
            model.predict_batch(p, b, max_decode_len=L, method="beam", beam_size=1,
                                length_penalty=0.0))

  greedy, beam = predict(params, batch)
  assert greedy["points"].shape == (B, R, L, 2, 2) and greedy["scores"].shape == (B, R)
  np.testing.assert_array_equal(beam["tokens"], greedy["tokens"])
  np.testing.assert_allclose(beam["points"], greedy["points"], atol=1e-5)
  np.testing.assert_allclose(beam["scores"], greedy["scores"], rtol=1e-5)
  for bad in (dict(method="sample"), dict(method="topk"), dict(top_p=0.0)):
    with pytest.raises(ValueError):
      model.predict_batch(params, batch, max_decode_len=L, **bad)


TINY = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                   num_decoder_layers=2, relative_attention_num_buckets=8,
                   relative_attention_max_distance=16, dropout_rate=0.0, lora_rank=2)


def test_t5_cached_logits_equal_teacher_forced():
  model, steps = t5.T5(TINY), 20  # longer than max_distance: the capped buckets are reached
  enc = jax.random.randint(jax.random.key(1), (3, 7), 1, 64).at[1, 5:].set(0)
  dec = jax.random.randint(jax.random.key(2), (3, steps), 2, 64).at[:, 0].set(0)
  params = random_params(jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.key(0), enc, dec)["params"])))  # LoRA B non-zero: LoRA counts too
  logits, aux = jax.jit(model.apply)({"params": params}, enc, dec)
  init = jax.jit(lambda p, e, m: model.apply({"params": p}, e, m, steps, method=model.init_cache,
                                             mutable=["cache"])[1]["cache"])
  step = jax.jit(lambda p, c, tok: model.apply({"params": p, "cache": c}, tok,
                                               method=model.decode_step, mutable=["cache"]))

  def feed(chunks):
    cache, out = init(params, aux["encoded"], enc != 0), []
    for lo, hi in chunks:
      (step_logits, _), state = step(params, cache, dec[:, lo:hi])
      out.append(step_logits)
      cache = state["cache"]
    return jnp.concatenate(out, 1), cache

  # float32 sums in another order (one or ten queries per step vs. all twenty; CPU matmul
  # kernels differ between machines): 0.9e-5 / 1.9e-5 off on logits up to 3.5 on a Xeon where
  # 1e-5 had passed elsewhere.
  # A position off by one moves them far more (asserted below).
  tol = dict(atol=1e-4, rtol=1e-5)
  shifted, _ = jax.jit(model.apply)({"params": params}, enc,
                                    jnp.pad(dec, ((0, 0), (1, 0)))[:, :-1])  # BOS prepended
  assert jnp.abs(shifted[:, 1:] - logits[:, :-1]).max() > 1000 * tol["atol"]
  one_by_one, cache = feed([(i, i + 1) for i in range(steps)])
  np.testing.assert_allclose(one_by_one, logits, **tol)
  assert int(cache["decoder"]["index"]) == steps
  chunked, _ = feed([(0, 10), (10, steps)])  # several positions per step (a prefilled prefix)
  np.testing.assert_allclose(chunked, logits, **tol)
  # map_cache: a beam reorder moves the self-attention cache but not the encoder-side entries.
  order = jnp.array([2, 2, 0])
  moved = t5.map_cache(lambda x: x[order], cache, dynamic_only=True)
  def block(c, layer, name):
    return c["decoder"]["block_0"][layer][name]["cached_key"]
  np.testing.assert_array_equal(block(moved, "layer_0", "SelfAttention"),
                                block(cache, "layer_0", "SelfAttention")[order])
  np.testing.assert_array_equal(block(moved, "layer_1", "EncDecAttention"),
                                block(cache, "layer_1", "EncDecAttention"))
  np.testing.assert_array_equal(moved["decoder"]["encoder_mask"], cache["decoder"]["encoder_mask"])
