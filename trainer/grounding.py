"""GLIP's detection as grounding: region-token alignment scores, their targets and sigmoid
focal loss, class scores from phrase spans, and the cross-modality fusion (X-MHA).

Prompts and their token spans come from `ovdistill.pipeline.prompts`; token features from
`Teacher.encode_tokens` (Tensor[T, W] per prompt, position 0 = start-of-text) through a
`TokenProjection` into the region embedding space (D).

A span is (first token, last token + 1) in the tokenized prompt; `spans` maps a class index
to its span in one prompt. A class without a span in a prompt (chunked into another one) is
absent from it: its regions get all-zero targets there and its class score is 0, so the
class scores of a vocabulary's chunks add up.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from ovdistill.pipeline.errors import OvdError
from ovdistill.pipeline.precision import float32_region
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

Spans = Mapping[int, tuple[int, int]]  # class index -> (first token, last token + 1)


class GroundingError(OvdError, ValueError):
    """Grounding inputs that do not fit together (a span outside the prompt, a bad
    normaliser); one line says which."""


def glip_bias_init(prior: float = 0.01) -> float:
    """GLIP's alignment bias init, -log((1 - prior) / prior): every sigmoid starts at
    `prior` (-4.595 for 0.01)."""
    return -math.log((1 - prior) / prior)


# ----------------------------------------------------------------------------- modules


class TokenProjection(nn.Module):
    """Token features W -> D (the region embedding space): tokens Tensor[..., T, W] ->
    Tensor[..., T, D]. Whether the text encoder under it trains is the trainer's choice."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(width, dim)

    @classmethod
    def from_text_projection(cls, text_projection: Tensor) -> TokenProjection:
        """Started as the teacher's own `text_projection` (Tensor[W, D], bias 0), so the
        end-of-text token lands where `encode_text` puts the whole prompt."""
        width, dim = text_projection.shape
        module = cls(width, dim)
        with torch.no_grad():
            module.proj.weight.copy_(text_projection.detach().t())
            module.proj.bias.zero_()
        return module

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(tokens)


class AlignmentHead(nn.Module):
    """GLIP's alignment parameters and `alignment_logits`: a learned temperature
    (`log_scale`, tau = exp(log_scale), started at `tau`), a learned scalar bias started at
    `glip_bias_init(prior)`, and optionally GLIP's text-conditioned bias (tokens . w, w
    started at 0).

    forward(regions Tensor[..., N, D], tokens Tensor[..., T, D]) -> Tensor[..., N, T]."""

    def __init__(self, dim: int, tau: float = 0.07, prior: float = 0.01,
                 text_bias: bool = False):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(tau)))
        self.bias = nn.Parameter(torch.tensor(glip_bias_init(prior)))
        self.bias_lang = nn.Parameter(torch.zeros(dim)) if text_bias else None

    def forward(self, regions: Tensor, tokens: Tensor) -> Tensor:
        token_bias = None
        if self.bias_lang is not None:
            token_bias = F.normalize(tokens.float(), dim=-1) @ self.bias_lang.float()
        return alignment_logits(regions, tokens, self.log_scale, self.bias, token_bias)


