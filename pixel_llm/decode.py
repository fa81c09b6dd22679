"""Cached autoregressive decoding with a location per token: greedy, sampling, beam search.

  encode      image towers once per image -> R location prompts each -> T5 encoder   (N = B * R)
  init_cache  cross-attention keys/values once per prompt; a self-attention cache of L + 1 steps
  prefill     feed BOS (position 0) -> logits of token 1
  extend      feed token t at position t -> logits of token t + 1 and the points of token t

The point of a token is read in the step that feeds it (models/pixel_llm.py aligns points with
decoder inputs), so the last token costs one step more than its logits did. The loops are in-graph
`lax.while_loop`s that stop once every sequence has ended, so `PixelLLMModel.predict_batch` jits
whole. They run on any `StepFn(cache, tokens int32[N]) -> (logits float32[N, V], points
float32[N, K, 2], cache)`, so T5 alone (K = 0) uses them too (benchmarks/decode.py).
`greedy_uncached` re-runs the decoder over the whole buffer at every step: the reference.

Conventions: BOS = 0; tokens after the first EOS (1) are 0 and so are their points. Logit rules
(`no_repeat`: never the fed token again; `min_len`: no EOS before that many tokens) act before
the log-softmax, so scores are log-probabilities of the ruled distribution at temperature 1.
Greedy/sampling score = summed log-probability; beam score = that / ((5 + length) / 6) ** alpha
(t5x's brevity penalty; length counts EOS).

Shapes: B images, R prompts per image, N = B * R sequences, L max decode length, V vocabulary,
K points per token, M beams.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from pixel_llm.models import t5

BOS_ID, EOS_ID = 0, 1
NEG_INF = -1.0e7  # t5x's: finite, so masked candidates still add and compare sanely
METHODS = ("greedy", "beam", "sample")

StepFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array, Any]]
_PROMPT_KEYS = ("prompt_boxes", "prompt_points", "prompt_point_labels", "prompt_text")


def num_prompts(batch: dict[str, Any]) -> int:
  """R: from the decoder tokens or any prompt feature of the batch; 1 when there is none."""
  for key in ("decoder_input_tokens",) + _PROMPT_KEYS:
    if batch.get(key) is not None:
      return batch[key].shape[1]
  return 1


def encode(network, params, batch: dict[str, Any], r: int) -> tuple[jax.Array, jax.Array]:
  """batch (model.py's features) -> (encoded float[N, Q+C, D], mask bool[N, Q+C])."""
  def fn(mdl):
    feats = mdl.encode_image(batch["image"], batch.get("image_mask"))
    visual = mdl.encode_prompts(feats, boxes=batch.get("prompt_boxes"),
                                points=batch.get("prompt_points"),
                                point_labels=batch.get("prompt_point_labels"), num_prompts=r,
                                prompt_text=batch.get("prompt_text"))
    return mdl.encode_prefix(visual, batch.get("prompt_text"))
  return network.apply({"params": params}, method=fn)


def init_cache(network, params, encoded: jax.Array, mask: jax.Array, max_length: int) -> Any:
  """A decoding cache of `max_length` positions for `network` (PixelLLM or T5)."""
  _, state = network.apply({"params": params}, encoded, mask, max_length,
                           method=network.init_cache, mutable=["cache"])
  return state["cache"]


def step_fn(network, params) -> StepFn:
  """The cached step of a PixelLLM, or of a T5 (which has no points: K = 0), as a StepFn."""
  def step(cache, tokens):
    out, state = network.apply({"params": params, "cache": cache}, tokens[:, None],
                               method=network.decode_step, mutable=["cache"])
    points = out[2][:, 0] if len(out) == 3 else jnp.zeros((tokens.shape[0], 0, 2), jnp.float32)
    return out[0][:, 0], points, state["cache"]
  return step


def real_tokens(tokens: jax.Array) -> jax.Array:
  """bool[N, L]: token t is generated output (no EOS before it)."""
  eos = tokens == EOS_ID
  return jnp.cumsum(eos, axis=1) - eos == 0


def _is(x, value) -> bool:
  """x is the Python value `value` (not a tracer): lets a static setting skip its work."""
  return isinstance(x, (bool, int, float)) and x == value


def _rules(logits, prev, i, *, no_repeat, min_len):
  """logits [N, V] for the token after `prev` int32[N]; i tokens generated so far."""
  logits = logits.astype(jnp.float32)
  if not _is(no_repeat, False):
    same = jnp.arange(logits.shape[-1]) == prev[:, None]
    logits = jnp.where(jnp.asarray(no_repeat) & same, NEG_INF, logits)
  if not _is(min_len, 0):
    logits = logits.at[:, EOS_ID].set(jnp.where(i < min_len, NEG_INF, logits[:, EOS_ID]))
  return logits


def _choose(logits, rng, temperature, top_k, top_p) -> jax.Array:
  """Next token int32[N] from logits [N, V]: argmax at temperature 0, else a sample from the
  top_k (0 = all) tokens inside the top_p nucleus (1 = all). Settings may be traced arrays, so one
  compiled program serves them all; Python values skip the filters they switch off."""
  best = logits.argmax(-1).astype(jnp.int32)
  if _is(temperature, 0):
    return best
  t = jnp.asarray(temperature, jnp.float32)
  logits = logits / jnp.where(t > 0, t, 1.0)
  ranked = None
  if not _is(top_k, 0):
    if isinstance(top_k, int):
      kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    else:
      ranked = -jnp.sort(-logits, axis=-1)
      kth = ranked[:, jnp.clip(top_k - 1, 0, logits.shape[-1] - 1)][:, None]
      kth = jnp.where(top_k > 0, kth, -jnp.inf)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    ranked = None if ranked is None else jnp.where(ranked < kth, -jnp.inf, ranked)
  if not _is(top_p, 1):
    # Nucleus: the smallest set of top tokens whose probability reaches top_p.
    ranked = -jnp.sort(-logits, axis=-1) if ranked is None else ranked
    probs = jax.nn.softmax(ranked, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs < top_p) | (top_p >= 1.0)
    cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jnp.where(t > 0, jax.random.categorical(rng, logits).astype(jnp.int32), best)


def sample(step: StepFn, cache, batch_size: int, max_len: int, *, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, rng: jax.Array | None = None,
           no_repeat: bool = False, min_len: int = 0):
  """Greedy (temperature 0) or sampled decoding on a fresh cache of >= max_len + 1 positions.

  temperature, top_k, top_p, no_repeat and min_len may be traced (see `_choose`); each step
  samples with `fold_in(rng, step)`. Returns (tokens int32[N, L], points float32[N, L, K, 2],
  scores float32[N]).
  """
  if not _is(temperature, 0) and rng is None:
    raise ValueError("Sampling needs an rng.")
  n = batch_size
  logits, bos_points, cache = step(cache, jnp.full((n,), BOS_ID, jnp.int32))  # prefill
  init = (jnp.zeros((), jnp.int32), logits, jnp.full((n,), BOS_ID, jnp.int32),
          jnp.ones((n,), bool), jnp.zeros((n, max_len), jnp.int32),
          jnp.zeros((n, max_len) + bos_points.shape[1:], jnp.float32),
          jnp.zeros((n,), jnp.float32), cache)

  def cond(s):
    return (s[0] < max_len) & s[3].any()

  def body(s):
    i, logits, prev, emitting, tokens, points, scores, cache = s
    logits = _rules(logits, prev, i, no_repeat=no_repeat, min_len=min_len)
    key = None if rng is None else jax.random.fold_in(rng, i)  # a fresh key per step
    tok = jnp.where(emitting, _choose(logits, key, temperature, top_k, top_p), 0)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tok[:, None], -1)[:, 0]
    scores = scores + jnp.where(emitting, logp, 0.0)
    logits, pts, cache = step(cache, tok)  # extend: the points of `tok`, the logits after it
    tokens = tokens.at[:, i].set(tok)
    points = points.at[:, i].set(jnp.where(emitting[:, None, None], pts.astype(jnp.float32), 0.0))
    return i + 1, logits, tok, emitting & (tok != EOS_ID), tokens, points, scores, cache

  _, _, _, _, tokens, points, scores, _ = jax.lax.while_loop(cond, body, init)
  return tokens, points, scores


