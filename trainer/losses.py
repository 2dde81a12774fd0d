"""ViLD losses as plain functions on tensors.

The RPN losses are torchvision's own (`RegionProposalNetwork.compute_loss`, returned by the
RPN module); the second-stage box loss below is torchvision's `fastrcnn_loss` box term made
class-agnostic. Region and text embeddings are expected L2-normalized.

The remedies of later papers (all off by default, see `TrainConfig`) are plain functions too:
`confident_mask` (BARON / object-centric OVD: distil only confident proposals),
`contrastive_distill_loss` (BARON: InfoNCE instead of / beside L1) and `center_embeddings`
(the modality gap: take the teacher's common direction out of targets and texts).

DetCLIPv2's word-region alignment on image-text pairs: `pair_set_similarity` (each phrase of a
caption against its best region of an image) and `pair_contrastive_loss` (text-to-image only);
`pair_phrase_contrastive_loss`, the same contrast per phrase without the negatives whose own
caption names the phrase; `pair_word_loss`, a phrase-side term inside each image (its regions
choose among the batch's phrases, so a region must tell a red heart from a red square, which
the image-level contrast never asks).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from ovdistill.pipeline.precision import float32_region
from torch import Tensor


def region_logits(region_emb: Tensor, bg_emb: Tensor, text_emb: Tensor, tau: float) -> Tensor:
    """Cosine-similarity logits against [background, classes].

    region_emb: Tensor[N, D] L2-normalized; bg_emb: Tensor[D] (normalized here);
    text_emb: Tensor[C, D] L2-normalized. Returns Tensor[N, 1 + C] = sim / tau,
    column 0 = background, float32 (autocast off: in bf16 a logit near 100 at tau 0.01 is
    only good to 0.5).
    """
    with float32_region(region_emb.device):
        classifier = torch.cat([F.normalize(bg_emb.float(), dim=-1)[None], text_emb.float()],
                               dim=0)
        return region_emb.float() @ classifier.t() / tau


def vild_text_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """ViLD-text: softmax cross-entropy over [background, base classes].

    logits: Tensor[N, 1 + B]; labels: Tensor[N] int64 in [0, B], 0 = background.
    Mean over the N sampled live proposals.
    """
    return F.cross_entropy(logits, labels)


def vild_text_loss_with_aliases(logits: Tensor, labels: Tensor, n_aliases: int) -> Tensor:
    """ViLD-text where the last `n_aliases` columns are more names of background (generic
    negative prompts): a background proposal's probability is the summed softmax of column 0
    and those columns, a base proposal's is its class column.

    logits: Tensor[N, 1 + B + K] ([bg, base classes, K aliases]); labels: Tensor[N] int64 in
    [0, B], 0 = background. Mean over N. With K = 0 it equals `vild_text_loss`.
    """
    log_p = F.log_softmax(logits, dim=-1)
    n_cls = logits.shape[1] - n_aliases
    bg_cols = torch.cat([log_p[:, :1], log_p[:, n_cls:]], dim=1)
    log_bg = torch.logsumexp(bg_cols, dim=1)
    log_cls = log_p.gather(1, labels.clamp(max=n_cls - 1)[:, None])[:, 0]
    return -torch.where(labels == 0, log_bg, log_cls).mean()


def foreground_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Class-agnostic foreground / background cross-entropy (the ViLD-image-only ablation).

    p_bg = softmax(logits)[:, 0]; the loss is -log p_bg on background proposals and
    -log(1 - p_bg) on foreground ones, so no base-category identity is supervised.
    logits: Tensor[N, 1 + B]; labels: Tensor[N] int64, 0 = background. Mean over N.
    """
    log_p = F.log_softmax(logits, dim=-1)
    log_bg = log_p[:, 0]
    log_fg = torch.logsumexp(log_p[:, 1:], dim=-1)
    return -torch.where(labels == 0, log_bg, log_fg).mean()


def vild_image_loss(region_emb: Tensor, teacher_emb: Tensor, weight: float = 0.5) -> Tensor:
    """ViLD-image: L1 distance to the teacher's embedding, summed over dimensions and averaged
    over proposals, times `weight` (0.5 in the paper for ResNet-50).

    region_emb: Tensor[M, D] L2-normalized; teacher_emb: Tensor[M, D] L2-normalized.
    M = 0 gives a zero that still depends on region_emb (so DDP sees every parameter used).
    """
    if region_emb.shape != teacher_emb.shape:
        raise ValueError(f"region embeddings {tuple(region_emb.shape)} and teacher embeddings "
                         f"{tuple(teacher_emb.shape)} differ in shape")
    if region_emb.shape[0] == 0:
        return region_emb.sum() * 0.0
    per_proposal = (region_emb - teacher_emb.to(region_emb.dtype)).abs().sum(dim=-1)
    return weight * per_proposal.mean()


