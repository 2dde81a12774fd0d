"""The pairs stream (DetCLIPv2): `pairs_wds/pairs-NNNNNN.tar` -> decoded, augmented batches of
image-text pairs with their cached proposals and phrase embeddings.

    pair shards (cycled, reshuffled per epoch) ─► split_by_node ─► split_by_worker ─► samples
      ─► shuffle ─► decode + skip (counted) ─► augment ─► batches of pairs_batch_size

A sample holds layout.PAIR_MEMBERS: `.jpg`, `.boxes.npy` float32[K, 4] (original pixels, in
objectness rank order), `.scores.npy` float32[K], `.phrases.json` {"image_id", "width",
"height", "caption", "phrases"}, `.phrase_emb.npy` float16[P, D]. The first `pairs_top_k`
boxes are kept (the shard's rank order is the objectness order after NMS). The pair_pack stage
writes only pairs with a phrase and a box; a sample without either, or a malformed one, is
skipped, never a crash, and counted: every batch carries the counts of the samples its worker
skipped since its previous batch (`SKIP_KEYS`), so the trainer can log them whatever process
decoded them.

Also here: the dictionary negatives (`load_dictionary_negatives`, `sample_negatives`) and the
iteration type of the joint loop (`is_pair_iteration`), both pure functions of (seed, step).
"""
from __future__ import annotations

import io
import json
import random
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import webdataset as wds
from ovdistill.pipeline import layout
from ovdistill.pipeline.images import ImageError, decode_rgb, to_uint8_tensor
from ovdistill.pipeline.layout import DatasetCache
from ovdistill.trainer.config import TrainConfig
from ovdistill.trainer.data import Augmentation, SampleError, ShardCycle, augment, log_and_continue
from ovdistill.trainer.inputs import CacheMismatch, first_sample
from torch import Tensor

PAIR_MEMBERS = layout.PAIR_MEMBERS
# the counters each batch carries (metrics.jsonl logs them summed over the logged steps)
NO_PHRASE, NO_BOX, REJECTED = "pairs_skipped_no_phrase", "pairs_skipped_no_box", "pairs_rejected"
SKIP_KEYS = (NO_PHRASE, NO_BOX, REJECTED)


class EmptyPair(SampleError):
    """A well-formed pair that cannot train: no phrase or no proposal. `kind` is its counter."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def is_pair_iteration(seed: int, step: int, ratio: float) -> bool:
    """Whether iteration `step` (0-based: the step count before it) of a run seeded `seed` is a
    pair iteration: a draw of its own per (seed, step), so a resumed run and every DDP rank
    make the same choice with nothing to store. ratio 0 never, 1 always."""
    if ratio <= 0.0:
        return False
    return random.Random(f"pairs:{seed}:{step}").random() < ratio


def sample_negatives(pool: int, k: int, seed: int, step: int) -> list[int]:
    """min(k, pool) distinct row indices of the dictionary-negatives pool for iteration `step`
    (a draw of its own per (seed, step), like `is_pair_iteration`), in sorted order."""
    k = min(k, pool)
    if k <= 0:
        return []
    return sorted(random.Random(f"negatives:{seed}:{step}").sample(range(pool), k))


def load_dictionary_negatives(cache_dir: str | Path, expect_dim: int,
                              base_names: list[str]) -> tuple[list[str], Tensor]:
    """The concepts of `<cache>/<ds>/phrases/dictionary.parquet` (name, split, embedding[D])
    that may be negatives: split not "base" and a name (case-insensitive) that is no base
    category's. Returns (names, Tensor[N, D] float32 L2-normalised)."""
    path = DatasetCache(cache_dir).dictionary()
    if not path.exists():
        raise CacheMismatch(f"{path}: not found; dictionary_negatives needs the concept "
                            f"dictionary: run `python -m ovdistill run --stages phrases`")
    table = pq.read_table(path)
    missing = [c for c in ("name", "split", "embedding") if c not in table.column_names]
    if missing:
        raise CacheMismatch(f"{path}: missing column(s) {missing}")
    base = {n.lower() for n in base_names}
    rows = [(n, e) for n, s, e in zip(table.column("name").to_pylist(),
                                       table.column("split").to_pylist(),
                                       table.column("embedding").to_pylist())
            if s != "base" and n.lower() not in base]
    if not rows:
        raise CacheMismatch(f"{path}: no concept outside the base categories to use as a "
                            f"negative (dictionary_negatives > 0)")
    emb = np.asarray([e for _, e in rows], dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] != expect_dim:
        raise CacheMismatch(f"{path}: embedding dim D={emb.shape[-1]}, but the trainer expects "
                            f"D={expect_dim}")
    return [n for n, _ in rows], torch.nn.functional.normalize(torch.from_numpy(emb), dim=-1)


