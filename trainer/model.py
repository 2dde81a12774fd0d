"""The ViLD student: torchvision Faster R-CNN pieces with an open-vocabulary classifier.

    images -> ResNet-FPN -> online RPN (class-agnostic) -> N live proposals per image
      live:   RoIAlign -> text tower (TwoMLPHead + linear to D, L2-normalized)
                -> box deltas [N, 4] (one class-agnostic regressor)
                -> region embedding [N, D] -> cos / tau against [bg, text embeddings]
      cached: RoIAlign on the M cached boxes -> image tower -> region embedding [M, D]
                -> L1 to the cached teacher embeddings (ViLD-image)

Modes (`TrainConfig.mode`), all with the RPN and box-regression losses on base boxes:
- text:  ViLD-text cross-entropy over [bg, base classes]; no image loss.
- image: the paper's ViLD-image-only ablation: no base-category label supervises the
         classifier, the region embeddings learn only from the teacher (L1). A detector still
         has to reject background, so the live proposals get a class-agnostic foreground /
         background loss (`losses.foreground_loss`: p_bg against the summed class
         probabilities) -- the same box-level signal the class-agnostic regressor uses.
         At inference the classes are scored like ViLD-text (softmax over [bg, classes]).
- vild:  ViLD-text + ViLD-image on one shared tower (the paper's ViLD).

`heads="separate"` (mode vild only) gives the image loss its own tower (the paper's
ViLD-ensemble: separate text and image heads). At inference with `ensemble=True`,
p_text = softmax over [bg, all classes] from the text head (background column dropped) and
p_image = softmax over all classes from the image head (it never learns a background, so the
text head alone rejects background); base classes score p_text^(2/3) p_image^(1/3), novel
ones p_text^(1/3) p_image^(2/3).

Novel texts during training: the ViLD-text softmax here is over [bg, base classes] only
(`self.text_emb[self.is_base]`), the novel texts are left out of it entirely. That is what
DetPro does by setting their logits to -1e11; the official tensorflow ViLD instead multiplies
the novel logits by 0, so they stay in the denominator as logit 0 (no gradient). Every row
keeps the current behaviour (novel texts out).

Remedies (`TrainConfig`, all off by default, then nothing below changes a paper row):
- distill_min_score / distill_top_k: only the confident cached proposals (their RPN score,
  `cached_scores`) are distilled; the mask is applied per image before the image tower, to
  boxes and teacher embeddings alike (`cached_targets`).
- contrastive_weight / contrastive_tau: `loss_contrastive`, a symmetric InfoNCE between the
  image tower's embeddings and the teacher's over all (masked) cached proposals of the batch,
  beside the L1 term.
- center_targets: with the cache's mean region embedding (`set_vocabulary(...,
  region_mean=...)`), the teacher targets, the texts and the negatives are
  L2-normalize(x - mean), in training and at inference alike.
- negative_prompts: generic texts that name no category (`set_vocabulary(...,
  negatives=...)`) are more names of background: the ViLD-text classifier is [bg, base
  texts, negative texts] and a background proposal's target is bg or any negative
  (`losses.vild_text_loss_with_aliases`); at inference they join the softmax and their
  probability is dropped with the background's. The image-mode foreground loss keeps
  [bg, base].
- dictionary_negatives (DetCLIPv2's T_neg): `forward(..., extra_negatives=...)` takes the
  concept embeddings sampled for this iteration (`pair_data.sample_negatives`); the ViLD-text
  classifier is [bg, base texts, those concepts, negative prompts]: more classes no proposal
  is labelled with (`text_classifier`). Training only.
- `detect(..., logit_bias=...)`: per-class calibration, subtracted from the class logits
  before the softmax (both heads' for the ensemble).

Image-text pairs (DetCLIPv2, `TrainConfig.pairs_ratio`): `forward(images, pairs,
pairs=True)` runs the backbone on a batch of pair images, RoIAligns each image's cached
proposals and embeds them with the text tower (the head the classifier uses, also with
heads=separate; `pair_region_embeddings`); `loss_pairs` = pairs_weight x the text-to-image
contrastive loss on the set similarity of every image with every caption of the batch
(`losses.pair_set_similarity`, `losses.pair_contrastive_loss`); with pairs_word_weight > 0
also `loss_pairs_word` (`losses.pair_word_loss`, each phrase's region against the batch's
other phrases), with pairs_pseudo_weight > 0 `loss_pairs_pseudo` (`losses.pair_pseudo_loss`,
the same on each phrase's pseudo-box, the teacher's pick). The RPN, the box regressor, the
background embedding and an image tower get no gradient from them.

Detection as grounding (GLIP, `TrainConfig.mode="grounding"`): the ViLD-text softmax is
replaced by alignment logits between the text tower's region embeddings [N, D] and the
tokens of text prompts [T, D] (`trainer.grounding`): the cache's teacher (`attach_teacher`)
encodes each prompt per token (`Teacher.encode_tokens`, frozen unless train_text_encoder),
`token_proj` (started at the teacher's text_projection) maps them to D, `fusion`
(fusion_layers of X-MHA, optional) fuses regions and tokens, `alignment` gives the logits.
`forward(..., prompts=...)` takes per image its `grounding_data.PromptTargets` (the
detection prompts of its classes, or its caption on grounding data); a sampled proposal's
target row is the positive row of its matched GT box (zeros for background), and
`loss_grounding` = grounding_weight x the sigmoid focal loss summed over every (image,
prompt) and divided by their positive tokens. `detect` scores class c by the mean sigmoid
over c's span (its last token only with `grounding_span="last"`, also the only positive token
in training then; the one-name prompt's end-of-text token with "eot") in
`all_class_prompts(vocabulary)` (encoded once, `PromptCache`); the RPN and the box regression
are as in the other modes. A frozen teacher is not part of the state
dict (the run records its identity; evaluation loads it from the cache again); a trainable
one is (`text_encoder.*`).

Precision (`TrainConfig.precision`): under bf16 autocast the backbone, the RPN head's convs,
the towers and the box regressor run in bf16; anchors, proposals, the sampled proposals'
matching and regression targets, the box decoding, the logits and the losses are float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from ovdistill.pipeline.checkpoints import CheckpointError, load_weights
from ovdistill.pipeline.precision import float32_region
from ovdistill.pipeline.prompts import (
    PromptCache,
    all_class_prompts,
    max_prompt_tokens,
    open_clip_tokenize,
)
from ovdistill.pipeline.rpn_net import IMAGE_MEAN, IMAGE_STD, Float32Anchors, Float32RPNHead
from ovdistill.trainer.config import TrainConfig
from ovdistill.trainer.grounding import (
    AlignmentHead,
    FusionStack,
    GroundingError,
    TokenProjection,
    class_scores,
    eot_spans,
    eot_targets,
    last_token_spans,
    last_token_targets,
    sigmoid_focal_alignment_loss,
)
from ovdistill.trainer.losses import (
    box_regression_loss,
    center_embeddings,
    confident_mask,
    contrastive_distill_loss,
    foreground_loss,
    named_elsewhere,
    pad_rows,
    pair_contrastive_loss,
    pair_phrase_contrastive_loss,
    pair_pseudo_loss,
    pair_set_similarity,
    pair_word_loss,
    phrase_region_best,
    region_logits,
    vild_image_loss,
    vild_text_loss_with_aliases,
)
from ovdistill.trainer.roi_pool import FastBackwardMultiScaleRoIAlign
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(32, channels)


# Trainable norms, not torchvision's FrozenBatchNorm2d: the backbone starts untrained.
# GroupNorm suits small per-process batches; BatchNorm matches the RPN stage's backbone.
NORM_LAYERS = {"group": _group_norm, "batch": nn.BatchNorm2d}


def batch_images(images: list[Tensor], size_divisible: int = 32) -> ImageList:
    """Normalize and zero-pad images into one batch.

    images: list of Tensor[3, H_i, W_i] float in [0, 1]. Returns an ImageList whose tensor is
    Tensor[B, 3, H, W] (H, W = max sizes rounded up to `size_divisible`) and whose
    image_sizes are the (H_i, W_i) before padding.
    """
    mean = torch.tensor(IMAGE_MEAN, device=images[0].device)[:, None, None]
    std = torch.tensor(IMAGE_STD, device=images[0].device)[:, None, None]
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    h = (h + size_divisible - 1) // size_divisible * size_divisible
    w = (w + size_divisible - 1) // size_divisible * size_divisible
    batch = images[0].new_zeros((len(images), 3, h, w))
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]] = (im - mean) / std
    return ImageList(batch, [(int(im.shape[-2]), int(im.shape[-1])) for im in images])


def ensemble_scores(p_text: Tensor, p_image: Tensor, is_base: Tensor) -> Tensor:
    """ViLD-ensemble: geometric weighting of the text-head and image-head probabilities.

    p_text: Tensor[N, C] class probabilities of the text head (softmax over [bg, classes],
    background column dropped); p_image: Tensor[N, C] of the image head (softmax over the
    classes); is_base: Tensor[C] bool. Base: p_text^(2/3) p_image^(1/3); novel:
    p_text^(1/3) p_image^(2/3).
    """
    lam = torch.where(is_base, 2.0 / 3.0, 1.0 / 3.0).to(p_text.dtype)
    return p_text.pow(lam) * p_image.pow(1.0 - lam)


def postprocess(boxes: Tensor, scores: Tensor, image_size: tuple[int, int],
                score_thresh: float, nms_thresh: float, max_detections: int,
                min_size: float = 1e-2) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class detections from class-agnostic boxes.

    boxes: Tensor[N, 4] (x1, y1, x2, y2) decoded; scores: Tensor[N, C]. Boxes are clipped to
    `image_size` (H, W); every (box, class) pair above `score_thresh` is a candidate; NMS per
    class at `nms_thresh`; the `max_detections` best are kept. Returns (boxes Tensor[K, 4],
    scores Tensor[K], class indices Tensor[K] int64 in [0, C)).
    """
    n, c = scores.shape
    boxes = clip_boxes_to_image(boxes, image_size)
    boxes = boxes[:, None, :].expand(n, c, 4).reshape(-1, 4)
    labels = torch.arange(c, device=scores.device).expand(n, c).reshape(-1)
    scores = scores.reshape(-1)
    keep = scores > score_thresh
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = remove_small_boxes(boxes, min_size)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:max_detections]
    return boxes[keep], scores[keep], labels[keep]


