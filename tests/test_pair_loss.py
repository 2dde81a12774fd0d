"""DetCLIPv2's set similarity and text-to-image contrastive loss against hand-computed values
on tiny tensors: the max and soft variants, padding, and the direction of the loss."""
import math

import pytest
import torch
from ovdistill.trainer.losses import (
    batch_phrase_texts,
    named_elsewhere,
    pad_rows,
    pair_contrastive_loss,
    pair_phrase_contrastive_loss,
    pair_pseudo_loss,
    pair_set_similarity,
    pair_word_loss,
    phrase_region_best,
)

# image 0: regions (1, 0), (0, 1); image 1: region (1, 0) (+ one padded row)
# caption 0: phrase (1, 0) (+ one padded row); caption 1: phrases (0, 1), (0.6, 0.8)
PAD = [9.0, 9.0]  # never a unit vector: counted anywhere, it would show
REGIONS = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], PAD]])
REGION_MASK = torch.tensor([[True, True], [True, False]])
PHRASES = torch.tensor([[[1.0, 0.0], PAD], [[0.0, 1.0], [0.6, 0.8]]])
PHRASE_MASK = torch.tensor([[True, False], [True, True]])

# by hand, sim[b, a] = mean over caption a's phrases of the max over image b's regions:
#   [0, 0]: max(1, 0) = 1            [0, 1]: (max(0, 1) + max(0.6, 0.8)) / 2 = 0.9
#   [1, 0]: 1                         [1, 1]: (0 + 0.6) / 2 = 0.3
HARD = [[1.0, 0.9], [1.0, 0.3]]


def _soft(cos: list[float], t: float) -> float:
    """softmax(cos / t)-weighted mean of cos, written out."""
    w = [math.exp(c / t) for c in cos]
    return sum(wi * c for wi, c in zip(w, cos)) / sum(w)


def test_set_similarity_is_mean_over_phrases_of_max_over_regions():
    sim = pair_set_similarity(REGIONS, REGION_MASK, PHRASES, PHRASE_MASK)
    assert sim.dtype == torch.float32 and sim.shape == (2, 2)
    torch.testing.assert_close(sim, torch.tensor(HARD))


def test_padding_changes_nothing():
    """Other padding values, and more padded rows, give the same similarity."""
    regions = torch.cat([REGIONS, torch.full((2, 3, 2), -5.0)], dim=1)
    regions[1, 1] = torch.tensor([0.0, 1.0])  # a real-looking region, but padded
    region_mask = torch.cat([REGION_MASK, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    phrases = PHRASES.clone()
    phrases[0, 1] = torch.tensor([0.0, 1.0])
    for soft_tau in (None, 0.5):
        want = pair_set_similarity(REGIONS, REGION_MASK, PHRASES, PHRASE_MASK, soft_tau)
        got = pair_set_similarity(regions, region_mask, phrases, PHRASE_MASK, soft_tau)
        torch.testing.assert_close(got, want)
    # and the padded rows really would matter if counted
    unmasked = pair_set_similarity(regions[:, :2], torch.ones(2, 2, dtype=torch.bool),
                                   phrases, torch.ones(2, 2, dtype=torch.bool))
    assert unmasked[1, 1] == pytest.approx(0.9)  # image 1's padded (0, 1) would be its best


def test_soft_variant_weights_regions_by_softmax():
    t = 0.5
    want = [[_soft([1.0, 0.0], t), (_soft([0.0, 1.0], t) + _soft([0.6, 0.8], t)) / 2],
            [1.0, (0.0 + 0.6) / 2]]  # image 1 has one region: its softmax weight is 1
    sim = pair_set_similarity(REGIONS, REGION_MASK, PHRASES, PHRASE_MASK, soft_tau=t)
    torch.testing.assert_close(sim, torch.tensor(want))
    assert sim[0, 1] < 0.9  # below the max: the other region gets weight


def test_soft_variant_tends_to_the_max():
    soft = pair_set_similarity(REGIONS, REGION_MASK, PHRASES, PHRASE_MASK, soft_tau=1e-3)
    torch.testing.assert_close(soft, torch.tensor(HARD), atol=1e-5, rtol=0)
    mid = pair_set_similarity(REGIONS, REGION_MASK, PHRASES, PHRASE_MASK, soft_tau=0.05)
    assert (mid <= torch.tensor(HARD) + 1e-6).all()


def test_pad_rows_and_empty_sets_score_zero():
    emb, mask = pad_rows([torch.tensor([[1.0, 0.0, 0.0]]), torch.zeros(0, 3),
                          torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])], 3)
    assert emb.shape == (3, 2, 3) and mask.tolist() == [[True, False], [False, False],
                                                        [True, True]]
    # B = 3, D = 3: image 1 has no region, caption 1 no phrase
    for soft_tau in (None, 0.1):
        region = emb.clone().requires_grad_(True)
        sim = pair_set_similarity(region, mask, emb, mask, soft_tau)
        assert sim[1].tolist() == [0.0, 0.0, 0.0] and sim[:, 1].tolist() == [0.0, 0.0, 0.0]
        values = sim.detach()
        assert float(values[0, 0]) == pytest.approx(1.0)
        assert float(values[2, 2]) == pytest.approx(
            1.0 if soft_tau is None else _soft([1.0, 0.0], soft_tau), rel=1e-5)
        sim.sum().backward()
        assert torch.isfinite(region.grad).all()


