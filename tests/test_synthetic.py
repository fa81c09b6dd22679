"""Tests of the synthetic Localized-Narratives world (pixel_llm.data.synthetic) and its vocabulary."""
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pixel_llm.data import synthetic
from pixel_llm.data import vocab as vocab_lib

SEED = 7
NUM = 200
KEYS = {"dataset_id": str, "image_id": str, "annotator_id": int, "caption": str,
        "timed_caption": list, "traces": list, "voice_recording": str}


def _files(root):
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      path = os.path.join(d, n)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """200 train images (timed: the speed check) + 20 val images."""
  root = str(tmp_path_factory.mktemp("world"))
  start = time.perf_counter()
  records = synthetic.generate(root, NUM, SEED)
  elapsed = time.perf_counter() - start
  print(f"\ngenerated {NUM} images in {elapsed:.2f} s ({NUM / elapsed * 60:.0f} images/min)")
  val = synthetic.generate(root, 20, SEED, split="val")
  return root, records, val, elapsed


def test_speed(world):
  assert world[3] < 30.0


def test_layout_and_ids(world):
  root, records, val, _ = world
  assert os.path.exists(os.path.join(root, "spiece.model"))
  assert os.path.exists(os.path.join(root, "spiece.vocab"))
  for split, recs, first in (("train", records, synthetic.TRAIN_START_ID),
                             ("val", val, synthetic.VAL_START_ID)):
    with open(synthetic.annotation_path(root, split)) as f:
      assert [json.loads(line) for line in f] == recs
    assert [int(r["image_id"]) for r in recs] == list(range(first, first + len(recs)))
    for r in recs[:5]:
      with Image.open(os.path.join(root, "images", f"{split}2017",
                                   f"{int(r['image_id']):012d}.jpg")) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (128, 128)
  assert not {r["image_id"] for r in records} & {r["image_id"] for r in val}


def test_schema(world):
  _, records, val, _ = world
  n_outside = 0
  for r in records + val:
    assert list(r) == list(KEYS)
    for k, typ in KEYS.items():
      assert type(r[k]) is typ, k
    split = "val" if int(r["image_id"]) >= synthetic.VAL_START_ID else "train"
    assert r["dataset_id"] == f"mscoco_{split}2017"
    assert r["image_id"] == str(int(r["image_id"]))  # No zero padding.
    assert r["voice_recording"] == (
        f"coco_{split}/coco_{split}_{r['image_id']}_{r['annotator_id']}.ogg")
    words, prev_end = [], 0.0
    for u in r["timed_caption"]:
      assert set(u) == {"utterance", "start_time", "end_time"}
      assert type(u["start_time"]) is float and type(u["end_time"]) is float
      assert prev_end <= u["start_time"] < u["end_time"]
      assert u["end_time"] - u["start_time"] < 3.0
      prev_end = u["end_time"]
      assert 1 <= len(u["utterance"].split()) <= 4
      words += u["utterance"].split()
    assert words == r["caption"].split()
    assert " ".join(u["utterance"] for u in r["timed_caption"]) == r["caption"]
    assert r["caption"].endswith(".")
    assert 1 <= len(r["traces"]) <= 3
    last_t = -1.0
    for seg in r["traces"]:
      assert seg
      for p in seg:
        assert set(p) == {"x", "y", "t"} and all(type(v) is float for v in p.values())
        assert p["t"] > last_t  # Increasing within and across segments.
        last_t = p["t"]
        assert -0.1 < p["x"] < 1.1 and -0.1 < p["y"] < 1.1
        n_outside += not (0 <= p["x"] <= 1 and 0 <= p["y"] <= 1)
      dt = np.diff([p["t"] for p in seg])
      if dt.size:
        assert 0.04 < np.median(dt) < 0.06  # ~20 Hz.
    # The trace covers the narrative.
    assert r["traces"][0][0]["t"] <= r["timed_caption"][0]["start_time"]
    assert r["traces"][-1][-1]["t"] >= r["timed_caption"][-1]["end_time"]
  assert n_outside > 0
  assert len({r["caption"] for r in records}) > 0.9 * len(records)
  assert {len(r["traces"]) for r in records} == {1, 2, 3}


