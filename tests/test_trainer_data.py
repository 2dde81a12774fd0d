"""The training stream: joint augmentation of image / GT boxes / cached boxes, decoding,
node and worker splitting, and refusal of a cache with another embedding dimension."""
import io
import json

import numpy as np
import pytest
import torch
from ovdistill.bench.storage_bench import write_synthetic_cache
from ovdistill.bench.wds_fixture import TINY_SETTINGS, write_tiny_cache
from ovdistill.pipeline.runner import make_config as stage_config
from ovdistill.pipeline.runner import run_stage
from ovdistill.stages import pack
from ovdistill.trainer.config import make_config
from ovdistill.trainer.data import Augmentation, SampleError, augment, decode_sample, train_pipeline
from ovdistill.trainer.inputs import CacheMismatch, check_shard_dim, load_vocabulary, shard_urls
from ovdistill.trainer.train import main as train_main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_cache(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("flip", [False, True])
def test_augment_moves_cached_boxes_exactly_like_gt_boxes(flip):
    h, w = 60, 100
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[:, 10:30, 20:50] = 255  # a white block at box (20, 10, 50, 30)
    gt = torch.tensor([[20.0, 10.0, 50.0, 30.0], [0.0, 0.0, 100.0, 60.0]])
    cached = torch.tensor([[0.0, 0.0, 100.0, 60.0], [20.0, 10.0, 50.0, 30.0],
                           [5.0, 7.0, 9.0, 40.0]])
    out, gt2, cached2 = augment(image, gt, cached, Augmentation(size=90, max_size=1000,
                                                                  flip=flip))
    assert out.shape == (3, 90, 150) and out.dtype == torch.float32
    torch.testing.assert_close(cached2[0], gt2[1])
    torch.testing.assert_close(cached2[1], gt2[0])
    # by hand: scale 1.5, then x -> W' - x when flipped
    x1, y1, x2, y2 = 5 * 1.5, 7 * 1.5, 9 * 1.5, 40 * 1.5
    want = [150 - x2, y1, 150 - x1, y2] if flip else [x1, y1, x2, y2]
    torch.testing.assert_close(cached2[2], torch.tensor(want))
    # the white block is where the transformed box says
    bx1, by1, bx2, by2 = (round(v) for v in gt2[0].tolist())
    assert out[:, by1 + 2:by2 - 2, bx1 + 2:bx2 - 2].min() > 0.95
    outside = out.clone()
    outside[:, by1 - 2:by2 + 2, bx1 - 2:bx2 + 2] = 0
    assert outside.max() < 0.05


def test_augment_respects_max_size():
    image = torch.zeros(3, 50, 200, dtype=torch.uint8)
    box = torch.tensor([[0.0, 0.0, 200.0, 50.0]])
    out, gt2, cached2 = augment(image, box, box.clone(), Augmentation(100, 300, False))
    assert out.shape[-1] == 300 and out.shape[-2] == 75
    torch.testing.assert_close(gt2, torch.tensor([[0.0, 0.0, 300.0, 75.0]]))
    torch.testing.assert_close(cached2, gt2)


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _raw_sample(tiny):
    import webdataset as wds

    return next(iter(wds.DataPipeline(wds.SimpleShardList(tiny.shards[:1]),
                                      wds.tarfile_to_samples())))


def test_decode_sample_and_its_rejects(tiny):
    vocab = load_vocabulary(tiny.dataset_dir / "text" / "tiny.parquet")
    raw = _raw_sample(tiny)
    s = decode_sample(raw, vocab.dim, vocab.base_labels(), cached_per_image=5)
    meta = json.loads(raw["json"])
    assert s["image"].shape == (3, meta["height"], meta["width"])
    assert s["cached_boxes"].shape == (5, 4) and s["cached_emb"].shape == (5, vocab.dim)
    assert s["gt_boxes"].tolist() == meta["gt_boxes"]
    assert s["labels"].tolist() == [vocab.base_labels()[c] for c in meta["gt_category_ids"]]
    with pytest.raises(SampleError, match=r"train-000000\.tar: sample img\d+: missing"):
        decode_sample({k: v for k, v in raw.items() if k != "emb.npy"}, vocab.dim,
                      vocab.base_labels(), 5)
    novel = dict(raw, json=json.dumps({**meta, "gt_category_ids": [4] * len(
        meta["gt_boxes"])}).encode())
    with pytest.raises(SampleError, match=r"gt category ids \[4\] are not base"):
        decode_sample(novel, vocab.dim, vocab.base_labels(), 5)
    broken = dict(raw, jpg=raw["jpg"][:20])
    with pytest.raises(SampleError, match=r"sample img\d+\.jpg: not a recognised image"):
        decode_sample(broken, vocab.dim, vocab.base_labels(), 5)
    short = dict(raw, **{"boxes.npy": _npy(np.zeros((2, 4), np.float32))})
    with pytest.raises(SampleError, match="does not match"):
        decode_sample(short, vocab.dim, vocab.base_labels(), 5)
    with pytest.raises(CacheMismatch, match=r"expects \[M, 32\]"):
        decode_sample(raw, 32, vocab.base_labels(), 5)


def _raw_samples(shards: list[str]) -> list[dict]:
    import webdataset as wds

    return list(wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()))


