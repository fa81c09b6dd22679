"""RefCOCO path: the restricted unpickler (safe_pickle.py), mask decoding and the refs/instances and
MDETR readers (refcoco.py), the builder's `refcoco` subcommand (build.py) and the synthetic world's
RefCOCO files (synthetic_formats.py).

Hand-written files use the exact formats: refs as a Python 2 protocol-0 pickle (byte strings),
instances.json with polygon, compressed-RLE and uncompressed-RLE segmentations.
"""
import json
import os
import pickle
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pixel_llm.data import build, refcoco, safe_pickle, synthetic, synthetic_formats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 5


def py2_pickle(obj) -> bytes:
  """Protocol-0 pickle as Python 2's pickle.dump writes it: str values are byte strings (S'...')."""
  def enc(o):
    if isinstance(o, dict):
      return b"(d" + b"".join(enc(k) + enc(v) + b"s" for k, v in o.items())
    if isinstance(o, list):
      return b"(l" + b"".join(enc(v) + b"a" for v in o)
    if isinstance(o, bool):
      return b"I0%d\n" % o
    if isinstance(o, int):
      return b"I%d\n" % o if abs(o) < 2**31 else b"L%dL\n" % o
    if isinstance(o, float):
      return b"F%r\n" % o
    if isinstance(o, str):
      return b"S'" + "".join(chr(c) if 32 <= c < 127 and c not in (39, 92) else f"\\x{c:02x}"
                             for c in o.encode("utf-8")).encode() + b"'\n"
    raise TypeError(o)
  return enc(obj) + b"."


class RunsCommand:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


# -- safe_pickle.py -------------------------------------------------------------------------------

REF = {"ref_id": 0, "ann_id": 1719310, "category_id": 1, "image_id": 581857, "split": "train",
       "file_name": "COCO_train2014_000000581857_1719310.jpg", "sent_ids": [0, 1],
       "sentences": [{"raw": "The lady with the blue shirt", "sent": "the lady with the blue shirt",
                      "sent_id": 0, "tokens": ["the", "lady", "with", "the", "blue", "shirt"]},
                     {"raw": "café 'left' \\ lady", "sent": "cafe left lady", "sent_id": 1,
                      "tokens": ["cafe", "left", "lady"]}],
       "score": 0.5, "flag": True, "big": 2**40}


def test_safe_pickle_reads_plain_data(tmp_path):
  assert safe_pickle.loads(py2_pickle([REF])) == [REF]  # Python 2 byte strings -> UTF-8 text
  for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
    assert safe_pickle.loads(pickle.dumps([REF, (1, None)], protocol=protocol)) == [REF, (1, None)]
  path = tmp_path / "refs(unc).p"
  path.write_bytes(py2_pickle([REF]))
  assert safe_pickle.load(str(path)) == [REF]


@pytest.mark.parametrize("make", [
    lambda m: pickle.dumps([{"sent": RunsCommand(m)}], protocol=0),
    lambda m: pickle.dumps(RunsCommand(m), protocol=2),
    lambda m: pickle.dumps([RunsCommand(m)], protocol=5),
    lambda m: b"cbuiltins\neval\n(S'__import__(\"os\").system(\"touch " + str(m).encode()
              + b"\")'\ntR.",
    lambda m: b"(lP1\na.",  # a persistent id
    lambda m: pickle.dumps({1, 2}, protocol=2),  # sets before protocol 4 name builtins.set
])
def test_safe_pickle_refuses_code_and_runs_nothing(tmp_path, make):
  marker = tmp_path / "ran"
  data = make(marker)
  path = tmp_path / "evil.p"
  path.write_bytes(data)
  with pytest.raises(safe_pickle.UnsafePickleError, match=r"evil\.p: unsafe pickle refused"):
    safe_pickle.load(str(path))
  assert not marker.exists()


def test_safe_pickle_unreadable(tmp_path):
  path = tmp_path / "cut.p"
  path.write_bytes(pickle.dumps([REF], protocol=2)[:40])
  with pytest.raises(safe_pickle.PickleLoadError, match=r"cut\.p: not a readable pickle"):
    safe_pickle.load(str(path))


# -- masks ----------------------------------------------------------------------------------------

# Column-major runs, zeros first: columns (0,0,1) (1,1,1) (1,0,0) (0,0,1) -> 2, 5, 4, 1.
# Compressed: 2 -> '2', 5 -> '5', 4 -> '4', then 1 - 5 = -4 (delta to the count two before) -> 'L'.
SMALL = np.array([[0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1]], bool)
SMALL_COUNTS, SMALL_STRING = [2, 5, 4, 1], "254L"


