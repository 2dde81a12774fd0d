"""The synthetic generator and the `dataset` stage (synthetic and real manifests)."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from ovdistill.pipeline.manifests import ManifestError, load_manifest
from ovdistill.pipeline.runner import StageContext, StageError, make_config, run_stage
from ovdistill.stages import dataset, synthetic
from PIL import Image
from pycocotools.coco import COCO

REPO = Path(__file__).resolve().parents[1]
BASE = ["circle", "square", "triangle", "hexagon", "cross", "arrow", "pentagon", "diamond"]
NOVEL = ["star", "heart", "crescent", "ring"]
NAMES = BASE + NOVEL

TINY_TOY = """
name: toy
format: coco
root: "{{cache}}/toy/dataset"
splits:
  train: {{images: train, annotations: train.json}}
  val: {{images: val, annotations: val.json}}
vocabulary:
  base: [{base}]
  novel: [{novel}]
synthetic:
  seed: {seed}
  n_train: 6
  n_val: 3
  image_side: [96, 160]
  objects_per_image: [4, 6]
  object_size: [20, 48]
  n_captions: 7
  caption_size: 48
"""


def tiny_manifest(tmp_path: Path, seed: int = 3) -> Path:
    path = tmp_path / f"toy-{seed}.yaml"
    path.write_text(TINY_TOY.format(base=", ".join(BASE), novel=", ".join(NOVEL), seed=seed))
    return path


def run_dataset(manifest: Path, cache: Path, **overrides) -> tuple[StageContext, dict]:
    ds = load_manifest(manifest, cache_root=cache)
    ctx = StageContext(dataset=ds, cache=cache / ds.name)
    cfg = make_config(dataset, {"images_per_part": 4, "captions_per_part": 5, **overrides})
    return ctx, run_stage(dataset, ctx, cfg, distributor="local", progress=False,
                          log=lambda s: None)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    ctx, manifest = run_dataset(tiny_manifest(tmp), tmp / "cache")
    return ctx, manifest


# ----------------------------------------------------------------------------- generator


def test_every_shape_draws_and_ring_and_crescent_are_hollow():
    for name in synthetic.SHAPES:
        a = synthetic.shape_alpha(name, 40, 0.0)
        assert a.max() == pytest.approx(1.0) and 0.15 < (a >= 0.5).mean() < 0.95, name
    ring = synthetic.shape_alpha("ring", 60, 0.0)
    h, w = ring.shape
    assert ring[h // 2, w // 2] == 0.0 and ring[h // 2, 3] > 0.5
    assert synthetic.shape_alpha("circle", 60, 0.0)[h // 2, w // 2] == 1.0
    # a crescent covers clearly less than the disc it is cut from
    assert ((synthetic.shape_alpha("crescent", 60, 0.0) >= 0.5).sum()
            < 0.6 * (synthetic.shape_alpha("circle", 60, 0.0) >= 0.5).sum())
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        synthetic.shape_alpha("blob", 10, 0.0)


def test_colour_shape_categories_draw_in_their_colour_and_are_named_with_it():
    assert synthetic.category_parts("red circle") == ("circle", "red")
    assert synthetic.category_parts("circle") == ("circle", None)
    for bad in ("purple unicorn", "circle red", "red"):
        with pytest.raises(ValueError, match="unknown category"):
            synthetic.category_parts(bad)
    cats = ["red circle", "blue star", "yellow cross"]
    spec = synthetic.SyntheticSpec(objects_per_image=(4, 6))
    seen = set()
    for i in range(6):
        sc = synthetic.random_scene(np.random.default_rng(i), spec, cats)
        pixels = np.asarray(sc.image, np.float32)
        for o in sc.objects:
            _, colour = synthetic.category_parts(o.category)
            assert o.colour == colour
            # the visible pixels carry that colour (fill noise and shading are small)
            mean = pixels[o.mask].mean(0)
            assert np.abs(mean - synthetic.COLOURS[colour]).sum() < 60, (o.category, mean)
            seen.add(o.category)
    assert seen == set(cats)
    for i in range(40):
        _, text = synthetic.caption_sample(np.random.default_rng(i), cats, colour_prob=1.0)
        assert any(c in text for c in cats), text
        assert "red red" not in text and "blue blue" not in text


def scene(seed: int, index: int = 0):
    spec = synthetic.SyntheticSpec(seed=seed)
    return synthetic.random_scene(dataset.item_rng(seed, "train", index), spec, NAMES)


def test_same_seed_same_pixels_other_seed_other_pixels():
    for i in range(3):
        a, b = scene(7, i), scene(7, i)
        assert a.image.tobytes() == b.image.tobytes()
        assert [(o.category, o.box) for o in a.objects] == [(o.category, o.box)
                                                            for o in b.objects]
    assert scene(7).image.tobytes() != scene(8).image.tobytes()
    c1 = synthetic.caption_sample(dataset.item_rng(1, "captions", 5), NAMES)
    c2 = synthetic.caption_sample(dataset.item_rng(1, "captions", 5), NAMES)
    assert c1[0].tobytes() == c2[0].tobytes() and c1[1] == c2[1]


def test_boxes_are_tight_inside_the_image_and_objects_stay_visible():
    spec = synthetic.SyntheticSpec(seed=0)
    n_objects = []
    for i in range(25):
        sc = synthetic.random_scene(dataset.item_rng(0, "val", i), spec, NAMES)
        w, h = sc.image.size
        assert spec.image_side[0] <= min(w, h) and max(w, h) <= spec.image_side[1]
        n_objects.append(len(sc.objects))
        for o in sc.objects:
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            ys, xs = np.nonzero(o.mask)
            # the visible pixels lie in the box, and touch it on at least two sides
            assert xs.min() >= x1 and xs.max() + 1 <= x2 and ys.min() >= y1 and ys.max() + 1 <= y2
            touching = [xs.min() == x1, xs.max() + 1 == x2, ys.min() == y1, ys.max() + 1 == y2]
            assert sum(touching) >= 2
            assert o.area == int(o.mask.sum()) > 0
            assert o.area >= synthetic.MIN_VISIBLE * o.full_area
    assert min(n_objects) >= 1 and max(n_objects) <= 6 and np.mean(n_objects) > 2.5


def test_caption_sample_mentions_its_category():
    seen = set()
    for i in range(60):
        image, title = synthetic.caption_sample(dataset.item_rng(2, "captions", i), NAMES, 64)
        assert image.size == (64, 64) and image.mode == "RGB"
        said = {n for n in NAMES if n in title}
        assert said, title
        seen |= said
    assert seen == set(NAMES)


def test_caption_colour_prob_sets_how_often_captions_name_a_colour():
    def share(prob):
        titles = [synthetic.caption_sample(dataset.item_rng(3, "captions", i), NAMES, 32,
                                           colour_prob=prob)[1] for i in range(80)]
        return sum(any(c in t.split() for c in synthetic.COLOURS) for t in titles) / len(titles)

    assert share(0.0) == 0.0
    # forms 4 and 5 of a crop caption never name a colour, so 1.0 stays below 1
    assert 0.6 < share(1.0) < 1.0
    assert synthetic.SyntheticSpec().caption_colour_prob == 0.0
    with pytest.raises(ValueError, match=r"caption_colour_prob must be in \[0, 1\]"):
        synthetic.SyntheticSpec.from_dict({"caption_colour_prob": 1.5})


def test_synthetic_spec_rejects_unknown_keys_and_bad_ranges():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_trian'\]"):
        synthetic.SyntheticSpec.from_dict({"n_trian": 3})
    with pytest.raises(ValueError, match="image_side must be"):
        synthetic.SyntheticSpec.from_dict({"image_side": [300, 100]})


# ----------------------------------------------------------------------------- stage


def test_stage_writes_exact_counts(built):
    ctx, manifest = built
    root = ctx.stage_dir("dataset")
    spec = dataset.synthetic_spec(ctx)
    assert manifest["n_parts"] == 2 + 1 + 2  # train 6/4, val 3/4, captions 7/5
    assert manifest["rows"] == 6 + 3 + 7

    # the generator's own full list, drawn again from the same per-image streams
    truth = {}
    for split, n in (("train", 6), ("val", 3)):
        for i in range(n):
            sc = synthetic.random_scene(dataset.item_rng(3, split, i), spec, NAMES)
            truth[dataset.image_id(spec, split, i)] = sc
    train = json.loads((root / "train.json").read_text())
    val = json.loads((root / "val.json").read_text())
    assert [im["id"] for im in train["images"]] == [1, 2, 3, 4, 5, 6]
    assert [im["id"] for im in val["images"]] == [7, 8, 9]
    assert [c["name"] for c in train["categories"]] == NAMES == [c["name"] for c in
                                                                 val["categories"]]
    assert [c["id"] for c in val["categories"]] == list(range(1, 13))

    n_base = sum(o.category in BASE for i in range(1, 7) for o in truth[i].objects)
    n_novel = sum(o.category in NOVEL for i in range(1, 7) for o in truth[i].objects)
    assert n_novel > 0, "seed 3 must put novel objects in the tiny train split"
    assert len(train["annotations"]) == n_base
    full = json.loads((root / "train_full.json").read_text())
    assert full["images"] == train["images"]
    assert sorted((a["image_id"], a["category_id"], a["bbox"][0]) for a in full["annotations"]) \
        == sorted((i, NAMES.index(o.category) + 1, o.box[0])
                  for i in range(1, 7) for o in truth[i].objects)
    assert [a["id"] for a in full["annotations"]] == list(range(1, n_base + n_novel + 1))
    assert manifest["files"]["train_full.json"] == sha(root / "train_full.json")
    assert {a["category_id"] for a in train["annotations"]} <= set(range(1, 9))
    assert len(val["annotations"]) == sum(len(truth[i].objects) for i in (7, 8, 9))

    for doc, ids in ((train, range(1, 7)), (val, (7, 8, 9))):
        for im in doc["images"]:
            sc = truth[im["id"]]
            path = root / ("train" if im["id"] <= 6 else "val") / im["file_name"]
            with Image.open(path) as f:
                assert f.size == (im["width"], im["height"]) == sc.image.size
        got = sorted((a["image_id"], a["category_id"], tuple(a["bbox"]))
                     for a in doc["annotations"])
        want = sorted((iid, NAMES.index(o.category) + 1,
                       (o.box[0], o.box[1], round(o.box[2] - o.box[0], 2),
                        round(o.box[3] - o.box[1], 2)))
                      for iid in ids for o in truth[iid].objects
                      if doc is val or o.category in BASE)
        assert got == want

    ann_ids = [a["id"] for a in train["annotations"] + val["annotations"]]
    assert ann_ids == list(range(1, len(ann_ids) + 1))

    with open(root / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["filepath"] for r in rows] == [f"captions/{i:06d}.jpg" for i in range(7)]
    for r in rows:
        assert (root / r["filepath"]).is_file() and r["title"]
        with Image.open(root / r["filepath"]) as f:
            assert f.size == (48, 48)

    counts = manifest["counts"]
    assert counts["images"] == {"train": 6, "val": 3}
    assert counts["boxes"] == {"train": n_base, "val": len(val["annotations"])}
    assert counts["unlabelled_novel_in_train"] == n_novel
    assert counts["captions"] == 7
    assert sum(counts["per_category"]["train"].values()) == n_base
    assert manifest["files"]["train.json"] == sha(root / "train.json")
    assert [c["split"] for c in manifest["categories"]] == ["base"] * 8 + ["novel"] * 4


def test_annotations_load_in_pycocotools_and_manifest_categories(built):
    ctx, _ = built
    coco = COCO(str(ctx.dataset.split("val").annotations))
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert int(coco.annToMask(ann).sum()) == ann["area"]
    cats = ctx.dataset.categories()
    assert [(c.id, c.name, c.split) for c in cats] == [
        (i + 1, n, "base" if n in BASE else "novel") for i, n in enumerate(NAMES)]


def test_same_seed_same_bytes_and_rerun_is_up_to_date(built, tmp_path):
    ctx, manifest = built
    # other part sizes: the images must not depend on how the work is cut
    ctx2, manifest2 = run_dataset(tiny_manifest(tmp_path), tmp_path / "cache",
                                  images_per_part=2, captions_per_part=3)
    a, b = ctx.stage_dir("dataset"), ctx2.stage_dir("dataset")
    for rel in ("train.json", "val.json", "captions.csv", "train/000001.jpg", "val/000009.jpg",
                "captions/000006.jpg"):
        assert sha(a / rel) == sha(b / rel), rel
    assert manifest["files"] == manifest2["files"]
    _, again = run_dataset(tiny_manifest(tmp_path), tmp_path / "cache",
                           images_per_part=2, captions_per_part=3)
    assert again["fingerprint"] == manifest2["fingerprint"]

    _, other = run_dataset(tiny_manifest(tmp_path, seed=4), tmp_path / "cache4")
    assert other["files"]["train.json"] != manifest["files"]["train.json"]
    assert other["fingerprint"] != manifest["fingerprint"]


def test_synthetic_root_must_be_the_stage_folder(tmp_path):
    text = tiny_manifest(tmp_path).read_text().replace("{cache}/toy/dataset", str(tmp_path / "x"))
    path = tmp_path / "elsewhere.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError, match="is written to its stage folder"):
        run_dataset(path, tmp_path / "cache")


def test_synthetic_unknown_shape_is_refused(tmp_path):
    text = tiny_manifest(tmp_path).read_text().replace("ring]", "ring, unicorn]")
    path = tmp_path / "unicorn.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError, match="unknown category 'unicorn'"):
        run_dataset(path, tmp_path / "cache")


# ----------------------------------------------------------------------------- real data

REAL = """
name: real
format: coco
root: {root}
splits:
  train: {{images: train2017, annotations: annotations/train.json}}
  val: {{images: val2017, annotations: annotations/val.json}}
