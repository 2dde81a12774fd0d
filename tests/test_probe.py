"""trainer.probe: the head-only proxy. Report math by hand, the head on planted features whose
right answer is known, disjoint held-out images, and the CLI on the tiny cache."""
import json
import os
import shutil
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F
from ovdistill.bench.wds_fixture import write_tiny_cache
from ovdistill.trainer.config import ConfigError, TrainConfig
from ovdistill.trainer.probe import (
    FEATURES_FILE,
    RESULTS_FILE,
    ProbeConfig,
    accuracy_report,
    confident_rows,
    cosine_report,
    head_predictions,
    image_fit,
    main,
    plan_images,
    probe_config,
    teacher_for_boxes,
    train_heads,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one thread is ~30x faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


NAMES = ["a", "b", "c"]
IS_BASE = torch.tensor([True, True, False])


# ----------------------------------------------------------------------------- report math


def test_accuracy_report_by_hand():
    labels = torch.tensor([0, 1, 1, 2, 2])
    pred = torch.tensor([0, 2, 1, 2, 0])
    r = accuracy_report(pred, labels, IS_BASE, NAMES)
    # base boxes 0, 1, 2: right, wrong, right; novel boxes 3, 4: right, wrong
    assert r == {"acc_base": 0.6667, "acc_novel": 0.5, "acc_all": 0.6, "n_base": 3,
                 "n_novel": 2, "top": "a", "top_share": 0.4}
    # a collapsed predictor: one class for every box
    collapsed = accuracy_report(torch.full((5,), 2), labels, IS_BASE, NAMES)
    assert collapsed["top"] == "c" and collapsed["top_share"] == 1.0
    assert collapsed["acc_base"] == 0.0 and collapsed["acc_novel"] == 1.0
    only_base = accuracy_report(pred[:3], labels[:3], IS_BASE, NAMES)
    assert only_base["acc_novel"] is None and only_base["n_novel"] == 0


def test_cosine_report_skips_boxes_without_a_teacher():
    student = torch.tensor([[1.0, 0], [0, 1.0], [0.6, 0.8], [1.0, 0]])
    teacher = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 0]])
    has = torch.tensor([True, True, True, False])
    labels = torch.tensor([0, 1, 2, 2])
    r = cosine_report(student, teacher, has, labels, IS_BASE)
    # cosines 1, 0, 0.8; box 3 has no teacher embedding
    assert r == {"n": 3, "all": 0.6, "base": 0.5, "novel": 0.8}
    assert cosine_report(student[:2], teacher[:2], has[:2], labels[:2], IS_BASE)["novel"] is None


def test_teacher_for_boxes_takes_the_best_overlap_above_iou():
    gt = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], dtype=torch.float)
    cached = torch.tensor([[0, 0, 10, 4], [0, 0, 10, 10], [21, 21, 31, 31], [50, 50, 52, 52]],
                          dtype=torch.float)
    emb = torch.eye(4)
    t, has = teacher_for_boxes(gt, cached, emb, 0.5)
    # gt0: IoU 0.4 / 1.0 -> proposal 1; gt1: 81/119 = 0.68 -> proposal 2; gt2: 0.04 -> none
    assert has.tolist() == [True, True, False]
    assert torch.equal(t, torch.stack([emb[1], emb[2], torch.zeros(4)]))
    t, has = teacher_for_boxes(gt, cached[:0], emb[:0], 0.5)
    assert t.shape == (3, 4) and not has.any()


def test_image_fit_is_one_for_the_mean_direction():
    torch.manual_seed(0)
    target = F.normalize(torch.randn(50, 8) + 3.0, dim=-1)
    mean = F.normalize(target.mean(0), dim=0).expand_as(target)
    assert image_fit(mean, target, 0.5)["ratio"] == 1.0
    perfect = image_fit(target, target, 0.5)
    assert perfect["ratio"] == 0.0 and perfect["loss_image"] == 0.0 and perfect["baseline"] > 0
    # a contrastive-only run (weight 0) still gets a ratio
    assert image_fit(mean, target, 0.0)["ratio"] == 1.0


def test_ensemble_prediction_follows_the_vild_weights():
    text = torch.eye(3)
    bg = torch.tensor([0.0, 0.0, 0.0, 1.0])
    text4 = F.pad(text, (0, 1))
    # text head: class b; image head: class c (novel) much more strongly
    t_emb = F.normalize(torch.tensor([[0.0, 1.0, 0.9, 0.0]]), dim=-1)
    i_emb = F.normalize(torch.tensor([[0.0, 0.5, 1.0, 0.0]]), dim=-1)
    p = head_predictions(t_emb, i_emb, bg, text4, IS_BASE, 0.01)
    assert p["text"].tolist() == [1] and p["image"].tolist() == [2]
    assert p["ensemble"].tolist() == [2]
    assert set(head_predictions(t_emb, None, bg, text4, IS_BASE, 0.01)) == {"shared"}


