"""The downstream tasks in the Python API and the infer binary (`pixel_llm/api_tasks.py`): referring
segmentation (`locate(mask=True)`), location-conditioned captioning (`describe`) and dense
captioning (`dense_caption`), their pictures, and the errors of a checkpoint without the head a
task needs. Tiny hermetic workdirs: random weights of configs/refcoco_seg.py's and
configs/vg_densecap.py's toys in the trainer's checkpoint layout, with a tiny vocabulary."""
import json

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

import pixel_llm
from configs import refcoco_seg
from configs import vg_densecap
from pixel_llm import api
from pixel_llm import api_tasks
from pixel_llm import infer
from pixel_llm import visualize
from pixel_llm.data import vocab as vocab_lib
from pixel_llm.model import PixelLLMModel
from pixel_llm.models import build
from random_weights import random_params  # tests/random_weights.py
from tiny_train_config import shallow  # tests/tiny_train_config.py

SENTENCES = ["a red ball on the grass", "a blue square next to a green circle",
             "describe the region", "the small red ball is left of the big blue box"]
H, W = 50, 80  # the original image: landscape, so preprocessing pads 24 rows at the bottom


def _shrink(config):
  config = shallow(config)
  config.model.image_size = 64
  config.model.location_head.depth = 1
  config.input.update(max_target_len=6, max_context_len=5)
  config.data.image_size = 64
  return config


