"""The training stream: cached WebDataset shards -> decoded, augmented, batched samples.

    shards (cycled, reshuffled per epoch) ─► split_by_node ─► split_by_worker ─► tar samples
      ─► shuffle ─► decode (jpg, boxes.npy, scores.npy, emb.npy, json) ─► augment ─► batches

A shard packed before `.scores.npy` existed still trains: its proposals all get score 1, so
the confident-proposal options (`distill_min_score`, `distill_top_k`) then keep every one.

Augmentation (horizontal flip, scale jitter of the shortest side) is applied with the same
parameters to the image, its GT boxes and its cached proposal boxes, so the cached CLIP
embeddings stay attached to the image regions they were computed on.
"""
from __future__ import annotations

import io
import json
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import webdataset as wds
from ovdistill.pipeline import layout
from ovdistill.pipeline.errors import OvdError
from ovdistill.pipeline.images import ImageError, decode_rgb, to_uint8_tensor
from ovdistill.trainer.config import TrainConfig
from ovdistill.trainer.inputs import CacheMismatch
from torch import Tensor
from torch.utils.data import IterableDataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

# the members of a shard sample (layout.SHARD_MEMBERS, the pack stage writes them);
# .scores.npy is absent in shards packed before it existed
REQUIRED_MEMBERS = layout.REQUIRED_MEMBERS
SAMPLE_MEMBERS = (*REQUIRED_MEMBERS, "scores.npy")


class SampleError(OvdError, ValueError):
    """One bad sample; the stream logs it as a reject and goes on."""


@dataclass(frozen=True)
class Augmentation:
    size: int  # target shortest side in pixels
    max_size: int  # cap on the longest side
    flip: bool


def choose_augmentation(rng: random.Random, cfg: TrainConfig) -> Augmentation:
    return Augmentation(size=rng.choice(cfg.train_sizes), max_size=cfg.max_size,
                        flip=rng.random() < cfg.flip_prob)


def augment(image: Tensor, gt_boxes: Tensor, cached_boxes: Tensor, aug: Augmentation
            ) -> tuple[Tensor, Tensor, Tensor]:
    """Flip and resize an image and both of its box sets with the same parameters.

    image: Tensor[3, H, W] uint8; gt_boxes: Tensor[G, 4], cached_boxes: Tensor[M, 4]
    (x1, y1, x2, y2) in the image's pixels. Returns (Tensor[3, H', W'] float in [0, 1],
    Tensor[G, 4], Tensor[M, 4]) in the pixels of the new image.
    """
    canvas = tuple(image.shape[-2:])
    img = tv_tensors.Image(image)
    boxes = [tv_tensors.BoundingBoxes(b, format="XYXY", canvas_size=canvas)
             for b in (gt_boxes, cached_boxes)]
    if aug.flip:
        img = TF.horizontal_flip(img)
        boxes = [TF.horizontal_flip(b) for b in boxes]
    img = TF.resize(img, size=[aug.size], max_size=aug.max_size, antialias=True)
    boxes = [TF.resize(b, size=[aug.size], max_size=aug.max_size) for b in boxes]
    image = img.as_subclass(Tensor).float().div_(255.0)
    return image, boxes[0].as_subclass(Tensor), boxes[1].as_subclass(Tensor)


def resize_for_test(image: Tensor, size: int, max_size: int) -> tuple[Tensor, float]:
    """image: Tensor[3, H, W] uint8 -> (Tensor[3, H', W'] float in [0, 1], scale H'/H)."""
    out = TF.resize(image, size=[size], max_size=max_size, antialias=True)
    return out.float().div_(255.0), out.shape[-2] / image.shape[-2]


