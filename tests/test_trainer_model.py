"""The student model: init from the RPN stage's checkpoint, config validation, vocabulary, and
the remedy options (confident proposals, contrastive term, centring, negatives, logit bias)."""
import math

import pytest
import torch
from ovdistill.trainer.config import ConfigError, make_config, parse_set
from ovdistill.trainer.model import (
    CheckpointError,
    OpenVocabDetector,
    arch_overrides,
    load_init_weights,
    read_init_checkpoint,
)

TINY = {"representation_size": 16, "train_sizes": [64], "returned_layers": [2, 3, 4],
        "anchor_sizes": [8, 16, 32, 64]}


def test_init_from_rpn_stage_checkpoint_copies_backbone_and_rpn(tmp_path):
    from ovdistill.stages.rpn import ProposalNet, RPNArch, save_checkpoint

    torch.manual_seed(1)
    rpn = ProposalNet(RPNArch(anchor_sizes=(8, 16, 32, 64)))
    path = tmp_path / "rpn.pt"
    save_checkpoint(rpn, path, {"steps": 0})
    blob = read_init_checkpoint(str(path))
    over = arch_overrides(blob)
    assert over == {"backbone": "resnet18", "returned_layers": (2, 3, 4),
                    "anchor_sizes": (8, 16, 32, 64), "norm": "batch"}
    cfg = make_config({**TINY, **over})
    model = OpenVocabDetector(cfg, embed_dim=8)
    assert load_init_weights(model, str(path)) == ["backbone", "rpn"]
    theirs = rpn.state_dict()
    for k, v in model.state_dict().items():
        if k.startswith(("backbone.", "rpn.")):
            torch.testing.assert_close(v, theirs[k], msg=k)

    # a group-norm model with 5 FPN levels does not fit: one line naming the file
    other = OpenVocabDetector(make_config({**TINY, "returned_layers": [1, 2, 3, 4],
                                           "anchor_sizes": [8, 16, 32, 64, 128]}), 8)
    with pytest.raises(CheckpointError, match=r"rpn\.pt: backbone\..* has shape"):
        load_init_weights(other, str(path))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt: cannot load init checkpoint"):
        read_init_checkpoint(str(tmp_path / "junk.pt"))


def test_config_validation_messages():
    with pytest.raises(ConfigError, match=r"unknown train config key\(s\) \['lrr'\]"):
        make_config({"lrr": 1})
    with pytest.raises(ConfigError, match="heads=separate .* needs mode=vild"):
        make_config({"heads": "separate", "mode": "text"})
    with pytest.raises(ConfigError, match="anchor_sizes needs one size per FPN level"):
        make_config({"anchor_sizes": [8, 16]})
    cfg = make_config(parse_set(["lr=1e-3", "train_sizes=[96,128]", "mode=image"]))
    assert cfg.lr == 1e-3 and cfg.train_sizes == (96, 128) and cfg.mode == "image"


def test_vocabulary_is_swappable_and_checked():
    model = OpenVocabDetector(make_config(TINY), embed_dim=8)
    with pytest.raises(ValueError, match=r"expects \[C, 8\]"):
        model.set_vocabulary(torch.randn(3, 16), torch.tensor([True, False, True]))
    model.set_vocabulary(torch.randn(5, 8) * 3, torch.tensor([True] * 3 + [False] * 2))
    assert torch.allclose(model.text_emb.norm(dim=-1), torch.ones(5))
    assert "text_emb" not in model.state_dict()  # one checkpoint, any vocabulary of this D
    model.eval()
    dets = model.detect([torch.rand(3, 64, 80)])
    assert dets[0].labels.max().item() < 5 if len(dets[0].labels) else True
    with pytest.raises(ValueError, match="heads=separate"):
        model.detect([torch.rand(3, 64, 64)], ensemble=True)