def test_ground_truth_and_trace_dwell(world):
  """While an utterance about object k is spoken, the mouse is on object k."""
  _, records, _, _ = world
  hits = total = 0
  for r in records:
    ex = synthetic.make_example(SEED, int(r["image_id"]))
    assert ex.record == r
    assert len(ex.utterance_objects) == len(r["timed_caption"])
    assert 1 <= len(ex.objects) <= 4
    for o in ex.objects:
      x0, y0, x1, y1 = o.box
      assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
      assert f"a {o.size} {o.color} {o.shape}" in r["caption"]
    refs = set(ex.utterance_objects)
    assert refs <= {synthetic.NO_OBJECT, synthetic.BACKGROUND} | set(range(len(ex.objects)))
    assert set(range(len(ex.objects))) <= refs
    pts = np.array([(p["x"], p["y"], p["t"]) for seg in r["traces"] for p in seg])
    for u, k in zip(r["timed_caption"], ex.utterance_objects):
      if k < 0:
        continue
      total += 1
      inside = pts[(pts[:, 2] >= u["start_time"]) & (pts[:, 2] <= u["end_time"])]
      if len(inside):
        x, y = np.median(inside[:, 0]), np.median(inside[:, 1])
        x0, y0, x1, y1 = ex.objects[k].box
        hits += x0 <= x <= x1 and y0 <= y <= y1
  assert total > len(records)
  assert hits >= 0.9 * total


def _narration_order(ex) -> list[int]:
  """Objects in the order the narrative first names them (a relation names the previous one,
  which was named before)."""
  order = []
  for k in ex.utterance_objects:
    if k >= 0 and k not in order:
      order.append(k)
  return order


@pytest.mark.parametrize("narration", synthetic.NARRATIONS)
def test_captions_follow_the_scene(narration):
  """Sentence n describes the n-th narrated object with the 3x3 cell of its centre or a true
  relation to the one before; salient narratives name the objects in drawing order, shuffled
  ones in a random order of the same scene."""
  relations = {"to the right of": (1, 0), "to the left of": (-1, 0), "above": (0, -1),
               "below": (0, 1)}
  seen, reordered = set(), 0
  for image_id in range(1, 61):
    ex = synthetic.make_example(0, image_id, narration=narration)
    order = _narration_order(ex)
    assert sorted(order) == list(range(len(ex.objects)))
    if narration == "salient":
      assert order == list(range(len(ex.objects)))
    else:
      salient = synthetic.make_example(0, image_id)
      assert ex.objects == salient.objects and ex.jpeg == salient.jpeg
      reordered += order != sorted(order)
    sentences = ex.record["caption"].lower().rstrip(".").split(". ")
    assert len(sentences) in (len(ex.objects), len(ex.objects) + 1)
    if len(sentences) > len(ex.objects):
      assert "background" in sentences[-1] and f"{ex.stripes} stripes" in sentences[-1]
    for n, sentence in enumerate(sentences[:len(ex.objects)]):
      o = ex.objects[order[n]]
      assert f"a {o.size} {o.color} {o.shape}" in sentence
      col, row = (min(int(v * 3), 2) for v in o.center)
      if synthetic.POSITIONS[row][col] in sentence:
        seen.add("position")
        continue
      rel = [r for r in relations if r in sentence]
      assert n > 0 and len(rel) == 1, sentence
      seen.add(rel[0])
      d = np.subtract(o.center, ex.objects[order[n - 1]].center)
      axis = int(np.abs(d).argmax())
      assert np.sign(d[axis]) == sum(relations[rel[0]]) and relations[rel[0]][axis] != 0
      assert abs(d[axis]) >= 0.2
  assert seen == {"position", *relations}
  if narration == "shuffled":
    assert reordered >= 15  # of the 60 images, ~2/3 have several shapes
  with pytest.raises(ValueError, match="narration must be one of"):
    synthetic.make_example(0, 1, narration="random")


