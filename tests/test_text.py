"""The text stage: Parquet contract, unit norms, and the (synonym x template) ensemble against
a reference computed prompt by prompt; the negatives, the mean region embedding and the hub
check it writes after the regions stage."""
from __future__ import annotations

import os

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
from ovdistill.pipeline.manifests import Category
from ovdistill.pipeline.runner import StageError, StageMismatch, make_config, run_stage
from ovdistill.stages import text

from tests.test_regions import (
    BASE,
    NOVEL,
    TINY_CONFIG,
    make_dataset,
    make_teacher_files,
    write_teacher_manifest,
)

SYNONYMS = {"square": ["square", "box_shape", "quadrilateral"]}
NEGATIVES = ("thing", "textured surface")


def write_regions(cache, dim: int, fingerprint: str = "regions-v1") -> np.ndarray:
    """What the regions stage leaves behind, as far as the text stage reads it: two parts of
    float16 unit embeddings sharing one direction. Returns them all, float16[N, D]."""
    rng = np.random.default_rng(5)
    common = rng.normal(size=dim)
    out = cache / "regions"
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for k, n in enumerate((7, 5)):
        e = common + rng.normal(size=(n, dim))
        e = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float16)
        parts.append(e)
        pq.write_table(pa.table({
            "image_id": pa.array(np.arange(n) + 100 * k, pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(e.reshape(-1), pa.float16()),
                                                           dim)}), out / f"part-{k:05d}.parquet")
    atomic_write_json(out / "_MANIFEST.json", {"stage": "regions", "fingerprint": fingerprint})
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text-teachers")
    return make_teacher_files(folder, seed=0), make_teacher_files(folder, seed=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory, teacher_files):
    ctx = make_dataset(tmp_path_factory.mktemp("text"), synonyms=SYNONYMS)
    write_teacher_manifest(ctx.cache, teacher_files[0])
    write_regions(ctx.cache, TINY_CONFIG["embed_dim"])
    cfg = make_config(text, {"templates": "simple", "negatives": list(NEGATIVES)})
    manifest = run_stage(text, ctx, cfg, distributor="local", progress=False,
                         log=lambda _: None)
    return ctx, cfg, manifest


def reference(teacher, names: list[str], templates) -> torch.Tensor:
    """One prompt at a time: encode, normalise, average over all (name, template), normalise."""
    acc = []
    for n in names:
        for t in templates:
            acc.append(F.normalize(teacher.encode_texts([t(n)])[0], dim=0))
    return F.normalize(torch.stack(acc).mean(0), dim=0)


def test_prompt_names_reads_lvis_synonyms():
    cat = Category(3, "aerosol_can", "base", ("aerosol_can", "spray_can"))
    assert text.prompt_names(cat) == ["aerosol can", "spray can"]
    assert text.prompt_names(cat, use_synonyms=False) == ["aerosol can"]
    assert text.prompt_names(Category(1, "cat", "novel")) == ["cat"]


def test_schema_rows_and_norms(built):
    ctx, _, manifest = built
    files = sorted(p.name for p in ctx.stage_dir("text").glob("*.parquet"))
    assert files == ["mini.parquet", "negatives.parquet"]
    table = pq.read_table(ctx.stage_dir("text") / "mini.parquet")
    d = TINY_CONFIG["embed_dim"]
    assert table.schema.remove_metadata() == pa.schema([
        ("category_id", pa.int64()), ("name", pa.string()), ("split", pa.string()),
        ("embedding", pa.list_(pa.float32(), d)),
    ])
    assert table.column("category_id").to_pylist() == [1, 2, 3]
    assert table.column("name").to_pylist() == BASE + NOVEL
    assert table.column("split").to_pylist() == ["base", "base", "novel"]
    emb = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, d)
    assert np.abs(np.linalg.norm(emb, axis=1) - 1).max() < 1e-3
    assert manifest["rows"] == 3 and manifest["embed_dim"] == d
    assert manifest["teacher"] == read_json(ctx.cache / "teacher" / "_MANIFEST.json")["teacher"]
    # 1 + 3 + 1 names x 7 simple templates
    assert manifest["prompts"] == 5 * len(zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES)


def test_ensemble_equals_prompt_by_prompt_reference(built, teacher_files):
    ctx, _, _ = built
    teacher = load_teacher(teacher_files[0])
    table = pq.read_table(ctx.stage_dir("text") / "mini.parquet")
    d = TINY_CONFIG["embed_dim"]
    got = torch.from_numpy(np.asarray(table.column("embedding").combine_chunks().flatten())
                           .reshape(-1, d).copy())
    templates = zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES
    want = torch.stack([
        reference(teacher, ["circle"], templates),
        reference(teacher, ["square", "box shape", "quadrilateral"], templates),
        reference(teacher, ["star"], templates),
    ])
    assert torch.allclose(got, want, atol=1e-5)
    # the synonyms matter: without them "square" is another vector
    assert F.cosine_similarity(got[1], reference(teacher, ["square"], templates), dim=0) < 0.9999