def test_rle_known_answers():
  assert refcoco.rle_encode(SMALL) == SMALL_COUNTS
  assert refcoco.counts_to_string(SMALL_COUNTS) == SMALL_STRING
  assert refcoco.counts_from_string(SMALL_STRING) == SMALL_COUNTS
  for counts in (SMALL_COUNTS, SMALL_STRING, SMALL_STRING.encode()):
    np.testing.assert_array_equal(
        refcoco.decode_segmentation({"size": [3, 4], "counts": counts}, 3, 4), SMALL)
  # 40 zeros then 60 ones: 40 = 0b01000 + 1 << 5 -> 'X' (8 | continuation) '1'; 60 -> 'l' '1'.
  assert refcoco.counts_to_string([40, 60]) == "X1l1"
  col = refcoco.decode_segmentation({"size": [100, 1], "counts": "X1l1"}, 100, 1)
  assert col[:, 0].tolist() == [False] * 40 + [True] * 60
  first_one = np.zeros((2, 2), bool)
  first_one[0, 0] = True
  assert refcoco.rle_encode(first_one) == [0, 1, 3]


def test_polygon_known_answers():
  # A pixel (x, y) is inside an axis-aligned integer rectangle when x0 <= x < x1, y0 <= y < y1.
  mask = refcoco.decode_segmentation([[1, 1, 4, 1, 4, 3, 1, 3]], 5, 6)
  want = np.zeros((5, 6), bool)
  want[1:3, 1:4] = True
  np.testing.assert_array_equal(mask, want)
  diamond = refcoco.decode_segmentation([[2, 0, 4, 2, 2, 4, 0, 2]], 5, 6)
  assert diamond.astype(int).tolist() == [[0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                                          [0, 1, 1, 0, 0, 0], [0] * 6, [0] * 6]
  two = refcoco.decode_segmentation([[1, 1, 4, 1, 4, 3, 1, 3], [0, 4, 6, 4, 6, 5, 0, 5]], 5, 6)
  want[4, :] = True  # rings are merged (union)
  np.testing.assert_array_equal(two, want)
  assert not refcoco.decode_segmentation([[10, 10, 20, 10, 15, 10]], 40, 80).any()  # a line


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_masks_match_pycocotools():
  mask_api = pytest.importorskip("pycocotools.mask")
  rng = np.random.default_rng(0)
  for trial in range(300):
    h, w = (int(v) for v in rng.integers(1, 30, size=2))
    rings = []
    for _ in range(int(rng.integers(1, 3))):
      n = int(rng.integers(3, 9))
      xy = (rng.uniform(-2, [w + 2, h + 2], size=(n, 2)) if trial % 2 else
            rng.integers(0, [2 * w + 1, 2 * h + 1], size=(n, 2)) / 2.0)  # on the 0.5 grid
      rings.append(xy.reshape(-1).tolist())
    ref = mask_api.decode(mask_api.merge(mask_api.frPyObjects(rings, h, w)))
    np.testing.assert_array_equal(refcoco.decode_segmentation(rings, h, w), ref.astype(bool))
    m = rng.random((h, w)) < rng.random()
    enc = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
    assert refcoco.counts_to_string(refcoco.rle_encode(m)) == enc["counts"].decode()
    np.testing.assert_array_equal(
        refcoco.decode_segmentation({"size": [h, w], "counts": enc["counts"].decode()}, h, w), m)


@pytest.mark.parametrize("seg,message", [
    ([[1, 2, 3, 4, 5, 6, 7]], "even number"),
    ([[1, 2, 3, 4]], "even number"),
    ([[1, 2, "3", 4, 5, 6]], "list of numbers"),
    ([], "empty"),
    ({"size": [3, 5], "counts": [15]}, "differs from the image"),
    ({"size": [3, 4], "counts": [2, 5, 4]}, "add up to 11"),
    ({"size": [3, 4], "counts": "25~L"}, "character"),
    ({"size": [3, 4], "counts": "25"}, "add up"),
    ({"size": [3, 4], "counts": "2X"}, "end inside a number"),
    ("polygon", "polygons or an RLE"),
])
def test_bad_segmentations(seg, message):
  with pytest.raises(ValueError, match=message):
    refcoco.decode_segmentation(seg, 3, 4)


# -- hand-written refs + instances ----------------------------------------------------------------

def write_jpeg(path, width, height, seed=0):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, "JPEG")


