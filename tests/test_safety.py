"""Received files are data: a crafted checkpoint runs nothing, a file name never leaves its
image folder, a manifest name never leaves the cache root, a shard sample with a foreign member
is a reject."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ovdistill.bench.storage_bench import write_synthetic_cache
from ovdistill.pipeline.manifests import (
    ManifestError,
    contained_path,
    image_path,
    is_plain_relative,
    load_manifest,
)
from ovdistill.pipeline.runner import make_config, run_stage
from ovdistill.stages import pack
from ovdistill.stages import teacher as T
from ovdistill.trainer import evaluate
from ovdistill.trainer.data import SampleError, decode_sample
from ovdistill.trainer.model import CheckpointError
from ovdistill.trainer.train import load_checkpoint
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "ran"
    path = tmp_path / "latest.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3, "x": _Payload(marker)}, path)
    return path, marker


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: checkpoint refused")
    assert "posix.system" in msg
    assert not marker.exists()


def test_the_rpn_stage_refuses_a_crafted_checkpoint_in_one_line(tmp_path):
    from ovdistill.pipeline.runner import StageError
    from ovdistill.stages.rpn import load_rpn

    path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(StageError) as e:
        load_rpn(path)
    assert "\n" not in str(e.value) and "refused" in str(e.value)
    assert "posix.system" in str(e.value) and not marker.exists()


def test_a_plain_checkpoint_still_loads(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "step": 7, "config": {"lr": 1e-3},
             "vocabulary": ["a", "b"], "world_size": 1}
    torch.save(state, tmp_path / "ok.pt")
    got = load_checkpoint(tmp_path / "ok.pt")
    assert got["step"] == 7 and torch.equal(got["model"]["w"], torch.arange(3.0))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk.pt: cannot load checkpoint: not a torch"):
        load_checkpoint(tmp_path / "junk.pt")


def test_evaluate_refuses_a_crafted_checkpoint_in_one_line(tmp_path, capsys):
    path, marker = crafted_checkpoint(tmp_path)
    rc = evaluate.main(["--manifest", str(REPO / "data_manifests" / "toy.yaml"),
                        "--cache", str(tmp_path / "cache"), "--run", str(tmp_path),
                        "--checkpoint", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {path}: checkpoint refused")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../secret.jpg", "a/../../secret.jpg", "/etc/passwd",
                                  "C:\\secret.jpg", "..\\secret.jpg", ""])
def test_names_that_leave_the_folder_are_refused(tmp_path, name):
    assert not is_plain_relative(name)
    with pytest.raises(ManifestError, match="refused"):
        contained_path(tmp_path, name)


def test_a_link_out_of_the_folder_is_refused_and_plain_names_pass(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (folder / "sub" / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    with pytest.raises(ManifestError, match="resolves outside"):
        contained_path(folder, "sub/escape.jpg")
    assert contained_path(folder, "sub/a..b.jpg") == folder / "sub" / "a..b.jpg"
    with pytest.raises(ManifestError) as e:
        image_path(folder, {"id": 9, "file_name": "../secret.jpg"})
    assert str(e.value).startswith("image record 9: file name '../secret.jpg'")
    lvis = {"id": 4, "coco_url": "http://images.cocodataset.org/val2017/000004.jpg"}
    assert image_path(folder, lvis) == folder / "val2017" / "000004.jpg"


def test_pack_rejects_traversal_names_and_packs_no_outside_bytes(tmp_path):
    ctx = write_synthetic_cache(tmp_path, n_images=6, m=10, dim=16)
    split = ctx.dataset.split("train")
    secret = tmp_path / "secret.jpg"
    Image.new("RGB", (96, 64), (200, 10, 10)).save(secret, quality=95)
    doc = json.loads(split.annotations.read_text())
    doc["images"][0]["file_name"] = "../../secret.jpg"
    doc["images"][1]["file_name"] = str(secret)
    (split.images / "link.jpg").symlink_to(secret)
    doc["images"][2]["file_name"] = "link.jpg"
    split.annotations.write_text(json.dumps(doc))
    manifest = run_stage(pack, ctx, make_config(pack, {"max_samples": 10}), distributor="local",
                         rebuild=False, progress=False, log=lambda s: None)
    rejects = json.loads((ctx.cache / "wds" / "part-00000.stats.json").read_text())["rejects"]
    assert sorted(r["item"] for r in rejects) == [1, 2, 3]
    assert all("refused" in r["reason"] and r["file"] == str(split.annotations)
               for r in rejects)
    assert manifest["rejected"] == 3
    data = secret.read_bytes()
    for shard in (ctx.cache / "wds").glob("*.tar"):
        assert data not in shard.read_bytes()


def test_caption_rows_outside_the_root_are_rejects(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "in.jpg")
    outside = tmp_path.parent / f"{tmp_path.name}-out.jpg"
    Image.new("RGB", (8, 8)).save(outside)
    csv = tmp_path / "captions.csv"
    csv.write_text(f"filepath,title\nin.jpg,a red star\n../{outside.name},a leak\n"
                   f"{outside},another leak\n")
    rows, rejects = T.read_captions(csv, tmp_path)
    assert rows == [(str((tmp_path / "in.jpg").resolve()), "a red star")]
    assert [r["item"] for r in rejects] == [3, 4]
    assert all(r["reason"].startswith(f"{csv}: file name") for r in rejects)
    outside.unlink()


MANIFEST = """
name: {name}
format: coco
root: /data
splits:
  train: {{images: train, annotations: train.json}}
