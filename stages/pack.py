"""Stage `pack`: WebDataset shards for the trainer, one sample per training image.

    key  img<image_id>
    .jpg        the image (the file's own bytes when it is a plain JPEG, else re-encoded)
    .boxes.npy  float32[M, 4] cached proposals (x1, y1, x2, y2) in original pixels, by rank
    .scores.npy float32[M] their RPN scores (the regions' `score` column), same order
    .emb.npy    float16[M, D] their L2-normalised teacher embeddings
    .json       {"image_id", "file_name", "width", "height", "gt_boxes" (xyxy, base categories,
                 iscrowd excluded), "gt_category_ids"}

`.scores.npy` feeds the trainer's confident-proposal options (`distill_min_score`,
`distill_top_k`); shards packed before it existed still train (trainer/data.py reads their
scores as 1, so those options then keep every proposal).

Written to `<cache>/<ds>/wds/train-NNNNNN.tar` (the stage's folder is `wds/`, FOLDER below)
with `sizes.json` beside. `regions/*.parquet` stays the canonical store: a
new shard size is a config change of this stage (`--set pack.max_samples=... --rebuild`),
nothing upstream reruns.

Shards are planned before anything is written: images (sorted by id) are added to a shard
until `max_samples` or `max_bytes` would be exceeded. The byte count is exact (tar headers,
512-byte padding, the npy headers, the json and jpg payloads), so part index == shard index
and a resumed or repeated run writes the same shards. Every member is plain bytes (npy via
`numpy.lib.format` without pickle), so readers decode without unpickling anything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from ovdistill.pipeline import layout
from ovdistill.pipeline.annotations import images_by_id, load_annotations, xywh_to_xyxy
from ovdistill.pipeline.cache import atomic_write_json
from ovdistill.pipeline.errors import reject
from ovdistill.pipeline.manifests import ManifestError, image_file, image_path
from ovdistill.pipeline.runner import Part, PartOutput, PartResult, StageContext, StageError
from ovdistill.pipeline.shards import (  # noqa: F401 - re-exported: pack.plan_shards, ...
    TAR_BLOCK,
    TAR_MTIME,
    TAR_RECORD,
    is_plain_jpeg,
    jpeg_payload,
    json_bytes,
    npy_bytes,
    npy_nbytes,
    plan_shards,
    sample_tar_bytes,
    tar_file_bytes,
    tar_member_bytes,
    write_shard,
)

NAME = "pack"
FOLDER = layout.WDS  # the contract's shard folder: <cache>/<ds>/wds/
RESOURCES = {"num_cpus": 1, "num_gpus": 0}

SIZES_FILE = layout.SIZES_FILE


@dataclass(frozen=True)
class Config:
    split: str = "train"
    max_samples: int = 1000  # images per shard
    max_bytes: int = 512 * 2**20  # shard file size cap (a lone larger sample gets its own shard)
    jpeg_quality: int = 95  # only for images that must be re-encoded (not a plain JPEG)


shard_name = layout.shard_name  # train-NNNNNN.tar


def sample_key(image_id: int) -> str:
    return f"img{int(image_id)}"


# ----------------------------------------------------------------------------- sizes


def sample_bytes(jpg: int, boxes_npy: int, scores_npy: int, emb_npy: int, meta_json: int
                 ) -> int:
    """Tar bytes of one sample from its five payload lengths."""
    return sum(tar_member_bytes(n) for n in (jpg, boxes_npy, scores_npy, emb_npy, meta_json))


# ----------------------------------------------------------------------------- samples


def planned_jpeg_size(path: Path, quality: int) -> int:
    """Length of `jpeg_payload(path)`, reading only the header for a plain JPEG (0 when the
    image is unreadable: the worker rejects it)."""
    from ovdistill.pipeline.images import ImageError

    if is_plain_jpeg(path):
        return os.path.getsize(path)
    try:
        return len(jpeg_payload(path, quality)[0])
    except ImageError:
        return 0


def sample_meta(image: dict, anns: list[dict], base_ids: set[int]) -> dict:
    """The `.json` member: the image record and its base-category, non-crowd GT boxes
    (COCO xywh -> x1, y1, x2, y2 in original pixels)."""
    boxes, cats = [], []
    for a in anns:
        if a.get("iscrowd", 0) or int(a["category_id"]) not in base_ids:
            continue
        boxes.append(xywh_to_xyxy([float(v) for v in a["bbox"]]))
        cats.append(int(a["category_id"]))
    return {"image_id": int(image["id"]), "file_name": image_file(image),
            "width": int(image["width"]), "height": int(image["height"]),
            "gt_boxes": boxes, "gt_category_ids": cats}


meta_bytes = json_bytes


@dataclass(frozen=True)
class SplitIndex:
    """What the pack stage needs from a split's annotation file."""

    images: dict  # image_id -> image record
    anns: dict  # image_id -> [annotation, ...]
    image_dir: Path
    annotations: Path
    base_ids: frozenset


