"""Referring localization and segmentation end to end: configs/refcoco_seg.py's toy (the referring
config plus SAM's mask decoder and the gated mask adapter) on a tiny synthetic world (refs and
polygon masks in the official RefCOCO format -> build -> seqio "loc" task -> train with box and
mask losses -> the referring evaluator's P@0.5 and cIoU), and the adapter's box-at-EOS read-out on
a stub network."""
import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import refcoco_seg
from pixel_llm import metrics
from pixel_llm import train
from pixel_llm.model import PixelLLMModel
from tiny_train_config import shallow  # tests/tiny_train_config.py


def _benchmark(name: str):
  """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class _StubNetwork:
  """points[b, r, t] = (t, 10 t) for both points: the read-out position is visible in the value."""
  image_size = 64

  def apply(self, variables, image, tokens, **kwargs):
    del variables, image, kwargs
    b, r, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.float32)[None, None, :], (b, r, t))
    xy = jnp.stack([pos, 10 * pos], -1)[..., None, :]
    return {"points": jnp.repeat(xy, 2, axis=-2), "logits": jnp.zeros((b, r, t, 5))}, {}


def test_locate_batch_reads_the_position_that_predicts_eos():
  # Targets: expression tokens then EOS (1) then padding; EOS is the last target token.
  targets = np.array([[[5, 6, 7, 1, 0, 0]], [[9, 1, 0, 0, 0, 0]]], np.int32)
  batch = {"image": np.zeros((2, 64, 64, 3), np.float32), "decoder_input_tokens": targets,
           "decoder_target_tokens": targets}
  points = np.asarray(PixelLLMModel(_StubNetwork()).locate_batch(None, batch))
  assert points.shape == (2, 1, 2, 2)
  np.testing.assert_array_equal(points[:, 0, 0], [[3.0, 30.0], [1.0, 10.0]])


def test_generated_expression_box_is_read_where_eos_is_emitted():
  """locate_generated_batch: the decoder writes the expression (greedy, KV cache) and the box is
  the one the teacher-forced read-out gives for that same expression."""
  import jax
  from configs import refcoco
  from pixel_llm.models import build

  c = refcoco.get_config("toy")
  c.model.image_size = 64
  network = build.build_network(c.model)
  model = PixelLLMModel(network)
  rng = np.random.default_rng(1)
  b, t = 3, 8
  batch = {"image": rng.random((b, 64, 64, 3), np.float32),
           "prompt_text": rng.integers(2, 100, (b, 1, 5)).astype(np.int32),
           "decoder_input_tokens": np.zeros((b, 1, t), np.int32)}
  params = jax.jit(model.init_variables)(jax.random.key(0), batch)["params"]
  # (A random network rarely emits EOS; the EOS rows are covered by the stub test below.)
  got = jax.jit(lambda p, x: model.locate_generated_batch(p, x, max_decode_len=t))(params, batch)
  tokens = np.asarray(got["tokens"])[:, 0]
  assert got["points"].shape == (b, 1, 2, 2) and tokens.shape == (b, t)
  for i in range(b):
    eos = np.flatnonzero(tokens[i] == 1)
    assert bool(got["eos_found"][i, 0]) == (eos.size > 0)
    expr = tokens[i, :eos[0]] if eos.size else tokens[i]
    n = len(expr)
    # Teacher forcing the generated expression: inputs [BOS, expr], targets [expr, EOS].
    tf = {"image": batch["image"][i:i + 1], "prompt_text": batch["prompt_text"][i:i + 1],
          "decoder_input_tokens": np.zeros((1, 1, t + 1), np.int32),
          "decoder_target_tokens": np.zeros((1, 1, t + 1), np.int32)}
    tf["decoder_input_tokens"][0, 0, 1:n + 1] = expr
    tf["decoder_target_tokens"][0, 0, :n] = expr
    tf["decoder_target_tokens"][0, 0, n] = 1
    want = np.asarray(jax.jit(model.locate_batch)(params, tf))[0, 0]
    if n == 0:
      continue  # EOS first: the read-out falls back to the first position (not teacher-forceable)
    np.testing.assert_allclose(np.asarray(got["points"])[i, 0], want, atol=2e-5)


def test_generated_expression_read_out_positions():
  tokens = np.array([[[5, 6, 1, 0]], [[7, 8, 9, 4]], [[1, 0, 0, 0]], [[7, 0, 9, 4]]], np.int32)
  points = np.broadcast_to(np.arange(4, dtype=np.float32)[None, None, :, None, None],
                           (4, 1, 4, 2, 2))
  model = PixelLLMModel(_StubNetwork())
  model.predict_batch = lambda params, batch, max_decode_len: {"tokens": tokens,
                                                               "points": points}
  got = model.locate_generated_batch(None, {}, max_decode_len=4)
  # Row 0: EOS at 2, read at token 6 (index 1); row 1: no EOS, read at the last token; row 2:
  # EOS first, read at index 0; row 3: a 0 emitted at index 1 ends the expression there.
  np.testing.assert_array_equal(np.asarray(got["points"])[:, 0, 0, 0], [1.0, 3.0, 0.0, 0.0])
  np.testing.assert_array_equal(np.asarray(got["eos_found"])[:, 0], [True, False, True, False])


def test_target_box_prompts_the_mask_decoder_in_training():
  """loss.mask_train_box="target": in training SAM is prompted with the referred GT box (the 2
  target points at the weighted token, corners ordered), moved by at most 20 px with noise;
  evaluation keeps the predicted box; a network without the EOS box refuses the option."""
  import jax
  from pixel_llm import model as model_lib

  targets = np.zeros((2, 1, 4, 2, 2), np.float32)
  weights = np.zeros((2, 1, 4), np.float32)
  targets[0, 0, 2] = [[0.55, 0.6], [0.45, 0.5]]  # corners given in the wrong order
  weights[0, 0, 2] = 1.0
  targets[1, 0, 0] = [[0.1, 0.1], [0.9, 0.5]]
  weights[1, 0, 0] = 1.0
  batch = {"point_targets": targets, "point_weights": weights}
  exact = np.asarray(model_lib._jittered_target_box(batch, 0.1, 64.0, None))
  np.testing.assert_allclose(exact[:, 0], [[0.45, 0.5, 0.55, 0.6], [0.1, 0.1, 0.9, 0.5]],
                             atol=1e-7)
  moved = np.stack([np.asarray(model_lib._jittered_target_box(batch, 0.1, 64.0,
                                                             jax.random.key(k)))
                    for k in range(20)])
  assert np.all(np.abs(moved - exact) <= 20 / 64 + 1e-6) and np.abs(moved - exact).max() > 0
  assert np.all(moved[..., 2:] >= moved[..., :2]) and np.all((moved >= 0) & (moved <= 1))
  # Noise scales with the box side: the small box moves less than the large one.
  small, large = (np.abs(moved - exact)[:, i, 0].mean() for i in (0, 1))
  assert small < large

  from pixel_llm.models import build
  c = refcoco_seg.get_config("toy")
  c.model.image_size = 64
  network = build.build_network(c.model)
  with pytest.raises(ValueError, match="segment_box='eos'"):
    PixelLLMModel(network.clone(segment_box="prompt"),
                  model_lib.LossConfig(mask_train_box="target"))
  with pytest.raises(ValueError, match="mask_train_box"):
    PixelLLMModel(network, model_lib.LossConfig(mask_train_box="gt"))
  tokens = np.array([[[0, 5, 6, 0]], [[0, 9, 0, 0]]], np.int32)
  full = {"image": np.random.default_rng(0).random((2, 64, 64, 3), np.float32),
          "decoder_input_tokens": tokens, "decoder_target_tokens": np.roll(tokens, -1, -1),
          "prompt_text": np.array([[[5, 6, 0, 0]], [[9, 0, 0, 0]]], np.int32),
          "prompt_boxes": np.tile(np.float32([0, 0, 1, 1]), (2, 1, 1)), **batch,
          "masks": np.ones((2, 1, 64, 64), np.uint8), "mask_weights": np.ones((2, 1), np.float32)}
  model = PixelLLMModel(network, model_lib.LossConfig(mask_train_box="target", mask_weight=1.0,
                                                      mask_box_noise=0.0))
  params = jax.jit(model.init_variables)(jax.random.key(0), full)["params"]
  apply = jax.jit(lambda p, b, train: model._apply(p, b, train=train, rng=jax.random.key(1)),
                  static_argnums=2)
  _, trained = apply(params, full, True)
  np.testing.assert_allclose(np.asarray(trained["mask_boxes"])[:, 0], exact[:, 0], atol=1e-6)
  _, evaluated = apply(params, full, False)  # evaluation: the box predicted at EOS
  assert np.abs(np.asarray(evaluated["mask_boxes"]) - exact[:, None]).max() > 1e-3


def test_refcoco_seg_toy_trains_and_evaluates(tmp_path):
  c = shallow(refcoco_seg.get_config("toy"))
  c.model.image_size = 64
  c.data.update(root=str(tmp_path / "world"), num_train_images=16, num_val_images=9,
                image_size=64, eval_batch_size=8)
  c.input.update(max_target_len=12, max_context_len=12)
  c.update(total_steps=4, batch_size=4, warmup_steps=1, log_every_steps=2,
           checkpoint_every_steps=4, eval_every_steps=1000)
  c.mesh = dict(data=4, fsdp=1, tensor=2)
  c.evals["refcoco_val_generated"] = {"kind": "referring", "split": "val",
                                      "expression": "generated"}
  workdir = str(tmp_path / "work")
  result = train.train_and_evaluate(c, workdir)

  # The refs were written in the official format and built with the real builder.
  assert (tmp_path / "world" / "refcoco_train" / "refcoco" / "refs(unc).p").exists()
  assert list((tmp_path / "world" / "tfrecords").glob("refcoco_val.tfrecord-*"))
  # Box and masks train; the caption loss is masked out for referring batches.
  lines = [json.loads(l) for l in open(os.path.join(workdir, "train_metrics.jsonl"))]
  assert all(l["caption_loss"] == 0.0 and l["point_loss"] > 0 and l["mask_loss"] > 0
             for l in lines)

  got = result["refcoco_val"]
  rows = [json.loads(l) for l in open(os.path.join(workdir, "eval",
                                                   "refcoco_val.predictions.jsonl"))]
  assert got["num_expressions"] == len(rows) > 0
  boxes = np.array([r["box"] for r in rows])
  gt = np.array([r["gt_box"] for r in rows])
  assert np.all(boxes[:, 2:] >= boxes[:, :2]) and np.all((gt >= 0) & (gt <= 1))
  # The evaluator's numbers are the metric functions of what it wrote (rounded to 5 digits).
  ious = metrics.paired_box_iou(boxes, gt)
  np.testing.assert_allclose([r["iou"] for r in rows], ious, atol=1e-4)
  np.testing.assert_allclose(got["mean_iou"], ious.mean(), atol=1e-4)
  assert got["precision_at_0.5"] == np.mean(ious > 0.5)
  # The generated-expression mode reads its own box and reports what it wrote.
  gen = [json.loads(l) for l in open(os.path.join(workdir, "eval",
                                                  "refcoco_val_generated.predictions.jsonl"))]
  assert len(gen) == len(rows) and all("generated" in r for r in gen)
  assert result["refcoco_val_generated"]["generated_exact_match"] == np.mean(
      [r["generated"].split() == r["expression"].split() for r in gen])
  # Every synthetic ref has a mask; cIoU and mean IoU are fractions of the valid pixels.
  assert got["num_masks"] == got["num_expressions"]
  assert 0.0 <= got["mask_ciou"] <= 1.0 and 0.0 <= got["mask_miou"] <= 1.0
  # Each row's mask pixel counts add up to the evaluator's cIoU and mean IoU.
  inter = np.array([r["mask_intersection"] for r in rows], np.float64)
  union = np.array([r["mask_union"] for r in rows], np.float64)
  assert np.all(inter <= union) and union.sum() > 0
  np.testing.assert_allclose(got["mask_ciou"], inter.sum() / union.sum(), rtol=1e-6)
  np.testing.assert_allclose(got["mask_miou"],
                             np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)),
                             rtol=1e-6)


def test_eos_box_prompts_sam_and_a_closed_gate_is_plain_sam():
  """The mask path of referring segmentation: SAM is prompted with the box predicted at EOS
  (no gradient into the box), and with the adapter's gate at 0 the masks equal SAM's for that box."""
  import jax
  from pixel_llm.models import build

  c = refcoco_seg.get_config("toy")
  c.model.image_size = 64
  c.input.update(max_target_len=6, max_context_len=4)
  network = build.build_network(c.model)
  model = PixelLLMModel(network)
  rng = np.random.default_rng(0)
  tokens = np.array([[[0, 5, 6, 7, 0, 0]], [[0, 9, 0, 0, 0, 0]]], np.int32)
  batch = {"image": rng.random((2, 64, 64, 3), np.float32), "decoder_input_tokens": tokens,
           "prompt_text": np.array([[[5, 6, 7, 0]], [[9, 0, 0, 0]]], np.int32),
           "prompt_boxes": np.tile(np.float32([0, 0, 1, 1]), (2, 1, 1))}
  # Jitted: op-by-op execution of the whole network is minutes on a loaded 2-core CPU.
  params = jax.jit(model.init_variables)(jax.random.key(0), batch)["params"]
  out, aux = jax.jit(lambda p, b: network.apply(
      {"params": p}, b["image"], b["decoder_input_tokens"], prompt_text=b["prompt_text"],
      prompt_boxes=b["prompt_boxes"]))(params, batch)
  points = np.asarray(out["points"])
  for i, n in enumerate((3, 1)):  # the input position of the expression's last token
    corners = points[i, 0, n]
    expected = np.clip(np.concatenate([corners.min(0), corners.max(0)]), 0, 1)
    np.testing.assert_allclose(np.asarray(aux["mask_boxes"])[i, 0], expected, atol=1e-6)
  assert np.all(np.asarray(params["mask_adapter"]["gate"].unbox()) == 0.0)

  # At gate 0 the adapter's inputs cannot matter: zeros instead of the real tokens and states
  # give bitwise the same masks (tests/test_mask_adapter.py: and those are plain SAM's).
  visual = np.asarray(aux["visual_tokens"]).reshape(2, -1, aux["visual_tokens"].shape[-1])
  hidden = np.asarray(aux["hidden"]).reshape(2, 6, -1)

  def sam_with_blank_adapter_inputs(m):
    _, sam = m.encode_image(batch["image"], return_sam=True)
    return m.predict_masks(sam, aux["mask_boxes"], (np.zeros_like(visual),
                                                    np.zeros_like(hidden), np.ones((2, 6), bool)))
  masks, iou = jax.jit(lambda p: network.apply({"params": p},
                                                method=sam_with_blank_adapter_inputs))(params)
  np.testing.assert_array_equal(np.asarray(masks), np.asarray(aux["masks"]))
  np.testing.assert_array_equal(np.asarray(iou), np.asarray(aux["iou_predictions"]))

  # The mask loss reaches the adapter's gate but not the box (stop-gradient at the EOS box).
  gt = np.zeros((2, 1, 64, 64), np.uint8)
  gt[:, :, 10:40, 12:30] = 1
  full = {**batch, "decoder_target_tokens": np.roll(tokens, -1, -1),
          "point_targets": np.zeros((2, 1, 6, 2, 2), np.float32),
          "point_weights": np.zeros((2, 1, 6), np.float32), "masks": gt,
          "mask_weights": np.ones((2, 1), np.float32)}
  seg_model = PixelLLMModel(network, dataclasses.replace(PixelLLMModel(network).loss_config,
                                                         mask_weight=1.0, caption_weight=0.0))
  grads = jax.jit(jax.grad(lambda p: seg_model.loss_fn(p, full, None, train=False)[0]))(
      jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                   is_leaf=lambda x: hasattr(x, "unbox")))
  assert np.abs(np.asarray(grads["mask_adapter"]["gate"])).max() > 0
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads["location_head"])) == 0.0


def test_joint_loc_loco_mixture_through_the_pipeline(tmp_path):
  """`data.refcoco_loco_rate`: referring localization batches mix with location-conditioned
  captioning of the same refs (each example with its own task mask); evaluation stays "loc"."""
  import pytest
  from configs import refcoco
  from pixel_llm.data import pipeline
  c = refcoco.get_config("toy")
  c.model.image_size = 64
  c.data.update(root=str(tmp_path / "world"), num_train_images=8, num_val_images=3,
                image_size=64, eval_batch_size=4, refcoco_loco_rate=1.0)
  c.input.update(max_target_len=12, max_context_len=12)
  c.batch_size = 8
  data = pipeline.prepare(c)
  batches = data.train_batches()
  by_kind = {"loc": [], "loco": []}
  for _ in range(4):
    b = next(batches)
    for i, task in enumerate(b["task"]):
      by_kind[task.decode().split("_")[1]].append({k: v[i] for k, v in b.items()})
  assert all(len(v) >= 4 for v in by_kind.values()), {k: len(v) for k, v in by_kind.items()}
  per_image = c.data.refcoco_expressions_per_image
  assert per_image > 1 and c.input.num_prompts == per_image
  for kind, examples in by_kind.items():
    for e in examples:  # up to `per_image` expressions of the image, each its own prompt
      real = e["caption"] != b""
      assert e["prompt_boxes"].shape == (per_image, 4) and 1 <= real.sum() <= per_image
      assert not e["point_weights"][~real].any() and not e["caption_weights"][~real].any()
      if kind == "loc":  # the expression is the prompt, the box at EOS
        np.testing.assert_allclose(e["prompt_boxes"], [[0, 0, 1, 1]] * per_image)
        assert not e["caption_weights"].any()
        np.testing.assert_array_equal(e["point_weights"][real].sum(-1), 1)
      else:  # the box is the prompt
        assert (e["prompt_boxes"][real] != [0, 0, 1, 1]).any(-1).all()
        assert e["caption_weights"][real].all() and not e["point_weights"].any()
  evals = next(data.eval_batches("val"))  # one expression per example
  assert {t.decode().split("_")[1] for t in evals["task"]} == {"loc"}
  assert evals["prompt_boxes"].shape[1] == 1 and (evals["caption"][:, 0] != b"").all()

  c.data.refcoco_kind = "loco"
  with pytest.raises(ValueError, match="needs refcoco_kind='loc'"):
    pipeline.prepare(c)


def test_loc_caption_refcocog_packs_expressions_of_an_image(tmp_path):
  """configs/loc_caption.py:dataset=refcocog: a train example is one image with up to
  num_prompts of its objects, each GT box prompting its expression; eval one per example."""
  from configs import loc_caption
  from pixel_llm.data import pipeline
  c = loc_caption.get_config("dataset=refcocog,toy")
  c.model.image_size = 64
  c.data.update(root=str(tmp_path / "world"), num_train_images=8, num_val_images=3,
                image_size=64, eval_batch_size=4)
  c.batch_size = 4
  data = pipeline.prepare(c)
  b = next(data.train_batches())
  k = c.input.num_prompts
  assert k > 1 and b["prompt_boxes"].shape == (4, k, 4)
  real = b["caption"] != b""
  assert (real.sum(1) > 1).any()  # several expressions share an image encoding
  assert (b["prompt_boxes"][real] != [0, 0, 1, 1]).any(-1).all()
  np.testing.assert_array_equal(b["caption_weights"].astype(bool), real)
  assert not b["point_weights"].any()
  evals = next(data.eval_batches("val"))
  assert evals["prompt_boxes"].shape[1] == 1 and (evals["caption"][:, 0] != b"").all()


def test_referring_breakdown_groups_expressions_by_kind(tmp_path, capsys):
  """benchmarks/referring_breakdown.py: each kind of synthetic expression lands in its group, and
  the figures are the rows' own."""
  import json
  breakdown = _benchmark("referring_breakdown")
  assert [breakdown.kind(e) for e in ("the red circle", "The circle on the left",
                                      "small shape to the left of the blue star",
                                      "the red shape at the top", "the ring below the square")] == [
      "attribute", "extreme", "relation", "extreme", "relation"]
  assert [breakdown.axis(e) for e in ("red circle", "circle on the right", "star above the ring")
          ] == ["-", "x", "y"]
  rows = [{"expression": "the red circle", "box": [0, 0, .5, .5], "gt_box": [0, 0, .5, .5],
           "iou": 1.0},
          {"expression": "the circle on the left", "box": [0, 0, .2, .2],
           "gt_box": [.4, .4, .6, .6], "iou": 0.0},
          # On the right object (centre inside the GT box), drawn too large.
          {"expression": "the large ring", "box": [.3, .3, .9, .9], "gt_box": [.5, .5, .7, .7],
           "iou": 0.04 / 0.36}]
  predictions = tmp_path / "p.jsonl"
  predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "b.json"
  assert breakdown.main([f"--predictions={predictions}", f"--out={out}"]) == 0
  groups = json.loads(out.read_text())["groups"]
  assert groups["all"]["precision_at_0.5"] == 1 / 3 and groups["attribute"]["n"] == 2
  assert groups["all"]["on_object"] == 2 / 3
  assert groups["all"]["precision_at_0.5_on_object"] == 0.5
  assert groups["extreme"]["on_object"] == 0.0
  assert groups["extreme"]["precision_at_0.5_on_object"] == 0.0
  assert groups["extreme"]["mean_iou"] == 0.0
  np.testing.assert_allclose(groups["extreme"]["centre_error_xy"], [0.4, 0.4])
  np.testing.assert_allclose(groups["extreme"]["size_error_wh"], [0.0, 0.0])
  assert "extreme/axis x" in capsys.readouterr().out



