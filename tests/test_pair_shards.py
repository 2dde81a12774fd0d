"""Stages pair_proposals and pair_pack on tiny pair sets made here: the pair shards equal the
pairs / phrases / pair_proposals Parquet rows bit for bit, their planned sizes are the file
sizes, pairs with no phrase or no proposal are skipped and counted, a corrupt image is a
reject; the frozen RPN over pair images read from a .tar gives the proposals the RPN gives
when run directly on the decoded images."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
import yaml
from ovdistill.pipeline import layout
from ovdistill.pipeline.cache import atomic_write_json, sha256_file
from ovdistill.pipeline.images import to_float_tensor
from ovdistill.pipeline.layout import DatasetCache
from ovdistill.pipeline.manifests import load_manifest
from ovdistill.pipeline.pair_sources import PAIRS_SCHEMA
from ovdistill.pipeline.propose import SCHEMA as PROPOSALS_SCHEMA
from ovdistill.pipeline.rpn_net import ProposalNet, RPNArch, load_rpn, save_checkpoint
from ovdistill.pipeline.runner import StageContext, make_config, run_stage
from ovdistill.pipeline.shards import tar_file_bytes
from ovdistill.stages import pair_pack, pair_proposals
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DIM = 8
TEACHER = {"name": "fake-teacher", "dim": DIM}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads can run 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_ctx(tmp: Path, pairs: dict | None) -> StageContext:
    """A manifest with an empty detection dataset and the given `pairs:` block."""
    data = tmp / "data"
    for split in ("train", "val"):
        (data / split).mkdir(parents=True, exist_ok=True)
        (data / f"{split}.json").write_text(json.dumps(
            {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))
    doc = {"name": "tiny", "format": "coco", "root": str(data),
           "splits": {"train": {"images": "train", "annotations": "train.json"},
                      "val": {"images": "val", "annotations": "val.json"}},
           "vocabulary": {"base": ["cat"], "novel": ["dog"]}}
    if pairs is not None:
        doc["pairs"] = pairs
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return StageContext(load_manifest(path), tmp / "cache" / "tiny", device="cpu")


def fake_finished(ctx: StageContext, stage: str, **extra) -> None:
    """A finished upstream stage: only its _MANIFEST.json (as tests/test_pack.py's fixture)."""
    atomic_write_json(DatasetCache(ctx.cache).manifest_path(stage),
                      {"stage": stage, "fingerprint": f"{stage}-fp", **extra})


def write_pairs(ctx: StageContext, rows: list[dict], per_part: int) -> None:
    d = ctx.stage_dir(layout.PAIRS)
    d.mkdir(parents=True, exist_ok=True)
    for k, s in enumerate(range(0, len(rows), per_part)):
        pq.write_table(pa.Table.from_pylist(rows[s:s + per_part], schema=PAIRS_SCHEMA),
                       layout.part_file(d, k))
    fake_finished(ctx, layout.PAIRS, pairs=len(rows))


def run(stage, ctx, rebuild=False, **overrides):
    return run_stage(stage, ctx, make_config(stage, overrides), distributor="local",
                     rebuild=rebuild, progress=False, log=lambda s: None)


def stats_of(stage_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(stage_dir.glob("part-*.stats.json"))]


# ----------------------------------------------------------------------------- pair_pack


def phrases_table(rows: list[tuple[int, list[str], np.ndarray]]) -> pa.Table:
    """phrases rows: image_id, phrases, counts, phrase_emb list<fixed_size_list<f16>[DIM]>."""
    lengths = [len(p) for _, p, _ in rows]
    flat = np.concatenate([e.reshape(-1) for _, _, e in rows]).astype(np.float16)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), DIM)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.table({
        "image_id": pa.array([i for i, _, _ in rows], pa.int64()),
        "phrases": pa.array([p for _, p, _ in rows], pa.list_(pa.string())),
        "counts": pa.array([[1] * n for n in lengths], pa.list_(pa.int32())),
        "phrase_emb": pa.ListArray.from_arrays(offsets, vectors),
    })


def proposal_rows(items: list[tuple[int, np.ndarray, np.ndarray]]) -> pa.Table:
    ids = np.concatenate([np.full(len(s), i) for i, _, s in items]).astype(np.int64)
    ranks = np.concatenate([np.arange(len(s)) for _, _, s in items]).astype(np.int32)
    boxes = np.concatenate([b for _, b, _ in items]).astype(np.float32).reshape(-1)
    scores = np.concatenate([s for _, _, s in items]).astype(np.float32)
    return pa.Table.from_arrays([
        pa.array(ids), pa.array(ranks),
        pa.FixedSizeListArray.from_arrays(pa.array(boxes), 4), pa.array(scores)],
        schema=PROPOSALS_SCHEMA)


