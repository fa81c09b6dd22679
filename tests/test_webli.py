"""Image-text pairs: the JSON-lines and TFRecord readers (webli.py), the builder's `webli`
subcommand (build_regions.py via build.py; output in COCO captions' schema) and the synthetic
world's pairs (synthetic_regions.py).
"""
import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pixel_llm.data import build, coco_captions, synthetic, synthetic_formats, synthetic_regions
from pixel_llm.data import webli
from pixel_llm.data.coco_captions import CaptionRecord, Problem

SEED = 4


def write_image(path, width, height, seed=0):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """ROOT/a/1.jpg (80x40), ROOT/b/2.png (30x60), ROOT/a/3.jpg (truncated)."""
  root = tmp_path_factory.mktemp("pairs")
  (root / "a").mkdir()
  (root / "b").mkdir()
  write_image(root / "a" / "1.jpg", 80, 40, 1)
  write_image(root / "b" / "2.png", 30, 60, 2)
  write_image(root / "a" / "3.jpg", 64, 64, 3)
  data = (root / "a" / "3.jpg").read_bytes()
  (root / "a" / "3.jpg").write_bytes(data[:len(data) // 2])
  return root


GOOD = [{"image": "a/1.jpg", "caption": " A photo of a dog. "},
        {"image": "b/2.png", "text": "Café au lait", "id": 7},
        {"image": "a/1.jpg", "captions": ["first", "", "second"], "id": "dog-2"}]
BAD = [  # (line, problem kind)
    ('{"image": "a/1.jpg", "caption": ', "bad_json"), ('["a/1.jpg", "x"]', "bad_json"),
    ({"caption": "x"}, "missing_field"), ({"image": 5, "caption": "x"}, "wrong_type"),
    ({"image": "a/1.jpg"}, "missing_field"), ({"image": "a/1.jpg", "caption": 3}, "wrong_type"),
    ({"image": "a/1.jpg", "captions": ["x", 2]}, "wrong_type"),
    ({"image": "a/1.jpg", "captions": "x"}, "wrong_type"),
    ({"image": "a/1.jpg", "id": 1.5, "caption": "x"}, "wrong_type"),
    ({"image": "a/1.jpg", "caption": " \n"}, "empty_caption"),
    ({"image": "a/1.jpg", "captions": ["", " "]}, "no_captions"),
    ({"image": "a/1.jpg", "captions": []}, "no_captions"),
    ({"image": "/etc/passwd", "caption": "x"}, "bad_path"),
    ({"image": "a/../../x.jpg", "caption": "x"}, "bad_path"),
    ({"image": "a/404.jpg", "caption": "x"}, "missing_image"),
    ({"image": "a/3.jpg", "caption": "x"}, "bad_image"),
]


def write_jsonl(path, lines):
  path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n\n" for x in lines))
  return str(path)


def test_read_jsonl(tmp_path):
  path = write_jsonl(tmp_path / "pairs.jsonl", GOOD + [x for x, _ in BAD])
  items = list(webli.read_jsonl([path], "train"))
  problems = [(p.where, p.kind, p.kept) for p in items if isinstance(p, Problem)]
  reader_kinds = [(i, k) for i, (_, k) in enumerate(BAD, len(GOOD))
                  if k not in ("missing_image", "bad_image")]
  assert problems == [(f"{path}:5", "empty_caption", True)] + [
      (f"{path}:{2 * i + 1}", k, False) for i, k in reader_kinds]
  recs = [r for r in items if isinstance(r, CaptionRecord)]
  assert [(r.image_id, r.file_names, r.captions, r.caption_ids, r.split) for r in recs[:3]] == [
      ("a/1.jpg", ("a/1.jpg",), ["A photo of a dog."], [0], "train"),
      (7, ("b/2.png",), ["Café au lait"], [1], "train"),
      ("dog-2", ("a/1.jpg",), ["first", "second"], [2, 3], "train")]
  assert [r.file_names for r in recs[3:]] == [("a/404.jpg",), ("a/3.jpg",)]
  with pytest.raises(coco_captions.FileError, match="no such file"):
    list(webli.read_jsonl([str(tmp_path / "none.jsonl")], "train"))


def _parse(out_dir, split="train"):
  import tensorflow as tf
  files = sorted(str(p) for p in out_dir.glob(f"webli_{split}.tfrecord-*"))
  out = []
  for r in tf.data.TFRecordDataset(files):
    ex = tf.io.parse_single_example(r, webli.feature_description())
    out.append({k: (tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v).numpy()
                for k, v in ex.items()})
  return out


def test_build_jsonl_reports_and_counts(tiny, tmp_path, capsys):
  path = write_jsonl(tmp_path / "pairs-0.jsonl", GOOD + [x for x, _ in BAD])
  out = tmp_path / "out"
  assert build.main(["webli", "--jsonl", str(tmp_path / "pairs-*.jsonl"), "--images", str(tiny),
                     "--out", str(out), "--log_every_s", "0"]) == 0
  captured = capsys.readouterr()
  for i, (_, kind) in enumerate(BAD, len(GOOD)):
    assert f"{path}:{2 * i + 1}: {kind}: " in captured.err
  assert f"{path}:5: empty_caption: 1 empty caption(s) dropped (record kept)" in captured.err
  kinds = Counter(k for _, k in BAD) + Counter(["empty_caption"])
  for kind, n in kinds.items():
    assert f"  {kind}: {n} record(s)\n" in captured.out
  assert "3 records written to 1 shard(s)" in captured.out
  e1, e2, e3 = _parse(out)
  assert set(e1) == set(coco_captions.feature_description())
  assert e1["image/id"] == b"a/1.jpg" and (e1["image/width"], e1["image/height"]) == (80, 40)
  assert e1["image/encoded"] == (tiny / "a" / "1.jpg").read_bytes()
  assert e1["captions"].tolist() == [b"A photo of a dog."] and e1["caption/id"].tolist() == [0]
  assert e2["image/id"] == b"7" and e2["captions"][0].decode() == "Café au lait"
  assert (e2["image/width"], e2["image/height"]) == (30, 60) and e2["split"] == b"train"
  assert e3["captions"].tolist() == [b"first", b"second"] and e3["caption/id"].tolist() == [2, 3]


@pytest.mark.parametrize("line,kind", [BAD[0], BAD[4], BAD[5], BAD[9], BAD[12], BAD[14],
                                       BAD[15], (GOOD[2], "empty_caption")])
def test_build_jsonl_strict(tiny, tmp_path, capsys, line, kind):
  path = write_jsonl(tmp_path / "p.jsonl", [GOOD[0], line])
  out = tmp_path / "out"
  assert build.main(["webli", "--jsonl", path, "--images", str(tiny), "--out", str(out),
                     "--strict"]) == 1
  assert f"build stopped: {path}:3: {kind}: " in capsys.readouterr().err
  assert not out.exists() or not os.listdir(out)


def test_build_webli_arguments(tiny, tmp_path, capsys):
  for argv, message in [
      (["--jsonl", str(tmp_path / "*.json"), "--images", str(tiny)], "matches no file"),
      (["--jsonl", write_jsonl(tmp_path / "p.jsonl", GOOD)], "--jsonl needs --images"),
      (["--jsonl", str(tmp_path / "p.jsonl"), "--images", str(tmp_path / "x")],
       "is not a directory"),
      (["--tfrecords", str(tmp_path / "*.tfrecord")], "matches no file")]:
    assert build.main(["webli", *argv, "--out", str(tmp_path / "o")]) == 1
    assert message in capsys.readouterr().err


# -- TFRecord input -------------------------------------------------------------------------------

def _example(**feats):
  import tensorflow as tf
  f = tf.train.Feature
  out = {}
  for k, v in feats.items():
    k = k.replace("__", "/")
    if isinstance(v, list) and v and isinstance(v[0], int):
      out[k] = f(int64_list=tf.train.Int64List(value=v))
    else:
      out[k] = f(bytes_list=tf.train.BytesList(value=v))
  return tf.train.Example(features=tf.train.Features(feature=out)).SerializeToString()


def test_tfrecords(tiny, tmp_path, capsys):
  import tensorflow as tf
  jpeg, png = (tiny / "a" / "1.jpg").read_bytes(), (tiny / "b" / "2.png").read_bytes()
  good = [_example(image__encoded=[jpeg], caption=[b" a dog "]),
          _example(image__encoded=[png], texts=["un café".encode(), b"", b"two"],
                   image__id=[42]),
          _example(image__encoded=[jpeg], captions=[b"x"], image__id=[b"web/9"])]
  bad = [(_example(caption=[b"x"]), "missing_field"),
         (_example(image__encoded=[jpeg]), "missing_field"),
         (_example(image__encoded=[jpeg], caption=[3]), "wrong_type"),
         (_example(image__encoded=[jpeg, jpeg], caption=[b"x"]), "wrong_type"),
         (_example(image__encoded=[jpeg], caption=[b"\xff\xfe"]), "wrong_type"),
         (_example(image__encoded=[jpeg], caption=[b" "]), "empty_caption"),
         (b"\x08\x96\x01 not a proto", "bad_record"),
         (_example(image__encoded=[jpeg[:200]], caption=[b"x"]), "bad_image")]
  shard0, shard1 = str(tmp_path / "in.tfrecord-0"), str(tmp_path / "in.tfrecord-1")
  with tf.io.TFRecordWriter(shard0) as w:
    for r in good + [r for r, _ in bad]:
      w.write(r)
  with tf.io.TFRecordWriter(shard1) as w:
    for r in good[:2]:
      w.write(r)
  data = open(shard1, "rb").read()
  open(shard1, "wb").write(data[:len(data) - 10])  # the second record is cut
  items = list(webli.read_tfrecords([shard0, shard1], "train"))
  problems = [(p.where, p.kind) for p in items if isinstance(p, Problem)]
  assert problems == [(f"{shard0}[1]", "empty_caption")] + [
      (f"{shard0}[{i}]", k) for i, (_, k) in enumerate(bad, 3) if k != "bad_image"] + [
      (f"{shard1}[1]", "corrupt_shard")]
  recs = [r for r in items if isinstance(r, webli.EncodedRecord)]
  assert [(r.image_id, r.captions, r.caption_ids) for r in recs[:3]] == [
      ("in.tfrecord-0:0", ["a dog"], [0]), ("42", ["un café", "two"], [1, 2]),
      ("web/9", ["x"], [3])]
  assert recs[0].image == jpeg and recs[-1].where == f"{shard1}[0]"

  out = tmp_path / "out"
  assert build.main(["webli", "--tfrecords", str(tmp_path / "in.tfrecord-*"), "--out", str(out),
                     "--split", "val"]) == 0
  captured = capsys.readouterr()
  assert f"{shard0}[10]: bad_image: image/encoded does not decode" in captured.err
  assert f"{shard1}[1]: corrupt_shard: cannot read on" in captured.err
  assert "4 records written" in captured.out and "  wrong_type: 3 record(s)\n" in captured.out
  e = _parse(out, "val")
  assert [x["image/id"] for x in e] == [b"in.tfrecord-0:0", b"42", b"web/9", b"in.tfrecord-1:0"]
  assert (e[1]["image/width"], e[1]["image/height"]) == (30, 60) and e[1]["image/encoded"] == png
  assert e[1]["captions"].tolist() == ["un café".encode(), b"two"] and e[1]["split"] == b"val"
  assert build.main(["webli", "--tfrecords", shard0, "--out", str(tmp_path / "o"),
                     "--strict"]) == 1
  assert f"build stopped: {shard0}[1]: empty_caption: " in capsys.readouterr().err


# -- the synthetic world --------------------------------------------------------------------------

def test_synthetic_pairs(tmp_path):
  examples = []
  synthetic.generate(str(tmp_path), 6, SEED, on_example=examples.append, write_vocab=False)
  synthetic.generate(str(tmp_path), 3, SEED, split="val", on_example=examples.append,
                     write_vocab=False)
  (path,) = synthetic_regions.write(str(tmp_path), examples, SEED, {"webli"})
  assert path == str(tmp_path / "webli" / "pairs-00000-of-00001.jsonl")
  lines = [json.loads(x) for x in open(path)]
  assert {k for x in lines for k in x} == {"image", "caption", "text", "captions"}
  recs = list(webli.read_jsonl([path], "train"))
  assert all(isinstance(r, CaptionRecord) for r in recs) and len(recs) == 9
  for ex, rec in zip(examples, recs):
    assert (tmp_path / rec.file_names[0]).read_bytes() == ex.jpeg
    assert set(rec.captions) <= set(synthetic_formats.captions(ex, SEED))
    assert len(rec.captions) == (2 if ex.image_id % 3 == 0 else 1)
  out = tmp_path / "out"
  assert build.main(["webli", "--jsonl", path, "--images", str(tmp_path), "--out", str(out),
                     "--strict", "--num_shards", "2"]) == 0
  built = _parse(out)
  assert sorted(x["image/id"].decode() for x in built) == sorted(r.image_id for r in recs)
  assert sum(len(x["captions"]) for x in built) == sum(len(r.captions) for r in recs)