def test_referring_binding_assigns_boxes_to_objects_against_the_words(tmp_path):
  """benchmarks/referring_binding.py: on a regenerated val scene, a box on the referred object,
  on another object of the named colour, on one sharing no named word, and on no object land in
  their outcomes; chance is each outcome's share of the image's objects."""
  import json
  from pixel_llm.data import synthetic
  binding = _benchmark("referring_binding")
  for image_id in range(1_000_001, 1_000_200):  # a scene with a colour shared by two objects
    objects = synthetic.make_example(0, image_id, "val", 128).objects
    pairs = [(t, s) for t in objects for s in objects if s is not t and s.color == t.color]
    if pairs and len(objects) >= 3:
      target, same = pairs[0]
      if any(o.color != target.color for o in objects):
        break
  other = next(o for o in objects if o.color != target.color)
  box = lambda o: list(o.box)  # fractions of the image side
  row = lambda b: {"image_id": str(image_id), "expression": f"the {target.color} shape",
                   "box": b, "gt_box": box(target), "iou": 0.0}
  rows = [row(box(target)), row(box(same)), row(box(other)), row([0.0, 0.0, 1e-3, 1e-3])]
  rows[0]["iou"], rows[1]["iou"] = 0.9, 0.8  # the second is precise on the wrong object
  predictions = tmp_path / "p.jsonl"
  predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "b.json"
  assert binding.main([f"--predictions={predictions}", f"--out={out}"]) == 0
  got = json.loads(out.read_text())["groups"]["attribute"]
  assert got["n"] == 4 and all(got[o] == 0.25 for o in binding.OUTCOMES)
  assert got[binding.PRECISE] == 1.0  # of the boxes on the referred object, not of all
  n = len(objects)
  shares = sum(o.color == target.color for o in objects) - 1
  assert got["chance: referred object"] == round(1 / n, 3)
  assert got["chance: other, shares a word"] == round(shares / n, 3)
  assert got["chance: other, shares none"] == round((n - 1 - shares) / n, 3)

