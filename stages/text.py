"""The `text` stage: one prompt-ensembled CLIP text embedding per vocabulary category.

For each category every (synonym, template) prompt is encoded and L2-normalised; the mean over
all of them is L2-normalised again (ViLD / LVIS practice; a category without synonyms has just
its name). Templates come from `open_clip.zero_shot_metadata` ("openai": 80, "simple": 7).

Output: `text/<dataset>.parquet`, one row per category: category_id int64, name string,
split string (base | novel), embedding fixed_size_list<float32>[D].
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.cache import canonical_hash
from pipeline.manifests import Category
from pipeline.runner import Part, PartOutput, PartResult, StageContext
from stages.teacher import Teacher, prompt_templates, teacher_from_cache, text_embeddings

NAME = "text"
RESOURCES = {"num_cpus": 1, "num_gpus": 1}


@dataclass(frozen=True)
class Config:
    templates: str = "openai"  # open_clip.zero_shot_metadata list: openai | simple
    use_synonyms: bool = True  # average in the annotation file's synonyms (LVIS)


def prompt_names(category: Category, use_synonyms: bool = True) -> list[str]:
    """The names a category is prompted with: its name, then its synonyms, with LVIS-style
    underscores read as spaces and duplicates dropped (LVIS lists the name as a synonym)."""
    names = [category.name, *(category.synonyms if use_synonyms else ())]
    return list(dict.fromkeys(n.replace("_", " ").strip() for n in names))


def synonym_templates(names: Sequence[str], templates: Sequence[Callable[[str], str] | str]
                      ) -> list[Callable[[str], str]]:
    """Every (name, template) pair as one template of its category, so a plain prompt ensemble
    over them is the flat (synonym x template) average. A template is a callable or a
    `str.format` pattern, as open_clip takes them."""
    def prompt(_category: str, n: str, t) -> str:
        return t.format(n) if isinstance(t, str) else t(n)

    return [partial(prompt, n=n, t=t) for n in names for t in templates]


def category_embeddings(teacher: Teacher, categories: Sequence[Category], templates: Sequence,
                        use_synonyms: bool = True) -> torch.Tensor:
    """Prompt-ensembled text embeddings -> Tensor[C, D] float32, L2-normalised, in the order
    of `categories`."""
    rows = [text_embeddings(teacher, [c.name],
                            synonym_templates(prompt_names(c, use_synonyms), templates))
            for c in categories]
    return torch.cat(rows).float().cpu()


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


def output_name(ctx: StageContext) -> str:
    return f"{ctx.dataset.name}.parquet"


def inputs(ctx: StageContext, cfg: Config) -> dict[str, str]:
    cats = [[c.id, c.name, c.split, list(c.synonyms)] for c in ctx.dataset.categories()]
    return {"teacher": ctx.fingerprint("teacher"), "categories": canonical_hash(cats)}


def plan(ctx: StageContext, cfg: Config) -> list[Part]:
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
        pq.write_table(text_table(categories, emb), out.tmp(output_name(self.ctx)))
        n_prompts = sum(len(prompt_names(c, self.cfg.use_synonyms)) for c in categories)
        return PartResult(rows=len(categories),
                          extra={"embed_dim": int(emb.shape[1]),
                                 "prompts": n_prompts * len(self.templates)})


def finalize(ctx: StageContext, cfg: Config, stats: list[dict]) -> dict:
    return {"teacher": ctx.upstream("teacher")["teacher"], "embed_dim": stats[0]["embed_dim"],
            "file": output_name(ctx), "prompts": stats[0]["prompts"]}
