"""Stages rpn and proposals on a tiny dataset made here: training on base boxes only, the
checkpoint path, the proposals parquet contract, bad images as rejects, the recall report,
and resume after a killed run."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from ovdistill.pipeline.boxes import (
    AnnotationError,
    keep_categories,
    read_annotations,
    recall_at,
    to_original,
)
from ovdistill.pipeline.cache import sha256_file
from ovdistill.pipeline.manifests import load_manifest
from ovdistill.pipeline.runner import StageContext, StageError, make_config, run_stage
from ovdistill.stages import proposals, rpn
from PIL import Image
from torchvision.models.detection.transform import resize_boxes

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
TOP_M = 20
STAGES_BLOCK = {
    "rpn": {"min_size": 64, "max_size": 96, "steps": 5, "batch_size": 2, "warmup_steps": 1,
            "log_every": 1, "anchor_sizes": [8, 16, 32, 64]},
    "proposals": {"top_m": TOP_M, "images_per_part": 3, "batch_size": 2, "max_pixels": 40_000},
}


def scene(rng, w: int, h: int, n: int) -> tuple[Image.Image, list[list[float]]]:
    """Noise with `n` solid rectangles; returns the image and COCO xywh boxes."""
    arr = rng.integers(60, 120, (h, w, 3)).astype(np.uint8)
    boxes = []
    for _ in range(n):
        bw, bh = int(rng.integers(10, w // 2)), int(rng.integers(10, h // 2))
        x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        arr[y:y + bh, x:x + bw] = rng.integers(150, 255, 3)
        boxes.append([float(x), float(y), float(bw), float(bh)])
    return Image.fromarray(arr), boxes


def bad_images(d: Path) -> dict[str, tuple[int, int] | None]:
    """Awkward files in folder `d`: name -> decoded (w, h), or None when it must be rejected."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (50, 60), np.uint8), "L").save(d / "gray.png")
    Image.fromarray(rng.integers(0, 255, (50, 60, 4), np.uint8), "RGBA").save(d / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (50, 60), np.uint16)).save(d / "deep.png")
    Image.new("CMYK", (60, 50), (0, 200, 100, 0)).save(d / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    scene(rng, 90, 40, 1)[0].save(d / "rotated.jpg", exif=exif.tobytes())
    Image.new("RGB", (1, 1), (9, 9, 9)).save(d / "dot.png")
    Image.new("RGB", (250, 200)).save(d / "huge.png")  # over max_pixels = 40000
    (d / "garbage.jpg").write_bytes(rng.bytes(3000))
    full = d / "full.jpg"
    scene(rng, 80, 80, 2)[0].save(full)
    (d / "cut.jpg").write_bytes(full.read_bytes()[:400])
    full.unlink()
    return {"gray.png": (60, 50), "rgba.png": (60, 50), "deep.png": (60, 50),
            "cmyk.jpg": (60, 50), "rotated.jpg": (40, 90), "dot.png": (1, 1),
            "huge.png": None, "garbage.jpg": None, "cut.jpg": None, "missing.jpg": None}


def make_dataset(root: Path) -> dict:
    """train: 10 scenes (one also holds a NOVEL box, which the RPN must not see);
    val: 9 scenes with base and novel boxes + the awkward files of `bad_images`."""
    rng = np.random.default_rng(0)
    info, next_id, ann_id = {}, 100, 0
    for split, n in (("train", 10), ("val", 9)):
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            w, h = int(rng.integers(70, 121)), int(rng.integers(70, 121))
            img, boxes = scene(rng, w, h, 2)
            name = f"{split}{i}.jpg"
            img.save(root / split / name, quality=95)
            images.append({"id": next_id, "file_name": name, "width": w, "height": h})
            for k, b in enumerate(boxes):
                novel = (split == "val" and k == 1) or (split == "train" and i == 0 and k == 1)
                ann_id += 1
                anns.append({"id": ann_id, "image_id": next_id, "bbox": b, "iscrowd": 0,
                             "category_id": 3 if novel else 1 + k % 2, "area": b[2] * b[3]})
            next_id += 1
        if split == "val":
            for name, size in bad_images(root / "val").items():
                w, h = size or (250, 200)
                images.append({"id": next_id, "file_name": name, "width": w, "height": h})
                info[name] = (next_id, size)
                next_id += 1
        (root / f"{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return info


def write_manifest(path: Path, root: Path, stages: dict) -> Path:
    doc = {"name": "tiny", "format": "coco", "root": str(root),
           "splits": {"train": {"images": "train", "annotations": "train.json"},
                      "val": {"images": "val", "annotations": "val.json"}},
           "vocabulary": {"base": ["a", "b"], "novel": ["c"]}, "stages": stages}
    path.write_text(yaml.safe_dump(doc))
    return path


def run(stage, ctx, **overrides):
    cfg = make_config(stage, {**ctx.dataset.stages.get(stage.NAME, {}), **overrides})
    return run_stage(stage, ctx, cfg, distributor="local", progress=False, log=lambda s: None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads can run 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(one_thread, tmp_path_factory):
    """Dataset, manifest, and a cache where rpn (5 training steps: each of the 10 train
    images once) and proposals ran."""
    base = tmp_path_factory.mktemp("tiny")
    info = make_dataset(base / "data")
    manifest = write_manifest(base / "tiny.yaml", base / "data", STAGES_BLOCK)
    ctx = StageContext(load_manifest(manifest), base / "cache" / "tiny", device="cpu")
    rpn_manifest = run(rpn, ctx)
    prop_manifest = run(proposals, ctx)
    return {"base": base, "info": info, "manifest": manifest, "ctx": ctx,
            "rpn": rpn_manifest, "proposals": prop_manifest}


def part_tables(stage_dir: Path):
    return [pq.read_table(p) for p in sorted(stage_dir.glob("part-*.parquet"))]


# ----------------------------------------------------------------------------- rpn


def test_rpn_trains_on_base_boxes_only(tiny):
    ctx = tiny["ctx"]
    records, _ = rpn.base_train_records(ctx)
    raw = read_annotations(ctx.dataset.split("train").annotations)
    assert 3 in raw[100].category_ids.tolist()  # the novel box is in train.json ...
    assert all(3 not in r.category_ids.tolist() for r in records)  # ... but not trained on
    assert sum(len(r.boxes) for r in records) == sum(len(r.boxes) for r in raw.values()) - 1

    m = tiny["rpn"]
    assert m["checkpoint"] == "rpn.pt"  # recorded by name: a moved cache still finds it
    path = rpn.recorded_checkpoint(ctx.stage_dir("rpn"), m)
    assert path == ctx.stage_dir("rpn") / "rpn.pt" and m["trained"] is True
    assert m["checkpoint_sha256"] == sha256_file(path)
    assert [h["step"] for h in m["train"]["history"]] == [1, 2, 3, 4, 5]
    assert m["arch"]["anchor_sizes"] == [8, 16, 32, 64]
    # reloads into the same weights
    blob = torch.load(path, weights_only=True)
    model = rpn.load_rpn(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, blob["model"][k]), k


def test_rpn_stage_reports_the_boxes_it_trained_on(tiny):
    """The manifest's "fed" counts, per category id, the GT boxes the training loop handed the
    model: the base boxes of train.json counted here, and no novel one."""
    ctx = tiny["ctx"]
    doc = json.loads(ctx.dataset.split("train").annotations.read_text())
    assert [a["image_id"] for a in doc["annotations"] if a["category_id"] == 3] == [100]
    want: dict[str, int] = {}
    for a in doc["annotations"]:
        if a["category_id"] in (1, 2) and not a["iscrowd"]:
            want[str(a["category_id"])] = want.get(str(a["category_id"]), 0) + 1
    assert want == {"1": 10, "2": 9}
    assert tiny["rpn"]["fed"] == {"images": 10, "gt_boxes": want}
    stats = json.loads((ctx.stage_dir("rpn") / "part-00000.stats.json").read_text())
    assert stats["fed"] == tiny["rpn"]["fed"]
    # the checkpoint's training summary is as before: the count is not in rpn.pt
    blob = torch.load(ctx.stage_dir("rpn") / "rpn.pt", weights_only=True)
    assert sorted(blob["train"]) == ["history", "images", "seconds", "steps"]


def trained_rpn(tiny) -> str:
    return str(rpn.recorded_checkpoint(tiny["ctx"].stage_dir("rpn"), tiny["rpn"]))


def test_rpn_given_checkpoint_skips_training(tiny, tmp_path):
    ctx = StageContext(tiny["ctx"].dataset, tmp_path / "tiny", device="cpu")
    ckpt = trained_rpn(tiny)
    m = run(rpn, ctx, checkpoint=ckpt)
    assert m["trained"] is False and "train" not in m
    assert m["checkpoint"] == ckpt and m["checkpoint_sha256"] == sha256_file(Path(ckpt))
    assert not (ctx.stage_dir("rpn") / "rpn.pt").exists()


def test_rpn_bad_checkpoint_is_a_clear_error(tiny, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(StageError, match=r"RPN checkpoint .*bad\.pt cannot be read"):
        rpn.load_rpn(bad)
    wrong = tmp_path / "wrong.pt"
    torch.save({"backbone.body.conv1.weight": torch.zeros(3)}, wrong)
    with pytest.raises(StageError, match=r"wrong\.pt does not fit architecture"):
        rpn.load_rpn(wrong)
    with pytest.raises(StageError, match=r"rpn.checkpoint .*nope\.pt not found"):
        run(rpn, StageContext(tiny["ctx"].dataset, tmp_path / "x", device="cpu"),
            checkpoint=str(tmp_path / "nope.pt"))


def test_torchvision_faster_rcnn_state_dict_loads(tmp_path):
    arch = rpn.RPNArch(min_size=64, max_size=96)
    torch.manual_seed(0)
    src = rpn.ProposalNet(arch)
    state = {f"{k}": v for k, v in src.state_dict().items()}
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(2, 4)  # ignored
    torch.save(state, tmp_path / "frcnn.pt")
    model = rpn.load_rpn(tmp_path / "frcnn.pt", fallback=arch)
    assert torch.equal(model.rpn.head.cls_logits.weight, src.rpn.head.cls_logits.weight)


# ----------------------------------------------------------------------------- proposals


def test_proposals_parquet_contract(tiny):
    ctx, info = tiny["ctx"], tiny["info"]
    tables = part_tables(ctx.stage_dir("proposals"))
    n_images = 10 + 9 + len(info)
    assert len(tables) == -(-n_images // 3) == tiny["proposals"]["n_parts"]
    for t in tables:
        assert t.schema == proposals.SCHEMA
        assert t.schema.names == ["image_id", "rank", "box", "score"]
        box = t.schema.field("box").type
        assert [t.schema.field(c).type for c in ("image_id", "rank", "score")] == [
            pa.int64(), pa.int32(), pa.float32()]
        assert pa.types.is_fixed_size_list(box) and box.list_size == 4
        assert box.value_type == pa.float32()
    t = pa.concat_tables(tables)
    assert t.num_rows == tiny["proposals"]["rows"] > 0
    ids = t["image_id"].to_numpy()
    assert (np.diff(ids) >= 0).all()  # parts are chunks of sorted ids, rows sorted within
    sizes = {}
    for split in ("train", "val"):
        for iid, rec in read_annotations(ctx.dataset.split(split).annotations).items():
            sizes[iid] = (rec.width, rec.height)
    boxes = np.asarray(t["box"].combine_chunks().flatten()).reshape(-1, 4)
    ranks, scores = t["rank"].to_numpy(), t["score"].to_numpy()
    for iid in np.unique(ids):
        sel = ids == iid
        k = int(sel.sum())
        assert 1 <= k <= TOP_M
        assert ranks[sel].tolist() == list(range(k))
        assert (np.diff(scores[sel]) <= 0).all() and ((scores[sel] > 0) & (scores[sel] < 1)).all()
        b = boxes[sel]
        w, h = sizes[int(iid)]
        assert (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all()
        assert (b >= 0).all() and (b[:, [0, 2]] <= w).all() and (b[:, [1, 3]] <= h).all()


def test_bad_images_decode_or_become_rejects(tiny):
    ctx, info = tiny["ctx"], tiny["info"]
    stage_dir = ctx.stage_dir("proposals")
    stats = [json.loads(p.read_text()) for p in sorted(stage_dir.glob("part-*.stats.json"))]
    rejects = {r["item"]: r for s in stats for r in s["rejects"]}
    t = pa.concat_tables(part_tables(stage_dir))
    ids = t["image_id"].to_numpy()
    boxes = np.asarray(t["box"].combine_chunks().flatten()).reshape(-1, 4)
    expected_reason = {"huge.png": "exceeds the cap of 40000", "garbage.jpg": "not a recognised",
                       "cut.jpg": "corrupt or truncated", "missing.jpg": "file not found"}
    for name, (iid, size) in info.items():
        if size is None:
            assert iid in rejects, name
            r = rejects[iid]
            assert r["file"].endswith(name) and name in r["reason"]
            assert expected_reason[name] in r["reason"]
            assert iid not in ids
        else:
            assert iid not in rejects, name
            if name != "dot.png":
                assert (ids == iid).sum() > 0, name
            b = boxes[ids == iid]
            assert (b[:, [0, 2]] <= size[0]).all() and (b[:, [1, 3]] <= size[1]).all(), name
    # EXIF orientation 6: stored 90x40, decoded 40x90, so boxes reach below y = 40
    b = boxes[ids == info["rotated.jpg"][0]]
    assert b[:, 3].max() > 40 and b[:, 2].max() <= 40
    assert tiny["proposals"]["rejects"] == 4 == len(rejects)
    # the parts holding rejects still wrote every other image of theirs
    for s in stats:
        assert s["images"] + s["n_rejects"] == s["items"]


def test_recall_report_in_manifest(tiny):
    m = tiny["proposals"]
    assert set(m["recall"]) == {"base", "novel"}
    assert list(m["recall"]["base"]) == ["10", str(TOP_M)]
    assert m["recall_gt_boxes"] == {"base": 9, "novel": 9}
    for row in m["recall"].values():
        assert 0.0 <= row["10"] <= row[str(TOP_M)] <= 1.0
    # recomputed here from the parquet files
    props = proposals.read_proposals(tiny["ctx"].stage_dir("proposals"))
    val = read_annotations(tiny["ctx"].dataset.split("val").annotations)
    ids = sorted(val)
    gt = [val[i].boxes[val[i].category_ids == 3] for i in ids]
    r = recall_at(gt, [props.get(i, torch.zeros(0, 4)) for i in ids], [TOP_M])
    assert m["recall"]["novel"][str(TOP_M)] == round(r[TOP_M], 4)


def test_recall_at_hand_computed():
    gt = [torch.tensor([[0., 0, 10, 10], [20, 20, 30, 30]]),
          torch.tensor([[0., 0, 10, 20]]),
          torch.zeros(0, 4)]
    props = [torch.tensor([[0., 0, 10, 10],        # IoU 1 with GT 0
                           [100., 100, 110, 110],  # nothing
                           [21., 21, 30, 30]]),    # IoU 81/100 with GT 1
             torch.tensor([[0., 0, 10, 9],         # IoU 90/200 = 0.45: a miss
                           [0., 0, 10, 10],        # IoU 100/200 = 0.5: a hit (>=)
                           [50., 50, 60, 60]]),
             torch.tensor([[0., 0, 5, 5]])]
    assert recall_at(gt, props, [1, 2, 3]) == {1: 1 / 3, 2: 2 / 3, 3: 3 / 3}
    assert recall_at(gt, props, [3], iou_thresh=0.82) == {3: 1 / 3}
    assert recall_at([torch.zeros(0, 4)], [torch.zeros(0, 4)], [10]) == {10: None}
    # an image with GT but no proposals counts as misses, and the images after it still count
    # (a mutation run found `break` for `continue` and `and` for `or` unnoticed)
    assert recall_at([gt[1], gt[0]], [torch.zeros(0, 4), props[0]], [3]) == {3: 2 / 3}
    with pytest.raises(ValueError, match=r"^recall_at: 2 GT lists but 1 proposal lists$"):
        recall_at(gt[:2], props[:1], [1])


def test_read_annotations_keeps_ids_and_annotations_without_iscrowd(tmp_path):
    """Records keep their image id, and an annotation with no `iscrowd` key is not a crowd."""
    doc = {"images": [{"id": 7, "file_name": "a.jpg", "width": 50, "height": 40}],
           "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "star"}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 2, "bbox": [1, 2, 10, 20]},
                           {"id": 2, "image_id": 7, "category_id": 1, "bbox": [5, 5, 4, 4],
                            "iscrowd": 1}]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(doc))
    rec = read_annotations(path)[7]
    assert (rec.image_id, rec.file_name, rec.width, rec.height) == (7, "a.jpg", 50, 40)
    assert rec.boxes.tolist() == [[1.0, 2.0, 11.0, 22.0]] and rec.category_ids.tolist() == [2]
    assert rec.boxes.dtype == torch.float32 and rec.category_ids.dtype == torch.int64
    kept = keep_categories(rec, {2})
    assert kept.image_id == 7 and kept.category_ids.tolist() == [2]
    assert keep_categories(rec, {1}).boxes.shape == (0, 4)
    doc["images"][0].pop("file_name")
    path.write_text(json.dumps(doc))
    with pytest.raises(AnnotationError, match=rf"^{re.escape(str(path))}: image record 7 has "):
        read_annotations(path)


def test_recall_report_hand_computed(tiny, tmp_path):
    """recall_report on a val file and proposals made by hand: base GT 2 boxes, novel 2."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
    images = [{"id": 1, "file_name": "x.jpg", "width": 100, "height": 100},
              {"id": 2, "file_name": "y.jpg", "width": 100, "height": 100}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [50, 50, 20, 20], "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 40, 40], "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [60, 60, 30, 30], "iscrowd": 0},
        {"id": 5, "image_id": 2, "category_id": 3, "bbox": [0, 0, 99, 99], "iscrowd": 1},
    ]
    doc = {"images": images, "annotations": anns, "categories": CATEGORIES}
    for split in ("train", "val"):
        (root / f"{split}.json").write_text(json.dumps(doc))
    ctx = StageContext(load_manifest(write_manifest(tmp_path / "m.yaml", root, {})),
                       tmp_path / "cache", device="cpu")
    far = [[200.0, 200, 210, 210]]
    props = {1: torch.tensor(far * 10 + [[50.0, 50, 70, 70]] + [[0.0, 0, 10, 10]]),
             2: torch.tensor([[0.0, 0, 40, 40]] + far * 12 + [[60.0, 60, 90, 90]])}
    cfg = proposals.Config(top_m=12)
    rep = proposals.recall_report(ctx, cfg, props)
    # base: GT(1) found at rank 11 (inside 12, not 10); GT(3) at rank 0
    # novel: GT(2) at rank 10 (inside 12); GT(4) at rank 13 (outside 12); the crowd box ignored
    assert rep["recall"] == {"base": {"10": 0.5, "12": 1.0}, "novel": {"10": 0.0, "12": 0.5}}
    assert rep["recall_gt_boxes"] == {"base": 2, "novel": 2}


def test_to_original_matches_torchvision_resize_boxes():
    boxes = torch.tensor([[1.0, 2.0, 50.0, 60.0], [0.0, 0.0, 64.0, 96.0]])
    ours = to_original(boxes, (96, 64), (300, 200))
    ref = resize_boxes(boxes, (96, 64), (300, 200))
    assert torch.allclose(ours, ref)
    assert torch.equal(to_original(torch.tensor([[-5.0, -5, 70, 100]]), (96, 64), (96, 64)),
                       torch.tensor([[0.0, 0, 64, 96]]))


# ----------------------------------------------------------------------------- resume


def _cli(manifest: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "ovdistill", "run", "--manifest", str(manifest), "--cache",
            str(cache), "--stages", "rpn,proposals", "--distributor", "local", "--no-progress",
            "--device", "cpu"]


@pytest.mark.slow
def test_proposals_resume_after_kill(tiny, tmp_path):
    """Kill the CLI once some proposal parts are done; the same command then finishes the
    rest without recomputing any finished part, giving exactly the rows of the uninterrupted
    run of the `tiny` fixture (same config, same RPN file, one thread in both)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    # the trained RPN is reused: both caches get it as a given checkpoint
    stages = {**STAGES_BLOCK, "rpn": {**STAGES_BLOCK["rpn"], "checkpoint": trained_rpn(tiny)}}
    manifest = write_manifest(tmp_path / "m.yaml", tiny["base"] / "data", stages)

    cache = tmp_path / "killed"
    stage_dir = cache / "tiny" / "proposals"
    proc = subprocess.Popen(_cli(manifest, cache), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(stage_dir.glob("part-*.stats.json")):
        assert proc.poll() is None, "the run ended before any part was done"
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in stage_dir.glob("part-*.stats.json")}
    n_parts = tiny["proposals"]["n_parts"]
    assert 0 < len(done) < n_parts and not (stage_dir / "_MANIFEST.json").exists()

    res = subprocess.run(_cli(manifest, cache), cwd=REPO, env=env, check=True,
                         capture_output=True, text=True, timeout=300)
    assert f"resuming: {len(done)}/{n_parts} parts already done" in res.stdout
    for name, mtime in done.items():
        assert (stage_dir / name).stat().st_mtime_ns == mtime, f"{name} was recomputed"
    got = pa.concat_tables(part_tables(stage_dir))
    ref = pa.concat_tables(part_tables(tiny["ctx"].stage_dir("proposals")))
    assert got.equals(ref)
    assert not list(stage_dir.glob(".*.tmp-*"))


def test_proposals_refuse_a_changed_rpn_checkpoint(tiny, tmp_path):
    ctx = StageContext(tiny["ctx"].dataset, tmp_path / "tiny", device="cpu")
    ckpt = tmp_path / "rpn.pt"
    ckpt.write_bytes(Path(trained_rpn(tiny)).read_bytes())
    run(rpn, ctx, checkpoint=str(ckpt))
    cfg = make_config(proposals, ctx.dataset.stages["proposals"])
    assert proposals.inputs(ctx, cfg)["rpn_checkpoint_sha256"] == sha256_file(ckpt)
    with ckpt.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(StageError, match=r"rpn\.pt is missing or changed since stage 'rpn'"):
        proposals.Worker(ctx, cfg)
