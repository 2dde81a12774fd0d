"""The pack stage: WebDataset shards equal the regions parquet rows (boxes, RPN scores,
embeddings), shard planning, re-pack."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from ovdistill.bench.storage_bench import write_synthetic_cache
from ovdistill.pipeline.runner import StageMismatch, make_config, run_stage
from ovdistill.stages import pack
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_IMAGES, M, DIM = 12, 20, 32


def run_pack(ctx, rebuild=False, **overrides):
    return run_stage(pack, ctx, make_config(pack, overrides), distributor="local",
                     rebuild=rebuild, progress=False, log=lambda s: None)


def read_shards(ctx) -> dict[str, dict]:
    """key -> decoded sample, read with webdataset's own decoder while pickle is forbidden."""
    shards = sorted(str(p) for p in (ctx.cache / "wds").glob("train-*.tar"))
    real_loads = pickle.loads

    def no_pickle(*a, **k):
        raise AssertionError("a shard member needed pickle to decode")

    pickle.loads = no_pickle
    try:
        return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False).decode()}
    finally:
        pickle.loads = real_loads


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    ctx = write_synthetic_cache(tmp_path_factory.mktemp("pack"), n_images=N_IMAGES, m=M,
                                dim=DIM, png_every=4)
    manifest = run_pack(ctx, max_samples=4)
    return ctx, manifest


def test_round_trip_equals_parquet(packed):
    ctx, manifest = packed
    samples = read_shards(ctx)
    table = pq.read_table(ctx.cache / "regions").sort_by([("image_id", "ascending"),
                                                         ("rank", "ascending")])
    ids = table["image_id"].to_numpy()
    assert sorted(samples) == sorted(f"img{i}" for i in np.unique(ids))
    assert len(samples) == N_IMAGES - 1  # the last image has no regions rows
    train = json.loads((ctx.dataset.split("train").annotations).read_text())
    records = {im["id"]: im for im in train["images"]}
    for key, s in samples.items():
        i = int(key[3:])
        rows = table.filter(table["image_id"].to_numpy() == i)
        boxes = np.array(rows["box"].to_pylist(), dtype=np.float32)
        emb = np.array(rows["embedding"].to_pylist(), dtype=np.float16)
        assert s["boxes.npy"].dtype == np.float32 and s["boxes.npy"].shape == (M - i % 3, 4)
        assert s["scores.npy"].dtype == np.float32 and s["scores.npy"].shape == (M - i % 3,)
        np.testing.assert_array_equal(s["scores.npy"], np.array(rows["score"].to_pylist(),
                                                                dtype=np.float32))
        assert s["emb.npy"].dtype == np.float16 and s["emb.npy"].shape == (M - i % 3, DIM)
        np.testing.assert_array_equal(s["boxes.npy"], boxes)
        assert s["emb.npy"].tobytes() == emb.tobytes()
        meta = s["json"]
        rec = records[i]
        assert (meta["image_id"], meta["file_name"], meta["width"], meta["height"]) == (
            i, rec["file_name"], rec["width"], rec["height"])
        want = [(a["bbox"], a["category_id"]) for a in train["annotations"]
                if a["image_id"] == i and a["category_id"] in (1, 2) and not a["iscrowd"]]
        assert meta["gt_category_ids"] == [c for _, c in want]
        assert meta["gt_boxes"] == [[x, y, x + w, y + h] for (x, y, w, h), _ in want]
        src = ctx.dataset.split("train").images / rec["file_name"]
        if rec["file_name"].endswith(".jpg"):
            assert s["jpg"] == src.read_bytes()  # a plain JPEG is copied as it is
        else:
            im = Image.open(io.BytesIO(s["jpg"]))
            assert im.format == "JPEG" and im.size == (rec["width"], rec["height"])
    # image 1 has two base boxes; its novel and crowd boxes are left out
    assert len(samples["img1"]["json"]["gt_boxes"]) == 2
    assert (manifest["samples"], manifest["absent"], manifest["rejected"]) == (11, 1, 0)
    sizes = json.loads((ctx.cache / "wds" / "sizes.json").read_text())
    assert sizes == {"train-000000.tar": 4, "train-000001.tar": 4, "train-000002.tar": 3}


