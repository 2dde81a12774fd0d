"""Image-text pairs (issue 16): the toy pair generator, the real-source listings (img2dataset
WebDataset output, CSV / Parquet) and the `pairs` stage end to end."""
from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ovdistill.pipeline import layout
from ovdistill.pipeline.errors import StageError, StageMismatch
from ovdistill.pipeline.manifests import ManifestError, load_manifest
from ovdistill.pipeline.pair_sources import (
    PAIRS_SCHEMA,
    list_table,
    list_webdataset,
    pair_image_bytes,
    pair_image_root,
    read_pairs,
    source_fingerprint,
)
from ovdistill.pipeline.runner import StageContext, make_config, run_stage
from ovdistill.stages import pairs, synthetic
from PIL import Image

BASE = ["red circle", "red square", "blue star", "green heart", "yellow cross", "circle"]
NOVEL = ["blue circle", "green cross", "ring", "cross"]
VOCAB = BASE + NOVEL
COUNTS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

SYNTHETIC = """
name: toypairs
format: coco
root: "{{cache}}/toypairs/dataset"
splits:
  train: {{images: train, annotations: train.json}}
vocabulary:
  base: [{base}]
  novel: [{novel}]
{pairs}
"""


def manifest(tmp_path: Path, pairs_block: str, name: str = "m") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SYNTHETIC.format(base=", ".join(BASE), novel=", ".join(NOVEL),
                                     pairs=pairs_block))
    return path


def run(path: Path, cache: Path, **overrides) -> tuple[StageContext, dict]:
    ds = load_manifest(path, cache_root=cache)
    ctx = StageContext(dataset=ds, cache=cache / ds.name)
    cfg = make_config(pairs, overrides)
    return ctx, run_stage(pairs, ctx, cfg, distributor="local", progress=False,
                          log=lambda s: None)


def mentioned(caption: str, vocabulary: list[str]) -> dict[str, list[tuple[str, str]]]:
    """{name: [(the word before it, "one" | "many"), ...]} by longest match, case-insensitive,
    whole words, singular or plural (a dictionary matcher's view of a caption)."""
    text, found = caption.lower(), {}
    for name in sorted(vocabulary, key=len, reverse=True):
        pattern = re.compile(rf"(\w+) ({re.escape(name)}|{re.escape(synthetic.plural(name))})\b")
        hits = [(m.group(1), "one" if m.group(2) == name else "many")
                for m in pattern.finditer(text)]
        if hits:
            found[name] = hits
            text = pattern.sub("#", text)
    return found


# ----------------------------------------------------------------------------- generator


def test_captions_name_only_scene_objects_at_least_one_with_counts_and_plurals():
    spec = synthetic.PairSpec()
    plurals = singles = joined = named_total = objects_total = 0
    for i in range(80):
        scene, caption, named = pairs.draw_pair(spec, VOCAB, i)
        assert len(named) == len(scene.objects) and any(named)
        w, h = scene.image.size
        assert 160 <= min(w, h) and max(w, h) <= 256
        assert 1 <= len(scene.objects) <= 6
        in_scene = {o.category for o in scene.objects}
        said = mentioned(caption, VOCAB)
        # exactly the flagged categories, each once, every one of them in the picture
        assert set(said) == {o.category for o, f in zip(scene.objects, named) if f}, caption
        assert set(said) <= in_scene and all(len(v) == 1 for v in said.values()), caption
        for name, [(before, form)] in said.items():
            k = sum(o.category == name for o in scene.objects)
            if k > 1:  # the true count, in words (or "some"), before the plural
                assert form == "many" and before in (COUNTS[k], "some"), caption
                plurals += 1
            else:  # an article or "one" (a colour may stand between for a shape-only name)
                assert form == "one" and (before in ("a", "an", "the", "one")
                                          or before in synthetic.COLOURS), caption
                singles += 1
        joined += " next to " in caption or " and " in caption or " with " in caption
        named_total += sum(named)
        objects_total += len(named)
    assert plurals >= 10 and singles >= 40 and joined >= 40
    # categories are named with probability 0.7: most objects, not all
    assert 0.6 < named_total / objects_total < 0.9


