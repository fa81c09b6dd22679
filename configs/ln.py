r"""PixelLLM stage 2: captioning with a trace (Localized Narratives + COCO captions).

The paper's main setting (Xu et al. 2024, Sec. 4; official release `t5/trace.py`): SAM ViT-H
(frozen) + EVA02-L (trainable) at 384 px, the prompt feature extractor (release size: depth 6,
width 512, 32 output tokens), Flan-T5-XL frozen with LoRA r=32 on q,v, a 4-layer location head
with 2 points per token. 10k steps, batch 256, AdamW lr 5e-5, 250 warmup steps, cosine.
Targets: LN-COCO trace captioning (point L1) and COCO captions (the paper's Table 3 setting).

Command to run (model summary, no allocation):
  python -m pixel_llm.tools.model_info --config=configs/ln.py
Variants (`configs/ln.py:<arg>`):
  (none)  the paper's setting: ~3.86 B parameters, ~370 M trainable; one H200 step at batch 256
          takes seconds (see benchmarks/), the full 10k-step stage hours on a pod.
  toy     tiny sizes on 128-px images of the embedded synthetic world (all trained from scratch,
          nothing frozen): 1500 steps at batch 16 in about 12 minutes on 2 CPU cores; for tests
          and the offline demo (`python -m pixel_llm.train --config=configs/ln.py:toy
          --workdir=workdirs/ln_toy`).
  t5=<small|base|large|xl|xxl>, sam=<vit_b|vit_l|vit_h>, eva02=<B|L>, extractor=<release|paper>
"""
import os

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, toy=False, t5="xl", sam="vit_h", eva02="L", extractor="release")
  c = ml_collections.ConfigDict()
  c.name = "ln" + (":toy" if a.toy else "")

  if a.toy:
    c.model = common.model_config(sam="tiny", eva02="tiny", t5="tiny", prompt_extractor="tiny",
                                  image_size=128, lora_rank=4, prompt_dim=64, vocab_size=128)
    # Offline there are no pretrained towers to keep frozen: the toy trains everything.
    c.frozen_params = ()
  else:
    c.model = common.model_config(sam=a.sam, eva02=a.eva02, t5=a.t5,
                                  prompt_extractor=a.extractor)
    c.frozen_params = common.FROZEN_SAM_AND_T5

  # Converted public weights (`python -m pixel_llm.tools.convert`); `init_patterns` selects the
  # parameters read from it (regexes on paths as printed by `pixel_llm.tools.model_info`).
  c.init_checkpoint = "" if a.toy else os.environ.get("PIXEL_LLM_INIT_CHECKPOINT", "")
  c.init_patterns = ("",)
  # Data: the embedded synthetic world (Localized Narratives format) for the toy; real LN
  # TFRecords (`python -m pixel_llm.data.build ln ...`) otherwise, paths from flags or env vars.
  # coco_captions_rate r > 0 mixes COCO captions : LN = r : 2 (the paper: 1 : 2; records from
  # `python -m pixel_llm.data.build coco_captions`, --config.data.coco_captions_tfrecords or
  # PIXEL_LLM_COCO_CAPTIONS_TFRECORDS). The toy stays LN-only (its README figures are LN-only).
  # `vocab` given with the synthetic source replaces the world's own (trained on its captions).
  c.data = dict(task="ln", source="synthetic" if a.toy else "ln", root="", tfrecords="", vocab="",
                coco_captions_tfrecords="", coco_captions_rate=0.0 if a.toy else 1.0,
                # The release's COCO-captions train jitter (LN images are not jittered).
                coco_captions_scale_jitter=() if a.toy else (0.75, 1.25),
                num_train_images=2000, num_val_images=64, image_size=c.model.image_size, seed=0,
                prompts=("Describe the image in detail.",), split_sentences=False,
                eval_batch_size=32 if a.toy else 64,
                # Synthetic narratives visit the shapes large-first in reading order ("salient")
                # or in a random order ("shuffled"; then the trace must be found from the words,
                # not the order: see `pixel_llm.data.synthetic.NARRATIONS`).
                synthetic_narration="salient")

  c.loss = dict(label_smoothing=0.1, caption_weight=1.0, point_weight=0.1, place_weight=0.0,
                giou_weight=0.0)

  # Shapes of one example: prompts per image, prompt-text length, decoder length.
  c.input = dict(num_prompts=1, max_context_len=8, max_target_len=128 if not a.toy else 64)

  c.seed = 0
  # --- Sharded training (pixel_llm/train.py, pixel_llm/partitioning.py) ---------------------------
  # Mesh sizes over (data, fsdp, tensor); -1 = the remaining devices. Batch over data x fsdp.
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  # Multi-slice / multi-node: each axis's size across slices (data centre network); `mesh` is then
  # per slice, e.g. --config.mesh_dcn.data=2 for two v5e-256 slices in data parallelism.
  c.mesh_dcn = dict(data=1, fsdp=1, tensor=1)
  # Stop when more than this fraction of parameter bytes is replicated on an fsdp/tensor mesh.
  c.max_replicated_fraction = 0.5
  # Non-finite loss or grad norm skips the update; this many in a row stop the run.
  c.max_consecutive_skips = 10
  # --------------------------------------------------------------------------------------------------
  c.total_steps = 10_000 if not a.toy else 1500
  c.batch_size = 256 if not a.toy else 16
  c.learning_rate = 5e-5 if not a.toy else 1e-3
  c.warmup_steps = 250 if not a.toy else 100
  c.weight_decay = 0.0
  # Per-parameter learning-rate multipliers: {regex on the parameter path: multiplier} (first
  # match wins) and layer-wise decay of one ViT tower (0 = off), e.g. the dense-captioning recipe
  # --config.layer_decay=0.9 --config.layer_decay_tower=eva02.
  c.lr_multipliers = {}
  c.layer_decay = 0.0
  c.layer_decay_tower = "eva02"
  # Storage dtype of the frozen parameters (trainable ones keep float32 master weights; the compute
  # dtype is model.dtype).
  c.frozen_dtype = "float32" if a.toy else "bfloat16"
  # Microbatches per step (gradient accumulation): the same update with 1/n of the activations.
  c.grad_accum_steps = 1
  c.checkpoint_every_steps = 1000 if not a.toy else 500
  c.keep_checkpoints = 2
  c.async_checkpoints = True  # training goes on while a checkpoint is written
  c.final_eval = True  # False: stop after training; evaluate with `pixel_llm.eval`
  # MFU needs the device's peak FLOP/s; 0 = look it up (pixel_llm.chips) from jax's device_kind.
  c.peak_flops_per_device = 0.0
  # Input batches prepared and put on the devices ahead of the step by a thread (0 = none).
  c.prefetch_batches = 2
  c.eval_every_steps = 2500 if not a.toy else 500
  # What the trainer's evaluations and `pixel_llm.eval` run (pixel_llm/evaluation.py); the paper
  # reports LN captioning + trace on COCO val. Add "meteor" where Java is installed.
  c.evals = ml_collections.ConfigDict({"ln_val": {
      "kind": "caption_trace",
      "metrics": ("token_accuracy", "trace_l1", "cider", "bleu", "rouge_l")}})
  c.log_every_steps = 50 if not a.toy else 50
  return c
