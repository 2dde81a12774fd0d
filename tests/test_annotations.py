"""Annotation validation (pipeline/annotations.py) and the project's one error root.

A real-format dataset written in tmp_path goes through `python -m ovdistill run` in-process:
each structural problem is one `error: <file>: ...` line with exit status 2 before any
expensive stage; degenerate boxes are dropped and overshooting ones clipped, reported in the
dataset stage's `_MANIFEST.json`, and the later stages' readers see only the kept ones."""
from __future__ import annotations

import copy
import importlib
import inspect
import json
import pkgutil
from pathlib import Path

import pytest
import torch
import yaml
from ovdistill.pipeline.annotations import (
    EMPTY,
    MAX_EXAMPLES,
    NON_FINITE,
    OUTSIDE,
    AnnotationError,
    validate_annotations,
)
from ovdistill.pipeline.boxes import read_annotations
from ovdistill.pipeline.cache import read_json
from ovdistill.pipeline.errors import OvdError
from ovdistill.pipeline.manifests import load_manifest
from ovdistill.pipeline.runner import StageContext
from ovdistill.stages import pack, rpn
from PIL import Image

from ovdistill import bench, cli, pipeline, stages, trainer
from tests.test_dataset import REAL, run_dataset  # the same real-format manifest

REPO = Path(__file__).resolve().parents[1]
W, H = 32, 24  # every image's size
CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 5, "name": "cow"}]