def test_contrastive_loss_is_text_to_image_only():
    """For each caption a: softmax over the images of sim[:, a] / tau, target a."""
    tau = 0.5
    sim = torch.tensor(HARD)
    # caption 0: logits [2, 2] -> log 2; caption 1: logits [1.8, 0.6] -> log(1 + e^1.2)
    want = (math.log(2) + math.log(1 + math.exp(1.2))) / 2
    assert float(pair_contrastive_loss(sim, tau)) == pytest.approx(want, rel=1e-6)
    # an image-to-text loss would give another value on this (non-symmetric) matrix
    image_to_text = (math.log(1 + math.exp(-0.2)) + math.log(1 + math.exp(1.4))) / 2
    assert abs(want - image_to_text) > 0.03


def test_contrastive_loss_three_images():
    tau = 0.1
    s = [[0.9, 0.1, 0.2], [0.3, 0.8, 0.0], [0.5, 0.4, 0.7]]
    want = sum(-s[a][a] / tau + math.log(sum(math.exp(s[b][a] / tau) for b in range(3)))
               for a in range(3)) / 3
    sim = torch.tensor(s, requires_grad=True)
    loss = pair_contrastive_loss(sim, tau)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    loss.backward()
    # d loss / d sim[b, a] = (softmax_b(sim[:, a] / tau) - [b == a]) / (3 tau)
    col = [math.exp(s[b][0] / tau) for b in range(3)]
    assert float(sim.grad[1, 0]) == pytest.approx(col[1] / sum(col) / (3 * tau), rel=1e-4)


def test_similarity_under_bf16_autocast_is_float32():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim = pair_set_similarity(REGIONS.bfloat16(), REGION_MASK, PHRASES, PHRASE_MASK)
        loss = pair_contrastive_loss(sim, 0.5)
    assert sim.dtype == loss.dtype == torch.float32
    torch.testing.assert_close(sim, torch.tensor(HARD))