def decode_sample(sample: dict, embed_dim: int, labels: dict[int, int],
                  cached_per_image: int) -> dict:
    """A raw tar sample -> tensors. Raises SampleError (one line, naming shard and key) for a
    bad sample and CacheMismatch for embeddings of another dimension.

    The first `cached_per_image` cached proposals are kept: "cached_boxes" Tensor[M, 4],
    "cached_emb" Tensor[M, D] float16, "cached_scores" Tensor[M] float32 (their RPN scores;
    ones when the shard has no `.scores.npy`)."""
    where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"
    missing = [k for k in REQUIRED_MEMBERS if k not in sample]
    if missing:
        raise SampleError(f"{where}: missing {missing}")
    extra = sorted(k for k in sample if not k.startswith("__") and k not in SAMPLE_MEMBERS)
    if extra:  # never decoded: a shard is data a team receives
        raise SampleError(f"{where}: unexpected member(s) {extra}; a sample holds only "
                          f"{list(SAMPLE_MEMBERS)}")
    try:
        meta = json.loads(sample["json"])
        image = to_uint8_tensor(decode_rgb(sample["jpg"], f"{where}.jpg"))
        boxes = np.load(io.BytesIO(sample["boxes.npy"]), allow_pickle=False)
        emb = np.load(io.BytesIO(sample["emb.npy"]), allow_pickle=False)
    except ImageError as e:
        raise SampleError(str(e)) from None
    except (ValueError, OSError) as e:  # json / npy
        raise SampleError(f"{where}: cannot decode ({str(e).splitlines()[0]})") from None
    if emb.ndim != 2 or emb.shape[1] != embed_dim:
        raise CacheMismatch(f"{where}: .emb.npy has shape {emb.shape}, the trainer expects "
                            f"[M, {embed_dim}]")
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] != emb.shape[0]:
        raise SampleError(f"{where}: .boxes.npy shape {boxes.shape} does not match .emb.npy "
                          f"{emb.shape}")
    if "scores.npy" in sample:
        try:
            scores = np.load(io.BytesIO(sample["scores.npy"]), allow_pickle=False)
        except (ValueError, OSError) as e:
            raise SampleError(f"{where}: cannot decode .scores.npy "
                              f"({str(e).splitlines()[0]})") from None
        if scores.shape != (boxes.shape[0],):
            raise SampleError(f"{where}: .scores.npy shape {scores.shape} does not match "
                              f".boxes.npy {boxes.shape}")
    else:  # an older shard: every proposal counts as confident
        scores = np.ones(boxes.shape[0], np.float32)
    h, w = int(image.shape[-2]), int(image.shape[-1])
    if (meta.get("height"), meta.get("width")) != (h, w):
        raise SampleError(f"{where}: json says {meta.get('width')}x{meta.get('height')}, "
                          f"image is {w}x{h}")
    gt = np.asarray(meta.get("gt_boxes", []), dtype=np.float32).reshape(-1, 4)
    cats = list(meta.get("gt_category_ids", []))
    if len(cats) != len(gt):
        raise SampleError(f"{where}: {len(gt)} gt_boxes but {len(cats)} gt_category_ids")
    unknown = sorted({c for c in cats if c not in labels})
    if unknown:
        raise SampleError(f"{where}: gt category ids {unknown} are not base categories")
    m = min(len(boxes), cached_per_image)
    return {
        "key": sample["__key__"],
        "image_id": int(meta["image_id"]),
        "image": image,
        "gt_boxes": torch.from_numpy(gt),
        "labels": torch.tensor([labels[c] for c in cats], dtype=torch.int64),
        "cached_boxes": torch.from_numpy(np.ascontiguousarray(boxes[:m], dtype=np.float32)),
        "cached_emb": torch.from_numpy(np.ascontiguousarray(emb[:m])),
        "cached_scores": torch.from_numpy(np.ascontiguousarray(scores[:m], dtype=np.float32)),
    }


