"""Storage per image: `regions/` Parquet and `wds/` shards against one float32 `.pth` file per
image holding the same boxes and embeddings (the way peer projects cache teacher features).

    python -m ovdistill.bench.storage_bench cache/toy          # a real cache (after `make stages`)
    python -m ovdistill.bench.storage_bench                    # a synthetic cache in a temp dir

Also holds `write_synthetic_cache`, a tiny cache in the exact upstream contract format
(dataset images + COCO json, teacher / regions manifests, regions parquet) that the pack /
index tests build on.
"""
from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ovdistill.pipeline.cache import atomic_write_json
from ovdistill.pipeline.errors import reports_errors
from ovdistill.pipeline.layout import DATASET, PART_GLOB, REGIONS, TEACHER, DatasetCache, part_file
from ovdistill.pipeline.manifests import load_manifest
from ovdistill.pipeline.runner import StageContext
from PIL import Image

BASE = ("circle", "square")
NOVEL = ("star",)
TEACHER_IDENTITY = {"model": "synthetic", "pretrained": None, "model_config": None,
                    "sha256": "0" * 64}


def regions_schema(dim: int) -> pa.Schema:
    return pa.schema([("image_id", pa.int64()), ("rank", pa.int32()),
                      ("box", pa.list_(pa.float32(), 4)), ("score", pa.float32()),
                      ("embedding", pa.list_(pa.float16(), dim))])


def regions_table(image_ids: np.ndarray, ranks: np.ndarray, boxes: np.ndarray,
                  scores: np.ndarray, emb: np.ndarray) -> pa.Table:
    """boxes: float32[N, 4]; emb: float16[N, D] -> a table in the regions contract."""
    dim = emb.shape[1]
    return pa.Table.from_arrays(
        [pa.array(image_ids, pa.int64()), pa.array(ranks, pa.int32()),
         pa.FixedSizeListArray.from_arrays(pa.array(boxes.reshape(-1), pa.float32()), 4),
         pa.array(scores, pa.float32()),
         pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), dim)],
        schema=regions_schema(dim))


