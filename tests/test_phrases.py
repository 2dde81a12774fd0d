"""The phrases stage: dictionary extraction on hand-written captions (longest match, plurals,
synonyms, case, word boundaries, counts), the concept-list reader, the spaCy path's one-line
install hint, and the stage end to end on a tiny cache: exact rows, and phrase embeddings equal
to the text stage's category embeddings."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from open_clip import zero_shot_metadata
from ovdistill.pipeline.cache import atomic_write_json, read_json
from ovdistill.pipeline.clip_teacher import load_teacher
from ovdistill.pipeline.errors import OvdError, StageError
from ovdistill.pipeline.manifests import Category, load_manifest
from ovdistill.pipeline.pair_sources import PAIRS_SCHEMA
from ovdistill.pipeline.phrases import (
    ConceptDictionary,
    ExtractorUnavailable,
    extract_phrases,
    load_spacy,
    plural,
    read_concept_list,
    read_dictionary,
    spacy_noun_chunks,
)
from ovdistill.pipeline.runner import StageContext, StageMismatch, make_config, run_stage
from ovdistill.stages import phrases, text

from tests.test_regions import TINY_CONFIG, make_dataset, make_teacher_files, write_teacher_manifest
from tests.test_text import write_regions

D = TINY_CONFIG["embed_dim"]
SYNONYMS = {"square": ["square", "box_shape", "quadrilateral"]}
CATEGORIES = [Category(1, "circle", "base"), Category(2, "square", "base", ("box_shape",)),
              Category(3, "star", "novel")]
CONCEPTS_TXT = """\
# concepts beyond the vocabulary
red star
Circle        # a category: dropped
box

