"""COCO captions path: `captions_*.json` and Karpathy `dataset_coco.json` readers
(coco_captions.py), the builder's `coco_captions` subcommand (build.py) and the synthetic world's
caption files (synthetic_formats.py). Hand-written files use the exact published layouts.
"""
import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pixel_llm.data import build, coco_captions, synthetic, synthetic_formats

SEED = 11


def write_jpeg(path, width, height, seed=0):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, "JPEG")


def image(image_id, file_name, width=80, height=40):
  return {"license": 4, "file_name": file_name, "coco_url": "http://images.cocodataset.org/x.jpg",
          "height": height, "width": width, "date_captured": "2013-11-14 17:02:52",
          "flickr_url": "http://farm7.staticflickr.com/x.jpg", "id": image_id}


IMAGES = [image(1, "000000000001.jpg"), image(2, "COCO_val2014_000000000002.jpg", 30, 60),
          image(3, "000000000003.jpg", 64, 64), image(5, "000000000005.jpg"),
          image(6, "000000000006.jpg")]
GOOD_ANNS = [{"image_id": 1, "id": 38, "caption": "A man riding a horse on a beach. "},
             {"image_id": 2, "id": 40, "caption": "Un café près de la rivière.\n"},
             {"image_id": 1, "id": 39, "caption": "A person on a brown horse."},
             {"image_id": 3, "id": 41, "caption": "A broken image."},
             {"image_id": 5, "id": 42, "caption": "A missing image."}]
