"""Manifest loading and validation: every failure is one line naming the file, the category,
the variable or the overlap."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ovdistill.pipeline.manifests import ManifestError, image_file, load_manifest

REPO = Path(__file__).resolve().parents[1]

# The 80 COCO 2017 detection category names, in id order.
COCO80 = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def coco_json(path: Path, names: list[str], **extra) -> Path:
    cats = [{"id": i + 1, "name": n, **extra} for i, n in enumerate(names)]
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    return path


@pytest.fixture()
def coco_root(tmp_path):
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    (root / "val2017").mkdir()
    (root / "annotations").mkdir()
    coco_json(root / "annotations/instances_train2017.json", COCO80)
    coco_json(root / "annotations/instances_val2017.json", COCO80)
    return root


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


TINY = """
name: tiny
format: coco
root: {root}
splits:
  train: {{images: train2017, annotations: annotations/instances_train2017.json}}
  val: {{images: val2017, annotations: annotations/instances_val2017.json}}
vocabulary:
  base: [{base}]
  novel: [{novel}]
"""


def tiny(tmp_path, root, base="person, car", novel="cat"):
    return write_yaml(tmp_path / "tiny.yaml", TINY.format(root=root, base=base, novel=novel))


def test_coco_ovd_split_resolves_against_coco_names(coco_root, monkeypatch):
    monkeypatch.setenv("COCO_ROOT", str(coco_root))
    m = load_manifest(REPO / "data_manifests/coco_ovd.yaml")
    m.check_files()
    cats = m.categories()
    assert len(m.base) == 48 and len(m.novel) == 17
    assert sum(c.split == "base" for c in cats) == 48
    assert {c.name for c in cats if c.split == "novel"} == {
        "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
        "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors"}
    # ids are the annotation file's own (1-based position in COCO80 here), sorted
    assert [c.id for c in cats] == sorted(COCO80.index(c.name) + 1 for c in cats)
    assert m.split("train").images == coco_root / "train2017"


def test_missing_env_var_is_named_and_data_root_overrides(coco_root, monkeypatch):
    monkeypatch.delenv("COCO_ROOT", raising=False)
    with pytest.raises(ManifestError) as e:
        load_manifest(REPO / "data_manifests/coco_ovd.yaml")
    assert "COCO_ROOT is not set" in one_line(e)
    m = load_manifest(REPO / "data_manifests/coco_ovd.yaml", data_root=coco_root)
    assert m.root == coco_root


def test_missing_annotation_file_and_image_folder(tmp_path, coco_root):
    (coco_root / "annotations/instances_val2017.json").unlink()
    m = load_manifest(tiny(tmp_path, coco_root))
    with pytest.raises(ManifestError) as e:
        m.check_files()
    assert f"{coco_root}/annotations/instances_val2017.json is missing" in one_line(e)
    with pytest.raises(ManifestError):
        m.categories()  # reads the val file, so the same error
    coco_json(coco_root / "annotations/instances_val2017.json", COCO80)
    (coco_root / "train2017").rmdir()
    with pytest.raises(ManifestError) as e:
        load_manifest(tiny(tmp_path, coco_root)).check_files()
    assert "split 'train': image folder" in one_line(e)
    assert str(coco_root / "train2017") in str(e.value)


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError) as e:
        load_manifest(tmp_path / "nope.yaml")
    assert "nope.yaml: manifest file not found" in one_line(e)


def test_unknown_category_names_category_and_file(tmp_path, coco_root):
    m = load_manifest(tiny(tmp_path, coco_root, novel="cat, unicorn"))
    with pytest.raises(ManifestError) as e:
        m.categories()
    msg = one_line(e)
    assert "unknown novel category 'unicorn'" in msg and "instances_val2017.json" in msg


def test_overlapping_vocabulary_split(tmp_path, coco_root):
    with pytest.raises(ManifestError) as e:
        load_manifest(tiny(tmp_path, coco_root, base="person, cat", novel="cat, dog"))
    assert "['cat'] are in both base and novel" in one_line(e)


def test_duplicate_and_malformed_vocabulary(tmp_path, coco_root):
    with pytest.raises(ManifestError) as e:
        load_manifest(tiny(tmp_path, coco_root, base="person, person"))
    assert "base lists ['person'] more than once" in one_line(e)
    path = write_yaml(tmp_path / "bad.yaml",
                      TINY.format(root=coco_root, base="x", novel="y").replace(
                          "base: [x]", "base: person"))
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    assert "vocabulary.base must be a list" in one_line(e)


def test_two_splits_sharing_one_annotation_file(tmp_path, coco_root):
    text = TINY.format(root=coco_root, base="person", novel="cat").replace(
        "annotations/instances_val2017.json", "annotations/instances_train2017.json")
    with pytest.raises(ManifestError) as e:
        load_manifest(write_yaml(tmp_path / "same.yaml", text))
    assert "splits 'train' and 'val' use the same annotation file" in one_line(e)


def test_unknown_format_and_missing_keys(tmp_path, coco_root):
    text = TINY.format(root=coco_root, base="person", novel="cat")
    with pytest.raises(ManifestError) as e:
        load_manifest(write_yaml(tmp_path / "a.yaml", text.replace("format: coco",
                                                                   "format: voc")))
    assert "format must be one of" in one_line(e)
    with pytest.raises(ManifestError) as e:
        load_manifest(write_yaml(tmp_path / "b.yaml", text.replace("name: tiny\n", "")))
    assert "missing required key 'name'" in one_line(e)


LVIS_CATS = [  # (name, frequency)
    ("aerosol_can", "c"), ("apple", "f"), ("armoire", "r"), ("banana", "f"),
    ("bagpipe", "r"), ("ball", "f"), ("bamboo", "c"),
]


def lvis_root(tmp_path: Path) -> Path:
    root = tmp_path / "lvis"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        cats = [{"id": i + 1, "name": n, "frequency": f, "synonyms": [n]}
                for i, (n, f) in enumerate(LVIS_CATS)]
        (root / f"annotations/lvis_v1_{split}.json").write_text(json.dumps(
            {"images": [], "annotations": [], "categories": cats}))
    return root


def test_lvis_frequency_split(tmp_path, monkeypatch):
    root = lvis_root(tmp_path)
    monkeypatch.setenv("LVIS_ROOT", str(root))
    m = load_manifest(REPO / "data_manifests/lvis_v1.yaml")
    m.check_files()
    cats = m.categories()
    assert m.format == "lvis"
    assert [(c.id, c.split) for c in cats] == [
        (i + 1, "novel" if f == "r" else "base") for i, (_, f) in enumerate(LVIS_CATS)]
    assert cats[0].synonyms == ("aerosol_can",)


def test_lvis_frequency_errors(tmp_path):
    root = lvis_root(tmp_path)
    text = (REPO / "data_manifests/lvis_v1.yaml").read_text().replace("${LVIS_ROOT}", str(root))
    bad = write_yaml(tmp_path / "overlap.yaml", text.replace("novel: [r]", "novel: [r, c]"))
    with pytest.raises(ManifestError) as e:
        load_manifest(bad)
    assert "frequencies ['c'] are both base and novel" in one_line(e)
    bad = write_yaml(tmp_path / "unknown.yaml", text.replace("novel: [r]", "novel: [rare]"))
    with pytest.raises(ManifestError) as e:
        load_manifest(bad)
    assert "unknown frequencies ['rare']" in one_line(e)
    # a COCO-format file has no frequency field
    coco_json(root / "annotations/lvis_v1_val.json", ["apple"])
    with pytest.raises(ManifestError) as e:
        load_manifest(write_yaml(tmp_path / "ok.yaml", text)).categories()
    assert "category 'apple' has no 'frequency' field" in one_line(e)


def test_categories_reread_when_the_file_changes(tmp_path, coco_root):
    m = load_manifest(tiny(tmp_path, coco_root))
    assert [c.id for c in m.categories()] == [1, 3, 16]
    reordered = ["cat", "car"] + [n for n in COCO80 if n not in ("cat", "car")]
    path = coco_json(coco_root / "annotations/instances_val2017.json", reordered)
    os.utime(path, ns=(1, 1))  # a different mtime, whatever the clock resolution
    assert [(c.name, c.id) for c in m.categories()] == [("cat", 1), ("car", 2),
                                                        ("person", 3)]


def test_image_file_for_coco_and_lvis_records():
    assert image_file({"id": 1, "file_name": "000000000139.jpg"}) == "000000000139.jpg"
    lvis = {"id": 2, "coco_url": "http://images.cocodataset.org/train2017/000000391895.jpg"}
    assert image_file(lvis) == "train2017/000000391895.jpg"
    with pytest.raises(ManifestError, match="neither file_name nor coco_url"):
        image_file({"id": 3})


def test_toy_manifest_vocabulary_and_root(tmp_path):
    m = load_manifest(REPO / "data_manifests/toy.yaml", cache_root=tmp_path)
    assert m.root == tmp_path / "toy/dataset"
    assert len(m.base) == 18 and len(m.novel) == 6 and not set(m.base) & set(m.novel)
    assert m.novel == ("red star", "green heart", "blue cross", "yellow triangle",
                       "green square", "blue circle")
    # 6 shapes x 4 colours, each shape novel exactly once
    shapes = [n.split()[1] for n in m.base + m.novel]
    assert sorted(set(shapes)) == ["circle", "cross", "heart", "square", "star", "triangle"]
    assert all(shapes.count(s) == 4 for s in set(shapes))
    assert sorted(n.split()[1] for n in m.novel) == sorted(set(shapes))
    assert m.synthetic["seed"] == 0
    with pytest.raises(ManifestError, match="uses {cache} but no cache root"):
        load_manifest(REPO / "data_manifests/toy.yaml")
