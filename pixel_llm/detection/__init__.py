"""Class-agnostic proposal machinery for dense object captioning (GRiT / CenterNet2 in PixelLLM).

- `boxes`: IoU / GIoU, ltrb encoding, pixel <-> normalised conversion, clipping.
- `nms`: greedy NMS in NumPy and a fixed-size jit-able twin.
- `matching`: proposals -> GT regions at IoU >= 0.6, caption targets.
- `centernet`: CenterNet heatmap / regression targets and losses.

The network (pyramid + head + `decode_proposals`) lives in `pixel_llm.models.proposal_head`.
"""