def ann(ann_id, image_id, bbox, seg=None, **extra):
  a = {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": bbox, "iscrowd": 0,
       "area": 1.0, "segmentation": seg if seg is not None else [[1, 1, 5, 1, 5, 5, 1, 5]]}
  a.update(extra)
  return a


POLYGONS = [[8, 4, 24, 4, 24, 12, 8, 12], [30, 14, 48, 14, 48, 24, 30, 24]]
INSTANCES = {
    "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 80, "height": 40},
               {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 30, "height": 60},
               {"id": 3, "file_name": "COCO_train2014_000000000003.jpg", "width": 64, "height": 64},
               {"id": 4, "file_name": "COCO_train2014_000000000004.jpg", "width": 100,
                "height": 100},
               {"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 50,
                "height": 50}],
    "annotations": [
        ann(10, 1, [8, 4, 40, 20], POLYGONS),
        ann(11, 1, [60, 0, 20, 40], {"size": [40, 80], "counts": "P[2Pi0"}),  # [2400, 800]
        ann(12, 2, [0.0, 10.0, 30.4, 50.5], {"size": [60, 30], "counts": [10, 50] * 30},
            iscrowd=1),
        ann(20, 1, [10, 10, 0, 5]), ann(21, 1, [70, 10, 20, 10]),
        ann(22, 1, [1, 1, 5, 5], [[1, 2, 3]]),
        ann(23, 1, [1, 1, 5, 5], {"size": [10, 10], "counts": [100]}),
        ann(24, 1, [10, 10, 10, 1], [[10, 10, 20, 10, 15, 10]]), ann(25, 3, [1, 1, 5, 5]),
        ann(26, 4, [50, 50, 40, 40]), ann(27, 5, [1, 1, 5, 5]), ann(28, 1, "oops"),
        ann(29, 2, [1, 1, 5, 5])],
    "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
}


def ref(ref_id, ann_id, image_id, texts=("the thing",), split="train", **changes):
  sentences = [{"tokens": t.split(), "raw": t.capitalize(), "sent_id": 100 * ref_id + j,
                "sent": t} for j, t in enumerate(texts)]
  r = {"sent_ids": [s["sent_id"] for s in sentences], "file_name": f"x_{ann_id}.jpg",
       "ann_id": ann_id, "ref_id": ref_id, "image_id": image_id, "split": split,
       "sentences": sentences, "category_id": 1}
  r.update(changes)
  return r


GOOD = [ref(0, 10, 1, ("the two boxes", "boxes on the left")),
        ref(1, 11, 1, ("café on the right",)), ref(2, 12, 2, ("the lower part",)),
        ref(3, 10, 1, ("a val ref",), split="val")]
