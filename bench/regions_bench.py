"""Regions throughput: the whole per-part path (decode, crops, encode, write) against the bare
teacher forward pass on the same number of already-made crops, on the same device in the same
run; and the batched crops (`pipeline/crops.py`: PIL's resampling as batched matrix products, a
few ops per image) against a per-crop PIL path (crop + the teacher's own preprocess per box, the
peers' way), which they reproduce. On CUDA it adds ViT-B-32 (random weights) with M = 300.

    python -m ovdistill.bench.regions_bench                      # small sizes, ~20 seconds on CPU
    python -m ovdistill.bench.regions_bench --images 32 --m 300 --model ViT-B-32 --device cuda

Weights are random: throughput does not depend on them, and nothing is downloaded. Besides
wall seconds it prints process CPU seconds: on shared cores wall time mostly measures how
many threads each path keeps runnable, CPU seconds what the path costs.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ovdistill.pipeline.clip_teacher import (
    DEFAULT_MODEL,
    Teacher,
    TeacherSpec,
    register_model_config,
)
from ovdistill.pipeline.crops import enlarge_boxes, preprocess_resize, region_crops
from ovdistill.pipeline.errors import reports_errors
from ovdistill.pipeline.images import load_rgb, to_uint8_tensor
from ovdistill.pipeline.region_embedding import CONTEXT_SCALE, embed_regions, rebatch
from PIL import Image, ImageDraw

PROPOSALS_SCHEMA = pa.schema([("image_id", pa.int64()), ("rank", pa.int32()),
                              ("box", pa.list_(pa.float32(), 4)), ("score", pa.float32())])


def random_teacher(model: str, device: str) -> Teacher:
    """An open_clip model with random weights wrapped as a Teacher (no weights file)."""
    import open_clip

    register_model_config(TeacherSpec(model))
    net, _, preprocess = open_clip.create_model_and_transforms(model, device=device)
    net.eval()
    pp = net.visual.preprocess_cfg
    size = pp["size"]
    return Teacher(model=net, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(model),
                   identity={"model": model, "pretrained": None, "model_config": None,
                             "sha256": None},
                   embed_dim=int(open_clip.get_model_config(model)["embed_dim"]),
                   image_size=int(size if isinstance(size, int) else size[0]),
                   mean=tuple(pp["mean"]), std=tuple(pp["std"]), device=device)


def make_images(folder: Path, n: int, width: int, height: int,
                seed: int = 0) -> list[tuple[int, Path]]:
    """`n` JPEGs of smooth colour noise with shapes -> [(image id, path)]."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        draw = ImageDraw.Draw(im)
        for _ in range(8):
            x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(8, 80)
            draw.ellipse([x - r, y - r, x + r, y + r],
                         fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        path = folder / f"{i:06d}.jpg"
        im.save(path, quality=90)
        files.append((i, path))
    return files


def make_proposals(ids: list[int], m: int, width: int, height: int, seed: int = 0) -> pa.Table:
    """`m` random boxes (2..80% of each side) per image, in the proposals contract."""
    rng = np.random.default_rng(seed)
    n = len(ids) * m
    w = rng.uniform(0.02, 0.8, n) * width
    h = rng.uniform(0.02, 0.8, n) * height
    x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    boxes = np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)
    return pa.Table.from_arrays(
        [pa.array(np.repeat(ids, m), pa.int64()), pa.array(np.tile(np.arange(m), len(ids)),
                                                           pa.int32()),
         pa.FixedSizeListArray.from_arrays(pa.array(boxes.reshape(-1), pa.float32()), 4),
         pa.array(rng.uniform(0, 1, n), pa.float32())], schema=PROPOSALS_SCHEMA)


def best_times(fns: dict[str, Callable], device: str,
               repeat: int) -> dict[str, tuple[float, float]]:
    """Best (wall seconds, process CPU seconds) of each function over `repeat` rounds, CUDA
    synchronised. The rounds interleave the functions, so a burst of load from other
    processes hits them alike; CPU seconds are what a CPU-bound run costs when cores are
    shared (wall time then depends on how many threads each path keeps runnable)."""
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def end_to_end(teacher: Teacher, files, proposals_path: Path, out_path: Path,
               batch_size: int) -> int:
    """What a regions part does: read proposals, decode, crop, encode, write -> rows."""
    table, rejects = embed_regions(teacher, pq.read_table(proposals_path), files,
                                   batch_size=batch_size)
    if rejects:
        raise RuntimeError(f"benchmark images were rejected: {rejects[:1]}")
    pq.write_table(table, out_path)
    return len(table)


