"""Stage `proposals`: the frozen RPN of stage `rpn` over every image of the configured splits;
the top-M class-agnostic boxes per image go to `proposals/part-NNNNN.parquet`.

One row per proposal: image_id int64, rank int32 (0 = best), box fixed_size_list<float32>[4]
(x1, y1, x2, y2 in original image pixels, clipped to the image), score float32 (objectness
probability). Fewer than M survivors give fewer rows, never padding. Parts are fixed chunks of
the sorted image ids; a bad image becomes a reject and the part goes on.

finalize() reports proposal recall at IoU 0.5 of the val ground truth, base and novel
categories apart, at M = 10, 100 and top_m (the number that says whether novel objects, never
seen as boxes by the RPN, will have cached crops at all).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ovdistill.pipeline import layout
from ovdistill.pipeline.boxes import ImageRecord, read_annotations, recall_at
from ovdistill.pipeline.cache import sha256_file
from ovdistill.pipeline.errors import reject
from ovdistill.pipeline.images import DEFAULT_MAX_PIXELS, ImageError, load_rgb, to_float_tensor
from ovdistill.pipeline.manifests import ManifestError, contained_path
from ovdistill.pipeline.prefetch import to_device
from ovdistill.pipeline.propose import SCHEMA as PROPOSALS_SCHEMA
from ovdistill.pipeline.propose import frozen_rpn, proposals_table, propose_images
from ovdistill.pipeline.runner import (
    Part,
    PartOutput,
    PartResult,
    StageContext,
    StageError,
    chunk_parts,
)

NAME = "proposals"
RESOURCES = {"num_cpus": 1, "num_gpus": 1}
# images decoded ahead of the RPN in threads (PIL releases the GIL); not a Config field: it
# changes no output, so it must not change the stage's fingerprint
DECODE_THREADS = 2

SCHEMA = PROPOSALS_SCHEMA  # pipeline/propose.py: image_id, rank, box, score


@dataclass(frozen=True)
class Config:
    splits: tuple[str, ...] = ("train", "val")
    top_m: int = 300  # proposals kept per image (ViLD caches 300)
    pre_nms_top_n: int = 1000  # per FPN level, before NMS (the paper's test-time 1000)
    nms_thresh: float = 0.7
    score_thresh: float = 0.0
    min_box_size: float = 1.0  # minimum width and height, original pixels
    batch_size: int = 8
    images_per_part: int = 100
    recall_iou: float = 0.5
    max_pixels: int = DEFAULT_MAX_PIXELS


def split_images(ctx: StageContext, cfg: Config) -> dict[int, tuple[str, ImageRecord]]:
    """{image_id: (split name, record)} over the configured splits; ids must be unique."""
    if not cfg.splits:
        raise StageError("proposals.splits is empty")
    out: dict[int, tuple[str, ImageRecord]] = {}
    for name in cfg.splits:
        split = ctx.dataset.split(name)
        for iid, rec in read_annotations(split.annotations).items():
            if iid in out:
                raise StageError(f"{split.annotations}: image id {iid} is also in split "
                                 f"'{out[iid][0]}'; image ids must be unique across splits")
            out[iid] = (name, rec)
    return out


def inputs(ctx: StageContext, cfg: Config) -> dict[str, str]:
    ctx.dataset.check_files()
    rpn = ctx.upstream(layout.RPN)
    # the sha too: a retrained RPN with the same config has the same stage fingerprint
    out = {"rpn": rpn["fingerprint"], "rpn_checkpoint_sha256": rpn["checkpoint_sha256"]}
    for name in cfg.splits:
        out[f"{name}_annotations"] = sha256_file(ctx.dataset.split(name).annotations)
    return out


def plan(ctx: StageContext, cfg: Config) -> list[Part]:
    if cfg.top_m < 1:
        raise StageError(f"proposals.top_m must be >= 1, got {cfg.top_m}")
    return chunk_parts(sorted(split_images(ctx, cfg)), cfg.images_per_part)


class Worker:
    """Loads the frozen RPN once; each part decodes its images in batches and ranks boxes."""

    def __init__(self, ctx: StageContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.images = split_images(ctx, cfg)
        self.device = ctx.resolve_device()
        self.precision = ctx.resolve_precision()
        self.model = frozen_rpn(ctx.files, self.device)

    def _decode(self, iid: int) -> tuple[int, torch.Tensor | None, dict | None]:
        """(iid, the image on the device or None, its reject or None); runs in a thread."""
        split, rec = self.images[iid]
        folder = self.ctx.dataset.split(split).images
        path = folder / rec.file_name
        try:
            path = contained_path(folder, rec.file_name)
            image = to_float_tensor(load_rgb(path, self.cfg.max_pixels))
        except (ImageError, ManifestError) as e:
            return iid, None, reject(iid, path, e)
        return iid, to_device(image, self.device), None

    def run_part(self, part: Part, out: PartOutput) -> PartResult:
        cfg = self.cfg
        done_ids, results, rejects = propose_images(
            self.model, part.items, self._decode, device=self.device, precision=self.precision,
            batch_size=cfg.batch_size, threads=DECODE_THREADS, pre_nms_top_n=cfg.pre_nms_top_n,
            nms_thresh=cfg.nms_thresh, score_thresh=cfg.score_thresh,
            min_box_size=cfg.min_box_size, top_m=cfg.top_m)
        table = proposals_table(done_ids, results)
        pq.write_table(table, out.tmp(f"{part.stem}.parquet"))
        return PartResult(rows=table.num_rows, rejects=rejects,
                          extra={"images": len(done_ids)})


def read_proposals(stage_dir: Path) -> dict[int, torch.Tensor]:
    """{image_id: Tensor[K, 4] boxes in rank order} from every part of a proposals folder."""
    files = sorted(Path(stage_dir).glob(layout.PART_GLOB))
    if not files:
        return {}
    t = pa.concat_tables([pq.read_table(f) for f in files]).sort_by(
        [("image_id", "ascending"), ("rank", "ascending")])
    ids = torch.from_numpy(t["image_id"].to_numpy().copy())
    flat = t["box"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    boxes = torch.from_numpy(flat.copy()).reshape(-1, 4)
    uniq, counts = torch.unique_consecutive(ids, return_counts=True)
    return {int(i): b for i, b in zip(uniq.tolist(), torch.split(boxes, counts.tolist()))}


def recall_report(ctx: StageContext, cfg: Config, proposals: dict[int, torch.Tensor]) -> dict:
    """{"base": {"10": r, "100": r, "<top_m>": r}, "novel": {...}} on the val split; images
    without proposals (rejected ones included) count as misses."""
    ks = sorted({k for k in (10, 100) if k < cfg.top_m} | {cfg.top_m})
    cats = {c.id: c.split for c in ctx.dataset.categories()}
    val = read_annotations(ctx.dataset.split("val").annotations)
    ids = sorted(val)
    empty = torch.zeros(0, 4)
    props = [proposals.get(i, empty) for i in ids]
    report, counts = {}, {}
    for which in ("base", "novel"):
        gt = [val[i].boxes[torch.tensor([cats.get(int(c)) == which
                                         for c in val[i].category_ids], dtype=torch.bool)]
              for i in ids]
        counts[which] = sum(int(g.shape[0]) for g in gt)
        r = recall_at(gt, props, ks, cfg.recall_iou)
        report[which] = {str(k): (None if v is None else round(v, 4)) for k, v in r.items()}
    return {"recall": report, "recall_iou": cfg.recall_iou, "recall_gt_boxes": counts,
            "recall_val_images": len(ids)}


def finalize(ctx: StageContext, cfg: Config, stats: list[dict]) -> dict:
    rpn = ctx.upstream(layout.RPN)
    extra = {"rpn_checkpoint_sha256": rpn["checkpoint_sha256"],
             "images": sum(s.get("images", 0) for s in stats)}
    if "val" in cfg.splits:
        extra.update(recall_report(ctx, cfg, read_proposals(ctx.stage_dir(NAME))))
        print(format_recall(extra["recall"], extra["recall_gt_boxes"], cfg.recall_iou))
    return extra


def format_recall(recall: dict, counts: dict, iou: float) -> str:
    ks = list(next(iter(recall.values())))
    lines = [f"[proposals] val recall @ IoU {iou}:  " + "  ".join(f"M={k:>4}" for k in ks)]
    for which, row in recall.items():
        cells = "  ".join("   n/a" if v is None else f"{v:6.3f}" for v in row.values())
        lines.append(f"  {which:<5} ({counts[which]:>5} boxes)      {cells}")
    return "\n".join(lines)
