"""What the trainer reads from the cache: shard URLs, the text-embedding vocabulary, the
teacher identity, and checks that they agree on the embedding dimension D; for the remedies
(`TrainConfig.center_targets`, `negative_prompts`) the text stage's `text/region_mean.npy`
and `text/negatives.parquet`."""
from __future__ import annotations

import dataclasses
import io
import itertools
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np
import pyarrow.parquet as pq
import torch
import webdataset as wds
from ovdistill.pipeline import layout
from ovdistill.pipeline.errors import OvdError
from ovdistill.pipeline.layout import DatasetCache
from torch import Tensor


class CacheMismatch(OvdError, ValueError):
    """The cache does not fit this run (dimension, vocabulary); one line naming the file."""


@dataclass(frozen=True)
class Vocabulary:
    """The categories of a text parquet, sorted by category id (the model's class columns)."""

    path: str
    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    is_base: Tensor  # [C] bool
    embeddings: Tensor  # [C, D] float32

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def base_labels(self) -> dict[int, int]:
        """category id -> training label (1 + column among the base classes; 0 = bg)."""
        base = [c for c, b in zip(self.category_ids, self.is_base.tolist()) if b]
        return {c: i + 1 for i, c in enumerate(base)}

    def base_only(self) -> Vocabulary:
        """The base categories alone (for a closed-vocabulary check of the base classes)."""
        keep = self.is_base.bool()
        flags = keep.tolist()
        return dataclasses.replace(
            self, category_ids=tuple(itertools.compress(self.category_ids, flags)),
            names=tuple(itertools.compress(self.names, flags)), is_base=keep[keep],
            embeddings=self.embeddings[keep])


def text_parquet_path(cache_dir: Path, dataset_name: str) -> Path:
    return DatasetCache(cache_dir).text_parquet(dataset_name)


def load_vocabulary(path: str | Path, expect_dim: int | None = None) -> Vocabulary:
    """Read `text/<vocab>.parquet` (category_id, name, split, embedding[D]).

    `expect_dim`: refuse a file whose D differs (e.g. the D a checkpoint was trained with).
    """
    path = Path(path)
    if not path.exists():
        raise CacheMismatch(f"{path}: text embeddings not found (run the `text` stage first)")
    table = pq.read_table(path)
    need = {"category_id", "name", "split", "embedding"}
    if not need <= set(table.column_names):
        raise CacheMismatch(f"{path}: needs columns {sorted(need)}, has {table.column_names}")
    if table.num_rows == 0:
        raise CacheMismatch(f"{path}: no categories")
    rows = sorted(zip(table.column("category_id").to_pylist(), table.column("name").to_pylist(),
                      table.column("split").to_pylist(),
                      table.column("embedding").to_pylist()), key=lambda r: r[0])
    bad = [r[2] for r in rows if r[2] not in ("base", "novel")]
    if bad:
        raise CacheMismatch(f"{path}: split must be base or novel, found {bad[0]!r}")
    emb = torch.tensor(np.asarray([r[3] for r in rows], dtype=np.float32))
    if expect_dim is not None and emb.shape[1] != expect_dim:
        raise CacheMismatch(f"{path}: embedding dim D={emb.shape[1]}, but the trainer expects "
                            f"D={expect_dim}; this cache was built with another teacher")
    is_base = torch.tensor([r[2] == "base" for r in rows])
    if not bool(is_base.any()):
        raise CacheMismatch(f"{path}: no base categories")
    return Vocabulary(str(path), tuple(int(r[0]) for r in rows), tuple(r[1] for r in rows),
                      is_base, emb)


REGION_MEAN_FILE = layout.REGION_MEAN_FILE  # written by the text stage
NEGATIVES_FILE = layout.NEGATIVES_FILE


