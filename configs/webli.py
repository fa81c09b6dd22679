r"""PixelLLM stage 1: image-caption pre-training on web-scale image-text pairs (WebLI-style).

The paper starts every stage from a WebLI-pretrained model whose data and config were never
released (`anchor_scenic_pixel_llm.md` 5.1: "pixel_llm_*_webli"). This is our stage 1: the same
network as `configs/ln.py` captions whole images from web pairs, training EVA02, the prompt
feature extractor and LoRA (SAM and the T5 base weights frozen, from converted public weights);
no per-token locations (there are no traces), so the location head is left to stage 2. Its
checkpoint initialises stage 2: `--config.init_checkpoint=WORKDIR/checkpoints/<step>/state`.
Hyperparameters are ours (not published): 100k steps at batch 1024, lr 1e-4, 5k warmup.

Data: JSON lines {"image": path, "caption": ...} + images, or TFRecords with image/encoded,
built into COCO-captions-schema records by
  python -m pixel_llm.data.build webli --jsonl 'pairs/*.jsonl' --images ROOT --out tfrecords/webli --split train
then --config.data.tfrecords='tfrecords/webli/webli_{split}.tfrecord-*' (or
PIXEL_LLM_CAPTIONS_TFRECORDS) and --config.data.vocab=flan-t5-xl/spiece.model (or PIXEL_LLM_VOCAB).

Commands:
  python -m pixel_llm.train --config=configs/webli.py --workdir=workdirs/webli      # a TPU pod
  python -m pixel_llm.train --config=configs/webli.py:toy --workdir=workdirs/webli_toy
The toy variant captions the synthetic world's images from its WebLI-format pairs (written and
built on first use), tiny model, 300 steps at batch 16: a few minutes on 2 CPU cores. Evaluation:
token accuracy and CIDEr-D on the held-out pairs (the trace L1 is 0: no traces).
Variants as configs/ln.py: toy, t5=..., sam=..., eva02=..., extractor=...
"""
import ml_collections

from configs import ln


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ln.get_config(arg)
  toy = c.name.endswith(":toy")
  c.name = "webli" + (":toy" if toy else "")
  c.data.update(task="captions", coco_captions_rate=0.0, prompts=("A photo of",),
                split_sentences=False)
  if not toy:
    c.data.source = "files"  # real TFRecords: see the module docstring
  c.input.max_target_len = 32 if toy else 64  # web captions are short
  c.loss.point_weight = 0.0  # no location targets in image-text pairs
  c.total_steps = 300 if toy else 100_000
  c.batch_size = 16 if toy else 1024
  c.learning_rate = 1e-3 if toy else 1e-4
  c.warmup_steps = 30 if toy else 5_000
  c.weight_decay = 0.0 if toy else 0.05
  c.checkpoint_every_steps = 100 if toy else 5_000
  c.eval_every_steps = 1_000_000  # final evaluation only
  c.log_every_steps = 25 if toy else 100
  return c
