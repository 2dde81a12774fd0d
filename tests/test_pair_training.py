"""Joint training on detection and image-text pairs (DetCLIPv2) on the tiny fixture cache plus
pair shards written here by hand: the pairs stream (decoding, skipped and counted pairs,
top-k, resize), the seeded iteration pattern and its resume, the pair loss's gradient, the
missing-shards error and the dictionary negatives."""
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from ovdistill.bench.wds_fixture import BASE, NOVEL, TINY_SETTINGS, write_tiny_cache
from ovdistill.pipeline import layout
from ovdistill.pipeline.layout import DatasetCache
from ovdistill.trainer.config import ConfigError, make_config
from ovdistill.trainer.inputs import CacheMismatch
from ovdistill.trainer.model import OpenVocabDetector
from ovdistill.trainer.pair_data import (
    NO_BOX,
    NO_PHRASE,
    REJECTED,
    is_pair_iteration,
    load_dictionary_negatives,
    load_pseudo_boxes,
    pair_pipeline,
    pair_samples,
    sample_negatives,
)
from ovdistill.trainer.train import main as train_main
from PIL import Image

SETS = [arg for k, v in TINY_SETTINGS.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
PAIR_SETS = ["--set", "pairs_batch_size=8", "--set", "pairs_sizes=[48]",
             "--set", "pairs_top_k=4"]
N_GOOD, SIZE, K = 10, 64, 6
SEED = 0


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _jpeg(size: int, colour) -> bytes:
    img = Image.new("RGB", (size, size), (128, 128, 128))
    img.paste(colour, (8, 8, 40, 40))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _pair(image_id: int, phrases: list[str], text: dict, n_boxes: int = K,
          rng=None) -> dict:
    rng = rng or np.random.default_rng(image_id)
    xy = rng.uniform(0, SIZE / 2, (n_boxes, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, SIZE / 2, (n_boxes, 2))], axis=1)
    dim = len(next(iter(text.values())))
    emb = np.asarray([text[p] for p in phrases], np.float16).reshape(len(phrases), dim)
    return {"__key__": f"pair{image_id}",
            "jpg": _jpeg(SIZE, (200, 40 * (image_id % 5), 40)),
            "boxes.npy": _npy(boxes.astype(np.float32)),
            "scores.npy": _npy(np.linspace(1, 0.1, n_boxes).astype(np.float32)),
            "phrases.json": json.dumps({"image_id": image_id, "width": SIZE, "height": SIZE,
                                        "caption": " and ".join(phrases) or "nothing here",
                                        "phrases": phrases}).encode(),
            "phrase_emb.npy": _npy(emb)}


def write_pair_shards(dataset_dir: Path, dim: int) -> list[dict]:
    """Two pair shards: N_GOOD pairs, one with no phrase, one with no box, one malformed
    (2 phrases, 1 embedding row); and phrases/dictionary.parquet. Returns the samples in the
    order written (shard 0, then shard 1)."""
    table = pq.read_table(dataset_dir / layout.TEXT / "tiny.parquet").to_pydict()
    text = dict(zip(table["name"], np.asarray(table["embedding"], np.float32)))
    names = list(BASE + NOVEL)
    samples = [_pair(i, [names[i % 4], names[(i + 1) % 4]][: 1 + i % 2], text)
               for i in range(1, N_GOOD + 1)]
    no_phrase = _pair(101, [], text)
    no_box = _pair(102, ["ring"], text, n_boxes=0)
    bad = dict(_pair(103, ["box", "ring"], text), **{"phrase_emb.npy": _npy(
        np.asarray([text["box"]], np.float16))})
    # skipped ones mid-shard: their counts ride on the next pair decoded
    samples = samples[:3] + [no_phrase] + samples[3:5] + [no_box, bad] + samples[5:]
    cache = DatasetCache(dataset_dir)
    cache.pair_shards_dir().mkdir(parents=True, exist_ok=True)
    half = len(samples) // 2
    for i, part in enumerate((samples[:half], samples[half:])):
        with wds.TarWriter(str(cache.pair_shards_dir() / layout.pair_shard_name(i))) as w:
            for s in part:
                w.write(s)
    rng = np.random.default_rng(7)
    concept = rng.normal(size=(3, dim)).astype(np.float32)
    dictionary = {"box": ("base", text["box"]), "ball": ("base", text["ball"]),
                  "bar": ("base", text["bar"]), "ring": ("novel", text["ring"]),
                  "cube": ("concept", concept[0]), "BOX": ("concept", concept[1]),
                  "disc": ("concept", concept[2])}
    cache.stage_dir(layout.PHRASES).mkdir(parents=True, exist_ok=True)
    emb = np.asarray([e for _, e in dictionary.values()], np.float32)
    pq.write_table(pa.table({
        "name": pa.array(list(dictionary)),
        "split": pa.array([s for s, _ in dictionary.values()]),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)}),
        cache.dictionary())
    return samples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    t = write_tiny_cache(tmp_path_factory.mktemp("tiny"))
    write_pair_shards(t.dataset_dir, t.dim)
    return t