BAD_ROWS = [  # (ref, problem kind, kept)
    ("not a ref", "wrong_type", False),
    ({k: v for k, v in ref(4, 10, 1).items() if k != "sentences"}, "missing_field", False),
    ({**ref(5, 10, 1), "ref_id": "5"}, "wrong_type", False),
    (ref(6, 10, 1, split="testC"), "unknown_split", False),
    (ref(7, 10, 1, ("", "  ")), "empty_expression", False),
    (ref(8, 10, 1, sentences=[{"sent": 3, "raw": "x", "sent_id": 0, "tokens": []}]),
     "wrong_type", False),
    (ref(9, 999, 1), "unknown_annotation", False),
    (ref(10, 29, 1), "unknown_annotation", False),  # annotation 29 belongs to image 2
    (ref(11, 10, 77), "unknown_image", False),
    (ref(12, 20, 1), "bad_box", False),
    (ref(13, 21, 1), "box_outside", False),
    (ref(14, 22, 1), "bad_mask", False),
    (ref(15, 23, 1), "bad_mask", False),
    (ref(16, 28, 1), "wrong_type", False),
    (ref(17, 25, 3), "bad_image", False),
    (ref(18, 26, 4), "size_mismatch", False),
    (ref(19, 27, 5), "missing_image", False),
    (ref(20, 10, 1, ("", "the left box")), "empty_sentence", True),
    (ref(21, 24, 1), "empty_mask", True),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """Image 1 (80x40) only under its 2017 name, 2 (30x60) under its 2014 name, 3 truncated, 4 is
  80x40 (the annotations say 100x100), 5 missing."""
  root = tmp_path_factory.mktemp("refcoco")
  images = root / "train2014"
  images.mkdir()
  write_jpeg(images / "000000000001.jpg", 80, 40, 1)
  write_jpeg(images / "COCO_train2014_000000000002.jpg", 30, 60, 2)
  write_jpeg(images / "000000000003.jpg", 64, 64, 3)
  data = (images / "000000000003.jpg").read_bytes()
  (images / "000000000003.jpg").write_bytes(data[:len(data) // 2])
  write_jpeg(images / "000000000004.jpg", 80, 40, 4)
  (root / "instances.json").write_text(json.dumps(INSTANCES))
  return root


def write_refs(path, refs):
  path.write_bytes(py2_pickle(refs))
  return str(path)


def test_read_hand_written(tiny, tmp_path):
  refs = write_refs(tmp_path / "refs(unc).p", GOOD)
  seen = Counter()
  recs = list(refcoco.read_refcoco(refs, str(tiny / "instances.json"), "train", seen))
  assert seen == {"train": 3, "val": 1}
  assert [r.ref_id for r in recs] == [0, 1, 2]
  r0, r1, r2 = recs
  assert (r0.image_id, r0.ann_id, r0.category_id, r0.split, r0.width, r0.height) == (
      1, 10, 1, "train", 80, 40)
  assert r0.file_names == ("COCO_train2014_000000000001.jpg", "000000000001.jpg")
  assert r0.sents == ["the two boxes", "boxes on the left"] and r0.sent_ids == [0, 1]
  assert r0.raw == ["The two boxes", "Boxes on the left"]
  assert r1.sents == ["café on the right"]  # UTF-8 bytes of a Python 2 str
  np.testing.assert_allclose(r0.box, [0.1, 0.1, 0.6, 0.6])
  np.testing.assert_allclose(r1.box, [0.75, 0.0, 1.0, 1.0])
  np.testing.assert_allclose(r2.box, [0.0, 1 / 6, 1.0, 1.0])  # 0.4 / 0.5 px outside: clipped
  want = np.zeros((40, 80), bool)
  want[4:12, 8:24] = want[14:24, 30:48] = True
  np.testing.assert_array_equal(r0.mask, want)
  want = np.zeros((40, 80), bool)
  want[:, 60:] = True
  np.testing.assert_array_equal(r1.mask, want)
  want = np.zeros((60, 30), bool)
  want[10:] = True
  np.testing.assert_array_equal(r2.mask, want)
  assert not any(r.issues for r in recs)
  (val,) = refcoco.read_refcoco(refs, str(tiny / "instances.json"), "val")
  assert val.ref_id == 3 and val.split == "val"
  with pytest.raises(ValueError, match="unknown split 'testC'; valid splits: train, val, testA, "
                                       "testB, test"):
    list(refcoco.read_refcoco(refs, str(tiny / "instances.json"), "testC"))


def _records(out_dir, split="train", name="refcoco"):
  """The parsed records (dense numpy) of a build's shards."""
  import tensorflow as tf
  spec = refcoco.feature_description() if name == "refcoco" else None
  files = sorted(str(p) for p in out_dir.glob(f"{name}_{split}.tfrecord-*"))
  out = []
  for r in tf.data.TFRecordDataset(files):
    ex = tf.io.parse_single_example(r, spec)
    out.append({k: (tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v).numpy()
                for k, v in ex.items()})
  return out


def _parse(out_dir, split="train"):
  """One dict per referred object (the records are per image): its scalar ids, box[4], mask PNG
  and its own expressions."""
  out = []
  for rec in _records(out_dir, split):
    n = len(rec["ref/id"])
    assert rec["box"].shape == (4 * n,) and rec["mask"].shape == (n,)
    owner = rec["expression/object"]
    assert len(owner) == len(rec["expression/id"]) and set(owner) == set(range(n))
    for k in range(n):
      obj = {key: v for key, v in rec.items() if not key.startswith(("expression/", "ref/",
                                                                     "ann/", "category/"))}
      obj.update({key: rec[key][k] for key in ("ref/id", "ann/id", "category/id", "mask")})
      obj["box"] = rec["box"][4 * k:4 * k + 4]
      obj.update({key: rec[key][owner == k] for key in ("expression/raw", "expression/sent",
                                                       "expression/id")})
      out.append(obj)
  return out


def _png_mask(data):
  import tensorflow as tf
  decoded = tf.io.decode_png(data).numpy()
  assert decoded.shape[-1] == 1 and set(np.unique(decoded)) <= {0, 255}
  return decoded[..., 0] > 0


def _run(tiny, refs, out, *extra):
  return build.main(["refcoco", "--refs", refs, "--instances", str(tiny / "instances.json"),
                     "--images", str(tiny / "train2014"), "--out", str(out), "--log_every_s", "0",
                     *extra])


def test_build_reports_and_counts_bad_input(tiny, tmp_path, capsys):
  refs = write_refs(tmp_path / "refs(unc).p", GOOD + [r for r, _, _ in BAD_ROWS])
  out = tmp_path / "out"
  assert _run(tiny, refs, out, "--num_shards", "2") == 0
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  for i, (_, kind, kept) in enumerate(BAD_ROWS, start=len(GOOD)):
    (line,) = [x for x in lines if f"{refs}[{i}]" in x]
    assert f": {kind}: " in line and line.endswith(f"(record {'kept' if kept else 'skipped'})")
  for kind, n in Counter(kind for _, kind, _ in BAD_ROWS).items():
    assert f"  {kind}: {n} record(s)" in captured.out
  # One record per image: image 1 holds refs 0, 1, 20 and 21, image 2 ref 2.
  assert "2 records written to 2 shard(s)" in captured.out
  records = {r["image/id"]: r for r in _records(out)}
  assert sorted(records) == [b"1", b"2"]
  assert records[b"1"]["ref/id"].tolist() == [0, 1, 20, 21]
  assert records[b"1"]["expression/object"].tolist() == [0, 0, 1, 2, 3]
  examples = sorted(_parse(out), key=lambda e: e["ref/id"])
  assert [e["ref/id"] for e in examples] == [0, 1, 2, 20, 21]
  e0, e1, e2 = examples[:3]
  assert e0["image/id"] == b"1" and (e0["image/width"], e0["image/height"]) == (80, 40)
  assert e0["image/encoded"] == (tiny / "train2014" / "000000000001.jpg").read_bytes()
  assert e2["image/encoded"] == (tiny / "train2014" /
                                 "COCO_train2014_000000000002.jpg").read_bytes()
  assert (e0["ann/id"], e0["category/id"], e0["split"]) == (10, 1, b"train")
  np.testing.assert_allclose(e0["box"], [0.1, 0.1, 0.6, 0.6])
  assert e0["expression/sent"].tolist() == [b"the two boxes", b"boxes on the left"]
  assert e0["expression/raw"].tolist() == [b"The two boxes", b"Boxes on the left"]
  assert e0["expression/id"].tolist() == [0, 1]
  assert e1["expression/sent"][0].decode() == "café on the right"
  np.testing.assert_array_equal(_png_mask(e0["mask"]), refcoco.decode_segmentation(
      POLYGONS, 40, 80))
  assert _png_mask(e1["mask"])[:, 60:].all() and not _png_mask(e1["mask"])[:, :60].any()
  assert _png_mask(e2["mask"]).shape == (60, 30)
  assert examples[3]["expression/id"].tolist() == [2001]  # the empty sentence 2000 dropped
  assert not _png_mask(examples[4]["mask"]).any()


def test_build_strict_stops_at_each_problem(tiny, tmp_path, capsys):
  for i, (row, kind, _) in enumerate(BAD_ROWS):
    refs = write_refs(tmp_path / f"refs{i}.p", [GOOD[0], row])
    out = tmp_path / f"out{i}"
    assert _run(tiny, refs, out, "--strict") == 1, kind
    assert f"{refs}[1]" in capsys.readouterr().err
    assert not out.exists() or not os.listdir(out)


@pytest.mark.parametrize("problem", ["malformed_instances", "instances_layout", "unsafe_pickle",
                                     "truncated_pickle", "refs_not_a_list", "unknown_split",
                                     "no_instances", "missing_refs"])
@pytest.mark.parametrize("strict", [False, True])
def test_build_file_problems_stop(tiny, tmp_path, capsys, problem, strict):
  refs = write_refs(tmp_path / "refs(unc).p", GOOD)
  instances = tiny / "instances.json"
  args, expect = [], ""
  if problem == "malformed_instances":
    instances = tmp_path / "instances.json"
    instances.write_text('{"images": [], "annotations": [')
    expect = f"{instances}: malformed JSON"
  elif problem == "instances_layout":
    instances = tmp_path / "instances.json"
    instances.write_text('{"images": []}')
    expect = f"{instances}: expected a list under 'annotations'"
  elif problem == "unsafe_pickle":
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([RunsCommand(tmp_path / "ran")]))
    expect = f"{refs}: unsafe pickle refused (nothing was run)"
  elif problem == "truncated_pickle":
    (tmp_path / "refs(unc).p").write_bytes(py2_pickle(GOOD)[:-30])
    expect = f"{refs}: not a readable pickle"
  elif problem == "refs_not_a_list":
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps({"refs": GOOD}))
    expect = f"{refs}: expected a list of refs, got dict"
  elif problem == "unknown_split":
    args, expect = ["--split", "testC"], "unknown split 'testC'; valid splits: train, val, testA"
  elif problem == "missing_refs":
    refs = str(tmp_path / "nothing.p")
    expect = f"{refs}: cannot read"
  argv = ["refcoco", "--refs", refs, "--images", str(tiny / "train2014"), "--out",
          str(tmp_path / "out"), *args] + ([] if problem == "no_instances" else
                                           ["--instances", str(instances)])
  if problem == "no_instances":
    expect = "--refs needs --instances"
  assert build.main(argv + (["--strict"] if strict else [])) == 1
  err = capsys.readouterr().err
  assert "build stopped: " in err and expect in err, err
  assert not (tmp_path / "ran").exists()
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_build_cli_unsafe_pickle_exit_status(tiny, tmp_path):
  marker = tmp_path / "ran"
  refs = tmp_path / "refs(unc).p"
  refs.write_bytes(pickle.dumps([RunsCommand(marker)], protocol=2))
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
      [sys.executable, "-m", "pixel_llm.data.build", "refcoco", "--refs", str(refs),
       "--instances", str(tiny / "instances.json"), "--images", str(tiny / "train2014"),
       "--out", str(tmp_path / "out")],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert proc.returncode == 1
  assert f"{refs}: unsafe pickle refused" in proc.stderr and "posix.system" in proc.stderr
  assert not marker.exists()


# -- MDETR json -----------------------------------------------------------------------------------

MDETR = {
    "images": [
        {"file_name": "COCO_train2014_000000000001.jpg", "height": 40, "width": 80, "id": 0,
         "original_id": 1, "caption": "the two boxes", "dataset_name": "refcoco",
         "tokens_negative": [[0, 3]]},
        {"file_name": "COCO_train2014_000000000001.jpg", "height": 40, "width": 80, "id": 1,
         "original_id": 1, "caption": "boxes on the left", "dataset_name": "refcoco",
         "tokens_negative": [[0, 5]]},
        {"file_name": "COCO_train2014_000000000002.jpg", "height": 60, "width": 30, "id": 2,
         "original_id": 2, "caption": "the lower part", "dataset_name": "refcoco",
         "tokens_negative": []},
        {"file_name": "COCO_train2014_000000000002.jpg", "height": 60, "width": 30, "id": 3,
         "original_id": 2, "caption": " ", "dataset_name": "refcoco", "tokens_negative": []},
    ],
    "annotations": [
        {"area": 256.0, "iscrowd": 0, "image_id": 0, "category_id": 1, "id": 0,
         "bbox": [8, 4, 40, 20], "original_id": 10, "tokens_positive": [[4, 13]],
         "segmentation": POLYGONS},
        {"area": 256.0, "iscrowd": 0, "image_id": 1, "category_id": 1, "id": 1,
         "bbox": [8, 4, 40, 20], "original_id": 10, "tokens_positive": [[0, 5]],
         "segmentation": POLYGONS},
        {"area": 1500.0, "iscrowd": 0, "image_id": 2, "category_id": 1, "id": 2,
         "bbox": [0, 10, 30, 50], "original_id": 12, "tokens_positive": [[4, 9]]},
        {"area": 1500.0, "iscrowd": 0, "image_id": 3, "category_id": 1, "id": 3,
         "bbox": [0, 10, 30, 50], "original_id": 12, "tokens_positive": [[0, 1]]},
    ],
    "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
}


def test_mdetr_groups_expressions_per_object(tiny, tmp_path, capsys):
  path = tmp_path / "finetune_refcoco_val.json"
  path.write_text(json.dumps(MDETR))
  items = list(refcoco.read_mdetr(str(path), "val"))
  problems = [i for i in items if isinstance(i, refcoco.Problem)]
  recs = [i for i in items if isinstance(i, refcoco.RefRecord)]
  assert [(p.where, p.kind) for p in problems] == [(f"{path}:images[3]", "empty_expression")]
  assert [(r.image_id, r.ann_id, r.sents, r.sent_ids) for r in recs] == [
      (1, 10, ["the two boxes", "boxes on the left"], [0, 1]), (2, 12, ["the lower part"], [2])]
  assert recs[1].mask is None
  out = tmp_path / "out"
  assert build.main(["refcoco", "--mdetr", str(path), "--images", str(tiny / "train2014"),
                     "--out", str(out), "--split", "val"]) == 0
  assert "  empty_expression: 1 record(s)" in capsys.readouterr().out
  examples = _parse(out, "val")
  assert [e["expression/sent"].tolist() for e in examples] == [
      [b"the two boxes", b"boxes on the left"], [b"the lower part"]]
  assert examples[0]["ref/id"] == -1 and examples[1]["mask"] == b""
  np.testing.assert_array_equal(_png_mask(examples[0]["mask"]),
                                refcoco.decode_segmentation(POLYGONS, 40, 80))


# -- the synthetic world --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  examples = []
  synthetic.generate(str(root), 12, SEED, on_example=examples.append, write_vocab=False)
  synthetic.generate(str(root), 9, SEED, split="val", on_example=examples.append)
  info = synthetic_formats.write_refcoco(str(root), examples, SEED)
  return root, examples, info


REF_KEYS = {"ref_id", "ann_id", "category_id", "image_id", "split", "file_name", "sent_ids",
            "sentences"}


def test_synthetic_files_are_in_the_format(world):
  root, examples, info = world
  with open(info["refs"], "rb") as f:
    refs = pickle.load(f)
  assert safe_pickle.load(info["refs"]) == refs and info["num_refs"] == len(refs)
  with open(info["instances"]) as f:
    instances = json.load(f)
  assert set(instances) >= {"images", "annotations", "categories"}
  anns = {a["id"]: a for a in instances["annotations"]}
  assert len(anns) == info["num_annotations"] == sum(len(e.objects) for e in examples)
  kinds = Counter()
  for r in refs:
    assert set(r) == REF_KEYS
    assert r["split"] in ({"train"} if r["image_id"] < synthetic.VAL_START_ID else
                          {"val", "testA", "testB"})
    assert 1 <= len(r["sentences"]) <= 3 and r["sent_ids"] == [s["sent_id"] for s in r["sentences"]]
    for s in r["sentences"]:
      assert set(s) == {"raw", "sent", "sent_id", "tokens"} and s["tokens"] == s["sent"].split()
      assert s["sent"] == s["raw"].lower()
    a = anns[r["ann_id"]]
    assert a["image_id"] == r["image_id"] and a["category_id"] == r["category_id"]
    seg = a["segmentation"]
    kinds["polygon" if isinstance(seg, list) else type(seg["counts"]).__name__] += 1
  assert set(kinds) == {"polygon", "str", "list"}, kinds
  assert len({r["ref_id"] for r in refs}) == len(refs)
  assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}
  sent_ids = [s["sent_id"] for r in refs for s in r["sentences"]]
  assert len(set(sent_ids)) == len(sent_ids)