class CrossModalFusion(nn.Module):
    """One layer of GLIP's X-MHA: bidirectional cross attention between regions and prompt
    tokens. Regions attend to tokens and tokens to regions (both from the layer's input);
    each side adds the other's attended values, pre-norm and scaled by a learned per-channel
    gamma started at `init_scale` (GLIP's BiAttentionBlock: 1e-4, so fusion starts near the
    identity and does not scramble the aligned embeddings).

    forward(regions Tensor[B, N, D] (or [N, D]), tokens Tensor[B, T, D] (or [T, D]),
    token_mask Tensor[B, T] (or [T]) bool True = real token, region_mask Tensor[B, N] bool
    True = real region, optional) -> (regions, tokens) of the same shapes. A padded token
    changes no region and a padded region no token."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, init_scale: float = 1e-4):
        super().__init__()
        self.norm_regions = nn.LayerNorm(dim)
        self.norm_tokens = nn.LayerNorm(dim)
        self.regions_from_tokens = nn.MultiheadAttention(dim, heads, dropout=dropout,
                                                         batch_first=True)
        self.tokens_from_regions = nn.MultiheadAttention(dim, heads, dropout=dropout,
                                                         batch_first=True)
        self.gamma_regions = nn.Parameter(torch.full((dim,), float(init_scale)))
        self.gamma_tokens = nn.Parameter(torch.full((dim,), float(init_scale)))

    def forward(self, regions: Tensor, tokens: Tensor, token_mask: Tensor | None = None,
                region_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        single = regions.dim() == 2
        if single:
            regions, tokens = regions[None], tokens[None]
            token_mask = None if token_mask is None else token_mask[None]
            region_mask = None if region_mask is None else region_mask[None]
        r, t = self.norm_regions(regions), self.norm_tokens(tokens)
        d_regions = _attend(self.regions_from_tokens, r, t, token_mask)
        d_tokens = _attend(self.tokens_from_regions, t, r, region_mask)
        regions = regions + self.gamma_regions * d_regions
        tokens = tokens + self.gamma_tokens * d_tokens
        return (regions[0], tokens[0]) if single else (regions, tokens)


def _attend(attention: nn.MultiheadAttention, queries: Tensor, keys: Tensor,
            key_mask: Tensor | None) -> Tensor:
    """queries Tensor[B, Q, D] attending to keys Tensor[B, K, D] (key_mask Tensor[B, K] True
    = real) -> Tensor[B, Q, D]; a row with no real key attends to nothing (zeros), where
    MultiheadAttention would give NaN."""
    if key_mask is None:
        return attention(queries, keys, keys, need_weights=False)[0]
    key_mask = key_mask.bool()
    empty = ~key_mask.any(dim=1)  # [B]
    padding = ~key_mask & ~empty[:, None]
    out = attention(queries, keys, keys, key_padding_mask=padding, need_weights=False)[0]
    return out.masked_fill(empty[:, None, None], 0.0)


class FusionStack(nn.Module):
    """`layers` `CrossModalFusion` layers one after the other (0: the identity); forward as
    `CrossModalFusion.forward`."""

    def __init__(self, layers: int, dim: int, heads: int, dropout: float = 0.0,
                 init_scale: float = 1e-4):
        super().__init__()
        self.layers = nn.ModuleList(CrossModalFusion(dim, heads, dropout, init_scale)
                                    for _ in range(int(layers)))

    def forward(self, regions: Tensor, tokens: Tensor, token_mask: Tensor | None = None,
                region_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        for layer in self.layers:
            regions, tokens = layer(regions, tokens, token_mask, region_mask)
        return regions, tokens


# ----------------------------------------------------------------------------- functions


def alignment_logits(regions: Tensor, tokens: Tensor, log_scale: Tensor | float,
                     bias: Tensor | float, token_bias: Tensor | None = None) -> Tensor:
    """GLIP's alignment scores S = O P^T / exp(log_scale) + bias (+ token_bias per token).

    regions: Tensor[..., N, D] (O); tokens: Tensor[..., T, D] (P); both are L2-normalised
    here, so O P^T is a cosine; log_scale, bias: scalars (tensors to learn them);
    token_bias: Tensor[..., T] or None (GLIP's text-conditioned bias). Returns
    Tensor[..., N, T] float32 (autocast off, as the other logits of the trainer)."""
    with float32_region(regions.device):
        o = F.normalize(regions.float(), dim=-1)
        p = F.normalize(tokens.float(), dim=-1)
        log_scale = torch.as_tensor(log_scale, device=o.device).float()
        logits = o @ p.transpose(-1, -2) / log_scale.exp() + torch.as_tensor(
            bias, device=o.device).float()
        if token_bias is not None:
            logits = logits + token_bias.float().unsqueeze(-2)
        return logits


def class_token_map(spans: Spans, n_classes: int, n_tokens: int,
                    device: torch.device | str | None = None) -> Tensor:
    """spans (class -> (first, last + 1)) -> Tensor[C, T] float32, 1 on each class's span
    tokens; classes without a span are all zero."""
    out = torch.zeros(n_classes, n_tokens, device=device)
    for c, (start, end) in spans.items():
        if not (0 <= c < n_classes and 0 <= start < end <= n_tokens):
            raise GroundingError(f"span {(start, end)} of class {c} does not fit "
                                 f"{n_classes} classes and {n_tokens} tokens")
        out[c, start:end] = 1.0
    return out


def grounding_targets(labels: Tensor, spans: Spans, n_tokens: int) -> Tensor:
    """A region's target row over the prompt's tokens: 1 on its class's span.

    labels: Tensor[N] int64, a class index or -1 for background; spans: the prompt's class
    spans; n_tokens: T. Returns Tensor[N, T] float32 0/1; background (and a class without a
    span in this prompt) is all zero."""
    labels = labels.long()
    n_classes = max([int(labels.max()) + 1 if labels.numel() else 0, *(c + 1 for c in spans)])
    table = class_token_map(spans, max(n_classes, 1), n_tokens, labels.device)
    fg = labels >= 0
    return table[labels.clamp(min=0)] * fg[:, None]


def sigmoid_focal_alignment_loss(logits: Tensor, targets: Tensor, token_mask: Tensor,
                                 alpha: float = 0.25, gamma: float = 2.0,
                                 normalize: str = "tokens") -> Tensor:
    """GLIP's token sigmoid focal loss: torchvision's `sigmoid_focal_loss` per (region,
    token), on real tokens only, summed and divided by the number of positives.

    logits, targets: Tensor[..., N, T] (targets 0/1, `grounding_targets`); token_mask:
    Tensor[..., T] bool, True = real token (padding does not count; a background row adds
    only its negatives). normalize: "tokens" (the default, the issue's definition) divides by
    the positive (region, token) entries, max 1; "regions" by the regions with a positive
    token, max 1 (GLIP's code: `num_pos_avg_per_gpu`, the positive anchors). Returns a scalar
    float32."""
    if normalize not in ("regions", "tokens"):
        raise GroundingError(f"focal alignment normalize must be 'regions' or 'tokens', "
                             f"got {normalize!r}")
    with float32_region(logits.device):
        mask = token_mask.bool().unsqueeze(-2).expand_as(logits)
        targets = targets.float() * mask
        loss = sigmoid_focal_loss(logits.float(), targets, alpha=alpha, gamma=gamma,
                                  reduction="none")
        total = (loss * mask).sum()
        if normalize == "regions":
            positives = (targets > 0).any(dim=-1).sum()
        else:
            positives = (targets > 0).sum()
        return total / positives.clamp(min=1).float()


def last_token_spans(spans: Spans) -> dict[int, tuple[int, int]]:
    """Each class's span cut to its last token: (first, end) -> (end - 1, end)."""
    return {c: (end - 1, end) for c, (_, end) in spans.items()}


def last_token_targets(positive: Tensor) -> Tensor:
    """positive: Tensor[G, L] 0/1, row g 1 on its phrase's tokens -> the same rows 1 on the
    last of them only (an all-zero row stays zero)."""
    if positive.numel() == 0:
        return positive
    on = positive > 0
    last = on.shape[-1] - 1 - on.flip(-1).float().argmax(dim=-1)  # the last True per row
    out = torch.zeros_like(positive)
    out.scatter_(-1, last[:, None], 1.0)
    return out * on.any(dim=-1, keepdim=True)


def eot_spans(spans: Spans, n_tokens: int) -> dict[int, tuple[int, int]]:
    """Each class of a one-phrase prompt scored by the prompt's end-of-text token
    (position n_tokens - 1, n_tokens counting start- and end-of-text)."""
    if len(spans) > 1:
        raise GroundingError(f"end-of-text scoring needs one phrase a prompt, got classes "
                             f"{sorted(spans)} in one")
    return {c: (n_tokens - 1, n_tokens) for c in spans}


def eot_targets(positive: Tensor, token_mask: Tensor) -> Tensor:
    """positive: Tensor[G, L] 0/1 of a one-phrase prompt; token_mask: Tensor[L] bool (real
    tokens, end-of-text last) -> the same rows 1 on the end-of-text token only (an
    all-zero row stays zero)."""
    out = torch.zeros_like(positive)
    if positive.numel():
        eot = int(token_mask.sum()) - 1
        out[:, eot] = (positive > 0).any(dim=-1).to(out.dtype)
    return out


def class_scores(logits: Tensor, spans: Spans, n_classes: int) -> Tensor:
    """At inference a class scores the mean sigmoid over its phrase's tokens.

    logits: Tensor[..., N, T]; spans: the prompt's class spans. Returns Tensor[..., N, C]
    float32; a class without a span in this prompt scores 0."""
    with float32_region(logits.device):
        table = class_token_map(spans, n_classes, logits.shape[-1], logits.device)
        weights = table / table.sum(dim=1, keepdim=True).clamp(min=1)
        return torch.sigmoid(logits.float()) @ weights.t()
