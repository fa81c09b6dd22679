"""Caption metrics with no Java dependency (CIDEr-D with COCO-style PTB tokenisation)."""
from pixel_llm.metrics.cider import cider_d, cider_d_per_image
from pixel_llm.metrics.tokenize import PUNCTUATIONS, coco_tokenize, ptb_tokenize

__all__ = ["cider_d", "cider_d_per_image", "coco_tokenize", "ptb_tokenize", "PUNCTUATIONS"]