squares       # a category's plural: dropped
cross
box
"""
CAPTIONS = {  # image_id -> caption; None: a corrupt pairs row
    1: "Two red stars and a star.",
    2: "A Circle next to a BOX SHAPE and some squares",
    3: "a starfish, a starling and a superstar",
    4: "crosses, a cross and circles; CIRCLE! boxes",
    5: None,
    6: "",
    7: "red star red star star quadrilaterals",
}
WANT = {
    1: [("red star", 1), ("star", 1)],
    2: [("circle", 1), ("square", 2)],
    3: [],
    4: [("cross", 2), ("circle", 2), ("box", 1)],
    6: [],
    7: [("red star", 2), ("star", 1), ("square", 1)],
}


def dictionary(concepts=("red star", "box", "cross")) -> ConceptDictionary:
    return ConceptDictionary.build(CATEGORIES, list(concepts))


# ----------------------------------------------------------------------------- extraction


def test_longest_match_plurals_synonyms_case_and_counts():
    d = dictionary()
    assert extract_phrases("Two red stars and a star.", d) == [("red star", 1), ("star", 1)]
    assert extract_phrases("RED STAR, Star, stars", d) == [("red star", 1), ("star", 2)]
    # the synonym "box_shape" reads "box shape"; it is longer than the concept "box"
    assert extract_phrases("a box shape, two Box-Shapes and a box", d) == [
        ("square", 2), ("box", 1)]
    assert extract_phrases("boxes and crosses and a cross", d) == [("box", 1), ("cross", 2)]
    assert extract_phrases("circles  then\tsquares", d) == [("circle", 1), ("square", 1)]


def test_word_boundaries_and_no_match():
    d = dictionary()
    assert extract_phrases("a starfish, a superstar and a starling", d) == []
    assert extract_phrases("boxer crossing circled", d) == []
    assert extract_phrases("", d) == []
    assert extract_phrases("nothing here at all", d) == []
    assert extract_phrases("star_fish", d) == [("star", 1)]  # an underscore separates words


def test_longest_first_over_the_whole_caption_not_leftmost():
    """'red star fish' (3 words) is taken before 'big red' (2 words) that starts earlier."""
    d = dictionary(["big red", "red star fish"])
    assert extract_phrases("big red star fish", d) == [("red star fish", 1)]
    assert extract_phrases("big red star", d) == [("big red", 1), ("star", 1)]
    # a tie in length: the earlier start wins
    d = dictionary(["red star", "star fish"])
    assert extract_phrases("red star fish", d) == [("red star", 1)]


def test_plural():
    assert [plural(w) for w in ("box", "star", "cross", "brush", "berry", "key", "bus")] == [
        "boxes", "stars", "crosses", "brushes", "berries", "keys", "buses"]


def test_dictionary_drops_concepts_a_category_already_names():
    d = dictionary(["Circle", "squares", "box shape", "red star", "Red  Star", "box"])
    assert [(c.name, c.split) for c in d.concepts] == [
        ("circle", "base"), ("square", "base"), ("star", "novel"),
        ("red star", "concept"), ("box", "concept")]
    assert d.canonical("Box Shapes") == "square" and d.canonical("starfish") is None
    assert d.split_of("red star") == "concept" and d.split_of("nope") is None
    assert d.fingerprint() != dictionary(["red star"]).fingerprint()
    assert d.fingerprint() == dictionary(["red star", "box"]).fingerprint()


def test_read_concept_list(tmp_path):
    path = tmp_path / "concepts.txt"
    path.write_text(CONCEPTS_TXT + "  traffic   light  \n#only a comment\n")
    assert read_concept_list(path) == ["red star", "Circle", "box", "squares", "cross",
                                       "traffic light"]
    with pytest.raises(StageError, match=r"concept list .*missing\.txt is missing"):
        read_concept_list(tmp_path / "missing.txt")
    path.write_bytes(b"red star\n\xff\xfe bad\n")
    with pytest.raises(StageError, match=r"concepts\.txt: not UTF-8 text"):
        read_concept_list(path)


def test_spacy_path_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # absent (as here), even where installed
    load_spacy.cache_clear()
    with pytest.raises(ExtractorUnavailable) as err:
        spacy_noun_chunks(["a red star"], "en_core_web_sm")
    msg = str(err.value)
    assert isinstance(err.value, OvdError) and "\n" not in msg
    assert "pip install 'ovdistill[spacy]'" in msg
    assert "python -m spacy download en_core_web_sm" in msg
    load_spacy.cache_clear()


# ----------------------------------------------------------------------------- the stage


def write_pairs(cache, captions: dict, per_part: int = 4) -> None:
    """What the pairs stage leaves behind: PAIRS_SCHEMA parts and its plan and manifest."""
    out = cache / "pairs"
    out.mkdir(parents=True, exist_ok=True)
    ids = sorted(captions)
    for k, s in enumerate(range(0, len(ids), per_part)):
        chunk = ids[s:s + per_part]
        pq.write_table(pa.table({
            "image_id": chunk, "caption": [captions[i] for i in chunk],
            "file": [f"images/{i:06d}.jpg" for i in chunk], "offset": [-1] * len(chunk),
            "size": [-1] * len(chunk), "width": [64] * len(chunk), "height": [48] * len(chunk),
        }, schema=PAIRS_SCHEMA), out / f"part-{k:05d}.parquet")
    n_parts = len(range(0, len(ids), per_part))
    atomic_write_json(out / "_PLAN.json", {"stage": "pairs", "n_parts": n_parts})
    atomic_write_json(out / "_MANIFEST.json", {"stage": "pairs", "fingerprint": "pairs-v1",
                                               "pairs": len(ids)})


def reference(teacher, names: list[str], templates) -> torch.Tensor:
    """One prompt at a time: encode, normalise, average over all (name, template), normalise."""
    acc = [F.normalize(teacher.encode_texts([t(n)])[0], dim=0) for n in names for t in templates]
    return F.normalize(torch.stack(acc).mean(0), dim=0)


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("phrases")
    spec = make_teacher_files(tmp / "teacher-files", seed=0)
    base = make_dataset(tmp, synonyms=SYNONYMS)
    (base.dataset.root / "concepts.txt").write_text(CONCEPTS_TXT)
    manifest = base.dataset.path
    manifest.write_text(manifest.read_text()
                        + "pairs: {synthetic: {n_images: 7}, concepts: concepts.txt}\n")
    ctx = StageContext(dataset=load_manifest(manifest), cache=base.cache, device="cpu")
    write_teacher_manifest(ctx.cache, spec)
    write_regions(ctx.cache, D)
    run_stage(text, ctx, make_config(text, {"templates": "simple"}), distributor="local",
              progress=False, log=quiet)
    write_pairs(ctx.cache, CAPTIONS)
    cfg = make_config(phrases, {"pairs_per_part": 3})
    done = run_stage(phrases, ctx, cfg, distributor="local", progress=False, log=quiet)
    return ctx, cfg, done, spec


def phrase_rows(ctx) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in ctx.files.parts("phrases"))


def test_rows_phrases_and_counts(built):
    ctx, _, manifest, _ = built
    assert [p.name for p in ctx.files.parts("phrases")] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = phrase_rows(ctx)
    assert table.schema.remove_metadata() == pa.schema([
        ("image_id", pa.int64()), ("phrases", pa.list_(pa.string())),
        ("counts", pa.list_(pa.int32())), ("phrase_emb", pa.list_(pa.list_(pa.float16(), D))),
    ])
    assert table.column("image_id").to_pylist() == [1, 2, 3, 4, 6, 7]
    got = {i: list(zip(p, c)) for i, p, c in zip(table.column("image_id").to_pylist(),
                                                 table.column("phrases").to_pylist(),
                                                 table.column("counts").to_pylist())}
    assert got == WANT
    assert [len(e) for e in table.column("phrase_emb").to_pylist()] == [2, 2, 0, 3, 0, 3]
    part1 = read_json(ctx.stage_dir("phrases") / "part-00001.stats.json")
    assert part1["rejects"] == [{"item": 5, "file": None, "reason": "pairs row has no caption"}]
    assert manifest["rows"] == 6 and manifest["rejects"] == 1
    assert (manifest["pairs"], manifest["with_phrases"], manifest["without_phrases"]) == (6, 4, 2)
    assert manifest["distinct_phrases"] == 6
    assert manifest["top_phrases"] == [["circle", 3], ["red star", 3], ["square", 3],
                                       ["cross", 2], ["star", 2], ["box", 1]]
    assert manifest["by_split"] == {"base": {"distinct": 2, "mentions": 6},
                                    "novel": {"distinct": 1, "mentions": 2},
                                    "concept": {"distinct": 3, "mentions": 6}}
    assert manifest["prompts"] == {"templates": "simple", "use_synonyms": True}
    assert manifest["teacher"] == read_json(ctx.cache / "teacher" / "_MANIFEST.json")["teacher"]


def test_phrase_embeddings_are_the_text_stage_embeddings(built):
    ctx, _, _, spec = built
    table = phrase_rows(ctx)
    emb = {}  # phrase -> float16[D], every occurrence the same vector
    for names, vecs in zip(table.column("phrases").to_pylist(),
                           table.column("phrase_emb").to_pylist()):
        for n, v in zip(names, vecs):
            v = np.asarray(v, np.float16)
            assert n not in emb or np.array_equal(emb[n], v)
            emb[n] = v
    text_table = pq.read_table(ctx.files.text_parquet("mini"))
    text_emb = dict(zip(text_table.column("name").to_pylist(),
                        np.asarray(text_table.column("embedding").to_pylist(), np.float32)))
    for name in ("circle", "square", "star"):
        np.testing.assert_array_equal(emb[name], text_emb[name].astype(np.float16))
    # a reference computed prompt by prompt, with the text stage's simple templates
    teacher = load_teacher(spec)
    simple = zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES
    want = reference(teacher, ["square", "box shape", "quadrilateral"], simple).numpy()
    np.testing.assert_allclose(emb["square"].astype(np.float32), want, atol=1e-3)
    want = reference(teacher, ["red star"], simple).numpy()
    np.testing.assert_allclose(emb["red star"].astype(np.float32), want, atol=1e-3)
    openai = reference(teacher, ["red star"], zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES)
    assert not np.allclose(emb["red star"].astype(np.float32), openai.numpy(), atol=1e-3)
    assert np.abs(np.linalg.norm(np.stack(list(emb.values())).astype(np.float32), axis=1)
                  - 1).max() < 2e-3


def test_dictionary_parquet(built):
    ctx, _, manifest, _ = built
    names, splits, emb = read_dictionary(ctx.files.dictionary())
    assert names == ["circle", "square", "star", "red star", "box", "cross"]
    assert splits == ["base", "base", "novel", "concept", "concept", "concept"]
    assert emb.dtype == np.float32 and emb.shape == (6, D)
    text_table = pq.read_table(ctx.files.text_parquet("mini"))
    text_emb = np.asarray(text_table.column("embedding").to_pylist(), np.float32)
    np.testing.assert_allclose(emb[:3], text_emb, atol=1e-6)
    assert manifest["dictionary"] == {"file": "dictionary.parquet", "rows": 6,
                                      "by_split": {"base": 2, "novel": 1, "concept": 3}}
    files = sorted(p.name for p in ctx.stage_dir("phrases").glob("*.parquet"))
    assert files == ["dictionary.parquet", "part-00000.parquet", "part-00001.parquet",
                     "part-00002.parquet"]
    bad = ctx.cache / "bad.parquet"
    pq.write_table(pa.table({"name": ["a"], "embedding": [[1.0, 2.0]]}), bad)
    with pytest.raises(StageError, match="bad.parquet: columns"):
        read_dictionary(bad)


def test_up_to_date_and_refused_after_the_text_stage_changed(built):
    ctx, cfg, manifest, _ = built
    again = run_stage(phrases, ctx, cfg, distributor="local", progress=False, log=quiet)
    assert again["fingerprint"] == manifest["fingerprint"]
    path = ctx.stage_dir("text") / "_MANIFEST.json"
    original = path.read_bytes()
    try:
        doc = json.loads(original)
        atomic_write_json(path, {**doc, "fingerprint": "text-v2",
                                 "config": {**doc["config"], "templates": "openai"}})
        with pytest.raises(StageMismatch, match="inputs.text"):
            run_stage(phrases, ctx, cfg, distributor="local", progress=False, log=quiet)
    finally:
        path.write_bytes(original)
    concepts = ctx.dataset.pairs.concepts
    before = concepts.read_bytes()
    try:
        concepts.write_text(CONCEPTS_TXT + "triangle\n")
        with pytest.raises(StageMismatch, match="inputs.dictionary"):
            run_stage(phrases, ctx, cfg, distributor="local", progress=False, log=quiet)
    finally:
        concepts.write_bytes(before)


def test_spacy_extractor_is_refused_in_one_line_before_any_work(built, monkeypatch):
    ctx, _, _, _ = built
    monkeypatch.setitem(sys.modules, "spacy", None)
    load_spacy.cache_clear()
    cfg = make_config(phrases, {"extractor": "spacy"})
    with pytest.raises(ExtractorUnavailable, match=r"pip install 'ovdistill\[spacy\]'"):
        phrases.plan(ctx, cfg)
    with pytest.raises(ExtractorUnavailable, match="python -m spacy download en_core_web_sm"):
        phrases.inputs(ctx, cfg)
    with pytest.raises(StageError, match="phrases.extractor must be one of"):
        phrases.plan(ctx, make_config(phrases, {"extractor": "nltk"}))
    load_spacy.cache_clear()


def test_no_pairs_block_plans_zero_parts(tmp_path):
    ctx = make_dataset(tmp_path)  # no pairs: block, and no teacher or text stage either
    write_pairs(ctx.cache, {})
    done = run_stage(phrases, ctx, make_config(phrases), distributor="local", progress=False,
                     log=quiet)
    assert done["n_parts"] == 0 and done["rows"] == 0 and done["pairs"] == 0
    assert not ctx.files.parts("phrases") and not ctx.files.dictionary().exists()