# id -> (how the image is stored, stored (w, h), decoded (w, h), phrases, proposals K)
PACK_PAIRS = {
    1: ("jpg", (64, 48), (64, 48), ["cat", "dog"], 5),
    2: ("png", (40, 30), (40, 30), ["dog"], 3),
    3: ("gray", (50, 50), (50, 50), ["red car", "cat", "tree"], 1),
    4: ("jpg", (32, 32), (32, 32), [], 4),  # no phrase: skipped
    5: ("jpg", (32, 32), (32, 32), ["cat"], 0),  # no proposal: skipped
    6: ("garbage", (32, 32), (32, 32), ["cat"], 2),  # corrupt: rejected
    7: ("rotated", (60, 20), (20, 60), ["caf\u00e9 table"], 6),  # EXIF 6: re-encoded upright
}


def write_pair_image(path: Path, kind: str, size: tuple[int, int], rng) -> None:
    w, h = size
    if kind == "garbage":
        path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" + rng.bytes(100))
        return
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == "gray":
        Image.fromarray(pixels[..., 0], "L").save(path, format="JPEG", quality=90)
    elif kind == "png":
        Image.fromarray(pixels).save(path, format="PNG")
    elif kind == "rotated":
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(pixels).save(path, format="JPEG", exif=exif.tobytes())
    else:
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)


