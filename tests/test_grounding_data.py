"""Grounding data (issue 17, item 4): the MDETR-format reader, the toy grounding generator
(base categories named and boxed, novel ones never), the `grounding` stage end to end and the
manifest's `grounding:` block."""
from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ovdistill.pipeline import layout
from ovdistill.pipeline.annotations import EMPTY, AnnotationError
from ovdistill.pipeline.errors import StageError
from ovdistill.pipeline.grounding import (
    NO_SPAN,
    grounding_paths,
    load_grounding,
    phrase_text,
    validate_grounding,
)
from ovdistill.pipeline.manifests import GroundingSource, ManifestError, load_manifest
from ovdistill.pipeline.phrases import words
from ovdistill.pipeline.runner import StageContext, make_config, run_stage
from ovdistill.stages import grounding, synthetic
from PIL import Image

BASE = ["red circle", "red square", "blue star", "green heart", "yellow cross", "circle"]
NOVEL = ["blue circle", "green cross", "ring", "cross"]  # "blue circle" is a coloured "circle"
VOCAB = BASE + NOVEL


# ----------------------------------------------------------------------------- reader

CAPTION_1 = "a red circle next to two blue stars"  # "red circle" [2, 12), "blue stars" [25, 35)
CAPTION_2 = "the ring and the star"  # "the ring" [0, 8), "the star" [13, 21)