vocabulary:
  base: [circle]
  novel: [star]
"""


@pytest.mark.parametrize("name", ["../..", "..", ".", "a/b", "toy set", "x;rm"])
def test_a_manifest_name_that_is_not_one_folder_is_refused(tmp_path, name):
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST.format(name=json.dumps(name)))
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"{path}: name {name!r} must be letters, digits")


def test_plain_manifest_names_load(tmp_path):
    for name in ("toy", "coco_ovd", "lvis-v1.0"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(MANIFEST.format(name=name))
        assert load_manifest(path).name == name


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _sample(**extra) -> dict:
    jpg = io.BytesIO()
    Image.new("RGB", (20, 10)).save(jpg, format="JPEG")
    meta = {"image_id": 1, "file_name": "1.jpg", "width": 20, "height": 10,
            "gt_boxes": [[1, 1, 5, 5]], "gt_category_ids": [3]}
    return {"__key__": "img1", "__url__": "train-000000.tar", "jpg": jpg.getvalue(),
            "boxes.npy": _npy(np.array([[0, 0, 4, 4]], np.float32)),
            "emb.npy": _npy(np.ones((1, 8), np.float16)), "json": json.dumps(meta).encode(),
            **extra}


def test_a_shard_sample_with_a_foreign_member_is_a_reject_never_unpickled(monkeypatch):
    assert decode_sample(_sample(), 8, {3: 0}, 10)["labels"].tolist() == [0]

    def no_pickle(*a, **k):
        raise AssertionError("a member was unpickled")

    monkeypatch.setattr("pickle.loads", no_pickle)
    monkeypatch.setattr("pickle.load", no_pickle)
    with pytest.raises(SampleError) as e:
        decode_sample(_sample(pyd=b"\x80\x04K\x01.", txt=b"x"), 8, {3: 0}, 10)
    assert str(e.value) == ("train-000000.tar: sample img1: unexpected member(s) ['pyd', "
                            "'txt']; a sample holds only ['jpg', 'boxes.npy', 'emb.npy', "
                            "'json', 'scores.npy']")
    object_npy = io.BytesIO()
    np.save(object_npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SampleError, match=r"img1: cannot decode \(Object arrays cannot be"):
        decode_sample(_sample(**{"boxes.npy": object_npy.getvalue()}), 8, {3: 0}, 10)