def test_synthetic_masks_follow_the_rendered_shapes(world):
  root, examples, info = world
  with open(info["instances"]) as f:
    anns = {a["id"]: a for a in json.load(f)["annotations"]}
  ious = []
  for ex in examples:
    masks, occluded = synthetic_formats.visible_masks(ex.objects, 128)
    for k, o in enumerate(ex.objects):
      a = anns[ex.image_id * 10 + k]
      mask = refcoco.decode_segmentation(a["segmentation"], 128, 128)
      ious.append((mask & masks[k]).sum() / (mask | masks[k]).sum())
      x, y, w, h = a["bbox"]
      np.testing.assert_allclose([x, y, x + w, y + h], np.array(o.box) * 128, atol=2.0)
      if isinstance(a["segmentation"], dict):
        np.testing.assert_array_equal(mask, masks[k])  # RLE: exactly the visible mask
        assert a["area"] == mask.sum()
  assert min(ious) > 0.75 and np.mean(ious) > 0.9


RELATIONS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1),
             "below": (1, 1)}
EXTREMES = {"on the left": (0, -1), "on the right": (0, 1), "at the top": (1, -1),
            "at the bottom": (1, 1)}


def _named(phrase: str) -> set[str]:
  """Attributes a noun phrase ("small red shape", "circle") names."""
  return set(phrase.split()) - {"the", "shape"}


