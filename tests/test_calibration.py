"""Mean-logit calibration: the bias by hand, the deterministic choice of train images, and
`trainer.evaluate --calibration mean_logit` end to end on the tiny fixture cache."""
import json
from types import SimpleNamespace

import pytest
import torch
from ovdistill.bench.wds_fixture import TINY_SETTINGS, write_tiny_cache
from ovdistill.trainer import calibration
from ovdistill.trainer.calibration import bias_from_embeddings, mean_logit_bias, pick_images

TEXT = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # 3 classes, D = 2


def test_bias_is_the_mean_logit_over_every_proposal():
    # image 1: two proposals, image 2: one; each proposal counts once
    embs = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.6, 0.8]])]
    got = bias_from_embeddings(embs, TEXT, temperature=0.5)
    # cosines per proposal and class: [1, 0, .6], [0, 1, .8], [.6, .8, 1]; / 0.5; mean of 3
    want = [(1 + 0 + 0.6) / 0.5 / 3, (0 + 1 + 0.8) / 0.5 / 3, (0.6 + 0.8 + 1) / 0.5 / 3]
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    assert bias_from_embeddings([torch.zeros(0, 2), embs[1]], TEXT, 0.5).tolist() == \
        pytest.approx([1.2, 1.6, 2.0], rel=1e-6)
    with pytest.raises(ValueError, match="no proposals"):
        bias_from_embeddings([torch.zeros(0, 2)], TEXT, 0.5)


class _StubModel:
    """What mean_logit_bias reads of a model: its vocabulary, tau and train/eval state."""

    def __init__(self):
        self.text_emb, self.cfg, self.training = TEXT, SimpleNamespace(temperature=0.1, precision="auto"), True

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode


def test_mean_logit_bias_batches_images_and_restores_train_mode(monkeypatch):
    planted = {3: torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]),  # a batch of 3 images
               1: torch.tensor([[0.0, 1.0]])}                         # and one of 1
    seen = []

    def fake(model, images):
        seen.append((len(images), model.training))
        return planted[len(images)]

    monkeypatch.setattr(calibration, "proposal_embeddings", fake)
    model = _StubModel()
    bias = mean_logit_bias(model, [torch.zeros(3, 8, 8)] * 4, batch_size=3)
    assert seen == [(3, False), (1, False)] and model.training
    # 4 proposals: 2 x [1, 0] and 2 x [0, 1] -> mean cosines [.5, .5, .7], / 0.1 = [5, 5, 7],
    # centred over the 3 classes (mean 17 / 3): the classes' mean logit against the
    # background is left as it was
    assert bias.tolist() == pytest.approx([5 - 17 / 3, 5 - 17 / 3, 7 - 17 / 3], rel=1e-6)


def test_train_images_are_spread_evenly_by_id():
    records = [{"id": i} for i in (9, 3, 0, 6, 1, 2, 4, 5, 7, 8)]
    assert [r["id"] for r in pick_images(records, 4)] == [0, 3, 6, 9]
    assert [r["id"] for r in pick_images(records, 4)] == [0, 3, 6, 9]  # same every time
    assert [r["id"] for r in pick_images(records, 20)] == list(range(10))
    assert pick_images(records, 0) == []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny cache and a run folder with an untrained checkpoint (no training needed)."""
    from ovdistill.trainer.config import make_config
    from ovdistill.trainer.model import OpenVocabDetector
    from ovdistill.trainer.train import CHECKPOINT

    tiny = write_tiny_cache(tmp_path_factory.mktemp("tiny"), n_train=6, n_val=3)
    cfg = make_config({**TINY_SETTINGS, "score_thresh": 0.0})
    torch.manual_seed(0)
    model = OpenVocabDetector(cfg, tiny.dim)
    run = tiny.root / "run"
    run.mkdir()
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "step": 0,
                "embed_dim": tiny.dim, "teacher": None}, run / CHECKPOINT)
    return tiny, run


def test_evaluate_with_mean_logit_calibration(tiny_run, capsys):
    from ovdistill.pipeline.manifests import load_manifest
    from ovdistill.trainer.calibration import calibration_images
    from ovdistill.trainer.evaluate import load_run, main

    tiny, run = tiny_run
    args = ["--manifest", str(tiny.manifest), "--cache", str(tiny.cache), "--run", str(run),
            "--device", "cpu"]
    assert main(args + ["--calibration", "mean_logit", "--calibration-images", "4"]) == 0
    assert "top class" in capsys.readouterr().out
    result = json.loads((run / "eval_mean_logit.json").read_text())
    assert result["calibration"] == "mean_logit"
    assert (run / "detections_val_mean_logit.json").is_file()
    assert not (run / "eval.json").exists()  # the uncalibrated result keeps its own name

    train = json.loads((tiny.dataset_dir / "dataset" / "train.json").read_text())
    train_ids = sorted(im["id"] for im in train["images"])
    assert result["calibration_images"] == [train_ids[i] for i in (0, 2, 3, 5)]  # never val

    # the recorded bias is the model's mean class logit over those images' proposals, centred
    dataset = load_manifest(tiny.manifest, cache_root=tiny.cache)
    model, _, vocab = load_run(run / "latest.pt", dataset, tiny.dataset_dir,
                               torch.device("cpu"))
    images, ids, _ = calibration_images(dataset, 4, model.cfg.test_size, model.cfg.max_size)
    assert ids == result["calibration_images"]
    with torch.no_grad():
        emb = torch.cat([calibration.proposal_embeddings(model, [im]) for im in images])
    want = (emb @ model.text_emb.t() / model.cfg.temperature).mean(0)
    want = want - want.mean()
    assert list(result["logit_bias"]) == list(vocab.names)
    assert list(result["logit_bias"].values()) == pytest.approx(want.tolist(), abs=1e-3)

    assert main(args) == 0  # and the plain evaluation beside it
    plain = json.loads((run / "eval.json").read_text())
    assert plain["calibration"] is None and "logit_bias" not in plain