def brevity_penalty(alpha: float, length) -> jax.Array:
  """t5x's length normalisation: beam scores are log-probabilities divided by this."""
  return ((5.0 + length) / 6.0) ** alpha


class BeamState(NamedTuple):
  i: jax.Array            # int32[]: tokens generated so far
  live_seqs: jax.Array    # int32[N, M, L]
  live_logp: jax.Array    # float32[N, M], best first
  fin_seqs: jax.Array     # int32[N, M, L]
  fin_scores: jax.Array   # float32[N, M], best first
  fin_flags: jax.Array    # bool[N, M]: the slot holds a finished sequence
  cache: Any              # batch N * M


def beam_search(step: StepFn, cache, batch_size: int, max_len: int, *, beam_size: int = 4,
                alpha: float = 0.6, no_repeat: bool = False, min_len: int = 0):
  """t5x-style beam search on a fresh cache (batch N) of >= max_len positions.

  Each step ranks the top 2M continuations of the M live beams: those ending in EOS join the M
  best finished sequences (scored log-prob / brevity penalty), the best M others stay live. A beam
  reaching max_len finishes there. The search stops when no live beam can beat the worst finished
  one (alpha >= 0). Returns (tokens int32[N, L] of the best finished beam, its score float32[N]).
  """
  n, m = batch_size, beam_size
  logits, _, cache = step(cache, jnp.full((n,), BOS_ID, jnp.int32))  # prefill, once per prompt
  # The beams of one prompt are identical until their first token: expand after the BOS step.
  cache = t5.map_cache(lambda x: jnp.repeat(x, m, axis=0), cache)
  logits = jnp.repeat(logits, m, axis=0)
  seqs = jnp.zeros((n, m, max_len), jnp.int32)
  first_only = jnp.tile(jnp.array([0.0] + [NEG_INF] * (m - 1), jnp.float32), (n, 1))
  state = BeamState(jnp.zeros((), jnp.int32), seqs, first_only, seqs,
                    jnp.full((n, m), NEG_INF, jnp.float32), jnp.zeros((n, m), bool), cache)
  rows = jnp.arange(n)[:, None]

  def select(s: BeamState, logits) -> BeamState:
    prev = jnp.where(s.i > 0, s.live_seqs[:, :, jnp.maximum(s.i - 1, 0)], BOS_ID).reshape(-1)
    logits = _rules(logits, prev, s.i, no_repeat=no_repeat, min_len=min_len)
    logp = jax.nn.log_softmax(logits, -1).reshape(n, m, -1) + s.live_logp[..., None]
    vocab = logp.shape[-1]
    top_logp, top_idx = jax.lax.top_k(logp.reshape(n, m * vocab), 2 * m)
    parent, tok = top_idx // vocab, top_idx % vocab
    cand = s.live_seqs[rows, parent].at[:, :, s.i].set(tok)  # [N, 2M, L]
    finished = (tok == EOS_ID) | (s.i + 1 >= max_len)
    live_logp, keep = jax.lax.top_k(jnp.where(finished, NEG_INF, top_logp), m)
    scores = jnp.where(finished, top_logp / brevity_penalty(alpha, s.i + 1), NEG_INF)
    all_scores = jnp.concatenate([s.fin_scores, scores], axis=1)
    fin_scores, best = jax.lax.top_k(all_scores, m)
    fin_seqs = jnp.concatenate([s.fin_seqs, cand], axis=1)[rows, best]
    fin_flags = jnp.concatenate([s.fin_flags, finished], axis=1)[rows, best]
    beams = (rows * m + parent[rows, keep]).reshape(-1)
    cache = t5.map_cache(lambda x: x[beams], s.cache, dynamic_only=True)
    return BeamState(s.i + 1, cand[rows, keep], live_logp, fin_seqs, fin_scores, fin_flags, cache)

  def cond(s: BeamState):
    best_live = s.live_logp[:, 0] / brevity_penalty(alpha, max_len)
    settled = s.fin_flags.all(axis=1) & (s.fin_scores.min(axis=1) > best_live)
    return (s.i < max_len) & ~settled.all()

  def body(s: BeamState):
    logits, _, cache = step(s.cache, s.live_seqs[:, :, s.i - 1].reshape(-1))
    return select(s._replace(cache=cache), logits)

  state = jax.lax.while_loop(cond, body, select(state, logits))
  return state.fin_seqs[:, 0], state.fin_scores[:, 0]


