"""The index stage (faiss over region embeddings, id map) and `pipeline query`."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from ovdistill.bench.storage_bench import TEACHER_IDENTITY, write_synthetic_cache
from ovdistill.pipeline import clip_teacher as teacher_mod
from ovdistill.pipeline.runner import make_config, run_stage
from ovdistill.stages import index as index_stage
from PIL import Image

from ovdistill import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DIM = 32
QUERY = "a photo of a star"
PLANTED = (7, 5)  # (image_id, rank) whose embedding is the query's text embedding


class FakeTeacher:
    """A stand-in text encoder: a fixed pseudo-random vector per string."""

    def __init__(self):
        self.identity = dict(TEACHER_IDENTITY)

    def encode_texts(self, texts):
        out = []
        for t in texts:
            seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
            out.append(np.random.default_rng(seed).standard_normal(DIM) * 3.0)
        return torch.tensor(np.array(out), dtype=torch.float32)


@pytest.fixture()
def fake_teacher(monkeypatch):
    monkeypatch.setattr(teacher_mod, "teacher_from_cache", lambda ctx, device="cpu": FakeTeacher())


def build(tmp_path, n_images=30, **cfg):
    text = FakeTeacher().encode_texts([QUERY])[0].numpy()
    ctx = write_synthetic_cache(tmp_path, n_images=n_images, m=20, dim=DIM, per_part=7,
                                plant={PLANTED: text})
    manifest = run_stage(index_stage, ctx, make_config(index_stage, cfg), distributor="local",
                         progress=False, log=lambda s: None)
    return ctx, manifest, text


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    return build(tmp_path_factory.mktemp("flat"))


def test_flat_index_finds_the_planted_region_first(flat):
    ctx, manifest, text = flat
    regions = pq.read_table(ctx.cache / "regions")
    assert manifest["index"]["factory"] == "Flat"
    assert manifest["index"]["type"] == "IndexFlat"
    assert manifest["index"]["ntotal"] == manifest["rows"] == regions.num_rows
    assert manifest["index"]["dim"] == DIM and manifest["teacher"] == TEACHER_IDENTITY
    index, ids = index_stage.load_index(ctx.stage_dir("index"))
    hits = index_stage.search(index, ids, text[None], k=5)[0]
    assert (hits[0].image_id, hits[0].rank) == PLANTED
    assert hits[0].similarity == pytest.approx(1.0, abs=2e-3)  # float16 storage
    assert hits[1].similarity < 0.9
    assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)


def test_min_score_keeps_only_confident_proposals_in_similarity_order(flat):
    ctx, _, text = flat
    regions = pq.read_table(ctx.cache / "regions")
    emb = np.array(regions["embedding"].to_pylist(), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    score = np.array(regions["score"].to_pylist())
    floor = float(np.quantile(score, 0.9))  # 10% of rows pass: forces the search to widen
    q = text / np.linalg.norm(text)
    passing = np.flatnonzero(score >= floor)
    want = passing[np.argsort(-(emb[passing] @ q), kind="stable")][:12]
    index, ids = index_stage.load_index(ctx.stage_dir("index"))
    hits = index_stage.search(index, ids, text[None], k=12, min_score=floor)[0]
    assert [h.row for h in hits] == want.tolist()
    assert all(h.proposal_score >= floor for h in hits)
    # a floor nothing reaches: every row was searched and none is returned
    assert index_stage.search(index, ids, text[None], k=3, min_score=2.0) == [[]]


def test_id_map_round_trip(flat):
    ctx, _, _ = flat
    regions = pq.read_table(ctx.cache / "regions")  # parts in file order = faiss add order
    index, ids = index_stage.load_index(ctx.stage_dir("index"))
    table = pq.read_table(ctx.stage_dir("index") / "ids.parquet")
    assert table.column_names == ["row", "image_id", "rank", "box", "score"]
    assert table["row"].to_pylist() == list(range(regions.num_rows)) and len(ids) == len(table)
    for col in ("image_id", "rank", "box", "score"):
        assert table[col].to_pylist() == regions[col].to_pylist()
    assert ids.file.metadata.num_row_groups > 1  # one per regions part
    shuffled = np.random.default_rng(2).permutation(len(table))[:50]
    assert ids.take(shuffled).to_pylist() == table.take(shuffled).to_pylist()
    with pytest.raises(IndexError, match="ids.parquet"):
        ids.take(np.array([len(table)]))
    emb = np.array(regions["embedding"].to_pylist(), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rows = np.random.default_rng(1).choice(len(emb), 25, replace=False)
    for r in rows:
        np.testing.assert_allclose(index.reconstruct(int(r)), emb[r], atol=1e-6)
    hits = index_stage.search(index, ids, emb[rows], k=1)
    for r, (h,) in zip(rows, hits):
        assert (h.row, h.image_id, h.rank) == (r, regions["image_id"][int(r)].as_py(),
                                               regions["rank"][int(r)].as_py())
        assert list(h.box) == pytest.approx(regions["box"][int(r)].as_py())


def test_ivf_pq_above_threshold(tmp_path):
    ctx, manifest, text = build(tmp_path, n_images=40, exact_max=100, seed=3)
    info = manifest["index"]
    assert info["type"] == "IndexIVFPQ" and info["factory"].startswith("IVF")
    nlist = int(info["factory"][3:].split(",")[0])
    assert info["ntotal"] == pq.read_table(ctx.cache / "regions").num_rows > 100
    index, ids = index_stage.load_index(ctx.stage_dir("index"), nprobe=nlist)
    hits = index_stage.search(index, ids, text[None], k=3)[0]
    assert (hits[0].image_id, hits[0].rank) == PLANTED


def test_factory_choice_by_hand():
    cfg = index_stage.Config()
    assert index_stage.ivf_pq_factory(10**6, 500_000, 512, cfg) == "IVF4000,PQ64x8"
    assert index_stage.ivf_pq_factory(400, 400, 32, cfg) == "IVF10,PQ4x6"
    with pytest.raises(Exception, match="does not divide"):
        index_stage.ivf_pq_factory(10**6, 500_000, 512, index_stage.Config(pq_m=48))


def test_query_prints_hits_and_writes_contact_sheet(flat, fake_teacher, tmp_path, capsys):
    ctx, _, _ = flat
    ids = pq.read_table(ctx.stage_dir("index") / "ids.parquet")
    row = ids.filter((ids["image_id"].to_numpy() == PLANTED[0])
                     & (ids["rank"].to_numpy() == PLANTED[1]))
    x1, y1, x2, y2 = row["box"][0].as_py()
    gt = tmp_path / "full_gt.json"  # a fuller GT file: a star exactly on the planted box
    gt.write_text(json.dumps({"images": [], "annotations": [
        {"id": 1, "image_id": PLANTED[0], "category_id": 3, "bbox": [x1, y1, x2 - x1, y2 - y1],
         "iscrowd": 0}]}))
    out = tmp_path / "sheet.png"
    rc = cli.main(["query", QUERY, "--cache", str(ctx.cache.parent), "--dataset", "synth",
                   "--k", "7", "--out", str(out), "--cols", "3", "--tile", "64",
                   "--gt", str(gt)])
    text = capsys.readouterr().out
    assert rc == 0, text
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (3 * 64, 3 * 64)
    lines = [ln.split() for ln in text.splitlines() if ln.strip()[:1].isdigit()]
    assert len(lines) == 7
    first = lines[0]
    assert (int(first[1]), int(first[2])) == PLANTED and first[-2:] == ["star", "(1.00)"]
    assert "precision@7 for 'star' (best GT IoU >= 0.5): 1/7" in text
    # without the fuller file a train split with no star boxes cannot score: say so
    train = ctx.dataset.split("train").annotations
    doc = json.loads(train.read_text())
    doc["annotations"] = [a for a in doc["annotations"] if a["category_id"] != 3]
    train.write_text(json.dumps(doc))
    assert cli.main(["query", QUERY, "--cache", str(ctx.cache.parent), "--dataset", "synth",
                     "--k", "7", "--out", str(out)]) == 0
    assert "precision@7 for 'star': not measurable" in capsys.readouterr().out
    # a synthetic dataset stage's train_full.json is the default answer key
    full = ctx.stage_dir("dataset") / "train_full.json"
    full.parent.mkdir(parents=True, exist_ok=True)
    full.write_text(gt.read_text())
    assert cli.main(["query", QUERY, "--cache", str(ctx.cache.parent), "--dataset", "synth",
                     "--k", "7", "--out", str(out)]) == 0
    assert "precision@7 for 'star' (best GT IoU >= 0.5): 1/7" in capsys.readouterr().out


def test_image_records_merge_gt_files(tmp_path):
    from ovdistill.query import image_records

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": [
        {"image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5]},
        {"image_id": 1, "category_id": 3, "bbox": [0, 0, 9, 9], "iscrowd": 1}]}))
    b.write_text(json.dumps({"images": [], "annotations": [
        {"image_id": 1, "category_id": 7, "bbox": [1, 2, 3, 4]},
        {"image_id": 5, "category_id": 7, "bbox": [1, 1, 1, 1]}]}))
    recs, annotated = image_records([(a, tmp_path / "imgs"), (b, tmp_path)], {1, 5})
    assert recs[1].path == tmp_path / "imgs" / "1.jpg" and recs[1].category_ids == (2, 7)
    np.testing.assert_array_equal(recs[1].boxes, [[0, 0, 5, 5], [1, 2, 4, 6]])
    assert recs[5].path is None and annotated == {2, 3, 7}


def test_best_gt_by_hand():
    from ovdistill.query import ImageRecord, best_gt

    rec = ImageRecord(1, None, np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32), (4, 9))
    cat, iou = best_gt((20, 20, 40, 30), rec)
    assert cat == 9 and iou == pytest.approx(0.5)
    assert best_gt((0, 0, 1, 1), None) == (None, 0.0)


def test_query_errors_are_one_line(tmp_path, capsys):
    ctx = write_synthetic_cache(tmp_path, n_images=4, m=5, dim=DIM)
    args = ["query", QUERY, "--cache", str(ctx.cache.parent), "--dataset", "synth",
            "--out", str(tmp_path / "x.png")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "index stage has not finished" in err
    run_stage(index_stage, ctx, index_stage.Config(), distributor="local", progress=False,
              log=lambda s: None)
    (ctx.cache / "teacher" / "_MANIFEST.json").unlink()
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stage 'teacher' has not finished" in err
    assert not (tmp_path / "x.png").exists()