def load_region_mean(cache_dir: str | Path, expect_dim: int | None = None) -> Tensor:
    """`<cache>/<ds>/text/region_mean.npy`: the normalized mean of every cached region
    embedding, Tensor[D] float32 (for `center_targets`)."""
    path = DatasetCache(cache_dir).region_mean()
    if not path.exists():
        raise CacheMismatch(f"{path}: not found; center_targets needs the cache's mean region "
                            f"embedding (re-run the `text` stage after `regions`)")
    try:
        mean = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CacheMismatch(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
    if mean.ndim != 1 or (expect_dim is not None and mean.shape[0] != expect_dim):
        raise CacheMismatch(f"{path}: shape {mean.shape}, the trainer expects "
                            f"[{expect_dim if expect_dim is not None else 'D'}]")
    return torch.from_numpy(mean.astype(np.float32))


def load_negatives(cache_dir: str | Path, expect_dim: int | None = None) -> Tensor:
    """`<cache>/<ds>/text/negatives.parquet` (name, embedding[D]): the generic negative
    texts, Tensor[K, D] float32 (for `negative_prompts`)."""
    path = DatasetCache(cache_dir).negatives()
    if not path.exists():
        raise CacheMismatch(f"{path}: not found; negative_prompts needs the text stage's "
                            f"negative texts (re-run the `text` stage)")
    table = pq.read_table(path)
    if "embedding" not in table.column_names or table.num_rows == 0:
        raise CacheMismatch(f"{path}: needs an `embedding` column and at least one row")
    emb = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    if expect_dim is not None and emb.shape[1] != expect_dim:
        raise CacheMismatch(f"{path}: embedding dim D={emb.shape[1]}, but the trainer expects "
                            f"D={expect_dim}")
    return torch.from_numpy(emb)


def shard_urls(spec: str | None, cache_dir: Path) -> list[str]:
    """Brace-expanded `spec` (local paths or `pipe:` URLs), or every `wds/train-*.tar` of the
    cache when `spec` is None."""
    if spec:
        urls = []
        for part in spec.split("::"):
            urls.extend(braceexpand.braceexpand(part))
        return urls
    cache = DatasetCache(cache_dir)
    urls = [str(p) for p in cache.shards()]
    if not urls:
        raise CacheMismatch(f"{cache.shards_dir()}: no {layout.SHARD_GLOB} shards "
                            f"(run the `pack` stage first)")
    return urls


def first_sample(url: str) -> dict:
    """The first raw sample (member name -> bytes) of shard `url`."""
    try:
        return next(iter(wds.DataPipeline(wds.SimpleShardList([url]),
                                          wds.tarfile_to_samples())))
    except StopIteration:
        raise CacheMismatch(f"{url}: shard holds no samples") from None
    except (OSError, ValueError) as e:
        raise CacheMismatch(f"{url}: cannot read shard ({e})") from None


def shard_has_scores(url: str) -> bool:
    """Whether shard `url` carries `.scores.npy` (shards packed before it existed do not)."""
    return "scores.npy" in first_sample(url)


def shard_embedding_dim(url: str) -> int:
    """D of the first sample's `.emb.npy` in shard `url`."""
    sample = first_sample(url)
    if "emb.npy" not in sample:
        raise CacheMismatch(f"{url}: sample {sample['__key__']} has no .emb.npy")
    emb = np.load(io.BytesIO(sample["emb.npy"]), allow_pickle=False)
    if emb.ndim != 2:
        raise CacheMismatch(f"{url}: sample {sample['__key__']}: .emb.npy has shape "
                            f"{emb.shape}, expected [M, D]")
    return int(emb.shape[1])


def check_shard_dim(url: str, vocab: Vocabulary) -> None:
    """Refuse shards whose cached region embeddings have another D than the text file."""
    d = shard_embedding_dim(url)
    if d != vocab.dim:
        raise CacheMismatch(f"{url}: cached region embeddings have D={d}, but {vocab.path} has "
                            f"D={vocab.dim}; rebuild the cache with one teacher")


def teacher_identity(cache_dir: Path) -> dict | None:
    """The teacher recorded by the teacher stage (None when the cache has no teacher stage)."""
    manifest = DatasetCache(cache_dir).read_manifest(layout.TEACHER, required=False)
    return None if manifest is None else manifest.get("teacher")


def vocabulary_extras(cfg, cache_dir: str | Path, dim: int) -> dict[str, Tensor | None]:
    """What `OpenVocabDetector.set_vocabulary` needs beside the texts for a run trained with
    `cfg` (a TrainConfig): the region mean for center_targets, the negative texts for
    negative_prompts (None when off). Training and evaluation both call this, so a run is
    evaluated with what it trained with."""
    return {"region_mean": load_region_mean(cache_dir, dim) if cfg.center_targets else None,
            "negatives": load_negatives(cache_dir, dim) if cfg.negative_prompts else None}
