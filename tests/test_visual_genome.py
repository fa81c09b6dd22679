"""Visual Genome path: the VG v1.2 and GRiT readers (visual_genome.py), the builder's `vg`
subcommand (build_regions.py via build.py) and the synthetic world's VG files
(synthetic_regions.py). Hand-written files use the published layouts, with every quirk.
"""
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pixel_llm.data import build, synthetic, synthetic_formats, synthetic_regions, visual_genome
from pixel_llm.data.coco_captions import Problem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 3
URL = "https://cs.stanford.edu/people/rak248/{}/{}.jpg"


def write_jpeg(path, width, height, seed=0):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, "JPEG")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """VG_100K: 1 (80x40), 3 (truncated), 4 (60x30, annotated 100x50), 5 (40x40, annotated 80x40),
  7, 8, 9; VG_100K_2: 2 (30x60). 6 has no file."""
  root = tmp_path_factory.mktemp("vg")
  for d in ("VG_100K", "VG_100K_2"):
    (root / d).mkdir()
  write_jpeg(root / "VG_100K" / "1.jpg", 80, 40, 1)
  write_jpeg(root / "VG_100K_2" / "2.jpg", 30, 60, 2)
  write_jpeg(root / "VG_100K" / "3.jpg", 64, 64, 3)
  data = (root / "VG_100K" / "3.jpg").read_bytes()
  (root / "VG_100K" / "3.jpg").write_bytes(data[:len(data) // 2])
  write_jpeg(root / "VG_100K" / "4.jpg", 60, 30, 4)
  for i in (5, 7, 8, 9):
    write_jpeg(root / "VG_100K" / f"{i}.jpg", 40 if i == 5 else 80, 40, i)
  return root


def region(rid, x, y, w, h, phrase="a region", image_id=1):
  return {"region_id": rid, "width": w, "height": h, "image_id": image_id, "phrase": phrase,
          "y": y, "x": x}


GOOD = region(11, 10, 5, 20, 10, "the clock is green in colour ")
TOLERATED = region(12, 0, 0, 81, 40, "the whole picture")  # 1 px over: clipped without notice
CLIPPED = region(13, 70, 30, 20, 20, "a corner")
BAD_REGIONS = [  # (region, issue kind) of image 1
    (region(20, 10, 5, 0, 10), "empty_box"), (region(21, 10, 5, 10, -3), "empty_box"),
    (region(22, 100, 0, 10, 10), "box_outside"), (region(23, 0, -30, 10, 20), "box_outside"),
    (region(24, 10, 5, 10, 10, " \n"), "empty_phrase"),
    ({k: v for k, v in region(25, 1, 1, 5, 5).items() if k != "phrase"}, "bad_region"),
    (region(26, "10", 5, 10, 10), "bad_region"), (region(27, float("nan"), 5, 10, 10),
                                                   "bad_region"),
    ("not a region", "bad_region"),
]


def image_data(image_id, width, height, vg_dir="VG_100K", key="image_id"):
  return {"width": width, "height": height, key: image_id, "url": URL.format(vg_dir, image_id),
          "coco_id": None, "flickr_id": None}


IMAGE_DATA = [image_data(1, 80, 40), image_data(2, 30, 60, "VG_100K_2", key="id"),
              image_data(3, 64, 64), image_data(4, 100, 50), image_data(5, 80, 40),
              image_data(6, 80, 40), image_data(7, 80, 40), image_data(8, 80, 40),
              image_data(9, "80", 40), image_data(1, 80, 40)]
DESCRIPTIONS = [
    {"id": 1, "regions": [GOOD, TOLERATED, CLIPPED] + [r for r, _ in BAD_REGIONS]},
    {"id": 2, "regions": [region(30, 3, 6, 15, 30, "a tall thing", 2)]},
    {"id": 3, "regions": [region(31, 1, 1, 5, 5)]},
    {"id": 4, "regions": [region(32, 50, 0, 50, 25)]},
    {"id": 5, "regions": [region(33, 1, 1, 5, 5)]}, {"id": 6, "regions": [region(34, 1, 1, 5, 5)]},
    {"id": 7, "regions": []}, {"id": 8, "regions": [region(35, 1, 1, 0, 5)]},
    {"id": 9, "regions": [region(36, 1, 1, 5, 5)]}, {"id": 99, "regions": [region(37, 1, 1, 5, 5)]},
    "not an object", {"id": 10}, {"id": 1, "regions": [region(38, 1, 1, 5, 5)]},
]
# (where in DESCRIPTIONS or IMAGE_DATA, kind) of the record problems, in the reader's order.
RECORD_PROBLEMS = [("image_data.json[8]", "wrong_type"), ("image_data.json[9]", "duplicate_image"),
                   ("region_descriptions.json[6] (image 7)", "no_regions"),
                   ("region_descriptions.json[7] (image 8)", "no_regions"),
                   ("region_descriptions.json[9] (image 99)", "unknown_image"),
                   ("region_descriptions.json[10]", "wrong_type"),
                   ("region_descriptions.json[11] (image 10)", "missing_field"),
                   ("region_descriptions.json[12] (image 1)", "duplicate_image")]


def write_vg(tmp_path, descriptions=DESCRIPTIONS, images=IMAGE_DATA):
  regions, data = tmp_path / "region_descriptions.json", tmp_path / "image_data.json"
  regions.write_text(json.dumps(descriptions))
  data.write_text(json.dumps(images))
  return str(regions), str(data)


def test_read_vg_quirks(tmp_path):
  regions, data = write_vg(tmp_path)
  items = list(visual_genome.read_vg(regions, data, "train"))
  problems = [(p.where.replace(str(tmp_path) + "/", ""), p.kind) for p in items
              if isinstance(p, Problem)]
  assert problems == RECORD_PROBLEMS
  recs = {r.image_id: r for r in items if isinstance(r, visual_genome.RegionRecord)}
  assert sorted(recs) == [1, 2, 3, 4, 5, 6]
  one = recs[1]
  assert one.where == f"{regions}[0] (image 1)" and one.split == "train"
  np.testing.assert_allclose(one.boxes, [[10 / 80, 5 / 40, 30 / 80, 15 / 40], [0, 0, 1, 1],
                                         [70 / 80, 30 / 40, 1, 1]])
  assert one.phrases == ["the clock is green in colour", "the whole picture", "a corner"]
  assert one.region_ids == [11, 12, 13]
  want = Counter(k for _, k in BAD_REGIONS) + Counter(["box_clipped"])
  assert {k: len(v) for k, v in one.issues.items()} == want
  assert one.issues["empty_box"] == ["regions[3] (id 20)", "regions[4] (id 21)"]
  assert one.issues["bad_region"] == [
      "regions[8] (id 25): missing field 'phrase'",
      "regions[9] (id 26): field 'x' should be number, got str ('10')",
      "regions[10] (id 27): box [nan, 5, 10, 10] is not finite",
      "regions[11]: the region should be an object, got str"]
  assert one.file_names == ("VG_100K/1.jpg", "VG_100K_2/1.jpg", "1.jpg")
  assert recs[2].file_names[0] == "VG_100K_2/2.jpg" and (recs[2].width, recs[2].height) == (30, 60)
  msg = visual_genome.issue_message("empty_box", one.issues["empty_box"])
  assert msg == ("2 region(s) with zero or negative width/height dropped: regions[3] (id 20); "
                 "regions[4] (id 21)")
  # A split file keeps only its ids.
  split = tmp_path / "splits.json"
  split.write_text(json.dumps({"train": [2, 4], "val": [1], "test": []}))
  ids = visual_genome.load_split_ids(str(split), "train")
  kept = list(visual_genome.read_vg(regions, data, "train", ids))
  assert [getattr(r, "image_id", r.where) for r in kept] == [2, 4, f"{regions}[10]"]
  with pytest.raises(visual_genome.FileError, match="no list of image ids under 'dev'"):
    visual_genome.load_split_ids(str(split), "dev")


def _parse(out_dir, split):
  import tensorflow as tf
  files = sorted(str(p) for p in out_dir.glob(f"vg_{split}.tfrecord-*"))
  out = []
  for r in tf.data.TFRecordDataset(files):
    ex = tf.io.parse_single_example(r, visual_genome.feature_description())
    out.append({k: (tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v).numpy()
                for k, v in ex.items()})
  return out


def test_build_vg_reports_and_counts(tiny, tmp_path, capsys):
  regions, data = write_vg(tmp_path)
  out = tmp_path / "out"
  assert build.main(["vg", "--regions", regions, "--image_data", data, "--images", str(tiny),
                     "--out", str(out), "--num_shards", "2", "--log_every_s", "0"]) == 0
  captured = capsys.readouterr()
  for where, kind in RECORD_PROBLEMS:
    assert f"{tmp_path}/{where}: {kind}: " in captured.err
  assert f"{regions}[0] (image 1): empty_box: 2 region(s) with zero" in captured.err
  assert f"{regions}[2] (image 3): bad_image: " in captured.err
  assert f"{regions}[3] (image 4): rescaled_image: " in captured.err
  assert f"{regions}[4] (image 5): size_mismatch: " in captured.err
  assert f"{regions}[5] (image 6): missing_image: no image 6" in captured.err
  for kind, n, items in [("empty_box", 1, 2), ("box_outside", 1, 2), ("empty_phrase", 1, 1),
                         ("bad_region", 1, 4), ("box_clipped", 1, 1), ("no_regions", 2, 2),
                         ("bad_image", 1, 1), ("missing_image", 1, 1), ("size_mismatch", 1, 1),
                         ("rescaled_image", 1, 1), ("unknown_image", 1, 1),
                         ("duplicate_image", 2, 2), ("wrong_type", 2, 2)]:
    detail = f" ({items} items)" if items != n else ""
    assert f"  {kind}: {n} record(s){detail}\n" in captured.out
  assert "3 records written to 2 shard(s)" in captured.out
  e1, e4, e2 = _parse(out, "train")  # round-robin over two shards: 1, 4 | 2
  assert e1["image/id"] == b"1" and (e1["image/width"], e1["image/height"]) == (80, 40)
  assert e1["image/encoded"] == (tiny / "VG_100K" / "1.jpg").read_bytes()
  np.testing.assert_allclose(e1["region/box"].reshape(-1, 4),
                             [[10 / 80, 5 / 40, 30 / 80, 15 / 40], [0, 0, 1, 1],
                              [70 / 80, 30 / 40, 1, 1]])
  assert e1["region/phrase"].tolist() == [b"the clock is green in colour",
                                          b"the whole picture", b"a corner"]
  assert e1["region/id"].tolist() == [11, 12, 13] and e1["split"] == b"train"
  assert e2["image/encoded"] == (tiny / "VG_100K_2" / "2.jpg").read_bytes()
  # Image 4's file is the annotated image at 60 %: normalised boxes are unchanged.
  assert (e4["image/width"], e4["image/height"]) == (60, 30)
  np.testing.assert_allclose(e4["region/box"], [0.5, 0, 1, 0.5])


@pytest.mark.parametrize("descriptions,images,message", [
    ([{"id": 1, "regions": [GOOD, r]}], IMAGE_DATA[:1], f"[0] (image 1): {kind}: 1 ")
    for r, kind in BAD_REGIONS[::2]] + [
    ([{"id": 1, "regions": [CLIPPED]}], IMAGE_DATA[:1], "[0] (image 1): box_clipped: "),
    ([{"id": 7, "regions": []}], IMAGE_DATA[6:7], "[0] (image 7): no_regions: "),
    ([{"id": 5, "regions": [GOOD]}], IMAGE_DATA[4:5], "[0] (image 5): size_mismatch: "),
    ([{"id": 6, "regions": [GOOD]}], IMAGE_DATA[5:6], "[0] (image 6): missing_image: "),
    ([{"id": 2, "regions": [GOOD]}], IMAGE_DATA[:1], "[0] (image 2): unknown_image: "),
])
def test_build_vg_strict(tiny, tmp_path, capsys, descriptions, images, message):
  regions, data = write_vg(tmp_path, descriptions, images)
  out = tmp_path / "out"
  assert build.main(["vg", "--regions", regions, "--image_data", data, "--images", str(tiny),
                     "--out", str(out), "--strict"]) == 1
  assert f"build stopped: {regions}{message}" in capsys.readouterr().err
  assert not out.exists() or not os.listdir(out)


def test_build_vg_file_problems(tiny, tmp_path, capsys):
  regions, data = write_vg(tmp_path)
  (tmp_path / "bad.json").write_text('[{"id": 1')
  for argv, message in [
      (["--regions", regions, "--image_data", str(tmp_path / "bad.json")], "malformed JSON"),
      (["--regions", regions, "--image_data", str(tmp_path / "none.json")], "no such file"),
      (["--regions", regions], "--regions needs --image_data"),
      (["--grit", regions], "expected a JSON object at the top level, got list"),
      (["--regions", regions, "--image_data", data, "--split_file", data],
       "no list of image ids under 'train'")]:
    assert build.main(["vg", *argv, "--images", str(tiny), "--out", str(tmp_path / "o")]) == 1
    assert message in capsys.readouterr().err
  # As a module: the subcommand's BuildError is the one build's main catches (exit 1, no trace).
  proc = subprocess.run([sys.executable, "-m", "pixel_llm.data.build", "vg", "--regions", regions,
                         "--image_data", data, "--images", str(tiny), "--out",
                         str(tmp_path / "o"), "--strict"], cwd=REPO, capture_output=True,
                        text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert f"build stopped: {tmp_path}/image_data.json[8]: wrong_type: " in proc.stderr


def test_read_grit(tiny, tmp_path, capsys):
  grit = {"images": [{"id": 1, "file_name": "1.jpg", "height": 40, "width": 80},
                     {"id": 2, "file_name": "2.jpg", "height": 60, "width": 30},
                     {"id": 7, "file_name": "7.jpg", "height": 40, "width": 80},
                     {"id": 3, "height": 40, "width": 80}],
          "annotations": [{"id": 1, "image_id": 1, "bbox": [10, 5, 20, 10], "caption": "a clock ",
                           "category_id": 1},
                          {"id": 2, "image_id": 2, "bbox": [3.5, 6, 15, 30.5],
                           "caption": "a tall thing", "category_id": 1},
                          {"id": 3, "image_id": 1, "bbox": [10, 5, 20], "caption": "x"},
                          {"id": 4, "image_id": 1, "bbox": [70, 30, 20, 20], "caption": "a corner"},
                          {"id": 5, "image_id": 42, "bbox": [1, 1, 2, 2], "caption": "x"},
                          {"id": 6, "bbox": [1, 1, 2, 2], "caption": "x"}, 7],
          "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}
  path = tmp_path / "test.json"
  path.write_text(json.dumps(grit))
  items = list(visual_genome.read_grit(str(path), "test"))
  assert [(p.where, p.kind) for p in items if isinstance(p, Problem)] == [
      (f"{path}:images[3] (image 3)", "missing_field"),
      (f"{path}:annotations[4]", "unknown_image"), (f"{path}:annotations[5]", "missing_field"),
      (f"{path}:annotations[6]", "wrong_type"), (f"{path}:images[2] (image 7)", "no_regions")]
  one, two = [r for r in items if isinstance(r, visual_genome.RegionRecord)]
  assert one.region_ids == [1, 4] and one.phrases == ["a clock", "a corner"]
  assert one.issues == {"bad_region": ["annotations[2] (id 3): bbox should be 4 numbers, got "
                                       "[10, 5, 20]"],
                        "box_clipped": ["annotations[3] (id 4)"]}
  np.testing.assert_allclose(two.boxes, [[3.5 / 30, 0.1, 18.5 / 30, 36.5 / 60]])
  assert one.file_names == ("VG_100K/1.jpg", "VG_100K_2/1.jpg", "1.jpg")
  out = tmp_path / "out"
  assert build.main(["vg", "--grit", str(path), "--images", str(tiny), "--out", str(out),
                     "--split", "test"]) == 0
  assert "2 records written" in capsys.readouterr().out
  assert [e["region/id"].tolist() for e in _parse(out, "test")] == [[1, 4], [2]]


# -- the synthetic world --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  examples = []
  synthetic.generate(str(root), 6, SEED, on_example=examples.append, write_vocab=False)
  synthetic.generate(str(root), 4, SEED, split="val", on_example=examples.append)
  return root, examples, synthetic_regions.write(str(root), examples, SEED, {"vg"})


def test_synthetic_vg_files(world):
  root, examples, paths = world
  vg = root / "vg"
  assert paths == [str(vg / n) for n in ("region_descriptions.json", "image_data.json",
                                         "densecap_splits.json", "grit/train.json",
                                         "grit/test.json")]
  splits = json.loads((vg / "densecap_splits.json").read_text())
  assert splits == {"train": [1, 2, 3, 4, 5, 6], "val": [1000002, 1000004],
                    "test": [1000001, 1000003]}
  items = list(visual_genome.read_vg(paths[0], paths[1], "all"))
  assert all(isinstance(r, visual_genome.RegionRecord) and not r.issues for r in items)
  for ex, rec in zip(examples, items):
    assert rec.image_id == ex.image_id and (rec.width, rec.height) == (128, 128)
    assert rec.file_names[0] == f"VG_100K{'_2' if ex.image_id % 2 else ''}/{ex.image_id}.jpg"
    assert (vg / rec.file_names[0]).read_bytes() == ex.jpeg
    names = [f"a {o.size} {o.color} {o.shape}" for o in ex.objects]
    exprs = synthetic_formats.referring_expressions(ex.objects)
    assert [p for p in rec.phrases if p.startswith("a ")] == names
    for box, phrase in zip(rec.boxes, rec.phrases):
      if "background" in phrase:
        assert box == [0, 0, 1, 1] and ex.stripes in phrase
        continue
      # Each box covers one object's tight box, widened by less than a pixel.
      matches = [k for k, o in enumerate(ex.objects)
                 if np.all(np.abs(np.subtract(box, o.box)) < 1 / 128)]
      assert matches, (box, phrase)
      if phrase.startswith("the "):
        assert any(phrase[4:] in exprs[k] for k in matches), (phrase, exprs)
  grit = list(visual_genome.read_grit(paths[4], "test"))
  by_id = {r.image_id: r for r in items}
  assert [r.image_id for r in grit] == splits["test"]
  for r in grit:
    assert (r.boxes, r.phrases, r.region_ids) == (by_id[r.image_id].boxes,
                                                  by_id[r.image_id].phrases,
                                                  by_id[r.image_id].region_ids)
  assert synthetic_regions.regions(examples[0], SEED) == synthetic_regions.regions(
      synthetic.make_example(SEED, examples[0].image_id), SEED)


def test_synthetic_vg_build(world, tmp_path):
  root, examples, paths = world
  out = tmp_path / "out"
  assert build.main(["vg", "--regions", paths[0], "--image_data", paths[1], "--split_file",
                     paths[2], "--images", str(root / "vg"), "--out", str(out), "--split", "val",
                     "--strict"]) == 0
  built = _parse(out, "val")
  assert [e["image/id"] for e in built] == [b"1000002", b"1000004"]
  for e in built:
    want = synthetic_regions.regions(synthetic.make_example(SEED, int(e["image/id"]), "val"),
                                     SEED)
    assert e["region/phrase"].tolist() == [p.encode() for _, p in want]
    np.testing.assert_allclose(e["region/box"].reshape(-1, 4),
                               [[x / 128, y / 128, (x + w) / 128, (y + h) / 128]
                                for (x, y, w, h), _ in want], atol=1e-6)


def test_synthetic_cli_writes_vg_and_webli(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "pixel_llm.data.synthetic", "--out", str(tmp_path),
                         "--num_images", "2", "--seed", str(SEED), "--formats", "vg,webli"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  for name in ("vg/region_descriptions.json", "vg/image_data.json", "vg/densecap_splits.json",
               "vg/grit/train.json", "vg/grit/test.json", "vg/VG_100K/2.jpg", "vg/VG_100K_2/1.jpg",
               "webli/pairs-00000-of-00001.jsonl"):
    assert (tmp_path / name).is_file(), name
  assert (tmp_path / "vg" / "VG_100K" / "2.jpg").read_bytes() == (
      tmp_path / "images" / "train2017" / "000000000002.jpg").read_bytes()