def _train(tiny, out, *extra):
    return train_main(["--manifest", str(tiny.manifest), "--cache", str(tiny.cache),
                       "--out", str(out), "--device", "cpu", "--seed", str(SEED), *SETS,
                       *PAIR_SETS, *extra])


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_one_pass_keeps_the_good_pairs_and_counts_the_skipped(tiny):
    urls = [str(p) for p in DatasetCache(tiny.dataset_dir).pair_shards()]
    out = list(pair_samples(urls, tiny.dim, top_k=4))
    assert [s["image_id"] for s in out] == list(range(1, N_GOOD + 1))
    skipped = {k: sum(s["skipped"][k] for s in out) for k in (NO_PHRASE, NO_BOX, REJECTED)}
    assert skipped == {NO_PHRASE: 1, NO_BOX: 1, REJECTED: 1}
    assert out[3]["skipped"] == {NO_PHRASE: 1, NO_BOX: 0, REJECTED: 0}  # after pair101
    raw = _pair(1, ["box"], {"box": np.zeros(tiny.dim)})
    written = np.load(io.BytesIO(raw["boxes.npy"]))
    assert out[0]["boxes"].tolist() == written[:4].clip(0, SIZE).tolist()  # top-4, in order
    assert out[0]["phrases"] == ["ball", "bar"] and out[1]["phrases"] == ["bar"]
    assert out[0]["phrase_emb"].shape == (2, tiny.dim) and out[1]["phrase_emb"].shape == (
        1, tiny.dim)
    assert out[0]["phrase_emb"].dtype == torch.float16


def test_pair_batches_are_resized_with_their_boxes(tiny):
    urls = [str(p) for p in DatasetCache(tiny.dataset_dir).pair_shards()]
    cfg = make_config({**TINY_SETTINGS, "pairs_batch_size": 4, "pairs_sizes": [32],
                       "flip_prob": 0.0, "pairs_top_k": 3})
    images, pairs, skipped = next(iter(pair_pipeline(urls, cfg, tiny.dim, seed=0)))
    assert len(images) == len(pairs) == 4 and set(skipped) == {NO_PHRASE, NO_BOX, REJECTED}
    originals = {s["image_id"]: s for s in pair_samples(urls, tiny.dim, top_k=3)}
    for im, p in zip(images, pairs):
        assert im.shape == (3, 32, 32) and im.dtype == torch.float32
        want = originals[int(p["image_id"])]["boxes"] * 0.5  # 64 px -> 32 px
        torch.testing.assert_close(p["boxes"], want)
    # equal phrase ids within the batch exactly where the phrase texts are equal
    texts = [(t, int(i)) for p in pairs for t, i in zip(
        originals[int(p["image_id"])]["phrases"], p["phrase_ids"])]
    assert all(p["phrase_ids"].dtype == torch.int64 for p in pairs)
    assert all((ta == tb) == (ia == ib) for ta, ia in texts for tb, ib in texts)
    assert sorted({i for _, i in texts}) == list(range(len({t for t, _ in texts})))