def _resolve(text: str, objects) -> list[int]:
  """Indices of the objects an expression can mean, read independently of the generator: the
  named attributes must match; "X on the left" is the leftmost X; "X left of Y" is every X (not
  Y) whose centre lies left of the one object Y names."""
  def having(named):
    return [i for i, o in enumerate(objects) if named <= {o.color, o.shape, o.size}]
  for rel, (axis, sign) in RELATIONS.items():
    if f" {rel} the " in text:
      head, anchor = text.split(f" {rel} the ")
      (j,) = having(_named(anchor))  # the anchor itself must be unambiguous
      return [i for i in having(_named(head)) if i != j and
              sign * (objects[i].center[axis] - objects[j].center[axis]) > 0]
  for ext, (axis, sign) in EXTREMES.items():
    if text.endswith(ext):
      group = having(_named(text.removesuffix(ext)))
      best = max(sign * objects[i].center[axis] for i in group)
      return [i for i in group if sign * objects[i].center[axis] == best]
  return having(_named(text))


def test_synthetic_expressions_are_unique_and_true(world):
  root, examples, info = world
  by_id = {e.image_id: e for e in examples}
  kinds = Counter()
  for r in safe_pickle.load(info["refs"]):
    objects = by_id[r["image_id"]].objects
    for s in r["sentences"]:
      text = s["sent"].removeprefix("the ")
      assert _resolve(text, objects) == [r["ann_id"] % 10], (text, objects)
      kinds["relation" if any(f" {k} the " in text for k in RELATIONS) else
            "extreme" if any(text.endswith(k) for k in EXTREMES) else "attributes"] += 1
  assert set(kinds) == {"relation", "extreme", "attributes"}, kinds