def test_remedy_options_are_validated():
    with pytest.raises(ConfigError, match=r"distill_min_score is an RPN score threshold in "
                                          r"\[0, 1\], got 1.5"):
        make_config({"distill_min_score": 1.5})
    with pytest.raises(ConfigError, match="contrastive_weight must be >= 0, got -1.0"):
        make_config({"contrastive_weight": -1})
    with pytest.raises(ConfigError, match="distill_top_k must be >= 0"):
        make_config({"distill_top_k": -2})
    with pytest.raises(ConfigError, match="contrastive_tau must be > 0"):
        make_config({"contrastive_tau": 0})
    cfg = make_config(parse_set(["distill_min_score=0.85", "distill_top_k=5",
                                 "contrastive_weight=0.5", "center_targets=true",
                                 "negative_prompts=true"]))
    assert (cfg.distill_min_score, cfg.distill_top_k, cfg.contrastive_weight,
            cfg.center_targets, cfg.negative_prompts) == (0.85, 5, 0.5, True, True)
    off = make_config({})
    assert (off.distill_min_score, off.distill_top_k, off.contrastive_weight,
            off.contrastive_tau, off.center_targets, off.negative_prompts) == (
        0.0, 0, 0.0, 0.07, False, False)


def _targets(dim: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for scores in ([0.9, 0.3, 0.8, 0.95], [0.2, 0.6, 0.1]):
        m = len(scores)
        xy = torch.rand(m, 2, generator=g) * 30
        out.append({"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]),
                    "labels": torch.tensor([2]),
                    "cached_boxes": torch.cat([xy, xy + 20], dim=1),
                    "cached_emb": torch.nn.functional.normalize(
                        torch.randn(m, dim, generator=g), dim=-1).half(),
                    "cached_scores": torch.tensor(scores)})
    return out


def test_cached_targets_mask_per_image_and_centre():
    dim = 8
    cfg = make_config({**TINY, "distill_min_score": 0.5, "distill_top_k": 2,
                       "center_targets": True})
    model = OpenVocabDetector(cfg, embed_dim=dim)
    mean = torch.zeros(dim)
    mean[0] = 2.0  # normalized inside: e0
    model.set_vocabulary(torch.randn(4, dim), torch.tensor([True, True, True, False]),
                         region_mean=mean)
    targets = _targets(dim)
    boxes, teacher = model.cached_targets(targets)
    # image 0: >= 0.5 are rows 0, 2, 3; the two best: 3 (0.95), 0 (0.9); image 1: row 1 only
    keep = [[0, 3], [1]]
    for b, t, k in zip(boxes, targets, keep):
        torch.testing.assert_close(b, t["cached_boxes"][k])
    raw = torch.cat([targets[0]["cached_emb"][[0, 3]], targets[1]["cached_emb"][[1]]]).double()
    raw[:, 0] -= 1.0  # minus the unit mean e0, then unit length
    want = (raw / raw.norm(dim=1, keepdim=True)).float()
    torch.testing.assert_close(teacher, want, atol=1e-6, rtol=1e-5)
    # the texts are centred the same way
    assert torch.allclose(model.text_emb.norm(dim=-1), torch.ones(4))
    # without a region mean, center_targets is refused in one line
    with pytest.raises(ValueError, match="center_targets needs the cache's mean region"):
        OpenVocabDetector(cfg, embed_dim=dim).set_vocabulary(torch.randn(4, dim),
                                                             torch.tensor([True] * 4))


def test_set_vocabulary_centres_texts_and_keeps_mean_and_negatives():
    dim = 4
    model = OpenVocabDetector(make_config({**TINY, "center_targets": True}), embed_dim=dim)
    text = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.6, 0.8, 0, 0]])
    mean = torch.tensor([0.0, 0.0, 3.0, 4.0])  # unit: (0, 0, 0.6, 0.8)
    negs = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    model.set_vocabulary(text, torch.tensor([True, True, False]), region_mean=mean,
                         negatives=negs)
    # (1, 0, -0.6, -0.8) / sqrt(2) etc.; the negative: (0, 0, 0.4, -0.8) / sqrt(0.8)
    r2 = 2 ** 0.5
    torch.testing.assert_close(model.text_emb[0], torch.tensor([1, 0, -0.6, -0.8]) / r2)
    torch.testing.assert_close(model.text_emb[2], torch.tensor([0.6, 0.8, -0.6, -0.8]) / r2)
    torch.testing.assert_close(model.neg_emb[0], torch.tensor([0, 0, 0.4, -0.8]) / 0.8 ** 0.5)
    # a base-only swap (as evaluate --vocabulary base) keeps the mean: still centred
    model.set_vocabulary(text[:2], torch.tensor([True, True]))
    torch.testing.assert_close(model.text_emb[1], torch.tensor([0, 1, -0.6, -0.8]) / r2)
    assert model.neg_emb.shape == (1, dim)
    assert "region_mean" not in model.state_dict() and "neg_emb" not in model.state_dict()


