"""PixelLLM: a vision-language model that points at the pixel of every word it writes.

Data flow (paper Fig. 2; official release `PixelLlmFlaxModel`):

  image ──► SAM image encoder ─┐ (resized to the EVA02 grid)
        └─► EVA02 ─────────────┴─ concat on channels ─► image features [B, h, w, C]
  location prompt (box / points; default the whole image) ─► SAM prompt encoder ─► sparse, dense
  image features + prompt embeddings ─► prompt feature extractor ─► visual tokens [B, R, Q, Dv]
  visual tokens ─► visual projection ─► [Q, D] ; prompt text ─► T5 embedding ─► [C, D]
  T5 encoder([visual ; prompt text]) ─► T5 decoder (teacher-forced) ─► logits, hidden [T, D]
  hidden ─► location head ─► K points per token (normalised image coordinates)

Shapes: B images, R prompts per image, Q visual tokens per prompt, C prompt-text length,
T decoder length, V vocabulary, D T5 width, K points per token, h/w feature grid.

The image towers run once per image; everything after them runs once per prompt, so several prompts
on one image share one image encoding. Point targets are aligned with decoder *input* positions:
the location at position t belongs to `decoder_input_tokens[t]` (the release's convention, which
lets the box of a referring expression be read where the expression's last word is the input,
i.e. where EOS is predicted).
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixel_llm.detection import boxes as box_lib
from pixel_llm.models import layers

# Per-tower input normalisation for images in [0, 1].
SAM_MEAN, SAM_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet
EVA_MEAN, EVA_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP


class VisualProjection(nn.Module):
  """Linear + LayerNorm from the prompt-token width to the language model width (release: 1e-5)."""

  features: int
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.dense(self.features, (None, "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.initializers.normal(0.02), name="dense")(x)
    return layers.layer_norm(self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="norm")(x)


def _normalise(image: jax.Array, mean, std, image_mask: jax.Array | None) -> jax.Array:
  x = (image - jnp.asarray(mean, image.dtype)) / jnp.asarray(std, image.dtype)
  if image_mask is not None:  # padded pixels are zero after normalisation, as in the release
    x = x * image_mask[..., None].astype(x.dtype)
  return x


def _attention_scoped(method):
  """Traces `method` under the network's `attention_impl` (layers.attention_implementation)."""

  @functools.wraps(method)
  def wrapped(self, *args, **kwargs):
    with layers.attention_implementation(self.attention_impl):
      return method(self, *args, **kwargs)
  return wrapped