def _workdir(base, config, seed: int) -> str:
  """WORKDIR/config.json + spiece.model + checkpoints/3/ as the trainer writes them."""
  base.mkdir()
  vocab_lib.train_spm(SENTENCES * 3, str(base / "spiece"), vocab_size=60)
  with open(base / "config.json", "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  params = random_params(nn.meta.unbox(build.abstract_params(config)), seed)
  manager = ocp.CheckpointManager(str(base / "checkpoints"),
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(3, args=ocp.args.StandardSave({"params": params, "step": np.asarray(3)}))
  manager.wait_until_finished()
  return str(base)


@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory):
  return _workdir(tmp_path_factory.mktemp("seg") / "work", _shrink(refcoco_seg.get_config("toy")),
                  seed=1)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
  return _workdir(tmp_path_factory.mktemp("dense") / "work",
                  _shrink(vg_densecap.get_config("toy")), seed=2)


@pytest.fixture(scope="module")
def seg(seg_dir):
  return pixel_llm.load(seg_dir)


@pytest.fixture(scope="module")
def dense(dense_dir):
  return pixel_llm.load(dense_dir)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
  rng = np.random.RandomState(5)
  pixels = rng.randint(0, 256, (H, W, 3), np.uint8)
  pixels[10:35, 20:50] = (220, 30, 30)  # a red block, so the picture has something to show
  path = str(tmp_path_factory.mktemp("images") / "scene.png")
  Image.fromarray(pixels).save(path)
  return path


def _inside(box, w=W, h=H):
  x0, y0, x1, y1 = box
  return 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h


def test_mask_to_original_undoes_resize_and_pad():
  im = api._Image(np.zeros((H, W, 3), np.uint8), 64, "x")
  assert (im.nh, im.nw) == (40, 64)
  logits = np.full((64, 64), -1.0, np.float32)
  logits[:40, :32] = 1.0  # the left half of the content
  logits[40:] = 5.0  # padding rows: must be cropped away, not stretched into the image
  mask = api_tasks.mask_to_original(logits, im)
  assert mask.shape == (H, W)
  assert mask[:, :39].all() and not mask[:, 41:].any()  # the edge at 32 / 64 * 80 = 40 px


def test_locate_with_mask_is_the_segmentation_of_the_box_at_eos(seg, image_path):
  result = seg.locate(image_path, "the red ball", mask=True)
  assert result["mask"].shape == (H, W) and result["mask"].dtype == bool
  assert _inside(result["box"])
  # (That the box is the read-out at EOS which prompted SAM: the square-image test below.)
  # The refcoco "loc" prompt text is the expression itself, as the training task writes it.
  assert api_tasks.locate_prompt(seg.config, " the red ball ", None) == "the red ball"


def test_square_image_mask_equals_the_adapters_segment_batch(seg):
  # A 64 x 64 image is the padded square itself: no crop, no resize.
  pixels = np.random.RandomState(6).randint(0, 256, (64, 64, 3), np.uint8)
  query = "a blue square"
  result = seg.locate(pixels, query, mask=True)
  ids = seg.vocab.encode(query)
  tokens = np.zeros((1, 1, 6), np.int32)
  tokens[0, 0, 1:len(ids) + 1] = ids
  batch = {"image": pixels[None].astype(np.float32) / 255.0,
           "image_mask": np.ones((1, 64, 64), bool),
           "prompt_boxes": np.array([[[0.0, 0.0, 1.0, 1.0]]], np.float32),
           "prompt_text": seg.prompt_tokens(query)[None, None], "decoder_input_tokens": tokens}
  want = jax.jit(PixelLLMModel(seg.network).segment_batch)(seg.params, batch)
  np.testing.assert_array_equal(result["mask"], np.asarray(want["masks"])[0, 0])
  np.testing.assert_allclose(result["box"], np.asarray(want["boxes"])[0, 0] * 64, atol=1e-3)


def test_describe_is_caption_of_the_box_with_the_region_prompt(dense, image_path):
  got = dense.describe(image_path, (20, 10, 50, 35))
  want = dense.caption(image_path, box=(20, 10, 50, 35), prompt="Describe the region.")
  assert isinstance(got["text"], str) and got["text"] == want["text"]
  assert got["text"] == " ".join(w["word"] for w in got["words"])
  assert all(_inside(w["box"]) for w in got["words"])
  with pytest.raises(ValueError, match="outside image"):
    dense.describe(image_path, (0, 0, 81, 10))


def test_dense_caption_sorted_bounded_and_in_pixels(dense, image_path):
  results = dense.dense_caption(image_path, max_boxes=5)
  assert 1 <= len(results) <= 5
  scores = [r["score"] for r in results]
  assert scores == sorted(scores, reverse=True)
  for r in results:
    assert _inside(r["box"]) and r["box"][2] > r["box"][0] and r["box"][3] > r["box"][1]
    assert isinstance(r["text"], str)
  # The detector's boxes mapped by hand: [0, 1] of the 64 px square -> x * 80, y * 64 * 50 / 40
  # (the content is 64 x 40), clipped to the image; those left empty (in the padding) dropped.
  im = api._Image(image_path, 64, "x")
  detect = jax.jit(lambda p, x, m: dense.network.apply({"params": p}, x, m, num_boxes=5,
                                                       method=dense.network.detect))
  boxes, top, valid = (np.asarray(a)[0] for a in detect(
      dense.params, im.pixels[None].astype(np.float32) / 255.0, im.mask[None]))
  want = []
  for n in np.argsort(-top, kind="stable"):
    x0, y0, x1, y1 = np.clip(boxes[n] * np.array([80, 80, 80, 80]), 0, [W, H, W, H])
    if valid[n] and x1 > x0 and y1 > y0:
      want.append(([x0, y0, x1, y1], top[n]))
  np.testing.assert_allclose([r["box"] for r in results], [b for b, _ in want], atol=1e-3)
  np.testing.assert_allclose(scores, [s for _, s in want], atol=1e-6)
  # min_score keeps exactly the results at or above it.
  cut = scores[len(scores) // 2]
  assert [r["score"] for r in dense.dense_caption(image_path, max_boxes=5, min_score=cut)] == \
      [s for s in scores if s >= cut]
  with pytest.raises(ValueError, match="max_boxes"):
    dense.dense_caption(image_path, max_boxes=0)


def test_missing_heads_are_clear_errors(seg, dense, image_path):
  with pytest.raises(ValueError, match=r"no mask decoder.*configs/refcoco_seg.py"):
    dense.locate(image_path, "the red ball", mask=True)
  with pytest.raises(ValueError, match=r"proposal head.*configs/vg_densecap.py"):
    seg.dense_caption(image_path)
  with pytest.raises(ValueError, match="needs a box"):
    seg.describe(image_path, None)


def test_pictures_show_the_results(tmp_path, image_path):
  pixels = np.asarray(Image.open(image_path))
  results = [{"box": [20.0, 10.0, 50.0, 35.0], "score": 0.9, "text": "a red block"},
             {"box": [0.0, 0.0, 80.0, 50.0], "score": 0.2, "text": "the whole scene"}]
  drawn = np.asarray(visualize.save_dense_caption_png(str(tmp_path / "d.png"), pixels, results))
  empty = np.asarray(visualize.render_dense_caption(pixels, results[:0]))
  assert np.asarray(Image.open(tmp_path / "d.png")).std() > 10
  scale = 512 // W  # 6: the image is shown at about 512 px
  # The first box's outline is drawn in the first palette colour at its scaled corner.
  assert tuple(drawn[10 * scale, 35 * scale]) == visualize.PALETTE[0]
  assert drawn.shape[0] > empty.shape[0]  # one caption line per box below the image
  mask = np.zeros((H, W), bool)
  mask[10:35, 20:50] = True
  shown = np.asarray(visualize.save_mask_png(str(tmp_path / "m.png"), pixels, [20, 10, 50, 35],
                                             mask, "the red block"))
  assert np.asarray(Image.open(tmp_path / "m.png")).std() > 10
  # Inside the mask, away from its outline: the image blended half-way with the mask colour;
  # outside it the image itself (no title: the picture starts at the top).
  plain = np.asarray(visualize.render_mask(pixels, [20, 10, 50, 35], mask))
  assert shown.shape[0] > plain.shape[0]  # the title line
  want = (0.5 * pixels[20, 30] + 0.5 * np.array(visualize.PALETTE[0], np.float32)).astype(np.uint8)
  np.testing.assert_array_equal(plain[20 * scale, 30 * scale], want)
  np.testing.assert_array_equal(plain[45 * scale, 5 * scale], pixels[45, 5])
  with pytest.raises(ValueError, match="does not match"):
    visualize.render_mask(pixels, None, mask[:10])


def test_infer_runs_each_task(tmp_path, seg_dir, dense_dir, seg, dense, image_path, capsys):
  def run(workdir, out, *flags):
    return infer.main([f"--checkpoint={workdir}", f"--images={image_path}",
                       f"--out={tmp_path / out}", *flags])

  assert run(seg_dir, "loc", "--task=locate", "--query=the red ball", "--mask") == 0
  (line,) = [json.loads(l) for l in open(tmp_path / "loc" / "predictions.jsonl")]
  want = seg.locate(image_path, "the red ball", mask=True)
  np.testing.assert_allclose(line["box"], want["box"], atol=1e-3)
  saved = np.asarray(Image.open(tmp_path / "loc" / line["mask"])) > 0
  np.testing.assert_array_equal(saved, want["mask"])
  assert line["mask_area"] == int(want["mask"].sum())
  assert np.asarray(Image.open(tmp_path / "loc" / "scene.png")).std() > 10

  assert run(seg_dir, "gen", "--query=the red ball", "--generate_expression") == 0
  (line,) = [json.loads(l) for l in open(tmp_path / "gen" / "predictions.jsonl")]
  want = seg.locate(image_path, "the red ball", generate=True)
  np.testing.assert_allclose(line["box"], want["box"], atol=1e-3)
  assert line["expression"] == want["expression"]

  assert run(dense_dir, "dense", "--task=dense_caption", "--max_boxes=5") == 0
  (line,) = [json.loads(l) for l in open(tmp_path / "dense" / "predictions.jsonl")]
  assert line["regions"] == json.loads(json.dumps(dense.dense_caption(image_path, max_boxes=5)))
  assert np.asarray(Image.open(tmp_path / "dense" / "scene.png")).std() > 10

  assert run(dense_dir, "desc", "--task=describe", "--box=20,10,50,35") == 0
  (line,) = [json.loads(l) for l in open(tmp_path / "desc" / "predictions.jsonl")]
  assert line["text"] == dense.describe(image_path, (20, 10, 50, 35))["text"]
  assert line["prompt"] == {"box": [20.0, 10.0, 50.0, 35.0]}

  # Usage errors (exit 2, a message, nothing written).
  capsys.readouterr()
  assert run(seg_dir, "e1", "--task=dense_caption") == 2
  assert "configs/vg_densecap.py" in capsys.readouterr().err
  assert run(dense_dir, "e2", "--query=the red ball", "--mask") == 2
  assert "configs/refcoco_seg.py" in capsys.readouterr().err
  assert run(seg_dir, "e3", "--task=locate") == 2
  assert "needs --query" in capsys.readouterr().err
  assert run(seg_dir, "e4", "--task=describe") == 2
  assert "needs --box" in capsys.readouterr().err
  assert run(seg_dir, "e5", "--mask") == 2
  assert "--mask is for --task=locate" in capsys.readouterr().err
  assert run(dense_dir, "e6", "--task=dense_caption", "--max_boxes=0") == 2
  assert not any((tmp_path / f"e{i}").exists() for i in range(1, 7))