def test_plan_shards_hand_case():
    ids = [1, 2, 3, 4, 5, 6]
    assert pack.plan_shards(ids, [100] * 6, 2, 10**9) == [[1, 2], [3, 4], [5, 6]]
    # 4096-byte samples: two fit one 10240-byte tar record (8192 + 1024 end blocks), three not
    assert pack.tar_file_bytes(2 * 4096) == 10240 and pack.tar_file_bytes(3 * 4096) == 20480
    assert pack.plan_shards(ids, [4096] * 6, 100, 10240) == [[1, 2], [3, 4], [5, 6]]
    assert pack.plan_shards(ids, [4096] * 6, 100, 20480) == [[1, 2, 3, 4], [5, 6]]
    # a sample larger than max_bytes alone gets its own shard
    assert pack.plan_shards(ids, [4096, 50000, 4096, 4096, 4096, 4096], 3, 10240) == [
        [1], [2], [3, 4], [5, 6]]
    with pytest.raises(Exception, match="max_samples"):
        pack.plan_shards(ids, [1] * 6, 0, 10)


def test_planned_bytes_are_exact_and_respected(tmp_path):
    ctx = write_synthetic_cache(tmp_path, n_images=N_IMAGES, m=M, dim=DIM, png_every=4)
    cfg = make_config(pack, {"max_samples": 5, "max_bytes": 40000})
    sizes = pack.sample_sizes(ctx, cfg)
    manifest = run_pack(ctx, max_samples=5, max_bytes=40000)
    stats = [json.loads(p.read_text()) for p in sorted((ctx.cache / "wds").glob("part-*.stats.json"))]
    shard_ids = [[int(k[3:]) for k in sorted(
        (s["__key__"] for s in wds.WebDataset(str(ctx.cache / "wds" / st["shard"]),
                                               shardshuffle=False)), key=lambda k: int(k[3:]))]
                 for st in stats]
    assert manifest["shards"] == len(stats) > 2
    for k, (st, ids) in enumerate(zip(stats, shard_ids)):
        path = ctx.cache / "wds" / st["shard"]
        assert path.stat().st_size == st["bytes"] == st["expected_bytes"]
        assert st["bytes"] == pack.tar_file_bytes(sum(sizes[i] for i in ids))
        assert st["bytes"] <= 40000 and len(ids) <= 5
        if k + 1 < len(stats) and len(ids) < 5:  # greedy: the next sample did not fit
            nxt = shard_ids[k + 1][0]
            assert pack.tar_file_bytes(sum(sizes[i] for i in ids) + sizes[nxt]) > 40000