def test_referring_binding_splits_mask_ciou_by_box_correctness():
  """benchmarks/referring_binding.py's mask_split: cIoU over the rows with mask pixel counts, all
  and split at box IoU 0.5 (a row at exactly 0.5 is wrong, as P@0.5 is strict)."""
  binding = _benchmark("referring_binding")
  rows = [{"iou": 0.9, "mask_intersection": 80, "mask_union": 100},
          {"iou": 0.6, "mask_intersection": 10, "mask_union": 100},
          {"iou": 0.5, "mask_intersection": 0, "mask_union": 50},
          {"iou": 0.1, "mask_intersection": 5, "mask_union": 50},
          {"iou": 0.95}]  # no mask: left out
  got = binding.mask_split(rows)
  assert got["all"] == {"n": 4, "share": 1.0, "ciou": round(95 / 300, 3)}
  assert got["box IoU > 0.5"] == {"n": 2, "share": 0.5, "ciou": 0.45}
  assert got["box IoU <= 0.5"] == {"n": 2, "share": 0.5, "ciou": 0.05}
  assert binding.mask_split([{"iou": 0.9}]) == {}


def test_grounding_probe_scores_named_and_first_shapes():
  """benchmarks/grounding_probe.py: the nearest box by centre, and the per-rank shares of
  pointing at the named shape, at the first one, and chance; one-shape images are left out."""
  probe = _benchmark("grounding_probe")
  boxes = np.array([[0, 0, 10, 10], [50, 50, 70, 70], [0, 80, 20, 100]], np.float32)
  assert probe.nearest(boxes, np.array([55, 52, 66, 64])) == 1
  assert probe.nearest(boxes, np.array([2, 85, 6, 90])) == 2
  rows = [dict(opening="first", rank=1, num_objects=2, nearest=0),
          dict(opening="first", rank=1, num_objects=3, nearest=1),
          dict(opening="first", rank=0, num_objects=1, nearest=0),   # one shape: left out
          dict(opening="also", rank=3, num_objects=4, nearest=3)]
  table = probe.summarize(rows)
  assert set(table) == {"first/rank1", "also/rank2+"}
  assert table["first/rank1"] == {"n": 2, "named": 0.5, "first": 0.5,
                                  "chance": round((1 / 2 + 1 / 3) / 2, 3)}
  assert table["also/rank2+"] == {"n": 1, "named": 1.0, "first": 0.0, "chance": 0.25}
  names = probe.caption_names("A small Red circle. Above the red circle there is a blue ringing "
                              "square", ("red", "blue"), ("circle", "ring", "square"))
  assert names == {"colour": {"red", "blue"}, "shape": {"circle", "square"},
                   "pair": {("red", "circle")}}
  truth = [{"colour": {"red"}, "shape": {"circle", "star"},
            "pair": {("red", "circle"), ("red", "star")}}]
  pr = probe.precision_recall([names], truth, {"colour": 2, "shape": 4, "pair": 8})
  assert pr["colour"] == {"precision": 0.5, "recall": 1.0, "named": 2, "present": 1,
                          "chance": 0.5}
  assert pr["shape"]["precision"] == 0.5 and pr["shape"]["recall"] == 0.5
  assert pr["pair"] == {"precision": 1.0, "recall": 0.5, "named": 1, "present": 2, "chance": 0.25}