def test_phrase_region_best_is_each_phrase_against_each_image():
    best = phrase_region_best(REGIONS, REGION_MASK, PHRASES)
    assert best.shape == (2, 2, 2)
    # [b, a, p]: caption 0's phrase (1, 0): 1 on both images; caption 1's (0, 1): image 0
    # has it (1), image 1 only (1, 0) (0); (0.6, 0.8): 0.8 and 0.6
    torch.testing.assert_close(best[:, 0, 0], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(best[:, 1], torch.tensor([[1.0, 0.8], [0.0, 0.6]]))


# three captions: ids [0, 1], [1, pad], [2, 0]
IDS = torch.tensor([[0, 1], [1, 7], [2, 0]])
IDS_MASK = torch.tensor([[True, True], [True, False], [True, True]])


def test_named_elsewhere_by_hand():
    named = named_elsewhere(IDS, IDS_MASK)  # [b, a, p]: caption b names a's phrase p
    want = torch.zeros(3, 3, 2, dtype=torch.bool)
    want[0, 0] = want[1, 1, 0] = want[2, 2] = True  # every real phrase in its own caption
    want[2, 0, 0] = True  # caption 2 names phrase 0 of caption 0 (id 0)
    want[1, 0, 1] = True  # caption 1 names phrase 1 of caption 0 (id 1)
    want[0, 1, 0] = True  # caption 0 names phrase 0 of caption 1 (id 1)
    want[0, 2, 1] = True  # caption 0 names phrase 1 of caption 2 (id 0)
    assert named.tolist() == want.tolist()  # the padded id 7 matches nothing


def test_phrase_contrast_leaves_out_the_images_that_name_the_phrase():
    tau = 0.5
    best = torch.tensor([[[0.9, 0.2], [0.5, 0.0], [0.1, 0.4]],  # image 0 against a = 0, 1, 2
                         [[0.3, 0.8], [0.7, 0.3], [0.6, 0.2]],  # image 1
                         [[0.8, 0.1], [0.2, 0.5], [0.9, 0.6]]])  # image 2
    values = best.tolist()
    best.requires_grad_(True)

    def ce(a, p, images):
        logits = [values[b][a][p] / tau for b in images]
        return -values[a][a][p] / tau + math.log(sum(math.exp(x) for x in logits))

    want = (ce(0, 0, [0, 1]) + ce(0, 1, [0, 2]) + ce(1, 0, [1, 2]) + ce(2, 0, [0, 1, 2])
            + ce(2, 1, [1, 2])) / 5  # 5 real phrases; (1, 1) is padding
    loss = pair_phrase_contrastive_loss(best, IDS_MASK, named_elsewhere(IDS, IDS_MASK), tau)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert best.grad[2, 0, 0] == 0 and best.grad[1, 0, 1] == 0  # the left-out negatives
    assert best.grad[1, 0, 0] > 0 and (best.grad[:, 1, 1] == 0).all()  # padding: no gradient
    # with no caption naming another's phrase it is the plain per-phrase contrast
    nobody = torch.eye(3, dtype=torch.bool)[:, :, None] & IDS_MASK[None]
    plain = pair_phrase_contrastive_loss(best.detach(), IDS_MASK, nobody, tau)
    want_plain = sum(ce(a, p, [0, 1, 2]) for a, p in ((0, 0), (0, 1), (1, 0), (2, 0), (2, 1)))
    assert float(plain) == pytest.approx(want_plain / 5, rel=1e-6)
    assert float(plain) > float(loss.detach())  # two more terms in two of the denominators


# ----------------------------------------------------------------------------- pair_word_loss


def _log_softmax(xs: list[float]) -> list[float]:
    z = math.log(sum(math.exp(x) for x in xs))
    return [x - z for x in xs]


def test_batch_phrase_texts_one_row_per_id():
    emb = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], PAD]])
    ids = torch.tensor([[0, 1], [1, 7]])  # (1, 1) is padding: its id is never read
    texts = batch_phrase_texts(emb, ids, torch.tensor([[True, True], [True, False]]))
    assert texts.tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_word_loss_by_hand_with_padding():
    """Two images; the batch's distinct phrases are (1, 0) and (0, 1) (ids 0, 1) and
    (0.6, 0.8) (id 2). Image 0 (regions (1, 0), (0, 1)) names ids 0 and 2, image 1 (one real
    region (1, 0)) names id 1. Per region, log-softmax over the 3 phrases of cos / tau; per
    phrase, the max of its column over the image's real regions."""
    tau = 0.5
    phrases = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], PAD]])
    ids = torch.tensor([[0, 2], [1, -1]])
    mask = torch.tensor([[True, True], [True, False]])
    texts = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]

    def logq(region):
        return _log_softmax([(region[0] * t[0] + region[1] * t[1]) / tau for t in texts])

    r00, r01, r10 = logq([1.0, 0.0]), logq([0.0, 1.0]), logq([1.0, 0.0])
    want = -(max(r00[0], r01[0]) + max(r00[2], r01[2]) + r10[1]) / 3
    regions = REGIONS.clone().requires_grad_(True)
    loss = pair_word_loss(regions, REGION_MASK, phrases, ids, mask, tau)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert (regions.grad[1, 1] == 0).all()  # the padded region
    assert torch.isfinite(regions.grad).all()


