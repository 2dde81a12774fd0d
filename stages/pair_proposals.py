"""Stage `pair_proposals`: the frozen RPN of stage `rpn` over every image-text pair image
(stage `pairs`); the top-k class-agnostic boxes per image by objectness after NMS (DetCLIPv2's
proposals for word-region alignment) go to `pair_proposals/part-NNNNN.parquet`.

Rows in the proposals schema (pipeline/propose.py): image_id int64 (the pair's id), rank
int32 (0 = best), box fixed_size_list<float32>[4] (x1, y1, x2, y2 in the decoded image's
pixels, clipped to it), score float32. Fewer than top_k survivors give fewer rows. Parts are
fixed chunks of the sorted pair ids; an image that cannot be read or decoded, or whose size is
no longer the one the pairs rows recorded, is a reject naming the pair and the part goes on.
A dataset without a `pairs:` block plans zero parts.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from ovdistill.pipeline import layout
from ovdistill.pipeline.errors import reject
from ovdistill.pipeline.images import DEFAULT_MAX_PIXELS, ImageError, to_float_tensor
from ovdistill.pipeline.pair_sources import (
    PairImage,
    load_pair_image,
    pair_image_root,
    read_pairs,
)
from ovdistill.pipeline.prefetch import to_device
from ovdistill.pipeline.propose import frozen_rpn, proposals_table, propose_images
from ovdistill.pipeline.runner import (
    Part,
    PartOutput,
    PartResult,
    StageContext,
    StageError,
    chunk_parts,
)

NAME = "pair_proposals"
RESOURCES = {"num_cpus": 1, "num_gpus": 1}
DECODE_THREADS = 2  # not a Config field: it changes no output (as in stage proposals)


@dataclass(frozen=True)
class Config:
    top_k: int = 100  # proposals kept per pair image (DetCLIPv2's top-k by objectness)
    pre_nms_top_n: int = 1000  # per FPN level, before NMS
    nms_thresh: float = 0.7
    score_thresh: float = 0.0
    min_box_size: float = 1.0  # minimum width and height, original pixels
    batch_size: int = 8
    images_per_part: int = 100
    max_pixels: int = DEFAULT_MAX_PIXELS


def inputs(ctx: StageContext, cfg: Config) -> dict[str, str]:
    out = {"pairs": ctx.fingerprint(layout.PAIRS)}
    if ctx.dataset.pairs is None:  # zero parts: no RPN is needed
        return out
    rpn = ctx.upstream(layout.RPN)
    # the sha too: a retrained RPN with the same config has the same stage fingerprint
    return {**out, "rpn": rpn["fingerprint"], "rpn_checkpoint_sha256": rpn["checkpoint_sha256"]}


def plan(ctx: StageContext, cfg: Config) -> list[Part]:
    if cfg.top_k < 1:
        raise StageError(f"pair_proposals.top_k must be >= 1, got {cfg.top_k}")
    if ctx.dataset.pairs is None:
        return []
    ids = read_pairs(ctx.files, columns=["image_id"])["image_id"].to_pylist()
    return chunk_parts(ids, cfg.images_per_part)


class Worker:
    """Loads the frozen RPN once; each part decodes its pair images in batches."""

    def __init__(self, ctx: StageContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.root = pair_image_root(ctx.dataset, ctx.files)
        self.pairs = read_pairs(ctx.files, columns=["image_id", "file", "offset", "size",
                                                    "width", "height"])
        self.rows: dict[int, dict] = {}  # the current part's pairs rows by image_id
        self.device = ctx.resolve_device()
        self.precision = ctx.resolve_precision()
        self.model = frozen_rpn(ctx.files, self.device)

    def _decode(self, iid: int) -> tuple[int, torch.Tensor | None, dict | None]:
        """(iid, the image on the device or None, its reject or None); runs in a thread."""
        r = self.rows[iid]
        source = PairImage(str(self.root), r["file"], r["offset"], r["size"], r["width"],
                           r["height"])
        try:
            img = load_pair_image(source, self.cfg.max_pixels)
        except ImageError as e:
            return iid, None, reject(iid, str(source), e)
        return iid, to_device(to_float_tensor(img), self.device), None

    def run_part(self, part: Part, out: PartOutput) -> PartResult:
        cfg = self.cfg
        rows = self.pairs.filter(pc.is_in(self.pairs["image_id"],
                                          value_set=pa.array(part.items, pa.int64())))
        self.rows = {r["image_id"]: r for r in rows.to_pylist()}
        done_ids, results, rejects = propose_images(
            self.model, part.items, self._decode, device=self.device, precision=self.precision,
            batch_size=cfg.batch_size, threads=DECODE_THREADS, pre_nms_top_n=cfg.pre_nms_top_n,
            nms_thresh=cfg.nms_thresh, score_thresh=cfg.score_thresh,
            min_box_size=cfg.min_box_size, top_m=cfg.top_k)
        table = proposals_table(done_ids, results)
        pq.write_table(table, out.tmp(f"{part.stem}.parquet"))
        return PartResult(rows=table.num_rows, rejects=rejects,
                          extra={"images": len(done_ids),
                                 "without_proposals": sum(int(b.shape[0]) == 0
                                                          for b, _ in results)})


def finalize(ctx: StageContext, cfg: Config, stats: list[dict]) -> dict:
    images = sum(s.get("images", 0) for s in stats)
    extra = {"pairs": sum(s["items"] for s in stats), "images": images,
             "without_proposals": sum(s.get("without_proposals", 0) for s in stats),
             "proposals_per_image": round(sum(s["rows"] for s in stats) / images, 2)
             if images else None}
    if ctx.dataset.pairs is not None:
        extra["rpn_checkpoint_sha256"] = ctx.upstream(layout.RPN)["checkpoint_sha256"]
    return extra