def test_referring_probe_prompts_each_expression_with_its_box():
  """benchmarks/referring_probe.py --prompt_gt_box: every packed expression gets the box of its
  own EOS position; padded expressions a zero box."""
  probe = _benchmark("referring_probe")
  weights = np.zeros((1, 3, 5), np.float32)
  targets = np.zeros((1, 3, 5, 2, 2), np.float32)
  weights[0, 0, 2] = 1.0
  targets[0, 0, 2] = [[0.6, 0.1], [0.2, 0.5]]  # corners in either order
  weights[0, 1, 4] = 1.0
  targets[0, 1, 4] = [[0.1, 0.2], [0.3, 0.4]]
  boxes = probe.gt_box_prompts({"point_weights": weights, "point_targets": targets})
  np.testing.assert_allclose(boxes, [[[0.2, 0.1, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4], [0, 0, 0, 0]]])


def test_feature_probe_reads_each_object_at_its_centre_cell(tmp_path):
  """benchmarks/feature_probe.py: the feature of an object is its centre's grid cell; the ridge
  classifier separates what is separable and not noise; and the whole script runs on a
  checkpoint, scoring each attribute against its majority class."""
  import json
  import types
  from configs import refcoco
  from test_api_tasks import _workdir  # tests/test_api_tasks.py: a trainer-style workdir
  probe = _benchmark("feature_probe")
  maps = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4, 1)  # cell value = its index
  obj = lambda x, y: types.SimpleNamespace(center=(x, y))  # noqa: E731
  got = probe._at_objects(maps, [[obj(0.1, 0.1), obj(0.99, 0.5)], [obj(0.6, 0.9)]])
  np.testing.assert_array_equal(got[:, 0], [0, 4 + 3, 12 + 8 + 2])
  rng = np.random.default_rng(0)
  labels = rng.integers(3, size=400)
  onehot = np.eye(3)[labels] + 0.1 * rng.normal(size=(400, 3))
  assert probe.ridge_accuracy(onehot[:300], labels[:300], onehot[300:], labels[300:]) == 1.0
  noise = rng.normal(size=(400, 20))
  assert probe.ridge_accuracy(noise[:300], labels[:300], noise[300:], labels[300:]) < 0.5

  config = shallow(refcoco.get_config("toy"))
  workdir = _workdir(tmp_path / "w", config, seed=0)
  out = tmp_path / "probe.json"
  assert probe.main([f"--checkpoint={workdir}", "--train_images=12", "--val_images=6",
                     f"--out={out}"]) == 0
  table = json.loads(out.read_text())["attributes"]
  from pixel_llm.data import synthetic
  colors = [o.color for i in range(6)
            for o in synthetic.make_example(0, synthetic.VAL_START_ID + i, "val").objects]
  assert table["color"]["majority"] == round(max(map(colors.count, colors)) / len(colors), 3)
  assert set(table) == {"color", "shape", "size"}
  assert all(0.0 <= row[k] <= 1.0 for row in table.values() for k in ("towers", "extractor"))


