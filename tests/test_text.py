"""The text stage: Parquet contract, unit norms, and the (synonym x template) ensemble against
a reference computed prompt by prompt."""
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

from pipeline.cache import read_json
from pipeline.manifests import Category
from pipeline.runner import StageMismatch, make_config, run_stage
from stages import text
from stages.teacher import load_teacher
from tests.test_regions import (
    BASE,
    NOVEL,
    TINY_CONFIG,
    make_dataset,
    make_teacher_files,
    write_teacher_manifest,
)

SYNONYMS = {"square": ["square", "box_shape", "quadrilateral"]}


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text-teachers")
    return make_teacher_files(folder, seed=0), make_teacher_files(folder, seed=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory, teacher_files):
    ctx = make_dataset(tmp_path_factory.mktemp("text"), synonyms=SYNONYMS)
    write_teacher_manifest(ctx.cache, teacher_files[0])
    cfg = make_config(text, {"templates": "simple"})
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
    assert files == ["mini.parquet"]
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
