"""Localized Narratives data path: JSON lines -> records (ln.py), the builder CLI (build.py), token
alignment and the seqio task / batches (preprocess.py, tasks.py).

Everything is hermetic: a tiny SentencePiece model trained here, tiny JPEGs made with PIL.
"""
import io
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from pixel_llm.data import build, ln

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A hand-written narrative and its known answers. Utterance 2 has no trace point in its window;
# "(a" and ")." are not spoken; "giraffes" is split into sub-word pieces by the tiny vocabulary
# (the training text only has "giraffe"), "(" and ")" are unknown characters.
CAPTION = "In this image there are two giraffes, (a zebra). The sky is blue."
LABELS = "0000000 11111 2222222222222 333333333 -- 44444-- 5555555 66666666"
UTTERANCES = [("In this", 0, 1), ("image", 1, 2), ("there are two", 2, 3), ("giraffes,", 3, 4),
              ("zebra", 4, 5), ("The sky", 5, 6), ("is blue.", 6, 7)]
SPANS = [(0, 7), (8, 13), (14, 27), (28, 37), (41, 46), (49, 56), (57, 65)]
TRACE = [[(0.1, 0.2, 0.5), (0.3, 0.4, 0.7), (0.5, 0.5, 1.5)],
         [(0.6, 0.1, 3.2), (0.9, 0.3, 3.8), (1.2, -0.1, 4.5), (0.2, 0.8, 5.5), (0.4, 0.9, 6.5)]]
BOXES = [(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.5, 0.5), None, (0.6, 0.1, 0.9, 0.3),
         (1.0, 0.0, 1.0, 0.0), (0.2, 0.8, 0.2, 0.8), (0.4, 0.9, 0.4, 0.9)]

# Non-ASCII text: offsets are characters, SentencePiece's are bytes.
CAFE = "A café near the river."
CAFE_LABELS = "000000 1111 2222222222"
CAFE_UTTERANCES = [("A café", 0, 1), ("near", 1, 2), ("the river.", 2, 3)]

WORDS = ("in this image there are two giraffe a zebra the sky is blue we can see trees on left "
         "side person holding umbrella standing near river cows grass building describe detail")


def narrative(image_id, caption=CAPTION, utterances=UTTERANCES, traces=TRACE, **changes):
  raw = {"dataset_id": "mscoco_train2017", "image_id": image_id, "annotator_id": 7,
         "caption": caption,
         "timed_caption": [{"utterance": u, "start_time": s, "end_time": e}
                           for u, s, e in utterances],
         "traces": [[{"x": x, "y": y, "t": t} for x, y, t in seg] for seg in traces],
         "voice_recording": f"coco_train/coco_train_{image_id}_7.ogg"}
  raw.update(changes)
  return raw


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  rng = random.Random(0)
  words = WORDS.split()
  lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))).capitalize()
           + rng.choice([".", ",", "!"]) for _ in range(300)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=100, hard_vocab_limit=False,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2)
  path = tmp_path_factory.mktemp("spm") / "spiece.model"
  path.write_bytes(model.getvalue())
  return str(path)


def expected_tokens(sp, caption, labels, boxes):
  """(ids, utterance label per token, weight, box) from the hand-written character labels: a
  token belongs to the label of its first non-space character."""
  out = []
  data = caption.encode()
  for p in sp.encode(caption, return_type="proto").pieces:
    c0, c1 = len(data[:p.begin].decode()), len(data[:p.end].decode())
    solid = [labels[c] for c in range(c0, c1) if not caption[c].isspace()]
    label = solid[0] if solid and solid[0].isdigit() else None
    box = boxes[int(label)] if label is not None else None
    out.append((p.id, label, float(box is not None), box or (0.0,) * 4))
  return out


# -- ln.py ----------------------------------------------------------------------------------------