def test_synthetic_build_end_to_end(world, tmp_path):
  root, examples, info = world
  refs = safe_pickle.load(info["refs"])
  images = [str(root / "images" / "train2017"), str(root / "images" / "val2017")]
  with open(info["instances"]) as f:
    anns = {a["id"]: a for a in json.load(f)["annotations"]}
  for split in ("train", "testA"):
    out = tmp_path / split
    assert build.main(["refcoco", "--refs", info["refs"], "--instances", info["instances"],
                       "--images", *images, "--out", str(out), "--split", split,
                       "--strict"]) == 0
    examples_out = _parse(out, split)
    want = [r for r in refs if r["split"] == split]
    assert len(examples_out) == len(want) > 0
    for e, r in zip(examples_out, want):
      a = anns[r["ann_id"]]
      x, y, w, h = a["bbox"]
      np.testing.assert_allclose(e["box"], np.array([x, y, x + w, y + h]) / 128, atol=1e-6)
      np.testing.assert_array_equal(_png_mask(e["mask"]),
                                    refcoco.decode_segmentation(a["segmentation"], 128, 128))
      assert e["expression/sent"].tolist() == [s["sent"].encode() for s in r["sentences"]]
      assert (e["ref/id"], e["split"], int(e["image/id"])) == (r["ref_id"], split.encode(),
                                                                r["image_id"])
      folder = "train2017" if r["image_id"] < synthetic.VAL_START_ID else "val2017"
      assert e["image/encoded"] == (root / "images" / folder /
                                    f"{r['image_id']:012d}.jpg").read_bytes()


