"""The `text` stage: one prompt-ensembled CLIP text embedding per vocabulary category.

For each category every (synonym, template) prompt is encoded and L2-normalised; the mean over
all of them is L2-normalised again (ViLD / LVIS practice; a category without synonyms has just
its name). Templates come from `open_clip.zero_shot_metadata` ("openai": 80, "simple": 7).

Outputs, in `text/`:
- `<dataset>.parquet`, one row per category: category_id int64, name string, split string
  (base | novel), embedding fixed_size_list<float32>[D].
- `negatives.parquet`, one row per generic negative prompt (`Config.negatives`, none of them a
  category name or synonym), embedded with the same ensemble: name string, embedding
  fixed_size_list<float32>[D]. The trainer's `negative_prompts` makes them background
  aliases (a background proposal's target is the learned background or any of them).
- `region_mean.npy`, float32[D]: the L2-normalised mean of every cached region embedding
  (`regions/part-*.parquet`, streamed), for the trainer's `center_targets`. So this stage
  runs after `regions`, and its inputs include the regions fingerprint.

The hub check: the cosine of each category's text to that mean, printed one line per category
(highest first) and recorded in the manifest as `hub_cosine` {name: cos}. CLIP region
embeddings share one narrow cone (the modality gap); the text closest to its axis is the one
a student that learns only the common direction names everywhere.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ovdistill.pipeline import layout
from ovdistill.pipeline.cache import canonical_hash
from ovdistill.pipeline.clip_teacher import (  # noqa: F401 - prompt_names, synonym_templates: re-exported
    TextPrompts,
    category_embeddings,
    prompt_names,
    prompt_templates,
    synonym_templates,
    teacher_from_cache,
)
from ovdistill.pipeline.manifests import Category
from ovdistill.pipeline.runner import Part, PartOutput, PartResult, StageContext, StageError

NAME = "text"
RESOURCES = {"num_cpus": 1, "num_gpus": 1}
NEGATIVES_FILE = layout.NEGATIVES_FILE
REGION_MEAN_FILE = layout.REGION_MEAN_FILE

# Generic negative prompts: each goes through the templates like a category name ("a photo of
# a {}."), so they are noun phrases; none may be a category name or synonym (checked).
DEFAULT_NEGATIVES = ("shape", "object", "thing", "background", "texture", "pattern",
                     "part of a shape", "textured surface")


@dataclass(frozen=True)
class Config(TextPrompts):  # templates, use_synonyms (in that order), then:
    negatives: tuple[str, ...] = DEFAULT_NEGATIVES  # -> negatives.parquet (trainer option)


def text_table(categories: Sequence[Category], embeddings: torch.Tensor) -> pa.Table:
    """The `text/<dataset>.parquet` table. embeddings: Tensor[C, D] in `categories` order."""
    emb = embeddings.float().contiguous().numpy()
    return pa.table({
        "category_id": pa.array([c.id for c in categories], pa.int64()),
        "name": pa.array([c.name for c in categories], pa.string()),
        "split": pa.array([c.split for c in categories], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()),
                                                       emb.shape[1]),
    })


def negatives_table(names: Sequence[str], embeddings: torch.Tensor) -> pa.Table:
    """The `text/negatives.parquet` table. embeddings: Tensor[K, D] in `names` order."""
    emb = embeddings.float().contiguous().numpy()  # [K, D], K may be 0
    return pa.table({
        "name": pa.array(list(names), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()),
                                                       emb.shape[1]),
    })


def check_negatives(negatives: Sequence[str], categories: Sequence[Category]) -> None:
    """Refuse (one line) a negative prompt that is a category's name or synonym, compared the
    way they are prompted (underscores as spaces, case and outer spaces ignored)."""
    def key(n: str) -> str:
        return n.replace("_", " ").strip().lower()

    if isinstance(negatives, str):
        raise StageError(f"text: negatives must be a list of prompts, got {negatives!r}")
    names = {key(n): c.name for c in categories for n in (c.name, *c.synonyms)}
    for n in negatives:
        if key(n) in names:
            raise StageError(f"text: negative prompt {n!r} names the category "
                             f"{names[key(n)]!r}; negatives must name no category "
                             f"(--set text.negatives=[...])")
        if not key(n):
            raise StageError("text: an empty negative prompt")


def region_files(ctx: StageContext) -> list[Path]:
    return ctx.files.parts(layout.REGIONS)


def region_mean(files: Sequence[Path], batch_rows: int = 16384) -> tuple[np.ndarray, int]:
    """The L2-normalised mean of every region embedding in `files` (regions parquet parts,
    embedding fixed_size_list<float16>[D]), read in record batches (float16 -> float64 sums,
    never the whole column at once). Returns (float32[D], number of regions)."""
    total, n, dim = None, 0, None
    for f in files:
        pf = pq.ParquetFile(f)
        d = getattr(pf.schema_arrow.field("embedding").type, "list_size", None)
        if not d or d < 1 or (dim is not None and d != dim):
            raise StageError(f"{f}: column 'embedding' is "
                             f"{pf.schema_arrow.field('embedding').type}, expected "
                             f"fixed_size_list<float16>[{dim or 'D'}]")
        dim = d
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["embedding"]):
            emb = batch.column(0).flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
            part = emb.astype(np.float64).sum(axis=0)
            total = part if total is None else total + part
            n += emb.shape[0]
    if not n:
        raise StageError(f"no region embeddings in {len(files)} regions part file(s); run the "
                         f"`regions` stage first")
    norm = np.linalg.norm(total)
    if norm == 0:
        raise StageError("the region embeddings sum to zero: no mean direction")
    return (total / norm).astype(np.float32), n


def hub_cosines(names: Sequence[str], text_emb: np.ndarray, mean: np.ndarray
                ) -> list[tuple[str, float]]:
    """(name, cosine of its text embedding to the region mean), highest first.
    text_emb: float[C, D]; mean: float[D]."""
    t = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
    cos = t @ (mean / np.linalg.norm(mean))
    return sorted(zip(names, (float(c) for c in cos)), key=lambda r: -r[1])


def output_name(ctx: StageContext) -> str:
    return layout.text_file(ctx.dataset.name)


def inputs(ctx: StageContext, cfg: Config) -> dict[str, str]:
    cats = [[c.id, c.name, c.split, list(c.synonyms)] for c in ctx.dataset.categories()]
    return {"teacher": ctx.fingerprint(layout.TEACHER), "categories": canonical_hash(cats),
            "regions": ctx.fingerprint(layout.REGIONS)}


def plan(ctx: StageContext, cfg: Config) -> list[Part]:
    if output_name(ctx) in (NEGATIVES_FILE, REGION_MEAN_FILE):
        raise StageError(f"text: a dataset named {ctx.dataset.name!r} would overwrite "
                         f"text/{output_name(ctx)}")
    check_negatives(cfg.negatives, ctx.dataset.categories())
    return [Part(index=0, items=(ctx.dataset.name,))]


class Worker:
    def __init__(self, ctx: StageContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.teacher = teacher_from_cache(ctx, ctx.resolve_device())
        self.templates = prompt_templates(cfg.templates)

    def run_part(self, part: Part, out: PartOutput) -> PartResult:
        categories = self.ctx.dataset.categories()
        emb = category_embeddings(self.teacher, categories, self.templates,
                                  self.cfg.use_synonyms)
        negatives = tuple(self.cfg.negatives)
        # the same ensemble as a category without synonyms
        neg_cats = [Category(-1 - i, n, "negative") for i, n in enumerate(negatives)]
        neg = (category_embeddings(self.teacher, neg_cats, self.templates, use_synonyms=False)
               if neg_cats else torch.zeros(0, emb.shape[1]))
        mean, n_regions = region_mean(region_files(self.ctx))
        if mean.shape[0] != emb.shape[1]:
            raise StageError(f"{self.ctx.stage_dir(layout.REGIONS)}: region embeddings have "
                             f"D={mean.shape[0]}, the teacher's texts D={emb.shape[1]}; "
                             f"rebuild regions with this teacher")
        pq.write_table(text_table(categories, emb), out.tmp(output_name(self.ctx)))
        pq.write_table(negatives_table(negatives, neg), out.tmp(NEGATIVES_FILE))
        with open(out.tmp(REGION_MEAN_FILE), "wb") as f:
            np.save(f, mean, allow_pickle=False)
        n_prompts = sum(len(prompt_names(c, self.cfg.use_synonyms)) for c in categories)
        return PartResult(rows=len(categories),
                          extra={"embed_dim": int(emb.shape[1]),
                                 "prompts": n_prompts * len(self.templates),
                                 "negatives": len(negatives), "regions": n_regions})


def finalize(ctx: StageContext, cfg: Config, stats: list[dict]) -> dict:
    folder = ctx.stage_dir(NAME)
    table = pq.read_table(folder / output_name(ctx))
    d = stats[0]["embed_dim"]
    text_emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, d)
    split = dict(zip(table.column("name").to_pylist(), table.column("split").to_pylist()))
    mean = np.load(folder / REGION_MEAN_FILE, allow_pickle=False)
    hub = hub_cosines(table.column("name").to_pylist(), text_emb, mean)
    print(f"[text] hub check: cosine of each text to the mean of {stats[0]['regions']} "
          f"region embeddings (highest first)")
    for name, cos in hub:
        print(f"  {cos:+.4f}  {name}  ({split[name]})")
    return {"teacher": ctx.upstream(layout.TEACHER)["teacher"], "embed_dim": d,
            "file": output_name(ctx), "prompts": stats[0]["prompts"],
            "negatives": {"file": NEGATIVES_FILE, "rows": stats[0]["negatives"]},
            "region_mean": {"file": REGION_MEAN_FILE, "regions": stats[0]["regions"]},
            "hub_cosine": {name: round(cos, 6) for name, cos in hub}}