def write_synthetic_cache(root: Path, *, n_images: int = 12, m: int = 20, dim: int = 32,
                          per_part: int = 5, seed: int = 0, png_every: int = 0,
                          image_size: tuple[int, int] = (96, 64), without_regions: int = 1,
                          plant: dict | None = None, vary_m: bool = True,
                          name: str = "synth") -> StageContext:
    """Write `<root>/<name>.yaml` and `<root>/cache/<name>/{dataset,teacher,regions}` and
    return the StageContext for that cache.

    Train image ids are 1..n_images, each with `m - (id % 3)` proposals (`m` when not
    `vary_m`), except the last
    `without_regions` images (absent from regions, as if rejected upstream). Every
    `png_every`-th image is a PNG. train.json holds base boxes plus, to be filtered out, a
    novel box and a crowd box on image 1. `plant` maps (image_id, rank) -> a vector that
    replaces that region's embedding (normalised)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    cache = root / "cache" / name
    data = cache / DATASET
    (data / "train").mkdir(parents=True, exist_ok=True)
    (data / "val").mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(BASE + NOVEL)]
    w, h = image_size
    images, anns, val_images, val_anns = [], [], [], []
    for i in range(1, n_images + 1):
        ext = "png" if png_every and i % png_every == 0 else "jpg"
        fname = f"{i:06d}.{ext}"
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / "train" / fname)
        images.append({"id": i, "file_name": fname, "width": w, "height": h})
        for k in range(1 + i % 3):
            x, y = float(rng.uniform(0, w / 2)), float(rng.uniform(0, h / 2))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1 + k % 2,
                         "bbox": [x, y, w / 4 + k, h / 4], "area": w * h / 16, "iscrowd": 0})
    anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 3,
                 "bbox": [1.0, 2.0, 10.0, 12.0], "area": 120.0, "iscrowd": 0})
    anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 1,
                 "bbox": [3.0, 4.0, 20.0, 20.0], "area": 400.0, "iscrowd": 1})
    for j in range(2):
        vid = 1001 + j
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            data / "val" / f"{vid}.jpg")
        val_images.append({"id": vid, "file_name": f"{vid}.jpg", "width": w, "height": h})
        val_anns.append({"id": j + 1, "image_id": vid, "category_id": 3,
                         "bbox": [5.0, 5.0, 30.0, 30.0], "area": 900.0, "iscrowd": 0})
    (data / "train.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": cats}))
    (data / "val.json").write_text(json.dumps(
        {"images": val_images, "annotations": val_anns, "categories": cats}))

    manifest = root / f"{name}.yaml"
    manifest.write_text(
        f"name: {name}\nformat: coco\nroot: {data}\n"
        "splits:\n  train: {images: train, annotations: train.json}\n"
        "  val: {images: val, annotations: val.json}\n"
        f"vocabulary:\n  base: [{', '.join(BASE)}]\n  novel: [{', '.join(NOVEL)}]\n")
    for stage in (DATASET, TEACHER):
        atomic_write_json(DatasetCache(cache).manifest_path(stage),
                          {"stage": stage, "fingerprint": f"{stage}-{seed}",
                           "teacher": TEACHER_IDENTITY})

    with_regions = list(range(1, n_images + 1 - without_regions))
    plant = plant or {}
    for part, s in enumerate(range(0, len(with_regions), per_part)):
        ids, ranks, boxes, scores, embs = [], [], [], [], []
        for i in with_regions[s:s + per_part]:
            mi = m - i % 3 if vary_m else m
            xy = rng.uniform(0, [w / 2, h / 2], (mi, 2))
            wh = rng.uniform(2, [w / 2, h / 2], (mi, 2))
            e = rng.standard_normal((mi, dim)).astype(np.float32)
            for (pi, pr), vec in plant.items():
                if pi == i:
                    e[pr] = np.asarray(vec, np.float32)
            e /= np.linalg.norm(e, axis=1, keepdims=True)
            ids.append(np.full(mi, i))
            ranks.append(np.arange(mi))
            boxes.append(np.concatenate([xy, xy + wh], 1).astype(np.float32))
            scores.append(np.sort(rng.uniform(0, 1, mi))[::-1].astype(np.float32))
            embs.append(e.astype(np.float16))
        (cache / REGIONS).mkdir(parents=True, exist_ok=True)
        pq.write_table(regions_table(np.concatenate(ids), np.concatenate(ranks),
                                     np.concatenate(boxes), np.concatenate(scores),
                                     np.concatenate(embs)),
                       part_file(cache / REGIONS, part))
    atomic_write_json(DatasetCache(cache).manifest_path(REGIONS),
                      {"stage": "regions", "fingerprint": f"regions-{seed}-{dim}",
                       "teacher": TEACHER_IDENTITY})
    return StageContext(dataset=load_manifest(manifest), cache=cache, device="cpu")


# ----------------------------------------------------------------------------- bench


def wds_breakdown(shards: list[Path]) -> tuple[int, dict[str, int], set[int]]:
    """Total tar bytes of `shards`, payload bytes per member extension, and the image ids."""
    total, per_ext, ids = 0, {}, set()
    for shard in shards:
        total += shard.stat().st_size
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                per_ext[ext] = per_ext.get(ext, 0) + m.size
                ids.add(int(key[3:]))
    return total, per_ext, ids


def pth_bytes(regions: list[Path], out_dir: Path, max_images: int) -> tuple[int, int]:
    """Write up to `max_images` per-image float32 .pth files (boxes [M, 4], embeddings [M, D])
    from the regions parts; return (bytes written, images written)."""
    import torch

    total = done = 0
    for f in regions:
        t = pq.read_table(f, columns=["image_id", "box", "embedding"])
        dim = t.schema.field("embedding").type.list_size
        ids = t["image_id"].to_numpy()
        boxes = t["box"].combine_chunks().flatten().to_numpy().reshape(-1, 4)
        emb = t["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim)
        for i in np.unique(ids):
            if done >= max_images:
                return total, done
            sel = ids == i
            path = out_dir / f"{int(i)}.pth"
            torch.save({"boxes": torch.from_numpy(boxes[sel].astype(np.float32)),
                        "embeddings": torch.from_numpy(emb[sel].astype(np.float32))}, path)
            total += path.stat().st_size
            path.unlink()
            done += 1
    return total, done


def measure(cache: Path, max_pth_images: int) -> list[tuple[str, int, float]]:
    """(what, images, bytes per image) rows for one dataset cache `<cache root>/<ds>`."""
    regions = DatasetCache(cache).parts(REGIONS)
    if not regions:
        raise SystemExit(f"{cache / REGIONS}: no {PART_GLOB} (run the regions stage)")
    n_regions = len({i for f in regions for i in np.unique(
        pq.read_table(f, columns=["image_id"])["image_id"].to_numpy()).tolist()})
    regions_bytes = sum(f.stat().st_size for f in regions)
    rows = [("regions/*.parquet (boxes, scores, f16 emb)", n_regions, regions_bytes / n_regions)]
    shards = DatasetCache(cache).shards()
    if shards:
        total, per_ext, ids = wds_breakdown(shards)
        n = max(1, len(ids))
        rows += [("wds/*.tar (whole shards)", len(ids), total / n),
                 ("  .boxes.npy + .emb.npy (f32 boxes, f16 emb)", len(ids),
                  (per_ext.get("boxes.npy", 0) + per_ext.get("emb.npy", 0)) / n),
                 ("  .jpg", len(ids), per_ext.get("jpg", 0) / n),
                 ("  .json", len(ids), per_ext.get("json", 0) / n)]
    with tempfile.TemporaryDirectory() as tmp:
        pth, n_pth = pth_bytes(regions, Path(tmp), max_pth_images)
    rows.append(("per-image .pth (f32 boxes + f32 emb)", n_pth, pth / max(1, n_pth)))
    return rows


@reports_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovdistill.bench.storage_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", nargs="?", default=None,
                   help="a dataset cache dir, e.g. cache/toy (default: a synthetic one)")
    p.add_argument("--images", type=int, default=100, help="synthetic: images")
    p.add_argument("--m", type=int, default=300, help="synthetic: proposals per image")
    p.add_argument("--dim", type=int, default=512, help="synthetic: embedding dim")
    p.add_argument("--max-pth-images", type=int, default=500,
                   help="images written as .pth to measure them (bytes/image is their mean)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.cache is None:
            from ovdistill.pipeline.runner import run_stage
            from ovdistill.stages import pack

            ctx = write_synthetic_cache(Path(tmp), n_images=args.images, m=args.m,
                                        dim=args.dim, per_part=50, without_regions=0, vary_m=False,
                                        image_size=(320, 240))
            run_stage(pack, ctx, pack.Config(), distributor="local", progress=False,
                      log=lambda s: None)
            what = (f"synthetic cache: {args.images} images, M={args.m}, D={args.dim}, "
                    f"noise jpgs 320x240")
            rows = measure(ctx.cache, args.max_pth_images)
        else:
            what = f"cache {args.cache}"
            rows = measure(Path(args.cache), args.max_pth_images)
    pth = rows[-1][2]
    print(f"storage per image, {what}")
    print(f"{'what':<46} {'images':>7} {'bytes/image':>12} {'x .pth':>7}")
    for name, n, per in rows:
        print(f"{name:<46} {n:>7} {per:>12.0f} {per / pth:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
