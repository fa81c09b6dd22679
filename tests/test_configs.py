"""Every config file imports and builds for each documented variant, with no placeholder paths."""
import importlib.util
import pathlib

import pytest

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
VARIANTS = {"ln.py": [None, "toy", "t5=base", "sam=vit_b,eva02=B", "extractor=paper"],
            "webli.py": [None, "toy", "t5=base"],
            "refcoco.py": [None, "toy", "dataset=refcocog", "dataset=refcoco+,toy", "toy,place"],
            "refcoco_seg.py": [None, "toy", "toy,place"],
            "loc_caption.py": [None, "toy", "dataset=refcocog"],
            "vg_densecap.py": [None, "toy"]}


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in VARIANTS.items() for a in args])
def test_config_builds(name, arg):
  config = _load(CONFIG_DIR / name).get_config(arg)
  for field in ("total_steps", "batch_size", "learning_rate", "checkpoint_every_steps",
                "eval_every_steps", "log_every_steps", "seed"):
    assert field in config, field
  assert "/path/to" not in str(config)


def test_every_config_file_is_covered():
  files = {p.name for p in CONFIG_DIR.glob("*.py")} - {"__init__.py", "common.py"}
  assert files == set(VARIANTS)


def test_bad_config_argument_is_an_error():
  with pytest.raises(ValueError, match="Unknown config argument"):
    _load(CONFIG_DIR / "ln.py").get_config("tyo")


def test_referring_place_variant_turns_on_the_place_deviations():
  refcoco = _load(CONFIG_DIR / "refcoco.py")
  plain, place = refcoco.get_config("toy"), refcoco.get_config("toy,place")
  assert not plain.model.prompt_extractor.place_logits and plain.loss.place_weight == 0.0
  assert place.model.prompt_extractor.text_conditioned and place.model.prompt_extractor.place_logits
  assert place.loss.place_weight == 10.0
  assert place.name == plain.name  # the same task and data