def test_openai_templates_and_another_teacher_is_refused(built, teacher_files):
    ctx, cfg, _ = built
    teacher = load_teacher(teacher_files[0])
    cats = [Category(1, "circle", "base")]
    got = text.category_embeddings(teacher, cats, zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES)
    want = reference(teacher, ["circle"], zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES)
    assert torch.allclose(got[0], want, atol=1e-5)

    manifest_path = ctx.cache / "teacher" / "_MANIFEST.json"
    original = manifest_path.read_bytes()
    try:
        write_teacher_manifest(ctx.cache, teacher_files[1])
        with pytest.raises(StageMismatch, match="inputs.teacher"):
            run_stage(text, ctx, cfg, distributor="local", progress=False, log=lambda _: None)
    finally:
        manifest_path.write_bytes(original)


def test_synonym_templates_take_callables_and_format_strings():
    made = text.synonym_templates(["box", "crate"], [lambda c: f"a {c}.", "the {}"])
    assert [t("ignored") for t in made] == ["a box.", "the box", "a crate.", "the crate"]


def test_negatives_parquet_uses_the_category_ensemble(built, teacher_files):
    ctx, _, manifest = built
    table = pq.read_table(ctx.stage_dir("text") / "negatives.parquet")
    d = TINY_CONFIG["embed_dim"]
    assert table.schema.remove_metadata() == pa.schema([
        ("name", pa.string()), ("embedding", pa.list_(pa.float32(), d))])
    assert table.column("name").to_pylist() == list(NEGATIVES)
    got = torch.from_numpy(np.asarray(table.column("embedding").combine_chunks().flatten())
                           .reshape(-1, d).copy())
    teacher = load_teacher(teacher_files[0])
    templates = zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES
    want = torch.stack([reference(teacher, [n], templates) for n in NEGATIVES])
    assert torch.allclose(got, want, atol=1e-5)
    assert manifest["negatives"] == {"file": "negatives.parquet", "rows": 2}
    # the defaults name no category of this dataset either
    text.check_negatives(text.DEFAULT_NEGATIVES, ctx.dataset.categories())


def test_a_negative_that_names_a_category_is_refused(built):
    ctx, _, _ = built
    cats = ctx.dataset.categories()
    with pytest.raises(StageError, match=r"negative prompt 'Box Shape' names the category "
                                         r"'square'"):
        text.check_negatives(("a blur", "Box Shape"), cats)  # a synonym, LVIS-style
    with pytest.raises(StageError, match="names the category 'star'"):
        text.plan(ctx, make_config(text, {"negatives": ["star"]}))
    with pytest.raises(StageError, match="a list of prompts"):
        text.check_negatives("thing", cats)


def test_region_mean_is_the_normalized_mean_of_every_region(built):
    ctx, _, manifest = built
    d = TINY_CONFIG["embed_dim"]
    regions = pq.read_table(ctx.stage_dir("regions"))  # every part at once, as float64
    emb = np.asarray(regions["embedding"].to_pylist(), dtype=np.float64)
    want = emb.mean(axis=0) / np.linalg.norm(emb.mean(axis=0))
    got = np.load(ctx.stage_dir("text") / "region_mean.npy", allow_pickle=False)
    assert got.dtype == np.float32 and got.shape == (d,)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert manifest["region_mean"] == {"file": "region_mean.npy", "regions": 12}
    # streamed in batches smaller than a part: the same mean
    streamed, n = text.region_mean(text.region_files(ctx), batch_rows=3)
    assert n == 12
    np.testing.assert_allclose(streamed, want, atol=1e-6)
    # and the trainer's loader reads this file
    from ovdistill.trainer.inputs import load_negatives, load_region_mean

    np.testing.assert_array_equal(load_region_mean(ctx.cache, d).numpy(), got)
    assert load_negatives(ctx.cache, d).shape == (2, d)


def test_hub_check_printed_sorted_and_recorded(built, capsys):
    ctx, cfg, manifest = built
    d = TINY_CONFIG["embed_dim"]
    table = pq.read_table(ctx.stage_dir("text") / "mini.parquet")
    t = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, d)
    mean = np.load(ctx.stage_dir("text") / "region_mean.npy")
    cos = {n: float(np.dot(v, mean) / np.linalg.norm(v) / np.linalg.norm(mean))
           for n, v in zip(BASE + NOVEL, t)}
    hub = manifest["hub_cosine"]
    assert set(hub) == set(cos)
    for n, c in cos.items():
        assert hub[n] == pytest.approx(c, abs=1e-5)
    order = sorted(cos, key=lambda n: -cos[n])
    stats = [read_json(ctx.stage_dir("text") / "part-00000.stats.json")]
    capsys.readouterr()
    assert text.finalize(ctx, cfg, stats)["hub_cosine"] == hub
    lines = capsys.readouterr().out.splitlines()
    assert "hub check" in lines[0] and len(lines) == 1 + len(cos)
    split = dict(zip(BASE + NOVEL, ["base", "base", "novel"]))
    for line, name in zip(lines[1:], order):
        assert line.split() == [f"{cos[name]:+.4f}", name, f"({split[name]})"]


def test_text_runs_after_regions_and_follows_its_fingerprint(built):
    from ovdistill.cli import STAGES

    assert STAGES.index("ovdistill.stages.text") > STAGES.index("ovdistill.stages.regions")
    ctx, cfg, _ = built
    path = ctx.stage_dir("regions") / "_MANIFEST.json"
    original = path.read_bytes()
    try:
        atomic_write_json(path, {"stage": "regions", "fingerprint": "regions-v2"})
        with pytest.raises(StageMismatch, match="inputs.regions"):
            run_stage(text, ctx, cfg, distributor="local", progress=False, log=lambda _: None)
    finally:
        path.write_bytes(original)
