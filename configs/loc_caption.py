r"""Location-conditioned captioning: a ground-truth box as the location prompt, its description as
the target (the paper's Table 5: CIDEr on Visual Genome 149.0 and RefCOCOg val 92.0, METEOR 20.1
and 15.3, T5-XL; `anchor_scenic_pixel_llm.md` section 7). Per-word locations are not trained
(no point loss).

  dataset=vg        Visual Genome regions (GRiT's split: train / test), records of
                    `python -m pixel_llm.data.build vg ...` (PIXEL_LLM_VG_TFRECORDS)
  dataset=refcocog  RefCOCOg (UMD) objects: the GT box prompt -> the expression (every expression
                    of the object is a reference), records of `python -m pixel_llm.data.build
                    refcoco ...` (PIXEL_LLM_REFCOCO_TFRECORDS)
Either way `config.input.num_prompts` regions / expressions of an image (16; toy 4) share one
image encoding in a train example.

The release trains this inside its densecap stage (40k steps, batch 64, lr 1e-4, layer decay 0.8
over EVA02, from the trace stage); this config trains the prompt path alone with those settings.
Evaluation: greedy captions per box, CIDEr-D / BLEU / ROUGE-L (add "meteor" to the metrics where
Java is installed: the paper's second number).

Commands:
  python -m pixel_llm.train --config=configs/loc_caption.py:dataset=vg --workdir=workdirs/vg_loca
  python -m pixel_llm.train --config=configs/loc_caption.py:toy --workdir=workdirs/loca_toy
  python -m pixel_llm.eval --config=configs/loc_caption.py:toy --checkpoint=workdirs/loca_toy
The toy captions the synthetic world's VG-format regions ("a red circle", "a small blue square
to the left"), tiny network from scratch, 128 px, 4 regions per image, batch 16; see the README
for what it reaches and how long it takes on 2 CPU cores.
Variants: dataset=<vg|refcocog>, and as configs/ln.py: toy, t5=..., sam=..., eva02=..., extractor=...
"""
import ml_collections

from configs import common
from configs import ln

EVAL_SPLITS = {"vg": ("test",), "refcocog": ("val",)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  dataset, rest = common.split_dataset_arg(arg, EVAL_SPLITS, "vg")
  c = ln.get_config(rest)
  toy = c.name.endswith(":toy")
  c.name = f"loc_caption_{dataset}" + (":toy" if toy else "")
  # The synthetic world builds train and val only.
  splits = ("val",) if toy else EVAL_SPLITS[dataset]
  if toy:  # 128 held-out images (437 regions) rather than 32 (105): see configs/refcoco.py
    c.data.num_val_images = 256
  # Prompts (regions / objects) per train image: they share one image encoding.
  c.input.num_prompts = 4 if toy else 16
  if dataset == "vg":
    # The release's VG train augmentation: scale jitter 0.1-2.0 and a horizontal flip (which
    # here also swaps "left" / "right" in the phrases); eval images are never augmented. The toys
    # (this one and vg_densecap's) train without it: their figures in the README were measured so.
    c.data.update(task="vg", eval_splits=splits, vg_scale_jitter=() if toy else (0.1, 2.0),
                  vg_flip=not toy)
  else:
    c.data.update(task="refcoco", refcoco_kind="loco", refcoco_prompt_prefix="",
                  refcoco_caption_loss=True, eval_splits=splits,
                  # The release jitters every RefCOCO-family train image (eval never).
                  refcoco_scale_jitter=(0.75, 1.25),
                  # Up to num_prompts expressions of one image per train example, as the
                  # referring configs pack them; evaluation is one expression per example.
                  refcoco_expressions_per_image=c.input.num_prompts)
    c.input.eval_num_prompts = 1
  c.data.coco_captions_rate = 0.0
  if not toy:
    c.data.source = "files"  # real TFRecords: see the module docstring
  c.input.max_target_len = 16 if toy else 40
  c.loss.point_weight = 0.0  # the box is given; words are not located
  c.total_steps = 1_500 if toy else 40_000
  c.batch_size = 16 if toy else 64
  c.learning_rate = 1e-3 if toy else 1e-4
  c.warmup_steps = 100 if toy else 1_000
  c.weight_decay = 0.0 if toy else 0.05
  if not toy:
    c.layer_decay = 0.8
  c.checkpoint_every_steps = 500 if toy else 5_000
  c.eval_every_steps = 500 if toy else 5_000
  c.evals = ml_collections.ConfigDict({
      f"{dataset}_loca_{split}": {"kind": "caption_trace", "split": split,
                                  "metrics": ("cider", "bleu", "rouge_l")}
      for split in splits})
  return c