def _member(raw: dict, name: str) -> np.ndarray:
    return np.load(io.BytesIO(raw[name]), allow_pickle=False)


@pytest.mark.parametrize("keep", [12, 5])
def test_decode_sample_keeps_each_cached_row_with_its_box_and_score(tiny, keep):
    """Row r of cached_boxes / cached_scores / cached_emb is row r of the members written."""
    vocab = load_vocabulary(tiny.dataset_dir / "text" / "tiny.parquet")
    samples = _raw_samples(tiny.shards)
    assert len(samples) == tiny.n_train
    for raw in samples:
        s = decode_sample(raw, vocab.dim, vocab.base_labels(), cached_per_image=keep)
        boxes, scores, emb = (_member(raw, k) for k in ("boxes.npy", "scores.npy", "emb.npy"))
        assert len(np.unique(boxes, axis=0)) == len(boxes) == 12  # rows tell apart
        assert s["image_id"] == json.loads(raw["json"])["image_id"]
        assert s["cached_boxes"].numpy().tolist() == boxes[:keep].tolist()
        assert s["cached_scores"].numpy().tolist() == scores[:keep].tolist()
        assert s["cached_emb"].dtype == torch.float16
        assert s["cached_emb"].numpy().tobytes() == emb[:keep].tobytes()


def test_decoded_cached_rows_equal_the_regions_rows(tmp_path):
    """regions parquet -> pack -> decode_sample: each image's rows, by rank, stay together."""
    import pyarrow.parquet as pq

    ctx = write_synthetic_cache(tmp_path, n_images=6, m=10, dim=8)
    run_stage(pack, ctx, stage_config(pack), distributor="local", progress=False,
              log=lambda _: None)
    table = pq.read_table(ctx.cache / "regions").sort_by([("image_id", "ascending"),
                                                         ("rank", "ascending")])
    samples = _raw_samples(sorted(str(p) for p in (ctx.cache / "wds").glob("train-*.tar")))
    assert len(samples) == 5  # the last image has no regions rows
    for raw in samples:
        s = decode_sample(raw, 8, {1: 1, 2: 2}, cached_per_image=7)
        rows = table.filter(table["image_id"].to_numpy() == s["image_id"]).slice(0, 7)
        assert len(rows) == 7
        assert s["cached_boxes"].tolist() == rows["box"].to_pylist()
        assert s["cached_scores"].tolist() == rows["score"].to_pylist()
        assert s["cached_emb"].tolist() == rows["embedding"].to_pylist()


