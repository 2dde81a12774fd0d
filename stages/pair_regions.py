"""Stage `pair_regions`: the teacher's CLIP embedding of the pair proposals (stage
`pair_proposals`), normalize(V(crop 1x) + V(crop 1.5x)) (ViLD), exactly as stage `regions`
embeds the detection proposals: the same library (`pipeline/region_embedding.embed_regions`:
the same crops, CROPS_VERSION, batching and teacher), the same precision policy (bf16 autocast
on CUDA, fp32 on the CPU; the runner records device and precision in the inputs).

Only the first `top_k` proposals of each pair by rank are embedded (DetCLIPv2's top-k; the
pseudo-grounding of stage `pseudo_boxes` reads these). Pair images are read through
`pipeline/pair_sources.py` (a plain file or a member of a webdataset .tar); one that cannot be
read or decoded, whose decoded size is no longer the pairs row's, or whose boxes do not fit
it, is a reject naming the pair, and the part goes on.

Parts are fixed chunks of the sorted pair ids (`images_per_part`). Output
`pair_regions/part-NNNNN.parquet` in the regions schema, one row per embedded proposal: the
proposal columns (image_id, rank, box, score) + embedding fixed_size_list<float16>[D],
L2-normalised, sorted by image_id then rank. A pair without proposals has no rows (not a
reject). A dataset without a `pairs:` block plans zero parts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from ovdistill.pipeline import layout
from ovdistill.pipeline.clip_teacher import teacher_from_cache
from ovdistill.pipeline.crops import CROPS_VERSION
from ovdistill.pipeline.images import DEFAULT_MAX_PIXELS
from ovdistill.pipeline.pair_sources import (
    PairImage,
    load_pair_image,
    pair_image_root,
    read_pairs,
)
from ovdistill.pipeline.propose import SCHEMA as PROPOSALS_SCHEMA
from ovdistill.pipeline.region_embedding import (
    BATCH_SIZE,
    CONTEXT_SCALE,
    DECODE_THREADS,
    embed_regions,
)
from ovdistill.pipeline.runner import (
    Part,
    PartOutput,
    PartResult,
    StageContext,
    StageError,
    chunk_parts,
)

NAME = layout.PAIR_REGIONS
RESOURCES = {"num_cpus": 1, "num_gpus": 1}


@dataclass(frozen=True)
class Config:
    batch_size: int = BATCH_SIZE  # crops per encoder call, cut across images
    context_scale: float = CONTEXT_SCALE  # the second crop: same centre, width and height x this
    decode_threads: int = DECODE_THREADS  # decode + crop threads per worker (0: inline)
    top_k: int = 100  # embed only the first top_k proposals of each pair by rank
    images_per_part: int = 100
    max_pixels: int = DEFAULT_MAX_PIXELS


def top_proposals(files: list[Path], image_ids, top_k: int) -> pa.Table:
    """The pair_proposals rows of `image_ids` with rank < top_k (proposals schema)."""
    if not files or not len(image_ids):
        return PROPOSALS_SCHEMA.empty_table()
    ids = pa.array(list(image_ids), pa.int64())
    data = pads.dataset([str(f) for f in files], format="parquet")
    table = data.to_table(filter=pads.field("image_id").isin(ids)
                          & (pads.field("rank") < top_k))
    return table.select(PROPOSALS_SCHEMA.names).cast(PROPOSALS_SCHEMA)


def inputs(ctx: StageContext, cfg: Config) -> dict[str, str]:
    out = {"pairs": ctx.fingerprint(layout.PAIRS), "crops": CROPS_VERSION}
    if ctx.dataset.pairs is None:  # zero parts: no teacher, no proposals needed
        return out
    return {**out, "teacher": ctx.fingerprint(layout.TEACHER),
            "pair_proposals": ctx.fingerprint(layout.PAIR_PROPOSALS)}


def plan(ctx: StageContext, cfg: Config) -> list[Part]:
    if cfg.top_k < 1:
        raise StageError(f"pair_regions.top_k must be >= 1, got {cfg.top_k}")
    if cfg.images_per_part < 1:
        raise StageError(f"pair_regions.images_per_part must be >= 1, got {cfg.images_per_part}")
    if ctx.dataset.pairs is None:
        return []
    ids = read_pairs(ctx.files, columns=["image_id"])["image_id"].to_pylist()
    return chunk_parts(sorted(ids), cfg.images_per_part)


class Worker:
    """Loads the teacher once; each part embeds the top_k proposals of its pairs."""

    def __init__(self, ctx: StageContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.teacher = teacher_from_cache(ctx, ctx.resolve_device())
        self.root = str(pair_image_root(ctx.dataset, ctx.files))
        rows = read_pairs(ctx.files, columns=["image_id", "file", "offset", "size", "width",
                                              "height"])
        self.rows = {r["image_id"]: r for r in rows.to_pylist()}
        self.proposal_files = ctx.files.parts(layout.PAIR_PROPOSALS)

    def source(self, image_id: int) -> PairImage:
        r = self.rows[image_id]
        return PairImage(self.root, r["file"], r["offset"], r["size"], r["width"], r["height"])

    def run_part(self, part: Part, out: PartOutput) -> PartResult:
        start = time.time()
        proposals = top_proposals(self.proposal_files, part.items, self.cfg.top_k)
        with_boxes = set(pc.unique(proposals["image_id"]).to_pylist())
        files = [(i, self.source(i)) for i in part.items if i in with_boxes]
        table, rejects = embed_regions(
            self.teacher, proposals, files, batch_size=self.cfg.batch_size,
            context_scale=self.cfg.context_scale, decode_threads=self.cfg.decode_threads,
            load=lambda s: load_pair_image(s, self.cfg.max_pixels))
        pq.write_table(table, out.tmp(f"{part.stem}.parquet"))
        seconds = time.time() - start
        return PartResult(rows=len(table), rejects=rejects,
                          extra={"images": len(files) - len(rejects),
                                 "without_proposals": len(part.items) - len(files),
                                 "crops": 2 * len(table), "embed_dim": self.teacher.embed_dim,
                                 "crops_per_s": round(2 * len(table) / max(seconds, 1e-9), 1)})


def finalize(ctx: StageContext, cfg: Config, stats: list[dict]) -> dict:
    crops = sum(s["crops"] for s in stats)
    seconds = sum(s["seconds"] for s in stats)
    teacher = (ctx.upstream(layout.TEACHER)["teacher"]
               if ctx.dataset.pairs is not None else None)
    return {
        "teacher": teacher,
        "embed_dim": stats[0]["embed_dim"] if stats else None,
        "pairs": sum(s["items"] for s in stats),
        "images": sum(s["images"] for s in stats),
        "without_proposals": sum(s["without_proposals"] for s in stats),
        "crops": crops,
        "crops_per_s": round(crops / seconds, 1) if seconds else None,
    }