def test_confident_rows_cap_each_image():
    scores = torch.tensor([0.9, 0.8, 0.2, 0.95, 0.6, 0.7])
    image = torch.tensor([0, 0, 0, 1, 1, 1])
    assert confident_rows(scores, image, 0.5, 0).tolist() == [1, 1, 0, 1, 1, 1]
    assert confident_rows(scores, image, 0.5, 1).tolist() == [1, 0, 0, 1, 0, 0]


# ----------------------------------------------------------------------------- held-out split


def test_plan_images_keeps_held_out_images_disjoint():
    stream = [5, 3, 9, 1, 7, 2, 8, 4]
    train, held = plan_images(stream, 3, 3, answer_key={5, 9, 7, 8, 4})
    assert train == [5, 3, 9]
    assert held == [7, 8, 4]  # the next ones the answer key names (1 and 2 it does not)
    assert not set(train) & set(held)
    train, held = plan_images(stream + [5, 9], 7, 5, answer_key=set(stream))
    assert held == [4] and not set(train) & set(held)  # a repeated id is never held out


# ----------------------------------------------------------------------------- the head


def planted(n: int, labels: torch.Tensor, patterns: torch.Tensor, noise: float = 0.3,
            seed: int = 0) -> torch.Tensor:
    """RoI-like features Tensor[n, 4, 7, 7] that linearly encode `labels`."""
    g = torch.Generator().manual_seed(seed)
    x = patterns[labels] + noise * torch.randn(n, patterns.shape[1], generator=g)
    return x.reshape(n, 4, 7, 7)


@pytest.fixture(scope="module")
def toy_problem():
    """3 base classes + 1 novel (vocabulary 0..3; novel = 3), texts orthonormal in D = 8."""
    g = torch.Generator().manual_seed(1)
    patterns = torch.randn(5, 196, generator=g)  # rows 0..3: classes, row 4: background
    text = torch.eye(8)[:4]
    is_base = torch.tensor([True, True, True, False])
    live_cls = torch.randint(0, 4, (600,), generator=g)  # 0..2 base objects, 3 = background
    live_labels = torch.where(live_cls == 3, 0, live_cls + 1)  # ViLD label: 0 = bg, 1..3
    live = planted(600, torch.where(live_cls == 3, 4, live_cls), patterns, seed=2)
    cached_cls = torch.randint(0, 4, (600,), generator=g)  # novel objects included
    cached = planted(600, cached_cls, patterns, seed=3)
    held_cls = torch.arange(4).repeat(40)
    held = planted(160, held_cls, patterns, seed=4)
    return {"patterns": patterns, "text": text, "is_base": is_base, "live": live,
            "live_labels": live_labels, "cached": cached, "cached_cls": cached_cls,
            "held": held, "held_cls": held_cls}


def _scores(heads, p, cfg):
    with torch.no_grad():
        s_text = heads.text(p["held"])
        s_image = heads.image(p["held"]) if heads.image_tower is not None else None
    preds = head_predictions(s_text, s_image, heads.bg_embedding.detach(), p["text"],
                             p["is_base"], cfg.temperature)
    return {k: accuracy_report(v, p["held_cls"], p["is_base"], list("abcd"))
            for k, v in preds.items()}


def test_text_mode_learns_the_base_classes_of_planted_features(toy_problem):
    p = toy_problem
    cfg = ProbeConfig(mode="text", steps=300, batch_size=64, lr=1e-3)
    heads, final = train_heads(cfg, p["live"], p["live_labels"], p["cached"][:0],
                               torch.zeros(0, 8), p["text"][p["is_base"]], 32)
    r = _scores(heads, p, cfg)["shared"]
    assert r["acc_base"] >= 0.95, r
    assert r["acc_novel"] <= 0.3, r  # nothing taught it the novel text: the control
    assert set(final) == {"loss_text"} and final["loss_text"] < 0.2