def test_determinism_and_independence(world, tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  synthetic.generate(a, 20, SEED)
  synthetic.generate(b, 20, SEED)
  files_a, files_b = _files(a), _files(b)
  assert len(files_a) == 20 + 3 and files_a == files_b
  # Image i does not depend on how many images are generated.
  big = _files(world[0])
  for name, data in files_a.items():
    if name.endswith(".jpg"):
      assert big[name] == data
  ann = "annotations/coco_train_localized_narratives-00000-of-00001.jsonl"
  assert big[ann].startswith(files_a[ann])
  # Another seed gives another world.
  assert synthetic.make_example(SEED + 1, 1).jpeg != synthetic.make_example(SEED, 1).jpeg
  small = synthetic.make_example(SEED, 3, image_size=96)
  with Image.open(io.BytesIO(small.jpeg)) as im:
    assert im.size == (96, 96)
  assert small.record == synthetic.make_example(SEED, 3).record


def test_vocab_roundtrip(world):
  root, records, val, _ = world
  vocab = vocab_lib.load(os.path.join(root, "spiece.model"))
  assert vocab.pad_id == 0 and vocab.eos_id == 1 and vocab.unk_id == 2
  assert 50 < vocab.vocab_size <= synthetic.VOCAB_SIZE
  for text in [records[0]["caption"], val[0]["caption"], *synthetic.TASK_PROMPTS]:
    ids = vocab.encode(text)
    assert vocab.unk_id not in ids and 1 not in ids
    assert vocab.decode(ids) == text
  # Whole words are pieces: about one id per word (plus the full stops).
  assert len(vocab.encode(records[0]["caption"])) <= 1.3 * len(records[0]["caption"].split())


def test_train_spm_is_deterministic(tmp_path):
  texts = [synthetic.make_example(1, i).record["caption"] for i in range(1, 31)]
  p1 = vocab_lib.train_spm(texts, str(tmp_path / "x"), vocab_size=128)
  p2 = vocab_lib.train_spm(texts, str(tmp_path / "y"), vocab_size=128)
  for ext in (".model", ".vocab"):
    with open(p1.replace(".model", ext), "rb") as f1, open(p2.replace(".model", ext), "rb") as f2:
      assert f1.read() == f2.read()


def test_init_checkpoint_vocabulary_must_match(tmp_path):
  """vocab.check_matches: a trainer workdir's spiece.model is found from its checkpoint folder;
  the same pieces pass, other pieces (as another narration of the world trains) are an error."""
  texts = [synthetic.make_example(1, i).record["caption"] for i in range(1, 31)]
  shuffled = [synthetic.make_example(1, i, narration="shuffled").record["caption"]
              for i in range(1, 31)]
  for name in ("w1", "w2"):
    (tmp_path / name).mkdir()
  ours = vocab_lib.train_spm(texts, str(tmp_path / "ours"), vocab_size=96)
  same = vocab_lib.train_spm(texts, str(tmp_path / "w1" / "spiece"), vocab_size=96)
  other = vocab_lib.train_spm(shuffled, str(tmp_path / "w2" / "spiece"), vocab_size=96)
  assert vocab_lib.pieces(other) != vocab_lib.pieces(ours)
  state = tmp_path / "w1" / "checkpoints" / "500" / "state"
  state.mkdir(parents=True)
  assert vocab_lib.check_matches(ours, str(state)) == same
  assert vocab_lib.check_matches(ours, str(tmp_path / "w1")) == same
  (tmp_path / "w2" / "checkpoints" / "500").mkdir(parents=True)
  with pytest.raises(ValueError, match="ids differ"):
    vocab_lib.check_matches(ours, str(tmp_path / "w2" / "checkpoints" / "500"))
  (tmp_path / "converted").mkdir()
  assert vocab_lib.check_matches(ours, str(tmp_path / "converted")) is None



def test_given_vocabulary_replaces_the_synthetic_worlds_own(tmp_path):
  """config.data.vocab with the synthetic source: the run reads that vocabulary (going on from a
  checkpoint trained on a smaller world, whose vocabulary differs in a few pieces); missing: an
  error naming it."""
  from configs import ln
  from pixel_llm.data import pipeline
  c = ln.get_config("toy")
  c.data.update(root=str(tmp_path / "world"), num_train_images=4, num_val_images=2, image_size=64)
  patterns, own = pipeline._sources(c)
  assert own == str(tmp_path / "world" / "spiece.model") and os.path.exists(own)
  texts = [synthetic.make_example(1, i).record["caption"] for i in range(1, 31)]
  given = vocab_lib.train_spm(texts, str(tmp_path / "given"), vocab_size=96)
  c.data.vocab = given
  assert pipeline._sources(c) == (patterns, given)
  c.data.vocab = str(tmp_path / "missing.model")
  with pytest.raises(FileNotFoundError, match="missing.model"):
    pipeline._sources(c)

def test_cli(tmp_path):
  out = str(tmp_path / "cli")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  subprocess.run([sys.executable, "-m", "pixel_llm.data.synthetic", "--out", out,
                  "--num_images", "6", "--seed", "3", "--split", "both", "--val_images", "2"],
                 check=True, env=env, capture_output=True, timeout=120)
  assert sorted(os.listdir(os.path.join(out, "images", "train2017"))) == [
      f"{i:012d}.jpg" for i in range(1, 7)]
  assert sorted(os.listdir(os.path.join(out, "images", "val2017"))) == [
      f"{i:012d}.jpg" for i in (1_000_001, 1_000_002)]
  ref = str(tmp_path / "api")
  synthetic.generate(ref, 6, 3)
  assert _files(ref) == {k: v for k, v in _files(out).items() if "val" not in k}