def mdetr_doc() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "one.jpg", "width": 120, "height": 90, "caption": CAPTION_1},
            {"id": 2, "file_name": "two.jpg", "width": 100, "height": 80, "caption": CAPTION_2},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "bbox": [10, 10, 20, 20], "category_id": 1,
             "tokens_positive": [[2, 12]], "phrase_ids": 0},
            {"id": 12, "image_id": 1, "bbox": [50, 5, 10.5, 10], "category_id": 2,
             "tokens_positive": [[25, 35]], "phrase_ids": 1},
            {"id": 13, "image_id": 1, "bbox": [70, 40, 10, 10], "category_id": 2,
             "tokens_positive": [[25, 35]], "phrase_ids": 1},
            {"id": 14, "image_id": 1, "bbox": [5, 5, 0, 10], "category_id": 1,  # degenerate
             "tokens_positive": [[2, 12]]},
            {"id": 21, "image_id": 2, "bbox": [90, 70, 20, 20],  # overshoots: clipped
             "tokens_positive": [[0, 8], [13, 21]]},
            {"id": 22, "image_id": 2, "bbox": [1, 2, 3, 4], "category_id": 1,
             "tokens_positive": []},  # no span: dropped
        ],
        "categories": [{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue star"}],
    }


def write(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_reader_ties_boxes_to_spans_drops_and_clips(tmp_path):
    doc = mdetr_doc()
    before = json.dumps(doc)
    g = load_grounding(write(tmp_path / "g.json", doc))
    assert json.dumps(doc) == before  # the document is not modified
    assert [im.id for im in g.images] == [1, 2] and g.n_boxes == 4
    one, two = g.images
    assert one.caption == CAPTION_1 and (one.width, one.height) == (120, 90)
    assert one.record["file_name"] == "one.jpg"
    assert one.boxes.dtype == torch.float32 and one.boxes.shape == (3, 4)
    assert one.boxes.tolist() == [[10, 10, 30, 30], [50, 5, 60.5, 15], [70, 40, 80, 50]]
    assert one.spans == (((2, 12),), ((25, 35),), ((25, 35),))
    assert one.phrases() == ["red circle", "blue stars", "blue stars"]
    assert one.phrase_groups() == [((2, 12),), ((25, 35),)]
    assert one.annotation_ids == (11, 12, 13) and one.category_ids == (1, 2, 2)
    assert two.boxes.tolist() == [[90, 70, 100, 80]]  # clipped to the 100 x 80 image
    assert two.phrases() == ["the ring the star"]  # two spans, joined by one space
    assert two.category_ids == (None,)
    assert g.dropped.count == 2 and g.dropped.examples == [
        {"id": 14, "image_id": 1, "reason": EMPTY},
        {"id": 22, "image_id": 2, "reason": NO_SPAN}]
    assert g.clipped.count == 1 and g.clipped.examples == [
        {"id": 21, "image_id": 2, "bbox": [90, 70, 20, 20], "clipped": [90, 70, 10, 10]}]
    assert g.by_id()[2] is two
    assert phrase_text("abcdef", [(0, 2), (4, 6)]) == "ab ef"


def test_an_image_without_boxes_has_an_empty_box_tensor():
    g = validate_grounding({"images": [{"id": 3, "width": 5, "height": 5, "caption": "x"}]},
                           "mem")
    assert g.images[0].boxes.shape == (0, 4) and g.images[0].spans == ()


def _set(doc: dict, index: int, **fields) -> dict:
    doc["annotations"][index].update(fields)
    return doc


@pytest.mark.parametrize("change, message", [
    (lambda d: _set(d, 1, tokens_positive=[[25, 36]]),
     r"annotations\[1\] \(id 12\): span \[25, 36\] is outside its caption \(35 characters\)"),
    (lambda d: _set(d, 4, tokens_positive=[[0, 8], [-1, 3]]),
     r"annotations\[4\] \(id 21\): span \[-1, 3\] is outside its caption"),
    (lambda d: _set(d, 0, tokens_positive=[[5, 5]]), r"\(id 11\): span \[5, 5\] is outside "),
    (lambda d: _set(d, 0, tokens_positive=[[2, "12"]]),
     r"\(id 11\): a tokens_positive span must be \[start, end\] integers, got \[2, '12'\]"),
    (lambda d: _set(d, 0, tokens_positive="2-12"), r"\(id 11\): tokens_positive must be a list"),
    (lambda d: _set(d, 2, image_id=9), r"annotations\[2\] \(id 13\): unknown image id 9"),
    (lambda d: _set(d, 2, bbox=[1, 2, 3]), r"\(id 13\): bbox must be a list of 4 numbers"),
    (lambda d: _set(d, 2, category_id=7), r"\(id 13\): category_id 7 is not a category"),
    (lambda d: [d["annotations"][3].pop("tokens_positive"), d][1], r"\(id 14\): no tokens_posi"),
    (lambda d: [d["images"][1].pop("caption"), d][1],
     r"images\[1\] \(id 2\): caption must be a non-empty string, got None"),
    (lambda d: _set(d, 5, id=11), r"annotations\[5\]: duplicate annotation id 11"),
])
def test_structural_problems_are_one_line_errors_naming_file_and_annotation(
        tmp_path, change, message):
    path = write(tmp_path / "bad.json", change(mdetr_doc()))
    with pytest.raises(AnnotationError, match=message) as e:
        load_grounding(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: ")


def test_a_degenerate_box_with_a_bad_span_is_still_an_error(tmp_path):
    """Spans are checked on every annotation, dropped boxes included."""
    path = write(tmp_path / "bad.json", _set(mdetr_doc(), 3, tokens_positive=[[30, 99]]))
    with pytest.raises(AnnotationError, match=r"\(id 14\): span \[30, 99\]"):
        load_grounding(path)


def test_unreadable_file_is_one_line(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(AnnotationError, match=r"x.json: cannot read") as e:
        load_grounding(tmp_path / "x.json")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- generator


def named_categories(caption: str, names: list[str]) -> set[str]:
    """The categories a caption names, by longest match on whole words, singular or plural."""
    text, found = caption.lower(), set()
    for name in sorted(names, key=len, reverse=True):
        pattern = re.compile(rf"\b({re.escape(name)}|{re.escape(synthetic.plural(name))})\b")
        if pattern.search(text):
            found.add(name)
            text = pattern.sub("#", text)
    return found


def test_spans_point_at_the_phrase_of_each_base_box_and_novel_is_never_named_or_boxed():
    spec = synthetic.GroundingSpec()
    base = set(BASE)
    novel_seen = coloured = plurals = 0
    for i in range(80):
        scene, caption, spans = grounding.draw_grounding(spec, VOCAB, base, i)
        assert len(spans) == len(scene.objects)
        w, h = scene.image.size
        assert 160 <= min(w, h) and max(w, h) <= 256 and 1 <= len(scene.objects) <= 6
        present_base = {o.category for o in scene.objects if o.category in base}
        assert present_base, "a grounding scene holds a base object"
        # name_prob 1: exactly the base categories in the picture are named, nothing else
        assert named_categories(caption, VOCAB) == present_base, caption
        by_category: dict[str, tuple] = {}
        for o, sp in zip(scene.objects, spans):
            if o.category not in base:
                assert sp == (), (caption, o.category)  # novel: never boxed
                novel_seen += 1
                continue
            assert len(sp) == 1, caption
            (s, e), = sp
            phrase = caption[s:e]
            assert o.category in phrase.lower(), (caption, phrase, o.category)
            # the phrase is the mention without its determiner: whole words, one word before
            assert (s == 0 or caption[s - 1] == " ") and (e == len(caption)
                                                          or not caption[e].isalnum())
            assert caption[:s].split()[-1].lower() in (
                "a", "an", "the", "one", "some", *synthetic._COUNT_WORDS.values()), caption
            k = sum(x.category == o.category for x in scene.objects)
            assert words(phrase)[-1] == (words(o.category)[-1] if k == 1 else
                                         synthetic.plural(words(o.category)[-1])), caption
            plurals += k > 1
            coloured += len(words(phrase)) > len(words(o.category))
            # every box of a category points at the one phrase
            assert by_category.setdefault(o.category, sp) == sp
    assert novel_seen > 20 and plurals > 5 and coloured > 0


def test_generator_is_deterministic_varied_and_its_own_stream():
    spec = synthetic.GroundingSpec(seed=5)
    base = set(BASE)
    for i in range(3):
        a, b = (grounding.draw_grounding(spec, VOCAB, base, i) for _ in range(2))
        assert a[0].image.tobytes() == b[0].image.tobytes() and a[1:] == b[1:]
    other = grounding.draw_grounding(synthetic.GroundingSpec(seed=6), VOCAB, base, 0)
    assert other[0].image.tobytes() != grounding.draw_grounding(spec, VOCAB, base, 0)[0] \
        .image.tobytes()
    captions = [grounding.draw_grounding(spec, VOCAB, base, i)[1] for i in range(60)]
    assert len(set(captions)) >= 55
    starts = {" ".join(c.lower().split()[:2]) for c in captions}
    assert {"a photo", "an image", "a picture", "a drawing"} <= starts
    assert any(" next to " in c for c in captions) and any("background" in c for c in captions)
    # not the pair stream of the same index (split code 3)
    pair = synthetic.pair_scene(np.random.default_rng([5, 3, 0]), synthetic.PairSpec(), VOCAB)
    assert pair.image.tobytes() != grounding.draw_grounding(spec, VOCAB, base, 0)[0] \
        .image.tobytes()


def test_name_prob_leaves_some_base_objects_unnamed_and_unboxed():
    spec = synthetic.GroundingSpec(name_prob=0.5)
    unnamed = 0
    for i in range(40):
        scene, caption, spans = grounding.draw_grounding(spec, VOCAB, set(BASE), i)
        named = named_categories(caption, VOCAB)
        assert named and named <= set(BASE)
        for o, sp in zip(scene.objects, spans):
            assert bool(sp) == (o.category in named)
            unnamed += o.category in BASE and not sp
    assert unnamed > 5


def test_a_scene_without_base_objects_names_nothing():
    scene = synthetic.draw_scene(np.random.default_rng(0), 96, 96, ["ring"], (20, 40), 2)
    caption, spans = synthetic.grounding_caption(np.random.default_rng(1), scene.objects,
                                                 scene.background, VOCAB, set(BASE))
    assert spans == [()] * len(scene.objects) and not named_categories(caption, VOCAB)


def test_grounding_spec_validation():
    assert synthetic.GroundingSpec.from_dict({"n_images": 12, "image_side": [96, 128]}) == \
        synthetic.GroundingSpec(n_images=12, image_side=(96, 128))
    assert synthetic.GroundingSpec().n_images == 1000
    assert synthetic.GroundingSpec().objects_per_image == (1, 6)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_image'\]"):
        synthetic.GroundingSpec.from_dict({"n_image": 3})
    with pytest.raises(ValueError, match=r"object_size must be \[min, max\]"):
        synthetic.GroundingSpec.from_dict({"object_size": [50, 10]})
    with pytest.raises(ValueError, match=r"image_side must be \[min, max\]"):
        synthetic.GroundingSpec.from_dict({"image_side": [96, 128, 3]})
    with pytest.raises(ValueError, match=r"name_prob must be in \(0, 1\]"):
        synthetic.GroundingSpec.from_dict({"name_prob": 0})
    with pytest.raises(ValueError, match="n_images must be >= 1 and seed >= 0"):
        synthetic.GroundingSpec.from_dict({"n_images": 0})
    with pytest.raises(TypeError, match="seed must be an integer, got '1'"):
        synthetic.GroundingSpec.from_dict({"seed": "1"})


# ----------------------------------------------------------------------------- stage

SYNTHETIC = """
name: toyground
format: coco
root: "{{cache}}/toyground/dataset"
splits:
  train: {{images: train, annotations: train.json}}
vocabulary:
  base: [{base}]
  novel: [{novel}]
{block}
"""
TINY = """grounding:
  synthetic: {n_images: 10, seed: 3, image_side: [96, 128], object_size: [20, 48]}
"""


def manifest(tmp_path: Path, block: str, name: str = "m") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SYNTHETIC.format(base=", ".join(BASE), novel=", ".join(NOVEL), block=block))
    return path


def run(path: Path, cache: Path, **overrides) -> tuple[StageContext, dict]:
    ds = load_manifest(path, cache_root=cache)
    ctx = StageContext(dataset=ds, cache=cache / ds.name)
    return ctx, run_stage(grounding, ctx, make_config(grounding, overrides),
                          distributor="local", progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grounding")
    return run(manifest(tmp, TINY), tmp / "cache", images_per_part=4)


def test_generated_stage_writes_mdetr_json_equal_to_the_generator(generated):
    ctx, m = generated
    spec = grounding.grounding_spec(ctx)
    base = set(BASE)
    draws = [grounding.draw_grounding(spec, VOCAB, base, i) for i in range(10)]
    n_boxes = sum(bool(sp) for _, _, spans in draws for sp in spans)
    assert m["n_parts"] == 3 and m["rows"] == m["images"] == 10 and m["rejects"] == 0
    assert m["boxes"] == n_boxes > 10
    assert m["novel_names_in_captions"] == 0 and m["novel_objects_boxed"] == 0
    assert m["novel_objects_unboxed"] == sum(o.category not in base
                                             for s, _, _ in draws for o in s.objects) > 0
    phrases = [len({sp for sp in spans if sp}) for _, _, spans in draws]
    assert m["phrases_per_caption"] == {"min": min(phrases), "max": max(phrases),
                                        "mean": round(float(np.mean(phrases)), 3)}

    path, folder = grounding_paths(ctx.dataset, ctx.files)
    assert path == ctx.stage_dir(layout.GROUNDING) / layout.GROUNDING_FILE
    assert folder == ctx.stage_dir(layout.GROUNDING) / layout.GROUNDING_IMAGES
    assert m["files"] == {layout.GROUNDING_FILE: hashlib.sha256(path.read_bytes()).hexdigest()}
    g = load_grounding(path)
    assert g.n_boxes == n_boxes and g.dropped.count == 0 and g.clipped.count == 0
    assert [im.id for im in g.images] == list(range(1, 11))
    assert {c["name"] for c in g.categories} <= base  # the file names no novel category
    for im, (scene, caption, spans) in zip(g.images, draws):
        assert im.caption == caption
        assert im.record["file_name"] == f"{im.id:06d}.jpg"
        image = Image.open(folder / im.record["file_name"])
        assert image.size == scene.image.size == (im.width, im.height)
        boxed = [(o, sp) for o, sp in zip(scene.objects, spans) if sp]
        assert im.spans == tuple(sp for _, sp in boxed)
        assert torch.allclose(im.boxes, torch.tensor([o.box for o, _ in boxed]), atol=0.01)
        assert [VOCAB[c - 1] for c in im.category_ids] == [o.category for o, _ in boxed]
        for phrase, (o, _) in zip(im.phrases(), boxed):
            assert o.category in phrase.lower()


def test_generated_output_does_not_depend_on_part_size(generated, tmp_path):
    ctx, _ = generated
    other, m = run(manifest(tmp_path, TINY), tmp_path / "cache", images_per_part=10)
    assert m["n_parts"] == 1
    a = grounding_paths(ctx.dataset, ctx.files)[0]
    b = grounding_paths(other.dataset, other.files)[0]
    assert a.read_bytes() == b.read_bytes()
    for i in (1, 10):
        name = f"{layout.GROUNDING_IMAGES}/{i:06d}.jpg"
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()


def test_no_grounding_block_plans_nothing_and_says_zero(tmp_path):
    _, m = run(manifest(tmp_path, ""), tmp_path / "cache")
    assert m["n_parts"] == 0 and m["rows"] == 0 and m["images"] == 0


def test_generated_grounding_needs_drawable_names(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(SYNTHETIC.format(base="person", novel="dog", block=TINY))
    with pytest.raises(ManifestError, match="grounding.synthetic: unknown category 'person'"):
        run(path, tmp_path / "cache")


REAL = """
name: real
format: coco
root: {root}
splits:
  train: {{images: coco/train2017, annotations: coco/train.json}}
vocabulary:
  base: [dog, red circle]
  novel: [cat]
grounding:
  annotations: flickr/g.json
  images: flickr/images
"""


def jpeg(size, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def test_real_source_validates_and_rejects_bad_images(tmp_path):
    images = tmp_path / "flickr" / "images"
    images.mkdir(parents=True)
    (images / "one.jpg").write_bytes(jpeg((120, 90)))
    (images / "two.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    doc = mdetr_doc()
    doc["images"][1]["caption"] = "the cat and the dog sofa"  # names a novel category
    doc["images"].append({"id": 3, "file_name": "three.png", "width": 10, "height": 10,
                          "caption": "a dog"})
    doc["images"].append({"id": 4, "file_name": "one.jpg", "width": 50, "height": 90,
                          "caption": "a dog"})  # its record gives the wrong size
    (images / "three.png").write_bytes(jpeg((10, 10), "PNG"))
    write(tmp_path / "flickr" / "g.json", doc)
    path = tmp_path / "real.yaml"
    path.write_text(REAL.format(root=tmp_path))
    ctx, m = run(path, tmp_path / "cache", images_per_part=2)
    assert m["format"] == "mdetr" and m["n_parts"] == 2
    assert m["images"] == 2 and m["rejects"] == 2 and m["rejected_image_ids"] == [2, 4]
    assert m["boxes"] == 3  # image 1's three kept boxes; image 3 has none
    assert m["dropped_annotations"]["count"] == 2 and m["clipped_annotations"]["count"] == 1
    rejects = {r["item"]: r for k in range(2) for r in json.loads(layout.stats_file(
        ctx.stage_dir(layout.GROUNDING), layout.part_stem(k)).read_text())["rejects"]}
    assert rejects[2]["file"] == "two.jpg"
    assert rejects[2]["reason"].startswith(f"{images / 'two.jpg'}: corrupt or truncated image")
    assert rejects[4]["reason"] == (f"{images / 'one.jpg'}: the image is 120x90, its record "
                                    f"says 50x90")
    assert all("\n" not in r["reason"] for r in rejects.values())
    # the kept captions: image 1 names "red circle", image 3 "dog"; the novel "cat" was on
    # the rejected image 2
    assert m["mentions"]["base"] == 2 and m["mentions"]["novel"] == 0
    assert grounding_paths(ctx.dataset, ctx.files) == (tmp_path / "flickr" / "g.json", images)
    kept = json.loads(layout.part_file(ctx.stage_dir(layout.GROUNDING), 0, ".json").read_text())
    assert [k["image_id"] for k in kept] == [1]


def test_real_source_with_a_bad_span_stops_before_any_part(tmp_path):
    (tmp_path / "flickr" / "images").mkdir(parents=True)
    write(tmp_path / "flickr" / "g.json", _set(mdetr_doc(), 0, tokens_positive=[[0, 99]]))
    path = tmp_path / "real.yaml"
    path.write_text(REAL.format(root=tmp_path))
    with pytest.raises(AnnotationError, match=r"g.json: annotations\[0\] \(id 11\): span"):
        run(path, tmp_path / "cache")
    assert not (tmp_path / "cache" / "real" / layout.GROUNDING / "part-00000.json").exists()


def test_real_source_files_must_exist(tmp_path):
    path = tmp_path / "real.yaml"
    path.write_text(REAL.format(root=tmp_path))
    with pytest.raises(StageError, match=r"grounding.annotations .*flickr/g.json is missing"):
        run(path, tmp_path / "cache")
    (tmp_path / "flickr").mkdir()
    write(tmp_path / "flickr" / "g.json", mdetr_doc())
    with pytest.raises(StageError, match=r"grounding.images .*flickr/images is missing"):
        run(path, tmp_path / "cache")


# ----------------------------------------------------------------------------- manifest


def real_manifest(tmp_path: Path, block: str) -> Path:
    path = tmp_path / "real.yaml"
    path.write_text(REAL.split("grounding:")[0].format(root=tmp_path) + block)
    return path


def test_grounding_blocks_parse(tmp_path):
    m = load_manifest(real_manifest(tmp_path, "grounding: {annotations: a/g.json, images: im}"))
    assert m.grounding == GroundingSource("mdetr", tmp_path / "a" / "g.json", tmp_path / "im")
    m = load_manifest(real_manifest(tmp_path, "grounding: {synthetic: {n_images: 5}}"))
    assert m.grounding == GroundingSource("synthetic", synthetic={"n_images": 5})
    assert load_manifest(real_manifest(tmp_path, "")).grounding is None


@pytest.mark.parametrize("block, message", [
    ("grounding: {annotations: g.json, images: im, captions: c}",
     (r"grounding: unknown key\(s\) \['captions'\]; known: \['annotations', 'images', "
      r"'synthetic'\]")),
    ("grounding: {annotations: g.json}", "grounding needs images"),
    ("grounding: {images: im}", "grounding needs annotations"),
    ("grounding: {synthetic: {n_images: 3}, images: im}",
     r"generated grounding data takes no \['images'\]"),
    ("grounding: {synthetic: 3}", "grounding.synthetic must be a mapping"),
    ("grounding: [a, b]", "grounding must be a mapping"),
])
def test_bad_grounding_blocks_are_one_line_errors(tmp_path, block, message):
    with pytest.raises(ManifestError, match=message) as e:
        load_manifest(real_manifest(tmp_path, block))
    assert "\n" not in str(e.value) and str(tmp_path / "real.yaml") in str(e.value)


def test_a_bad_synthetic_spec_is_a_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match=r"grounding.synthetic: unknown key\(s\) \['n'\]"):
        run(manifest(tmp_path, "grounding: {synthetic: {n: 3}}"), tmp_path / "cache")