def test_image_mode_learns_novel_classes_from_the_targets(toy_problem):
    p = toy_problem
    cfg = ProbeConfig(mode="image", steps=300, batch_size=64, lr=1e-3)
    target = p["text"][p["cached_cls"]]  # the teacher says exactly the class text
    heads, final = train_heads(cfg, p["live"], p["live_labels"], p["cached"], target,
                               p["text"][p["is_base"]], 32)
    r = _scores(heads, p, cfg)["shared"]
    assert r["acc_novel"] >= 0.9 and r["acc_base"] >= 0.9, r
    assert set(final) == {"loss_foreground", "loss_image"}
    fit = image_fit(heads.image(p["cached"]).detach(), target, 0.5)
    assert fit["ratio"] < 0.3

    # separate heads + contrastive term: the image head carries the novel class
    cfg = replace(cfg, mode="vild", heads="separate", contrastive_weight=0.5)
    heads, final = train_heads(cfg, p["live"], p["live_labels"], p["cached"], target,
                               p["text"][p["is_base"]], 32)
    assert set(final) == {"loss_text", "loss_image", "loss_contrastive"}
    r = _scores(heads, p, cfg)
    assert set(r) == {"text", "image", "ensemble"}
    assert r["image"]["acc_novel"] >= 0.9 and r["text"]["acc_base"] >= 0.9, r


def test_negatives_repel_in_the_text_loss_only(toy_problem):
    from ovdistill.trainer.probe import Heads, probe_losses

    p = toy_problem
    torch.manual_seed(0)
    heads = Heads(196, 16, 8, separate=False)
    neg = F.normalize(torch.randn(3, 8), dim=-1)
    live, labels = p["live"][:32], p["live_labels"][:32]
    none = torch.zeros(0, 4, 7, 7), torch.zeros(0, 8)
    base = p["text"][p["is_base"]]
    for mode, key in (("text", "loss_text"), ("image", "loss_foreground")):
        cfg = ProbeConfig(mode=mode)
        plain = probe_losses(heads, cfg, live, labels, *none, base)[key]
        with_neg = probe_losses(heads, cfg, live, labels, *none, base, neg)[key]
        assert (with_neg > plain) if mode == "text" else torch.equal(with_neg, plain)