def pair_shard_urls(cache_dir: str | Path) -> list[str]:
    """Every `pairs_wds/pairs-*.tar` of the cache; none is a one-line error naming the folder
    and the stage that writes them."""
    cache = DatasetCache(cache_dir)
    urls = [str(p) for p in cache.pair_shards()]
    if not urls:
        raise CacheMismatch(f"{cache.pair_shards_dir()}: no {layout.PAIR_SHARD_GLOB} shards, "
                            f"which pairs_ratio > 0 trains on: run `python -m ovdistill run "
                            f"--stages pair_pack`")
    return urls


def check_pair_shard_dim(url: str, embed_dim: int) -> None:
    """Refuse pair shards whose phrase embeddings have another D than the text file's."""
    sample = first_sample(url)
    if "phrase_emb.npy" not in sample:
        raise CacheMismatch(f"{url}: sample {sample['__key__']} has no .phrase_emb.npy")
    emb = np.load(io.BytesIO(sample["phrase_emb.npy"]), allow_pickle=False)
    if emb.ndim != 2 or emb.shape[1] != embed_dim:
        raise CacheMismatch(f"{url}: phrase embeddings have shape {emb.shape}, the trainer "
                            f"expects [P, {embed_dim}]; rebuild the cache with one teacher")


def _npy(sample: dict, key: str, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(sample[key]), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise SampleError(f"{where}: cannot decode .{key} ({str(e).splitlines()[0]})") from None


def load_pseudo_boxes(path: str | Path) -> dict[int, dict[str, list[float]]]:
    """The kept pseudo-boxes of the pseudo_boxes stage's file (MDETR format, layout.PSEUDO_FILE)
    -> {pair image id: {phrase: [x1, y1, x2, y2] in the pair image's original pixels}}."""
    path = Path(path)
    if not path.is_file():
        raise CacheMismatch(f"{path}: not found; pairs_pseudo_weight > 0 reads the pseudo_boxes "
                            f"stage's kept boxes: run `python -m ovdistill run --stages "
                            f"pseudo_boxes`")
    out: dict[int, dict[str, list[float]]] = {}
    where = "the file"
    try:
        for i, a in enumerate(json.loads(path.read_text()).get("annotations", [])):
            where = f"annotation {i}"
            x, y, w, h = (float(v) for v in a["bbox"])
            out.setdefault(int(a["image_id"]), {})[str(a["phrase"])] = [x, y, x + w, y + h]
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CacheMismatch(f"{path}: {where} is not a pseudo-box of the pseudo_boxes stage "
                            f"({type(e).__name__}: {e})") from None
    return out


def pseudo_targets(phrases: list[str], found: dict[str, list[float]] | None
                   ) -> tuple[Tensor, Tensor]:
    """Each phrase's pseudo-box -> (Tensor[P, 4] float32, zeros where it has none; Tensor[P]
    bool, True where it has one)."""
    found = found or {}
    boxes = torch.tensor([found.get(p, [0.0] * 4) for p in phrases],
                         dtype=torch.float32).reshape(-1, 4)
    return boxes, torch.tensor([p in found for p in phrases], dtype=torch.bool)


def decode_pair(sample: dict, embed_dim: int, top_k: int,
                pseudo: dict[int, dict[str, list[float]]] | None = None) -> dict:
    """A raw pair sample -> tensors: "image" Tensor[3, H, W] uint8, "boxes" Tensor[K, 4]
    float32 (the first min(K, top_k) in rank order, clipped to the image), "phrase_emb"
    Tensor[P, D] float16, "image_id" int, "phrases" list[str]; with `pseudo`
    (`load_pseudo_boxes`) also "pseudo_boxes" Tensor[P, 4] and "pseudo_mask" Tensor[P] bool
    (`pseudo_targets`).

    Raises EmptyPair for a pair with no phrase or no box, SampleError (one line naming shard
    and key) for a malformed sample, CacheMismatch for phrase embeddings of another D."""
    where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"
    missing = [k for k in PAIR_MEMBERS if k not in sample]
    if missing:
        raise SampleError(f"{where}: missing {missing}")
    extra = sorted(k for k in sample if not k.startswith("__") and k not in PAIR_MEMBERS)
    if extra:
        raise SampleError(f"{where}: unexpected member(s) {extra}; a pair sample holds only "
                          f"{list(PAIR_MEMBERS)}")
    try:
        meta = json.loads(sample["phrases.json"])
    except ValueError as e:
        raise SampleError(f"{where}: cannot decode .phrases.json ({e})") from None
    phrases = meta.get("phrases") if isinstance(meta, dict) else None
    if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
        raise SampleError(f"{where}: .phrases.json needs \"phrases\": a list of strings")
    boxes = _npy(sample, "boxes.npy", where)
    scores = _npy(sample, "scores.npy", where)
    emb = _npy(sample, "phrase_emb.npy", where)
    if emb.size == 0:  # no phrase: [0, D] or any empty array
        emb = emb.reshape(0, embed_dim)
    if emb.ndim != 2:
        raise SampleError(f"{where}: .phrase_emb.npy has shape {emb.shape}, expected [P, D]")
    if emb.shape[1] != embed_dim:
        raise CacheMismatch(f"{where}: .phrase_emb.npy has shape {emb.shape}, the trainer "
                            f"expects [P, {embed_dim}]")
    if emb.shape[0] != len(phrases):
        raise SampleError(f"{where}: {len(phrases)} phrases but .phrase_emb.npy has "
                          f"{emb.shape[0]} rows")
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0],):
        raise SampleError(f"{where}: .boxes.npy shape {boxes.shape} and .scores.npy shape "
                          f"{scores.shape} do not match [K, 4] and [K]")
    if not phrases:
        raise EmptyPair(f"{where}: no phrase in its caption", NO_PHRASE)
    if len(boxes) == 0:
        raise EmptyPair(f"{where}: no proposal", NO_BOX)
    try:
        image = to_uint8_tensor(decode_rgb(sample["jpg"], f"{where}.jpg"))
    except ImageError as e:
        raise SampleError(str(e)) from None
    h, w = int(image.shape[-2]), int(image.shape[-1])
    if (meta.get("height"), meta.get("width")) != (h, w):
        raise SampleError(f"{where}: .phrases.json says {meta.get('width')}x"
                          f"{meta.get('height')}, image is {w}x{h}")
    kept = torch.from_numpy(np.ascontiguousarray(boxes[:top_k], dtype=np.float32))
    kept[:, 0::2] = kept[:, 0::2].clamp(0, w)
    kept[:, 1::2] = kept[:, 1::2].clamp(0, h)
    out = {"key": sample["__key__"], "image_id": int(meta.get("image_id", -1)),
           "image": image, "boxes": kept, "phrases": list(phrases),
           "phrase_emb": torch.from_numpy(np.ascontiguousarray(emb))}
    if pseudo is not None:
        out["pseudo_boxes"], out["pseudo_mask"] = pseudo_targets(phrases,
                                                                 pseudo.get(out["image_id"]))
    return out