@pytest.fixture()
def pack_cache(tmp_path):
    """Generated-pairs layout (images in <cache>/tiny/pairs/images/) with pairs, phrases and
    pair_proposals parts written by hand, two parts each."""
    ctx = make_ctx(tmp_path, {"synthetic": {"n_images": len(PACK_PAIRS)}})
    rng = np.random.default_rng(0)
    images = ctx.stage_dir(layout.PAIRS) / layout.PAIR_IMAGES
    images.mkdir(parents=True)
    rows, phrase_rows, props = [], [], []
    for i, (kind, stored, decoded, phrases, k) in PACK_PAIRS.items():
        name = f"{i:06d}.{'png' if kind == 'png' else 'jpg'}"
        write_pair_image(images / name, kind, stored, rng)
        rows.append({"image_id": i, "caption": f"a photo {i}: " + " and ".join(phrases),
                     "file": f"{layout.PAIR_IMAGES}/{name}", "offset": -1, "size": -1,
                     "width": decoded[0], "height": decoded[1]})
        emb = rng.standard_normal((len(phrases), DIM)).astype(np.float32)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-6)
        phrase_rows.append((i, phrases, emb.astype(np.float16)))
        if k:
            xy = rng.uniform(0, 10, (k, 2))
            boxes = np.concatenate([xy, xy + rng.uniform(1, 10, (k, 2))], 1)
            props.append((i, boxes, np.sort(rng.uniform(0, 1, k))[::-1]))
    write_pairs(ctx, rows, per_part=4)
    for stage, parts in ((layout.PHRASES, [phrases_table(phrase_rows[:4]),
                                           phrases_table(phrase_rows[4:])]),
                         (layout.PAIR_PROPOSALS, [proposal_rows(props[:3]),
                                                  proposal_rows(props[3:])])):
        for k, t in enumerate(parts):
            ctx.stage_dir(stage).mkdir(parents=True, exist_ok=True)
            pq.write_table(t, layout.part_file(ctx.stage_dir(stage), k))
        fake_finished(ctx, stage, teacher=TEACHER)
    fake_finished(ctx, layout.TEACHER, teacher=TEACHER)
    return ctx


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member suffix: bytes}, in the tar's member order."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def test_pair_shards_equal_the_parquet_rows(pack_cache):
    ctx = pack_cache
    manifest = run(pair_pack, ctx, max_samples=2)
    out = ctx.stage_dir(layout.PAIRS_WDS)
    shards = ctx.files.pair_shards()
    assert [p.name for p in shards] == ["pairs-000000.tar", "pairs-000001.tar",
                                       "pairs-000002.tar"]
    # packable: 1, 2, 3, 6, 7 -> [1, 2] [3, 6] [7]; 6 is rejected in its shard
    assert json.loads((out / "sizes.json").read_text()) == {
        "pairs-000000.tar": 2, "pairs-000001.tar": 1, "pairs-000002.tar": 1}
    assert (manifest["pairs"], manifest["samples"], manifest["shards"]) == (7, 4, 3)
    assert (manifest["skipped_no_phrase"], manifest["skipped_no_proposal"]) == (1, 1)
    assert (manifest["rejected"], manifest["embed_dim"]) == (1, DIM)
    assert manifest["teacher"] == TEACHER
    assert manifest["bytes"] == sum(p.stat().st_size for p in shards)

    samples = {}
    for p in shards:
        samples.update(read_tar(p))
    assert sorted(samples) == ["pair1", "pair2", "pair3", "pair7"]
    pairs = pa.concat_tables(pq.read_table(f) for f in ctx.files.parts(layout.PAIRS)).to_pylist()
    rows = {r["image_id"]: r for r in pairs}
    phr = pa.concat_tables(pq.read_table(f) for f in ctx.files.parts(layout.PHRASES))
    prop = pa.concat_tables(pq.read_table(f) for f in ctx.files.parts(layout.PAIR_PROPOSALS))
    images = ctx.stage_dir(layout.PAIRS) / layout.PAIR_IMAGES
    for key, s in samples.items():
        i = int(key[4:])
        assert sorted(s) == sorted(layout.PAIR_MEMBERS)
        sel = prop.filter(pc.equal(prop["image_id"], i))
        assert sel["rank"].to_pylist() == list(range(PACK_PAIRS[i][4]))
        boxes, scores = npy(s["boxes.npy"]), npy(s["scores.npy"])
        assert boxes.dtype == np.float32 and boxes.shape == (PACK_PAIRS[i][4], 4)
        assert scores.dtype == np.float32 and scores.shape == (PACK_PAIRS[i][4],)
        assert boxes.tobytes() == np.array(sel["box"].to_pylist(), np.float32).tobytes()
        assert scores.tobytes() == np.array(sel["score"].to_pylist(), np.float32).tobytes()
        prow = phr.filter(pc.equal(phr["image_id"], i)).to_pylist()[0]
        emb = npy(s["phrase_emb.npy"])
        want = np.array(prow["phrase_emb"], dtype=np.float16)
        assert emb.dtype == np.float16 and emb.shape == (len(PACK_PAIRS[i][3]), DIM)
        assert emb.tobytes() == want.tobytes()  # bit-exact
        meta = json.loads(s["phrases.json"])
        r = rows[i]
        assert meta == {"image_id": i, "width": r["width"], "height": r["height"],
                        "caption": r["caption"], "phrases": PACK_PAIRS[i][3]}
        src = images / Path(r["file"]).name
        with Image.open(io.BytesIO(s["jpg"])) as im:
            assert im.format == "JPEG" and im.size == PACK_PAIRS[i][2]
        if PACK_PAIRS[i][0] in ("jpg", "gray"):
            assert s["jpg"] == src.read_bytes()  # a plain JPEG is copied as it is
        else:
            assert s["jpg"] != src.read_bytes()
    assert json.loads(samples["pair7"]["phrases.json"])["phrases"] == ["caf\u00e9 table"]

    # webdataset groups the members under one key, and nothing needs pickle
    real_loads = pickle.loads
    pickle.loads = lambda *a, **k: pytest.fail("a pair shard member needed pickle")
    try:
        got = {x["__key__"]: x for x in wds.WebDataset([str(p) for p in shards],
                                                        shardshuffle=False).decode()}
    finally:
        pickle.loads = real_loads
    assert got["pair3"]["phrases.json"]["phrases"] == ["red car", "cat", "tree"]
    assert got["pair3"]["phrase_emb.npy"].shape == (3, DIM)

    rejects = [r for st in stats_of(out) for r in st["rejects"]]
    assert len(rejects) == 1 and rejects[0]["item"] == 6
    assert rejects[0]["file"] == str(images / "000006.jpg")
    assert "000006.jpg" in rejects[0]["reason"] and "corrupt" in rejects[0]["reason"]