BAD_ANNS = [  # (annotation, problem kind)
    ("not an object", "wrong_type"),
    ({"image_id": 1, "id": 50}, "missing_field"),
    ({"image_id": 1, "id": 51, "caption": 5}, "wrong_type"),
    ({"image_id": "1", "id": 52, "caption": "A horse."}, "wrong_type"),
    ({"image_id": 1, "id": 53, "caption": "  \n"}, "empty_caption"),
    ({"image_id": 99, "id": 54, "caption": "A horse."}, "unknown_image"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """val2017: 1 (80x40), 2 under its 2014 name (30x60), 3 truncated; train2017: 12 (Karpathy)."""
  root = tmp_path_factory.mktemp("coco")
  val = root / "val2017"
  val.mkdir()
  write_jpeg(val / "000000000001.jpg", 80, 40, 1)
  write_jpeg(val / "COCO_val2014_000000000002.jpg", 30, 60, 2)
  write_jpeg(val / "000000000003.jpg", 64, 64, 3)
  data = (val / "000000000003.jpg").read_bytes()
  (val / "000000000003.jpg").write_bytes(data[:len(data) // 2])
  (root / "val2014").mkdir()
  write_jpeg(root / "val2014" / "COCO_val2014_000000000011.jpg", 50, 50, 11)
  (root / "train2017").mkdir()
  write_jpeg(root / "train2017" / "000000000012.jpg", 40, 20, 12)
  return root


def write_captions(path, images, anns):
  path.write_text(json.dumps({"info": {"year": 2017}, "licenses": [], "images": images,
                              "annotations": anns}))
  return str(path)


def test_read_captions_json(tiny, tmp_path):
  path = write_captions(tmp_path / "captions_val2017.json",
                        IMAGES + [{"file_name": "x.jpg"}], GOOD_ANNS + [a for a, _ in BAD_ANNS])
  items = list(coco_captions.read_coco_captions(path, "val"))
  recs = [i for i in items if isinstance(i, coco_captions.CaptionRecord)]
  problems = [(p.where, p.kind) for p in items if isinstance(p, coco_captions.Problem)]
  assert problems == [(f"{path}:images[5]", "missing_field")] + [
      (f"{path}:annotations[{i}]", kind) for i, (_, kind) in enumerate(BAD_ANNS, len(GOOD_ANNS))
  ] + [(f"{path}:images[4]", "no_captions")]
  assert [(r.image_id, r.captions, r.caption_ids, r.split) for r in recs] == [
      (1, ["A man riding a horse on a beach.", "A person on a brown horse."], [38, 39], "val"),
      (2, ["Un café près de la rivière."], [40], "val"),
      (3, ["A broken image."], [41], "val"), (5, ["A missing image."], [42], "val")]
  assert recs[1].file_names == ("COCO_val2014_000000000002.jpg", "000000000002.jpg")
  assert recs[0].file_names == ("000000000001.jpg",) and recs[0].where == f"{path}:images[0]"


def _parse(out_dir, split):
  import tensorflow as tf
  files = sorted(str(p) for p in out_dir.glob(f"coco_captions_{split}.tfrecord-*"))
  out = []
  for r in tf.data.TFRecordDataset(files):
    ex = tf.io.parse_single_example(r, coco_captions.feature_description())
    out.append({k: (tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v).numpy()
                for k, v in ex.items()})
  return out


def test_build_captions_reports_and_counts(tiny, tmp_path, capsys):
  path = write_captions(tmp_path / "captions_val2017.json", IMAGES,
                        GOOD_ANNS + [a for a, _ in BAD_ANNS])
  out = tmp_path / "out"
  assert build.main(["coco_captions", "--captions", path, "--images", str(tiny / "val2017"),
                     "--out", str(out), "--split", "val", "--log_every_s", "0"]) == 0
  captured = capsys.readouterr()
  for i, (_, kind) in enumerate(BAD_ANNS, len(GOOD_ANNS)):
    assert f"{path}:annotations[{i}]: {kind}: " in captured.err
  assert f"{path}:images[2]: bad_image: " in captured.err
  assert f"{path}:images[3]: missing_image: no image 5" in captured.err
  assert f"{path}:images[4]: no_captions: image 6 has no usable caption" in captured.err
  kinds = Counter(k for _, k in BAD_ANNS) + Counter(["bad_image", "missing_image", "no_captions"])
  for kind, n in kinds.items():
    assert f"  {kind}: {n} record(s)" in captured.out
  assert "2 records written to 1 shard(s)" in captured.out
  e1, e2 = _parse(out, "val")
  assert e1["image/id"] == b"1" and (e1["image/width"], e1["image/height"]) == (80, 40)
  assert e1["image/encoded"] == (tiny / "val2017" / "000000000001.jpg").read_bytes()
  assert e1["captions"].tolist() == [b"A man riding a horse on a beach.",
                                     b"A person on a brown horse."]
  assert e1["caption/id"].tolist() == [38, 39] and e1["split"] == b"val"
  assert e2["captions"][0].decode() == "Un café près de la rivière."
  assert (e2["image/width"], e2["image/height"]) == (30, 60)


def test_build_captions_strict(tiny, tmp_path, capsys):
  for i, (ann, kind) in enumerate(BAD_ANNS):
    path = write_captions(tmp_path / f"c{i}.json", IMAGES[:1], GOOD_ANNS[:1] + [ann])
    out = tmp_path / f"out{i}"
    assert build.main(["coco_captions", "--captions", path, "--images", str(tiny / "val2017"),
                       "--out", str(out), "--split", "val", "--strict"]) == 1
    assert f"{path}:annotations[1]: {kind}: " in capsys.readouterr().err
    assert not out.exists() or not os.listdir(out)
  path = write_captions(tmp_path / "missing.json", IMAGES[3:4], GOOD_ANNS[4:5])
  assert build.main(["coco_captions", "--captions", path, "--images", str(tiny / "val2017"),
                     "--out", str(tmp_path / "o"), "--strict"]) == 1
  assert f"{path}:images[0]: missing_image: " in capsys.readouterr().err


# -- Karpathy -------------------------------------------------------------------------------------

def kimage(cocoid, split, texts, filepath="val2014", filename=None, **changes):
  sents = [{"tokens": t.lower().rstrip(". ").split(), "raw": t, "imgid": cocoid,
            "sentid": 10 * cocoid + j} for j, t in enumerate(texts)]
  img = {"filepath": filepath, "sentids": [s["sentid"] for s in sents],
         "filename": filename or f"COCO_{filepath}_{cocoid:012d}.jpg", "imgid": cocoid,
         "split": split, "sentences": sents, "cocoid": cocoid}
  img.update(changes)
  return img


KARPATHY_GOOD = [kimage(11, "test", ["A dog on a couch. ", "", "A sleeping dog."]),
                 kimage(12, "restval", ["A red bus."], "train2014"),
                 kimage(1, "train", ["A horse on a beach."], "val2017", "000000000001.jpg"),
                 kimage(2, "val", ["A café."])]
KARPATHY_BAD = [  # (image entry, problem kind)
    (kimage(20, "dev", ["A cat."]), "unknown_split"),
    ({k: v for k, v in kimage(21, "test", ["x"]).items() if k != "sentences"}, "missing_field"),
    (kimage(22, "test", ["x"], sentences=[{"raw": 3, "sentid": 1}]), "wrong_type"),
    ({**kimage(23, "test", ["x"]), "cocoid": "23"}, "wrong_type"),
    (kimage(24, "test", [" ", ""]), "no_captions"),
]


def test_karpathy_splits_and_problems(tiny, tmp_path, capsys):
  path = tmp_path / "dataset_coco.json"
  path.write_text(json.dumps({"images": KARPATHY_GOOD + [b for b, _ in KARPATHY_BAD],
                              "dataset": "coco"}))
  items = list(coco_captions.read_karpathy(str(path), ("test",)))
  problems = [(p.where, p.kind) for p in items if isinstance(p, coco_captions.Problem)]
  n = len(KARPATHY_GOOD)
  assert problems == [(f"{path}:images[0].sentences[1]", "empty_caption")] + [
      (f"{path}:images[{i}]", k) for i, (_, k) in enumerate(KARPATHY_BAD, n)
      if k != "no_captions"] + [(f"{path}:images[{n + 4}].sentences[0]", "empty_caption"),
                                (f"{path}:images[{n + 4}].sentences[1]", "empty_caption"),
                                (f"{path}:images[{n + 4}]", "no_captions")]
  (rec,) = [i for i in items if isinstance(i, coco_captions.CaptionRecord)]
  assert (rec.image_id, rec.captions, rec.caption_ids, rec.split) == (
      11, ["A dog on a couch.", "A sleeping dog."], [110, 112], "test")
  assert rec.file_names == ("val2014/COCO_val2014_000000000011.jpg",
                            "COCO_val2014_000000000011.jpg", "000000000011.jpg")

  images = [str(tiny), str(tiny / "train2017"), str(tiny / "val2017")]
  out = tmp_path / "out"
  assert build.main(["coco_captions", "--karpathy", str(path), "--images", *images,
                     "--out", str(out), "--split", "train"]) == 0
  captured = capsys.readouterr()
  assert "2 records written" in captured.out  # train + restval
  assert f"{path}:images[{n}]: unknown_split: split 'dev' is not one of" in captured.err
  examples = _parse(out, "train")
  assert [(e["image/id"], e["split"]) for e in examples] == [(b"12", b"restval"),
                                                             (b"1", b"train")]
  assert examples[0]["image/encoded"] == (tiny / "train2017" / "000000000012.jpg").read_bytes()
  assert build.main(["coco_captions", "--karpathy", str(path), "--images", *images,
                     "--out", str(out), "--split", "test"]) == 0
  (test,) = _parse(out, "test")
  assert test["captions"].tolist() == [b"A dog on a couch.", b"A sleeping dog."]
  assert test["image/encoded"] == (tiny / "val2014" /
                                   "COCO_val2014_000000000011.jpg").read_bytes()
  assert build.main(["coco_captions", "--karpathy", str(path), "--images", *images,
                     "--out", str(out), "--split", "dev"]) == 1
  assert ("unknown Karpathy split 'dev'; valid splits: train, val, test, restval"
          in capsys.readouterr().err)


@pytest.mark.parametrize("content,message", [
    ('{"images": [', "malformed JSON"),
    ("[1, 2]", "expected a JSON object at the top level, got list"),
    ('{"images": {}}', "expected a list under 'images'"),
    (None, "no such file"),
])
@pytest.mark.parametrize("source", ["--captions", "--karpathy"])
def test_file_problems_stop(tiny, tmp_path, capsys, content, message, source):
  path = tmp_path / "file.json"
  if content is not None:
    path.write_text(content)
  for strict in ([], ["--strict"]):
    assert build.main(["coco_captions", source, str(path), "--images", str(tiny / "val2017"),
                       "--out", str(tmp_path / "out"), "--split", "val", *strict]) == 1
    assert f"build stopped: {path}: {message}" in capsys.readouterr().err
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


# -- the synthetic world --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  examples = []
  synthetic.generate(str(root), 10, SEED, on_example=examples.append, write_vocab=False)
  synthetic.generate(str(root), 4, SEED, split="val", on_example=examples.append)
  paths = synthetic_formats.write_coco_captions(str(root), examples, SEED)
  return root, examples, paths


def test_synthetic_caption_files(world):
  root, examples, paths = world
  ann = root / "annotations"
  assert paths == [str(ann / "captions_train2017.json"), str(ann / "captions_val2017.json"),
                   str(ann / "dataset_coco.json")]
  by_id = {e.image_id: e for e in examples}
  for split, n in (("train", 10), ("val", 4)):
    data = json.loads((ann / f"captions_{split}2017.json").read_text())
    assert [i["id"] for i in data["images"]] == [e.image_id for e in examples if e.split == split]
    assert all(i["file_name"] == f"{i['id']:012d}.jpg" and i["width"] == i["height"] == 128
               for i in data["images"])
    per_image = Counter(a["image_id"] for a in data["annotations"])
    assert len(per_image) == n and set(per_image.values()) <= {3, 4, 5}
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    for a in data["annotations"]:
      assert set(a) == {"image_id", "id", "caption"} and a["caption"].endswith(".")
    recs = list(coco_captions.read_coco_captions(str(ann / f"captions_{split}2017.json"), split))
    assert all(isinstance(r, coco_captions.CaptionRecord) for r in recs) and len(recs) == n
    for r in recs:
      assert len(set(r.captions)) == len(r.captions)
      assert r.captions == synthetic_formats.captions(by_id[r.image_id], SEED)
  karpathy = json.loads((ann / "dataset_coco.json").read_text())
  assert karpathy["dataset"] == "coco" and len(karpathy["images"]) == 14
  for img in karpathy["images"]:
    assert set(img) == {"filepath", "sentids", "filename", "imgid", "split", "sentences",
                        "cocoid"}
    assert img["sentids"] == [s["sentid"] for s in img["sentences"]]
  splits = Counter(i["split"] for i in karpathy["images"])
  assert set(splits) == {"train", "restval", "val", "test"} and sum(splits.values()) == 14
  assert synthetic_formats.captions(examples[0], SEED) == synthetic_formats.captions(
      synthetic.make_example(SEED, examples[0].image_id), SEED)


def test_synthetic_captions_describe_the_scene():
  words = {"two": 2, "three": 3, "four": 4, "one": 1}
  for image_id in range(1, 40):
    ex = synthetic.make_example(0, image_id)
    for cap in synthetic_formats.captions(ex, 0):
      low = cap.lower()
      first = low.split()[0]
      if first in words:
        assert words[first] == len(ex.objects), (cap, ex.objects)
      if "stripes" in low or "striped" in low:
        assert ex.stripes in low
      # Every "<colour> <shape>" named is one of the image's objects.
      named = [(c, s) for c in synthetic.COLORS for s in synthetic.SHAPES if f"{c} {s}" in low]
      assert set(named) <= {(o.color, o.shape) for o in ex.objects}, (cap, ex.objects)
      assert not low.startswith("a orange") and " a orange" not in low


def test_synthetic_build_end_to_end(world, tmp_path):
  root, examples, paths = world
  out = tmp_path / "out"
  assert build.main(["coco_captions", "--captions", paths[0], "--images",
                     str(root / "images" / "train2017"), "--out", str(out), "--split", "train",
                     "--strict"]) == 0
  data = json.loads((root / "annotations" / "captions_train2017.json").read_text())
  built = _parse(out, "train")
  assert [int(e["image/id"]) for e in built] == [i["id"] for i in data["images"]]
  for e in built:
    want = [a["caption"].encode() for a in data["annotations"]
            if a["image_id"] == int(e["image/id"])]
    assert e["captions"].tolist() == want
  out = tmp_path / "karpathy"
  for split in ("train", "val", "test", "restval"):
    assert build.main(["coco_captions", "--karpathy", paths[2], "--images",
                       str(root / "images"), "--out", str(out), "--split", split,
                       "--strict"]) == 0
  splits = Counter(i["split"] for i in json.loads(open(paths[2]).read())["images"])
  assert len(_parse(out, "train")) == splits["train"] + splits["restval"]
  assert len(_parse(out, "test")) == splits["test"] and len(_parse(out, "val")) == splits["val"]