def greedy_uncached(logits_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
                    batch_size: int, max_len: int, *, no_repeat: bool = False, min_len: int = 0):
  """Reference greedy decoding without a cache: logits_fn(buffer int32[N, L+1]) -> (logits
  [N, L+1, V], points [N, L+1, K, 2]) runs the full teacher-forced decoder at every step, and once
  more over the result for the points. Returns what `sample` returns."""
  def step(i, state):
    buf, done, score = state
    logits = _rules(logits_fn(buf)[0][:, i], buf[:, i], i, no_repeat=no_repeat, min_len=min_len)
    logp = jax.nn.log_softmax(logits, -1)
    nxt = jnp.where(done, 0, logp.argmax(-1))
    score = score + jnp.where(done, 0.0, logp.max(-1))
    return buf.at[:, i + 1].set(nxt), done | (nxt == EOS_ID), score

  state = (jnp.zeros((batch_size, max_len + 1), jnp.int32), jnp.zeros((batch_size,), bool),
           jnp.zeros((batch_size,), jnp.float32))
  buf, _, score = jax.lax.fori_loop(0, max_len, step, state)
  tokens = buf[:, 1:]
  points = logits_fn(buf)[1][:, 1:].astype(jnp.float32)
  return tokens, jnp.where(real_tokens(tokens)[..., None, None], points, 0.0), score


