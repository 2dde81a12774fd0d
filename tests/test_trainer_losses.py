"""Trainer losses, scoring and schedule against values computed by hand on tiny tensors."""
import math

import pytest
import torch
import torch.nn.functional as F
from ovdistill.trainer.losses import (
    box_regression_loss,
    center_embeddings,
    confident_mask,
    contrastive_distill_loss,
    foreground_loss,
    mean_direction_baseline,
    region_logits,
    vild_image_loss,
    vild_text_loss,
)
from ovdistill.trainer.model import ensemble_scores, postprocess
from ovdistill.trainer.train import warmup_cosine


def test_region_logits_are_cosines_over_tau_with_background_first():
    region = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    bg = torch.tensor([0.0, 2.0])  # normalised inside
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    z = region_logits(region, bg, text, tau=0.5)
    want = torch.tensor([[0.0, 1.0, 0.0, -1.0], [0.8, 0.6, 0.8, -0.6]]) / 0.5
    torch.testing.assert_close(z, want)


def test_vild_text_loss_is_softmax_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 1])
    by_hand = -(math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
                + math.log(math.exp(1.5) / (math.exp(0.5) + math.exp(1.5) + 1))) / 2
    assert vild_text_loss(logits, labels).item() == pytest.approx(by_hand, rel=1e-6)


def test_foreground_loss_ignores_which_base_class():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    e = [[math.exp(v) for v in row] for row in logits.tolist()]
    p_bg = [row[0] / sum(row) for row in e]
    by_hand = -(math.log(p_bg[0]) + math.log(1 - p_bg[1])) / 2
    labels = torch.tensor([0, 1])
    assert foreground_loss(logits, labels).item() == pytest.approx(by_hand, rel=1e-6)
    # the foreground term is the same whichever base class is the label
    assert foreground_loss(logits, torch.tensor([0, 2])).item() == pytest.approx(by_hand,
                                                                                  rel=1e-6)


def test_vild_image_loss_sums_dims_averages_proposals_and_weights():
    region = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.6, 0.8]], dtype=torch.float16)
    # |diffs|: row0 = 1 + 1 + 0 = 2; row1 = 0 + 0.4 + 0.8 = 1.2; mean 1.6; x 0.5
    assert vild_image_loss(region, teacher, 0.5).item() == pytest.approx(0.8, abs=1e-3)
    empty = torch.zeros(0, 3, requires_grad=True)
    loss = vild_image_loss(empty, torch.zeros(0, 3))
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="differ in shape"):
        vild_image_loss(region, teacher[:1])


def test_mean_direction_baseline_is_the_loss_of_predicting_the_mean_teacher_direction():
    teacher = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float16)
    # mean (0.8, 0.4) -> direction (2, 1)/sqrt(5) = (0.8944, 0.4472);
    # |diffs|: row0 0.1056 + 0.4472, row1 0.2944 + 0.3528: sum 1.2, mean 0.6, x 0.5
    m = (2 / math.sqrt(5), 1 / math.sqrt(5))
    want = 0.5 * ((1 - m[0]) + m[1] + (m[0] - 0.6) + (0.8 - m[1])) / 2
    assert want == pytest.approx(0.3, abs=1e-9)
    assert mean_direction_baseline(teacher, 0.5).item() == pytest.approx(want, abs=1e-3)
    # a student that outputs that direction for every proposal scores exactly the baseline
    student = torch.tensor([m, m])
    assert vild_image_loss(student, teacher, 0.5).item() == pytest.approx(want, abs=1e-3)
    assert mean_direction_baseline(torch.zeros(0, 2)).item() == 0.0


def test_box_regression_loss_smooth_l1_on_foreground_over_all_samples():
    deltas = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.05, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    targets = torch.zeros(3, 4)
    labels = torch.tensor([2, 1, 0])  # the last is background: ignored
    beta = 1.0 / 9
    by_hand = ((1.0 - 0.5 * beta) + 0.5 * 0.05 ** 2 / beta) / 3
    assert box_regression_loss(deltas, targets, labels).item() == pytest.approx(by_hand,
                                                                                rel=1e-5)
    ref = F.smooth_l1_loss(deltas[:2], targets[:2], beta=beta, reduction="sum") / 3
    assert box_regression_loss(deltas, targets, labels).item() == pytest.approx(ref.item())
    # one sampled proposal: divided by 1 (a mutation run found max(2, n) unnoticed)
    one = box_regression_loss(deltas[1:2], targets[1:2], labels[1:2]).item()
    assert one == pytest.approx((1.0 - 0.5 * beta) + 0.5 * 0.05 ** 2 / beta, rel=1e-5)


def test_image_loss_weight_defaults_to_the_papers_half_and_scales_linearly():
    teacher = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    student = F.normalize(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]]), dim=-1)
    l1 = (student - teacher).abs().sum(-1).mean().item()
    assert vild_image_loss(student, teacher).item() == pytest.approx(0.5 * l1, rel=1e-6)
    assert vild_image_loss(student, teacher, 2.0).item() == pytest.approx(2.0 * l1, rel=1e-6)
    base = mean_direction_baseline(teacher).item()
    assert mean_direction_baseline(teacher, 2.0).item() == pytest.approx(4 * base, rel=1e-6)


