"""The `regions` stage: the teacher's CLIP embedding of every train-split proposal,
normalize(V(crop 1x) + V(crop 1.5x)) (ViLD).

Per image (pipeline/region_embedding.py): decode once (`load_rgb`) and make all 2M crops in a few batched ops on the compute
device, resampled as the teacher's own preprocess (its interpolation, shortest-side resize and
centre crop) resamples a PIL crop (`pipeline/crops.py`), both in a small thread pool so they
overlap the encoder; the encoder gets full batches cut across images (`batch_size` crops).
bf16 autocast on CUDA (the teacher's), fp32 on CPU.

On CUDA the decode threads do not stall on the encoder: images and boxes go to the device from
pinned memory without blocking, each thread makes its crops on a CUDA stream of its own (so
the one read-back per image in `crops.py` waits only for that thread's kernels, not for the
encoder batches queued on the default stream), and the embeddings stay on the device until
one copy to the host per part. On the CPU the arithmetic is exactly the same.

Parts follow the proposals parts: regions part i holds the train-split images of proposals
part i (possibly none: then an empty file). Output `regions/part-NNNNN.parquet`, one row per
proposal: the proposal columns (image_id, rank, box, score) + embedding
fixed_size_list<float16>[D], L2-normalised.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ovdistill.pipeline import layout
from ovdistill.pipeline.annotations import read_images
from ovdistill.pipeline.clip_teacher import Teacher, teacher_from_cache
from ovdistill.pipeline.crops import CROPS_VERSION, combine_views  # noqa: F401 - re-exported
from ovdistill.pipeline.errors import reject
from ovdistill.pipeline.manifests import ManifestError, contained_path, image_file
from ovdistill.pipeline.region_embedding import (  # noqa: F401 - the library's names, re-exported
    BATCH_SIZE,
    BOX_SLACK,
    CONTEXT_SCALE,
    DECODE_THREADS,
    boxes_array,
    crop_stream,
    embed_regions,
    image_groups,
    prefetch,
    ready_on_current_stream,
    rebatch,
    region_embeddings,
    streamed_crops,
    teacher_crops,
    to_device,
    with_embeddings,
)
from ovdistill.pipeline.runner import Part, PartOutput, PartResult, StageContext, StageError

NAME = "regions"
RESOURCES = {"num_cpus": 1, "num_gpus": 1}

@dataclass(frozen=True)
class Config:
    split: str = "train"  # the split whose proposals are embedded
    batch_size: int = BATCH_SIZE  # crops per encoder call, cut across images
    context_scale: float = CONTEXT_SCALE  # the second crop: same centre, width and height x this
    decode_threads: int = DECODE_THREADS  # decode + crop threads per worker (0: inline)


# ----------------------------------------------------------------------------- the stage


def proposals_file(ctx: StageContext, index: int) -> Path:
    return layout.part_file(ctx.stage_dir(layout.PROPOSALS), index)


def image_files(annotations: Path) -> dict[int, str]:
    """{image id: file relative to the split's image folder} of a COCO/LVIS-format file."""
    images = read_images(annotations)  # an unreadable file: one AnnotationError line
    try:
        return {int(im["id"]): image_file(im) for im in images}
    except (KeyError, TypeError, ValueError) as e:
        raise StageError(f"{annotations}: cannot read the image list "
                         f"({type(e).__name__}: {e})") from None


def inputs(ctx: StageContext, cfg: Config) -> dict[str, str]:
    return {"teacher": ctx.fingerprint(layout.TEACHER),
            "proposals": ctx.fingerprint(layout.PROPOSALS),
            "crops": CROPS_VERSION}


def plan(ctx: StageContext, cfg: Config) -> list[Part]:
    """Part i = the `cfg.split` images of proposals part i, as sorted (image_id, file_name)."""
    n_parts = int(ctx.upstream(layout.PROPOSALS)["n_parts"])
    split = ctx.dataset.split(cfg.split)
    names = image_files(split.annotations)
    parts = []
    for i in range(n_parts):
        path = proposals_file(ctx, i)
        if not path.exists():
            raise StageError(f"{path} is missing although the proposals stage finished; "
                             f"rerun it with --rebuild")
        ids = pc.unique(pq.read_table(path, columns=["image_id"]).column("image_id"))
        items = sorted((int(iid), names[int(iid)]) for iid in ids.to_pylist()
                       if int(iid) in names)
        parts.append(Part(index=i, items=tuple(items)))
    return parts


def embed_proposals(teacher: Teacher, proposals: pa.Table, files: Sequence[tuple[int, Path]],
                    cfg: Config) -> tuple[pa.Table, list[dict]]:
    """`region_embedding.embed_regions` with this stage's settings."""
    return embed_regions(teacher, proposals, files, batch_size=cfg.batch_size,
                         context_scale=cfg.context_scale, decode_threads=cfg.decode_threads)


class Worker:
    def __init__(self, ctx: StageContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.teacher = teacher_from_cache(ctx, ctx.resolve_device())
        self.images_dir = ctx.dataset.split(cfg.split).images

    def run_part(self, part: Part, out: PartOutput) -> PartResult:
        start = time.time()
        files, refused = [], []
        for iid, name in part.items:
            try:
                files.append((iid, contained_path(self.images_dir, name)))
            except ManifestError as e:
                refused.append(reject(iid, self.images_dir, f"image {iid}: {e}"))
        proposals = pq.read_table(proposals_file(self.ctx, part.index))
        table, rejects = embed_proposals(self.teacher, proposals, files, self.cfg)
        pq.write_table(table, out.tmp(f"{part.stem}.parquet"))
        seconds = time.time() - start
        return PartResult(rows=len(table), rejects=refused + rejects,
                          extra={"images": len(files) - len(rejects), "crops": 2 * len(table),
                                 "embed_dim": self.teacher.embed_dim,
                                 "crops_per_s": round(2 * len(table) / max(seconds, 1e-9), 1)})


def finalize(ctx: StageContext, cfg: Config, stats: list[dict]) -> dict:
    crops = sum(s["crops"] for s in stats)
    seconds = sum(s["seconds"] for s in stats)
    return {
        "teacher": ctx.upstream(layout.TEACHER)["teacher"],
        "embed_dim": stats[0]["embed_dim"] if stats else None,
        "images": sum(s["images"] for s in stats),
        "crops": crops,
        "crops_per_s": round(crops / seconds, 1) if seconds else None,
    }
