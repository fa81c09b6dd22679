r"""Referring localization on RefCOCO / RefCOCO+ / RefCOCOg (the paper's Table 4 box P@0.5).

The release's `*_ref` stage (`anchor_scenic_pixel_llm.md` 5.2): from the trace stage's checkpoint,
120k steps at batch 64, lr 5e-5, 1k warmup, no weight decay, decoder length 40. The expression is
the text prompt and the teacher-forced decoder input; the box is regressed as the 2 points of the
location head at the position that predicts EOS; the text loss is off (RefCOCO's task mask is
`['point']` only). Evaluation is teacher-forced with the ground-truth expression, as the release's
(its text loss is off, so generated expressions would mean nothing): box Precision@1 at IoU > 0.5
and mean IoU on the val split. Paper, T5-XL: RefCOCO val 90.3, testA 92.3, testB 86.8.

Data: `python -m pixel_llm.data.build refcoco --refs 'refs(unc).p' --instances instances.json
--images train2014 --out tfrecords/refcoco --split train` (and val, testA, testB), then
--config.data.tfrecords='tfrecords/refcoco/refcoco_{split}.tfrecord-*' (or
PIXEL_LLM_REFCOCO_TFRECORDS) and --config.data.vocab (or PIXEL_LLM_VOCAB); start from the trace
stage with --config.init_checkpoint=WORKDIR_LN/checkpoints/<step>/state.

Commands:
  python -m pixel_llm.train --config=configs/refcoco.py --workdir=workdirs/refcoco   # a pod / GPU
  python -m pixel_llm.train --config=configs/refcoco.py:toy --workdir=workdirs/refcoco_toy
  python -m pixel_llm.eval --config=configs/refcoco.py:toy --checkpoint=workdirs/refcoco_toy
The toy trains the tiny network from scratch on the synthetic world's RefCOCO-format refs (written
and built on first use; expressions such as "the red circle left of the square"), 128-px images,
batch 16; see the README for what it reaches and how long it takes on 2 CPU cores.
Variants as configs/ln.py: toy, t5=..., sam=..., eva02=..., extractor=...
"""
import ml_collections

from configs import ln


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ln.get_config(arg)
  toy = c.name.endswith(":toy")
  c.name = "refcoco" + (":toy" if toy else "")
  c.data.update(task="refcoco", coco_captions_rate=0.0, refcoco_kind="loc",
                refcoco_prompt_prefix="", refcoco_caption_loss=False)
  if not toy:
    c.data.source = "files"  # real TFRecords: see the module docstring
  c.input.max_target_len = 16 if toy else 40
  c.input.max_context_len = 16 if toy else 40  # the expression is the prompt too
  c.total_steps = 1_500 if toy else 120_000
  c.batch_size = 16 if toy else 64
  c.learning_rate = 1e-3 if toy else 5e-5
  c.warmup_steps = 100 if toy else 1_000
  c.weight_decay = 0.0
  c.checkpoint_every_steps = 500 if toy else 1_000
  c.eval_every_steps = 500 if toy else 2_500
  c.evals = ml_collections.ConfigDict({"refcoco_val": {"kind": "referring"}})
  return c