def teacher_forced(network, params, encoded: jax.Array, mask: jax.Array):
  """PixelLLM's uncached decoder as `greedy_uncached`'s logits_fn: buf int32[N, T] ->
  (logits float32[N, T, V], points float32[N, T, K, 2])."""
  def fn(buf):
    logits, _, points = network.apply({"params": params}, encoded, mask, buf, method=network.decode)
    return logits, points
  return fn


def _reshape(b: int, r: int, tokens, points, scores) -> dict[str, jax.Array]:
  return {"tokens": tokens.reshape(b, r, -1), "points": points.reshape(b, r, *points.shape[1:]),
          "scores": scores.reshape(b, r)}


def generate(network, params, batch: dict[str, Any], *, max_decode_len: int,
             method: str = "greedy", beam_size: int = 4, length_penalty: float = 0.6,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             rng: jax.Array | None = None, no_repeat: bool = False,
             min_decode_len: int = 0) -> dict[str, jax.Array]:
  """Cached decoding of every prompt of a batch (see `PixelLLMModel.predict_batch`).

  Returns {"tokens": int32[B, R, L], "points": float32[B, R, L, K, 2], "scores": float32[B, R]}.
  Beam search returns the best beam; its points come from one teacher-forced decoder pass over it
  (the equivalent of the extra step, for every token at once).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  if max_decode_len < 1 or beam_size < 1 or top_k < 0 or not 0.0 < top_p <= 1.0 or temperature < 0:
    raise ValueError(f"Bad decoding settings: max_decode_len={max_decode_len}, beam_size="
                     f"{beam_size}, top_k={top_k}, top_p={top_p}, temperature={temperature}.")
  if method == "sample" and rng is None and temperature != 0.0:
    raise ValueError("method='sample' needs an rng.")
  b, r = batch["image"].shape[0], num_prompts(batch)
  encoded, mask = encode(network, params, batch, r)
  n = encoded.shape[0]
  cache = init_cache(network, params, encoded, mask, max_decode_len + 1)
  rules = dict(no_repeat=no_repeat, min_len=min_decode_len)
  if method == "beam":
    tokens, scores = beam_search(step_fn(network, params), cache, n, max_decode_len,
                                 beam_size=beam_size, alpha=length_penalty, **rules)
    buf = jnp.concatenate([jnp.full((n, 1), BOS_ID, jnp.int32), tokens], axis=1)
    points = teacher_forced(network, params, encoded, mask)(buf)[1][:, 1:].astype(jnp.float32)
    points = jnp.where(real_tokens(tokens)[..., None, None], points, 0.0)
    return _reshape(b, r, tokens, points, scores)
  if method == "greedy":
    temperature, rng = 0.0, None
  out = sample(step_fn(network, params), cache, n, max_decode_len, temperature=temperature,
               top_k=top_k, top_p=top_p, rng=rng, **rules)
  return _reshape(b, r, *out)


def generate_uncached(network, params, batch: dict[str, Any], *, max_decode_len: int,
                      no_repeat: bool = False, min_decode_len: int = 0) -> dict[str, jax.Array]:
  """`generate(method="greedy")` without a KV cache (the reference it is tested against)."""
  b, r = batch["image"].shape[0], num_prompts(batch)
  encoded, mask = encode(network, params, batch, r)
  out = greedy_uncached(teacher_forced(network, params, encoded, mask), encoded.shape[0],
                        max_decode_len, no_repeat=no_repeat, min_len=min_decode_len)
  return _reshape(b, r, *out)