def load_split(ctx: StageContext, split: str) -> SplitIndex:
    s = ctx.dataset.split(split)
    valid = load_annotations(s.annotations)  # the kept (and clipped) annotations
    images = images_by_id(valid.images)
    anns = valid.by_image()
    base = frozenset(c.id for c in ctx.dataset.categories() if c.split == "base")
    return SplitIndex(images, anns, s.images, s.annotations, base)


# ----------------------------------------------------------------------------- regions


def region_files(ctx: StageContext) -> list[Path]:
    return ctx.files.parts(layout.REGIONS)


def embedding_dim(path: Path) -> int:
    field = pq.read_schema(path).field("embedding")
    size = getattr(field.type, "list_size", -1)
    if size is None or size < 1:
        raise StageError(f"{path}: column 'embedding' is {field.type}, "
                         f"expected fixed_size_list<float16>[D]")
    return int(size)


def regions_layout(files: list[Path]) -> tuple[dict[int, tuple[Path, int]], int]:
    """image_id -> (regions file, number of proposals M), and the embedding dim D."""
    where: dict[int, tuple[Path, int]] = {}
    dim = 0
    for f in files:
        d = embedding_dim(f)
        if dim and d != dim:
            raise StageError(f"{f}: embedding dim {d} differs from {dim} in {files[0]}")
        dim = d
        ids, counts = np.unique(pq.read_table(f, columns=["image_id"])["image_id"].to_numpy(),
                                return_counts=True)
        for i, n in zip(ids.tolist(), counts.tolist()):
            if i in where:
                raise StageError(f"{f}: image {i} also appears in {where[i][0]}")
            where[i] = (f, n)
    return where, dim