@dataclass
class Detections:
    boxes: Tensor  # [K, 4] (x1, y1, x2, y2) in the pixels of the image given to the model
    scores: Tensor  # [K]
    labels: Tensor  # [K] int64 index into the model's vocabulary


class EmbeddingTower(nn.Module):
    """RoI features -> L2-normalized region embedding (TwoMLPHead + linear projection to D)."""

    def __init__(self, in_features: int, representation_size: int, embed_dim: int):
        super().__init__()
        self.mlp = TwoMLPHead(in_features, representation_size)
        self.proj = nn.Linear(representation_size, embed_dim)

    def forward(self, roi_features: Tensor) -> tuple[Tensor, Tensor]:
        """roi_features: Tensor[N, C, 7, 7] -> (hidden Tensor[N, R], embedding Tensor[N, D])."""
        hidden = self.mlp(roi_features)
        return hidden, F.normalize(self.proj(hidden).float(), dim=-1)


class OpenVocabDetector(nn.Module):
    """Faster R-CNN with a class-agnostic box regressor and a text-embedding classifier.

    The vocabulary (frozen text embeddings, base mask) is set with `set_vocabulary`; it is not
    part of the state dict, so one checkpoint serves any vocabulary of the same dimension D.
    """

    def __init__(self, cfg: TrainConfig, embed_dim: int, detections_per_image: int = 100):
        super().__init__()
        self.cfg = cfg
        self.embed_dim = embed_dim
        self.detections_per_image = detections_per_image
        self.backbone = resnet_fpn_backbone(
            backbone_name=cfg.backbone, weights=None, norm_layer=NORM_LAYERS[cfg.norm],
            trainable_layers=cfg.trainable_backbone_layers,
            returned_layers=list(cfg.returned_layers))
        channels = self.backbone.out_channels
        # float32 anchors and RPN outputs: proposals, NMS and every box target stay float32
        # under bf16 autocast (select_training_samples casts the GT to the proposals' dtype)
        anchors = Float32Anchors(tuple((s,) for s in cfg.anchor_sizes),
                                 ((0.5, 1.0, 2.0),) * len(cfg.anchor_sizes))
        self.rpn = RegionProposalNetwork(
            anchors, Float32RPNHead(channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_top_n={"training": cfg.rpn_pre_nms_train,
                           "testing": cfg.rpn_pre_nms_test},
            post_nms_top_n={"training": cfg.rpn_post_nms_train,
                            "testing": cfg.rpn_post_nms_test},
            nms_thresh=cfg.rpn_nms)
        # RoIHeads is used for its proposal sampler (select_training_samples) and box coder;
        # the class-agnostic regressor sits in its box_predictor slot.
        self.roi_heads = RoIHeads(
            box_roi_pool=FastBackwardMultiScaleRoIAlign(
                [str(i) for i in range(len(cfg.returned_layers))], output_size=7,
                sampling_ratio=cfg.roi_sampling_ratio),
            box_head=nn.Identity(), box_predictor=nn.Linear(cfg.representation_size, 4),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5,
            batch_size_per_image=cfg.box_batch_size_per_image,
            positive_fraction=cfg.box_positive_fraction, bbox_reg_weights=None,
            score_thresh=cfg.score_thresh, nms_thresh=cfg.final_nms,
            detections_per_img=detections_per_image)
        roi_features = channels * 7 * 7
        self.text_tower = EmbeddingTower(roi_features, cfg.representation_size, embed_dim)
        self.image_tower = (EmbeddingTower(roi_features, cfg.representation_size, embed_dim)
                            if cfg.heads == "separate" else None)
        self.bg_embedding = nn.Parameter(F.normalize(torch.randn(embed_dim), dim=0))
        self.register_buffer("text_emb", torch.zeros(0, embed_dim), persistent=False)
        self.register_buffer("is_base", torch.zeros(0, dtype=torch.bool), persistent=False)
        # center_targets: the cache's normalized mean region embedding ([0] = none held)
        self.register_buffer("region_mean", torch.zeros(0), persistent=False)
        # negative_prompts: generic negative texts for the training softmax ([K, D])
        self.register_buffer("neg_emb", torch.zeros(0, embed_dim), persistent=False)
        self._neg_raw = torch.zeros(0, embed_dim)
        # GLIP (mode grounding): the token projection is made by attach_teacher (its width)
        self.token_proj: TokenProjection | None = None
        self.alignment = self.fusion = None
        if cfg.mode == "grounding":
            if embed_dim % cfg.fusion_heads and cfg.fusion_layers:
                raise GroundingError(f"fusion_heads={cfg.fusion_heads} does not divide the "
                                     f"embedding dim {embed_dim}")
            self.alignment = AlignmentHead(embed_dim, tau=cfg.grounding_tau,
                                           text_bias=cfg.text_bias)
            self.fusion = FusionStack(cfg.fusion_layers, embed_dim, cfg.fusion_heads)
        self._teacher = None  # a pipeline Teacher, not a submodule unless it trains
        self._prompt_cache: PromptCache | None = None
        self.class_prompts: list = []  # detect's all_class_prompts of the vocabulary

    # ------------------------------------------------------------------ vocabulary

    def set_vocabulary(self, text_emb: Tensor, is_base: Tensor,
                       region_mean: Tensor | None = None,
                       negatives: Tensor | None = None) -> None:
        """text_emb: Tensor[C, D] (normalized here); is_base: Tensor[C] bool.

        region_mean: Tensor[D], the cache's mean region embedding (`inputs.load_region_mean`);
        while the model holds one, the texts and negatives it stores and the teacher targets
        are centred by it (`losses.center_embeddings`). negatives: Tensor[K, D], generic
        negative texts for the training softmax (`inputs.load_negatives`). For both, None
        keeps what an earlier call set (none at first), so a vocabulary can be swapped for
        evaluation without handing them again. `center_targets` needs a region mean held.
        """
        if text_emb.ndim != 2 or text_emb.shape[1] != self.embed_dim:
            raise ValueError(f"text embeddings have shape {tuple(text_emb.shape)}; the model "
                             f"expects [C, {self.embed_dim}]")
        device = self.bg_embedding.device
        if region_mean is not None:
            if tuple(region_mean.shape) != (self.embed_dim,):
                raise ValueError(f"region mean has shape {tuple(region_mean.shape)}; the model "
                                 f"expects [{self.embed_dim}]")
            self.region_mean = F.normalize(region_mean.float(), dim=0).to(device)
        if negatives is not None:
            if negatives.ndim != 2 or negatives.shape[1] != self.embed_dim:
                raise ValueError(f"negative text embeddings have shape "
                                 f"{tuple(negatives.shape)}; the model expects "
                                 f"[K, {self.embed_dim}]")
            self._neg_raw = F.normalize(negatives.float(), dim=-1).cpu()
        if self.cfg.center_targets and self.region_mean.numel() == 0:
            raise ValueError("center_targets needs the cache's mean region embedding: "
                             "set_vocabulary(..., region_mean=inputs.load_region_mean(cache))")
        self.text_emb = self._center(F.normalize(text_emb.float(), dim=-1).to(device))
        self.neg_emb = self._center(self._neg_raw.to(device))
        self.is_base = is_base.bool().to(device)

    def _center(self, emb: Tensor) -> Tensor:
        """emb: Tensor[N, D] -> centred by the held region mean (unchanged when none)."""
        if self.region_mean.numel() == 0:
            return emb
        return center_embeddings(emb, self.region_mean)

    # ------------------------------------------------------------------ grounding

    def attach_teacher(self, teacher, cache_prompts: bool = False) -> None:
        """The text encoder of mode grounding: `teacher` (a pipeline Teacher on this model's
        device). Makes `token_proj` from its text_projection the first time; with
        train_text_encoder its model becomes the submodule `text_encoder` (saved, trained;
        its image tower frozen). `cache_prompts`: encode each prompt text once
        (`PromptCache`; refused for a trainable encoder)."""
        if self.cfg.mode != "grounding":
            raise GroundingError(f"attach_teacher is for mode grounding (got {self.cfg.mode})")
        tower = teacher.model if hasattr(teacher.model, "text_projection") else getattr(
            teacher.model, "text", teacher.model)
        projection = getattr(tower, "text_projection", None)
        if not isinstance(projection, Tensor) or projection.ndim != 2:
            raise GroundingError(f"teacher text tower {type(tower).__name__} has no "
                                 f"[W, D] text_projection tensor to start token_proj from")
        if projection.shape[1] != self.embed_dim:
            raise GroundingError(f"teacher embeds in D={projection.shape[1]}, the model in "
                                 f"D={self.embed_dim}; the cache holds another teacher")
        device = self.bg_embedding.device
        if self.token_proj is None:
            self.token_proj = TokenProjection.from_text_projection(projection.float()).to(device)
        self._teacher = teacher
        if self.cfg.train_text_encoder:
            if cache_prompts and self.training:
                raise GroundingError("a trainable text encoder cannot cache its prompts")
            self.text_encoder = teacher.model
            for p in getattr(teacher.model, "visual", nn.Module()).parameters():
                p.requires_grad_(False)
        else:
            for p in teacher.model.parameters():
                p.requires_grad_(False)
        self._prompt_cache = PromptCache(self._encode_frozen) if cache_prompts else None
        self.tokenize = open_clip_tokenize(teacher.tokenizer)
        self.context_length = int(teacher.tokenizer.context_length)
        self.max_tokens = max_prompt_tokens(self.context_length)

    def set_class_prompts(self, names: list[str]) -> None:
        """Detect's prompts: every name of the vocabulary once (`all_class_prompts`), at
        most `cfg.grounding_eval_names` names a prompt."""
        self._need_teacher()
        self.class_prompts = all_class_prompts(list(names), self.max_tokens, self.tokenize,
                                               self.cfg.grounding_eval_names)

    def _need_teacher(self) -> None:
        if self._teacher is None:
            raise GroundingError("mode grounding needs its text encoder: "
                                 "model.attach_teacher(teacher_from_cache(cache))")

    @torch.no_grad()
    def _encode_frozen(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        return self._teacher.encode_tokens(texts)

    def encode_prompts(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """K prompt texts -> (token features Tensor[K, L, D] in the region space, real-token
        mask Tensor[K, L] bool); L = the teacher's context length."""
        self._need_teacher()
        if self._prompt_cache is not None:
            feats, mask = self._prompt_cache.get(texts)
        elif self.cfg.train_text_encoder:
            feats, mask = self._teacher.encode_tokens(texts)
        else:
            feats, mask = self._encode_frozen(texts)
        return self.token_proj(feats), mask

    def alignment_scores(self, regions: list[Tensor], tokens: Tensor, token_mask: Tensor
                         ) -> list[Tensor]:
        """regions: K Tensor[N_k, D] (the regions each prompt is scored against); tokens:
        Tensor[K, L, D]; token_mask: Tensor[K, L] bool. Fusion (when on) runs on the padded
        batch; returns K logits Tensor[N_k, L] float32."""
        counts = [len(r) for r in regions]
        if len(self.fusion.layers):
            padded, region_mask = pad_rows(regions, self.embed_dim)
            padded, tokens = self.fusion(padded, tokens, token_mask,
                                         region_mask)
            regions = [padded[k, :n] for k, n in enumerate(counts)]
        return [self.alignment(r, tokens[k]) for k, r in enumerate(regions)]

    def grounding_loss(self, region_emb: list[Tensor], matched: list[Tensor],
                       labels: list[Tensor], prompts: list[list]) -> Tensor:
        """grounding_weight x GLIP's focal alignment loss of a batch.

        region_emb, matched, labels: per image the sampled proposals' embeddings Tensor[N_i,
        D], matched GT index Tensor[N_i] and label Tensor[N_i] (0 = background); prompts: per
        image its PromptTargets (positive Tensor[G_i, L]). The focal sums of every (image,
        prompt) over real tokens, divided by all their positive tokens (max 1)."""
        chunks = [(i, p) for i, ps in enumerate(prompts) for p in ps]
        if not chunks:
            return sum(e.sum() for e in region_emb) * 0.0
        tokens, mask = self.encode_prompts([p.text for _, p in chunks])
        logits = self.alignment_scores([region_emb[i] for i, _ in chunks], tokens, mask)
        total = positives = 0.0
        for (i, p), lg, m in zip(chunks, logits, mask):
            positive = p.positive.to(lg.device).float()
            if self.cfg.grounding_span == "last":
                positive = last_token_targets(positive)
            elif self.cfg.grounding_span == "eot":
                positive = eot_targets(positive, m)
            if positive.shape[0] == 0:
                target = torch.zeros_like(lg)
            else:
                target = positive[matched[i]] * (labels[i] > 0)[:, None].float()
            n_pos = (target * m[None]).sum()
            total = total + sigmoid_focal_alignment_loss(lg, target, m) * n_pos.clamp(min=1)
            positives = positives + n_pos
        return self.cfg.grounding_weight * total / torch.as_tensor(positives).clamp(min=1)

    def _scored_spans(self, prompt):
        """The tokens a class of `prompt` is scored by (`TrainConfig.grounding_span`)."""
        if self.cfg.grounding_span == "last":
            return last_token_spans(prompt.spans)
        if self.cfg.grounding_span == "eot":
            return eot_spans(prompt.spans, prompt.n_tokens)
        return prompt.spans

    def grounding_scores(self, emb: list[Tensor]) -> list[Tensor]:
        """emb: per image its proposals' embeddings Tensor[N_i, D] -> per image class scores
        Tensor[N_i, C] (C = the class prompts' vocabulary): the mean sigmoid over each
        class's span (its last token with grounding_span "last", its prompt's end-of-text token
        with "eot"), summed over the prompts (a class is in exactly one)."""
        if not self.class_prompts:
            raise RuntimeError("no class prompts: call set_class_prompts(names) first")
        n_classes = sum(len(p.classes) for p in self.class_prompts)
        tokens, mask = self.encode_prompts([p.text for p in self.class_prompts])
        out = []
        for e in emb:
            logits = self.alignment_scores([e] * len(self.class_prompts), tokens, mask)
            out.append(sum(class_scores(lg, self._scored_spans(p), n_classes)
                           for lg, p in zip(logits, self.class_prompts)))
        return out

    # ------------------------------------------------------------------ pieces

    def _roi_features(self, features: dict[str, Tensor], boxes: list[Tensor],
                      image_sizes: list[tuple[int, int]]) -> Tensor:
        return self.roi_heads.box_roi_pool(features, boxes, image_sizes)

    def _image_tower(self) -> EmbeddingTower:
        return self.image_tower if self.image_tower is not None else self.text_tower

    def cached_targets(self, targets: list[dict[str, Tensor]]) -> tuple[list[Tensor], Tensor]:
        """The cached proposals the image losses use and their teacher targets.

        targets: per image {"cached_boxes": Tensor[M_i, 4], "cached_emb": Tensor[M_i, D],
        optional "cached_scores": Tensor[M_i] (missing = all kept)}. With distill_min_score /
        distill_top_k, each image keeps its `confident_mask`; with a held region mean the
        targets are centred. Returns (boxes per image, Tensor[sum M_i', D] float32).
        """
        cfg = self.cfg
        boxes, teacher = [], []
        for t in targets:
            b, e = t["cached_boxes"], t["cached_emb"]
            if (cfg.distill_min_score > 0 or cfg.distill_top_k > 0) and "cached_scores" in t:
                keep = confident_mask(t["cached_scores"], cfg.distill_min_score,
                                      cfg.distill_top_k)
                b, e = b[keep], e[keep]
            boxes.append(b)
            teacher.append(e.float())  # float16 in the shards; bf16 autocast's cat refuses it
        emb = torch.cat(teacher) if teacher else torch.zeros(0, self.embed_dim)
        return boxes, self._center(emb)

    def text_classifier(self, extra_negatives: Tensor | None = None) -> tuple[Tensor, int]:
        """The ViLD-text training classifier (without the background) and how many of its last
        rows are background aliases.

        Rows: [base texts (B), extra_negatives (K: dictionary concepts, never a target), the
        negative prompts (A, with negative_prompts)]. extra_negatives: Tensor[K, D] or None.
        Returns (Tensor[B + K + A, D] float32, A).
        """
        parts = [self.text_emb[self.is_base]]
        if extra_negatives is not None and extra_negatives.shape[0] > 0:
            parts.append(self._center(F.normalize(extra_negatives.float(), dim=-1).to(
                self.text_emb.device)))
        n_aliases = 0
        if self.cfg.negative_prompts:  # labels never point at these
            if self.neg_emb.shape[0] == 0:
                raise RuntimeError("negative_prompts needs negative texts: "
                                   "set_vocabulary(..., negatives=inputs.load_negatives("
                                   "cache))")
            parts.append(self.neg_emb)
            n_aliases = self.neg_emb.shape[0]
        return torch.cat(parts) if len(parts) > 1 else parts[0], n_aliases

    def pair_region_embeddings(self, images: list[Tensor], boxes: list[Tensor]
                               ) -> list[Tensor]:
        """Region embeddings of given boxes on pair images, from the text tower.

        images: list of B Tensor[3, H_i, W_i] in [0, 1] (already augmented); boxes: list of
        B Tensor[K_i, 4] (x1, y1, x2, y2) in those images' pixels. Returns B Tensor[K_i, D]
        float32, L2-normalised. With pairs_frozen_backbone the backbone runs without a
        gradient: only the text tower learns from these embeddings.
        """
        batch = batch_images(images)
        frozen = self.cfg.pairs_frozen_backbone
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = self.backbone(batch.tensors)
        roi = self._roi_features(features, [b.float() for b in boxes], batch.image_sizes)
        _, emb = self.text_tower(roi)
        return list(emb.split([len(b) for b in boxes]))

    def pair_losses(self, images: list[Tensor], pairs: list[dict[str, Tensor]]
                    ) -> dict[str, Tensor]:
        """{"loss_pairs"}: pairs_weight x DetCLIPv2's text-to-image contrastive loss, and with
        pairs_word_weight > 0 {"loss_pairs_word"}: pairs_weight x pairs_word_weight x
        `losses.pair_word_loss`.

        images: list of B Tensor[3, H_i, W_i] in [0, 1]; pairs: per image {"boxes":
        Tensor[K_i, 4] its top-k cached proposals in its pixels, "phrase_emb": Tensor[P_i, D]
        its caption's phrase embeddings, "phrase_ids": Tensor[P_i] int64 (equal = the same
        phrase text, numbered 0..Q-1 over the batch; read with pairs_negatives "unnamed" and
        the word loss), with pairs_pseudo_weight > 0 "pseudo_boxes": Tensor[P_i, 4] each
        phrase's pseudo-box in its pixels and "pseudo_mask": Tensor[P_i] bool (it has one)},
        K_i, P_i >= 1. pairs_pseudo_weight > 0 adds {"loss_pairs_pseudo"}: pairs_weight x
        pairs_pseudo_weight x `losses.pair_pseudo_loss` on the student's embedding of each
        pseudo-box.
        """
        cfg = self.cfg
        pseudo = cfg.pairs_pseudo_weight > 0
        boxes = [torch.cat([p["boxes"], p["pseudo_boxes"].to(p["boxes"])]) if pseudo
                 else p["boxes"] for p in pairs]
        regions = self.pair_region_embeddings(images, boxes)
        region_emb, region_mask = pad_rows([r[:len(p["boxes"])] for r, p in zip(regions, pairs)],
                                           self.embed_dim)
        phrase_emb, phrase_mask = pad_rows(
            [self._center(F.normalize(p["phrase_emb"].float(), dim=-1)) for p in pairs],
            self.embed_dim)
        ids = torch.full(phrase_mask.shape, -1, dtype=torch.int64, device=phrase_mask.device)
        for i, p in enumerate(pairs):
            ids[i, :len(p["phrase_ids"])] = p["phrase_ids"]
        if cfg.pairs_negatives == "unnamed":
            best = phrase_region_best(region_emb, region_mask, phrase_emb,
                                      soft_tau=cfg.pairs_soft_tau or None)
            loss = pair_phrase_contrastive_loss(best, phrase_mask,
                                                named_elsewhere(ids, phrase_mask), cfg.pairs_tau)
        else:
            sim = pair_set_similarity(region_emb, region_mask, phrase_emb, phrase_mask,
                                      soft_tau=cfg.pairs_soft_tau or None)
            loss = pair_contrastive_loss(sim, cfg.pairs_tau)
        losses = {"loss_pairs": cfg.pairs_weight * loss}
        if cfg.pairs_word_weight > 0:
            word = pair_word_loss(region_emb, region_mask, phrase_emb, ids, phrase_mask,
                                  cfg.pairs_tau)
            losses["loss_pairs_word"] = cfg.pairs_weight * cfg.pairs_word_weight * word
        if pseudo:
            pseudo_emb, _ = pad_rows([r[len(p["boxes"]):] for r, p in zip(regions, pairs)],
                                     self.embed_dim)
            has_box = pad_sequence([p["pseudo_mask"] for p in pairs], batch_first=True)
            term = pair_pseudo_loss(pseudo_emb, has_box, phrase_emb, ids, phrase_mask,
                                    cfg.pairs_tau)
            losses["loss_pairs_pseudo"] = cfg.pairs_weight * cfg.pairs_pseudo_weight * term
        return losses

    # ------------------------------------------------------------------ training

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]],
                pairs: bool = False, extra_negatives: Tensor | None = None,
                prompts: list[list] | None = None) -> dict[str, Tensor]:
        """Training losses.

        images: list of Tensor[3, H_i, W_i] in [0, 1] (already augmented); targets: per image
        {"boxes": Tensor[G, 4], "labels": Tensor[G] int64 in [1, B] (base-class column + 1),
        "cached_boxes": Tensor[M, 4], "cached_emb": Tensor[M, D], optional "cached_scores":
        Tensor[M]}, boxes in the pixels of the augmented image. Returns the named losses
        (each already weighted). pairs=True: `targets` are pairs and the loss is
        `pair_losses` (so DDP syncs a pair iteration like any other). extra_negatives:
        Tensor[K, D], this iteration's dictionary negatives for the ViLD-text classifier.
        prompts (mode grounding): per image its `grounding_data.PromptTargets`; the labels
        then only tell foreground from background (any label >= 1 is an object).
        """
        if pairs:
            return self.pair_losses(images, targets)
        cfg = self.cfg
        batch = batch_images(images)
        features = self.backbone(batch.tensors)
        proposals, losses = self.rpn(batch, features, targets)
        losses = dict(losses)

        sampled, matched, labels, regression_targets = self.roi_heads.select_training_samples(
            proposals, targets)
        per_image = labels
        labels = torch.cat(labels)
        hidden, region_emb = self.text_tower(
            self._roi_features(features, sampled, batch.image_sizes))
        deltas = self.roi_heads.box_predictor(hidden).float()
        losses["loss_box_reg"] = box_regression_loss(
            deltas, torch.cat(regression_targets).float(), labels)
        base = self.text_emb[self.is_base]
        if cfg.mode == "grounding":
            if prompts is None or len(prompts) != len(images):
                raise GroundingError("mode grounding trains on prompts: forward(images, "
                                     "targets, prompts=[[PromptTargets, ...] per image])")
            losses["loss_grounding"] = self.grounding_loss(
                list(region_emb.split([len(s) for s in sampled])), matched, per_image,
                prompts)
        elif cfg.mode == "image":
            logits = region_logits(region_emb, self.bg_embedding.float(), base,
                                   cfg.temperature)
            losses["loss_foreground"] = foreground_loss(logits, labels)
        else:
            classifier, n_aliases = self.text_classifier(extra_negatives)
            logits = region_logits(region_emb, self.bg_embedding.float(), classifier,
                                   cfg.temperature)
            losses["loss_text"] = vild_text_loss_with_aliases(logits, labels, n_aliases)

        if cfg.mode in ("image", "vild"):
            cached, teacher = self.cached_targets(targets)
            _, cached_emb = self._image_tower()(
                self._roi_features(features, cached, batch.image_sizes))
            losses["loss_image"] = vild_image_loss(cached_emb, teacher, cfg.image_loss_weight)
            if cfg.contrastive_weight > 0:
                losses["loss_contrastive"] = cfg.contrastive_weight * contrastive_distill_loss(
                    cached_emb, teacher, cfg.contrastive_tau)
        return losses

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def _detect_grounding(self, images: list[Tensor]) -> list[Detections]:
        """detect() of mode grounding: class scores from `grounding_scores`."""
        batch = batch_images(images)
        features = self.backbone(batch.tensors)
        proposals, _ = self.rpn(batch, features)
        hidden, emb = self.text_tower(self._roi_features(features, proposals,
                                                         batch.image_sizes))
        deltas = self.roi_heads.box_predictor(hidden).float()
        scores = self.grounding_scores(list(emb.split([len(p) for p in proposals])))
        return _finish(self, deltas, proposals, torch.cat(scores), batch.image_sizes)

    @torch.no_grad()
    def detect(self, images: list[Tensor], ensemble: bool = False,
               logit_bias: Tensor | None = None) -> list[Detections]:
        """Detections over the whole vocabulary (base and novel).

        images: list of Tensor[3, H_i, W_i] in [0, 1]. Scores: softmax over [bg, classes] of
        the text head; with `ensemble`, ViLD-ensemble of the text and image heads.
        logit_bias: Tensor[C], one value per vocabulary class, subtracted from the class
        logits before the softmax (the text head's columns 1:, and the image head's too
        with `ensemble`); None or zeros change nothing.
        """
        if self.text_emb.shape[0] == 0:
            raise RuntimeError("no vocabulary: call set_vocabulary(text_emb, is_base) first")
        if self.cfg.mode == "grounding":
            return self._detect_grounding(images)
        if ensemble and self.image_tower is None:
            raise ValueError("ViLD-ensemble needs a model trained with heads=separate "
                             "(a text head and an image head); this one has one shared head")
        n_classes = self.text_emb.shape[0]
        if logit_bias is not None:
            if tuple(logit_bias.shape) != (n_classes,):
                raise ValueError(f"logit_bias has shape {tuple(logit_bias.shape)}; the "
                                 f"vocabulary has {n_classes} classes")
            logit_bias = logit_bias.float().to(self.text_emb.device)
        batch = batch_images(images)
        features = self.backbone(batch.tensors)
        proposals, _ = self.rpn(batch, features)
        roi = self._roi_features(features, proposals, batch.image_sizes)
        hidden, emb = self.text_tower(roi)
        deltas = self.roi_heads.box_predictor(hidden).float()
        # background aliases (negative prompts) sit after the classes; their share is dropped
        aliases = self.neg_emb if self.cfg.negative_prompts else self.neg_emb[:0]
        logits = region_logits(emb, self.bg_embedding.float(),
                               torch.cat([self.text_emb, aliases]), self.cfg.temperature)
        if logit_bias is not None:
            logits = torch.cat([logits[:, :1], logits[:, 1:n_classes + 1] - logit_bias,
                                logits[:, n_classes + 1:]], dim=1)
        p_text = logits.softmax(-1)[:, 1:n_classes + 1]
        if ensemble:
            _, emb_image = self.image_tower(roi)
            with float32_region(emb_image.device):
                logits_image = emb_image.float() @ self.text_emb.float().t() / self.cfg.temperature
            if logit_bias is not None:
                logits_image = logits_image - logit_bias
            scores = ensemble_scores(p_text, logits_image.softmax(-1), self.is_base)
        else:
            scores = p_text
        boxes = self.roi_heads.box_coder.decode(deltas, proposals).reshape(-1, 4)
        out = []
        counts = [len(p) for p in proposals]
        for b, s, size in zip(boxes.split(counts), scores.split(counts), batch.image_sizes):
            kept = postprocess(b, s, size, self.cfg.score_thresh, self.cfg.final_nms,
                               self.detections_per_image)
            out.append(Detections(*kept))
        return out