def mean_direction_baseline(teacher_emb: Tensor, weight: float = 0.5) -> Tensor:
    """The ViLD-image loss a student would get by predicting one constant embedding, the
    normalized mean of the teacher embeddings, for every proposal.

    CLIP region embeddings share a large common direction, so this is far below the loss of
    an untrained head; a `loss_image` that stays at this level means the student has learned
    only that direction, nothing that tells regions apart.
    teacher_emb: Tensor[M, D] L2-normalized. Returns a scalar (0 for M = 0).
    """
    if teacher_emb.shape[0] == 0:
        return teacher_emb.new_zeros(())
    mean = F.normalize(teacher_emb.float().mean(dim=0), dim=0)
    return vild_image_loss(mean.expand_as(teacher_emb), teacher_emb.float(), weight)


def confident_mask(scores: Tensor, min_score: float, top_k: int) -> Tensor:
    """Which cached proposals to distil: RPN score >= `min_score`, then at most the `top_k`
    highest-scored of those (`top_k` = 0: no cap).

    scores: Tensor[M] (the proposals' RPN scores). Returns Tensor[M] bool.
    """
    keep = scores >= min_score
    if top_k > 0 and int(keep.sum()) > top_k:
        best = scores.float().masked_fill(~keep, -math.inf).topk(top_k).indices
        keep = torch.zeros_like(keep)
        keep[best] = True
    return keep


