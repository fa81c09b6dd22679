"""TensorFlow ops of the LN pipeline: parsing, token <-> utterance alignment, image resize/pad, and
the conversion of task examples to the model's batch features (see `pixel_llm/model.py`).

Shape letters: U utterances, N caption tokens, L caption characters (Unicode code points),
T decoder length, C prompt-text length, S image side, K = 2 points per token (box corners).

Alignment rule (`align_tokens`; utterance spans must be increasing and disjoint, as
`ln.locate_utterances` writes them). SentencePiece offsets are byte offsets into the original
caption and a word piece "▁image" starts at the space before the word, so a token is anchored at
its first non-whitespace character; the anchor (converted to a character index) is looked up in
the utterances' [start, end) character spans. Consequences:
  - every piece of a word (first or continuation) anchors inside that word, so sub-word pieces
    inherit their word's utterance;
  - a whitespace-only piece (a lone "▁", split off before a word whose first character cannot
    follow it, e.g. an unknown one) and punctuation or words outside every located span (also
    the words of utterances the builder could not locate) belong to no utterance: weight 0;
  - tokens of an utterance without trace points (has_trace 0) get weight 0, and so does EOS;
  - the alignment is computed on the whole caption before truncation, so truncating only drops
    tokens and never shifts the others' locations (the release stretched them).
"""
import tensorflow as tf

FEATURE_DESCRIPTION = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/id": tf.io.FixedLenFeature([], tf.string),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "caption": tf.io.FixedLenFeature([], tf.string),
    "utterance/start": tf.io.VarLenFeature(tf.int64),
    "utterance/end": tf.io.VarLenFeature(tf.int64),
    "utterance/box": tf.io.VarLenFeature(tf.float32),
    "utterance/point": tf.io.VarLenFeature(tf.float32),
    "utterance/has_trace": tf.io.VarLenFeature(tf.int64),
}

# Code points treated as whitespace when anchoring tokens (SentencePiece's nmt_nfkc folds these
# into the "▁" meta symbol).
_SPACES = (9, 10, 11, 12, 13, 32, 0xA0, 0x3000)
_SENTENCE_ENDS = (ord("."), ord("!"), ord("?"))


def dense_utterances(ex: dict) -> dict:
  """Parsed example -> {image, image_id, caption, starts int64[U], ends int64[U],
  boxes float32[U, 4], has_trace bool[U]}."""
  d = {k: tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v for k, v in ex.items()}
  return {"image": d["image/encoded"], "image_id": d["image/id"], "caption": d["caption"],
          "starts": d["utterance/start"], "ends": d["utterance/end"],
          "boxes": tf.reshape(d["utterance/box"], [-1, 4]),
          "has_trace": d["utterance/has_trace"] > 0}


def _is_space(codepoints: tf.Tensor) -> tf.Tensor:
  return tf.reduce_any(codepoints[:, None] == tf.constant(_SPACES, tf.int32)[None, :], axis=1)


def align_tokens(caption: tf.Tensor, starts: tf.Tensor, ends: tf.Tensor, has_trace: tf.Tensor,
                 boxes: tf.Tensor, tokenizer) -> dict:
  """Tokenizes `caption` (scalar string) and assigns each token an utterance (module docstring).

  Returns tokens int32[N], boxes float32[N, 4] (zeros where weight is 0), weights float32[N],
  sentence int32[N] (index of the token's sentence), byte_start / byte_end int64[N].
  """
  tokens, b0, b1 = tokenizer.tokenize_with_offsets(caption)
  tokens = tf.cast(tokens, tf.int32)
  b0, b1 = tf.cast(b0, tf.int64), tf.cast(b1, tf.int64)
  codepoints, char_bytes = tf.strings.unicode_decode_with_offsets(caption, "UTF-8",
                                                                  errors="replace")
  # Character range [c0, c1) of each token.
  c0 = tf.searchsorted(char_bytes, b0, side="right") - 1
  c1 = tf.searchsorted(char_bytes, b1, side="left")
  solid = tf.cast(tf.where(~_is_space(codepoints))[:, 0], c0.dtype)  # non-space char indices
  k = tf.searchsorted(solid, c0, side="left")
  first_solid = tf.gather(tf.concat([solid, [-1]], 0), k)  # -1 when there is none
  anchor = tf.where((first_solid >= 0) & (first_solid < c1), first_solid, -1)

  starts, ends = tf.cast(starts, anchor.dtype), tf.cast(ends, anchor.dtype)
  u = tf.searchsorted(starts, anchor, side="right") - 1
  u_safe = tf.maximum(u, 0)
  inside = (anchor >= 0) & (u >= 0) & (anchor < tf.gather(tf.concat([ends, [0]], 0), u_safe))
  traced = inside & tf.gather(tf.concat([has_trace, [False]], 0), u_safe)
  weights = tf.cast(traced, tf.float32)
  token_boxes = tf.gather(tf.concat([tf.cast(boxes, tf.float32), tf.zeros([1, 4])], 0), u_safe)
  token_boxes *= weights[:, None]

  # Sentence of each character: a sentence ends after [.!?] followed by whitespace or the end.
  nxt = tf.concat([codepoints[1:], [32]], 0)
  ends_here = (tf.reduce_any(codepoints[:, None] == tf.constant(_SENTENCE_ENDS)[None, :], 1)
               & _is_space(nxt))
  char_sentence = tf.cumsum(tf.cast(ends_here, tf.int32), exclusive=True)
  where = tf.where(anchor >= 0, anchor, tf.maximum(c0, 0))
  sentence = tf.gather(tf.concat([char_sentence, [0]], 0),
                       tf.minimum(where, tf.size(char_sentence, out_type=where.dtype)))
  return {"tokens": tokens, "boxes": token_boxes, "weights": weights,
          "sentence": tf.cast(sentence, tf.int32), "byte_start": b0, "byte_end": b1}