def test_repack_other_shard_size_same_samples(tmp_path):
    ctx = write_synthetic_cache(tmp_path, n_images=N_IMAGES, m=M, dim=DIM, png_every=4)
    run_pack(ctx, max_samples=4)
    before = {k: (s["jpg"], s["boxes.npy"].tobytes(), s["scores.npy"].tobytes(),
                  s["emb.npy"].tobytes(), s["json"]) for k, s in read_shards(ctx).items()}
    regions_sha = {p.name: sha(p) for p in (ctx.cache / "regions").glob("*.parquet")}
    with pytest.raises(StageMismatch, match="max_samples"):
        run_pack(ctx, max_samples=5)
    manifest = run_pack(ctx, max_samples=5, rebuild=True)
    after = {k: (s["jpg"], s["boxes.npy"].tobytes(), s["scores.npy"].tobytes(),
                 s["emb.npy"].tobytes(), s["json"]) for k, s in read_shards(ctx).items()}
    assert manifest["shards"] == 3 and sorted(
        p.name for p in (ctx.cache / "wds").glob("[st]*.*")) == [
        "sizes.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert json.loads((ctx.cache / "wds" / "sizes.json").read_text())["train-000002.tar"] == 1
    assert after == before
    assert {p.name: sha(p) for p in (ctx.cache / "regions").glob("*.parquet")} == regions_sha


def test_resumed_part_writes_identical_shard(tmp_path):
    ctx = write_synthetic_cache(tmp_path, n_images=N_IMAGES, m=M, dim=DIM)
    run_pack(ctx, max_samples=4)
    shard = ctx.cache / "wds" / "train-000001.tar"
    digest = sha(shard)
    shard.unlink()
    (ctx.cache / "wds" / "part-00001.stats.json").unlink()
    (ctx.cache / "wds" / "_MANIFEST.json").unlink()
    run_pack(ctx, max_samples=4)
    assert sha(shard) == digest


def test_bad_image_is_rejected_and_the_part_goes_on(tmp_path):
    ctx = write_synthetic_cache(tmp_path, n_images=N_IMAGES, m=M, dim=DIM)
    bad = ctx.dataset.split("train").images / "000002.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    manifest = run_pack(ctx, max_samples=4)
    stats = json.loads((ctx.cache / "wds" / "part-00000.stats.json").read_text())
    assert stats["rows"] == 3 and len(stats["rejects"]) == 1
    reject = stats["rejects"][0]
    assert reject["item"] == 2 and reject["file"] == str(bad) and "000002.jpg" in reject["reason"]
    assert (manifest["samples"], manifest["rejected"]) == (10, 1)
    assert "img2" not in read_shards(ctx)


def test_exif_rotated_jpeg_is_reencoded_upright(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255  # a white band on the left
    src = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(src, exif=exif.tobytes(), quality=95)
    plain = tmp_path / "plain.jpg"
    Image.fromarray(pixels).save(plain, quality=95)
    assert pack.is_plain_jpeg(plain) and not pack.is_plain_jpeg(src)
    data, size = pack.jpeg_payload(src, 95)
    assert size == (20, 40) and data != src.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (20, 40) and im.getexif().get(0x0112, 1) == 1
        top = np.asarray(im.convert("L"))[:10].mean()
    assert top > 200  # the band is on top once upright
    assert pack.planned_jpeg_size(src, 95) == len(data)
    assert pack.planned_jpeg_size(plain, 95) == plain.stat().st_size


def test_storage_bench_runs_on_a_synthetic_cache(capsys):
    from ovdistill.bench.storage_bench import main

    assert main(["--images", "4", "--m", "10", "--dim", "16"]) == 0
    rows = {ln[:46].strip(): ln[46:].split() for ln in capsys.readouterr().out.splitlines()[2:]}
    pth = float(rows["per-image .pth (f32 boxes + f32 emb)"][1])
    assert pth > 10 * (16 + 4) * 4  # the float32 payload plus torch's zip container
    emb = float(rows[".boxes.npy + .emb.npy (f32 boxes, f16 emb)"][1])
    assert emb == 2 * 128 + 10 * 4 * 4 + 10 * 16 * 2  # two npy headers + payloads
    assert rows["regions/*.parquet (boxes, scores, f16 emb)"][0] == "4"


def test_lvis_records_with_coco_url_only(tmp_path):
    ctx = write_synthetic_cache(tmp_path, n_images=6, m=M, dim=DIM)
    split = ctx.dataset.split("train")
    doc = json.loads(split.annotations.read_text())
    (split.images / "train2017").mkdir()
    for im in doc["images"][:2]:  # as LVIS v1 lists them: no file_name, a coco_url
        os.rename(split.images / im["file_name"], split.images / "train2017" / im["file_name"])
        im["coco_url"] = f"http://images.cocodataset.org/train2017/{im.pop('file_name')}"
    doc["images"][2].pop("file_name")  # neither: rejected, one line naming the record
    split.annotations.write_text(json.dumps(doc))
    manifest = run_pack(ctx, max_samples=10)
    samples = read_shards(ctx)
    assert samples["img1"]["json"]["file_name"] == "train2017/000001.jpg"
    assert samples["img1"]["jpg"] == (split.images / "train2017" / "000001.jpg").read_bytes()
    assert "img3" not in samples and manifest["rejected"] == 1
    reject = json.loads((ctx.cache / "wds" / "part-00000.stats.json").read_text())["rejects"][0]
    assert reject["item"] == 3 and "neither file_name nor coco_url" in reject["reason"]
