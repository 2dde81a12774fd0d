"""GLIP's grounding pieces: the teacher's per-token text features against open_clip's own
`encode_text`, the alignment logits and their focal loss against values computed by hand,
targets and class scores from spans, and the cross-modality fusion layer."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip
from ovdistill.pipeline import clip_teacher as T
from ovdistill.pipeline.prompts import all_class_prompts, max_prompt_tokens, open_clip_tokenize
from ovdistill.trainer.grounding import (
    AlignmentHead,
    CrossModalFusion,
    FusionStack,
    GroundingError,
    TokenProjection,
    alignment_logits,
    class_scores,
    eot_spans,
    eot_targets,
    glip_bias_init,
    grounding_targets,
    last_token_spans,
    last_token_targets,
    sigmoid_focal_alignment_loss,
)

MICRO = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                   "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 2},
}
TEXTS = ["red star. blue circle.", "a photo of a green heart", "cross."]


def micro_teacher(folder, name: str, custom_text: bool = False) -> T.Teacher:
    """A random-weight micro open_clip CLIP (CustomTextCLIP with `custom_text`), loaded the
    project's way."""
    config = folder / f"{name}.json"
    config.write_text(json.dumps({**MICRO, **({"custom_text": True} if custom_text else {})}))
    spec = T.TeacherSpec(name, None, str(config))
    T.register_model_config(spec)
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    with torch.no_grad():  # open_clip starts the text projection small; make it matter
        model.state_dict()[_projection_key(model)].normal_()
    weights = folder / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return T.load_teacher(T.TeacherSpec(name, str(weights), str(config)))


def _projection_key(model) -> str:
    return next(k for k in model.state_dict() if k.endswith("text_projection"))


@pytest.fixture(scope="module", params=[False, True], ids=["clip", "custom-text"])
def teacher(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("grounding-teacher")
    name = "grounding-micro-custom" if request.param else "grounding-micro-clip"
    return micro_teacher(folder, name, custom_text=request.param)


def _projection(teacher: T.Teacher) -> torch.Tensor:
    return dict(teacher.model.named_parameters())[_projection_key(teacher.model)]


# ----------------------------------------------------------------------------- token features


def test_encode_tokens_pooled_at_eot_is_encode_text(teacher):
    with torch.no_grad():
        feats, mask = teacher.encode_tokens(TEXTS)
        ids = teacher.tokenizer(TEXTS)
        reference = teacher.model.encode_text(ids)  # open_clip's own, unnormalised
    assert feats.shape == (3, 16, 32) and feats.dtype == torch.float32
    assert mask.shape == (3, 16) and mask.dtype == torch.bool
    eot = mask.sum(1) - 1
    assert eot.tolist() == [len(teacher.tokenizer.encode(t)) + 1 for t in TEXTS]
    assert (ids[torch.arange(3), eot] == teacher.tokenizer.eot_token_id).all()
    assert mask[:, 0].all()  # start-of-text is a real token
    pooled = feats[torch.arange(3), eot] @ _projection(teacher)
    torch.testing.assert_close(pooled, reference, rtol=1e-5, atol=1e-6)
    again, _ = teacher.encode_tokens(ids)  # token ids in, the same out
    torch.testing.assert_close(again.detach(), feats)


def test_encode_tokens_follows_the_grad_mode_and_feeds_the_projection(teacher):
    feats, mask = teacher.encode_tokens(TEXTS[:1])
    assert feats.requires_grad  # a trainable text encoder gets gradients
    with torch.no_grad():
        frozen, _ = teacher.encode_tokens(TEXTS[:1])
        assert not frozen.requires_grad
        projection = TokenProjection.from_text_projection(_projection(teacher))
        tokens = projection(frozen[0])
        eot = int(mask[0].sum()) - 1
        torch.testing.assert_close(tokens[eot], teacher.encode_texts(TEXTS[:1])[0],
                                   rtol=1e-5, atol=1e-6)
    assert TokenProjection(32, 24)(frozen).shape == (1, 16, 24)


def test_prompt_spans_index_the_encoded_tokens(teacher):
    names = ["red star", "blue circle", "green heart"]
    tokenize = open_clip_tokenize(teacher.tokenizer)
    prompts = all_class_prompts(names, max_prompt_tokens(16), tokenize)
    with torch.no_grad():
        _, mask = teacher.encode_tokens([p.text for p in prompts])
    for p, m in zip(prompts, mask):
        assert int(m.sum()) == p.n_tokens
        assert all(m[s:e].all() for s, e in p.spans.values())


# ----------------------------------------------------------------------------- alignment


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def focal(x: float, y: int, alpha: float = 0.25, gamma: float = 2.0) -> float:
    """One (region, token) focal term by hand."""
    p = sig(x)
    if y:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p ** gamma * math.log(1 - p)


def test_glip_bias_init_is_the_prior():
    assert glip_bias_init() == pytest.approx(-math.log(99))
    assert sig(glip_bias_init(0.01)) == pytest.approx(0.01)
    assert sig(glip_bias_init(0.2)) == pytest.approx(0.2)


def test_alignment_logits_by_hand():
    regions = torch.tensor([[3.0, 4.0], [0.0, -2.0]])  # unit: (.6, .8), (0, -1)
    tokens = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-5.0, 0.0]])
    logits = alignment_logits(regions, tokens, math.log(0.5), -1.0)
    want = torch.tensor([[0.6, 0.8, -0.6], [0.0, -1.0, 0.0]]) / 0.5 - 1.0
    torch.testing.assert_close(logits, want)
    with_bias = alignment_logits(regions, tokens, torch.tensor(math.log(0.5)),
                                 torch.tensor(-1.0), torch.tensor([0.5, 0.0, -2.0]))
    torch.testing.assert_close(with_bias, want + torch.tensor([0.5, 0.0, -2.0]))
    batched = alignment_logits(regions[None].repeat(2, 1, 1), tokens[None].repeat(2, 1, 1),
                               math.log(0.5), -1.0)
    torch.testing.assert_close(batched, want[None].repeat(2, 1, 1))


