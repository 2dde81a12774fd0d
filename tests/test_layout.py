"""pipeline/layout.py: every cache folder and file name, pinned to the literal that caches on
disk already use (a changed name would orphan them), and the pack stage's hashed members."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from ovdistill.pipeline import layout
from ovdistill.pipeline.errors import StageError
from ovdistill.pipeline.layout import DatasetCache
from ovdistill.pipeline.runner import stage_folder

from ovdistill import cli


def test_names_are_the_ones_on_disk():
    assert (layout.DATASET, layout.TEACHER, layout.RPN, layout.PROPOSALS, layout.REGIONS,
            layout.TEXT, layout.WDS, layout.INDEX) == (
        "dataset", "teacher", "rpn", "proposals", "regions", "text", "wds", "index")
    assert (layout.PLAN_FILE, layout.MANIFEST_FILE, layout.LOCK_FILE) == (
        "_PLAN.json", "_MANIFEST.json", ".lock")
    assert (layout.PART_GLOB, layout.STATS_GLOB) == ("part-*.parquet", "part-*.stats.json")
    assert (layout.TRAIN_FULL, layout.CAPTIONS_CSV, layout.RPN_CHECKPOINT,
            layout.NEGATIVES_FILE, layout.REGION_MEAN_FILE, layout.SIZES_FILE,
            layout.SHARD_GLOB, layout.INDEX_FILE, layout.IDS_FILE) == (
        "train_full.json", "captions.csv", "rpn.pt", "negatives.parquet", "region_mean.npy",
        "sizes.json", "train-*.tar", "regions.faiss", "ids.parquet")
    assert layout.part_stem(7) == "part-00007"
    assert str(layout.part_file("x", 3)) == "x/part-00003.parquet"
    assert str(layout.part_file("x", 3, ".json")) == "x/part-00003.json"
    assert str(layout.stats_file("x", "part-00003")) == "x/part-00003.stats.json"
    assert layout.shard_name(3) == "train-000003.tar"
    assert layout.text_file("toy") == "toy.parquet"
    assert layout.SHARD_MEMBERS == ("jpg", "boxes.npy", "scores.npy", "emb.npy", "json")
    assert set(layout.REQUIRED_MEMBERS) == set(layout.SHARD_MEMBERS) - {"scores.npy"}


def test_pack_hashes_the_same_members_string():
    from ovdistill.stages import pack

    # an input of the pack stage: a different string would refuse every existing cache
    assert pack.MEMBERS == "jpg boxes.npy scores.npy emb.npy json"
    assert pack.inputs.__module__ == "ovdistill.stages.pack"


def test_stage_folders_are_the_run_order():
    assert layout.STAGE_FOLDERS == tuple(
        stage_folder(importlib.import_module(m)) for m in cli.STAGES)


def test_dataset_cache_paths_and_manifests(tmp_path):
    cache = DatasetCache(tmp_path / "toy")
    root = tmp_path / "toy"
    assert cache.stage_dir("rpn") == root / "rpn"
    assert cache.manifest_path("wds") == root / "wds" / "_MANIFEST.json"
    assert cache.text_parquet("toy") == root / "text" / "toy.parquet"
    assert cache.region_mean() == root / "text" / "region_mean.npy"
    assert cache.negatives() == root / "text" / "negatives.parquet"
    assert cache.train_full() == root / "dataset" / "train_full.json"
    assert cache.shards() == [] and cache.parts("regions") == []
    assert cache.read_manifest("rpn", required=False) is None
    with pytest.raises(StageError, match=r"stage 'rpn' has not finished: .*_MANIFEST.json is "
                                         r"missing; run `python -m ovdistill run --stages rpn`"):
        cache.read_manifest("rpn")
    (root / "rpn").mkdir(parents=True)
    (root / "rpn" / "_MANIFEST.json").write_text('{"checkpoint": "rpn.pt"}')
    assert cache.rpn_checkpoint() == root / "rpn" / "rpn.pt"
    (root / "wds").mkdir()
    for name in ("train-000001.tar", "train-000000.tar", "sizes.json"):
        (root / "wds" / name).write_bytes(b"")
    assert [p.name for p in cache.shards()] == ["train-000000.tar", "train-000001.tar"]
    assert layout.recorded_checkpoint(root / "rpn", {"checkpoint": "/abs/rpn.pt"}) == \
        Path("/abs/rpn.pt")
