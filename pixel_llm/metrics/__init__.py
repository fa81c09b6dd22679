"""Evaluation metrics of the PixelLLM paper.

Caption metrics as the COCO toolkit computes them (BLEU, ROUGE-L, CIDEr-D pure Python with COCO-style
PTB tokenisation; METEOR 1.5 through pycocoevalcap's jar, needs Java; SPICE optional, with CoreNLP jars the user
supplies), referring box P@0.5 and mask
cIoU/mIoU, DenseCap mAP, and the trace point L1 / trace distances.
"""
from pixel_llm.metrics.bleu import bleu
from pixel_llm.metrics.cider import cider_d, cider_d_per_image
from pixel_llm.metrics.densecap import average_precision, densecap_map, merge_gt_boxes
from pixel_llm.metrics.meteor import MeteorScorer, MeteorUnavailableError, meteor
from pixel_llm.metrics.referring import (box_iou, box_precision_at, mask_ciou, mask_miou,
                                         paired_box_iou)
from pixel_llm.metrics.rouge import rouge_l, rouge_l_per_image
from pixel_llm.metrics.spice import SpiceUnavailableError, spice
from pixel_llm.metrics.tokenize import PUNCTUATIONS, coco_tokenize, ptb_tokenize
from pixel_llm.metrics.trace import (point_l1, point_l1_per_example, trace_chamfer, trace_dtw)

__all__ = [
    "cider_d", "cider_d_per_image", "coco_tokenize", "ptb_tokenize", "PUNCTUATIONS",
    "bleu", "rouge_l", "rouge_l_per_image", "meteor", "MeteorScorer", "MeteorUnavailableError",
    "spice", "SpiceUnavailableError",
    "box_iou", "paired_box_iou", "box_precision_at", "mask_ciou", "mask_miou",
    "densecap_map", "merge_gt_boxes", "average_precision",
    "point_l1", "point_l1_per_example", "trace_chamfer", "trace_dtw",
]