vocabulary:
  base: [cat, dog]
  novel: [cow]
"""


def write_real(tmp_path: Path) -> Path:
    root = tmp_path / "real"
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 5, "name": "cow"},
            {"id": 7, "name": "kite"}]
    for split, n, anns in (("train", 3, [(1, 1), (1, 2), (2, 5), (3, 7)]),
                           ("val", 2, [(4, 5), (5, 1)])):
        (root / f"{split}2017").mkdir(parents=True)
        offset = 0 if split == "train" else 3
        images = [{"id": offset + i + 1, "file_name": f"{offset + i + 1:012d}.jpg",
                   "width": 32, "height": 24} for i in range(n)]
        for im in images:
            Image.new("RGB", (32, 24)).save(root / f"{split}2017" / im["file_name"])
        doc = {"images": images, "categories": cats, "annotations": [
            {"id": k + 1, "image_id": iid, "category_id": cid, "bbox": [1, 1, 5, 5],
             "area": 25, "iscrowd": 0} for k, (iid, cid) in enumerate(anns)]}
        (root / "annotations").mkdir(exist_ok=True)
        (root / f"annotations/{split}.json").write_text(json.dumps(doc))
    path = tmp_path / "real.yaml"
    path.write_text(REAL.format(root=root))
    return path


def test_real_manifest_is_checked_not_generated(tmp_path):
    manifest_path = write_real(tmp_path)
    ctx, manifest = run_dataset(manifest_path, tmp_path / "cache")
    root = ctx.dataset.root
    assert manifest["n_parts"] == 0 and manifest["rows"] == 0
    assert manifest["inputs"] == {"train.annotations": sha(root / "annotations/train.json"),
                                  "val.annotations": sha(root / "annotations/val.json")}
    assert manifest["counts"]["images"] == {"train": 3, "val": 2}
    assert manifest["counts"]["boxes"]["train"] == {"base": 2, "novel": 1, "other": 1}
    assert manifest["counts"]["boxes"]["val"] == {"base": 1, "novel": 1, "other": 0}
    assert manifest["n_base"] == 2 and manifest["n_novel"] == 1
    assert sorted(p.name for p in ctx.stage_dir("dataset").iterdir()) == [
        "_MANIFEST.json", "_PLAN.json"]

    # a changed annotation file changes the fingerprint the other stages depend on
    ann = root / "annotations/val.json"
    doc = json.loads(ann.read_text())
    doc["annotations"].pop()
    ann.write_text(json.dumps(doc))
    with pytest.raises(StageError, match="val.annotations"):
        run_dataset(manifest_path, tmp_path / "cache")


def test_real_manifest_missing_image_is_named(tmp_path):
    manifest_path = write_real(tmp_path)
    missing = tmp_path / "real/val2017/000000000005.jpg"
    missing.unlink()
    with pytest.raises(StageError) as e:
        run_dataset(manifest_path, tmp_path / "cache")
    assert f"image {missing} (image id 5) is missing" in str(e.value)
    assert "\n" not in str(e.value)


def test_real_manifest_unknown_category_fails_before_running(tmp_path):
    manifest_path = write_real(tmp_path)
    manifest_path.write_text(manifest_path.read_text().replace("[cow]", "[cow, yak]"))
    with pytest.raises(ManifestError, match="unknown novel category 'yak'"):
        run_dataset(manifest_path, tmp_path / "cache")
    assert not (tmp_path / "cache/real/dataset").exists()