def test_record_spans_boxes_and_issues():
  rec = ln.narrative_to_record(narrative("12"))
  assert list(zip(rec.starts, rec.ends)) == SPANS
  assert [CAPTION[s:e] for s, e in SPANS] == [u for u, _, _ in UTTERANCES]
  assert rec.has_trace == [1, 1, 0, 1, 1, 1, 1]
  for box, want in zip(rec.boxes, BOXES):
    np.testing.assert_allclose(box, want or (0,) * 4, atol=1e-7)
  np.testing.assert_allclose(rec.points[0], (0.2, 0.3))
  np.testing.assert_allclose(rec.points[4], (1.0, 0.0))  # (1.2, -0.1) clipped
  assert rec.image_id == "12" and not rec.issues


def test_locate_quirks_and_kept_issues():
  caption = "A person standing. a dog, and  THE Sky!"
  spans = ln.locate_utterances(caption, ["a", "standing", "A", "dog", "the sky!", "", "cat"])
  # "a" matches the capital "A" (not the "a" inside "standing"); punctuation and case may differ;
  # double spaces inside the caption are fine.
  assert spans == [(0, 1), (9, 17), (19, 20), (21, 24), (31, 39), None, None]
  raw = narrative("5", caption=caption,
                  utterances=[("a", 0, 1), ("", 1, 2), ("cat", 2, 3), ("dog", float("nan"), 4)],
                  traces=[[(float("nan"), 0.5, 0.5), (0.2, 0.3, float("inf")), (0.4, 0.4, 0.6)]])
  rec = ln.narrative_to_record(raw)
  assert rec.issues == {"nan_points": 2, "empty_utterance": 1, "unlocated_utterance": 1,
                        "bad_utterance_time": 1}
  assert rec.has_trace == [1, 0] and rec.boxes[0] == [0.4, 0.4, 0.4, 0.4]
  no_traces = ln.narrative_to_record(narrative("6", traces=[]))
  assert no_traces.issues == {"no_traces": 1} and not any(no_traces.has_trace)
  assert len(no_traces.starts) == len(UTTERANCES)


@pytest.mark.parametrize("line,kind", [
    ('{"image_id": "1", "caption": ', "bad_json"),
    ("[1, 2]", "bad_json"),
    (json.dumps({k: v for k, v in narrative("1").items() if k != "traces"}), "missing_field"),
    (json.dumps(narrative("1", caption=5)), "wrong_type"),
    (json.dumps(narrative("1", timed_caption=[{"utterance": "x", "start_time": "0",
                                               "end_time": 1}])), "wrong_type"),
    (json.dumps(narrative("1", traces=[[{"x": 0.1, "y": None, "t": 0}]])), "wrong_type"),
    (json.dumps(narrative("1", caption="  ")), "empty_caption"),
])
def test_record_errors(line, kind):
  with pytest.raises(ln.RecordError) as e:
    ln.narrative_to_record(ln.parse_line(line))
  assert e.value.kind == kind


# -- build.py -------------------------------------------------------------------------------------