def resize_image(image: tf.Tensor, new_hw: tf.Tensor) -> tf.Tensor:
  """uint8[H, W, 3] -> uint8[h, w, 3], bilinear. Antialiasing costs ~4x on CPU and changes nothing when enlarging (below 1e-4 before
  rounding), so it runs only when shrinking; the same size is returned as is."""
  hw = tf.shape(image)[:2]

  def resize(antialias):
    out = tf.image.resize(image, new_hw, method="bilinear", antialias=antialias)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

  return tf.cond(tf.reduce_all(hw == new_hw), lambda: image,
                 lambda: tf.cond(tf.reduce_any(new_hw < hw), lambda: resize(True),
                                 lambda: resize(False)))


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG / PNG (first frame of a GIF) -> uint8[H, W, 3]."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def resize_and_pad(encoded: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Decodes an image, resizes its longer side to `size` (keeping the aspect ratio) and pads
  bottom/right with zeros.

  Returns image uint8[S, S, 3] (uint8 keeps shuffle buffers 4x smaller; `to_model_features` makes
  float32 in [0, 1]), mask bool[S, S] (False on padding), and the content's extent (w, h)
  float32[2] as a fraction of S, which maps image-normalised coordinates into the padded frame.
  """
  return resize_and_pad_decoded(decode(encoded), size)


def resize_and_pad_decoded(image: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """`resize_and_pad` of an image already decoded (uint8[H, W, 3])."""
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size / tf.reduce_max(hw)
  new_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
  resized = resize_image(image, new_hw)
  padded = tf.image.pad_to_bounding_box(resized, 0, 0, size, size)
  rows = tf.range(size)[:, None] < new_hw[0]
  cols = tf.range(size)[None, :] < new_hw[1]
  extent = tf.cast(new_hw[::-1], tf.float32) / size
  return padded, rows & cols, extent


def trim_with_eos(tokens: tf.Tensor, boxes: tf.Tensor, weights: tf.Tensor, length: int | None,
                  eos_id: int = 1) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Keeps the first length - 1 tokens and appends EOS (weight 0), as seqio's
  append_eos_after_trim; `length` None keeps every token."""
  if length is not None:
    tokens, boxes, weights = tokens[:length - 1], boxes[:length - 1], weights[:length - 1]
  return (tf.concat([tokens, [eos_id]], 0), tf.concat([boxes, tf.zeros([1, 4])], 0),
          tf.concat([weights, [0.0]], 0))


def _pad_to(x: tf.Tensor, length: int) -> tf.Tensor:
  x = x[:length]
  pad = [[0, length - tf.shape(x)[0]]] + [[0, 0]] * (len(x.shape) - 1)
  return tf.pad(x, pad)


def to_model_features(ex: dict, max_target_len: int, max_context_len: int) -> dict:
  """One task example -> the model's features with the R = 1 prompt axis (no batch axis yet).

  image float32[S, S, 3] in [0, 1], image_mask bool[S, S], prompt_boxes float32[1, 4] (the whole
  padded square, the model's default), prompt_text int32[1, C], decoder_target_tokens /
  decoder_input_tokens int32[1, T] (inputs = BOS 0 + targets shifted right), point_targets
  float32[1, T, 2, 2] and point_weights float32[1, T] shifted right like the tokens (position t
  holds the location of decoder_input_tokens[t]; BOS and padding get weight 0), image_id
  string[], caption string[1].
  """
  t = max_target_len
  targets = _pad_to(ex["targets"], t)
  boxes = _pad_to(ex["target_boxes"], t)
  weights = _pad_to(ex["target_weights"], t)
  inputs = tf.concat([[0], targets[:-1]], 0)
  point_targets = tf.reshape(tf.concat([tf.zeros([1, 4]), boxes[:-1]], 0), [t, 2, 2])
  point_weights = tf.concat([[0.0], weights[:-1]], 0)
  prompt = _pad_to(ex["prompt_text"], max_context_len)
  return {
      "image": tf.cast(ex["image"], tf.float32) / 255.0,
      "image_mask": ex["image_mask"],
      "prompt_boxes": tf.constant([[0.0, 0.0, 1.0, 1.0]]),
      "prompt_text": tf.ensure_shape(prompt, [max_context_len])[None],
      "decoder_input_tokens": tf.ensure_shape(inputs, [t])[None],
      "decoder_target_tokens": tf.ensure_shape(targets, [t])[None],
      "point_targets": point_targets[None],
      "point_weights": tf.ensure_shape(point_weights, [t])[None],
      "image_id": ex["image_id"],
      "caption": ex["caption"][None],
  }