def test_planned_sizes_are_the_file_sizes_and_reruns_are_identical(pack_cache):
    ctx = pack_cache
    cap = 2 * 10240  # two tar records: two or three of these samples
    cfg = make_config(pair_pack, {"max_samples": 10, "max_bytes": cap})
    sizes = pair_pack.sample_sizes(ctx, cfg)
    assert sorted(sizes) == [1, 2, 3, 6, 7] and all(sizes[i] > 0 for i in (1, 2, 3, 7))
    run(pair_pack, ctx, max_samples=10, max_bytes=cap)
    out = ctx.stage_dir(layout.PAIRS_WDS)
    stats = stats_of(out)
    plan = [list(p.items) for p in pair_pack.plan(ctx, cfg)]
    assert len(stats) == len(plan) > 1 and [i for s in plan for i in s] == [1, 2, 3, 6, 7]
    for k, (st, ids) in enumerate(zip(stats, plan)):
        path = out / st["shard"]
        assert [int(key[4:]) for key in read_tar(path)] == [i for i in ids if i != 6]
        written = sum(sizes[i] for i in ids if i != 6)  # 6 is rejected: not in the tar
        assert path.stat().st_size == st["bytes"] == st["expected_bytes"]
        assert st["bytes"] == tar_file_bytes(written) <= cap
        assert tar_file_bytes(sum(sizes[i] for i in ids)) <= cap
        if k + 1 < len(plan):  # greedy: the next sample did not fit
            assert tar_file_bytes(sum(sizes[i] for i in ids) + sizes[plan[k + 1][0]]) > cap
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ctx.files.pair_shards()}
    (out / "pairs-000001.tar").unlink()
    (out / "part-00001.stats.json").unlink()
    (out / "_MANIFEST.json").unlink()
    run(pair_pack, ctx, max_samples=10, max_bytes=cap)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in ctx.files.pair_shards()} == digest


def test_no_pairs_block_packs_zero_shards(tmp_path):
    ctx = make_ctx(tmp_path, None)
    for stage in (layout.PAIRS, layout.PHRASES, layout.PAIR_PROPOSALS, layout.TEACHER):
        fake_finished(ctx, stage, teacher=TEACHER)
    m = run(pair_pack, ctx)
    assert (m["n_parts"], m["pairs"], m["samples"], m["shards"]) == (0, 0, 0, 0)
    assert json.loads((ctx.stage_dir(layout.PAIRS_WDS) / "sizes.json").read_text()) == {}
    m = run(pair_proposals, ctx)
    assert (m["n_parts"], m["rows"], m["pairs"]) == (0, 0, 0)
    assert "rpn" not in m["inputs"]  # no RPN is needed without pairs


# ----------------------------------------------------------------------------- proposals