def write_jpeg(path, width, height, seed=0):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, "JPEG")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Images: 1 and 4 -> 00000000000{1,4}.jpg (80x40), 2 -> 2.jpg (30x60), 3 -> a truncated JPEG."""
  root = tmp_path_factory.mktemp("ln")
  images = root / "images"
  images.mkdir()
  write_jpeg(images / "000000000001.jpg", 80, 40, 1)
  write_jpeg(images / "2.jpg", 30, 60, 2)
  write_jpeg(images / "000000000004.jpg", 80, 40, 4)
  write_jpeg(images / "000000000003.jpg", 64, 64, 3)
  data = (images / "000000000003.jpg").read_bytes()
  (images / "000000000003.jpg").write_bytes(data[: len(data) // 2])
  return root


BAD_ROWS = [  # (line, problem kind, kept)
    ('{"image_id": "1", "caption": ', "bad_json", False),
    (json.dumps(narrative("999")), "missing_image", False),
    (json.dumps(narrative("3")), "bad_image", False),
    (json.dumps(narrative("1", caption=["not", "a", "string"])), "wrong_type", False),
    (json.dumps({k: v for k, v in narrative("1").items() if k != "timed_caption"}),
     "missing_field", False),
    (json.dumps(narrative("1", traces=[])), "no_traces", True),
    (json.dumps(narrative("2", traces=[[(0.1, float("nan"), 0.5)] + TRACE[0][1:]] + TRACE[1:])),
     "nan_points", True),
]


def test_build_reports_and_counts_bad_input(world, tmp_path, capsys):
  import tensorflow as tf
  from pixel_llm.data import preprocess
  ann = tmp_path / "ann.jsonl"
  lines = [json.dumps(narrative("1"))] + [r[0] for r in BAD_ROWS] + ["", json.dumps(narrative(2))]
  ann.write_text("\n".join(lines) + "\n")
  out = tmp_path / "out"
  rc = build.main(["ln", "--annotations", str(ann), "--images", str(world / "images"),
                   "--out", str(out), "--num_shards", "2", "--log_every_s", "0"])
  captured = capsys.readouterr()
  assert rc == 0
  for number, (_, kind, kept) in enumerate(BAD_ROWS, start=2):
    assert f"{ann}:{number}: {kind}: " in captured.err, kind
    assert f"(record {'kept' if kept else 'skipped'})" in captured.err
    assert f"  {kind}: 1 record(s)" in captured.out
  assert "4 records written to 2 shard(s)" in captured.out
  assert "records/s" in captured.err  # progress
  files = sorted(os.listdir(out))
  assert files == ["ln_train.tfrecord-00000-of-00002", "ln_train.tfrecord-00001-of-00002"]
  examples = [tf.io.parse_single_example(r, preprocess.FEATURE_DESCRIPTION)
              for f in files for r in tf.data.TFRecordDataset(str(out / f))]
  first = examples[0]  # round robin: record 0 is the first of shard 0
  assert first["image/id"].numpy() == b"1" and first["caption"].numpy().decode() == CAPTION
  assert (first["image/width"].numpy(), first["image/height"].numpy()) == (80, 40)
  assert first["image/encoded"].numpy() == (world / "images" / "000000000001.jpg").read_bytes()
  np.testing.assert_array_equal(tf.sparse.to_dense(first["utterance/start"]), [s for s, _ in SPANS])
  np.testing.assert_array_equal(tf.sparse.to_dense(first["utterance/has_trace"]),
                                [1, 1, 0, 1, 1, 1, 1])
  np.testing.assert_allclose(tf.sparse.to_dense(first["utterance/box"]).numpy()[12:16], BOXES[3])
  assert sorted(e["image/id"].numpy() for e in examples) == [b"1", b"1", b"2", b"2"]


def test_build_strict_stops_at_first_problem(world, tmp_path, capsys):
  for i, (line, kind, _) in enumerate(BAD_ROWS):
    ann = tmp_path / f"bad{i}.jsonl"
    ann.write_text(json.dumps(narrative("1")) + "\n" + line + "\n")
    out = tmp_path / f"out{i}"
    rc = build.main(["ln", "--annotations", str(ann), "--images", str(world / "images"),
                     "--out", str(out), "--strict"])
    assert rc == 1, kind
    assert f"{ann}:2: {kind}: " in capsys.readouterr().err
    assert not out.exists() or not os.listdir(out)  # no partial shards left behind
  stale = tmp_path / "stale"
  stale.mkdir()
  (stale / "ln_train.tfrecord-00000-of-00003").write_bytes(b"")
  assert build.main(["ln", "--annotations", str(ann), "--images", str(world / "images"),
                     "--out", str(stale)]) == 1
  assert "already holds other ln_train shards" in capsys.readouterr().err


def test_build_cli_strict_exit_status(world, tmp_path):
  ann = tmp_path / "ann.jsonl"
  ann.write_text('{"image_id": "1", "caption": \n')
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
      [sys.executable, "-m", "pixel_llm.data.build", "ln", "--annotations", str(ann),
       "--images", str(world / "images"), "--out", str(tmp_path / "out"), "--strict"],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert proc.returncode == 1
  assert f"{ann}:1: bad_json: malformed JSON" in proc.stderr


# -- alignment (preprocess.py) --------------------------------------------------------------------

CAFE_TRACE = [[(0.1, 0.1, 0.5), (0.2, 0.2, 1.5), (0.3, 0.3, 2.5)]]
CAFE_BOXES = [(0.1, 0.1, 0.1, 0.1), (0.2, 0.2, 0.2, 0.2), (0.3, 0.3, 0.3, 0.3)]
NARRATIVES = {  # image id -> (narrative, character labels, utterance boxes (None: no trace))
    "1": (narrative("1"), LABELS, BOXES),
    "2": (narrative("2", caption=CAFE, utterances=CAFE_UTTERANCES, traces=CAFE_TRACE),
          CAFE_LABELS, CAFE_BOXES),
    "4": (narrative("4", caption=CAPTION.replace("blue", "grey"), traces=[],
                    utterances=[(u.replace("blue", "grey"), s, e) for u, s, e in UTTERANCES]),
          LABELS, [None] * 7),
}


@pytest.fixture(scope="module")
def vocab(spm_path):
  import seqio
  return seqio.SentencePieceVocabulary(spm_path)


def test_alignment_known_answers(spm_path, vocab):
  import tensorflow as tf
  from pixel_llm.data import preprocess
  sp = spm.SentencePieceProcessor(model_file=spm_path)
  for raw, labels, boxes in NARRATIVES.values():
    rec = ln.narrative_to_record(raw)
    out = preprocess.align_tokens(
        tf.constant(rec.caption), tf.constant(rec.starts, tf.int64),
        tf.constant(rec.ends, tf.int64), tf.constant(rec.has_trace) > 0,
        tf.reshape(tf.constant(rec.boxes, tf.float32), [-1, 4]), vocab.tf_tokenizer)
    want = expected_tokens(sp, rec.caption, labels, boxes)
    assert out["tokens"].numpy().tolist() == [w[0] for w in want] == vocab.encode(rec.caption)
    np.testing.assert_array_equal(out["weights"], [w[2] for w in want])
    np.testing.assert_allclose(out["boxes"], [w[3] for w in want], atol=1e-6)

  # The hand-written answers do exercise the edge cases.
  pieces = sp.encode(CAPTION, return_type="proto").pieces
  labels = {p.surface: lab for p, (_, lab, _, _) in
            zip(pieces, expected_tokens(sp, CAPTION, LABELS, BOXES))}
  giraffes = [p.surface for p in pieces if 27 <= p.begin and p.end <= 36]
  assert len(giraffes) >= 2 and {labels[g] for g in giraffes} == {"3"}  # sub-word pieces
  assert labels[","] == "3"  # punctuation inside the utterance "giraffes,"
  assert labels["("] is None and labels[" "] is None  # outside every span; a lone "▁"
  assert labels[" two"] == "2"  # located, but utterance 2 has no trace: weight 0 (checked above)
  assert any(p.id == 2 for p in pieces)  # an unknown character


# -- seqio task and batches (tasks.py) ------------------------------------------------------------

@pytest.fixture(scope="module")
def records(world, tmp_path_factory):
  out = tmp_path_factory.mktemp("records")
  ann = out / "ann.jsonl"
  ann.write_text("".join(json.dumps(n) + "\n" for n, _, _ in NARRATIVES.values()))
  assert build.main(["ln", "--annotations", str(ann), "--images", str(world / "images"),
                     "--out", str(out)]) == 0
  return str(out / "ln_{split}.tfrecord-*")


def _by_id(batches):
  out = {}
  for b in batches:
    for i, image_id in enumerate(b["image_id"]):
      out.setdefault(image_id.decode(), []).append({k: v[i] for k, v in b.items()})
  return out


def test_batches_shapes_alignment_and_prompt(records, spm_path, vocab):
  from pixel_llm.data import tasks
  tasks.register_ln_task("test_ln_tiny", records, spm_path, image_size=32)
  batches = list(tasks.get_dataset("test_ln_tiny", split="train", batch_size=2, shuffle=False,
                                   max_target_len=40, max_context_len=6, num_epochs=1,
                                   drop_remainder=False))
  b = batches[0]
  shapes = {k: (v.shape, v.dtype.name) for k, v in b.items()}
  assert shapes == {
      "image": ((2, 32, 32, 3), "float32"), "image_mask": ((2, 32, 32), "bool"),
      "prompt_boxes": ((2, 1, 4), "float32"), "prompt_text": ((2, 1, 6), "int32"),
      "decoder_input_tokens": ((2, 1, 40), "int32"), "decoder_target_tokens": ((2, 1, 40), "int32"),
      "point_targets": ((2, 1, 40, 2, 2), "float32"), "point_weights": ((2, 1, 40), "float32"),
      "image_id": ((2,), "object"), "caption": ((2, 1), "object")}
  sp = spm.SentencePieceProcessor(model_file=spm_path)
  prompt = vocab.encode(tasks.DEFAULT_PROMPT)
  examples = _by_id(batches)
  assert sorted(examples) == ["1", "2", "4"]
  # Image 1 is 80x40: content 32x16 in the padded square; image 2 is 30x60: 16x32.
  extents = {"1": (1.0, 0.5), "2": (0.5, 1.0), "4": (1.0, 0.5)}
  for image_id, (raw, labels, boxes) in NARRATIVES.items():
    (ex,) = examples[image_id]
    assert ex["caption"][0].decode() == raw["caption"]
    want = expected_tokens(sp, raw["caption"], labels, boxes)
    n = len(want)
    targets = ex["decoder_target_tokens"][0]
    np.testing.assert_array_equal(targets[:n + 1], [w[0] for w in want] + [1])
    assert not targets[n + 1:].any()
    np.testing.assert_array_equal(ex["decoder_input_tokens"][0], np.r_[0, targets[:-1]])
    # point_targets[t] is the location of decoder_input_tokens[t] = target t - 1.
    ew, eh = extents[image_id]
    scaled = np.array([w[3] for w in want]) * [ew, eh, ew, eh]
    np.testing.assert_allclose(ex["point_targets"][0, 1:n + 1].reshape(n, 4), scaled, atol=1e-6)
    np.testing.assert_array_equal(ex["point_weights"][0], np.r_[0, [w[2] for w in want],
                                                                 np.zeros(40 - n - 1)])
    np.testing.assert_array_equal(ex["prompt_text"][0], prompt[:5] + [1])
    mask = ex["image_mask"]
    assert mask[: int(32 * eh), : int(32 * ew)].all() and mask.sum() == 32 * 32 * ew * eh
    assert not ex["image"][~mask].any() and ex["image"].max() <= 1.0 and ex["image"].max() > 0.2
    np.testing.assert_array_equal(ex["prompt_boxes"], [[0, 0, 1, 1]])
  assert not examples["4"][0]["point_weights"].any()  # no traces: caption only


def test_truncation_keeps_alignment_and_determinism(records, spm_path):
  from pixel_llm.data import tasks

  def run(max_target_len, seed, split_sentences=False):
    it = tasks.get_dataset(records, vocab_path=spm_path, image_size=32, split="train",
                           batch_size=2, shuffle=True, seed=seed, num_epochs=2,
                           max_target_len=max_target_len, split_sentences=split_sentences)
    return list(it)

  long, short, again = run(40, seed=3), run(6, seed=3), run(6, seed=3)
  assert len(long) == len(short) == 3
  for a, b in zip(short, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  for lb, sb in zip(long, short):
    np.testing.assert_array_equal(lb["image_id"], sb["image_id"])
    np.testing.assert_array_equal(sb["decoder_target_tokens"][..., :5],
                                  lb["decoder_target_tokens"][..., :5])
    assert (sb["decoder_target_tokens"][..., 5] == 1).all()  # EOS after the kept tokens
    np.testing.assert_array_equal(sb["point_targets"], lb["point_targets"][:, :, :6])
    np.testing.assert_array_equal(sb["point_weights"], lb["point_weights"][:, :, :6])
    assert sb["point_weights"].any()


def test_split_sentences(records, spm_path, vocab):
  from pixel_llm.data import tasks
  sp = spm.SentencePieceProcessor(model_file=spm_path)
  prompts = ("Describe the image.", "What is in this image?", "Describe the image in detail.")
  it = tasks.get_dataset(records, vocab_path=spm_path, image_size=32, split="train",
                         batch_size=1, shuffle=False, num_epochs=1, max_target_len=24,
                         max_context_len=16, split_sentences=True, prompts=prompts)
  examples = _by_id(it)
  encoded = {tuple(vocab.encode(p)[:15] + [1]) for p in prompts}  # cut to 16, EOS kept
  chosen = [tuple(t for t in e["prompt_text"][0] if t) for es in examples.values() for e in es]
  assert set(chosen) <= encoded and len(set(chosen)) > 1  # a hash of image id and sentence
  assert [e["caption"][0].decode() for e in examples["1"]] == [
      "In this image there are two giraffes, (a zebra).", "The sky is blue."]
  assert len(examples["2"]) == 1 and len(examples["4"]) == 2
  ex = examples["1"][1]
  sentence = "The sky is blue."
  ids = vocab.encode(sentence)
  assert ex["decoder_target_tokens"][0, :len(ids) + 1].tolist() == ids + [1]
  # Labels of the second sentence: its characters start at offset 49 of the narrative.
  want = expected_tokens(sp, sentence, LABELS[49:], BOXES)
  n = len(want)
  np.testing.assert_array_equal(ex["point_weights"][0, 1:n + 1], [w[2] for w in want])
  np.testing.assert_allclose(ex["point_targets"][0, 1:n + 1].reshape(n, 4),
                             np.array([w[3] for w in want]) * [1, 0.5, 1, 0.5], atol=1e-6)


@pytest.mark.parametrize("dataset_id,image_id,file_name", [
    ("open_images_validation", "0a1b2c3d4e5f6789", "0a1b2c3d4e5f6789.jpg"),  # hex ids
    ("flickr30k_val", "1000092795", "1000092795.jpg"),  # digits, no zero padding on disk
    ("ADE20k", "ADE_val_00000001", "ADE_val_00000001.jpg"),
])
def test_build_reads_the_other_ln_image_sources(tmp_path, dataset_id, image_id, file_name, capsys):
  """LN for Open Images, Flickr30k and ADE20k: the same JSON lines, their own image file names."""
  import tensorflow as tf
  from pixel_llm.data import preprocess
  images = tmp_path / "images"
  images.mkdir()
  write_jpeg(images / file_name, 48, 32, 5)
  ann = tmp_path / "ann.jsonl"
  ann.write_text(json.dumps(narrative(image_id, dataset_id=dataset_id)) + "\n")
  rc = build.main(["ln", "--annotations", str(ann), "--images", str(images),
                   "--out", str(tmp_path / "out"), "--strict"])
  assert rc == 0, capsys.readouterr().err
  (record,) = list(tf.data.TFRecordDataset(str(tmp_path / "out" / "ln_train.tfrecord-00000-of-00001")))
  ex = tf.io.parse_single_example(record, preprocess.FEATURE_DESCRIPTION)
  assert ex["image/id"].numpy() == image_id.encode()
  assert (int(ex["image/width"]), int(ex["image/height"])) == (48, 32)
  assert ex["image/encoded"].numpy() == (images / file_name).read_bytes()
