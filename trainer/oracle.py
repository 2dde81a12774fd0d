"""`python -m trainer.oracle`: the teacher itself as a detector, the ceiling of distillation.

ViLD-image can at best pass on what its teacher says about the proposals it is shown. This
runs the cache's teacher on the proposals stage's boxes of the val images (1x + 1.5x crops,
exactly as the `regions` stage embeds them), scores each (box, class) pair as

    score = RPN objectness x softmax_c(cos(region, text_c) / tau)     over ALL categories

and evaluates the per-class NMS detections with the trainer's own pycocotools path. Base and
novel AP50 here are what a student that copied its teacher perfectly would reach with these
proposals and these box coordinates (no box regression): when the oracle's novel AP50 is below
a target, no distillation weight or schedule will meet it. Written to <out>/oracle.json.

    python -m trainer.oracle --manifest data_manifests/toy.yaml --cache cache
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from pipeline.cache import read_json
from pipeline.manifests import ManifestError, image_file, load_manifest
from pipeline.runner import MANIFEST_FILE, StageContext, StageError
from trainer.config import TrainConfig
from trainer.evaluate import coco_metrics, coco_results, format_per_class, format_row, restrict_gt
from trainer.inputs import CacheMismatch, load_vocabulary, text_parquet_path
from trainer.model import postprocess


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
    from stages.regions import boxes_array, image_groups

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

    from stages.proposals import NAME as PROPOSALS
    from stages.regions import Config as RegionsConfig
    from stages.regions import embed_proposals
    from stages.teacher import teacher_from_cache

    dataset = load_manifest(args.manifest, cache_root=args.cache, data_root=args.data_root)
    cache_dir = Path(args.cache) / dataset.name
    ctx = StageContext(dataset=dataset, cache=cache_dir, device=args.device)
    teacher = teacher_from_cache(ctx, ctx.resolve_device())
    vocab = load_vocabulary(text_parquet_path(cache_dir, dataset.name),
                            expect_dim=teacher.embed_dim)
    regions_rec = cache_dir / "regions" / MANIFEST_FILE
    rcfg = RegionsConfig(**read_json(regions_rec)["config"]) if regions_rec.exists() \
        else RegionsConfig()

    split = dataset.split(args.split)
    with open(split.annotations) as f:
        images = sorted(json.load(f)["images"], key=lambda im: im["id"])[:args.max_images]
    files = [(int(im["id"]), split.images / image_file(im)) for im in images]
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in images}
    proposal_files = sorted(ctx.stage_dir(PROPOSALS).glob("part-*.parquet"))
    if not proposal_files:
        raise StageError(f"{ctx.stage_dir(PROPOSALS)}: no proposals; run the proposals stage")
    proposals = pa.concat_tables([pq.read_table(p) for p in proposal_files])
    proposals = proposals.filter(pc.is_in(proposals.column("image_id"),
                                          value_set=pa.array(list(sizes), pa.int64())))
    t0 = time.time()
    regions, rejects = embed_proposals(teacher, proposals, files, rcfg)
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
              "temperature": cfg.temperature, "seconds": round(seconds, 2),
              "teacher": teacher.identity}
    (out / "oracle.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.oracle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default="data_manifests/toy.yaml")
    p.add_argument("--cache", default="cache")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="val")
    p.add_argument("--out", default="runs/oracle")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--max-detections", type=int, default=100)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        result = run(args)
    except (ManifestError, StageError, CacheMismatch, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_row(result))
    print(format_per_class(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