TOP_K = 7
RPN_SETTINGS = {"top_k": TOP_K, "pre_nms_top_n": 200, "batch_size": 2, "images_per_part": 3,
                "max_pixels": 40_000}


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def rpn_cache(tmp_path_factory):
    """An img2dataset-style .tar of pair images, its pairs rows, a small random RPN recorded
    as stage rpn's checkpoint, and pair_proposals run over it."""
    tmp = tmp_path_factory.mktemp("pair_rpn")
    ctx = make_ctx(tmp, {"format": "webdataset", "path": "shards"})
    shards = tmp / "data" / "shards"
    shards.mkdir()
    rng = np.random.default_rng(1)
    # (w, h, format); the transform maps all of them to one padded 64 x 96 batch shape
    specs = {1: (90, 70, "JPEG"), 2: (80, 60, "PNG"), 3: (84, 64, "JPEG"),
             4: (70, 70, "garbage"), 5: (88, 66, "JPEG"), 6: (250, 200, "PNG"),
             7: (72, 64, "wrong size"), 8: (96, 72, "JPEG")}
    rows, encoded = [], {}
    with tarfile.open(shards / "000.tar", "w") as tf:
        for i, (w, h, fmt) in specs.items():
            arr = rng.integers(40, 200, (h, w, 3), dtype=np.uint8)
            arr[h // 4:h // 2, w // 4:w // 2] = 250  # an object
            buf = io.BytesIO()
            if fmt == "garbage":
                buf.write(rng.bytes(500))
            else:
                Image.fromarray(arr).save(buf, format="PNG" if fmt == "PNG" else "JPEG")
            encoded[i] = buf.getvalue()
            add_member(tf, f"{i:09d}.jpg", encoded[i])
            add_member(tf, f"{i:09d}.txt", f"caption {i}".encode())
    with tarfile.open(shards / "000.tar") as tf:  # where each member's data lies
        members = {m.name: m for m in tf.getmembers()}
    for i, (w, h, fmt) in specs.items():
        m = members[f"{i:09d}.jpg"]
        rows.append({"image_id": i, "caption": f"caption {i}", "file": "000.tar",
                     "offset": m.offset_data, "size": m.size,
                     "width": w + (3 if fmt == "wrong size" else 0), "height": h})
    write_pairs(ctx, rows, per_part=5)

    torch.manual_seed(0)
    model = ProposalNet(RPNArch(min_size=64, max_size=96, anchor_sizes=(8, 16, 32, 64)))
    ckpt = tmp / "rpn.pt"
    save_checkpoint(model, ckpt, train={})
    fake_finished(ctx, layout.RPN, checkpoint=str(ckpt), checkpoint_sha256=sha256_file(ckpt))
    manifest = run(pair_proposals, ctx, **RPN_SETTINGS)
    return {"ctx": ctx, "specs": specs, "encoded": encoded, "ckpt": ckpt, "rows": rows,
            "manifest": manifest}


def test_pair_proposals_contract_and_rejects(rpn_cache):
    ctx, specs, m = rpn_cache["ctx"], rpn_cache["specs"], rpn_cache["manifest"]
    d = ctx.stage_dir(layout.PAIR_PROPOSALS)
    tables = [pq.read_table(p) for p in ctx.files.parts(layout.PAIR_PROPOSALS)]
    assert len(tables) == 3 == m["n_parts"]  # 8 pairs, 3 per part
    assert all(t.schema == PROPOSALS_SCHEMA for t in tables)
    t = pa.concat_tables(tables)
    ids = t["image_id"].to_numpy()
    good = [1, 2, 3, 5, 8]
    assert sorted(set(ids.tolist())) == good
    assert (m["pairs"], m["images"], m["rows"], m["rejects"]) == (8, 5, t.num_rows, 3)
    boxes = t["box"].combine_chunks().flatten().to_numpy().reshape(-1, 4)
    for i in good:
        sel = ids == i
        k = int(sel.sum())
        assert k == TOP_K  # a random RPN keeps far more than TOP_K boxes after NMS
        assert t["rank"].to_numpy()[sel].tolist() == list(range(k))
        s = t["score"].to_numpy()[sel]
        assert (np.diff(s) <= 0).all() and ((s > 0) & (s < 1)).all()
        b = boxes[sel]
        w, h = specs[i][:2]
        assert (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all()
        assert (b >= 0).all() and (b[:, [0, 2]] <= w).all() and (b[:, [1, 3]] <= h).all()
    rejects = {r["item"]: r for st in stats_of(d) for r in st["rejects"]}
    tar = str(ctx.dataset.root / "shards" / "000.tar")
    assert sorted(rejects) == [4, 6, 7] and all(r["file"] == tar for r in rejects.values())
    offset = {r["image_id"]: r["offset"] for r in rpn_cache["rows"]}
    assert rejects[4]["reason"].startswith(f"{tar} (member at offset {offset[4]}): ")
    assert "not a recognised image format" in rejects[4]["reason"]
    assert "exceeds the cap of 40000" in rejects[6]["reason"]
    assert "decoded size 72x64 differs from the pairs row's 75x64" in rejects[7]["reason"]
    assert m["rpn_checkpoint_sha256"] == sha256_file(rpn_cache["ckpt"])


def test_pair_proposals_equal_the_rpn_run_directly(rpn_cache):
    """Reference: the tar member read with tarfile, decoded with PIL alone, one image per
    forward pass."""
    ctx = rpn_cache["ctx"]
    model = load_rpn(rpn_cache["ckpt"])
    t = pa.concat_tables(pq.read_table(p) for p in ctx.files.parts(layout.PAIR_PROPOSALS))
    ids = t["image_id"].to_numpy()
    boxes = t["box"].combine_chunks().flatten().to_numpy().reshape(-1, 4)
    scores = t["score"].to_numpy()
    with tarfile.open(ctx.dataset.root / "shards" / "000.tar") as tf:
        for i in (1, 2, 3, 5, 8):
            data = tf.extractfile(f"{i:09d}.jpg").read()
            assert data == rpn_cache["encoded"][i]
            img = to_float_tensor(Image.open(io.BytesIO(data)).convert("RGB"))
            (b, s), = model.propose([img], pre_nms_top_n=200, nms_thresh=0.7,
                                    score_thresh=0.0, min_box_size=1.0, top_m=TOP_K)
            # the stage ran images 1 and 2 in one batch: float sums may differ by a few ulps
            assert b.shape == (TOP_K, 4)
            torch.testing.assert_close(torch.from_numpy(boxes[ids == i]), b,
                                       rtol=0, atol=1e-4)
            torch.testing.assert_close(torch.from_numpy(scores[ids == i]), s,
                                       rtol=0, atol=1e-6)


def test_pair_proposals_refuse_another_top_k(rpn_cache):
    from ovdistill.pipeline.runner import StageMismatch

    with pytest.raises(StageMismatch, match="top_k"):
        run(pair_proposals, rpn_cache["ctx"], **{**RPN_SETTINGS, "top_k": 5})
    with pytest.raises(Exception, match=r"pair_proposals\.top_k must be >= 1, got 0"):
        pair_proposals.plan(rpn_cache["ctx"], make_config(pair_proposals, {"top_k": 0}))