def decode_stage(src: Iterator[dict], embed_dim: int, top_k: int,
                 pseudo: dict[int, dict[str, list[float]]] | None = None) -> Iterator[dict]:
    """Decodes each raw sample; the ones it skips are counted into the next sample it yields
    ("skipped": {counter: n}). A CacheMismatch stops the stream."""
    skipped = dict.fromkeys(SKIP_KEYS, 0)
    for raw in src:
        try:
            s = decode_pair(raw, embed_dim, top_k, pseudo)
        except EmptyPair as e:
            skipped[e.kind] += 1
            print(f"skip: {e}", file=sys.stderr)
            continue
        except SampleError as e:
            skipped[REJECTED] += 1
            print(f"reject: {e}", file=sys.stderr)
            continue
        yield {**s, "skipped": skipped}
        skipped = dict.fromkeys(SKIP_KEYS, 0)


def augment_stage(src: Iterator[dict], cfg: TrainConfig, seed: int) -> Iterator[dict]:
    """Flip (flip_prob) and resize (one of pairs_sizes, max_size) image and boxes alike, with
    a random generator per rank and worker."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    rng = random.Random(seed * 1_000_003 + rank * 1009 + worker + 17)
    for s in src:
        aug = Augmentation(size=rng.choice(cfg.pairs_sizes), max_size=cfg.max_size,
                           flip=rng.random() < cfg.flip_prob)
        image, pseudo, boxes = augment(s["image"], s.get("pseudo_boxes", torch.zeros(0, 4)),
                                       s["boxes"], aug)
        yield {**s, "image": image, "boxes": boxes,
               **({"pseudo_boxes": pseudo} if "pseudo_boxes" in s else {})}


def collate_pairs(samples: list[dict]) -> tuple[list[Tensor], list[dict[str, Tensor]], dict]:
    """Samples -> (images list of Tensor[3, H_i, W_i] float in [0, 1], per pair {"boxes":
    Tensor[K_i, 4], "phrase_emb": Tensor[P_i, D], "phrase_ids": Tensor[P_i] int64 (equal ids
    = equal phrase texts within the batch), "image_id": Tensor[], and with pseudo-boxes
    "pseudo_boxes" Tensor[P_i, 4], "pseudo_mask" Tensor[P_i] bool}, {counter: skipped samples
    since the worker's previous batch})."""
    images = [s["image"] for s in samples]
    ids: dict[str, int] = {}  # one id per distinct phrase text of the batch
    pairs = [{"boxes": s["boxes"], "phrase_emb": s["phrase_emb"],
              "phrase_ids": torch.tensor([ids.setdefault(t, len(ids)) for t in s["phrases"]],
                                         dtype=torch.int64),
              "image_id": torch.tensor(s["image_id"]),
              **{k: s[k] for k in ("pseudo_boxes", "pseudo_mask") if k in s}} for s in samples]
    skipped = {k: sum(s["skipped"][k] for s in samples) for k in SKIP_KEYS}
    return images, pairs, skipped


def pair_samples(urls: list[str], embed_dim: int, top_k: int) -> Iterator[dict]:
    """One pass over `urls` in order, decoded (`decode_stage`): what the stream trains on."""
    return iter(wds.DataPipeline(wds.SimpleShardList(urls),
                                 wds.tarfile_to_samples(handler=log_and_continue),
                                 partial(decode_stage, embed_dim=embed_dim, top_k=top_k)))


def pair_pipeline(urls: list[str], cfg: TrainConfig, embed_dim: int, seed: int,
                  pseudo: dict[int, dict[str, list[float]]] | None = None) -> wds.DataPipeline:
    """The endless stream of (images, pairs, skipped) batches for this rank (and worker);
    with `pseudo` (`load_pseudo_boxes`) each pair carries its phrases' pseudo-boxes."""
    return wds.DataPipeline(
        ShardCycle(urls, seed),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=log_and_continue),
        wds.shuffle(cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, 16), seed=seed),
        partial(decode_stage, embed_dim=embed_dim, top_k=cfg.pairs_top_k, pseudo=pseudo),
        partial(augment_stage, cfg=cfg, seed=seed),
        wds.batched(cfg.pairs_batch_size, collation_fn=collate_pairs, partial=False),
    )


def pair_loader(urls: list[str], cfg: TrainConfig, embed_dim: int, seed: int,
                num_workers: int, pin_memory: bool = False,
                pseudo: dict[int, dict[str, list[float]]] | None = None) -> wds.WebLoader:
    """`pair_pipeline` behind a DataLoader with `num_workers` decoding processes."""
    return wds.WebLoader(pair_pipeline(urls, cfg, embed_dim, seed, pseudo), batch_size=None,
                         num_workers=num_workers, persistent_workers=num_workers > 0,
                         pin_memory=pin_memory, prefetch_factor=4 if num_workers > 0 else None)