def read_regions(path: Path, image_ids: list[int]
                 ) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """image_id -> (boxes float32[M, 4], scores float32[M], embeddings float16[M, D]) in rank
    order."""
    t = pq.read_table(path, columns=["image_id", "rank", "box", "score", "embedding"],
                      filters=[("image_id", "in", list(image_ids))])
    t = t.sort_by([("image_id", "ascending"), ("rank", "ascending")])
    dim = t.schema.field("embedding").type.list_size
    ids = t["image_id"].to_numpy()
    boxes = t["box"].combine_chunks().flatten().to_numpy().reshape(-1, 4).astype(np.float32)
    scores = t["score"].to_numpy().astype(np.float32)
    emb = t["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim)
    out = {}
    uniq, start = np.unique(ids, return_index=True)
    stops = list(start[1:]) + [len(ids)]
    for i, a, b in zip(uniq.tolist(), start.tolist(), stops):
        out[i] = (boxes[a:b], scores[a:b], emb[a:b].astype(np.float16, copy=False))
    return out


# ----------------------------------------------------------------------------- stage


MEMBERS = " ".join(layout.SHARD_MEMBERS)  # an input: an older layout needs --rebuild


def inputs(ctx: StageContext, cfg: Config) -> dict[str, str]:
    return {**{name: ctx.fingerprint(name) for name in (layout.DATASET, layout.TEACHER, layout.REGIONS)},
            "members": MEMBERS}


def sample_sizes(ctx: StageContext, cfg: Config) -> dict[int, int]:
    """image_id -> exact tar bytes of its sample, for every image with regions rows (0 for
    one the worker will reject: not in the annotations or unreadable)."""
    where, dim = regions_layout(region_files(ctx))
    split = load_split(ctx, cfg.split)
    sizes = {}
    for i in sorted(where):
        m = where[i][1]
        image = split.images.get(i)
        if image is None:
            sizes[i] = 0
            continue
        try:
            file = image_path(split.image_dir, image)
        except ManifestError:
            sizes[i] = 0
            continue
        meta = sample_meta(image, split.anns.get(i, []), split.base_ids)
        sizes[i] = sample_bytes(
            planned_jpeg_size(file, cfg.jpeg_quality),
            npy_nbytes((m, 4), np.float32), npy_nbytes((m,), np.float32),
            npy_nbytes((m, dim), np.float16),
            len(meta_bytes(meta)))
    return sizes


def plan(ctx: StageContext, cfg: Config) -> list[Part]:
    sizes = sample_sizes(ctx, cfg)
    shards = plan_shards(list(sizes), list(sizes.values()), cfg.max_samples, cfg.max_bytes)
    return [Part(index=k, items=tuple(s)) for k, s in enumerate(shards)]


class Worker:
    def __init__(self, ctx: StageContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.where, self.dim = regions_layout(region_files(ctx))
        self.split = load_split(ctx, cfg.split)

    def sample(self, image_id: int, regions: dict) -> tuple[dict | None, dict | None]:
        """(the tar sample of one image, None) or (None, a reject naming the file)."""
        from ovdistill.pipeline.images import ImageError

        image = self.split.images.get(image_id)
        if image is None:
            return None, reject(image_id, self.split.image_dir,
                                f"image id {image_id} is in regions but not in the "
                                f"{self.cfg.split} annotations")
        try:
            file = image_path(self.split.image_dir, image)
            jpg, (w, h) = jpeg_payload(file, self.cfg.jpeg_quality)
        except ManifestError as e:
            return None, reject(image_id, self.split.annotations, e)
        except ImageError as e:
            return None, reject(image_id, file, e)
        if (w, h) != (int(image["width"]), int(image["height"])):
            return None, reject(image_id, file,
                                f"{file}: decoded size {w}x{h} differs from the "
                                f"annotation's {image['width']}x{image['height']}")
        boxes, scores, emb = regions[image_id]
        meta = sample_meta(image, self.split.anns.get(image_id, []), self.split.base_ids)
        return {"__key__": sample_key(image_id), "jpg": jpg, "boxes.npy": npy_bytes(boxes),
                "scores.npy": npy_bytes(scores), "emb.npy": npy_bytes(emb),
                "json": meta_bytes(meta)}, None

    def run_part(self, part: Part, out: PartOutput) -> PartResult:
        by_file: dict[Path, list[int]] = {}
        for i in part.items:
            by_file.setdefault(self.where[i][0], []).append(i)
        regions = {}
        for f, ids in by_file.items():
            regions.update(read_regions(f, ids))

        name = shard_name(part.index)
        path = out.tmp(name)
        written, members, rejects = write_shard(path, part.items,
                                                lambda i: self.sample(i, regions))
        return PartResult(rows=written, rejects=rejects,
                          extra={"shard": name, "bytes": os.path.getsize(path),
                                 "expected_bytes": tar_file_bytes(members)})


def finalize(ctx: StageContext, cfg: Config, stats: list[dict]) -> dict:
    sizes = {s["shard"]: s["rows"] for s in sorted(stats, key=lambda s: s["part"])}
    atomic_write_json(ctx.stage_dir(FOLDER) / SIZES_FILE, sizes)
    split = load_split(ctx, cfg.split)
    where, dim = regions_layout(region_files(ctx))
    packed = sum(sizes.values())
    total = sum(s["bytes"] for s in stats)
    teacher = (ctx.upstream(layout.REGIONS).get("teacher")
               or ctx.upstream(layout.TEACHER).get("teacher"))
    return {
        "teacher": teacher,
        "shards": len(sizes),
        "samples": packed,
        "embed_dim": dim,
        # images of the split with no regions rows (rejected upstream): simply not packed
        "absent": len(set(split.images) - set(where)),
        "rejected": sum(s["n_rejects"] for s in stats),
        "bytes": total,
        "bytes_per_sample": round(total / packed, 1) if packed else None,
    }