def test_decode_sample_reads_cached_scores_and_tolerates_old_shards(tiny):
    vocab = load_vocabulary(tiny.dataset_dir / "text" / "tiny.parquet")
    raw = _raw_sample(tiny)
    written = np.load(io.BytesIO(raw["scores.npy"]))
    assert written.dtype == np.float32 and written.shape == (12,)
    s = decode_sample(raw, vocab.dim, vocab.base_labels(), cached_per_image=5)
    assert s["cached_scores"].dtype == torch.float32
    assert s["cached_scores"].tolist() == written[:5].tolist()  # truncated like the boxes
    # a shard packed before .scores.npy: every proposal scores 1, nothing is printed
    old = {k: v for k, v in raw.items() if k != "scores.npy"}
    assert decode_sample(old, vocab.dim, vocab.base_labels(), 5)["cached_scores"].tolist() == [
        1.0] * 5
    short = dict(raw, **{"scores.npy": _npy(np.zeros(3, np.float32))})
    with pytest.raises(SampleError, match=r"\.scores\.npy shape \(3,\) does not match"):
        decode_sample(short, vocab.dim, vocab.base_labels(), 5)


def test_base_only_vocabulary_keeps_the_base_rows(tiny):
    import pyarrow.parquet as pq

    path = tiny.dataset_dir / "text" / "tiny.parquet"
    vocab = load_vocabulary(path)
    table = pq.read_table(path).to_pylist()
    base_rows = sorted((r for r in table if r["split"] == "base"), key=lambda r: r["category_id"])
    base = vocab.base_only()
    assert 0 < len(base_rows) < len(table)
    assert base.category_ids == tuple(r["category_id"] for r in base_rows)
    assert base.names == tuple(r["name"] for r in base_rows)
    assert base.is_base.tolist() == [True] * len(base_rows)
    assert torch.allclose(base.embeddings, torch.tensor([r["embedding"] for r in base_rows],
                                                        dtype=torch.float32))
    assert base.base_labels() == vocab.base_labels()


def test_stream_splits_shards_between_nodes(tiny, monkeypatch):
    cfg = make_config({**TINY_SETTINGS, "shuffle_buffer": 1})  # epoch 0 only, in order
    vocab = load_vocabulary(tiny.dataset_dir / "text" / "tiny.parquet")
    urls = shard_urls(None, tiny.dataset_dir)
    assert len(urls) == 4
    seen = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stream = iter(train_pipeline(urls, cfg, vocab.dim, vocab.base_labels(), seed=3))
        ids = set()
        for _ in range(4):  # 8 images = one epoch of this rank's two shards
            _, targets = next(stream)
            assert all(len(t["cached_scores"]) == len(t["cached_boxes"]) for t in targets)
            ids.update(int(t["image_id"]) for t in targets)
        seen[rank] = ids
    assert len(seen[0]) == len(seen[1]) == 8
    assert not seen[0] & seen[1]
    # brace patterns expand to the same list
    spec = str(tiny.dataset_dir / "wds" / "train-{000000..000003}.tar")
    assert shard_urls(spec, tiny.dataset_dir) == urls
    # pipe: URLs stream through the same reader
    piped = shard_urls(f"pipe:cat {spec}", tiny.dataset_dir)
    assert piped[1] == f"pipe:cat {urls[1]}"
    stream = iter(train_pipeline(piped, cfg, vocab.dim, vocab.base_labels(), seed=3))
    assert len(next(stream)[0]) == cfg.batch_size


