"""The Python API (`pixel_llm.load`) and the infer binary on a tiny hermetic workdir: random weights
saved in the trainer's checkpoint layout, its config.json and a tiny SentencePiece vocabulary."""
import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

import pixel_llm
from configs import ln
from pixel_llm import infer
from pixel_llm import workdir as layout
from pixel_llm.data import vocab as vocab_lib
from pixel_llm.models import build
from pixel_llm.models import checkpoint_io
from random_weights import random_params  # tests/random_weights.py

SENTENCES = ["a red ball on the grass", "a blue square next to a green circle",
             "the small red ball is left of the big blue box", "describe the image in detail"]


def _config(root: str):
  config = ln.get_config("toy")
  config.model.image_size = 64
  # One layer per tower keeps the compiles (most of this file's time) short.
  config.model.t5.num_layers = config.model.t5.num_decoder_layers = 1
  config.model.eva02.depth = config.model.prompt_extractor.depth = 1
  config.model.sam.update(depth=1, global_attn_indexes=(0,))
  config.model.location_head.depth = 1
  config.input.max_target_len = 6
  config.input.max_context_len = 5
  config.data.update(root=root, image_size=64)
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """WORKDIR/config.json + checkpoints/7/ as the trainer writes them; the vocabulary lives where
  the synthetic pipeline keeps it (config.data.root/spiece.model)."""
  base = tmp_path_factory.mktemp("infer")
  world = base / "world"
  world.mkdir()
  vocab_lib.train_spm(SENTENCES * 3, str(world / "spiece"), vocab_size=60)
  config = _config(str(world))
  work = base / "work"
  work.mkdir()
  with open(work / "config.json", "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  params = random_params(nn.meta.unbox(build.abstract_params(config)))
  state = {"params": params, "opt_state": {"mu": np.ones(3, np.float32)},
           "step": np.asarray(7, np.int32)}
  manager = ocp.CheckpointManager(str(work / "checkpoints"),
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(7, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  return str(work)


@pytest.fixture(scope="module")
def model(workdir):
  return pixel_llm.load(workdir, batch_size=2)


def _images(tmp_path):
  rng = np.random.RandomState(3)
  wide = rng.randint(0, 256, (40, 90, 3), np.uint8)  # landscape: padded at the bottom
  tall = rng.randint(0, 256, (120, 50, 3), np.uint8)  # portrait, larger than the model's 64 px
  paths = [str(tmp_path / "wide.png"), str(tmp_path / "tall.jpg")]
  Image.fromarray(wide).save(paths[0])
  Image.fromarray(tall).save(paths[1])
  return [wide, tall], paths


def _assert_inside(result, w, h):
  assert result["words"], result
  for word in result["words"]:
    x0, y0, x1, y1 = word["box"]
    assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h, (word, w, h)
  assert np.isfinite(result["score"])


def test_load_restores_the_trainers_params(workdir, model):
  stored = random_params(nn.meta.unbox(build.abstract_params(model.config)))
  got = jax.tree.leaves(model.params)
  assert len(got) == len(jax.tree.leaves(stored))
  for a, b in zip(got, jax.tree.leaves(stored)):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert model.prompt == "Describe the image in detail."
  # A step folder and the checkpoints folder find the same checkpoint.
  assert pixel_llm.api._find_checkpoint(os.path.join(workdir, "checkpoints", "7"), None)[1] == \
      pixel_llm.api._find_checkpoint(workdir, None)[1]


def test_workdir_layout_locates_each_folder_of_a_workdir(tmp_path):
  w = tmp_path / "run"
  (w / "checkpoints" / "1500" / "state").mkdir(parents=True)
  assert layout.locate(str(w)) == (str(w), None, None)
  assert layout.locate(str(w / "checkpoints")) == (str(w), None, None)
  assert layout.locate(str(w / "checkpoints" / "1500")) == (str(w), 1500, None)
  assert layout.locate(str(w / "checkpoints" / "1500" / "state")) == (str(w), 1500, "state")
  # A numbered folder that is not a checkpoint step is a workdir of its own.
  assert layout.locate(str(tmp_path / "2026")) == (str(tmp_path / "2026"), None, None)


def test_caption_one_location_per_word_in_pixels_and_batch_equals_single(tmp_path, model):
  arrays, paths = _images(tmp_path)
  batch = model.caption(paths)
  assert isinstance(batch, list) and len(batch) == 2
  for result, a in zip(batch, arrays):
    _assert_inside(result, a.shape[1], a.shape[0])
    assert result["text"] == " ".join(w["word"] for w in result["words"])
  one = [model.caption(p) for p in paths]
  for a, b in zip(batch, one):
    assert a["text"] == b["text"]
    np.testing.assert_allclose([w["box"] for w in a["words"]], [w["box"] for w in b["words"]],
                               atol=1e-3)
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-4)
  # A path, a PIL image and the uint8 array are the same input (the PNG is lossless).
  assert model.caption(Image.open(paths[0]))["text"] == batch[0]["text"]
  assert model.caption(arrays[0])["text"] == batch[0]["text"]


def test_box_and_point_prompts(tmp_path, model):
  arrays, paths = _images(tmp_path)
  boxed = model.caption(paths[1], box=(5, 10, 40, 100))
  pointed = model.caption(paths[1], point=(20.0, 60.0))
  for result in (boxed, pointed):
    _assert_inside(result, 50, 120)
  # A different box is a different prompt.
  other = model.caption(paths[1], box=(0, 0, 10, 10))
  assert other["score"] != boxed["score"] or other["text"] != boxed["text"]


def test_locate_returns_a_box_inside_the_image(tmp_path, model):
  arrays, paths = _images(tmp_path)
  got = model.locate(paths[0], "the red ball")
  assert set(got) == {"box"}  # one dict, whichever options
  box = got["box"]
  assert len(box) == 4
  x0, y0, x1, y1 = box
  assert 0 <= x0 <= x1 <= 90 and 0 <= y0 <= y1 <= 40
  # The location is read at the query's last token: another query moves it.
  assert not np.allclose(box, model.locate(paths[0], "a blue square")["box"])
  # Generated expression (tests/test_referring.py checks the read-out position): a box in the
  # image and the words written.
  got = model.locate(paths[0], "the red ball", generate=True)
  assert set(got) == {"box", "expression"} and isinstance(got["expression"], str)
  x0, y0, x1, y1 = got["box"]
  assert 0 <= x0 <= x1 <= 90 and 0 <= y0 <= y1 <= 40
  with pytest.raises(ValueError, match="one of mask / generate"):
    model.locate(paths[0], "the red ball", mask=True, generate=True)


def test_bad_inputs_are_clear_errors(tmp_path, model):
  _, paths = _images(tmp_path)
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png")
  with pytest.raises(ValueError, match="broken.png"):
    model.caption(str(broken))
  with pytest.raises(ValueError, match="outside image"):
    model.caption(paths[0], box=(0, 0, 91, 10))
  with pytest.raises(ValueError, match="inverted"):
    model.caption(paths[0], box=(30, 0, 10, 10))
  with pytest.raises(ValueError, match="outside image"):
    model.caption(paths[0], point=(-1, 5))
  with pytest.raises(ValueError, match="non-empty query"):
    model.locate(paths[0], "  ")
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    model.caption(np.full((8, 8, 3), 255.0))


def test_checkpoint_of_another_config_names_the_parameters(tmp_path, workdir):
  other = tmp_path / "other"
  shutil.copytree(workdir, other)
  with open(other / "config.json") as f:
    config = json.load(f)
  config["model"]["t5"]["d_ff"] = 48
  with open(other / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(checkpoint_io.CheckpointMismatchError, match=r"mis-shaped.*wi"):
    pixel_llm.load(str(other))
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 3"):
    pixel_llm.load(workdir, step=3)


def test_infer_cli_writes_jsonl_and_pngs(tmp_path, workdir, model, capsys):
  _, paths = _images(tmp_path)
  out = tmp_path / "out"
  glob_ = str(tmp_path / "*.*")
  assert infer.main([f"--checkpoint={workdir}", f"--images={glob_}", f"--out={out}"]) == 0
  lines = [json.loads(l) for l in open(out / "predictions.jsonl")]
  assert sorted(l["image"] for l in lines) == sorted(paths)
  expected = {p: model.caption(p) for p in paths}
  for line in lines:
    assert line["text"] == expected[line["image"]]["text"]
    assert len(line["words"]) == len(line["text"].split()) and all("box" in w for w in line["words"])
  assert sorted(os.listdir(out)) == ["predictions.jsonl", "tall.png", "wide.png"]
  assert np.asarray(Image.open(out / "wide.png")).std() > 10

  # --query: one box per image.
  q = tmp_path / "q"
  assert infer.main([f"--checkpoint={workdir}", f"--images={paths[0]}", f"--out={q}",
                     "--query=the red ball"]) == 0
  (line,) = [json.loads(l) for l in open(q / "predictions.jsonl")]
  np.testing.assert_allclose(line["box"], model.locate(paths[0], "the red ball")["box"],
                             atol=1e-3)

  # A bad image is reported and skipped, the others are written, exit 1.
  (tmp_path / "zz_broken.png").write_bytes(b"junk")
  bad = tmp_path / "bad"
  capsys.readouterr()
  assert infer.main([f"--checkpoint={workdir}", f"--images={glob_}", f"--out={bad}",
                     "--box=0,0,45,38"]) == 1
  assert "zz_broken.png" in capsys.readouterr().err
  lines = [json.loads(l) for l in open(bad / "predictions.jsonl")]
  assert sorted(l["image"] for l in lines) == sorted(paths)
  assert all(l["prompt"] == {"box": [0.0, 0.0, 45.0, 38.0]} for l in lines)
  assert not (bad / "zz_broken.png").exists()

  # Box outside an image; empty query; no match; bad flag: messages and non-zero exits.
  capsys.readouterr()
  assert infer.main([f"--checkpoint={workdir}", f"--images={paths[1]}", f"--out={tmp_path / 'o'}",
                     "--box=0,0,60,10"]) == 1
  assert "outside image" in capsys.readouterr().err
  assert not (tmp_path / "o" / "tall.png").exists()
  assert infer.main([f"--checkpoint={workdir}", f"--images={paths[1]}", "--out=x",
                     "--query= "]) == 2
  assert infer.main([f"--checkpoint={workdir}", "--images=/nonexistent/*.png", "--out=x"]) == 2
  assert infer.main([f"--checkpoint={workdir}", f"--images={paths[1]}", "--out=x",
                     "--box=1,2,3"]) == 2
  assert infer.main([f"--checkpoint={tmp_path / 'nope'}", f"--images={paths[1]}",
                     "--out=x"]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert not os.path.exists("x")
