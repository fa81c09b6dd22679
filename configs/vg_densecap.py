r"""Dense object captioning on Visual Genome (the paper's Table 5 mAP 17.5, T5-XL; GRiT's test split).

The release's `*_densecap` stage (`anchor_scenic_pixel_llm.md` 5.2): from the trace stage, 40k
steps at batch 64, lr 1e-4, 1k warmup, weight decay 0.05, layer decay 0.8 over EVA02. A
class-agnostic proposal head (simple feature pyramid + CenterNet heatmap / box regression,
`models/proposal_head.py`) runs on the fused image features; at inference its top boxes after
NMS (0.9) are each captioned through the prompt path (`model.dense_caption_batch`) and scored by
the DenseCap mAP (`metrics.densecap_map`: GT merged at 0.7, IoU x METEOR grid; METEOR needs Java).

Training captions proposals as the release does: the release's text proposals are the first N
of the RoI head's samples (proposals from its `train_proposals` candidates plus the GT boxes,
positives at IoU >= 0.6 first, in random order), each captioned with its matched region's caption
(`models/pixel_llm._roi_text_proposals`); with the RoI head off, the proposal head's top
`model.caption_proposals` boxes (NMS 0.9, no gradient) plus the GT boxes are matched the same way
(`detection/matching.select_caption_prompts`). As the release, an example holds up to
`input.num_prompts` = 100 GT regions (the first 100 of the record; all are targets of the proposal
and RoI heads) and the first `roi_head.text_proposals` = 32 of the 512 RoI samples are decoded.
The release's single-stage RoI head (`models/roi_head.py`: RoIAlign
7x7 from each box's pyramid level, fc 1024 x 2, fg / bg and box deltas, 512 RoIs per image at
25% positive, NMS 0.5 at inference) is on (the toy's: fc 64, 64 RoIs per image).

Commands:
  python -m pixel_llm.train --config=configs/vg_densecap.py --workdir=workdirs/vg_densecap
  python -m pixel_llm.train --config=configs/vg_densecap.py:toy --workdir=workdirs/densecap_toy
  python -m pixel_llm.eval --config=configs/vg_densecap.py:toy --checkpoint=workdirs/densecap_toy
The toy trains the tiny network from scratch on the synthetic world's VG-format regions (all of
an image's, up to 9, 4 of them captioned per step; 128 px); see the README for what it reaches
on 2 CPU cores.
Variants as configs/ln.py: toy, t5=..., sam=..., eva02=..., extractor=...
"""
import ml_collections

from configs import loc_caption


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = loc_caption.get_config(arg)  # dataset=vg: VG regions, GT box prompts, per-region captions
  toy = c.name.endswith(":toy")
  c.name = "vg_densecap" + (":toy" if toy else "")
  c.model.proposal_head.enabled = True
  c.model.caption_proposals = 16 if toy else 128
  # The release's second-stage RoI head scores and refines the proposals (models/roi_head.py);
  # on the toy it lifted mAP 0.764 -> 0.915 when scored on the first 4 regions (README;
  # `--config.model.roi_head.enabled=False`); the toy now reaches 0.959 on all regions.
  c.model.roi_head.enabled = True
  # The release's densecap examples hold up to 100 GT regions (all of them targets of the
  # proposal and RoI heads, and the evaluation's GT) and decode 32 text proposals. The toy holds
  # all of a synthetic image's regions (at most 9: 4 objects, each with at most one more phrase,
  # and the background) and decodes 4: with only the first 4 regions as GT, objects beyond them
  # were background to the heads and missing from the evaluation (README, "Downstream toys").
  c.model.roi_head.text_proposals = 4 if toy else 32
  c.input.num_prompts = 9 if toy else 100
  c.loss.detection_weight = 1.0
  split = c.data.eval_splits[0]
  c.evals = ml_collections.ConfigDict({f"vg_densecap_{split}": {
      "kind": "densecap", "split": split, "num_boxes": 16 if toy else 100, "meteor": True}})
  return c