def _finish(model: OpenVocabDetector, deltas: Tensor, proposals: list[Tensor],
            scores: Tensor, image_sizes) -> list[Detections]:
    """Decoded boxes + class scores Tensor[sum N_i, C] -> per-class NMS'd detections."""
    boxes = model.roi_heads.box_coder.decode(deltas, proposals).reshape(-1, 4)
    counts = [len(p) for p in proposals]
    return [Detections(*postprocess(b, s, size, model.cfg.score_thresh, model.cfg.final_nms,
                                    model.detections_per_image))
            for b, s, size in zip(boxes.split(counts), scores.split(counts), image_sizes)]


def read_init_checkpoint(path: str) -> dict:
    """A checkpoint to initialise from: a state dict, or a dict holding one under "model" /
    "state_dict" (and, for the RPN stage's rpn.pt, its "arch")."""
    return load_weights(path, "init checkpoint")


def arch_overrides(blob: dict) -> dict:
    """TrainConfig fields that make this model's backbone and RPN match an RPN-stage
    checkpoint's "arch" (empty for a plain state dict)."""
    arch = blob.get("arch") if isinstance(blob, dict) else None
    if not isinstance(arch, dict):
        return {}
    out = {k: arch[k] for k in ("backbone", "returned_layers", "anchor_sizes") if k in arch}
    out["norm"] = "batch"  # the RPN stage trains its backbone with BatchNorm2d
    return out


def load_init_weights(model: OpenVocabDetector, path: str) -> list[str]:
    """Copy backbone.* and rpn.* weights from checkpoint `path` into `model`. Returns the
    loaded key prefixes; a shape mismatch or a checkpoint with none of them is an error
    naming the file."""
    blob = read_init_checkpoint(path)
    for key in ("model", "state_dict"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    own = model.state_dict()
    take = {k: v for k, v in blob.items()
            if k.split(".", 1)[0] in ("backbone", "rpn") and k in own}
    if not take:
        raise CheckpointError(f"{path}: no backbone.* or rpn.* weights matching this model")
    for k, v in take.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(own[k].shape)} (check backbone, returned_layers, "
                                  f"anchor_sizes, norm)")
    model.load_state_dict(take, strict=False)
    return sorted({k.split(".", 1)[0] for k in take})