def contrastive_distill_loss(student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """Symmetric InfoNCE between student and teacher region embeddings (BARON).

    student: Tensor[M, D], teacher: Tensor[M, D], both L2-normalized, row i of each the same
    proposal. logits = student @ teacher.T / tau; the loss is the mean of the cross-entropy
    with diagonal targets over rows (student -> teacher) and over columns (teacher ->
    student), divided by 2. The other proposals of the batch are the negatives. Computed in
    float32 (autocast off). M = 0 gives a zero that still depends on `student`.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student embeddings {tuple(student.shape)} and teacher embeddings "
                         f"{tuple(teacher.shape)} differ in shape")
    if student.shape[0] == 0:
        return student.sum() * 0.0
    with float32_region(student.device):
        logits = student.float() @ teacher.float().t() / tau
        target = torch.arange(student.shape[0], device=student.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def center_embeddings(emb: Tensor, mean: Tensor) -> Tensor:
    """Embeddings with the teacher's common direction taken out: L2-normalize(emb - mean).

    emb: Tensor[N, D]; mean: Tensor[D] (the cache's normalized mean region embedding).
    Returns Tensor[N, D] float32, L2-normalized.
    """
    return F.normalize(emb.float() - mean.float().to(emb.device), dim=-1)


def box_regression_loss(box_deltas: Tensor, regression_targets: Tensor, labels: Tensor,
                        beta: float = 1.0 / 9) -> Tensor:
    """Class-agnostic box regression: smooth-L1 on the foreground proposals, summed, divided
    by the number of sampled proposals (torchvision's `fastrcnn_loss` normalisation).

    box_deltas: Tensor[N, 4]; regression_targets: Tensor[N, 4] (BoxCoder encoding);
    labels: Tensor[N] int64, 0 = background.
    """
    pos = labels > 0
    loss = F.smooth_l1_loss(box_deltas[pos], regression_targets[pos], beta=beta,
                            reduction="sum")
    return loss / max(1, labels.numel())


def pad_rows(rows: list[Tensor], dim: int) -> tuple[Tensor, Tensor]:
    """Per-item row sets -> one padded batch.

    rows: B tensors Tensor[n_i, dim]. Returns (Tensor[B, N, dim] float32 with zeros after
    each item's rows, mask Tensor[B, N] bool, True on real rows), N = max(1, max n_i).
    """
    n = max([1, *(int(r.shape[0]) for r in rows)])
    device = rows[0].device if rows else None
    out = torch.zeros(len(rows), n, dim, device=device)
    mask = torch.zeros(len(rows), n, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r.float()
        mask[i, : r.shape[0]] = True
    return out, mask


def phrase_region_best(region_emb: Tensor, region_mask: Tensor, phrase_emb: Tensor,
                       soft_tau: float | None = None) -> Tensor:
    """Each phrase of every caption against its best region of every image of a batch.

    region_emb: Tensor[B, K, D], region_mask: Tensor[B, K] bool, phrase_emb: Tensor[B, P, D]
    (L2-normalised; padding anywhere). Returns best Tensor[B, B, P] float32 with best[b, a,
    p] = max over image b's real regions of cos(caption a's phrase p, region) (soft_tau > 0:
    the softmax(cos / soft_tau)-weighted mean of cos instead), 0 for an image without
    regions. Padded phrases get values too; the caller masks them."""
    with float32_region(region_emb.device):
        cos = torch.einsum("bkd,apd->bakp", region_emb.float(), phrase_emb.float())
        valid = region_mask[:, None, :, None]  # [B, 1, K, 1]
        if soft_tau:
            # a finite fill: an image without regions gets weights 0, not NaN
            logits = (cos / soft_tau).masked_fill(~valid, torch.finfo(cos.dtype).min)
            return (logits.softmax(dim=2) * valid * cos).sum(dim=2)  # [B, B, P]
        best = cos.masked_fill(~valid, -math.inf).amax(dim=2)
        return best.masked_fill(~region_mask.any(dim=1)[:, None, None], 0.0)


def pair_set_similarity(region_emb: Tensor, region_mask: Tensor, phrase_emb: Tensor,
                        phrase_mask: Tensor, soft_tau: float | None = None) -> Tensor:
    """DetCLIPv2's set similarity of every image with every caption of a batch.

    region_emb: Tensor[B, K, D], the region embeddings of each image's top-K proposals;
    region_mask: Tensor[B, K] bool (True = a real region, False = padding);
    phrase_emb: Tensor[B, P, D], the phrase embeddings of each caption; phrase_mask:
    Tensor[B, P] bool. Both embeddings L2-normalised. Returns sim Tensor[B, B] float32 with
    sim[b, a] = s(I_b, T_a) = mean over caption a's phrases p of
    max over image b's regions k of cos(phrase_p, region_k).
    soft_tau > 0 (the soft variant) replaces the max by the softmax(cos / soft_tau)-weighted
    mean of cos over the regions; it tends to the max as soft_tau -> 0. None or 0 = max.
    Padding changes nothing; an image without regions or a caption without phrases scores 0
    (the pair stream never batches one). Computed in float32 (autocast off).
    """
    best = phrase_region_best(region_emb, region_mask, phrase_emb, soft_tau)
    with float32_region(region_emb.device):
        pm = phrase_mask[None, :, :].float()  # [1, B, P]
        return (best * pm).sum(dim=2) / pm.sum(dim=2).clamp(min=1.0)


def named_elsewhere(phrase_ids: Tensor, phrase_mask: Tensor) -> Tensor:
    """Which images' captions name each phrase.

    phrase_ids: Tensor[B, P] int64, one id per distinct phrase text of the batch (any value
    on padding); phrase_mask: Tensor[B, P] bool. Returns Tensor[B, B, P] bool, [b, a, p] =
    caption b names caption a's phrase p (True on b == a for every real phrase)."""
    same = phrase_ids[:, None, :, None] == phrase_ids[None, :, None, :]  # [b, a, q, p]
    same = same & phrase_mask[:, None, :, None] & phrase_mask[None, :, None, :]
    return same.any(dim=2)


def pair_phrase_contrastive_loss(best: Tensor, phrase_mask: Tensor, named: Tensor,
                                 tau: float) -> Tensor:
    """Text-to-image contrast per phrase, leaving out of a phrase's softmax every other image
    whose own caption names that phrase: the false negatives of a small vocabulary (on the
    toy, a negative image holds a phrase's category 16 % of the time, and its best region, a
    true instance, is then the negative the softmax pushes down hardest).

    best: Tensor[B, B, P] (`phrase_region_best`: [b, a, p] = caption a's phrase p against
    image b); phrase_mask: Tensor[B, P] bool; named: Tensor[B, B, P] bool
    (`named_elsewhere`). For each real phrase (a, p): cross-entropy of softmax over the
    images b with b == a or not named[b, a, p] of best[b, a, p] / tau, target image a; the
    mean over the real phrases of the batch. Float32; 0 (with a gradient) for no phrase."""
    with float32_region(best.device):
        n_images = best.shape[0]
        own = torch.eye(n_images, dtype=torch.bool, device=best.device)[:, :, None]
        logits = (best.float() / tau).masked_fill(named & ~own, -math.inf)  # [b, a, p]
        logits = logits.permute(1, 2, 0)  # [a, p, b]
        target = torch.arange(n_images, device=best.device)[:, None].expand(-1, best.shape[2])
        loss = F.cross_entropy(logits.reshape(-1, n_images), target.reshape(-1),
                               reduction="none").view(n_images, -1)
        mask = phrase_mask.float()
        return (loss * mask).sum() / mask.sum().clamp(min=1.0)


def pair_contrastive_loss(sim: Tensor, tau: float) -> Tensor:
    """DetCLIPv2's contrastive loss, text-to-image only (a caption describes only part of its
    image, so the images are not asked to pick their caption).

    sim: Tensor[B, B] with sim[b, a] = s(I_b, T_a) (`pair_set_similarity`). For each caption
    a: cross-entropy of softmax over the B images of sim[:, a] / tau, target image a; the mean
    over a. Float32.
    """
    with float32_region(sim.device):
        logits = sim.float().t() / tau  # row a: caption a against every image
        return F.cross_entropy(logits, torch.arange(sim.shape[0], device=sim.device))


def batch_phrase_texts(phrase_emb: Tensor, phrase_ids: Tensor, phrase_mask: Tensor) -> Tensor:
    """The distinct phrases of a batch, one row each.

    phrase_emb: Tensor[B, P, D]; phrase_ids: Tensor[B, P] int64, equal = the same phrase text,
    the distinct texts numbered 0..Q-1 (`pair_data.collate_pairs`); phrase_mask: Tensor[B, P]
    bool. Returns Tensor[Q, D]: row q = the embedding of phrase id q (equal texts have equal
    embeddings, so any occurrence serves)."""
    ids = phrase_ids[phrase_mask]
    n = int(ids.max()) + 1 if ids.numel() else 0
    texts = phrase_emb.new_zeros(n, phrase_emb.shape[-1])
    texts[ids] = phrase_emb[phrase_mask].to(texts.dtype)
    return texts


def pair_word_loss(region_emb: Tensor, region_mask: Tensor, phrase_emb: Tensor,
                   phrase_ids: Tensor, phrase_mask: Tensor, tau: float) -> Tensor:
    """Phrase-side multiple-instance loss inside each pair image: the caption says one of the
    image's regions is each named phrase, and that region should name it rather than any other
    phrase of the batch.

    region_emb: Tensor[B, K, D], region_mask: Tensor[B, K] bool; phrase_emb: Tensor[B, P, D],
    phrase_ids: Tensor[B, P] int64 (distinct texts numbered 0..Q-1), phrase_mask: Tensor[B, P]
    bool; embeddings L2-normalised. Each region's log-softmax over the Q distinct phrases of
    the batch at temperature tau, log q[b, k, .]; for each real phrase (b, p) with id c:
    s[b, p] = max over image b's real regions k of log q[b, k, c]; the loss is the mean over
    the real phrases of -s. The region is chosen by how much more it names c than the other
    phrases, not by cosine alone (the image-level max picks a same-colour square for "red
    heart" as readily as the heart). Float32; 0 (with a gradient) for no phrase or no region.
    """
    with float32_region(region_emb.device):
        real = phrase_mask & region_mask.any(dim=1, keepdim=True)
        if not real.any():
            return region_emb.float().sum() * 0.0
        texts = batch_phrase_texts(phrase_emb.float(), phrase_ids, phrase_mask)  # [Q, D]
        logq = (torch.einsum("bkd,qd->bkq", region_emb.float(), texts) / tau).log_softmax(-1)
        ids = phrase_ids.clamp(min=0)[:, None, :].expand(-1, logq.shape[1], -1)  # [B, K, P]
        picked = logq.gather(2, ids).masked_fill(~region_mask[:, :, None], -math.inf)
        best = picked.amax(dim=1)  # [B, P]
        mask = real.float()
        return -(best.masked_fill(~real, 0.0) * mask).sum() / mask.sum().clamp(min=1.0)


def pair_pseudo_loss(pseudo_emb: Tensor, pseudo_mask: Tensor, phrase_emb: Tensor,
                     phrase_ids: Tensor, phrase_mask: Tensor, tau: float) -> Tensor:
    """The word loss with the region chosen by the teacher, not by the student: each phrase
    that has a pseudo-box (stage `pseudo_boxes`: the pair proposal whose teacher embedding
    names the phrase best, kept by that stage's rule) must be named by the student's
    embedding of that box rather than by any other phrase of the batch.

    pseudo_emb: Tensor[B, P, D] the student's embedding of each phrase's pseudo-box,
    pseudo_mask: Tensor[B, P] bool (the phrase has one); phrase_emb: Tensor[B, P, D],
    phrase_ids: Tensor[B, P] int64 (distinct texts numbered 0..Q-1), phrase_mask: Tensor[B, P]
    bool; embeddings L2-normalised. The loss is the mean over the phrases with a pseudo-box of
    -log softmax over the Q distinct phrases of cos(pseudo_emb[b, p], text) / tau at the
    phrase's own id. A max over the student's regions (`pair_word_loss`) confirms whatever
    region the student already prefers; the teacher's pick does not depend on the student.
    Float32; 0 (with a gradient) when no phrase has a pseudo-box.
    """
    with float32_region(pseudo_emb.device):
        real = phrase_mask & pseudo_mask
        if not real.any():
            return pseudo_emb.float().sum() * 0.0
        texts = batch_phrase_texts(phrase_emb.float(), phrase_ids, phrase_mask)  # [Q, D]
        logq = (pseudo_emb.float()[real] @ texts.t() / tau).log_softmax(-1)  # [N, Q]
        return -logq.gather(1, phrase_ids[real][:, None]).mean()
