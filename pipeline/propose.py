"""The frozen RPN of stage `rpn` over a list of images: the checkpoint check, the decode ->
batch -> propose loop, and the proposals rows it gives. Used by the proposals stage
(detection images) and the pair_proposals stage (image-text pair images).

Proposals rows, one per proposal: image_id int64, rank int32 (0 = best), box
fixed_size_list<float32>[4] (x1, y1, x2, y2 in original image pixels, clipped to the image),
score float32 (objectness probability).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ovdistill.pipeline import layout
from ovdistill.pipeline.cache import sha256_file
from ovdistill.pipeline.errors import StageError
from ovdistill.pipeline.layout import DatasetCache
from ovdistill.pipeline.precision import autocast
from ovdistill.pipeline.prefetch import chunks, prefetch
from ovdistill.pipeline.rpn_net import ProposalNet, load_rpn

SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("rank", pa.int32()),
    ("box", pa.list_(pa.float32(), 4)),
    ("score", pa.float32()),
])

# decode(item) -> (image id, Tensor[3, H, W] in [0, 1] on the device or None, reject or None)
Decode = Callable[[object], tuple[int, "torch.Tensor | None", "dict | None"]]


def frozen_rpn(files: DatasetCache, device: str) -> ProposalNet:
    """The RPN the finished rpn manifest names, in eval mode on `device`; a StageError when its
    file is missing or no longer has the sha256 stage rpn recorded."""
    rpn = files.read_manifest(layout.RPN)
    path = layout.recorded_checkpoint(files.stage_dir(layout.RPN), rpn)
    if not path.is_file() or sha256_file(path) != rpn["checkpoint_sha256"]:
        raise StageError(f"RPN checkpoint {path} is missing or changed since stage 'rpn' "
                         f"recorded it; re-run rpn with --rebuild")
    return load_rpn(path, device=device)


def propose_images(model: ProposalNet, items: Iterable, decode: Decode, *, device: str,
                   precision: str, batch_size: int, threads: int, pre_nms_top_n: int,
                   nms_thresh: float, score_thresh: float, min_box_size: float, top_m: int,
                   ) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]], list[dict]]:
    """Decode `items` `threads` ahead of the RPN and propose in batches of `batch_size` decoded
    images. Returns (image ids done, per image (boxes Tensor[K, 4], scores Tensor[K]) ranked
    by descending score, K <= top_m, rejects in item order)."""
    rejects: list[dict] = []
    done_ids, results = [], []
    for group in chunks(prefetch(decode, items, threads), batch_size):
        rejects += [bad for _, _, bad in group if bad is not None]
        batch_ids = [iid for iid, img, _ in group if img is not None]
        batch = [img for _, img, _ in group if img is not None]
        if not batch:
            continue
        with autocast(device, precision):
            results += model.propose(
                batch, pre_nms_top_n=pre_nms_top_n, nms_thresh=nms_thresh,
                score_thresh=score_thresh, min_box_size=min_box_size, top_m=top_m)
        done_ids += batch_ids
    return done_ids, results, rejects


def proposals_table(image_ids: list[int], results: list[tuple[torch.Tensor, torch.Tensor]],
                    ) -> pa.Table:
    """Rows of the proposals contract from per-image (boxes Tensor[K, 4], scores Tensor[K])
    already ranked by descending score."""
    ids, ranks, boxes, scores = [], [], [], []
    for iid, (b, s) in zip(image_ids, results):
        k = int(b.shape[0])
        ids.append(torch.full((k,), iid, dtype=torch.int64))
        ranks.append(torch.arange(k, dtype=torch.int32))
        boxes.append(b.float().reshape(-1, 4))
        scores.append(s.float())
    if not ids:
        return SCHEMA.empty_table()
    flat = torch.cat(boxes).reshape(-1).numpy()
    return pa.Table.from_arrays([
        pa.array(torch.cat(ids).numpy(), pa.int64()),
        pa.array(torch.cat(ranks).numpy(), pa.int32()),
        pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), 4),
        pa.array(torch.cat(scores).numpy(), pa.float32()),
    ], schema=SCHEMA)


def proposal_counts(files: list[Path]) -> dict[int, tuple[Path, int]]:
    """image_id -> (the proposals file holding it, its number of rows K >= 1)."""
    where: dict[int, tuple[Path, int]] = {}
    for f in files:
        ids, counts = np.unique(pq.read_table(f, columns=["image_id"])["image_id"].to_numpy(),
                                return_counts=True)
        for i, n in zip(ids.tolist(), counts.tolist()):
            if i in where:
                raise StageError(f"{f}: image {i} also appears in {where[i][0]}")
            where[i] = (f, n)
    return where


def read_ranked(path: Path, image_ids: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """image_id -> (boxes float32[K, 4], scores float32[K]) in rank order, from one proposals
    file (ids absent from it are absent from the result)."""
    t = pq.read_table(path, columns=["image_id", "rank", "box", "score"],
                      filters=[("image_id", "in", list(image_ids))])
    t = t.sort_by([("image_id", "ascending"), ("rank", "ascending")])
    ids = t["image_id"].to_numpy()
    boxes = t["box"].combine_chunks().flatten().to_numpy().reshape(-1, 4).astype(np.float32)
    scores = t["score"].to_numpy().astype(np.float32)
    uniq, start = np.unique(ids, return_index=True)
    stops = list(start[1:]) + [len(ids)]
    return {i: (boxes[a:b], scores[a:b]) for i, a, b in zip(uniq.tolist(), start.tolist(), stops)}