def test_synthetic_cli_formats_keep_ln_unchanged(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  outs = {}
  for name, extra in (("plain", []), ("formats", ["--formats", "ln,refcoco,coco_captions"])):
    out = tmp_path / name
    subprocess.run([sys.executable, "-m", "pixel_llm.data.synthetic", "--out", str(out),
                    "--num_images", "4", "--seed", "3", "--split", "both", "--val_images", "3",
                    *extra], check=True, env=env, cwd=REPO, capture_output=True, timeout=120)
    outs[name] = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
  plain, formats = outs["plain"], outs["formats"]
  assert {k: formats[k] for k in plain} == plain  # LN, images and vocabulary: the same bytes
  assert sorted(set(formats) - set(plain)) == [
      "annotations/captions_train2017.json", "annotations/captions_val2017.json",
      "annotations/dataset_coco.json", "refcoco/instances.json", "refcoco/refs(unc).p"]
  examples = [synthetic.make_example(3, i) for i in range(1, 5)]
  examples += [synthetic.make_example(3, synthetic.VAL_START_ID + i, "val") for i in range(3)]
  again = tmp_path / "again"
  synthetic_formats.write_refcoco(str(again), examples, 3)
  assert (again / "refcoco" / "refs(unc).p").read_bytes() == formats["refcoco/refs(unc).p"]
  assert (again / "refcoco" / "instances.json").read_bytes() == formats["refcoco/instances.json"]
  proc = subprocess.run([sys.executable, "-m", "pixel_llm.data.synthetic", "--out",
                         str(tmp_path / "bad"), "--num_images", "1", "--formats", "ln,coco"],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "unknown --formats ['coco']" in proc.stderr