def test_forward_with_remedies_negatives_are_background_aliases(monkeypatch):
    import ovdistill.trainer.model as model_mod

    dim = 8
    seen = []
    real = model_mod.vild_text_loss_with_aliases

    def spy(logits, labels, n_aliases):
        seen.append((logits.shape[1], int(labels.max()), n_aliases))
        return real(logits, labels, n_aliases)

    monkeypatch.setattr(model_mod, "vild_text_loss_with_aliases", spy)
    cfg = make_config({**TINY, "negative_prompts": True, "contrastive_weight": 0.5,
                       "distill_min_score": 0.5, "rpn_post_nms_train": 50,
                       "box_batch_size_per_image": 16})
    torch.manual_seed(0)
    model = OpenVocabDetector(cfg, embed_dim=dim)
    is_base = torch.tensor([True, True, True, False])
    with pytest.raises(RuntimeError, match="negative_prompts needs negative texts"):
        model.set_vocabulary(torch.randn(4, dim), is_base)
        model([torch.rand(3, 64, 64)] * 2, _targets(dim))
    model.set_vocabulary(torch.randn(4, dim), is_base, negatives=torch.randn(2, dim))
    seen.clear()
    losses = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], _targets(dim))
    # [bg, 3 base, 2 negatives]; the labels stay in [0, 3], the 2 negatives are background
    assert seen == [(1 + 3 + 2, 2, 2)]
    assert {"loss_text", "loss_image", "loss_contrastive"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()

    # nothing confident enough: both distillation terms are zeros that still backprop
    strict = OpenVocabDetector(make_config({**TINY, "distill_min_score": 0.99,
                                            "contrastive_weight": 1.0}), embed_dim=dim)
    strict.set_vocabulary(torch.randn(4, dim), is_base)
    losses = strict([torch.rand(3, 64, 64)] * 2, _targets(dim))
    assert losses["loss_image"].item() == 0.0 and losses["loss_contrastive"].item() == 0.0
    sum(losses.values()).backward()
    # default config: no contrastive term
    plain = OpenVocabDetector(make_config(TINY), embed_dim=dim)
    plain.set_vocabulary(torch.randn(4, dim), is_base)
    assert "loss_contrastive" not in plain([torch.rand(3, 64, 64)] * 2, _targets(dim))


@pytest.mark.parametrize("heads", ["shared", "separate"])
def test_detect_logit_bias(heads):
    dim = 8
    cfg = make_config({**TINY, "heads": heads, "rpn_post_nms_test": 50})
    torch.manual_seed(3)
    model = OpenVocabDetector(cfg, embed_dim=dim).eval()
    model.set_vocabulary(torch.randn(5, dim), torch.tensor([True] * 3 + [False] * 2))
    images = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(1))]
    ensemble = heads == "separate"
    plain = model.detect(images, ensemble=ensemble)[0]
    zero = model.detect(images, ensemble=ensemble, logit_bias=torch.zeros(5))[0]
    for a, b in ((plain.boxes, zero.boxes), (plain.scores, zero.scores),
                 (plain.labels, zero.labels)):
        torch.testing.assert_close(a, b)
    assert len(plain.labels) > 0
    top = int(torch.mode(plain.labels).values)  # the class that wins most often
    bias = torch.zeros(5)
    bias[top] = 1e6
    biased = model.detect(images, ensemble=ensemble, logit_bias=bias)[0]
    assert len(biased.labels) > 0 and top not in biased.labels.tolist()
    with pytest.raises(ValueError, match="logit_bias has shape"):
        model.detect(images, logit_bias=torch.zeros(4))