def test_joint_training_pattern_skips_and_resume(tiny, tmp_path, capsys):
    """6 steps at pairs_ratio 0.5 (and dictionary negatives on the detection iterations), cut
    at step 3 and resumed: loss_pairs on exactly the seeded pair iterations, loss_text on the
    others, skipped pairs counted in metrics.jsonl."""
    pattern = [is_pair_iteration(SEED, i, 0.5) for i in range(6)]
    assert 2 <= sum(pattern) < 6  # both kinds in these 6 steps, two pair batches or more
    run = tmp_path / "joint"
    assert _train(tiny, run, "--steps", "6", "--stop-at", "3",
                  "--set", "pairs_ratio=0.5", "--set", "dictionary_negatives=2") == 0
    assert "dictionary negatives: 2 of 3 non-base concepts" in capsys.readouterr().out
    assert torch.load(run / "latest.pt", weights_only=True)["step"] == 3
    assert _train(tiny, run, "--resume", "latest") == 0
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert ["loss_pairs" in r for r in rows] == pattern
    assert ["loss_text" in r for r in rows] == [not p for p in pattern]
    for r in rows:
        if "loss_pairs" in r:
            assert r["loss_pairs"] > 0 and r["loss"] == pytest.approx(r["loss_pairs"])
            assert {NO_PHRASE, NO_BOX, REJECTED} <= set(r)
        else:
            assert NO_PHRASE not in r
    # 8 pairs a batch, 10 good pairs a pass: by the second pair batch each skip was counted
    totals = {k: sum(r.get(k, 0) for r in rows) for k in (NO_PHRASE, NO_BOX, REJECTED)}
    assert all(v >= 1 for v in totals.values()), totals
    assert json.loads((run / "config.json").read_text())["config"]["pairs_ratio"] == 0.5


def test_a_pair_step_trains_the_backbone_and_text_head_only(tiny, tmp_path):
    run = tmp_path / "pairs_only"
    assert _train(tiny, run, "--steps", "1", "--set", "pairs_ratio=1.0",
                  "--heads", "separate") == 0
    assert "loss_pairs" in _metrics(run)[0] and "loss_text" not in _metrics(run)[0]
    cfg = make_config({**TINY_SETTINGS, "pairs_batch_size": 8, "pairs_sizes": [48],
                       "pairs_top_k": 4, "pairs_ratio": 1.0, "heads": "separate",
                       "seed": SEED})
    torch.manual_seed(cfg.seed)  # the trainer's initialisation
    init = OpenVocabDetector(cfg, tiny.dim).state_dict()
    after = torch.load(run / "latest.pt", weights_only=True)["model"]
    changed = {k for k, v in init.items() if not torch.equal(after[k], v)}
    assert "text_tower.proj.weight" in changed and "backbone.body.conv1.weight" in changed
    untouched = [k for k in init if k.startswith(("rpn.", "roi_heads.box_predictor",
                                                  "image_tower.", "bg_embedding"))]
    assert untouched and not changed & set(untouched)


def test_pairs_without_pair_shards_is_one_line(tmp_path, capsys):
    bare = write_tiny_cache(tmp_path / "bare")
    rc = train_main(["--manifest", str(bare.manifest), "--cache", str(bare.cache),
                     "--out", str(tmp_path / "run"), "--device", "cpu", *SETS,
                     "--set", "pairs_ratio=0.5"])
    err = capsys.readouterr().err
    folder = bare.dataset_dir / layout.PAIRS_WDS
    assert rc == 2 and err == (f"error: {folder}: no pairs-*.tar shards, which pairs_ratio > 0 "
                               f"trains on: run `python -m ovdistill run --stages "
                               f"pair_pack`\n")


def test_pair_options_are_validated_in_one_line():
    for bad, match in ((("pairs_ratio", 1.5), r"^pairs_ratio is the share .* got 1\.5$"),
                       (("pairs_batch_size", 1), r"^pairs_batch_size must be >= 2"),
                       (("pairs_tau", 0.0), r"^pairs_tau must be > 0, got 0\.0$"),
                       (("pairs_top_k", 0), r"^pairs_top_k must be >= 1, got 0$"),
                       (("pairs_negatives", "none"),
                        r"^pairs_negatives must be one of \('all', 'unnamed'\), got 'none'$"),
                       (("dictionary_negatives", -1), r"^dictionary_negatives must be >= 0")):
        with pytest.raises(ConfigError, match=match):
            make_config(dict([bad]))
    with pytest.raises(ConfigError, match="mode image has none"):
        make_config({"dictionary_negatives": 4, "mode": "image"})
    assert make_config({}).pairs_ratio == 0.0  # off by default