def test_generator_is_deterministic_and_varied():
    spec = synthetic.PairSpec(seed=5)
    for i in range(3):
        a, b = pairs.draw_pair(spec, VOCAB, i), pairs.draw_pair(spec, VOCAB, i)
        assert a[0].image.tobytes() == b[0].image.tobytes() and a[1:] == b[1:]
    other = pairs.draw_pair(synthetic.PairSpec(seed=6), VOCAB, 0)
    assert other[0].image.tobytes() != pairs.draw_pair(spec, VOCAB, 0)[0].image.tobytes()
    captions = [pairs.draw_pair(spec, VOCAB, i)[1] for i in range(60)]
    assert len(set(captions)) == 60
    starts = {" ".join(c.lower().split()[:2]) for c in captions}
    assert {"a photo", "an image", "a picture", "a drawing"} <= starts
    assert any("background" in c for c in captions)
    # the pair stream (split code 3) is not a detection stream
    det = synthetic.random_scene(np.random.default_rng([5, 0, 0]), synthetic.SyntheticSpec(),
                                 VOCAB)
    assert det.image.tobytes() != pairs.draw_pair(spec, VOCAB, 0)[0].image.tobytes()


def test_pair_spec_validation():
    assert synthetic.PairSpec.from_dict({"n_images": 12, "image_side": [96, 128]}) == \
        synthetic.PairSpec(n_images=12, image_side=(96, 128))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_image'\]"):
        synthetic.PairSpec.from_dict({"n_image": 3})
    with pytest.raises(ValueError, match=r"object_size must be \[min, max\]"):
        synthetic.PairSpec.from_dict({"object_size": [50, 10]})
    with pytest.raises(ValueError, match=r"name_prob must be in \(0, 1\]"):
        synthetic.PairSpec.from_dict({"name_prob": 0})
    with pytest.raises(ValueError, match="n_images must be >= 1 and seed >= 0, got 0 and 0"):
        synthetic.PairSpec.from_dict({"n_images": 0})
    with pytest.raises(TypeError, match="n_images must be an integer, got '12'"):
        synthetic.PairSpec.from_dict({"n_images": "12"})


# ----------------------------------------------------------------------------- stage: generated

TINY = """pairs:
  synthetic: {n_images: 12, seed: 4, image_side: [96, 128], object_size: [20, 48]}
"""


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    ctx, m = run(manifest(tmp, TINY), tmp / "cache", images_per_part=5)
    return ctx, m


def test_generated_stage_rows_images_and_records(generated):
    ctx, m = generated
    assert m["n_parts"] == 3 and m["rows"] == m["pairs"] == 12 and m["rejects"] == 0
    t = read_pairs(ctx.files)
    assert t.schema == PAIRS_SCHEMA
    assert t["image_id"].to_pylist() == list(range(1, 13))
    assert t["file"].to_pylist() == [f"images/{i:06d}.jpg" for i in range(1, 13)]
    assert set(t["offset"].to_pylist()) == set(t["size"].to_pylist()) == {-1}
    root = pair_image_root(ctx.dataset, ctx.files)
    assert root == ctx.stage_dir(layout.PAIRS)
    spec = pairs.pair_spec(ctx)
    records = [r for k in range(3)
               for r in json.loads(layout.part_file(root, k, ".json").read_text())]
    named = {"base": 0, "novel": 0}
    for row, rec in zip(t.to_pylist(), records):
        image = Image.open(io.BytesIO(pair_image_bytes(root, row["file"])))
        assert image.size == (row["width"], row["height"]) == (rec["width"], rec["height"])
        assert 96 <= min(image.size) and max(image.size) <= 128
        assert rec["caption"] == row["caption"]
        # the record is the generator's own draw of that image
        scene, caption, flags = pairs.draw_pair(spec, VOCAB, row["image_id"] - 1)
        assert caption == row["caption"]
        assert [(o["category"], o["named"]) for o in rec["objects"]] == \
            [(o.category, f) for o, f in zip(scene.objects, flags)]
        for o in rec["objects"]:
            named["base" if o["category"] in BASE else "novel"] += o["named"]
    report = m["named_objects"]
    assert {k: v["named"] for k, v in report.items()} == named
    assert report["novel"]["named"] > 0 and report["base"]["named"] > 0
    words = [len(c.split()) for c in t["caption"].to_pylist()]
    assert m["caption_words"] == {"min": min(words), "mean": round(float(np.mean(words)), 2),
                                  "median": float(np.median(words)), "max": max(words)}


