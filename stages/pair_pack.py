"""Stage `pair_pack`: WebDataset shards of the image-text pairs for the trainer's pairs stream
(DetCLIPv2's word-region alignment), one sample per pair with >= 1 phrase and >= 1 proposal.

    key  pair<image_id>
    .jpg            the image (the source's own bytes when it is a plain JPEG, else re-encoded)
    .boxes.npy      float32[K, 4] the pair_proposals boxes (x1, y1, x2, y2), original pixels,
                    in rank order (objectness after NMS)
    .scores.npy     float32[K] their objectness, same order
    .phrases.json   {"image_id", "width", "height", "caption", "phrases": [str, ...]}
    .phrase_emb.npy float16[P, D] the phrases stage's embeddings, in that phrase order

Written to `<cache>/<ds>/pairs_wds/pairs-NNNNNN.tar` (FOLDER) with `sizes.json` beside
({shard name: samples}). A pair with no phrase (an empty or absent phrases row) or no proposal
(no pair_proposals rows: none survived, or the image was rejected there) is not packed and is
counted (`skipped_no_phrase` first, then `skipped_no_proposal`); an image that cannot be read
here is a reject. Shards are planned before anything is written with exact byte sizes
(pipeline/shards.py), so part index == shard index and a rerun writes byte-identical tars.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ovdistill.pipeline import layout
from ovdistill.pipeline.cache import atomic_write_json
from ovdistill.pipeline.errors import reject
from ovdistill.pipeline.images import ImageError
from ovdistill.pipeline.manifests import ManifestError, contained_path
from ovdistill.pipeline.pair_sources import (
    pair_image_bytes,
    pair_image_root,
    pair_label,
    read_pairs,
)
from ovdistill.pipeline.propose import proposal_counts, read_ranked
from ovdistill.pipeline.runner import Part, PartOutput, PartResult, StageContext, StageError
from ovdistill.pipeline.shards import (
    is_plain_jpeg,
    jpeg_payload,
    json_bytes,
    npy_bytes,
    npy_nbytes,
    plan_shards,
    tar_file_bytes,
    tar_member_bytes,
    write_shard,
)

NAME = "pair_pack"
FOLDER = layout.PAIRS_WDS
RESOURCES = {"num_cpus": 1, "num_gpus": 0}
MEMBERS = " ".join(layout.PAIR_MEMBERS)  # an input: an older layout needs --rebuild
PAIR_COLUMNS = ["image_id", "caption", "file", "offset", "size", "width", "height"]


@dataclass(frozen=True)
class Config:
    max_samples: int = 1000  # pairs per shard
    max_bytes: int = 512 * 2**20  # shard file size cap (a lone larger sample gets its own shard)
    jpeg_quality: int = 95  # only for images that must be re-encoded (not a plain JPEG)


def sample_key(image_id: int) -> str:
    return f"pair{int(image_id)}"


def pair_meta(row: dict, phrases: list[str]) -> dict:
    """The `.phrases.json` member of one pairs row."""
    return {"image_id": int(row["image_id"]), "width": int(row["width"]),
            "height": int(row["height"]), "caption": row["caption"], "phrases": list(phrases)}


def pair_source(root: Path, row: dict) -> Path | bytes:
    """A pair's encoded image: its file (plain files), or the member's bytes (a .tar).
    Raises ManifestError for a name leaving `root`, OSError for an unreadable .tar."""
    if row["offset"] < 0:
        return contained_path(root, row["file"])
    return pair_image_bytes(root, row["file"], row["offset"], row["size"])


def planned_jpeg_size(src: Path | bytes, name: str, quality: int) -> int:
    """Length of the `.jpg` member `jpeg_payload` makes, reading only the header of a plain
    JPEG file (0 when the image is unreadable: the worker rejects it)."""
    try:
        if is_plain_jpeg(src):
            return os.path.getsize(src) if isinstance(src, Path) else len(src)
        return len(jpeg_payload(src, quality, name)[0])
    except (ImageError, OSError):
        return 0


# ----------------------------------------------------------------------------- phrases


def phrase_dim(path: Path) -> int:
    """D of a phrases file's `phrase_emb` list<fixed_size_list<float16>[D]>."""
    t = pq.read_schema(path).field("phrase_emb").type
    inner = getattr(t, "value_type", None)
    size = getattr(inner, "list_size", None)
    if not pa.types.is_list(t) or size is None or size < 1 \
            or inner.value_type != pa.float16():
        raise StageError(f"{path}: column 'phrase_emb' is {t}, expected "
                         f"list<fixed_size_list<float16>[D]>")
    return int(size)