def test_dictionary_negatives_are_extra_columns_never_base(tiny):
    names, pool = load_dictionary_negatives(tiny.dataset_dir, tiny.dim, list(BASE))
    assert names == ["ring", "cube", "disc"]  # not the base rows, nor "BOX" (a base name)
    assert pool.shape == (3, tiny.dim)
    torch.testing.assert_close(pool.norm(dim=-1), torch.ones(3))
    rows = sample_negatives(len(names), 2, seed=0, step=5)
    assert rows == sample_negatives(3, 2, seed=0, step=5) and len(set(rows)) == 2
    assert sample_negatives(3, 10, seed=0, step=1) == [0, 1, 2]  # only what it holds

    cfg = make_config({**TINY_SETTINGS, "mode": "text", "dictionary_negatives": 2})
    model = OpenVocabDetector(cfg, tiny.dim)
    table = pq.read_table(tiny.dataset_dir / layout.TEXT / "tiny.parquet").to_pydict()
    text = torch.tensor(table["embedding"])
    model.set_vocabulary(text, torch.tensor([s == "base" for s in table["split"]]))
    plain, aliases = model.text_classifier()
    with_neg, _ = model.text_classifier(pool[rows])
    assert aliases == 0 and plain.shape == (3, tiny.dim) and with_neg.shape == (5, tiny.dim)
    torch.testing.assert_close(with_neg[3:], pool[rows])
    base_rows = torch.nn.functional.normalize(text[:3], dim=-1)
    assert (with_neg[3:] @ base_rows.t()).max() < 0.999  # no base text among the negatives
    from ovdistill.trainer.losses import region_logits
    logits = region_logits(torch.nn.functional.normalize(torch.randn(7, tiny.dim), dim=-1),
                           model.bg_embedding, with_neg, cfg.temperature)
    assert logits.shape == (7, 1 + 3 + 2)



def test_ablation_rows_add_pairs_to_text_and_vild():
    from types import SimpleNamespace

    from ovdistill.trainer import ablation

    rows = ablation.ROWS
    assert (rows["pairs"].mode, rows["vild+pairs"].mode) == ("text", "vild")
    assert rows["pairs"].options == rows["vild+pairs"].options == ablation.PAIRS
    assert ablation.PAIRS == {"pairs_ratio": 0.5, "pairs_weight": 0.1, "pairs_top_k": 10}
    assert make_config(ablation.PAIRS)
    args = SimpleNamespace(out="o", manifest="m", cache="c", steps=700, seed=0, set=[])
    cmd = ablation.train_command(rows["vild+pairs"], args)
    assert cmd[cmd.index("--out") + 1] == str(Path("o") / "vild+pairs")
    assert cmd[-8:] == ["--steps=700", "--seed=0", "--set", "pairs_ratio=0.5", "--set",
                        "pairs_weight=0.1", "--set", "pairs_top_k=10"]