def test_generated_output_does_not_depend_on_part_size(generated, tmp_path):
    ctx, _ = generated
    other, m = run(manifest(tmp_path, TINY), tmp_path / "cache", images_per_part=12)
    assert m["n_parts"] == 1
    assert read_pairs(other.files).equals(read_pairs(ctx.files))
    for i in range(1, 13):
        name = f"images/{i:06d}.jpg"
        assert (other.stage_dir("pairs") / name).read_bytes() == \
            (ctx.stage_dir("pairs") / name).read_bytes()


def test_generated_pairs_need_drawable_names(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(SYNTHETIC.format(base="person", novel="dog", pairs=TINY))
    with pytest.raises(ManifestError, match="pairs.synthetic: unknown category 'person'"):
        run(path, tmp_path / "cache")
    path.write_text(SYNTHETIC.format(base="circle", novel="star",
                                     pairs="pairs: {synthetic: {n_images: 3, seed: x1}}"))
    with pytest.raises(ManifestError, match="pairs.synthetic: seed must be an integer"):
        run(path, tmp_path / "cache")


def test_no_pairs_block_plans_nothing_and_says_zero(tmp_path):
    ctx, m = run(manifest(tmp_path, ""), tmp_path / "cache")
    assert m["n_parts"] == 0 and m["rows"] == 0 and m["pairs"] == 0
    assert read_pairs(ctx.files).num_rows == 0


# ----------------------------------------------------------------------------- real sources

REAL = """
name: real
format: coco
root: {root}
splits:
  train: {{images: coco/train2017, annotations: coco/train.json}}
vocabulary:
  base: [dog]
  novel: [cat]
pairs:
{pairs}
"""


def jpeg(size=(40, 30), colour=(200, 30, 30), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    """img2dataset-style output in two .tar files: 5 keys, one corrupt image, one key without
    its .txt (keys with .json members as img2dataset writes them)."""
    folder = tmp_path / "cc" / "shards"
    folder.mkdir(parents=True)
    images = {"000": jpeg((40, 30)), "001": jpeg((25, 50), fmt="PNG"),
              "002": b"\xff\xd8\xff\xe0 not really a jpeg",
              "100": jpeg((32, 32)), "101": jpeg((64, 16), (0, 0, 200))}
    captions = {"000": "a dog", "001": "  two cats on a sofa\n", "002": "a broken one",
                "101": "a red bus"}
    with tarfile.open(folder / "00000.tar", "w") as tf:
        for key in ("000", "001", "002"):
            ext = "png" if key == "001" else "jpg"
            add(tf, f"{key}.{ext}", images[key])
            add(tf, f"{key}.txt", captions[key].encode())
            add(tf, f"{key}.json", json.dumps({"key": key}).encode())
    with tarfile.open(folder / "00001.tar", "w") as tf:
        add(tf, "100.jpg", images["100"])
        add(tf, "100.json", b"{}")
        add(tf, "101.txt", captions["101"].encode())  # caption first: order does not matter
        add(tf, "101.jpg", images["101"])
    return folder, images


def real_manifest(tmp_path: Path, block: str) -> Path:
    path = tmp_path / "real.yaml"
    path.write_text(REAL.format(root=tmp_path, pairs=block))
    return path


def test_webdataset_listing_locates_each_member(shards):
    folder, images = shards
    entries = list_webdataset(folder)
    assert [(e.image_id, e.file, e.where) for e in entries] == [
        (1, "00000.tar", "00000.tar:000"), (2, "00000.tar", "00000.tar:001"),
        (3, "00000.tar", "00000.tar:002"), (4, "00001.tar", "00001.tar:100"),
        (5, "00001.tar", "00001.tar:101")]
    assert [e.caption for e in entries] == ["a dog", "two cats on a sofa", "a broken one", None,
                                            "a red bus"]
    assert [e.problem for e in entries] == [None, None, None, "no .txt caption member", None]
    for e, key in zip(entries, ("000", "001", "002", "100", "101")):
        assert pair_image_bytes(folder, e.file, e.offset, e.size) == images[key]
    # one .tar as the source: the same entries for its keys, relative to its folder
    single = list_webdataset(folder / "00001.tar")
    assert [(e.file, e.offset, e.size) for e in single] == \
        [(e.file, e.offset, e.size) for e in entries[3:]]


def test_webdataset_stage_rows_and_rejects(shards, tmp_path):
    folder, images = shards
    path = real_manifest(tmp_path, "  format: webdataset\n  path: cc/shards\n")
    ctx, m = run(path, tmp_path / "cache", images_per_part=2)
    assert m["n_parts"] == 3 and m["rows"] == m["pairs"] == 3 and m["rejects"] == 2
    assert m["format"] == "webdataset"
    t = read_pairs(ctx.files).to_pylist()
    assert [(r["image_id"], r["caption"], r["file"], r["width"], r["height"]) for r in t] == [
        (1, "a dog", "00000.tar", 40, 30), (2, "two cats on a sofa", "00000.tar", 25, 50),
        (5, "a red bus", "00001.tar", 64, 16)]
    root = pair_image_root(ctx.dataset, ctx.files)
    assert root == folder
    assert [pair_image_bytes(root, r["file"], r["offset"], r["size"]) for r in t] == \
        [images["000"], images["001"], images["101"]]
    rejects = [r for k in range(3) for r in json.loads(
        layout.stats_file(ctx.stage_dir("pairs"), layout.part_stem(k)).read_text())["rejects"]]
    assert [(r["item"], r["file"]) for r in rejects] == [(3, "00000.tar"), (4, "00001.tar")]
    assert rejects[0]["reason"].startswith("00000.tar:002: corrupt or truncated image (")
    assert rejects[1]["reason"] == "00001.tar:100: no .txt caption member"
    assert all("\n" not in r["reason"] for r in rejects)
    # words per kept caption: 2, 5, 3
    assert m["caption_words"] == {"min": 2, "mean": 3.33, "median": 3.0, "max": 5}
    assert "named_objects" not in m


def test_webdataset_fingerprint_follows_the_tars_and_bad_tars_are_named(shards, tmp_path):
    folder, _ = shards
    path = real_manifest(tmp_path, "  format: webdataset\n  path: cc/shards\n")
    src = load_manifest(path).pairs
    before = source_fingerprint(src)
    with tarfile.open(folder / "00001.tar", "a") as tf:  # tar pads to 10 KiB records
        add(tf, "102.jpg", np.random.default_rng(0).bytes(20000))
    changed = source_fingerprint(src)
    assert changed != before
    with tarfile.open(folder / "00003.tar", "w") as tf:
        add(tf, "300.txt", b"more")
    assert source_fingerprint(src) not in (before, changed)
    (folder / "00002.tar").write_bytes(b"\x1f\x8b gzip, not a tar" * 40)
    with pytest.raises(StageError, match=r"00002.tar: not a readable uncompressed \.tar"):
        list_webdataset(folder)
    with pytest.raises(StageError, match=r"pairs source .*nowhere is missing"):
        list_webdataset(tmp_path / "nowhere")


@pytest.fixture
def table_source(tmp_path):
    images = tmp_path / "cc" / "images"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(jpeg((20, 10)))
    (images / "sub").mkdir()
    (images / "sub" / "b.png").write_bytes(jpeg((12, 14), fmt="PNG"))
    (tmp_path / "outside.jpg").write_bytes(jpeg())
    (images / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    rows = [("a.jpg", "a dog on grass"), ("../outside.jpg", "escapes"),
            ("sub/b.png", "a cat"), ("missing.jpg", "gone"), ("a.jpg", "   "),
            (str(tmp_path / "outside.jpg"), "absolute"), ("link.jpg", "a link out")]
    return images, rows


def test_csv_source_rows_refusals_and_rejects(table_source, tmp_path):
    images, rows = table_source
    with open(tmp_path / "cc" / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "filepath", "title"])
        w.writerows([("http://x", p, c) for p, c in rows])
    block = ("  format: csv\n  path: cc/pairs.csv\n  images: cc/images\n"
             "  image_column: filepath\n  caption_column: title\n")
    ctx, m = run(real_manifest(tmp_path, block), tmp_path / "cache", images_per_part=3)
    t = read_pairs(ctx.files).to_pylist()
    assert [(r["image_id"], r["file"], r["caption"], r["offset"], r["width"], r["height"])
            for r in t] == [(1, "a.jpg", "a dog on grass", -1, 20, 10),
                            (3, "sub/b.png", "a cat", -1, 12, 14)]
    assert pair_image_root(ctx.dataset, ctx.files) == images
    rejects = {r["item"]: r["reason"] for k in range(3) for r in json.loads(
        layout.stats_file(ctx.stage_dir("pairs"), layout.part_stem(k)).read_text())["rejects"]}
    assert sorted(rejects) == [2, 4, 5, 6, 7] and m["rejects"] == 5
    assert rejects[2] == ("pairs.csv row 2: image path '../outside.jpg' is absolute or has '..' "
                          "parts; refused (files must stay inside the pairs image folder)")
    assert rejects[6].startswith(f"pairs.csv row 6: image path '{tmp_path}/outside.jpg' is "
                                 f"absolute")
    assert rejects[4].startswith("pairs.csv row 4: cannot read missing.jpg (No such file")
    assert rejects[5] == "pairs.csv row 5: empty caption"
    assert "resolves outside" in rejects[7] and "refused" in rejects[7]
    assert all("\n" not in r for r in rejects.values())

    # a changed table is another input: refused, not mixed
    with open(tmp_path / "cc" / "pairs.csv", "a") as f:
        f.write("http://y,a.jpg,one more\n")
    with pytest.raises(StageMismatch, match="inputs.source"):
        run(real_manifest(tmp_path, block), tmp_path / "cache", images_per_part=3)


def test_parquet_source_and_missing_columns(table_source, tmp_path):
    images, rows = table_source
    pq.write_table(pa.table({"image": [p for p, _ in rows[:3]],
                             "caption": [c for _, c in rows[:2]] + [None]}),
                   images / "pairs.parquet")
    entries = list_table(images / "pairs.parquet", "parquet")
    assert [(e.image_id, e.file, e.caption, e.problem is None) for e in entries] == [
        (1, "a.jpg", "a dog on grass", True), (2, "../outside.jpg", "escapes", False),
        (3, "sub/b.png", None, True)]
    ctx, m = run(real_manifest(tmp_path, "  format: parquet\n  path: cc/images/pairs.parquet\n"),
                 tmp_path / "cache")
    assert pair_image_root(ctx.dataset, ctx.files) == images  # default: the table's folder
    assert m["pairs"] == 1 and m["rejects"] == 2
    reasons = json.loads(layout.stats_file(ctx.stage_dir("pairs"), "part-00000").read_text())
    assert reasons["rejects"][1]["reason"] == "pairs.parquet row 3: no caption"
    with pytest.raises(StageError, match=r"pairs.parquet: no column 'text' \(columns: "
                                         r"\['image'\]\); set pairs.image_column"):
        list_table(images / "pairs.parquet", "parquet", caption_column="text")
    (tmp_path / "p.csv").write_text("image,caption\na.jpg,x\n")
    with pytest.raises(StageError, match=r"p.csv: no column 'file'"):
        list_table(tmp_path / "p.csv", "csv", image_column="file")
    with pytest.raises(StageError, match=r"pairs source .*none.csv is missing"):
        list_table(tmp_path / "none.csv", "csv")


# ----------------------------------------------------------------------------- manifest


@pytest.mark.parametrize("block, message", [
    ("  format: zip\n  path: x", (r"pairs.format must be one of \('webdataset', 'csv', "
                                  r"'parquet'\) \(or give pairs.synthetic\), got 'zip'")),
    ("  format: csv", "pairs.path is required for format csv"),
    ("  format: webdataset\n  path: s\n  images: i", "pairs.images is for csv / parquet"),
    ("  synthetic: {n_images: 3}\n  path: s", r"generated pairs take no \['path'\]"),
    ("  format: csv\n  path: x.csv\n  image_col: f", r"unknown key\(s\) \['image_col'\]"),
    ("  - a list", "pairs must be a mapping"),
])
def test_bad_pairs_blocks_are_one_line_errors(tmp_path, block, message):
    with pytest.raises(ManifestError, match=message) as e:
        load_manifest(real_manifest(tmp_path, block))
    assert "\n" not in str(e.value) and str(tmp_path / "real.yaml") in str(e.value)


def test_the_cc3m_example_manifest_parses(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    m = load_manifest(repo / "data_manifests" / "cc3m_pairs.yaml", data_root=tmp_path)
    assert m.pairs.format == "webdataset" and m.pairs.path == tmp_path / "cc3m" / "shards"
    assert len(m.base) == 48 and len(m.novel) == 17
