"""Stage `phrases`: the noun phrases of every pair caption and their teacher embeddings
(DetCLIPv2's word side), plus the concept dictionary's own embeddings for negatives.

Phrases come from the concept dictionary (pipeline/phrases.py: the vocabulary's names and
synonyms plus the optional `pairs.concepts` list; longest match, case-insensitive, counted per
caption) or, with `extractor: spacy`, from spaCy's noun chunks (an optional extra; a chunk
that is a dictionary surface form becomes that concept's name).

Each distinct phrase is embedded once per worker with the text stage's own prompt ensemble:
its templates and use_synonyms are read from the finished text manifest (never set here, so
the two cannot differ), and a category's phrase is prompted with its synonyms exactly like the
text stage, so it has that category's text embedding.

Outputs, in `phrases/` (schemas in pipeline/phrases.py): `part-NNNNN.parquet`, one row per
pair row (empty lists when a caption names nothing); `dictionary.parquet`, every dictionary
concept (written by part 0). A manifest without a `pairs:` block plans zero parts.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from ovdistill.pipeline import layout
from ovdistill.pipeline.cache import sha256_file
from ovdistill.pipeline.clip_teacher import (
    TextPrompts,
    category_embeddings,
    prompt_templates,
    teacher_from_cache,
)
from ovdistill.pipeline.errors import reject
from ovdistill.pipeline.manifests import Category
from ovdistill.pipeline.pair_sources import read_pairs
from ovdistill.pipeline.phrases import (
    dictionary_table,
    extract_phrases,
    load_spacy,
    manifest_dictionary,
    phrases_table,
    spacy_noun_chunks,
    spacy_version,
)
from ovdistill.pipeline.runner import (
    Part,
    PartOutput,
    PartResult,
    StageContext,
    StageError,
    chunk_parts,
)

NAME = "phrases"
RESOURCES = {"num_cpus": 1, "num_gpus": 1}
EXTRACTORS = ("dictionary", "spacy")
OTHER_SPLIT = "other"  # a spaCy phrase that is no dictionary concept
TOP_PHRASES = 10


@dataclass(frozen=True)
class Config:
    extractor: str = "dictionary"  # dictionary | spacy (needs `pip install 'ovdistill[spacy]'`)
    spacy_model: str = "en_core_web_sm"
    pairs_per_part: int = 1000


def text_prompts(ctx: StageContext) -> TextPrompts:
    """The prompt settings the finished text stage used."""
    return TextPrompts.from_dict(ctx.upstream(layout.TEXT)["config"])


def inputs(ctx: StageContext, cfg: Config) -> dict[str, str]:
    out = {"pairs": ctx.fingerprint(layout.PAIRS)}
    if ctx.dataset.pairs is None:
        return out
    out.update(teacher=ctx.fingerprint(layout.TEACHER), text=ctx.fingerprint(layout.TEXT),
               dictionary=manifest_dictionary(ctx.dataset).fingerprint())
    if ctx.dataset.pairs.concepts:
        out["concepts_sha256"] = sha256_file(ctx.dataset.pairs.concepts)
    if cfg.extractor == "spacy":
        out["spacy"] = spacy_version(cfg.spacy_model)
    return out


def plan(ctx: StageContext, cfg: Config) -> list[Part]:
    if cfg.extractor not in EXTRACTORS:
        raise StageError(f"phrases.extractor must be one of {EXTRACTORS}, got {cfg.extractor!r}")
    if cfg.pairs_per_part < 1:
        raise StageError(f"phrases.pairs_per_part must be >= 1, got {cfg.pairs_per_part}")
    if ctx.dataset.pairs is None:
        return []
    if cfg.extractor == "spacy":
        load_spacy(cfg.spacy_model)  # the one-line install hint before any worker starts
    ids = read_pairs(ctx.files, columns=["image_id"]).column("image_id").to_pylist()
    if len(set(ids)) != len(ids):
        dup = next(i for i, k in Counter(ids).items() if k > 1)
        raise StageError(f"{ctx.stage_dir(layout.PAIRS)}: image_id {dup} appears more than "
                         f"once; rebuild the pairs stage")
    return chunk_parts(sorted(ids), cfg.pairs_per_part)


def pair_rows(files: list, ids: tuple[int, ...]) -> pa.Table:
    """The (image_id, caption) rows of `ids` from the pairs parts, in `ids` order."""
    want = pa.array(ids, pa.int64())
    data = pads.dataset([str(f) for f in files], format="parquet")
    t = data.to_table(columns=["image_id", "caption"],
                      filter=(pads.field("image_id") >= min(ids))
                      & (pads.field("image_id") <= max(ids)))
    t = t.filter(pc.is_in(t.column("image_id"), value_set=want))
    order = pc.index_in(want, value_set=t.column("image_id").combine_chunks())
    if order.null_count:
        missing = ids[order.to_pylist().index(None)]
        raise StageError(f"pairs image_id {missing} was planned but is in no pairs part; "
                         f"the pairs stage changed: rerun phrases with --rebuild")
    return t.take(order)


class Worker:
    def __init__(self, ctx: StageContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.teacher = teacher_from_cache(ctx, ctx.resolve_device())
        self.prompts = text_prompts(ctx)
        self.templates = prompt_templates(self.prompts.templates)
        self.dictionary = manifest_dictionary(ctx.dataset)
        self.concepts = {c.name: c for c in self.dictionary.concepts}
        self.files = ctx.files.parts(layout.PAIRS)
        self.embedding: dict[str, np.ndarray] = {}  # phrase -> float32[D], once per worker

    def embed(self, phrases: list[str]) -> None:
        """Embed the phrases not embedded yet: a concept with its synonyms (as the text stage
        prompts a category), any other phrase as a name without synonyms."""
        todo = [p for p in dict.fromkeys(phrases) if p not in self.embedding]
        if not todo:
            return
        cats = []
        for i, p in enumerate(todo):
            c = self.concepts.get(p)
            cats.append(Category(-1 - i, p, c.split if c else OTHER_SPLIT,
                                 c.synonyms if c else ()))
        emb = category_embeddings(self.teacher, cats, self.templates,
                                  self.prompts.use_synonyms).numpy()
        self.embedding.update(zip(todo, emb))

    def extract(self, captions: list[str]) -> list[list[tuple[str, int]]]:
        if self.cfg.extractor == "dictionary":
            return [extract_phrases(c, self.dictionary) for c in captions]
        out = []
        for row in spacy_noun_chunks(captions, self.cfg.spacy_model):
            merged: dict[str, int] = {}
            for p, k in row:
                name = self.dictionary.canonical(p) or p
                merged[name] = merged.get(name, 0) + k
            out.append(list(merged.items()))
        return out

    def run_part(self, part: Part, out: PartOutput) -> PartResult:
        rows = pair_rows(self.files, part.items)
        ids, captions, rejects = [], [], []
        for iid, cap in zip(rows.column("image_id").to_pylist(),
                            rows.column("caption").to_pylist()):
            if cap is None:
                rejects.append(reject(iid, None, "pairs row has no caption"))
                continue
            ids.append(iid)
            captions.append(cap)
        extracted = self.extract(captions)
        self.embed([p for row in extracted for p, _ in row])
        dim = self.teacher.embed_dim
        if part.index == 0:
            self.embed(self.dictionary.names)
            emb = np.stack([self.embedding[n] for n in self.dictionary.names])
            pq.write_table(dictionary_table(self.dictionary, emb),
                           out.tmp(layout.DICTIONARY_FILE))
        pq.write_table(phrases_table(ids, extracted, self.embedding, dim),
                       out.tmp(f"{part.stem}.parquet"))
        mentions: Counter = Counter()
        for row in extracted:
            mentions.update(dict(row))
        with_phrases = sum(bool(row) for row in extracted)
        return PartResult(rows=len(ids), rejects=rejects,
                          extra={"embed_dim": dim, "with_phrases": with_phrases,
                                 "without_phrases": len(ids) - with_phrases,
                                 "mentions": dict(mentions)})


def finalize(ctx: StageContext, cfg: Config, stats: list[dict]) -> dict:
    if ctx.dataset.pairs is None or not stats:
        print("[phrases] no image-text pairs (the manifest has no pairs: block or the pairs "
              "stage kept none): nothing to do")
        return {"pairs": 0, "with_phrases": 0, "without_phrases": 0, "distinct_phrases": 0}
    dictionary = manifest_dictionary(ctx.dataset)
    mentions: Counter = Counter()
    for s in stats:
        mentions.update(s["mentions"])
    by_split: dict[str, dict[str, int]] = {}
    for name, k in mentions.items():
        split = dictionary.split_of(name) or OTHER_SPLIT
        entry = by_split.setdefault(split, {"distinct": 0, "mentions": 0})
        entry["distinct"] += 1
        entry["mentions"] += k
    top = sorted(mentions.items(), key=lambda r: (-r[1], r[0]))[:TOP_PHRASES]
    pairs = sum(s["rows"] for s in stats)
    with_phrases = sum(s["with_phrases"] for s in stats)
    splits = sorted(by_split)
    print(f"[phrases] {pairs} pairs: {with_phrases} with >= 1 phrase, {pairs - with_phrases} "
          f"without; {len(mentions)} distinct phrases ({cfg.extractor})")
    print("  by split: " + ", ".join(f"{s} {by_split[s]['distinct']} distinct / "
                                     f"{by_split[s]['mentions']} mentions" for s in splits))
    for name, k in top:
        print(f"  {k:6d}  {name}")
    return {"teacher": ctx.upstream(layout.TEACHER)["teacher"],
            "embed_dim": stats[0]["embed_dim"], "pairs": pairs,
            "with_phrases": with_phrases, "without_phrases": pairs - with_phrases,
            "distinct_phrases": len(mentions), "top_phrases": [[n, k] for n, k in top],
            "by_split": by_split,
            "dictionary": {"file": layout.DICTIONARY_FILE, "rows": len(dictionary.concepts),
                           "by_split": dict(Counter(c.split for c in dictionary.concepts))},
            "prompts": {"templates": text_prompts(ctx).templates,
                        "use_synonyms": text_prompts(ctx).use_synonyms}}