def bare_forward(teacher: Teacher, batch: torch.Tensor, n_crops: int, batch_size: int) -> int:
    """The teacher alone on `n_crops` already-made crops, cut as the stage cuts them."""
    done = 0
    for size in [batch_size] * (n_crops // batch_size) + [n_crops % batch_size]:
        if size:
            teacher.encode_images(batch[:size]).cpu()
            done += size
    return done


def per_crop_pil(teacher: Teacher, images: list[Image.Image], boxes: list[torch.Tensor],
                 scale: float) -> torch.Tensor:
    """The peers' way: PIL crop + the teacher's own preprocess, one box at a time."""
    crops = []
    for image, b in zip(images, boxes):
        big = enlarge_boxes(b, scale, image.width, image.height)
        for box in torch.cat([b, big]).tolist():
            crops.append(teacher.preprocess(image.crop(tuple(box))))
    return torch.stack(crops).to(teacher.device)


def batched_crops(teacher: Teacher, images: list[Image.Image], boxes: list[torch.Tensor],
                  scale: float) -> torch.Tensor:
    interpolation, mode = preprocess_resize(teacher.preprocess, teacher.image_size)
    return torch.cat([region_crops(to_uint8_tensor(im).to(teacher.device), b,
                                   teacher.image_size, teacher.mean, teacher.std, scale,
                                   interpolation, mode)
                      for im, b in zip(images, boxes)])


def run_one(model: str, device: str, n_images: int, m: int, width: int, height: int,
            batch_size: int, pil_images: int, repeat: int, workdir: Path) -> list[str]:
    """Benchmark one (model, device, sizes) -> table lines."""
    torch.manual_seed(0)
    teacher = random_teacher(model, device)
    files = make_images(workdir / "images", n_images, width, height)
    proposals = make_proposals([i for i, _ in files], m, width, height)
    proposals_path = workdir / "proposals.parquet"
    pq.write_table(proposals, proposals_path)
    n_crops = 2 * len(proposals)

    pil = [load_rgb(p) for _, p in files]
    boxes = [torch.from_numpy(np.asarray(proposals.column("box").combine_chunks().flatten())
                              .reshape(-1, 4)[i * m:(i + 1) * m].copy()) for i in range(n_images)]
    batch = next(rebatch((batched_crops(teacher, pil[i:i + 1], boxes[i:i + 1], CONTEXT_SCALE)
                          for i in range(n_images)), batch_size))
    bare_forward(teacher, batch, batch_size, batch_size)  # warm-up

    k = min(pil_images, n_images)
    n_small = 2 * m * k
    t = best_times({
        "e2e": lambda: end_to_end(teacher, files, proposals_path, workdir / "regions.parquet",
                                  batch_size),
        "bare": lambda: bare_forward(teacher, batch, n_crops, batch_size),
        "pil": lambda: per_crop_pil(teacher, pil[:k], boxes[:k], CONTEXT_SCALE),
        "roi": lambda: batched_crops(teacher, pil[:k], boxes[:k], CONTEXT_SCALE),
    }, device, repeat)
    assert len(pq.read_table(workdir / "regions.parquet")) * 2 == n_crops

    head = (f"model={model} (S={teacher.image_size}, D={teacher.embed_dim}) device={device} "
            f"images={n_images} of {width}x{height}, M={m}, batch={batch_size}, "
            f"torch threads={torch.get_num_threads()}")
    line = "{:<44} {:>7} {:>9.3f} {:>10.1f} {:>9.3f}"

    def row(label, key, n):
        wall, cpu = t[key]
        return line.format(label, n, wall, n / wall, cpu)

    return [
        head,
        "{:<44} {:>7} {:>9} {:>10} {:>9}".format("path", "crops", "seconds", "crops/s",
                                                 "cpu s"),
        row("end-to-end (decode+crops+encode+write)", "e2e", n_crops),
        row("bare teacher forward (crops already made)", "bare", n_crops),
        (f"  ratio end-to-end / bare: wall {t['bare'][0] / t['e2e'][0]:.3f}, "
         f"cpu {t['bare'][1] / t['e2e'][1]:.3f}  (target >= 0.80)"),
        row("crops: per-crop PIL crop + preprocess", "pil", n_small),
        row("crops: batched (a few ops per image)", "roi", n_small),
        (f"  crop speed-up batched / PIL: wall {t['pil'][0] / t['roi'][0]:.1f}x, "
         f"cpu {t['pil'][1] / t['roi'][1]:.1f}x"),
    ]


@reports_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovdistill.bench.regions_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model (random weights)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--images", type=int, default=16,
                   help="a regions part holds ~80; with 8 the pipeline's fill and drain (first "
                        "decode, last short batch) weigh visibly")
    p.add_argument("--m", type=int, default=100, help="proposals per image")
    p.add_argument("--size", default="320x240", help="image WxH")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--pil-images", type=int, default=4,
                   help="images for the crop-path comparison")
    p.add_argument("--repeat", type=int, default=5, help="best of this many rounds")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads, as a regions Ray worker holding 1 CPU has "
                        "(0: torch's default)")
    p.add_argument("--no-cuda-vit", action="store_true",
                   help="skip the ViT-B-32 M=300 run that is added on CUDA")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    width, height = (int(v) for v in args.size.lower().split("x"))

    runs = [(args.model, args.images, args.m, width, height, args.batch_size)]
    if device.startswith("cuda") and not args.no_cuda_vit and args.model != "ViT-B-32":
        runs.append(("ViT-B-32", 32, 300, 640, 480, 1024))
    with tempfile.TemporaryDirectory(prefix="regions-bench-") as tmp:
        for i, (model, n, m, w, h, bs) in enumerate(runs):
            lines = run_one(model, device, n, m, w, h, bs, args.pil_images, args.repeat,
                            Path(tmp) / str(i))
            print("\n".join(lines))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