def phrases_layout(files: list[Path]) -> tuple[dict[int, tuple[Path, list[str]]], int | None]:
    """image_id -> (the phrases file holding it, its phrases), and the embedding dim D (None
    without files)."""
    where: dict[int, tuple[Path, list[str]]] = {}
    dim = None
    for f in files:
        d = phrase_dim(f)
        if dim is not None and d != dim:
            raise StageError(f"{f}: phrase_emb dim {d} differs from {dim} in {files[0]}")
        dim = d
        t = pq.read_table(f, columns=["image_id", "phrases"])
        for i, p in zip(t["image_id"].to_pylist(), t["phrases"].to_pylist()):
            if i in where:
                raise StageError(f"{f}: image {i} also appears in {where[i][0]}")
            where[i] = (f, p or [])
    return where, dim


def read_phrases(path: Path, image_ids: list[int], dim: int
                 ) -> dict[int, tuple[list[str], np.ndarray]]:
    """image_id -> (phrases, embeddings float16[P, D] in that order) from one phrases file; a
    row whose phrase and embedding counts differ is a StageError naming the file and image."""
    t = pq.read_table(path, columns=["image_id", "phrases", "phrase_emb"],
                      filters=[("image_id", "in", list(image_ids))])
    emb = t["phrase_emb"].combine_chunks()
    lengths = emb.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    flat = emb.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    stops = np.cumsum(lengths)
    out = {}
    for i, phrases, a, b in zip(t["image_id"].to_pylist(), t["phrases"].to_pylist(),
                                stops - lengths, stops):
        phrases = phrases or []
        if len(phrases) != b - a:
            raise StageError(f"{path}: image {i} has {len(phrases)} phrases but {b - a} "
                             f"phrase_emb rows")
        out[i] = (phrases, flat[a:b].astype(np.float16, copy=False))
    return out


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PairIndex:
    """What the stage reads before packing: the pairs rows and where their phrases and
    proposals are."""

    rows: dict  # image_id -> pairs row (PAIR_COLUMNS)
    phrases: dict  # image_id -> (phrases file, [phrase, ...])
    proposals: dict  # image_id -> (pair_proposals file, K)
    dim: int | None

    def packable(self) -> tuple[list[int], int, int]:
        """(ids to pack in id order, pairs with no phrase, pairs with a phrase but no
        proposal)."""
        ids, no_phrase, no_proposal = [], 0, 0
        for i in sorted(self.rows):
            if not self.phrases.get(i, (None, []))[1]:
                no_phrase += 1
            elif i not in self.proposals:
                no_proposal += 1
            else:
                ids.append(i)
        return ids, no_phrase, no_proposal


def pair_index(ctx: StageContext) -> PairIndex:
    pairs = read_pairs(ctx.files, columns=PAIR_COLUMNS).to_pylist()
    phrases, dim = phrases_layout(ctx.files.parts(layout.PHRASES))
    proposals = proposal_counts(ctx.files.parts(layout.PAIR_PROPOSALS))
    return PairIndex({r["image_id"]: r for r in pairs}, phrases, proposals, dim)


def inputs(ctx: StageContext, cfg: Config) -> dict[str, str]:
    names = (layout.PAIRS, layout.PHRASES, layout.PAIR_PROPOSALS, layout.TEACHER)
    return {**{name: ctx.fingerprint(name) for name in names}, "members": MEMBERS}


def sample_sizes(ctx: StageContext, cfg: Config, index: PairIndex | None = None
                 ) -> dict[int, int]:
    """image_id -> exact tar bytes of its sample, for every pair to pack (0 for one whose
    image the worker will reject)."""
    index = index or pair_index(ctx)
    ids, _, _ = index.packable()
    root = pair_image_root(ctx.dataset, ctx.files) if ids else None
    sizes = {}
    for i in ids:
        row, phrases, k = index.rows[i], index.phrases[i][1], index.proposals[i][1]
        try:
            jpg = planned_jpeg_size(pair_source(root, row),
                                    pair_label(root, row["file"], row["offset"]), cfg.jpeg_quality)
        except (ManifestError, OSError):
            jpg = 0
        sizes[i] = sum(tar_member_bytes(n) for n in (
            jpg, npy_nbytes((k, 4), np.float32), npy_nbytes((k,), np.float32),
            len(json_bytes(pair_meta(row, phrases))),
            npy_nbytes((len(phrases), index.dim), np.float16)))
    return sizes