def test_cache_with_another_embedding_dim_is_refused(tmp_path, capsys):
    bad = write_tiny_cache(tmp_path, n_train=4, n_val=2, emb_dim_in_shards=8)
    vocab = load_vocabulary(bad.dataset_dir / "text" / "tiny.parquet")
    with pytest.raises(CacheMismatch) as e:
        check_shard_dim(bad.shards[0], vocab)
    msg = str(e.value)
    assert "\n" not in msg and bad.shards[0] in msg and "D=8" in msg and "D=16" in msg
    rc = train_main(["--manifest", str(bad.manifest), "--cache", str(bad.cache),
                     "--out", str(tmp_path / "run"), "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: ") and "train-000000.tar" in err[0]
    with pytest.raises(CacheMismatch, match=r"tiny\.parquet: embedding dim D=16, but the "
                                             r"trainer expects D=8"):
        load_vocabulary(bad.dataset_dir / "text" / "tiny.parquet", expect_dim=8)


@pytest.mark.slow
def test_training_with_every_remedy_on_and_a_missing_region_mean(tiny, tmp_path, capsys):
    sets = [arg for k, v in {**TINY_SETTINGS, "distill_min_score": 0.6, "distill_top_k": 4,
                             "contrastive_weight": 0.5, "center_targets": True,
                             "negative_prompts": True}.items()
            for arg in ("--set", f"{k}={json.dumps(v)}")]
    args = ["--manifest", str(tiny.manifest), "--cache", str(tiny.cache), "--device", "cpu",
            "--steps", "2", *sets]
    assert train_main([*args, "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    assert all(np.isfinite(r["loss_contrastive"]) and np.isfinite(r["loss_image"])
               for r in rows)
    bare = write_tiny_cache(tmp_path / "bare", n_train=4, n_val=2)
    (bare.dataset_dir / "text" / "region_mean.npy").unlink()
    capsys.readouterr()
    rc = train_main(["--manifest", str(bare.manifest), "--cache", str(bare.cache),
                     "--device", "cpu", "--steps", "1", *sets, "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "region_mean.npy: not found" in err[0]


# ---------------------------------------------------------------- what mutation testing found
# (make mutate on trainer/data.py): each test below fails on a surviving mutant that matters.

class _Planted:
    """Unpickling this creates MARKER: a pickled .npy member must never get that far."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("member", ["boxes.npy", "emb.npy", "scores.npy"])
def test_a_pickled_npy_member_is_a_reject_and_never_unpickled(tiny, tmp_path, member):
    vocab = load_vocabulary(tiny.dataset_dir / "text" / "tiny.parquet")
    raw = _raw_sample(tiny)
    _Planted.marker = tmp_path / "ran"
    buf = io.BytesIO()
    np.save(buf, np.array([_Planted()], dtype=object), allow_pickle=True)
    with pytest.raises(SampleError, match=rf"sample img\d+: cannot decode"):
        decode_sample(dict(raw, **{member: buf.getvalue()}), vocab.dim, vocab.base_labels(), 5)
    assert not _Planted.marker.exists()


@pytest.mark.parametrize("shape", [(12, 5), (12, 4, 1), (12,)])
def test_boxes_of_the_wrong_shape_are_a_reject(tiny, shape):
    vocab = load_vocabulary(tiny.dataset_dir / "text" / "tiny.parquet")
    raw = dict(_raw_sample(tiny), **{"boxes.npy": _npy(np.zeros(shape, np.float32))})
    with pytest.raises(SampleError, match=r"\.boxes\.npy shape .* does not match \.emb\.npy"):
        decode_sample(raw, vocab.dim, vocab.base_labels(), 5)


def test_each_sample_reject_names_its_problem(tiny):
    vocab = load_vocabulary(tiny.dataset_dir / "text" / "tiny.parquet")
    raw = _raw_sample(tiny)
    meta = json.loads(raw["json"])
    w, h = meta["width"], meta["height"]

    def refused(sample, pattern):
        with pytest.raises(SampleError, match=pattern):
            decode_sample(sample, vocab.dim, vocab.base_labels(), 5)

    refused(dict(raw, **{"scores.npy": b"not an npy"}),
            r"train-000000\.tar: sample img\d+: cannot decode \.scores\.npy \(.+\)$")
    refused(dict(raw, json=json.dumps({**meta, "width": w + 1}).encode()),
            rf"json says {w + 1}x{h}, image is {w}x{h}$")
    refused(dict(raw, json=json.dumps({**meta, "gt_category_ids": [1]}).encode()),
            rf"{len(meta['gt_boxes'])} gt_boxes but 1 gt_category_ids$")
    anonymous = {k: v for k, v in raw.items() if not k.startswith("__") and k != "jpg"}
    refused(anonymous, r"^\?: sample \?: missing \['jpg'\]")


def test_decoded_dtypes_do_not_follow_the_members(tiny):
    """float64 boxes, integer GT and a shard without scores still give float32 / int64."""
    vocab = load_vocabulary(tiny.dataset_dir / "text" / "tiny.parquet")
    raw = _raw_sample(tiny)
    meta = json.loads(raw["json"])
    boxes = np.load(io.BytesIO(raw["boxes.npy"])).astype(np.float64)
    gt = [[int(v) for v in b] for b in meta["gt_boxes"]]
    sample = {k: v for k, v in raw.items() if k != "scores.npy"}
    sample.update({"boxes.npy": _npy(boxes),
                   "json": json.dumps({**meta, "gt_boxes": gt}).encode()})
    s = decode_sample(sample, vocab.dim, vocab.base_labels(), 5)
    assert s["key"] == raw["__key__"]
    assert s["cached_boxes"].dtype == s["gt_boxes"].dtype == torch.float32
    assert s["cached_scores"].dtype == torch.float32 and s["labels"].dtype == torch.int64
    assert s["gt_boxes"].tolist() == gt
    # an image without GT: no gt fields at all
    bare = {k: v for k, v in meta.items() if k not in ("gt_boxes", "gt_category_ids")}
    s = decode_sample(dict(raw, json=json.dumps(bare).encode()), vocab.dim,
                      vocab.base_labels(), 5)
    assert s["gt_boxes"].shape == (0, 4) and s["labels"].shape == (0,)


def _stream_sample(gt: list[list[float]], labels: list[int]) -> dict:
    return {"key": "k", "image": torch.full((3, 40, 80), 255, dtype=torch.uint8),
            "gt_boxes": torch.tensor(gt).reshape(-1, 4), "labels": torch.tensor(labels),
            "cached_boxes": torch.tensor([[0.0, 0.0, 80.0, 40.0]])}


def test_augment_stage_drops_boxes_degenerate_on_either_axis_only():
    from ovdistill.trainer.data import augment_stage

    cfg = make_config({"train_sizes": [40], "max_size": 1000, "flip_prob": 0.0})
    gt = [[60.0, 5.0, 70.0, 30.0],   # kept: 10 x 25, far from the origin
          [60.0, 5.0, 60.5, 30.0],   # 0.5 px wide
          [10.0, 20.0, 50.0, 20.5],  # 0.5 px high
          [10.0, 10.0, 11.0, 11.0]]  # exactly 1 x 1: kept
    (out,) = augment_stage(iter([_stream_sample(gt, [1, 2, 3, 4])]), cfg, seed=0)
    assert out["gt_boxes"].tolist() == [gt[0], gt[3]] and out["labels"].tolist() == [1, 4]
    assert out["cached_boxes"].tolist() == [[0.0, 0.0, 80.0, 40.0]]
    assert out["image"].dtype == torch.float32 and out["image"].min().item() == 1.0


def test_augmentations_are_reproducible_and_both_flip_settings_are_honoured():
    from ovdistill.trainer.data import augment_stage, choose_augmentation

    cfg = make_config({"train_sizes": [32, 48, 64], "max_size": 70, "flip_prob": 0.5})
    samples = [_stream_sample([[0.0, 0.0, 20.0, 10.0]], [1]) for _ in range(12)]

    def shapes_and_boxes(seed):
        return [(tuple(o["image"].shape), o["gt_boxes"].tolist())
                for o in augment_stage(iter(samples), cfg, seed=seed)]

    first = shapes_and_boxes(5)
    assert first == shapes_and_boxes(5)  # the same seed: the same stream (resume)
    assert first != shapes_and_boxes(6)
    assert {shape[1] for shape, _ in first} == {32, 35}  # max_size 70 caps 48 and 64
    assert {b[0][0] > 0 for _, b in first} == {True, False}  # flipped and not flipped seen
    import random

    never = make_config({"flip_prob": 0.0})
    always = make_config({"flip_prob": 1.0})
    rng = random.Random(0)
    assert not any(choose_augmentation(rng, never).flip for _ in range(50))
    assert all(choose_augmentation(rng, always).flip for _ in range(50))
    assert choose_augmentation(rng, cfg).max_size == 70


def test_downscaling_antialiases_and_white_stays_one():
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    image[:, :, ::2] = 255  # 1-px stripes: without antialiasing they alias to 0 or 1
    out, _, _ = augment(image, torch.zeros(0, 4), torch.zeros(0, 4),
                        Augmentation(size=16, max_size=1000, flip=False))
    assert abs(out.mean().item() - 0.5) < 0.02 and out.std().item() < 0.05
    white = torch.full((3, 10, 20), 255, dtype=torch.uint8)
    out, _, _ = augment(white, torch.zeros(0, 4), torch.zeros(0, 4),
                        Augmentation(size=10, max_size=1000, flip=False))
    assert out.min().item() == out.max().item() == 1.0


def test_resize_for_test_scales_to_the_short_side_under_the_cap():
    from ovdistill.trainer.data import resize_for_test

    white = torch.full((3, 50, 100), 255, dtype=torch.uint8)
    out, scale = resize_for_test(white, 80, 1000)
    assert out.shape == (3, 80, 160) and scale == 80 / 50
    assert out.dtype == torch.float32 and out.min().item() == out.max().item() == 1.0
    out, scale = resize_for_test(white, 80, 120)  # the long side caps it
    assert out.shape == (3, 60, 120) and scale == 60 / 50


def test_shard_order_changes_every_epoch_and_covers_every_shard():
    from itertools import islice

    from ovdistill.trainer.data import ShardCycle

    urls = [f"s{i}" for i in range(8)]
    order = [d["url"] for d in islice(iter(ShardCycle(urls, seed=1)), 32)]
    epochs = [order[i:i + 8] for i in range(0, 32, 8)]
    assert all(sorted(e) == urls for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4  # no epoch repeats another's order
    assert epochs == [[d["url"] for d in islice(iter(ShardCycle(urls, seed=1)), 32)][i:i + 8]
                      for i in range(0, 32, 8)]


def test_stream_splits_shards_between_loader_workers(tiny, monkeypatch):
    cfg = make_config({**TINY_SETTINGS, "shuffle_buffer": 1})
    vocab = load_vocabulary(tiny.dataset_dir / "text" / "tiny.parquet")
    urls = shard_urls(None, tiny.dataset_dir)
    seen = {}
    for worker in (0, 1):
        monkeypatch.setenv("WORKER", str(worker))
        monkeypatch.setenv("NUM_WORKERS", "2")
        stream = iter(train_pipeline(urls, cfg, vocab.dim, vocab.base_labels(), seed=3))
        seen[worker] = {int(t["image_id"]) for _ in range(4) for t in next(stream)[1]}
    assert len(seen[0]) == len(seen[1]) == 8 and not seen[0] & seen[1]


def test_a_bad_sample_is_logged_and_the_stream_goes_on(tiny, tmp_path, capsys):
    import webdataset as wds
    from ovdistill.trainer.data import log_and_continue

    raws = _raw_samples(tiny.shards[:1])
    path = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i, raw in enumerate(raws):
            members = {k: v for k, v in raw.items() if not k.startswith("__")}
            if i == 1:
                members["jpg"] = b"broken"
            sink.write({"__key__": raw["__key__"], **members})
    cfg = make_config({**TINY_SETTINGS, "shuffle_buffer": 1, "batch_size": 1})
    vocab = load_vocabulary(tiny.dataset_dir / "text" / "tiny.parquet")
    stream = iter(train_pipeline([str(path)], cfg, vocab.dim, vocab.base_labels(), seed=0))
    got = [int(next(stream)[1][0]["image_id"]) for _ in range(len(raws) - 1)]
    assert got == [json.loads(r["json"])["image_id"] for i, r in enumerate(raws) if i != 1]
    assert f"reject: {path}: sample {raws[1]['__key__']}.jpg" in capsys.readouterr().err
    assert log_and_continue(SampleError("x")) is True
    with pytest.raises(CacheMismatch):
        log_and_continue(CacheMismatch("other D"))