def test_place_binding_scores_objects_by_their_cells_and_tallies_the_top_one(tmp_path):
  """benchmarks/place_binding.py: an object's score is the mean logit of the cells whose centres
  lie in its box (its centre's cell for a box between centres); the script runs the extractor of
  a checkpoint with a place head on each expression and tallies the top object of every row;
  a checkpoint without the head is refused."""
  import json
  import pytest
  from configs import refcoco
  from pixel_llm.data import synthetic
  from test_api_tasks import _workdir  # tests/test_api_tasks.py: a trainer-style workdir
  place = _benchmark("place_binding")
  logits = np.arange(16, dtype=np.float32).reshape(4, 4)
  scores = place.object_scores(logits, np.array([[0.0, 0.0, 0.5, 0.5], [0.8, 0.3, 0.85, 0.35]]))
  np.testing.assert_allclose(scores, [(0 + 1 + 4 + 5) / 4, logits[1, 3]])

  rows = []
  for image_id in (synthetic.VAL_START_ID, synthetic.VAL_START_ID + 1):
    for o in synthetic.make_example(0, image_id, "val").objects[:2]:
      rows.append({"image_id": str(image_id), "expression": f"the {o.color} {o.shape}",
                   "gt_box": list(o.box), "box": list(o.box), "iou": 1.0})
  predictions = tmp_path / "p.jsonl"
  predictions.write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = shallow(refcoco.get_config("toy"))
  config.model.prompt_extractor.update(text_conditioned=True, place_logits=True)
  workdir = _workdir(tmp_path / "w", config, seed=0)
  out = tmp_path / "place.json"
  assert place.main([f"--checkpoint={workdir}", f"--predictions={predictions}",
                     f"--out={out}"]) == 0
  got = json.loads(out.read_text())["groups"]["all"]
  assert got["n"] == len(rows) and got["no object"] == 0.0  # the top object is always an object
  assert abs(sum(got[o] for o in ("referred object", "other, shares a word",
                                  "other, shares none")) - 1.0) < 2e-3
  config.model.prompt_extractor.place_logits = False
  plain = _workdir(tmp_path / "plain", config, seed=0)
  with pytest.raises(SystemExit, match="place head"):
    place.main([f"--checkpoint={plain}", f"--predictions={predictions}"])


def test_mask_resolution_ceiling_pools_to_the_decoder_grid():
  ceiling = _benchmark("mask_resolution_ceiling")
  gt = np.zeros((2, 32, 32), bool)
  gt[0, 8:24, 4:20] = True  # on the 4-px grid
  gt[1, 9:11, 9:11] = True  # 2 x 2 px: a quarter of one 4-px cell
  up = ceiling.pooled_masks(gt, 4)
  # Edges on the grid are drawn exactly; bilinear logits round each corner pixel off (there one
  # inside cell weighs 0.625^2 against three outside ones).
  np.testing.assert_array_equal(np.argwhere(up[0] != gt[0]), [[8, 4], [8, 19], [23, 4], [23, 19]])
  assert not up[1].any()  # below half a cell: gone
  np.testing.assert_array_equal(ceiling.pooled_masks(gt, 1), gt)  # 1 px per cell: exact
  with pytest.raises(ValueError, match="does not divide"):
    ceiling.pooled_masks(gt, 5)