class _Quadratic(torch.nn.Module):
    """loss = 100 x |w|^2 (pairs: the same, times pairs_weight as pair_losses weights it)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.w = torch.nn.Parameter(torch.ones(4))

    def forward(self, images, targets, pairs=False):
        loss = 100 * (self.w ** 2).sum()
        return {"loss_pairs": self.cfg.pairs_weight * loss} if pairs else {"loss_text": loss}


@pytest.mark.parametrize("pairs", [False, True])
def test_a_pair_step_is_clipped_to_pairs_weight_times_grad_clip(pairs):
    """Clipping makes every large step grad_clip long whatever its loss weight; a pair step
    is clipped at pairs_weight x grad_clip, so pairs_weight is its share of the update."""
    from ovdistill.trainer.config import make_config
    from ovdistill.trainer.train import train_step

    cfg = make_config({"pairs_ratio": 0.5, "pairs_weight": 0.25, "grad_clip": 1.0})
    model = _Quadratic(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    before = model.w.detach().clone()
    kwargs = {"pairs": True} if pairs else {}
    _, _, grad_norm, _ = train_step(model, model, optimizer, scheduler, [], [], cfg,
                                    torch.device("cpu"), **kwargs)
    step = (before - model.w.detach()).norm().item()
    weight = 0.25 if pairs else 1.0
    assert grad_norm.item() == pytest.approx(weight * 200 * 2)  # |d/dw| = 200 |w| = 400
    assert step == pytest.approx(weight * 1.0, rel=1e-5)


def test_unnamed_negatives_leave_out_images_whose_caption_names_the_phrase():
    """pairs_negatives "unnamed": the model's loss_pairs against the per-phrase contrast
    written out from its own region embeddings, an image whose caption names the phrase
    left out of that phrase's softmax."""
    dim, tau = 8, 0.1
    cfg = make_config({**TINY_SETTINGS, "pairs_negatives": "unnamed", "pairs_tau": tau,
                       "pairs_weight": 0.5, "pairs_ratio": 0.5})
    torch.manual_seed(0)
    model = OpenVocabDetector(cfg, dim).eval()
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 48, 48, generator=gen) for _ in range(3)]
    boxes = [torch.tensor([[2.0, 2.0, 30.0, 30.0], [10.0, 5.0, 45.0, 40.0]]),
             torch.tensor([[0.0, 0.0, 20.0, 44.0]]),
             torch.tensor([[5.0, 5.0, 40.0, 25.0], [1.0, 20.0, 47.0, 47.0],
                           [8.0, 8.0, 16.0, 16.0]])]
    phrases = torch.randn(4, dim, generator=gen)
    ids = [[0, 1], [1], [2, 0]]  # caption 1 names caption 0's phrase 1, caption 2 its phrase 0
    pairs = [{"boxes": b, "phrase_emb": phrases[i].half(), "phrase_ids": torch.tensor(i)}
             for b, i in zip(boxes, ids)]
    with torch.no_grad():
        got = float(model.pair_losses(images, pairs)["loss_pairs"])
        regions = model.pair_region_embeddings(images, boxes)
    unit = torch.nn.functional.normalize(phrases.half().float(), dim=-1)
    terms = []
    for a, caption in enumerate(ids):
        for q in caption:
            images_in = [b for b in range(3) if b == a or q not in ids[b]]
            logits = torch.stack([(regions[b] @ unit[q]).max() / tau for b in images_in])
            terms.append(float(torch.logsumexp(logits, 0) - logits[images_in.index(a)]))
    assert len(terms) == 5 and got == pytest.approx(0.5 * sum(terms) / 5, rel=1e-5)
    everyone = make_config({**TINY_SETTINGS, "pairs_tau": tau, "pairs_weight": 0.5})
    assert everyone.pairs_negatives == "all"  # DetCLIPv2's caption-level loss by default


TAU = 0.1
TWO_PAIRS = {**TINY_SETTINGS, "pairs_tau": TAU, "pairs_weight": 0.5, "pairs_ratio": 0.5}


def _two_pairs(option: str, weight: float, extra: list[dict] | None = None):
    """A model with `option` = weight on TWO_PAIRS, two 48 px pair images (2 and 1 proposals;
    phrase ids [0, 1] and [2, 0] of 3 random phrases), each pair dict updated by `extra`.
    Returns (model, images, boxes, unit phrases Tensor[3, D], ids, pairs)."""
    dim = 8
    torch.manual_seed(0)
    model = OpenVocabDetector(make_config({**TWO_PAIRS, option: weight}), dim).eval()
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 48, 48, generator=gen) for _ in range(2)]
    boxes = [torch.tensor([[2.0, 2.0, 30.0, 30.0], [10.0, 5.0, 45.0, 40.0]]),
             torch.tensor([[0.0, 0.0, 20.0, 44.0]])]
    phrases = torch.randn(3, dim, generator=gen)
    ids = [[0, 1], [2, 0]]
    pairs = [{"boxes": b, "phrase_emb": phrases[i].half(), "phrase_ids": torch.tensor(i),
              **(e or {})} for b, i, e in zip(boxes, ids, extra or [None, None])]
    unit = torch.nn.functional.normalize(phrases.half().float(), dim=-1)
    return model, images, boxes, unit, ids, pairs