def test_word_loss_picks_the_region_that_names_the_phrase_not_the_most_similar():
    """Image 0 holds a red square and a red heart, its caption names "red heart"; image 1's
    caption names "red square". The square has the higher cosine to "red heart" (colour), so
    the image-level max picks it; the word loss picks the heart, which names "red heart" more
    than "red square", and of image 0's regions only the heart gets a gradient."""
    heart, square = [1.0, 0.0, 0.0], [0.8, 0.6, 0.0]
    square_region = [0.9, 0.43589, 0.0]  # cos: heart 0.90, square 0.98
    heart_region = [0.7, 0.0, 0.71414]   # cos: heart 0.70, square 0.56
    regions = torch.tensor([[square_region, heart_region], [square, [9.0, 9.0, 9.0]]]).requires_grad_(True)
    region_mask = torch.tensor([[True, True], [True, False]])
    phrases = torch.tensor([[heart], [square]])
    ids, mask = torch.tensor([[0], [1]]), torch.tensor([[True], [True]])
    best = phrase_region_best(regions.detach(), region_mask, phrases)
    assert float(best[0, 0, 0]) == pytest.approx(0.9, abs=1e-4)  # the square's cosine
    tau = 0.1
    loss = pair_word_loss(regions, region_mask, phrases, ids, mask, tau)
    loss.backward()
    assert (regions.grad[0, 0] == 0).all() and regions.grad[0, 1].abs().sum() > 0
    image0 = -_log_softmax([0.70 / tau, 0.56 / tau])[0]
    image1 = -_log_softmax([0.80 / tau, 1.0 / tau])[1]
    assert float(loss.detach()) == pytest.approx((image0 + image1) / 2, rel=1e-3)


def test_word_loss_without_phrases_is_zero_with_a_gradient():
    regions = REGIONS.clone().requires_grad_(True)
    none = torch.zeros(2, 2, dtype=torch.bool)
    loss = pair_word_loss(regions, REGION_MASK, REGIONS, torch.zeros(2, 2, dtype=torch.int64),
                          none, 0.5)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert (regions.grad == 0).all()


# --------------------------------------------------------------------------- pair_pseudo_loss


def test_pseudo_loss_by_hand_reads_only_the_phrases_with_a_pseudo_box():
    """The batch's distinct phrases (1, 0), (0, 1), (0.6, 0.8) (ids 0, 1, 2). Image 0 names
    ids 0 and 2, only id 2 has a pseudo-box, embedded (0.8, 0.6); image 1 names id 1 with a
    pseudo-box embedded (1, 0) (the teacher's pick, though the student's embedding names id 0
    better); its padded phrase claims a pseudo-box that must not count."""
    tau = 0.5
    phrases = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], PAD]])
    ids = torch.tensor([[0, 2], [1, -1]])
    mask = torch.tensor([[True, True], [True, False]])
    pseudo = torch.tensor([[[5.0, 5.0], [0.8, 0.6]], [[1.0, 0.0], [0.0, 1.0]]]
                          ).requires_grad_(True)
    has = torch.tensor([[False, True], [True, True]])
    texts = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]

    def logq(region):
        return _log_softmax([(region[0] * t[0] + region[1] * t[1]) / tau for t in texts])

    want = -(logq([0.8, 0.6])[2] + logq([1.0, 0.0])[1]) / 2
    loss = pair_pseudo_loss(pseudo, has, phrases, ids, mask, tau)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert (pseudo.grad[0, 0] == 0).all() and (pseudo.grad[1, 1] == 0).all()
    assert pseudo.grad[0, 1].abs().sum() > 0 and pseudo.grad[1, 0].abs().sum() > 0


def test_pseudo_loss_without_a_pseudo_box_is_zero_with_a_gradient():
    pseudo = REGIONS.clone().requires_grad_(True)
    loss = pair_pseudo_loss(pseudo, torch.zeros(2, 2, dtype=torch.bool), REGIONS,
                            torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 2, dtype=torch.bool),
                            0.5)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert (pseudo.grad == 0).all()
