"""A tiny cache in the exact contract format, for the trainer tests and the train bench.

`write_tiny_cache(root)` writes, under root:
    manifest.yaml                         name: tiny, format: coco, root: <root>/cache/tiny/dataset
    cache/tiny/dataset/{train,val}/*.jpg  coloured rectangles / ellipses on grey
    cache/tiny/dataset/{train,val}.json   COCO format (train: base boxes only; val: all)
    cache/tiny/text/tiny.parquet          category_id, name, split, embedding[D] (normalized)
    cache/tiny/text/negatives.parquet     name, embedding[D]: 3 random unit "negative prompts"
    cache/tiny/text/region_mean.npy       float32[D]: normalized mean of the cached embeddings
    cache/tiny/wds/train-NNNNNN.tar       img<id>: .jpg .boxes.npy .scores.npy .emb.npy .json
    cache/tiny/teacher/_MANIFEST.json     {"teacher": {...}}
The cached proposals are the GT boxes jittered plus random boxes; their "teacher embeddings"
are the text embedding of the overlapping object (or a random direction), normalized; their
RPN scores are high (0.7-1) for the jittered GT boxes and low (0-0.5) for the random ones
(scores and negatives come from a generator of their own, so the rest of the fixture is as
before they existed).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from ovdistill.pipeline import layout
from ovdistill.pipeline.layout import DatasetCache
from PIL import Image, ImageDraw

BASE = ("box", "ball", "bar")
NOVEL = ("ring",)
COLOURS = {"box": (220, 40, 40), "ball": (40, 180, 60), "bar": (40, 80, 220),
           "ring": (240, 210, 40)}


@dataclass(frozen=True)
class TinyCache:
    root: Path
    manifest: Path
    cache: Path  # the cache root (holds tiny/)
    dataset_dir: Path  # cache/tiny
    dim: int
    shards: list[str]
    n_train: int
    n_val: int


def _draw(rng: np.random.Generator, size: int, names: tuple[str, ...]):
    img = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    boxes, cats = [], []
    for _ in range(int(rng.integers(1, 3))):
        name = names[int(rng.integers(len(names)))]
        w, h = (int(v) for v in rng.integers(size // 5, size // 2, 2))
        x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        box = [x, y, x + w, y + h]
        if name == "ball":
            draw.ellipse(box, fill=COLOURS[name])
        elif name == "ring":
            draw.ellipse(box, outline=COLOURS[name], width=3)
        else:
            draw.rectangle(box, fill=COLOURS[name])
        boxes.append([float(v) for v in box])
        cats.append(name)
    return img, boxes, cats


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _normalize(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def write_tiny_cache(root: str | Path, *, n_train: int = 16, n_val: int = 6, size: int = 64,
                     dim: int = 16, m: int = 12, n_shards: int = 4, seed: int = 0,
                     emb_dim_in_shards: int | None = None) -> TinyCache:
    """Write the tiny cache; `emb_dim_in_shards` makes the shards disagree with the text D."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    extra_rng = np.random.default_rng(seed + 1000)
    ds = root / "cache" / "tiny"
    cache = DatasetCache(ds)
    data = ds / layout.DATASET
    names = BASE + NOVEL
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    categories = [{"id": cat_id[n], "name": n} for n in names]
    text = _normalize(rng.normal(size=(len(names), dim)).astype(np.float32))

    cache.stage_dir(layout.TEXT).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "category_id": pa.array([cat_id[n] for n in names], pa.int64()),
        "name": pa.array(list(names)),
        "split": pa.array(["base"] * len(BASE) + ["novel"] * len(NOVEL)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(text.reshape(-1), pa.float32()),
                                                       dim),
    }), cache.text_parquet("tiny"))

    neg = _normalize(extra_rng.normal(size=(3, dim)).astype(np.float32))
    pq.write_table(pa.table({
        "name": pa.array(["neg a", "neg b", "neg c"]),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(neg.reshape(-1), pa.float32()),
                                                       dim),
    }), cache.negatives())

    next_id = 1
    shard_dim = emb_dim_in_shards or dim
    emb_sum = np.zeros(shard_dim)
    cache.shards_dir().mkdir(parents=True, exist_ok=True)
    writers = [wds.TarWriter(str(cache.shards_dir() / layout.shard_name(i)))
               for i in range(n_shards)]
    for split, n, vocab in (("train", n_train, BASE), ("val", n_val, names)):
        (data / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            img, boxes, cats = _draw(rng, size, vocab)
            image_id, file_name = next_id, f"{split}_{next_id:04d}.jpg"
            next_id += 1
            jpg = _jpeg(img)
            (data / split / file_name).write_bytes(jpg)
            images.append({"id": image_id, "file_name": file_name, "width": size,
                           "height": size})
            for b, c in zip(boxes, cats):
                anns.append({"id": len(anns) + 1, "image_id": image_id,
                             "category_id": cat_id[c], "iscrowd": 0,
                             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                             "area": (b[2] - b[0]) * (b[3] - b[1])})
            if split != "train":
                continue
            # cached proposals: jittered GT (embedding = its class text) + random boxes
            props, embs, scores = [], [], []
            for j in range(m):
                scores.append(extra_rng.uniform(0.7, 1.0) if j < 2 * len(boxes)
                              else extra_rng.uniform(0.0, 0.5))
                if j < 2 * len(boxes):
                    b = np.asarray(boxes[j % len(boxes)]) + rng.normal(0, 2, 4)
                    e = text[cat_id[cats[j % len(boxes)]] - 1, :shard_dim] \
                        if shard_dim <= dim else rng.normal(size=shard_dim)
                else:
                    x1, y1 = rng.uniform(0, size * 0.7, 2)
                    b = np.asarray([x1, y1, x1 + rng.uniform(4, size * 0.3),
                                    y1 + rng.uniform(4, size * 0.3)])
                    e = rng.normal(size=shard_dim)
                props.append(np.clip(b, 0, size))
                embs.append(e)
            cached = _normalize(np.asarray(embs, np.float32)).astype(np.float16)
            emb_sum += cached.astype(np.float64).sum(axis=0)
            writers[i % n_shards].write({
                "__key__": f"img{image_id}",
                "jpg": jpg,
                "boxes.npy": _npy(np.asarray(props, np.float32)),
                "scores.npy": _npy(np.asarray(scores, np.float32)),
                "emb.npy": _npy(cached),
                "json": json.dumps({"image_id": image_id, "file_name": file_name,
                                    "width": size, "height": size, "gt_boxes": boxes,
                                    "gt_category_ids": [cat_id[c] for c in cats]}).encode(),
            })
        with open(data / f"{split}.json", "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    for w in writers:
        w.close()
    np.save(cache.region_mean(), (emb_sum / np.linalg.norm(emb_sum)).astype(
        np.float32), allow_pickle=False)

    cache.stage_dir(layout.TEACHER).mkdir(parents=True, exist_ok=True)
    cache.manifest_path(layout.TEACHER).write_text(json.dumps(
        {"teacher": {"model": "tiny-test", "pretrained": None, "model_config": None,
                     "sha256": "0" * 64, "embed_dim": dim}}))
    manifest = root / "manifest.yaml"
    manifest.write_text(
        "name: tiny\nformat: coco\nroot: \"{cache}/tiny/dataset\"\n"
        "splits:\n  train: {images: train, annotations: train.json}\n"
        "  val: {images: val, annotations: val.json}\n"
        f"vocabulary:\n  base: {list(BASE)}\n  novel: {list(NOVEL)}\n")
    shards = [str(p) for p in cache.shards()]
    return TinyCache(root, manifest, root / "cache", ds, dim, shards, n_train, n_val)


# the train config every trainer test uses: a tiny model on 64-px images
TINY_SETTINGS = {
    "batch_size": 2, "train_sizes": [64, 80], "max_size": 128, "test_size": 64,
    "representation_size": 32, "rpn_pre_nms_train": 200, "rpn_post_nms_train": 100,
    "rpn_pre_nms_test": 100, "rpn_post_nms_test": 50, "box_batch_size_per_image": 32,
    "num_workers": 0, "shuffle_buffer": 4, "warmup_steps": 2, "log_every": 1,
    "ckpt_every": 2, "anchor_sizes": [8, 16, 32, 64, 128],
}