def test_alignment_head_starts_at_the_prior_and_learns():
    head = AlignmentHead(4, tau=0.07, text_bias=True)
    regions = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    tokens = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    logits = head(regions, tokens)
    assert torch.sigmoid(logits[0, 0]).item() == pytest.approx(0.01, rel=1e-4)
    assert logits[0, 1].item() == pytest.approx(1 / 0.07 + glip_bias_init(), rel=1e-5)
    logits.sum().backward()
    assert head.log_scale.grad is not None and head.bias_lang.grad is not None


def test_targets_from_spans():
    labels = torch.tensor([2, -1, 0, 1])
    targets = grounding_targets(labels, {0: (1, 2), 2: (2, 4)}, 5)
    assert targets.tolist() == [[0, 0, 1, 1, 0],
                                [0, 0, 0, 0, 0],   # background
                                [0, 1, 0, 0, 0],
                                [0, 0, 0, 0, 0]]   # class 1 is in another chunk
    assert grounding_targets(torch.zeros(0, dtype=torch.long), {0: (1, 2)}, 3).shape == (0, 3)
    with pytest.raises(GroundingError, match="span \\(2, 6\\) of class 0"):
        grounding_targets(labels, {0: (2, 6)}, 5)


LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.3, -0.2, 1.5]])
MASK = torch.tensor([True, True, False])  # token 2 is padding


def test_focal_alignment_loss_by_hand():
    targets = grounding_targets(torch.tensor([0, -1]), {0: (0, 2)}, 3)  # [[1, 1, 0], [0, 0, 0]]
    l = LOGITS.tolist()
    row0 = focal(l[0][0], 1) + focal(l[0][1], 1)
    row1 = focal(l[1][0], 0) + focal(l[1][1], 0)  # background: negatives only
    got = sigmoid_focal_alignment_loss(LOGITS, targets, MASK, normalize="regions")
    assert got.item() == pytest.approx(row0 + row1, rel=1e-6)  # one positive region
    per_token = sigmoid_focal_alignment_loss(LOGITS, targets, MASK, normalize="tokens")
    assert per_token.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)  # two positives
    a, g = 0.5, 1.0
    other = sigmoid_focal_alignment_loss(LOGITS, targets, MASK, alpha=a, gamma=g,
                                         normalize="regions")
    assert other.item() == pytest.approx(
        focal(l[0][0], 1, a, g) + focal(l[0][1], 1, a, g) + focal(l[1][0], 0, a, g)
        + focal(l[1][1], 0, a, g), rel=1e-6)
    only_bg = sigmoid_focal_alignment_loss(LOGITS[1:], targets[1:], MASK)
    assert only_bg.item() == pytest.approx(row1, rel=1e-6)  # no positive: divided by 1
    with pytest.raises(GroundingError, match="normalize"):
        sigmoid_focal_alignment_loss(LOGITS, targets, MASK, normalize="boxes")


def test_padded_tokens_do_not_count():
    targets = grounding_targets(torch.tensor([0, -1]), {0: (0, 3)}, 3)  # span over the pad
    base = sigmoid_focal_alignment_loss(LOGITS, targets, MASK, normalize="regions")
    moved = LOGITS.clone()
    moved[:, 2] = torch.tensor([-30.0, 40.0])
    moved_loss = sigmoid_focal_alignment_loss(moved, targets, MASK, normalize="regions")
    assert moved_loss.item() == pytest.approx(base.item(), rel=1e-7)
    per_token = sigmoid_focal_alignment_loss(LOGITS, targets, MASK, normalize="tokens")
    assert per_token.item() == pytest.approx(base.item() / 2, rel=1e-6)  # 2 real positives
    x = LOGITS.clone().requires_grad_(True)
    sigmoid_focal_alignment_loss(x, targets, MASK).backward()
    assert (x.grad[:, 2] == 0).all() and (x.grad[:, :2] != 0).all()
    batched = sigmoid_focal_alignment_loss(LOGITS[None].repeat(2, 1, 1),
                                           targets[None].repeat(2, 1, 1),
                                           MASK[None].repeat(2, 1), normalize="regions")
    assert batched.item() == pytest.approx(base.item(), rel=1e-6)  # 2x sum over 2x positives