def ann(aid: int, image_id: int, category_id: int, bbox, **extra) -> dict:
    return {"id": aid, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": 25.0, "iscrowd": 0, **extra}


GOOD_TRAIN = [ann(1, 1, 1, [1, 1, 5, 5]), ann(2, 2, 2, [3, 4, 6, 7])]
GOOD_VAL = [ann(101, 4, 5, [2, 2, 8, 8])]


def images(split: str) -> list[dict]:
    ids = (1, 2, 3) if split == "train" else (4, 5)
    return [{"id": i, "file_name": f"{i:012d}.jpg", "width": W, "height": H} for i in ids]


def write_doc(root: Path, split: str, doc: dict) -> Path:
    path = root / "annotations" / f"{split}.json"
    path.write_text(json.dumps(doc))  # NaN / Infinity are written as JSON's extensions
    return path


def write_real(tmp_path: Path, train_anns=GOOD_TRAIN, val_anns=GOOD_VAL) -> Path:
    """A tiny COCO-format dataset (images on disk) and its manifest; returns the manifest."""
    root = tmp_path / "real"
    (root / "annotations").mkdir(parents=True)
    for split, anns in (("train", train_anns), ("val", val_anns)):
        (root / f"{split}2017").mkdir()
        for im in images(split):
            Image.new("RGB", (W, H)).save(root / f"{split}2017" / im["file_name"])
        write_doc(root, split, {"images": images(split), "annotations": list(anns),
                                "categories": CATS})
    path = tmp_path / "real.yaml"
    path.write_text(REAL.format(root=root))
    return path


def run_cli(tmp_path: Path, manifest: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    rc = cli.main(["run", "--manifest", str(manifest), "--cache", str(tmp_path / "cache"),
                   "--distributor", "local", "--no-progress", *extra])
    return rc, capsys.readouterr().err.strip().splitlines()


def context(tmp_path: Path, manifest: Path) -> StageContext:
    ds = load_manifest(manifest, cache_root=tmp_path / "cache")
    return StageContext(dataset=ds, cache=tmp_path / "cache" / ds.name)


# ----------------------------------------------------------------------------- structure


def _unknown_image(doc):
    doc["annotations"].append(ann(99, 42, 1, [1, 1, 5, 5]))


def _duplicate_image(doc):
    doc["images"].append(dict(doc["images"][0]))


def _duplicate_annotation(doc):
    doc["annotations"].append(ann(1, 3, 2, [1, 1, 5, 5]))


def _unknown_category(doc):
    doc["annotations"].append(ann(99, 3, 9, [1, 1, 5, 5]))


def _string_bbox(doc):
    doc["annotations"].append(ann(99, 3, 1, "1,1,5,5"))


def _three_numbers(doc):
    doc["annotations"].append(ann(99, 3, 1, [1, 1, 5]))


def _text_in_bbox(doc):
    doc["annotations"].append(ann(99, 3, 1, [1, 1, "5", 5]))


def _no_image_id(doc):
    a = ann(99, 3, 1, [1, 1, 5, 5])
    del a["image_id"]
    doc["annotations"].append(a)


def _duplicate_category(doc):
    doc["categories"].append({"id": 2, "name": "another dog"})


STRUCTURAL = {
    "unknown image id": (_unknown_image, "annotations[2] (id 99): unknown image id 42"),
    "duplicate image id": (_duplicate_image, "images[3]: duplicate image id 1 (also images[0])"),
    "duplicate annotation id": (_duplicate_annotation,
                                "annotations[2]: duplicate annotation id 1 (also annotations[0])"),
    "unknown category id": (_unknown_category, "annotations[2] (id 99): unknown category id 9"),
    "non-list bbox": (_string_bbox, "annotations[2] (id 99): bbox must be a list of 4 numbers"),
    "bbox of 3 numbers": (_three_numbers, "bbox must be a list of 4 numbers"),
    "text in bbox": (_text_in_bbox, "bbox must be a list of 4 numbers"),
    "no image_id": (_no_image_id, "annotations[2] (id 99): image_id must be an integer"),
    "duplicate category id": (_duplicate_category,
                              "categories[3]: duplicate category id 2 (also categories[1])"),
}


@pytest.mark.parametrize("case", sorted(STRUCTURAL))
def test_a_structural_problem_is_one_error_line_before_any_expensive_stage(tmp_path, capsys,
                                                                          case):
    manifest = write_real(tmp_path)
    root = tmp_path / "real"
    doc = {"images": images("train"), "annotations": copy.deepcopy(GOOD_TRAIN),
           "categories": copy.deepcopy(CATS)}
    planted, phrase = STRUCTURAL[case]
    planted(doc)
    bad = write_doc(root, "train", doc)

    rc, err = run_cli(tmp_path, manifest, capsys)  # every stage: it stops at the dataset
    assert rc == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {bad}: "), err[0]
    assert phrase in err[0]
    cache = tmp_path / "cache" / "real"
    assert not (cache / "teacher").exists()  # nothing after the dataset stage ran
    assert not (cache / "dataset" / "_PLAN.json").exists()

    # the corrected file is checked anew: no --rebuild, no "built with other inputs"
    write_doc(root, "train", {"images": images("train"), "annotations": GOOD_TRAIN,
                              "categories": CATS})
    rc, err = run_cli(tmp_path, manifest, capsys, "--stages", "dataset")
    assert rc == 0 and err == []
    assert read_json(cache / "dataset" / "_MANIFEST.json")["dropped_annotations"]["count"] == 0


def test_the_readers_of_later_stages_raise_the_same_error(tmp_path):
    """The rpn and proposals stages read through read_annotations: what gave a traceback
    there before is an AnnotationError, an OvdError every CLI prints in one line."""
    manifest = write_real(tmp_path)
    doc = {"images": images("train"), "annotations": copy.deepcopy(GOOD_TRAIN),
           "categories": CATS}
    _unknown_image(doc)
    bad = write_doc(tmp_path / "real", "train", doc)
    with pytest.raises(AnnotationError) as e:
        read_annotations(bad)
    assert isinstance(e.value, OvdError) and isinstance(e.value, ValueError)
    assert str(e.value) == f"{bad}: annotations[2] (id 99): unknown image id 42 (not in 'images')"
    with pytest.raises(AnnotationError, match="unknown image id 42"):
        rpn.base_train_records(context(tmp_path, manifest))


def test_an_unreadable_file_is_one_line(tmp_path, capsys):
    manifest = write_real(tmp_path)
    bad = tmp_path / "real/annotations/train.json"
    bad.write_text('{"images": [')
    rc, err = run_cli(tmp_path, manifest, capsys)
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"error: {bad}: cannot read a COCO/LVIS annotation file")


# ----------------------------------------------------------------------------- boxes

DEGENERATE_TRAIN = [
    ann(1, 1, 1, [1, 1, 5, 5]),  # kept as it is
    ann(2, 1, 1, [2, 2, 0, 5]),  # zero width
    ann(3, 1, 2, [2, 2, 5, -3]),  # negative height
    ann(4, 1, 1, [float("nan"), 1, 5, 5]),
    ann(5, 1, 1, [1, 1, float("inf"), 5]),
    ann(6, 1, 1, [W, 1, 5, 5]),  # starts at the right edge
    ann(7, 1, 1, [-10, 1, 5, 5]),  # ends left of the image
    ann(8, 1, 1, [1, H + 6, 5, 5]),  # below the image
    ann(9, 1, 1, [-2, -1, 10, 10]),  # overshoots top-left -> [0, 0, 8, 9]
    ann(10, 1, 2, [28, 20, 10, 10]),  # overshoots bottom-right -> [28, 20, 4, 4]
    ann(11, 1, 5, [30.5, 0.5, 4.0, 2.0]),  # novel, overshoots right -> [30.5, 0.5, 1.5, 2.0]
    ann(12, 2, 1, [0, 0, 4, 4], iscrowd=1),  # crowd: kept, not a training box
    ann(13, 2, 2, [3, 4, 6, 7]),
]
DEGENERATE_VAL = [ann(101, 4, 5, [2, 2, 8, 8]), ann(102, 5, 1, [2, 2, 8, 0])]

WANT_DROPPED = [
    {"split": "train", "id": 2, "image_id": 1, "reason": EMPTY},
    {"split": "train", "id": 3, "image_id": 1, "reason": EMPTY},
    {"split": "train", "id": 4, "image_id": 1, "reason": NON_FINITE},
    {"split": "train", "id": 5, "image_id": 1, "reason": NON_FINITE},
    {"split": "train", "id": 6, "image_id": 1, "reason": OUTSIDE},
    {"split": "train", "id": 7, "image_id": 1, "reason": OUTSIDE},
    {"split": "train", "id": 8, "image_id": 1, "reason": OUTSIDE},
    {"split": "val", "id": 102, "image_id": 5, "reason": EMPTY},
]
WANT_CLIPPED = [
    {"split": "train", "id": 9, "image_id": 1, "bbox": [-2, -1, 10, 10], "clipped": [0, 0, 8, 9]},
    {"split": "train", "id": 10, "image_id": 1, "bbox": [28, 20, 10, 10],
     "clipped": [28, 20, 4, 4]},
    {"split": "train", "id": 11, "image_id": 1, "bbox": [30.5, 0.5, 4.0, 2.0],
     "clipped": [30.5, 0.5, 1.5, 2.0]},
]


@pytest.fixture()
def degenerate(tmp_path, capsys):
    manifest = write_real(tmp_path, DEGENERATE_TRAIN, DEGENERATE_VAL)
    rc, err = run_cli(tmp_path, manifest, capsys, "--stages", "dataset")
    assert rc == 0 and err == []
    ctx = context(tmp_path, manifest)
    return ctx, read_json(ctx.stage_dir("dataset") / "_MANIFEST.json")


def test_degenerate_boxes_are_dropped_and_counted_with_their_reasons(degenerate):
    _, m = degenerate
    assert m["dropped_annotations"] == {"count": 8, "per_split": {"train": 7, "val": 1},
                                        "examples": WANT_DROPPED}
    # the counts are those of the kept annotations: 1, 9, 10, 12 (crowd), 13 base; 11 novel
    assert m["counts"]["boxes"] == {"train": {"base": 5, "novel": 1, "other": 0},
                                    "val": {"base": 0, "novel": 1, "other": 0}}


def test_overshooting_boxes_are_clipped_to_the_image(degenerate):
    _, m = degenerate
    assert m["clipped_annotations"] == {"count": 3, "per_split": {"train": 3, "val": 0},
                                        "examples": WANT_CLIPPED}


def test_later_stages_see_only_the_kept_and_clipped_boxes(degenerate):
    ctx, _ = degenerate
    # rpn: base boxes, no crowd, clipped (x1, y1, x2, y2)
    records, _ = rpn.base_train_records(ctx)
    by_id = {r.image_id: r for r in records}
    assert sorted(by_id) == [1, 2, 3]
    assert by_id[1].boxes.tolist() == [[1, 1, 6, 6], [0, 0, 8, 9], [28, 20, 32, 24]]
    assert by_id[1].category_ids.tolist() == [1, 1, 2]
    assert by_id[2].boxes.tolist() == [[3, 4, 9, 11]] and by_id[2].category_ids.tolist() == [2]
    assert by_id[3].boxes.shape == (0, 4)
    # proposals' recall and the toy checks read every category
    raw = read_annotations(ctx.dataset.split("train").annotations)
    assert raw[1].boxes.tolist() == [[1, 1, 6, 6], [0, 0, 8, 9], [28, 20, 32, 24],
                                     [30.5, 0.5, 32, 2.5]]
    assert torch.isfinite(raw[1].boxes).all()
    # pack: the base GT written into every shard sample
    split = pack.load_split(ctx, "train")
    assert [a["id"] for a in split.anns[1]] == [1, 9, 10, 11]
    assert [a["id"] for a in split.anns[2]] == [12, 13] and split.anns[3] == []
    meta = pack.sample_meta(split.images[1], split.anns[1], split.base_ids)
    assert meta["gt_boxes"] == [[1, 1, 6, 6], [0, 0, 8, 9], [28, 20, 32, 24]]
    assert meta["gt_category_ids"] == [1, 1, 2]


def test_validation_is_pure_and_keeps_at_most_100_examples():
    doc = {"images": images("train"), "categories": CATS,
           "annotations": [ann(i, 1, 1, [1, 1, 0, 5]) for i in range(1, 151)]
                          + [ann(151, 1, 1, [-1, 0, 4, 4]), ann(152, 2, 2, [3, 4, 6, 7])]}
    before = json.dumps(doc)
    valid = validate_annotations(doc, "mem.json")
    assert json.dumps(doc) == before  # nothing changed in place
    assert valid.dropped.count == 150 and len(valid.dropped.examples) == MAX_EXAMPLES == 100
    assert [e["id"] for e in valid.dropped.examples] == list(range(1, 101))
    assert [a["id"] for a in valid.annotations] == [151, 152]
    assert valid.annotations[0]["bbox"] == [0, 0, 3, 4]
    assert valid.annotations[1] is doc["annotations"][-1]  # an untouched record is not copied
    assert valid.clipped.as_dict() == {"count": 1, "examples": [
        {"id": 151, "image_id": 1, "bbox": [-1, 0, 4, 4], "clipped": [0, 0, 3, 4]}]}
    assert valid.by_image() == {1: [valid.annotations[0]], 2: [valid.annotations[1]], 3: []}


def test_the_toy_annotations_are_clean(tmp_path):
    """The synthetic generator draws boxes inside their images: validation drops and clips
    nothing there, so the toy cache's outputs do not depend on it. Checked on the embedded
    manifest's own generator settings, with fewer images."""
    doc = yaml.safe_load((REPO / "data_manifests" / "toy.yaml").read_text())
    doc["synthetic"].update(n_train=24, n_val=12, n_captions=5)
    manifest = tmp_path / "toy.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    ctx, _ = run_dataset(manifest, tmp_path / "cache")
    toy = ctx.stage_dir("dataset")
    files = [toy / n for n in ("train.json", "val.json", "train_full.json")]
    for f in files:
        doc = json.loads(f.read_text())
        valid = validate_annotations(doc, f)
        assert valid.dropped.count == 0 and valid.clipped.count == 0, f
        assert valid.annotations == doc["annotations"]


# ----------------------------------------------------------------------------- errors


def project_modules():
    for pkg in (pipeline, stages, trainer, bench):
        for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{pkg.__name__}."):
            if not info.name.endswith("__main__"):
                yield importlib.import_module(info.name)


def test_every_error_class_of_the_project_derives_from_the_root():
    found = {}
    for module in project_modules():
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                found[name] = cls
    named = {"ManifestError", "StageError", "StageMismatch", "TeacherError", "AnnotationError",
             "ImageError", "CacheMismatch", "ConfigError", "CheckpointError", "SampleError"}
    assert named <= set(found), sorted(named - set(found))
    assert [n for n, c in sorted(found.items()) if not issubclass(c, OvdError)] == []
    # their other bases stay, for the code that catches those
    for name in named - {"StageError", "StageMismatch", "TeacherError"}:
        assert issubclass(found[name], ValueError), name
    assert issubclass(found["StageError"], RuntimeError)


class Planted(OvdError):
    """An OvdError none of the CLIs names."""


def _raise(*args, **kwargs):
    raise Planted("planted.json: something is wrong")


CLIS = [  # (module holding main, the name main reaches first, argv)
    ("ovdistill.cli", "ovdistill.cli.cmd_status", ["status"]),
    ("ovdistill.cli", "ovdistill.query._run", ["query", "a star"]),
    ("ovdistill.trainer.train", "ovdistill.trainer.train.train", []),
    ("ovdistill.trainer.evaluate", "ovdistill.trainer.evaluate.evaluate", []),
    ("ovdistill.trainer.oracle", "ovdistill.trainer.oracle.run", []),
    ("ovdistill.trainer.probe", "ovdistill.trainer.probe.run", []),
    ("ovdistill.trainer.diagnose", "ovdistill.trainer.diagnose.load_manifest", ["--run", "RUN"]),
    ("ovdistill.trainer.ablation", "ovdistill.trainer.ablation.run_row", ["--rows", "text", "--out", "RUN"]),
    ("ovdistill.bench.train_bench", "ovdistill.bench.train_bench._inputs", []),
    ("ovdistill.bench.run_all", "ovdistill.bench.run_all.load_manifest", []),
    ("ovdistill.bench.storage_bench", "ovdistill.bench.storage_bench.measure", ["RUN"]),
    ("ovdistill.bench.regions_bench", "ovdistill.bench.regions_bench.run_one", ["--threads", "0"]),
    ("ovdistill.bench.regions_agreement", "ovdistill.bench.regions_agreement.load_manifest", []),
]


@pytest.mark.parametrize("module, target, argv", CLIS, ids=[c[1] for c in CLIS])
def test_every_cli_prints_a_project_error_in_one_line(module, target, argv, tmp_path, capsys,
                                                      monkeypatch):
    mod_name, attr = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(mod_name), attr, _raise)
    if module == "ovdistill.trainer.ablation":
        monkeypatch.setattr("ovdistill.trainer.ablation.write_summary", lambda *a, **k: {})
    argv = [str(tmp_path) if a == "RUN" else a for a in argv]
    rc = importlib.import_module(module).main(argv)
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err == "error: planted.json: something is wrong\n"