def _off_leaves_loss_pairs(model, images, pairs, got, option):
    """The same weights with `option` off: only loss_pairs, equal to `got`'s; a negative
    weight, or a weight without pair iterations, is refused in one line."""
    model.cfg = make_config(TWO_PAIRS)
    with torch.no_grad():
        off = model.pair_losses(images, pairs)
    # The option's boxes share the RoI batch with the proposals, so the CPU kernels' blocking
    # may move the last bits (3e-6 relative on an AVX2 host); a leak into loss_pairs moves more.
    assert set(off) == {"loss_pairs"}
    assert float(off["loss_pairs"]) == pytest.approx(float(got["loss_pairs"]), rel=1e-5)
    with pytest.raises(ConfigError, match=rf"^{option} must be >= 0, got -1\.0$"):
        make_config({option: -1.0})
    with pytest.raises(ConfigError, match=rf"^{option} > 0 acts on pair iterations: set "
                                          rf"pairs_ratio > 0 \(it is 0\)$"):
        make_config({option: 1.0})


def test_the_word_loss_is_each_phrases_best_region_against_the_batchs_phrases():
    """pairs_word_weight > 0: loss_pairs_word = pairs_weight x pairs_word_weight x the mean
    over the batch's phrases of -max over its image's regions of log softmax over the batch's
    3 distinct phrases, written out from the model's own region embeddings; absent at 0."""
    model, images, boxes, unit, ids, pairs = _two_pairs("pairs_word_weight", 2.0)
    with torch.no_grad():
        got = model.pair_losses(images, pairs)
        regions = model.pair_region_embeddings(images, boxes)
    terms = [-float((regions[a] @ unit.t() / TAU).log_softmax(-1)[:, q].max())
             for a, caption in enumerate(ids) for q in caption]
    assert float(got["loss_pairs_word"]) == pytest.approx(0.5 * 2.0 * sum(terms) / 4, rel=1e-5)
    _off_leaves_loss_pairs(model, images, pairs, got, "pairs_word_weight")


def test_the_pseudo_loss_is_the_students_embedding_of_each_pseudo_box_against_the_phrases():
    """pairs_pseudo_weight > 0: loss_pairs_pseudo = pairs_weight x pairs_pseudo_weight x the
    mean over the phrases with a pseudo-box of -log softmax over the batch's 3 distinct phrases
    of the student's embedding of that box, written out from the model's own embeddings of
    those boxes; the image-level loss still reads only the proposals; absent at 0."""
    pseudo = [torch.tensor([[4.0, 6.0, 40.0, 30.0], [0.0, 0.0, 0.0, 0.0]]),
              torch.tensor([[8.0, 8.0, 47.0, 47.0], [1.0, 2.0, 25.0, 20.0]])]
    has = [torch.tensor([True, False]), torch.tensor([True, True])]
    model, images, _, unit, ids, pairs = _two_pairs(
        "pairs_pseudo_weight", 3.0,
        [{"pseudo_boxes": q, "pseudo_mask": m} for q, m in zip(pseudo, has)])
    with torch.no_grad():
        got = model.pair_losses(images, pairs)
        emb = model.pair_region_embeddings(images, pseudo)
    terms = [-float((emb[a][p] @ unit.t() / TAU).log_softmax(-1)[q])
             for a, caption in enumerate(ids) for p, q in enumerate(caption) if has[a][p]]
    assert len(terms) == 3
    assert float(got["loss_pairs_pseudo"]) == pytest.approx(0.5 * 3.0 * sum(terms) / 3, rel=1e-5)
    _off_leaves_loss_pairs(model, images, pairs, got, "pairs_pseudo_weight")