def test_ensemble_weights_base_toward_text_and_novel_toward_image():
    p_text = torch.tensor([[0.8, 0.8]])
    p_img = torch.tensor([[0.1, 0.1]])
    s = ensemble_scores(p_text, p_img, torch.tensor([True, False]))
    assert s[0, 0].item() == pytest.approx(0.8 ** (2 / 3) * 0.1 ** (1 / 3), rel=1e-6)
    assert s[0, 1].item() == pytest.approx(0.8 ** (1 / 3) * 0.1 ** (2 / 3), rel=1e-6)


def test_postprocess_nms_per_class_and_cap():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60], [0, 0, 300, 300]])
    scores = torch.tensor([[0.9, 0.0], [0.8, 0.7], [0.0, 0.6], [0.5, 0.0]])
    b, s, lab = postprocess(boxes, scores, (100, 100), score_thresh=0.05, nms_thresh=0.5,
                            max_detections=3)
    # box 1 is suppressed in class 0 by box 0 but kept in class 1; box 3 clipped to 100
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert lab.tolist() == [0, 1, 1]
    b, s, lab = postprocess(boxes, scores, (100, 100), 0.05, 0.5, max_detections=10)
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.6, 0.5])
    assert b[-1].tolist() == [0.0, 0.0, 100.0, 100.0]


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 4, 20) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.5)
    assert warmup_cosine(20, 4, 20) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- remedies


def test_confident_mask_threshold_then_top_k():
    scores = torch.tensor([0.9, 0.2, 0.6, 0.85, 0.5])
    # >= 0.5: rows 0, 2, 3, 4; the two highest of those: 0 (0.9) and 3 (0.85)
    assert confident_mask(scores, 0.5, 2).tolist() == [True, False, False, True, False]
    assert confident_mask(scores, 0.5, 0).tolist() == [True, False, True, True, True]
    assert confident_mask(scores, 0.5, 10).tolist() == [True, False, True, True, True]
    assert confident_mask(scores, 0.0, 0).tolist() == [True] * 5
    assert confident_mask(scores, 0.0, 1).tolist() == [True, False, False, False, False]
    assert confident_mask(scores, 0.95, 3).tolist() == [False] * 5
    assert confident_mask(torch.zeros(0), 0.5, 2).shape == (0,)


def test_contrastive_distill_loss_is_symmetric_infonce_by_hand():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # student @ teacher.T = [[1, 0.6], [0, 0.8]]; / tau 0.5 = [[2, 1.2], [0, 1.6]]
    e = math.exp
    rows = (-math.log(e(2) / (e(2) + e(1.2))) - math.log(e(1.6) / (e(0) + e(1.6)))) / 2
    cols = (-math.log(e(2) / (e(2) + e(0))) - math.log(e(1.6) / (e(1.2) + e(1.6)))) / 2
    got = contrastive_distill_loss(student, teacher, tau=0.5)
    assert got.item() == pytest.approx((rows + cols) / 2, rel=1e-6)
    # a teacher half-precision like the cache's gives the same value
    assert contrastive_distill_loss(student, teacher.half(), 0.5).item() == pytest.approx(
        (rows + cols) / 2, rel=1e-3)
    empty = torch.zeros(0, 2, requires_grad=True)
    loss = contrastive_distill_loss(empty, torch.zeros(0, 2), 0.07)
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="differ in shape"):
        contrastive_distill_loss(student, teacher[:1], 0.5)


def test_center_embeddings_subtracts_the_mean_then_normalizes():
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    mean = torch.tensor([0.0, 1.0])
    # [1, -1] / sqrt(2); [0.6, -0.2] / sqrt(0.4)
    r2, r04 = math.sqrt(2), math.sqrt(0.4)
    want = torch.tensor([[1 / r2, -1 / r2], [0.6 / r04, -0.2 / r04]])
    torch.testing.assert_close(center_embeddings(emb, mean), want)
    assert center_embeddings(emb.half(), mean).dtype == torch.float32


def test_vild_text_loss_with_aliases_by_hand():
    from ovdistill.trainer.losses import vild_text_loss_with_aliases

    # columns [bg, base0, base1, alias]; row 0 background, row 1 base class 2 (base1)
    logits = torch.tensor([[0.0, 1.0, 0.0, 2.0],
                           [1.0, 0.0, 3.0, 0.0]])
    labels = torch.tensor([0, 2])
    z0 = math.exp(0) + math.exp(1) + math.exp(0) + math.exp(2)
    z1 = math.exp(1) + math.exp(0) + math.exp(3) + math.exp(0)
    by_hand = -(math.log((math.exp(0) + math.exp(2)) / z0) + math.log(math.exp(3) / z1)) / 2
    assert vild_text_loss_with_aliases(logits, labels, 1).item() == pytest.approx(by_hand)
    # no aliases: plain ViLD-text cross-entropy
    plain = torch.nn.functional.cross_entropy(logits[:, :3], labels)
    assert vild_text_loss_with_aliases(logits[:, :3], labels, 0).item() == pytest.approx(
        plain.item())
