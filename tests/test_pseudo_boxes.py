"""GLIP's pseudo-grounding from the cache: `phrase_spans` on hand captions, pseudo-box
selection on planted embeddings (hand-made pair_regions / phrases parts behind fake finished
upstream manifests), the threshold rule, the precision report against hand-written pair
records, the MDETR json read back by `load_grounding`, and stage pair_regions on a tiny pair
set with a tiny teacher giving the regions path's embeddings."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ovdistill.pipeline import layout
from ovdistill.pipeline.cache import atomic_write_json, read_json
from ovdistill.pipeline.clip_teacher import load_teacher
from ovdistill.pipeline.grounding import load_grounding
from ovdistill.pipeline.images import load_rgb
from ovdistill.pipeline.layout import DatasetCache
from ovdistill.pipeline.manifests import Category, load_manifest
from ovdistill.pipeline.pair_sources import PAIRS_SCHEMA
from ovdistill.pipeline.phrases import (
    ConceptDictionary,
    extract_phrases,
    phrase_spans,
)
from ovdistill.pipeline.propose import SCHEMA as PROPOSALS_SCHEMA
from ovdistill.pipeline.region_embedding import embed_regions
from ovdistill.pipeline.runner import StageContext, make_config, run_stage
from ovdistill.stages import pair_regions, pseudo_boxes
from ovdistill.stages.pseudo_boxes import (
    best_matches,
    keep_mask,
    precision_report,
    recorded_root,
    text_spans,
)

from tests.test_regions import (
    TINY_CONFIG,
    make_teacher_files,
    random_boxes,
    reference_embedding,
    textured_image,
    write_teacher_manifest,
)

DIM = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads can run 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- phrase_spans


def dictionary() -> ConceptDictionary:
    cats = [Category(1, "circle", "base"), Category(2, "red star", "base"),
            Category(3, "star", "novel"), Category(4, "box", "base", ("crate",)),
            Category(5, "berry", "novel")]
    return ConceptDictionary.build(cats, ["traffic light"])


@pytest.mark.parametrize("caption, want", [
    ("a circle and two Stars", [("circle", "circle"), ("star", "Stars")]),
    ("two Red  Stars beside a star", [("red star", "Red  Stars"), ("star", "star")]),
    ("boxes, crates and berries; a starfish", [("box", "boxes"), ("box", "crates"),
                                               ("berry", "berries")]),
    ("Traffic-lights near a circle, another CIRCLE.", [("traffic light", "Traffic-lights"),
                                                       ("circle", "circle"),
                                                       ("circle", "CIRCLE")]),
    ("nothing here", []),
])
def test_phrase_spans_point_at_the_matched_text(caption, want):
    spans = phrase_spans(caption, dictionary())
    assert [(name, caption[s:e]) for name, s, e in spans] == want
    assert [s for _, s, _ in spans] == sorted(s for _, s, _ in spans)


def test_phrase_spans_count_what_extract_phrases_counts():
    d = dictionary()
    rng = np.random.default_rng(0)
    vocab = ["a", "red", "star", "stars", "Circle", "box", "boxes", "crate", "berry",
             "berries", "traffic", "light", "lights", "starfish", "İ", ",", "-", "  "]
    for _ in range(300):
        caption = " ".join(rng.choice(vocab, rng.integers(0, 12)))
        spans = phrase_spans(caption, d)
        counts: dict[str, int] = {}
        for name, s, e in spans:
            counts[name] = counts.get(name, 0) + 1
            assert d.canonical(caption[s:e]) == name, (caption, caption[s:e])
        assert list(counts.items()) == [(n, k) for n, k in extract_phrases(caption, d)]


def test_text_spans_for_a_phrase_outside_the_dictionary():
    caption = "A Blue-Berry pie, blue berry jam and bluebird"
    assert [caption[s:e] for s, e in text_spans(caption, "blue berry")] == \
        ["Blue-Berry", "blue berry"]
    assert [caption[s:e] for s, e in text_spans(caption, "blue")] == ["Blue", "blue"]
    assert text_spans(caption, "") == [] and text_spans(caption, "red") == []


# ----------------------------------------------------------------------------- pure selection


def test_best_matches_takes_the_highest_cosine_first_on_ties():
    regions = np.array([[1, 0, 0], [0, 2, 0], [0, 2, 0], [1, 1, 0]], np.float32)
    phrases = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], np.float32)
    index, cos = best_matches(regions, phrases)
    assert index.tolist() == [1, 0, 0]
    assert np.allclose(cos, [1, 1, 0])


def test_keep_mask_fixed_threshold_and_the_fraction_rule():
    scores = np.array([0.2, 0.9, 0.5, 0.5, 0.7], np.float32)
    mask, t = keep_mask(scores, 0.5, 0.5)
    assert mask.tolist() == [False, True, True, True, True] and t == 0.5
    mask, t = keep_mask(scores, None, 0.5)  # ceil(2.5) = 3: 0.9, 0.7, the first 0.5
    assert mask.tolist() == [False, True, True, False, True] and t == pytest.approx(0.5)
    mask, t = keep_mask(scores, None, 0.4)  # exactly 2
    assert mask.tolist() == [False, True, False, False, True] and t == pytest.approx(0.7)
    assert keep_mask(scores, None, 1.0)[0].all()
    mask, t = keep_mask(np.zeros(0, np.float32), None, 0.5)
    assert mask.tolist() == [] and t is None


def test_precision_report_on_hand_records():
    records = {1: [{"category": "circle", "box": [0, 0, 10, 10]},
                   {"category": "star", "box": [20, 20, 30, 30]}],
               2: [{"category": "star", "box": [0, 0, 10, 10]}]}
    splits = {"circle": "base", "star": "novel"}
    boxes = [(1, "circle", [0, 0, 10, 8]),  # IoU 0.8: correct
             (1, "star", [0, 0, 10, 10]),  # the circle's box: wrong
             (2, "star", [5, 0, 15, 10]),  # IoU 1/3: wrong
             (2, "circle", [0, 0, 10, 10]),  # no circle in image 2: wrong
             (1, "blue berry", [0, 0, 10, 10])]  # not a category: not judged
    r = precision_report(boxes, records, splits, iou=0.5)
    assert r == {"judged": 4, "correct": 1, "precision": 0.25,
                 "by_split": {"base": {"judged": 2, "correct": 1, "precision": 0.5},
                              "novel": {"judged": 2, "correct": 0, "precision": 0.0}}}
    assert precision_report(boxes, records, splits, iou=0.3)["correct"] == 2
    assert precision_report([], records, splits)["precision"] is None


# ----------------------------------------------------------------------------- planted stage


def make_ctx(tmp: Path, pairs: dict | None) -> StageContext:
    """A manifest with an empty detection dataset (circle base, star novel)."""
    data = tmp / "data"
    cats = [{"id": 1, "name": "circle"}, {"id": 2, "name": "star"}]
    for split in ("train", "val"):
        (data / split).mkdir(parents=True, exist_ok=True)
        (data / f"{split}.json").write_text(json.dumps(
            {"images": [], "annotations": [], "categories": cats}))
    doc = {"name": "tiny", "format": "coco", "root": str(data),
           "splits": {"train": {"images": "train", "annotations": "train.json"},
                      "val": {"images": "val", "annotations": "val.json"}},
           "vocabulary": {"base": ["circle"], "novel": ["star"]}}
    if pairs is not None:
        doc["pairs"] = pairs
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return StageContext(load_manifest(path), tmp / "cache" / "tiny", device="cpu")


def fake_finished(ctx: StageContext, stage: str, **extra) -> None:
    atomic_write_json(DatasetCache(ctx.cache).manifest_path(stage),
                      {"stage": stage, "fingerprint": f"{stage}-fp", **extra})


def run(stage, ctx, **overrides):
    return run_stage(stage, ctx, make_config(stage, overrides), distributor="local",
                     rebuild=True, progress=False, log=lambda s: None)


def unit(*pairs: tuple[int, float]) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    for i, x in pairs:
        v[i] = x
    return v / np.linalg.norm(v)


def regions_table(rows: list[tuple[int, list[tuple[list[float], np.ndarray]]]]) -> pa.Table:
    """pair_regions rows: per image [(box, embedding)] in rank order."""
    out = {"image_id": [], "rank": [], "box": [], "score": [], "embedding": []}
    for iid, items in rows:
        for r, (box, emb) in enumerate(items):
            out["image_id"].append(iid)
            out["rank"].append(r)
            out["box"].append(box)
            out["score"].append(1.0 - r / 10)
            out["embedding"].append(emb.astype(np.float16).tolist())
    schema = PROPOSALS_SCHEMA.append(pa.field("embedding", pa.list_(pa.float16(), DIM)))
    return pa.table(out, schema=schema)


def phrases_rows(rows: list[tuple[int, list[str], list[np.ndarray]]]) -> pa.Table:
    return pa.table({
        "image_id": pa.array([i for i, _, _ in rows], pa.int64()),
        "phrases": pa.array([p for _, p, _ in rows], pa.list_(pa.string())),
        "counts": pa.array([[1] * len(p) for _, p, _ in rows], pa.list_(pa.int32())),
        "phrase_emb": pa.array([[e.astype(np.float16).tolist() for e in v]
                                for _, _, v in rows],
                               pa.list_(pa.list_(pa.float16(), DIM))),
    })


CAPTIONS = {1: "a circle and two Stars beside another circle", 2: "a Blue-Berry",
            3: "one circle", 4: "nothing named", 5: "a circle"}
CIRCLE, STAR, BERRY = unit((0, 1)), unit((1, 1)), unit((4, 1))
CIRCLE_BOX, WRONG_BOX = [10.0, 10.0, 30.0, 30.0], [40.0, 5.0, 60.0, 20.0]


@pytest.fixture()
def planted(tmp_path):
    """Pairs 1..5 with hand-made regions and phrases in two parts each:
    1: circle -> its planted region (rank 1, cosine 1), star -> rank 2 (cosine 0.8, the box
       is not the star's); 2: "blue berry" (no category) best cosine 0.3; 3: a phrase but no
       regions; 4: no phrase; 5: circle -> a wrong box, cosine 0.2."""
    ctx = make_ctx(tmp_path, {"synthetic": {"n_images": 5}})
    d = ctx.stage_dir(layout.PAIRS)
    d.mkdir(parents=True)
    rows = [{"image_id": i, "caption": c, "file": f"images/{i:06d}.jpg", "offset": -1,
             "size": -1, "width": 64, "height": 48} for i, c in CAPTIONS.items()]
    pq.write_table(pa.Table.from_pylist(rows[:3], schema=PAIRS_SCHEMA), d / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:], schema=PAIRS_SCHEMA), d / "part-00001.parquet")
    records = [{"image_id": 1, "objects": [{"category": "circle", "box": CIRCLE_BOX},
                                           {"category": "star", "box": [0, 30, 12, 46]}]},
               {"image_id": 5, "objects": [{"category": "circle", "box": CIRCLE_BOX}]}]
    (d / "part-00000.json").write_text(json.dumps(records[:1]))
    (d / "part-00001.json").write_text(json.dumps(records[1:]))
    fake_finished(ctx, layout.PAIRS, pairs=5)

    star_region = 0.8 * STAR + 0.6 * unit((3, 1))
    regions = [(1, [(WRONG_BOX, unit((2, 1))), (CIRCLE_BOX, CIRCLE),
                    ([0.0, 0.0, 20.0, 20.0], star_region)]),
               (2, [(WRONG_BOX, 0.3 * BERRY + np.sqrt(1 - 0.09) * unit((5, 1)))]),
               (5, [(WRONG_BOX, 0.2 * CIRCLE + np.sqrt(1 - 0.04) * unit((6, 1)))])]
    out = ctx.stage_dir(layout.PAIR_REGIONS)
    out.mkdir(parents=True)
    pq.write_table(regions_table(regions[:2]), out / "part-00000.parquet")
    pq.write_table(regions_table(regions[2:]), out / "part-00001.parquet")
    fake_finished(ctx, layout.PAIR_REGIONS, teacher={"name": "fake"})

    phrases = [(1, ["circle", "star"], [CIRCLE, STAR]), (2, ["blue berry"], [BERRY]),
               (3, ["circle"], [CIRCLE]), (4, [], []), (5, ["circle"], [CIRCLE])]
    out = ctx.stage_dir(layout.PHRASES)
    out.mkdir(parents=True)
    pq.write_table(phrases_rows(phrases[:2]), out / "part-00000.parquet")
    pq.write_table(phrases_rows(phrases[2:]), out / "part-00001.parquet")
    fake_finished(ctx, layout.PHRASES)
    return ctx


def kept_json(ctx: StageContext) -> dict:
    return json.loads((ctx.stage_dir(layout.PSEUDO_BOXES) / layout.PSEUDO_FILE).read_text())


def test_planted_best_regions_and_a_fixed_threshold(planted):
    manifest = run(pseudo_boxes, planted, threshold=0.5, images_per_part=2)
    parts = sorted(planted.stage_dir(layout.PSEUDO_BOXES).glob("part-*.parquet"))
    assert len(parts) == 3
    cands = pa.concat_tables(pq.read_table(p) for p in parts).to_pylist()
    got = [(c["image_id"], c["phrase"], c["rank"], round(c["score"], 2)) for c in cands]
    assert got == [(1, "circle", 1, 1.0), (1, "star", 2, 0.8), (2, "blue berry", 0, 0.3),
                   (5, "circle", 0, 0.2)]
    assert cands[0]["box"] == CIRCLE_BOX
    assert manifest["candidates"] == 4 and manifest["kept"] == 2
    assert manifest["threshold"] == 0.5 and manifest["phrases_without_regions"] == 1
    doc = kept_json(planted)
    assert [im["id"] for im in doc["images"]] == [1]
    assert doc["images"][0]["caption"] == CAPTIONS[1]
    # recorded relative to the dataset's cache folder: a moved cache still finds its images
    assert doc["info"]["image_root"] == layout.PAIRS
    assert recorded_root(planted.stage_dir(layout.PAIRS), planted.cache) == "pairs"
    assert recorded_root(Path("/elsewhere/imgs"), planted.cache) == "/elsewhere/imgs"
    circle, star = doc["annotations"]
    assert circle["bbox"] == [10.0, 10.0, 20.0, 20.0] and circle["category_id"] == 1
    assert [CAPTIONS[1][s:e] for s, e in circle["tokens_positive"]] == ["circle", "circle"]
    assert [CAPTIONS[1][s:e] for s, e in star["tokens_positive"]] == ["Stars"]
    assert star["category_id"] == 2 and star["score"] == pytest.approx(0.8, abs=2e-3)
    # the precision report against the pairs records: circle right, star wrong; over all
    # candidates image 5's circle is wrong too ("blue berry" is no category: not judged)
    p = manifest["precision"]
    assert p["kept"]["judged"] == 2 and p["kept"]["correct"] == 1
    assert p["kept"]["by_split"] == {"base": {"judged": 1, "correct": 1, "precision": 1.0},
                                     "novel": {"judged": 1, "correct": 0, "precision": 0.0}}
    assert p["all_candidates"]["judged"] == 3 and p["all_candidates"]["correct"] == 1


def test_a_below_threshold_phrase_is_dropped(planted):
    run(pseudo_boxes, planted, threshold=0.25)
    doc = kept_json(planted)
    assert [im["id"] for im in doc["images"]] == [1, 2]
    berry = doc["annotations"][-1]
    assert berry["phrase"] == "blue berry" and "category_id" not in berry
    assert [CAPTIONS[2][s:e] for s, e in berry["tokens_positive"]] == ["Blue-Berry"]
    assert all(a["image_id"] != 5 for a in doc["annotations"])  # 0.2 < 0.25


@pytest.mark.parametrize("fraction, kept", [(0.5, 2), (0.25, 1), (0.6, 3), (1.0, 4)])
def test_the_keep_fraction_rule_keeps_exactly_its_count(planted, fraction, kept):
    manifest = run(pseudo_boxes, planted, keep_fraction=fraction)
    assert manifest["kept"] == kept == len(kept_json(planted)["annotations"])
    want = {1: 1.0, 2: 0.8, 3: 0.3, 4: 0.2}[kept]
    assert manifest["threshold"] == pytest.approx(want, abs=2e-3)
    assert manifest["rule"].startswith("keep the top")


def test_the_json_reads_back_through_load_grounding(planted):
    run(pseudo_boxes, planted, threshold=0.0)
    path = planted.stage_dir(layout.PSEUDO_BOXES) / layout.PSEUDO_FILE
    doc = load_grounding(path)
    assert [im.id for im in doc.images] == [1, 2, 5]
    assert doc.n_boxes == 4 and doc.dropped.count == 0
    by_id = doc.by_id()
    assert by_id[1].boxes[0].tolist() == CIRCLE_BOX
    assert by_id[1].phrases() == ["circle circle", "Stars"]
    assert by_id[1].category_ids == (1, 2) and by_id[2].category_ids == (None,)


def test_no_pairs_zero_parts_and_an_empty_valid_file(tmp_path):
    ctx = make_ctx(tmp_path, None)
    fake_finished(ctx, layout.PAIRS, pairs=0)
    m = run(pair_regions, ctx)
    assert m["n_parts"] == 0 and m["rows"] == 0
    m = run(pseudo_boxes, ctx)
    assert m["n_parts"] == 0 and m["kept"] == 0 and m["threshold"] is None
    doc = load_grounding(ctx.stage_dir(layout.PSEUDO_BOXES) / layout.PSEUDO_FILE)
    assert doc.images == [] and doc.n_boxes == 0


# ----------------------------------------------------------------------------- pair_regions


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    """Three generated-layout pairs with 6 proposals each (top_k 4 embeds 4), a fourth
    without proposals, a fifth whose image is corrupt; a tiny random teacher."""
    tmp = tmp_path_factory.mktemp("pair_regions")
    ctx = make_ctx(tmp, {"synthetic": {"n_images": 5}})
    spec = make_teacher_files(tmp / "teacher", seed=0)
    write_teacher_manifest(ctx.cache, spec)
    rng = np.random.default_rng(3)
    images = ctx.stage_dir(layout.PAIRS) / layout.PAIR_IMAGES
    images.mkdir(parents=True)
    sizes = {1: (96, 64), 2: (64, 112), 3: (80, 80), 4: (50, 40), 5: (60, 60)}
    rows, props = [], []
    for i, (w, h) in sizes.items():
        name = f"{i:06d}.jpg"
        textured_image(rng, w, h).save(images / name, quality=95)
        rows.append({"image_id": i, "caption": f"pair {i}", "file": f"images/{name}",
                     "offset": -1, "size": -1, "width": w, "height": h})
        if i != 4:
            props.append((i, random_boxes(rng, 6, w, h)))
    (images / "000005.jpg").write_bytes(b"not a jpeg")
    d = ctx.stage_dir(layout.PAIRS)
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA), d / "part-00000.parquet")
    fake_finished(ctx, layout.PAIRS, pairs=5)
    ids, ranks, boxes, scores = [], [], [], []
    for i, b in props:
        ids += [i] * len(b)
        ranks += list(range(len(b)))
        boxes += b.tolist()
        scores += [1.0 - r / 10 for r in range(len(b))]
    out = ctx.stage_dir(layout.PAIR_PROPOSALS)
    out.mkdir(parents=True)
    table = pa.table([ids, ranks, boxes, scores], schema=PROPOSALS_SCHEMA)
    pq.write_table(table.slice(0, 12), out / "part-00000.parquet")
    pq.write_table(table.slice(12), out / "part-00001.parquet")
    fake_finished(ctx, layout.PAIR_PROPOSALS)
    manifest = run(pair_regions, ctx, top_k=4, images_per_part=3, batch_size=5)
    return ctx, spec, dict(props), manifest


def stored(ctx: StageContext) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in
                            sorted(ctx.stage_dir(layout.PAIR_REGIONS).glob("part-*.parquet")))


def test_pair_regions_schema_top_k_and_the_reject(tiny_pairs):
    ctx, _, _, manifest = tiny_pairs
    table = stored(ctx)
    d = TINY_CONFIG["embed_dim"]
    want = PROPOSALS_SCHEMA.append(pa.field("embedding", pa.list_(pa.float16(), d)))
    assert table.schema.remove_metadata() == want
    assert table["image_id"].to_pylist() == [1] * 4 + [2] * 4 + [3] * 4
    assert table["rank"].to_pylist() == [0, 1, 2, 3] * 3
    assert manifest["rows"] == 12 and manifest["rejects"] == 1
    assert manifest["without_proposals"] == 1 and manifest["images"] == 3
    [bad] = read_json(ctx.stage_dir(layout.PAIR_REGIONS) / "part-00001.stats.json")["rejects"]
    assert bad["item"] == 5 and bad["file"].endswith("000005.jpg")
    assert "000005.jpg" in bad["reason"] and "\n" not in bad["reason"]
    assert manifest["inputs"]["crops"] == pair_regions.CROPS_VERSION
    assert manifest["teacher"] == read_json(ctx.cache / "teacher" / "_MANIFEST.json")["teacher"]


def test_pair_regions_equal_the_regions_path_and_the_pil_reference(tiny_pairs):
    """The same boxes on the same images through the regions stage's library (a path per
    image) give the same float16 rows; and each row agrees with PIL crop -> preprocess ->
    encode (1x + 1.5x, summed, normalised)."""
    ctx, spec, props, _ = tiny_pairs
    table = stored(ctx)
    d = TINY_CONFIG["embed_dim"]
    teacher = load_teacher(spec)
    images = ctx.stage_dir(layout.PAIRS) / layout.PAIR_IMAGES
    proposals = pa.table([[i for i in (1, 2, 3) for _ in range(4)],
                          [r for _ in (1, 2, 3) for r in range(4)],
                          [b.tolist() for i in (1, 2, 3) for b in props[i][:4]],
                          [1.0 - r / 10 for _ in (1, 2, 3) for r in range(4)]],
                         schema=PROPOSALS_SCHEMA)
    files = [(i, images / f"{i:06d}.jpg") for i in (1, 2, 3)]
    ref_table, rejects = embed_regions(teacher, proposals, files, batch_size=5,
                                       decode_threads=0)
    assert rejects == []

    def emb(t):
        return np.asarray(t["embedding"].combine_chunks().flatten()).reshape(-1, d)

    assert np.array_equal(emb(table).astype(np.float32), emb(ref_table).astype(np.float32))
    pil = torch.stack([reference_embedding(teacher, load_rgb(images / f"{i:06d}.jpg"), box)
                       for i, box in zip(table["image_id"].to_pylist(),
                                         table["box"].to_pylist())])
    cos = F.cosine_similarity(torch.from_numpy(emb(table).astype(np.float32)), pil)
    assert cos.min() >= 0.99, cos.min()


def test_the_trainer_finds_the_pseudo_images_in_a_moved_cache(planted, tmp_path):
    import shutil

    from ovdistill.trainer.grounding_data import PSEUDO, grounding_files

    run_stage(pseudo_boxes, planted, pseudo_boxes.Config(threshold=0.5), distributor="local",
              progress=False, log=lambda *_: None)
    moved = tmp_path / "moved" / planted.cache.name
    shutil.copytree(planted.cache, moved)
    shutil.rmtree(planted.cache)
    path, images = grounding_files(planted.dataset, moved, PSEUDO)
    assert path == moved / layout.PSEUDO_BOXES / layout.PSEUDO_FILE
    assert images == moved / layout.PAIRS