def test_detect_drops_the_background_aliases_share():
    """A region sitting on a negative prompt: with negative_prompts its class scores lose that
    share (it counts as background); without, the negatives are not in the softmax."""
    dim = 4
    torch.manual_seed(0)
    scores = {}
    for on in (False, True):
        model = OpenVocabDetector(make_config({**TINY, "negative_prompts": on}), embed_dim=dim)
        model.eval()
        text = torch.eye(dim)[:2]
        model.set_vocabulary(text, torch.tensor([True, False]), negatives=torch.eye(dim)[2:3])
        # every region embeds to e3 = the negative prompt, far from bg
        with torch.no_grad():
            model.bg_embedding.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
            model.text_tower.proj.weight.zero_()
            model.text_tower.proj.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
        det = model.detect([torch.rand(3, 64, 64)])[0]
        scores[on] = float(det.scores.max()) if len(det.scores) else 0.0
    # off: softmax over [bg, t0, t1] of cosines all 0 -> 1/3 each; on: the negative takes
    # e^100 of the mass, so no class passes the score threshold
    assert scores[False] == pytest.approx(1 / 3, abs=1e-4)
    assert scores[True] == 0.0


def test_detect_ensemble_scores_by_hand():
    """ViLD-ensemble on hand-set heads: every region embeds to e_t in the text head and e_i in
    the image head, so each class's score is known: base p_text^(2/3) p_image^(1/3), novel
    p_text^(1/3) p_image^(2/3) (text: softmax over [bg, classes]; image: over the classes)."""
    dim = 4
    torch.manual_seed(0)
    cfg = make_config({**TINY, "heads": "separate", "temperature": 1.0, "rpn_post_nms_test": 20})
    model = OpenVocabDetector(cfg, embed_dim=dim).eval()
    model.set_vocabulary(torch.eye(dim)[:3], torch.tensor([True, True, False]))
    with torch.no_grad():
        model.bg_embedding.copy_(torch.eye(dim)[3])
        for tower, emb in ((model.text_tower, [3.0, 1.0, 0.0, 2.0]),
                           (model.image_tower, [0.0, 1.0, 2.0, 0.0])):
            tower.proj.weight.zero_()
            tower.proj.bias.copy_(torch.tensor(emb))
    # cosines: text head [bg, c0, c1, c2] = [2, 3, 1, 0] / sqrt(14); image head [0, 1, 2] / sqrt(5)
    e_t = [math.exp(v / math.sqrt(14)) for v in (2, 3, 1, 0)]
    p_text = [v / sum(e_t) for v in e_t[1:]]
    e_i = [math.exp(v / math.sqrt(5)) for v in (0, 1, 2)]
    p_image = [v / sum(e_i) for v in e_i]
    want = [p_text[0] ** (2 / 3) * p_image[0] ** (1 / 3),
            p_text[1] ** (2 / 3) * p_image[1] ** (1 / 3),
            p_text[2] ** (1 / 3) * p_image[2] ** (2 / 3)]
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2))]
    for ensemble, expected in ((False, p_text), (True, want)):
        det = model.detect(images, ensemble=ensemble)[0]
        assert set(det.labels.tolist()) == {0, 1, 2}
        got = torch.tensor([expected[c] for c in det.labels.tolist()])
        torch.testing.assert_close(det.scores, got, rtol=1e-5, atol=1e-6)
