"""Caption pictures (`render_caption` / `save_caption_png`) and SentencePiece piece -> word merging."""
import io

import numpy as np
import pytest
from PIL import Image

from pixel_llm import visualize

SENTENCES = [
    "a red bus parked under the yellow sun", "two dogs play on green grass",
    "a man riding a horse next to a fence", "the cat sleeps on a wooden bench",
    "people walking down a busy street at night", "a bowl of fruit on the kitchen table",
    "an elephant standing in a dusty field", "a boy throws a frisbee in the park",
] * 4


@pytest.fixture(scope="module")
def sp_model():
  spm = pytest.importorskip("sentencepiece")
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=proto,
                                 vocab_size=60, hard_vocab_limit=False, pad_id=0, eos_id=1,
                                 unk_id=2, bos_id=-1, minloglevel=2)
  return spm.SentencePieceProcessor(model_proto=proto.getvalue())


def _colour_near(img: np.ndarray, x0, x1, y0, y1, colour) -> bool:
  return bool(np.all(img[y0:y1, x0:x1] == np.array(colour, np.uint8), axis=-1).any())


def test_save_png_draws_boxes_and_coloured_caption(tmp_path):
  image = np.full((16, 16, 3), 0.5, np.float32)
  words = ["red", "bus", "sky"]
  points = [np.array([[0.25, 0.25], [0.75, 0.75]]), np.full((2, 2), np.nan), None]
  path = tmp_path / "sub" / "caption.png"
  visualize.save_caption_png(str(path), image, words, points, scale=8)
  img = np.asarray(Image.open(path).convert("RGB"))
  assert img.shape[1] == 128 and img.shape[0] > 128  # the caption panel sits below the image
  assert img.reshape(-1, 3).astype(np.float32).var(axis=0).sum() > 100.0
  c0, c1 = visualize.word_colour(0), visualize.word_colour(1)
  box = img[:128]
  # Box corners at 0.25 * 127 ~ 32 and 0.75 * 127 ~ 95: the outline is drawn along every edge ...
  assert _colour_near(box, 30, 36, 60, 68, c0) and _colour_near(box, 91, 97, 40, 48, c0)
  assert _colour_near(box, 40, 48, 30, 36, c0) and _colour_near(box, 40, 48, 91, 97, c0)
  # ... plus a dot at its centre, and nothing elsewhere (the image stays grey there).
  assert _colour_near(box, 60, 68, 60, 68, c0)
  assert np.all(box[5:25, 5:25] == 128) and np.all(box[38:46, 38:46] == 128)
  # The NaN-located word draws nothing; the caption holds word 0 in its colour and grey words.
  assert not _colour_near(box, 0, 128, 0, 128, c1)
  caption = img[128:]
  assert _colour_near(caption, 0, 128, 0, caption.shape[0], c0)
  assert _colour_near(caption, 0, 128, 0, caption.shape[0], visualize._NO_LOCATION)


def test_render_points_uint8_and_title():
  image = np.zeros((10, 20, 3), np.uint8)
  words = [f"w{i}" for i in range(14)]  # more words than palette colours: colours cycle
  points = np.full((14, 1, 2), np.nan, np.float32)
  points[0], points[3] = [[0.5, 0.5]], [[0.1, 0.9]]
  out = np.asarray(visualize.render_caption(image, words, points, scale=4, title="step 3"))
  plain = np.asarray(visualize.render_caption(image, words, points, scale=4))
  assert out.shape[1] == plain.shape[1] == 80
  title_h = out.shape[0] - plain.shape[0]
  assert title_h > 0 and np.any(out[:title_h] == 0)  # black title text on white
  np.testing.assert_array_equal(out[title_h:], plain)
  for i, (x, y) in [(0, (0.5, 0.5)), (3, (0.1, 0.9))]:
    cx, cy = round(x * 79), round(y * 39)
    assert _colour_near(plain, cx - 1, cx + 2, cy - 1, cy + 2, visualize.word_colour(i))
  assert visualize.word_colour(12) == visualize.word_colour(0)
  with pytest.raises(ValueError):
    visualize.render_caption(image, words, points[:3])


def test_words_from_tokens_merges_pieces(sp_model):
  text = "a red bus parked under the yellow sun"
  ids = sp_model.encode(text)
  pieces = [sp_model.id_to_piece(i) for i in ids]
  assert len(ids) > len(text.split())  # the tiny vocabulary splits words into several pieces
  starts = [t for t, p in enumerate(pieces) if p.startswith("\u2581")]
  assert len(starts) == len(text.split())

  tokens = [0] + ids + [1, 7, 8, 0, 0]  # padding is skipped, everything after EOS is dropped
  points = np.arange(len(tokens) * 2 * 2, dtype=np.float32).reshape(len(tokens), 2, 2)
  words, word_points = visualize.words_from_tokens(sp_model, np.asarray(tokens), points)
  assert words == text.split()
  np.testing.assert_array_equal(word_points, points[[t + 1 for t in starts]])

  # A plain piece table gives the same words; no points -> None.
  table = [sp_model.id_to_piece(i) for i in range(sp_model.get_piece_size())]
  assert visualize.words_from_tokens(table, tokens) == (words, None)
  # Ids beyond the model (T5's extra ids) become words of their own.
  extra = sp_model.get_piece_size() + 3
  words, word_points = visualize.words_from_tokens(sp_model, [ids[0], extra, *ids[1:3], 1],
                                                   points[:5])
  assert words[:2] == ["a", f"<{extra}>"]
  assert "".join(words[2:]) == sp_model.decode(ids[1:3]).replace(" ", "")
  np.testing.assert_array_equal(word_points[:3], points[:3])


def test_words_from_tokens_empty(sp_model):
  words, word_points = visualize.words_from_tokens(sp_model, [1, 5, 6], np.zeros((3, 2, 2)))
  assert words == [] and word_points.shape == (0, 2, 2)
