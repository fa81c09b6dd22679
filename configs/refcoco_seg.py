r"""Referring segmentation on RefCOCO / RefCOCO+ / RefCOCOg (the paper's Table 4 mask cIoU).

The release's `*_refseg` stage (`anchor_scenic_pixel_llm.md` 2.10, 5.2): from the referring stage
(`configs/refcoco.py`) plus SAM-H's mask decoder, 60k steps at batch 64, lr 5e-5 with the mask
adapter at 10x, 500 warmup steps; only the location head and the mask adapter train. The box the
location head predicts where EOS is predicted (without gradient) prompts SAM's mask decoder, after
the gated mask adapter (`models/mask_adapter.py`, gate 0 at init = plain SAM) has nudged SAM's two
box tokens with the visual prompt tokens and the expression's hidden states. Loss: the box L1 plus
SAM's mask loss (focal x20 + dice + IoU-prediction MSE). Evaluation: box P@0.5 and mask cIoU /
mean IoU per split. Paper, T5-XL, cIoU: RefCOCO val 77.2, testA 79.2, testB 74.0.

Weights: --config.init_checkpoint=WORKDIR_REF/checkpoints/<step>/state for everything but the mask
decoder; the mask decoder comes from SAM (`python -m pixel_llm.tools.convert`; pass the converted
folder with --config.sam_checkpoint, read for `mask_decoder/` only).

Commands:
  python -m pixel_llm.train --config=configs/refcoco_seg.py --workdir=workdirs/refcoco_seg
  python -m pixel_llm.train --config=configs/refcoco_seg.py:toy --workdir=workdirs/refseg_toy
  python -m pixel_llm.eval --config=configs/refcoco_seg.py:toy --checkpoint=workdirs/refseg_toy
The toy trains the tiny network (SAM-tiny included) from scratch on the synthetic world's refs,
whose objects carry polygon masks; box and mask losses together, nothing frozen. From the
referring toy's checkpoint (the stage chain; its SAM neck is 256 wide, this toy's 64, so the neck
and the extractor's input projection start fresh), ~20 min on 2 cores, README "Downstream toys":
  python -m pixel_llm.train --config=configs/refcoco_seg.py:toy \
    --config.init_checkpoint=workdirs/refcoco_toy/checkpoints/1500/state \
    "--config.init_patterns=('^(?!sam_image_encoder/neck/|prompt_extractor/image_projection_mlp/)',)" \
    --workdir=workdirs/refseg_toy
The best seg toys (mask cIoU 0.301 on the toy's 438 held-out expressions from the longer
chain's referring checkpoint, configs/refcoco.py: workdirs/refcoco_toy_long; 0.336 from the best
referring checkpoint, the 8,000-image restart; 13 min each on shared cores) freeze as the release
does, everything but what is fresh and the mask adapter / location head:
  python -m pixel_llm.train --config=configs/refcoco_seg.py:toy \
    --config.init_checkpoint=workdirs/refcoco_toy_long/checkpoints/4500/state \
    "--config.init_patterns=('^(?!sam_image_encoder/neck/|prompt_extractor/image_projection_mlp/)',)" \
    "--config.frozen_params=('^(?!mask_adapter/|location_head/|mask_decoder/|sam_image_encoder/neck/|prompt_extractor/image_projection_mlp/)',)" \
    --workdir=workdirs/refseg_toy_long
From the `place` referring toy (configs/refcoco.py) the same freezing reaches cIoU 0.464 (box
P@0.5 0.438), and 0.502 from its 9,000-step checkpoint (box P@0.5 0.578); pass its extractor options, not its place loss, so the frozen stage trains what it
trains above: --config.model.prompt_extractor.text_conditioned=True
--config.model.prompt_extractor.place_logits=True (benchmarks/RESULTS.md). A 4,500-step seg
stage (--config.total_steps=4500) from the 9,000-step checkpoint reaches cIoU 0.582 with box
P@0.5 0.678: cIoU 0.750 where the box is right, 0.215 where it is not
(benchmarks/referring_binding.py splits it). --config.loss.mask_train_box=target (a deviation)
trains SAM-tiny's untrained mask decoder on the jittered GT box, as SAM was trained: better
masks of right boxes (0.773), the same cIoU (0.585) in one run. The 4,500-step stage from the
best referring checkpoint (13,500 steps with --config.loss.giou_weight=2.0, kept in this stage)
reaches cIoU 0.606, box P@0.5 0.751. SAM-tiny's image encoder never learnt masks (the real one
comes from SA-1B), so letting it train in this stage helps (0.616 -> 0.636 from the same
checkpoint); from the 0.806 referring checkpoint (configs/refcoco.py, one restart) with the mask
decoder on the jittered GT box as well it reaches cIoU 0.670, box P@0.5 0.792 (0.801 where the
box is right), the best seg toy; ~25 min alone, benchmarks/RESULTS.md:
  python -m pixel_llm.train --config=configs/refcoco_seg.py:toy --config.total_steps=4500 \
    --config.init_checkpoint=workdirs/refcoco_toy_place13kR/checkpoints/4500/state \
    "--config.init_patterns=('^(?!sam_image_encoder/neck/|prompt_extractor/image_projection_mlp/)',)" \
    "--config.frozen_params=('^(?!mask_adapter/|location_head/|mask_decoder/|sam_image_encoder/|prompt_extractor/image_projection_mlp/)',)" \
    --config.model.prompt_extractor.text_conditioned=True \
    --config.model.prompt_extractor.place_logits=True --config.loss.giou_weight=2.0 \
    --config.loss.mask_train_box=target --config.eval_every_steps=1500 \
    --workdir=workdirs/refseg_toy_best
Variants as configs/refcoco.py: dataset=<refcoco|refcoco+|refcocog>, toy, t5=..., sam=..., ...
"""
import ml_collections

from configs import refcoco

PAPER_CIOU = {"refcoco": (77.2, 79.2, 74.0), "refcoco+": (69.2, 73.0, 64.4),
              "refcocog": (70.1, 72.0)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = refcoco.get_config(arg)
  toy = c.name.endswith(":toy")
  c.name = c.name.replace(":toy", "") + "_seg" + (":toy" if toy else "")
  c.model.mask_decoder.enabled = True
  if toy:  # SAM-tiny's neck at the prompt width, and a small decoder (SAM's is 256 wide)
    c.model.sam.out_chans = c.model.prompt_encoder.embed_dim
    c.model.mask_decoder.update(transformer_dim=c.model.prompt_encoder.embed_dim,
                                transformer_mlp_dim=128, transformer_num_heads=4,
                                iou_head_hidden_dim=64)
  c.model.mask_adapter.enabled = True
  c.model.segment_box = "eos"
  c.loss.mask_weight = 1.0
  # "target": train SAM's mask decoder on the jittered GT box instead of the predicted one (a
  # deviation for untrained mask decoders; pixel_llm/model.py LossConfig).
  c.loss.update(mask_train_box="predicted", mask_box_noise=0.1)
  if not toy:
    # Only the location head and the mask adapter train (the release's refseg freezing).
    c.frozen_params = (r"^(?!mask_adapter/|location_head/)",)
    c.lr_multipliers = ml_collections.ConfigDict({r"^mask_adapter/": 10.0})
    c.total_steps = 60_000
    c.warmup_steps = 500
  c.sam_checkpoint = ""
  return c
