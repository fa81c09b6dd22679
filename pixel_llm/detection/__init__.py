"""Class-agnostic proposal machinery for dense object captioning (GRiT / CenterNet2 in PixelLLM).

- `boxes`: IoU / GIoU, ltrb encoding, pixel <-> normalised conversion, clipping.
- `nms`: greedy NMS in NumPy and a fixed-size jit-able twin.
- `matching`: proposals -> GT regions at IoU >= 0.6, caption targets.
- `centernet`: CenterNet heatmap / regression targets and losses.
- `roi_align`: RoIAlign (aligned) over the feature pyramid, each box from its FPN level.

The networks (pyramid + head + `decode_proposals`; the second-stage RoI head) live in
`pixel_llm.models.proposal_head` and `pixel_llm.models.roi_head`.
"""