def test_class_scores_mean_over_spans():
    logits = torch.tensor([[0.0, 1.0, -2.0, 3.0], [5.0, -1.0, 0.5, 0.0]])
    scores = class_scores(logits, {0: (1, 3), 2: (3, 4)}, 3)
    want = [[(sig(1.0) + sig(-2.0)) / 2, 0.0, sig(3.0)],
            [(sig(-1.0) + sig(0.5)) / 2, 0.0, sig(0.0)]]
    torch.testing.assert_close(scores, torch.tensor(want))
    assert class_scores(logits[None], {1: (0, 1)}, 2).shape == (1, 2, 2)


def test_last_token_spans_and_targets_by_hand():
    assert last_token_spans({2: (1, 3), 5: (4, 5)}) == {2: (2, 3), 5: (4, 5)}
    positive = torch.tensor([[0.0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 1, 1]])
    want = torch.tensor([[0.0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]])
    assert torch.equal(last_token_targets(positive), want)
    assert last_token_targets(torch.zeros(0, 5)).shape == (0, 5)
    logits = torch.tensor([[0.0, 1.0, -2.0, 3.0]])
    scores = class_scores(logits, last_token_spans({0: (1, 3)}), 1)
    torch.testing.assert_close(scores, torch.tensor([[sig(-2.0)]]))


def test_eot_spans_and_targets_by_hand():
    assert eot_spans({3: (1, 3)}, 5) == {3: (4, 5)}  # SOT, two tokens, ".", EOT at 4
    with pytest.raises(GroundingError, match=r"^end-of-text scoring needs one phrase a "
                       r"prompt, got classes \[1, 3\] in one$"):
        eot_spans({3: (1, 3), 1: (4, 5)}, 7)
    positive = torch.tensor([[0.0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    mask = torch.tensor([True, True, True, True, True, False])  # EOT at 4, one padded token
    want = torch.tensor([[0.0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0]])
    assert torch.equal(eot_targets(positive, mask), want)
    assert eot_targets(torch.zeros(0, 6), mask).shape == (0, 6)
    logits = torch.tensor([[0.0, 1.0, -2.0, 3.0, 0.5]])
    scores = class_scores(logits, eot_spans({0: (1, 3)}, 5), 1)
    torch.testing.assert_close(scores, torch.tensor([[sig(0.5)]]))


# ----------------------------------------------------------------------------- fusion


def test_fusion_keeps_shapes_and_lets_a_token_change_the_regions():
    torch.manual_seed(0)
    layer = CrossModalFusion(16, 4, init_scale=1.0).eval()
    regions, tokens = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    token_mask = torch.ones(2, 7, dtype=torch.bool)
    token_mask[:, 5:] = False  # two padded tokens
    r, t = layer(regions, tokens, token_mask)
    assert r.shape == regions.shape and t.shape == tokens.shape
    assert not torch.allclose(r, regions)

    real = tokens.clone()
    real[0, 3] = torch.randn(16)  # (a uniform shift would vanish in the layer norm)
    r_real, _ = layer(regions, real, token_mask)
    assert not torch.allclose(r_real[0], r[0])
    torch.testing.assert_close(r_real[1], r[1])  # the other image's regions do not see it

    padded = tokens.clone()
    padded[0, 6] = 100 * torch.randn(16)
    r_pad, _ = layer(regions, padded, token_mask)
    torch.testing.assert_close(r_pad, r, rtol=0, atol=1e-6)

    region_mask = torch.tensor([[True] * 4 + [False]] * 2)
    _, t_masked = layer(regions, tokens, token_mask, region_mask)
    moved = regions.clone()
    moved[:, 4] = 50 * torch.randn(2, 16)
    _, t_moved = layer(moved, tokens, token_mask, region_mask)
    torch.testing.assert_close(t_moved, t_masked, rtol=0, atol=1e-6)

    r1, t1 = layer(regions[0], tokens[0], token_mask[0])  # one image, unbatched
    torch.testing.assert_close(r1, r[0])
    torch.testing.assert_close(t1, t[0])


def test_fusion_stack_and_its_edges():
    torch.manual_seed(1)
    regions, tokens = torch.randn(1, 3, 8), torch.randn(1, 4, 8)
    identity = FusionStack(0, 8, 2)
    r, t = identity(regions, tokens)
    assert r is regions and t is tokens
    stack = FusionStack(2, 8, 2).eval()
    assert len(stack.layers) == 2
    r, t = stack(regions, tokens, torch.ones(1, 4, dtype=torch.bool))
    assert r.shape == (1, 3, 8) and t.shape == (1, 4, 8)
    # GLIP's layer scale: fusion starts close to the identity
    assert (r - regions).abs().max() < 1e-2
    # an image without regions leaves its tokens as they were, without NaN
    _, t_empty = stack(regions, tokens, None, torch.zeros(1, 3, dtype=torch.bool))
    assert torch.isfinite(t_empty).all()
    torch.testing.assert_close(t_empty, tokens)
