"""Agreement of a built regions cache with the teacher's own preprocessing, row by row.

For rows of one regions part it computes the per-crop reference (PIL crop of the 1x and the
1.5x box, the cache's teacher's own preprocess, encode, sum, L2-normalise) and prints the
cosine to it of (a) the stored embedding and (b) the embedding this checkout's batched crops
give for the same box. The contract (DESIGN) is cosine >= 0.99 on every row. Nothing is
written; the teacher is the cache's (`teacher_from_cache`), on the CPU.

    python -m ovdistill.bench.regions_agreement                          # cache/toy, part 0, 600 rows
    python -m ovdistill.bench.regions_agreement --rows 0 --part 3        # every row of part 3
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from ovdistill.pipeline.annotations import images_by_id, read_images
from ovdistill.pipeline.clip_teacher import teacher_from_cache
from ovdistill.pipeline.crops import enlarge_boxes, preprocess_resize
from ovdistill.pipeline.errors import reports_errors
from ovdistill.pipeline.images import load_rgb, to_uint8_tensor
from ovdistill.pipeline.layout import REGIONS, part_file
from ovdistill.pipeline.manifests import image_path, load_manifest
from ovdistill.pipeline.options import add_data_options
from ovdistill.pipeline.region_embedding import (
    BATCH_SIZE,
    CONTEXT_SCALE,
    boxes_array,
    region_embeddings,
    teacher_crops,
)
from ovdistill.pipeline.runner import StageContext, StageError


def reference(teacher, image, boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """PIL crop of each 1x and `scale`x box -> teacher.preprocess -> encode, sum, normalise.

    boxes: Tensor[N, 4] -> Tensor[N, D]"""
    big = enlarge_boxes(boxes, scale, image.width, image.height)
    crops = [teacher.preprocess(image.crop(tuple(b))) for b in torch.cat([boxes, big]).tolist()]
    feats = teacher.encode_images(torch.stack(crops))
    return F.normalize(feats[:len(boxes)] + feats[len(boxes):], dim=1)


def summary(name: str, cos: torch.Tensor, short: torch.Tensor, size: int) -> str:
    up, down = cos[short < size], cos[short >= size]
    return (f"{name:<34} rows {len(cos):>6}  min {cos.min():.6f}  mean {cos.mean():.6f}  "
            f"below 0.99 {(cos < 0.99).float().mean() * 100:5.1f}%  (short side < {size}: "
            f"min {up.min() if len(up) else float('nan'):.6f}, >= {size}: "
            f"min {down.min() if len(down) else float('nan'):.6f})")


@reports_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovdistill.bench.regions_agreement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(p)
    p.add_argument("--part", type=int, default=0, help="regions part to read")
    p.add_argument("--rows", type=int, default=600, help="rows to check (0: all of the part)")
    p.add_argument("--sample", type=int, default=None,
                   help="seed: a random sample of --rows rows instead of the first ones")
    args = p.parse_args(argv)

    dataset = load_manifest(args.manifest, cache_root=args.cache)
    ctx = StageContext(dataset=dataset, cache=Path(args.cache) / dataset.name, device="cpu")
    part = part_file(ctx.stage_dir(REGIONS), args.part)
    if not part.is_file():
        raise StageError(f"{part} not found; build the regions stage first")
    recorded = ctx.files.read_manifest(REGIONS, required=False)
    made = recorded["config"] if recorded is not None else {}
    split_name = made.get("split", "train")
    context_scale = made.get("context_scale", CONTEXT_SCALE)
    batch_size = made.get("batch_size", BATCH_SIZE)
    table = pq.read_table(part)
    if args.rows and args.rows < len(table):
        if args.sample is None:
            table = table.slice(0, args.rows)
        else:
            rng = np.random.default_rng(args.sample)
            table = table.take(np.sort(rng.choice(len(table), args.rows, replace=False)))
    if not len(table):
        raise StageError(f"{part} has no rows")
    teacher = teacher_from_cache(ctx, "cpu")
    split = dataset.split(split_name)
    records = images_by_id(read_images(split.annotations))
    ids = table.column("image_id").to_numpy()
    boxes = torch.from_numpy(boxes_array(table))
    stored = torch.from_numpy(np.asarray(table.column("embedding").combine_chunks().flatten())
                              .reshape(len(table), -1).astype(np.float32))
    ref, ours = [], []
    for iid in dict.fromkeys(ids.tolist()):  # rows are sorted by image
        at = np.nonzero(ids == iid)[0]
        image = load_rgb(image_path(split.images, records[int(iid)]))
        b = boxes[at]
        ref.append(reference(teacher, image, b, context_scale))
        ours.append(region_embeddings(
            teacher, [teacher_crops(teacher, to_uint8_tensor(image), b, context_scale)],
            batch_size))
    ref, ours = torch.cat(ref), torch.cat(ours)
    short = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    size = teacher.image_size
    stored_cos = F.cosine_similarity(stored, ref)
    interpolation, mode = preprocess_resize(teacher.preprocess, size)
    print(f"{part}: {len(table)} rows of {len(set(ids.tolist()))} images; teacher "
          f"{teacher.identity['model']} ({size} px, {interpolation}, resize {mode})")
    print(summary("stored embeddings", stored_cos, short, size))
    print(summary("this checkout's batched crops", F.cosine_similarity(ours, ref), short, size))
    met = bool(stored_cos.min() >= 0.99)
    print(f"contract (cosine >= 0.99 on every row) for the stored rows: "
          f"{'met' if met else 'NOT met: rebuild the regions stage (and everything after it)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
