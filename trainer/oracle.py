"""`python -m ovdistill.trainer.oracle`: the teacher itself as a detector, the ceiling of distillation.

ViLD-image can at best pass on what its teacher says about the proposals it is shown. This
runs the cache's teacher on the proposals stage's boxes of the val images (1x + 1.5x crops,
exactly as the `regions` stage embeds them), scores each (box, class) pair as

    score = RPN objectness x softmax_c(cos(region, text_c) / tau)     over ALL categories

and evaluates the per-class NMS detections with the trainer's own pycocotools path. Base and
novel AP50 here are what a student that copied its teacher perfectly would reach with these
proposals and these box coordinates (no box regression): when the oracle's novel AP50 is below
a target, no distillation weight or schedule will meet it. Written to <out>/oracle.json.

It also prints the hub check: the cosine of each category's text to the cache's mean region
embedding (`<cache>/<ds>/text/region_mean.npy`, or the mean of the `regions` stage's
embeddings when that file is absent), sorted, recorded as "hub_cosine". The text closest to
that common direction is the one a student that learns only the mean names everywhere.

    python -m ovdistill.trainer.oracle --manifest data_manifests/toy.yaml --cache cache
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from ovdistill.pipeline.annotations import read_images
from ovdistill.pipeline.clip_teacher import teacher_from_cache
from ovdistill.pipeline.errors import OvdError, StageError, report
from ovdistill.pipeline.layout import PROPOSALS, REGION_MEAN_FILE, REGIONS, TEXT, DatasetCache
from ovdistill.pipeline.manifests import ManifestError, image_path, load_manifest
from ovdistill.pipeline.options import add_data_options
from ovdistill.pipeline.precision import resolve_device
from ovdistill.pipeline.region_embedding import (
    boxes_array,
    embed_regions,
    image_groups,
    settings_from_config,
)
from ovdistill.trainer.config import TrainConfig
from ovdistill.trainer.evaluate import (
    coco_metrics,
    coco_results,
    format_per_class,
    format_row,
    restrict_gt,
    top_class,
)
from ovdistill.trainer.inputs import (
    CacheMismatch,
    load_region_mean,
    load_vocabulary,
    text_parquet_path,
)
from ovdistill.trainer.model import postprocess
from torch import Tensor


def parquet_mean_embedding(files: list[Path], batch_rows: int = 65536) -> np.ndarray | None:
    """Mean of the `embedding` column (fixed_size_list[D]) over every row of `files` ->
    float32[D] (accumulated in float64), None when they hold no row."""
    import pyarrow.parquet as pq

    total, count = None, 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows,
                                                       columns=["embedding"]):
            col = batch.column(0)
            if len(col) == 0:
                continue
            emb = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
            s = emb.astype(np.float64).sum(0)
            total = s if total is None else total + s
            count += len(col)
    return None if not count else (total / count).astype(np.float32)


def mean_region_embedding(cache_dir: Path) -> tuple[np.ndarray | None, str | None]:
    """The cache's mean region embedding and where it came from: text/region_mean.npy when
    the text stage wrote it, else the mean over regions/part-*.parquet; (None, None) when
    neither exists."""
    cache = DatasetCache(cache_dir)
    path = cache.region_mean()
    if path.is_file():
        return load_region_mean(cache_dir).numpy(), str(path)
    files = cache.parts(REGIONS)
    mean = parquet_mean_embedding(files) if files else None
    return (mean, str(cache.stage_dir(REGIONS))) if mean is not None else (None, None)


def hub_cosines(text: Tensor, names: tuple[str, ...], is_base: Tensor, mean: np.ndarray
                ) -> list[dict]:
    """text: Tensor[C, D]; is_base: Tensor[C] bool; mean: float32[D] ->
    [{"name", "split", "cosine": cos(text_c, mean)}], highest cosine first."""
    if mean.shape[-1] != text.shape[1]:
        raise CacheMismatch(f"mean region embedding has D={mean.shape[-1]}, the texts have "
                            f"D={text.shape[1]}")
    m = torch.nn.functional.normalize(torch.from_numpy(mean).float(), dim=0)
    cos = torch.nn.functional.normalize(text.float(), dim=1) @ m
    rows = [{"name": n, "split": "base" if b else "novel", "cosine": round(float(c), 4)}
            for n, b, c in zip(names, is_base.tolist(), cos)]
    return sorted(rows, key=lambda r: -r["cosine"])


def format_hub(hub: list[dict]) -> str:
    return "hub cosine, text to the mean region embedding (* novel): " + ", ".join(
        f"{r['name']}{'*' if r['split'] == 'novel' else ''} {r['cosine']:.3f}" for r in hub)


def oracle_scores(region_emb: Tensor, objectness: Tensor, text: Tensor,
                  temperature: float) -> Tensor:
    """region_emb: Tensor[N, D] and text: Tensor[C, D] L2-normalized; objectness: Tensor[N]
    in [0, 1] -> Tensor[N, C] objectness x softmax over the C classes of cosine / temperature."""
    probs = torch.softmax(region_emb.float() @ text.float().t() / temperature, dim=1)
    return objectness.float()[:, None] * probs


def oracle_detections(regions: pa.Table, text: Tensor, category_ids: tuple[int, ...],
                      sizes: dict[int, tuple[int, int]], cfg: TrainConfig,
                      max_detections: int) -> list[dict]:
    """COCO results for every image of `regions` (proposal columns + embedding).
    sizes: image id -> (H, W)."""
    boxes = torch.from_numpy(boxes_array(regions))
    emb = torch.from_numpy(regions.column("embedding").combine_chunks().flatten()
                           .to_numpy(zero_copy_only=False).reshape(len(regions), -1).copy())
    score = torch.from_numpy(regions.column("score").to_numpy().copy())
    out = []
    for iid, first, count in zip(*image_groups(regions)):
        sl = slice(int(first), int(first + count))
        scores = oracle_scores(emb[sl], score[sl], text, cfg.temperature)
        b, s, lab = postprocess(boxes[sl], scores, sizes[int(iid)], cfg.score_thresh,
                                cfg.final_nms, max_detections)
        out += coco_results(int(iid), b, s, lab, category_ids)
    return out


def run(args) -> dict:
    import pyarrow.parquet as pq

    dataset = load_manifest(args.manifest, cache_root=args.cache, data_root=args.data_root)
    cache_dir = Path(args.cache) / dataset.name
    cache = DatasetCache(cache_dir)
    teacher = teacher_from_cache(cache, resolve_device(args.device))
    vocab = load_vocabulary(text_parquet_path(cache_dir, dataset.name),
                            expect_dim=teacher.embed_dim)
    mean, mean_source = mean_region_embedding(cache_dir)
    hub = (hub_cosines(vocab.embeddings, vocab.names, vocab.is_base, mean)
           if mean is not None else None)
    regions_rec = cache.read_manifest(REGIONS, required=False)
    settings = settings_from_config(regions_rec["config"]) if regions_rec is not None else {}

    split = dataset.split(args.split)
    images = sorted(read_images(split.annotations), key=lambda im: im["id"])[:args.max_images]
    try:
        files = [(int(im["id"]), image_path(split.images, im)) for im in images]
    except ManifestError as e:
        raise ManifestError(f"{split.annotations}: {e}") from None
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in images}
    proposal_files = cache.parts(PROPOSALS)
    if not proposal_files:
        raise StageError(f"{cache.stage_dir(PROPOSALS)}: no proposals; run the proposals stage")
    proposals = pa.concat_tables([pq.read_table(p) for p in proposal_files])
    proposals = proposals.filter(pc.is_in(proposals.column("image_id"),
                                          value_set=pa.array(list(sizes), pa.int64())))
    t0 = time.time()
    regions, rejects = embed_regions(teacher, proposals, files, **settings)
    cfg = TrainConfig()
    detections = oracle_detections(regions, vocab.embeddings, vocab.category_ids, sizes, cfg,
                                   args.max_detections)
    seconds = time.time() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = sorted({int(i) for i in regions.column("image_id").to_pylist()})
    gt = restrict_gt(split.annotations, done, out / f"gt_{args.split}_subset.json")
    base_ids = {c for c, b in zip(vocab.category_ids, vocab.is_base.tolist()) if b}
    metrics = coco_metrics(gt, detections, base_ids, set(vocab.category_ids) - base_ids)
    result = {"mode": "oracle", **metrics, "split": args.split,
              "novel_categories": [n for n, b in zip(vocab.names, vocab.is_base.tolist())
                                   if not b],
              "n_images": len(done), "n_proposals": len(regions),
              "n_detections": len(detections), "rejects": rejects,
              "top_class": top_class(detections, dict(zip(vocab.category_ids, vocab.names))),
              "hub_cosine": hub, "hub_source": mean_source,
              "temperature": cfg.temperature, "seconds": round(seconds, 2),
              "teacher": teacher.identity}
    (out / "oracle.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovdistill.trainer.oracle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(p, data_root=True, device=True)
    p.add_argument("--split", default="val")
    p.add_argument("--out", default="runs/oracle")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--max-detections", type=int, default=100)
    args = p.parse_args(argv)
    try:
        result = run(args)
    except OvdError as e:
        return report(e)
    print(format_row(result))
    print(format_per_class(result))
    if result["hub_cosine"] is None:
        print(f"hub cosine: no mean region embedding (no {TEXT}/{REGION_MEAN_FILE}, "
              f"no {REGIONS} parts)")
    else:
        print(format_hub(result["hub_cosine"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