class PixelLLM(nn.Module):
  """The PixelLLM network. Sub-networks are passed in already configured (see `models/build.py`)."""

  sam_image_encoder: nn.Module | None
  eva02: nn.Module | None
  prompt_encoder: nn.Module
  prompt_extractor: nn.Module
  visual_projection: nn.Module
  t5: nn.Module
  location_head: nn.Module
  image_size: int = 384
  mask_decoder: nn.Module | None = None  # SAM's, prompted with boxes (the segmentation task)
  # Referring segmentation (models/mask_adapter.py): nudges SAM's box tokens with what the language
  # model saw; and which box prompts the mask decoder: "prompt" (the location prompt) or "eos"
  # (the box the location head predicts where EOS is predicted: referring segmentation).
  mask_adapter: nn.Module | None = None
  segment_box: str = "prompt"
  # Dense object captioning: class-agnostic proposals on the fused feature map
  # (models/proposal_head.py); the grid is treated as stride 16 (PROPOSAL_STRIDE), as the release.
  proposal_head: nn.Module | None = None
  # Dense captioning's training prompts: > 0 captions proposals matched to the GT regions
  # (IoU >= 0.6, GT boxes appended) instead of the GT boxes themselves: with a RoI head, its
  # first R samples (positives first; the release's text proposals), else the proposal head's top
  # `caption_proposals` boxes. Training forward passes only.
  caption_proposals: int = 0
  # The second-stage RoI head (models/roi_head.py): scores and refines the proposals; trained on
  # RoIs sampled from them in training forward passes (aux["roi"]), applied by `detect`.
  roi_head: nn.Module | None = None
  # Attention kernel of every tower: "xla" | "dot_product" | "cudnn" (see layers.ATTENTION_IMPLS).
  attention_impl: str = "xla"

  def decoded_prompts(self, num_regions: int) -> int:
    """N, the prompts a training forward pass decodes per image for R = `num_regions` regions:
    the RoI head's `text_proposals` where those replace the regions (dense captioning with a RoI
    head), else R."""
    if self.roi_head is not None and self.caption_proposals and self.roi_head.text_proposals:
      return self.roi_head.text_proposals
    return num_regions

  @_attention_scoped
  def encode_image(self, image: jax.Array, image_mask: jax.Array | None = None, *,
                   train: bool = False, return_sam: bool = False):
    """image: float32[B, S, S, 3] in [0, 1] (padded square) -> features float32[B, h, w, C]
    (and, with `return_sam`, SAM's own embedding float32[B, hs, ws, 256] for its mask decoder)."""
    if image.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"Expected images of {self.image_size}x{self.image_size}, got {image.shape}.")
    maps = []
    if self.eva02 is not None:
      eva, _ = self.eva02(_normalise(image, EVA_MEAN, EVA_STD, image_mask), train=train)
      maps.append(eva)
    if self.sam_image_encoder is not None:
      sam, _ = self.sam_image_encoder(_normalise(image, SAM_MEAN, SAM_STD, image_mask), train=train)
      maps.insert(0, sam)
    if not maps:
      raise ValueError("PixelLLM needs at least one image encoder.")
    # The fused map lives on the largest grid (EVA02's 27x27 at 384 px); SAM's 24x24 is resized.
    h = max(m.shape[1] for m in maps)
    w = max(m.shape[2] for m in maps)
    maps = [m if m.shape[1:3] == (h, w) else
            jax.image.resize(m, (m.shape[0], h, w, m.shape[3]), "cubic").astype(m.dtype)
            for m in maps]
    feats = jnp.concatenate([m.astype(maps[-1].dtype) for m in maps], axis=-1)
    feats = layers.constrain(feats, ("batch", None, None, "act_embed"))
    return (feats, sam if self.sam_image_encoder is not None else None) if return_sam else feats

  @_attention_scoped
  def predict_masks(self, sam_embedding: jax.Array, boxes: jax.Array,
                    adapter_inputs: tuple[jax.Array, jax.Array, jax.Array] | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """SAM's mask decoder prompted with boxes.

    sam_embedding: float[B, hs, ws, D] (`encode_image(..., return_sam=True)`); boxes: float[B, R, 4]
    xyxy in [0, 1]; adapter_inputs (with a mask adapter): visual tokens float[B*R, Q, Dq], text
    hidden states float[B*R, T, Dt] and their mask bool[B*R, T]. Returns (low-res mask logits
    float32[B, R, 4hs, 4ws], IoU predictions float32[B, R]), SAM's single-mask output.
    """
    b, hs, ws, _ = sam_embedding.shape
    r = boxes.shape[1]
    size = (self.image_size, self.image_size)
    sparse, dense = self.prompt_encoder(boxes=boxes.reshape(b * r, 4) * float(self.image_size),
                                        image_grid=(hs, ws), input_size=size)
    if self.mask_adapter is not None:
      if adapter_inputs is None:
        raise ValueError("The mask adapter needs the visual tokens and text hidden states.")
      sparse, _ = self.mask_adapter(sparse, *adapter_inputs)
    masks, iou = self.mask_decoder(jnp.repeat(sam_embedding, r, axis=0),
                                   self.prompt_encoder.get_dense_pe((hs, ws)), sparse, dense,
                                   multimask_output=False)
    return masks.reshape(b, r, *masks.shape[2:]), iou.reshape(b, r)

  @_attention_scoped
  def detect(self, image: jax.Array, image_mask: jax.Array | None = None, *,
             num_boxes: int = 100, iou_threshold: float = 0.9
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Class-agnostic proposals: image float32[B, S, S, 3] -> (boxes float32[B, K, 4] xyxy in
    [0, 1], scores float32[B, K], valid bool[B, K]) after NMS, K = num_boxes."""
    if self.proposal_head is None:
      raise ValueError("detect needs a network with a proposal head "
                       "(config.model.proposal_head.enabled).")
    feats = self.encode_image(image, image_mask)
    proposals = self.proposal_head(feats)
    strides = self.proposal_head.strides
    if self.roi_head is None:
      return decoded_proposals(proposals, feats, strides, num_boxes, iou_threshold)
    from pixel_llm.models import roi_head as roi_lib
    head = self.roi_head
    boxes, scores, valid = decoded_proposals(proposals, feats, strides, head.test_proposals,
                                             iou_threshold)
    h, w = proposal_frame(feats)
    scale = jnp.asarray([w, h, w, h], jnp.float32)
    pixels = boxes * scale
    out = self.roi_head(proposals["levels"], strides, pixels)
    refine = functools.partial(roi_lib.refine, frame=(float(h), float(w)), num_boxes=num_boxes,
                               score_threshold=head.score_threshold,
                               nms_threshold=head.nms_threshold,
                               mult_proposal_score=head.mult_proposal_score)
    boxes, scores, valid = jax.vmap(refine)(out, pixels, scores, valid)
    return boxes / scale, scores, valid

  @_attention_scoped
  def encode_prompts(self, features: jax.Array, *, boxes: jax.Array | None = None,
                     points: jax.Array | None = None, point_labels: jax.Array | None = None,
                     num_prompts: int | None = None, prompt_text: jax.Array | None = None,
                     train: bool = False, return_aux: bool = False):
    """Visual tokens for every location prompt.

    Args:
      features: float[B, h, w, C] from `encode_image`.
      boxes: float[B, R, 4] xyxy in [0, 1] of the padded square; None = the whole image.
      points: float[B, R, N, 2] xy in [0, 1]; point_labels: int32[B, R, N] (1 pos, 0 neg, -1 pad).
      num_prompts: R when neither boxes nor points are given (default 1).
      prompt_text: int32[B, R, C] (0 = padding); read only by a text-conditioned extractor.
      return_aux: also return the extractor's aux (`PromptFeatureExtractor`), each [B, R, ...].
    Returns:
      float[B, R, Q, D] visual tokens in the language model's width (and the aux dict).
    """
    b, h, w, c = features.shape
    if boxes is None and points is None:
      r = num_prompts or 1
      boxes = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 1.0, 1.0], jnp.float32), (b, r, 4))
    r = (boxes if boxes is not None else points).shape[1]
    scale = float(self.image_size)
    kwargs = {}
    if boxes is not None:
      kwargs["boxes"] = boxes.reshape(b * r, 4) * scale
    if points is not None:
      kwargs["points"] = points.reshape(b * r, points.shape[2], 2) * scale
      kwargs["point_labels"] = point_labels.reshape(b * r, points.shape[2])
    size = (self.image_size, self.image_size)
    sparse, dense = self.prompt_encoder(image_grid=(h, w), input_size=size, **kwargs)
    image_pe = self.prompt_encoder.get_dense_pe((h, w))
    per_prompt = jnp.repeat(features, r, axis=0)  # [B*R, h, w, C]; image towers ran once per image
    text = {}
    if self.prompt_extractor.text_conditioned:
      if prompt_text is None:
        raise ValueError("model.prompt_extractor.text_conditioned needs the prompt text.")
      ids = prompt_text.reshape(b * r, -1)
      text = dict(text=self.t5.embed(ids), text_mask=ids > 0)
    tokens, aux = self.prompt_extractor(per_prompt, image_pe, sparse, dense, **text, train=train)
    tokens = self.visual_projection(tokens)
    tokens = tokens.reshape(b, r, *tokens.shape[1:])
    if return_aux:
      return tokens, {k: v.reshape(b, r, *v.shape[1:]) for k, v in aux.items()}
    return tokens

  @_attention_scoped
  def encode_prefix(self, visual_tokens: jax.Array, prompt_text: jax.Array | None, *,
                    train: bool = False) -> tuple[jax.Array, jax.Array]:
    """T5 encoder over [visual tokens ; prompt text] (PrefixLM).

    Args:
      visual_tokens: float[B, R, Q, D]; prompt_text: int32[B, R, C] (0 = padding) or None.
    Returns:
      (encoded float[B*R, Q+C, D], mask bool[B*R, Q+C])
    """
    b, r, q, d = visual_tokens.shape
    embeds = visual_tokens.reshape(b * r, q, d)
    mask = jnp.ones((b * r, q), bool)
    if prompt_text is not None and prompt_text.shape[-1] > 0:
      text = prompt_text.reshape(b * r, -1)
      embeds = jnp.concatenate([embeds, self.t5.embed(text).astype(embeds.dtype)], axis=1)
      mask = jnp.concatenate([mask, text > 0], axis=1)
    return self.t5.encode(embeds, mask, train=train), mask

  @_attention_scoped
  def decode(self, encoded: jax.Array, encoder_mask: jax.Array, decoder_input_tokens: jax.Array,
             *, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Teacher-forced decoding. decoder_input_tokens: int32[N, T] ->
    (logits float32[N, T, V], hidden float[N, T, D], points float32[N, T, K, 2])."""
    logits, hidden = self.t5.decode(encoded, encoder_mask, decoder_input_tokens, train=train)
    points, _ = self.location_head(hidden)
    return logits, hidden, points

  @_attention_scoped
  def init_cache(self, encoded: jax.Array, encoder_mask: jax.Array, max_length: int) -> None:
    """Creates the decoder's KV cache (apply with `mutable=["cache"]`); see `T5.init_cache`."""
    self.t5.init_cache(encoded, encoder_mask, max_length)

  @_attention_scoped
  def decode_step(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cached `decode` of the next S tokens (apply with `mutable=["cache"]`). tokens: int32[N, S]
    -> (logits float32[N, S, V], hidden float[N, S, D], points float32[N, S, K, 2]); the points at
    s are the location of tokens[:, s], the logits predict the token after it."""
    logits, hidden = self.t5.decode_step(tokens)
    points, _ = self.location_head(hidden)
    return logits, hidden, points

  @_attention_scoped
  def __call__(self, image: jax.Array, decoder_input_tokens: jax.Array, *,
               prompt_boxes: jax.Array | None = None, prompt_points: jax.Array | None = None,
               prompt_point_labels: jax.Array | None = None, prompt_text: jax.Array | None = None,
               image_mask: jax.Array | None = None, region_valid: jax.Array | None = None,
               mask_boxes: jax.Array | None = None, train: bool = False) -> tuple[dict, dict]:
    """Full teacher-forced forward pass.

    Args:
      image: float32[B, S, S, 3] in [0, 1]; image_mask: optional bool[B, S, S] (False = padding).
      decoder_input_tokens: int32[B, R, T] (BOS = 0 first, shifted-right targets).
      prompt_boxes / prompt_points / prompt_point_labels / prompt_text: see `encode_prompts` and
        `encode_prefix`; R is taken from `decoder_input_tokens`.
      region_valid: optional bool[B, R], which prompt boxes are real GT regions (False: padding)
        for the training-time proposal matching and RoI sampling; zero-area boxes never are.
      mask_boxes: optional float[B, R, 4] xyxy in [0, 1]: the boxes that prompt the mask decoder
        instead of those `segment_box` names (the adapter's `mask_train_box="target"`).
    Returns:
      ({"logits": [B, R, T, V], "points": [B, R, T, K, 2]},
       aux {"hidden": [B, R, T, D], "visual_tokens": [B, R, Q, D], "image_features": [B, h, w, C]},
       plus, with the extractor's `place_logits`, "place_logits" float32[B, R, h, w],
       plus, with a mask decoder, "masks": [B, R, 4hs, 4ws] logits and "iou_predictions": [B, R]
       for the prompt boxes; with `caption_proposals` in training, the matched prompts
       "prompt_boxes" [B, N, 4], "prompt_gt_index" int32[B, N] (the GT region each caption target
       comes from: gather the targets with `gather_prompts`) and "prompt_valid" bool[B, N]
       (N = R, or the RoI head's `text_proposals`; then the outputs have N prompts, not R); with
       a RoI head in training, "roi": its sampled RoIs, targets and outputs (`_roi_samples`))
    """
    b, r, t = decoder_input_tokens.shape
    feats, sam = self.encode_image(image, image_mask, train=train, return_sam=True)
    proposals = self.proposal_head(feats) if self.proposal_head is not None else None
    matched = {}
    if self.roi_head is not None and proposals is not None:
      if train and prompt_boxes is not None:
        rng = self.make_rng("dropout") if self.has_rng("dropout") else None
        matched["roi"] = self._roi_samples(proposals, feats, prompt_boxes,
                                           regions(prompt_boxes, region_valid), rng)
      elif self.is_initializing():  # its parameters exist for `detect` whatever the init pass
        self.roi_head(proposals["levels"], self.proposal_head.strides, jnp.zeros((b, 1, 4)))
    if train and self.caption_proposals and proposals is not None and prompt_boxes is not None:
      if "roi" in matched:  # the release's text proposals: the first N RoI samples (fg first)
        prompt_boxes, index, valid = _roi_text_proposals(matched["roi"],
                                                         self.decoded_prompts(r))
      else:
        rng = self.make_rng("dropout") if self.has_rng("dropout") else None
        prompt_boxes, index, valid = _caption_prompts(proposals, feats, prompt_boxes,
                                                      regions(prompt_boxes, region_valid),
                                                      self.proposal_head.strides,
                                                      self.caption_proposals, rng)
      decoder_input_tokens = gather_prompts(decoder_input_tokens, index)
      prompt_text = gather_prompts(prompt_text, index) if prompt_text is not None else None
      matched.update(prompt_gt_index=index, prompt_valid=valid, prompt_boxes=prompt_boxes)
      r = index.shape[1]
    visual, extractor_aux = self.encode_prompts(
        feats, boxes=prompt_boxes, points=prompt_points, point_labels=prompt_point_labels,
        num_prompts=r, prompt_text=prompt_text, train=train, return_aux=True)
    encoded, mask = self.encode_prefix(visual, prompt_text, train=train)
    logits, hidden, points = self.decode(encoded, mask, decoder_input_tokens.reshape(b * r, t),
                                         train=train)
    out = {"logits": logits.reshape(b, r, t, -1), "points": points.reshape(b, r, t, *points.shape[2:])}
    aux = {"hidden": hidden.reshape(b, r, t, -1), "visual_tokens": visual, "image_features": feats,
           **matched}
    if "place_logits" in extractor_aux:
      aux["place_logits"] = extractor_aux["place_logits"]
    if proposals is not None:
      aux["proposals"] = proposals
    if self.mask_decoder is not None:
      if sam is None:
        raise ValueError("The mask decoder needs the SAM image encoder.")
      if mask_boxes is not None and self.segment_box != "eos":
        raise ValueError("mask_boxes replaces the predicted referring box: it needs "
                         "segment_box='eos'.")
      if self.segment_box == "eos":
        boxes, text_mask = _eos_box(out["points"], decoder_input_tokens)
        if mask_boxes is not None:
          boxes = mask_boxes.astype(jnp.float32)
      elif prompt_boxes is None:
        boxes = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 1.0, 1.0], jnp.float32), (b, r, 4))
        text_mask = decoder_input_tokens > 0
      else:
        boxes, text_mask = prompt_boxes, decoder_input_tokens > 0
      adapter_inputs = (visual.reshape(b * r, *visual.shape[2:]), hidden,
                        text_mask.reshape(b * r, t)) if self.mask_adapter is not None else None
      aux["masks"], aux["iou_predictions"] = self.predict_masks(sam, boxes, adapter_inputs)
      aux["mask_boxes"] = boxes
    return out, aux

  def _roi_samples(self, proposals: dict, feats: jax.Array, gt_boxes: jax.Array,
                   gt_valid: jax.Array, rng: jax.Array | None) -> dict[str, jax.Array]:
    """The RoI head on RoIs sampled from its training candidates: the proposal head's top
    `train_proposals` (NMS 0.9, no gradient) with the GT regions gt_boxes float[B, M, 4]
    (gt_valid bool[B, M]) appended. Returns `roi_head.roi_targets`' fields, batched, plus
    the head's "logits" [B, S, 2] and "pred_deltas" [B, S, 4]."""
    from pixel_llm.models import roi_head as roi_lib
    head = self.roi_head
    strides = self.proposal_head.strides
    boxes, _, valid = decoded_proposals(jax.lax.stop_gradient(proposals), feats, strides,
                                        head.train_proposals, 0.9)
    gt_boxes = gt_boxes.astype(jnp.float32)
    candidates = jnp.concatenate([boxes, gt_boxes], 1)
    candidate_valid = jnp.concatenate([valid, gt_valid], 1)
    rngs = (jax.random.split(rng, candidates.shape[0]) if rng is not None
            else jnp.zeros((candidates.shape[0], 2), jnp.uint32))
    targets = jax.vmap(lambda c, cv, g, gv, k: roi_lib.roi_targets(
        c, cv, g, gv, head.samples_per_image, head.positive_fraction,
        k if rng is not None else None))(candidates, candidate_valid, gt_boxes, gt_valid, rngs)
    h, w = proposal_frame(feats)
    pixels = targets["boxes"] * jnp.asarray([w, h, w, h], jnp.float32)
    logits, deltas = head(proposals["levels"], strides, pixels)
    return {**targets, "logits": logits, "pred_deltas": deltas}


PROPOSAL_STRIDE = 16


def proposal_frame(features: jax.Array) -> tuple[int, int]:
  """(height, width) in pixels of the frame the proposal head's boxes live in: the feature grid
  at stride 16 (EVA02's 27x27 grid at 384 px is really stride 14.2; boxes are normalised by
  this frame, so the head's stride convention does not bend them)."""
  return features.shape[1] * PROPOSAL_STRIDE, features.shape[2] * PROPOSAL_STRIDE


def gather_prompts(x: jax.Array, index: jax.Array) -> jax.Array:
  """x[B, R, ...] re-indexed along the prompt axis by index int32[B, R'] -> [B, R', ...]."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, jnp.broadcast_to(index, index.shape[:2] + x.shape[2:]), axis=1)


def decoded_proposals(proposals: dict, features: jax.Array, strides, num_boxes: int,
                      iou_threshold: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The proposal head's output -> its top `num_boxes` after NMS: (boxes float32[B, K, 4] xyxy
  in [0, 1] of the proposal frame, scores float32[B, K], valid bool[B, K])."""
  from pixel_llm.models import proposal_head as proposal_lib
  h, w = proposal_frame(features)
  boxes, scores, valid = proposal_lib.decode_proposals(
      proposals["logits"], proposals["ltrb"], strides, (h, w), post_nms_topk=num_boxes,
      iou_threshold=iou_threshold)
  return boxes / jnp.asarray([w, h, w, h], jnp.float32), scores, valid


def regions(boxes: jax.Array, valid: jax.Array | None) -> jax.Array:
  """Which prompt boxes float[B, R, 4] are GT regions: bool[B, R], positive area and `valid`
  (the batch's caption weights; the tasks pad with whole-image boxes)."""
  real = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
  return real if valid is None else real & valid.astype(bool)


def _caption_prompts(proposals: dict, features: jax.Array, gt_boxes: jax.Array,
                     gt_valid: jax.Array, strides, num_candidates: int, rng: jax.Array | None):
  """The head's top `num_candidates` boxes (NMS 0.9, no gradient) matched to the GT regions
  gt_boxes float[B, R, 4] (gt_valid bool[B, R]): see `matching.select_caption_prompts`.
  Returns (boxes float32[B, R, 4] in [0, 1], gt_index int32[B, R], valid bool[B, R])."""
  from pixel_llm.detection import matching
  boxes, _, valid = decoded_proposals(jax.lax.stop_gradient(proposals), features, strides,
                                      num_candidates, 0.9)
  return matching.select_caption_prompts(boxes, valid, gt_boxes.astype(jnp.float32), gt_valid,
                                         gt_boxes.shape[1], rng)


def _roi_text_proposals(roi: dict[str, jax.Array], num_prompts: int):
  """The first N = `num_prompts` of the RoI samples (`_roi_samples`; positives first, in random
  order): (boxes float32[B, N, 4] in [0, 1], gt_index int32[B, N], valid bool[B, N]); a slot
  holding a background sample is invalid (its caption loss is masked)."""
  if num_prompts > roi["boxes"].shape[1]:
    raise ValueError(f"{num_prompts} caption prompts per image need at least as many RoI samples "
                     f"(model.roi_head.samples_per_image = {roi['boxes'].shape[1]}).")
  valid = (roi["labels"][:, :num_prompts] > 0) & roi["valid"][:, :num_prompts]
  return (jax.lax.stop_gradient(roi["boxes"][:, :num_prompts]),
          jnp.where(valid, roi["gt_index"][:, :num_prompts], 0), valid)


def _eos_box(points: jax.Array, decoder_input_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The referring box: the K = 2 points predicted at the input position of the expression's last
  token (where EOS is predicted), corners ordered and clipped to the image, without gradient (the
  mask loss does not move the box, as in the release); and the decoder positions up to it.

  points: float[B, R, T, 2, 2]; decoder_input_tokens: int32[B, R, T] (BOS = 0, then the
  expression). Returns (boxes float32[B, R, 4] xyxy in [0, 1], text_mask bool[B, R, T]).
  """
  n = (decoder_input_tokens[..., 1:] > 0).sum(-1)  # [B, R] expression tokens
  at = n[..., None, None, None]
  box = box_lib.from_corners(jnp.take_along_axis(points, at, axis=2)[:, :, 0])  # [B, R, 4]
  positions = jnp.arange(decoder_input_tokens.shape[-1])
  return jax.lax.stop_gradient(jnp.clip(box, 0.0, 1.0)), positions <= n[..., None]