def plan(ctx: StageContext, cfg: Config) -> list[Part]:
    sizes = sample_sizes(ctx, cfg)
    shards = plan_shards(list(sizes), list(sizes.values()), cfg.max_samples, cfg.max_bytes,
                         stage=NAME)
    return [Part(index=k, items=tuple(s)) for k, s in enumerate(shards)]


# ----------------------------------------------------------------------------- worker


def by_file(ids, where: dict) -> dict[Path, list[int]]:
    """{file: [its ids, in order]} from `where` = {id: (file, ...)}."""
    out: dict[Path, list[int]] = {}
    for i in ids:
        out.setdefault(where[i][0], []).append(i)
    return out


class Worker:
    def __init__(self, ctx: StageContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.index = pair_index(ctx)
        self.root = pair_image_root(ctx.dataset, ctx.files)

    def sample(self, image_id: int, phrases: dict, proposals: dict
               ) -> tuple[dict | None, dict | None]:
        """(the tar sample of one pair, None) or (None, a reject naming the pair's file)."""
        row = self.index.rows[image_id]
        name = pair_label(self.root, row["file"], row["offset"])
        file = str(self.root / row["file"])
        try:
            jpg, (w, h) = jpeg_payload(pair_source(self.root, row), self.cfg.jpeg_quality, name)
        except OSError as e:
            return None, reject(image_id, file, f"{name}: cannot read ({e.strerror or e})")
        except (ManifestError, ImageError) as e:
            return None, reject(image_id, file, e)
        if (w, h) != (row["width"], row["height"]):
            return None, reject(image_id, file, f"{name}: decoded size {w}x{h} differs from "
                                f"the pairs row's {row['width']}x{row['height']}")
        words, emb = phrases[image_id]
        boxes, scores = proposals[image_id]
        return {"__key__": sample_key(image_id), "jpg": jpg, "boxes.npy": npy_bytes(boxes),
                "scores.npy": npy_bytes(scores),
                "phrases.json": json_bytes(pair_meta(row, words)),
                "phrase_emb.npy": npy_bytes(emb)}, None

    def run_part(self, part: Part, out: PartOutput) -> PartResult:
        phrases, proposals = {}, {}
        for f, ids in by_file(part.items, self.index.phrases).items():
            phrases.update(read_phrases(f, ids, self.index.dim))
        for f, ids in by_file(part.items, self.index.proposals).items():
            proposals.update(read_ranked(f, ids))

        name = layout.pair_shard_name(part.index)
        path = out.tmp(name)
        written, members, rejects = write_shard(path, part.items,
                                                lambda i: self.sample(i, phrases, proposals))
        return PartResult(rows=written, rejects=rejects,
                          extra={"shard": name, "bytes": os.path.getsize(path),
                                 "expected_bytes": tar_file_bytes(members)})


def finalize(ctx: StageContext, cfg: Config, stats: list[dict]) -> dict:
    sizes = {s["shard"]: s["rows"] for s in sorted(stats, key=lambda s: s["part"])}
    atomic_write_json(ctx.stage_dir(FOLDER) / layout.SIZES_FILE, sizes)
    index = pair_index(ctx)
    _, no_phrase, no_proposal = index.packable()
    packed = sum(sizes.values())
    total = sum(s["bytes"] for s in stats)
    teacher = (ctx.upstream(layout.PHRASES).get("teacher")
               or ctx.upstream(layout.TEACHER).get("teacher"))
    dim = index.dim if index.dim is not None else ctx.upstream(layout.PHRASES).get("embed_dim")
    return {
        "teacher": teacher,
        "pairs": len(index.rows),
        "shards": len(sizes),
        "samples": packed,
        "skipped_no_phrase": no_phrase,
        "skipped_no_proposal": no_proposal,
        "rejected": sum(s["n_rejects"] for s in stats),
        "embed_dim": dim,
        "bytes": total,
        "bytes_per_sample": round(total / packed, 1) if packed else None,
    }