def test_pseudo_boxes_ride_with_their_phrases_and_train(tiny, tmp_path, capsys):
    """pairs_pseudo_weight > 0 reads the pseudo_boxes stage's file: missing, one line naming
    it; present, each phrase with a kept box carries it (resized with its image), the others
    are masked, and a pair step logs loss_pairs_pseudo."""
    path = DatasetCache(tiny.dataset_dir).stage_dir(layout.PSEUDO_BOXES) / layout.PSEUDO_FILE
    assert _train(tiny, tmp_path / "missing", "--steps", "1", "--set", "pairs_ratio=1.0",
                  "--set", "pairs_pseudo_weight=1.0") == 2
    assert capsys.readouterr().err == (
        f"error: {path}: not found; pairs_pseudo_weight > 0 reads the pseudo_boxes stage's kept "
        f"boxes: run `python -m ovdistill run --stages pseudo_boxes`\n")
    urls = [str(p) for p in DatasetCache(tiny.dataset_dir).pair_shards()]
    originals = {s["image_id"]: s for s in pair_samples(urls, tiny.dim, top_k=3)}
    # every pair's first phrase gets a box [x, y, w, h] = [2i, 4, 20, 10 + i]; the second none
    annotations = [{"id": i, "image_id": i, "bbox": [2.0 * i, 4.0, 20.0, 10.0 + i],
                    "phrase": s["phrases"][0], "rank": 0} for i, s in originals.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": [], "annotations": annotations, "categories": []}))
    try:
        pseudo = load_pseudo_boxes(path)
        assert pseudo[3] == {originals[3]["phrases"][0]: [6.0, 4.0, 26.0, 17.0]}
        for flip in (0.0, 1.0):
            cfg = make_config({**TINY_SETTINGS, "pairs_batch_size": 4, "pairs_sizes": [32],
                               "flip_prob": flip, "pairs_top_k": 3})
            _, pairs, _ = next(iter(pair_pipeline(urls, cfg, tiny.dim, seed=0, pseudo=pseudo)))
            for p in pairs:
                i = int(p["image_id"])
                n = len(originals[i]["phrases"])
                assert p["pseudo_mask"].tolist() == [True] + [False] * (n - 1)
                x1, x2 = (32.0 - i - 10.0, 32.0 - i) if flip else (i, i + 10.0)  # 64 -> 32 px
                assert p["pseudo_boxes"][0].tolist() == [x1, 2.0, x2, (14.0 + i) / 2]
        run = tmp_path / "pseudo"
        assert _train(tiny, run, "--steps", "1", "--set", "pairs_ratio=1.0",
                      "--set", "pairs_pseudo_weight=1.0") == 0
        row = _metrics(run)[0]
        assert row["loss_pairs_pseudo"] > 0
        assert row["loss"] == pytest.approx(row["loss_pairs"] + row["loss_pairs_pseudo"])
        assert f"pseudo-boxes: {len(originals)} kept boxes on {len(originals)} pair images" in (
            capsys.readouterr().out)
        annotations[1]["bbox"] = [1.0, 2.0]
        path.write_text(json.dumps({"annotations": annotations}))
        with pytest.raises(CacheMismatch, match=rf"^{re.escape(str(path))}: annotation 1 is not "
                                                rf"a pseudo-box of the pseudo_boxes stage "
                                                rf"\(ValueError: "):
            load_pseudo_boxes(path)
    finally:
        path.unlink()


def test_a_frozen_backbone_leaves_the_pair_loss_and_the_text_towers_gradient_as_they_are():
    """pairs_frozen_backbone: the same loss_pairs and the same text-tower gradient as without
    it, to float precision, but no gradient on any backbone parameter (without it every
    trainable backbone layer gets one); refused in one line without pair iterations."""
    grads = {}
    for frozen in (False, True):
        model, images, _, _, _, pairs = _two_pairs("pairs_frozen_backbone", frozen)
        model.train()
        loss = model.pair_losses(images, pairs)["loss_pairs"]
        loss.backward()
        grads[frozen] = (float(loss.detach()), {n: p.grad for n, p in model.named_parameters()})
    (plain, g0), (frozen, g1) = grads[False], grads[True]
    assert frozen == pytest.approx(plain, rel=1e-6)
    tower = [n for n in g0 if n.startswith("text_tower.")]
    assert tower and all(g1[n] is not None for n in tower)
    for n in tower:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-7)
    backbone = [n for n in g0 if n.startswith("backbone.")]
    moved = [n for n in backbone if g0[n] is not None and g0[n].abs().sum() > 0]
    assert len(moved) > 10  # the plain pair step trains the backbone
    assert all(g1[n] is None for n in backbone)
    with pytest.raises(ConfigError, match=r"^pairs_frozen_backbone acts on pair iterations: "
                                          r"set pairs_ratio > 0 \(it is 0\)$"):
        make_config({"pairs_frozen_backbone": True})