def augment_stage(src: Iterator[dict], cfg: TrainConfig, seed: int) -> Iterator[dict]:
    """Augments each sample with a random generator of its own per rank and worker."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    rng = random.Random(seed * 1_000_003 + rank * 1009 + worker)
    for s in src:
        image, gt, cached = augment(s["image"], s["gt_boxes"], s["cached_boxes"],
                                    choose_augmentation(rng, cfg))
        keep = (gt[:, 2] - gt[:, 0] >= 1) & (gt[:, 3] - gt[:, 1] >= 1)  # degenerate GT out
        yield {**s, "image": image, "gt_boxes": gt[keep], "labels": s["labels"][keep],
               "cached_boxes": cached}


def collate(samples: list[dict]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Samples -> (images, targets) as lists: sizes and box counts vary per image."""
    images = [s["image"] for s in samples]
    targets = [{"boxes": s["gt_boxes"], "labels": s["labels"],
                "cached_boxes": s["cached_boxes"], "cached_emb": s["cached_emb"],
                "cached_scores": s["cached_scores"], "image_id": torch.tensor(s["image_id"])}
               for s in samples]
    return images, targets


class ShardCycle(IterableDataset):
    """Every shard once per epoch, in a seeded order that changes per epoch; endless."""

    def __init__(self, urls: list[str], seed: int):
        super().__init__()
        self.urls, self.seed = list(urls), seed

    def __iter__(self) -> Iterator[dict]:
        epoch = 0
        while True:
            order = list(self.urls)
            random.Random(self.seed * 7919 + epoch).shuffle(order)
            for url in order:
                yield {"url": url}
            epoch += 1


def log_and_continue(exn: Exception) -> bool:
    """Stream error policy: a bad sample is logged as a reject; a cache mismatch stops."""
    if isinstance(exn, CacheMismatch):
        raise exn
    print(f"reject: {exn}", file=sys.stderr)
    return True


def train_pipeline(urls: list[str], cfg: TrainConfig, embed_dim: int, labels: dict[int, int],
                   seed: int) -> wds.DataPipeline:
    """The endless stream of (images, targets) batches for this rank (and worker)."""
    return wds.DataPipeline(
        ShardCycle(urls, seed),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=log_and_continue),
        wds.shuffle(cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, 16), seed=seed),
        wds.map(partial(decode_sample, embed_dim=embed_dim, labels=labels,
                        cached_per_image=cfg.cached_per_image), handler=log_and_continue),
        partial(augment_stage, cfg=cfg, seed=seed),
        wds.batched(cfg.batch_size, collation_fn=collate, partial=False),
    )


def loader_workers(cpus: int, ranks: int = 1, cap: int = 8) -> int:
    """DataLoader workers that pay for one CUDA training process: its share of the node's
    `cpus` (over `ranks` processes on the node), less one core for the process itself
    (the step's Python and kernel launches), at least 1 and at most `cap` (decoding a batch
    of small JPEGs and augmenting it takes a few cores, not a node's)."""
    return max(1, min(cap, cpus // max(1, ranks) - 1))


def resolve_workers(cfg: TrainConfig, device: torch.device, ranks: int = 1) -> int:
    """`cfg.num_workers`, or for None (auto): 1 on the CPU (the step needs the cores), else
    `loader_workers` of this node's CPUs over its `ranks` processes."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    if torch.device(device).type != "cuda":
        return 1
    return loader_workers(os.cpu_count() or 1, ranks)


def train_loader(urls: list[str], cfg: TrainConfig, embed_dim: int, labels: dict[int, int],
                 seed: int, pin_memory: bool = False,
                 num_workers: int | None = None) -> wds.WebLoader:
    """`train_pipeline` behind a DataLoader with `num_workers` (default: `cfg.num_workers`, or 1
    when that is None)
    decoding processes. `pin_memory` (pass True when training on CUDA) hands out batches in
    pinned host memory, so the trainer's `non_blocking` copies to the GPU really overlap."""
    workers = num_workers if num_workers is not None else (
        1 if cfg.num_workers is None else cfg.num_workers)
    pipeline = train_pipeline(urls, cfg, embed_dim, labels, seed)
    return wds.WebLoader(pipeline, batch_size=None, num_workers=workers,
                         persistent_workers=workers > 0, pin_memory=pin_memory,
                         prefetch_factor=4 if workers > 0 else None)