def test_probe_config_inherits_the_train_config_and_validates():
    train = TrainConfig(temperature=0.02, image_loss_weight=2.0, distill_top_k=5)
    cfg = probe_config(train, {"mode": "text", "steps": None, "top_k": None})
    assert (cfg.temperature, cfg.image_loss_weight, cfg.top_k, cfg.mode, cfg.steps) == \
        (0.02, 2.0, 5, "text", ProbeConfig().steps)
    assert cfg.variant().startswith("text/shared") and "top_k=5" in cfg.variant()
    with pytest.raises(ConfigError, match="heads=separate .* needs mode=vild"):
        probe_config(train, {"mode": "image", "heads": "separate"})
    with pytest.raises(ConfigError, match="min_score"):
        ProbeConfig(min_score=2.0).validate()


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny cache + an (untrained) RPN-stage checkpoint + a train answer key."""
    from ovdistill.stages.rpn import ProposalNet, RPNArch, save_checkpoint

    root = tmp_path_factory.mktemp("probe")
    c = write_tiny_cache(root)
    torch.manual_seed(0)
    arch = RPNArch(anchor_sizes=(8, 16, 32, 64))
    (c.dataset_dir / "rpn").mkdir()
    save_checkpoint(ProposalNet(arch), c.dataset_dir / "rpn" / "rpn.pt", {"steps": 0})
    (c.dataset_dir / "rpn" / "_MANIFEST.json").write_text(json.dumps(
        {"checkpoint": "rpn.pt", "arch": json.loads(json.dumps(asdict(arch)))}))
    shutil.copy(c.dataset_dir / "dataset" / "train.json",
                c.dataset_dir / "dataset" / "train_full.json")
    with open(c.manifest, "a") as f:
        f.write("trainer: {test_size: 64, max_size: 128, representation_size: 32, "
                "box_batch_size_per_image: 16, rpn_pre_nms_test: 100, rpn_post_nms_test: 50, "
                "cached_per_image: 12}\n")
    return c


def test_cli_extracts_once_reuses_and_reports(tiny, tmp_path, capsys):
    out = tmp_path / "probe"
    base = ["--manifest", str(tiny.manifest), "--cache", str(tiny.cache), "--out", str(out),
            "--images", "8", "--heldout", "4", "--steps", "5", "--batch-size", "16",
            "--log-every", "0"]
    assert main(base + ["--mode", "vild", "--heads", "separate", "--min-score", "0.5"]) == 0
    printed = capsys.readouterr()
    assert "extracted features of 8 + 4 images" in printed.out
    for head in ("text", "image", "ensemble", "teacher"):
        assert f"\n{head} " in printed.out
    blob = torch.load(out / FEATURES_FILE, weights_only=True)
    train_ids, held_ids = set(blob["train_ids"].tolist()), set(blob["heldout_ids"].tolist())
    assert len(train_ids) == 8 and len(held_ids) == 4 and not train_ids & held_ids
    assert blob["cached"].shape == (8 * 12, 256, 7, 7) and blob["cached"].dtype == torch.float16
    assert len(blob["live"]) == len(blob["live_labels"]) <= 8 * 16
    n_gt = sum(1 for i in held_ids for a in json.loads(
        (tiny.dataset_dir / "dataset" / "train_full.json").read_text())["annotations"]
        if a["image_id"] == i)
    assert len(blob["heldout"]) == len(blob["heldout_labels"]) == n_gt
    history = json.loads((out / RESULTS_FILE).read_text())
    kept = int((blob["cached_score"] >= 0.5).sum())  # the jittered GT boxes of the fixture
    assert 0 < kept < len(blob["cached"])
    cached_note = f"confident filter kept {kept} of {len(blob['cached'])} cached"
    assert history[0]["notes"] == [cached_note]
    assert history[0]["features"]["n_distilled"] == kept

    assert main(base + ["--mode", "text", "--center-targets", "--negative-prompts"]) == 0
    printed = capsys.readouterr()
    assert f"reusing {out / FEATURES_FILE}" in printed.out and "all runs in" in printed.out
    history = json.loads((out / RESULTS_FILE).read_text())
    assert [e["variant"].split()[0] for e in history] == ["vild/separate", "text/shared"]
    assert history[1]["notes"] == [
        f"centred by {tiny.dataset_dir / 'text' / 'region_mean.npy'}",
        "3 negative prompts in the ViLD-text classifier"]
    entry = history[1]
    assert set(entry["heads"]) == {"shared", "teacher"}
    assert entry["features"]["extract_seconds"] is None
    assert entry["settings"]["temperature"] == 0.01  # the config's default
    assert entry["heads"]["teacher"]["n_base"] == entry["cos_teacher"]["n"]

    # the same variant again: the same numbers (seeded), one more entry
    assert main(base + ["--mode", "text", "--center-targets", "--negative-prompts"]) == 0
    capsys.readouterr()
    again = json.loads((out / RESULTS_FILE).read_text())
    assert len(again) == 3 and again[2]["heads"] == entry["heads"]
    assert again[2]["image_fit"] == entry["image_fit"]

    # other --images: the metadata differs, so the features are extracted again
    assert main(base[:-6] + ["--images", "6", "--heldout", "4", "--steps", "2",
                             "--log-every", "0", "--mode", "text"]) == 0
    printed = capsys.readouterr()
    assert "extracting again" in printed.err and "extracted features of 6 + 4" in printed.out


def test_cli_probes_a_trainer_runs_backbone(tiny, tmp_path, capsys):
    from ovdistill.trainer.config import make_config
    from ovdistill.trainer.model import OpenVocabDetector

    cfg = make_config({"test_size": 64, "max_size": 128, "representation_size": 32,
                       "norm": "batch", "returned_layers": [2, 3, 4],
                       "anchor_sizes": [8, 16, 32, 64]})
    torch.manual_seed(3)
    ckpt = tmp_path / "latest.pt"
    torch.save({"model": OpenVocabDetector(cfg, tiny.dim).state_dict(), "step": 0,
                "config": cfg.to_dict()}, ckpt)
    out = tmp_path / "p"
    assert main(["--manifest", str(tiny.manifest), "--cache", str(tiny.cache), "--out",
                 str(out), "--init-from", str(ckpt), "--images", "6", "--heldout", "3",
                 "--steps", "2", "--mode", "text", "--log-every", "0"]) == 0
    capsys.readouterr()
    meta = torch.load(out / FEATURES_FILE, weights_only=True)["meta"]
    assert meta["init_from"] == str(ckpt.resolve()) and meta["norm"] == "batch"


def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    base = ["--manifest", str(tiny.manifest), "--cache", str(tiny.cache), "--out",
            str(tmp_path / "p"), "--steps", "1"]
    assert main(base + ["--mode", "text", "--heads", "separate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: heads=separate") and "\n" not in err
    assert main(base + ["--gt", str(tmp_path / "none.json")]) == 2
    assert "no answer key" in capsys.readouterr().err
    negatives = tiny.dataset_dir / "text" / "negatives.parquet"
    negatives.rename(negatives.with_suffix(".away"))
    try:
        assert main(base + ["--negative-prompts"]) == 2
    finally:
        negatives.with_suffix(".away").rename(negatives)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "negatives.parquet: not found" in err
