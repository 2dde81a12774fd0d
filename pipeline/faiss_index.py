"""Search over the index stage's faiss index: load it with its row map (`ids.parquet`) and
find the regions nearest a query embedding (inner product of L2-normalised vectors = cosine).
The index stage (stages/index.py) builds the files; query and bench read them through here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ovdistill.pipeline.errors import StageError
from ovdistill.pipeline.layout import IDS_FILE, INDEX_FILE

ID_COLUMNS = ["image_id", "rank", "box", "score"]  # the region columns ids.parquet keeps


def normalized(emb: np.ndarray) -> np.ndarray:
    """emb: [N, D] any float -> float32 [N, D], each row L2-normalised (0-rows stay 0)."""
    x = np.ascontiguousarray(emb, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def import_faiss():
    """The `faiss` module, or a StageError saying how to install one (faiss comes from the
    `cpu` or the `gpu` extra, not from the plain install)."""
    try:
        import faiss
    except ImportError as e:
        raise StageError(f"index: faiss is not installed ({e}); pip install 'ovdistill[cpu]' "
                         f"(faiss-cpu) or 'ovdistill[gpu]' (faiss-gpu), not both") from None
    return faiss


@dataclass(frozen=True)
class Hit:
    row: int
    image_id: int
    rank: int
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 original pixels
    proposal_score: float
    similarity: float  # cosine to the query


class IdMap:
    """faiss id (row) -> its `ids.parquet` row, reading only the row groups that hold the
    asked rows (the file can hold hundreds of millions of rows)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = pq.ParquetFile(path)
        md = self.file.metadata
        self.starts = np.cumsum([0] + [md.row_group(g).num_rows
                                       for g in range(md.num_row_groups)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, rows: np.ndarray) -> pa.Table:
        """rows: int64[K] in [0, len) -> a K-row table in the same order."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"{self.path}: rows must be in [0, {len(self)})")
        groups = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(groups, kind="stable")
        parts = [self.file.read_row_group(int(g)).take(pa.array(rows[groups == g]
                                                                 - self.starts[g]))
                 for g in np.unique(groups)]
        if not parts:
            return self.file.schema_arrow.empty_table()
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return pa.concat_tables(parts).take(pa.array(inverse))


def load_index(stage_dir: Path, nprobe: int | None = None):
    """(faiss index, IdMap) of a finished index stage; `nprobe` applied to IVF indexes."""
    faiss = import_faiss()

    index = faiss.read_index(str(Path(stage_dir) / INDEX_FILE))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nprobe:
        ivf.nprobe = int(nprobe)
    return index, IdMap(Path(stage_dir) / IDS_FILE)


def search(index, ids: IdMap, queries: np.ndarray, k: int,
           min_score: float = 0.0) -> list[list[Hit]]:
    """queries: [Q, D] (normalised here) -> for each query its top-k hits, best first.

    With `min_score` > 0 only regions whose proposal (objectness) score reaches it count: the
    search widens (4x at a time) until k of them are found or the whole index was searched."""
    queries = normalized(queries)
    out = []
    for q in queries:
        fetch = k if min_score <= 0 else 4 * k
        while True:
            fetch = min(fetch, index.ntotal)
            sims, rows = index.search(q[None], fetch)
            keep = rows[0] >= 0  # faiss pads with -1 when fewer than k vectors qualify
            sel = ids.take(rows[0][keep])
            sims = sims[0][keep]
            if min_score > 0:
                ok = np.asarray(sel["score"].to_numpy(zero_copy_only=False)) >= min_score
                sel, sims = sel.filter(pa.array(ok)), sims[ok]
            if len(sel) >= k or fetch >= index.ntotal:
                break
            fetch *= 4
        sel, sims = sel.slice(0, k), sims[:k]
        out.append([
            Hit(int(r), int(i), int(rk), tuple(float(v) for v in b), float(s), float(sim))
            for r, i, rk, b, s, sim in zip(sel["row"].to_pylist(), sel["image_id"].to_pylist(),
                                           sel["rank"].to_pylist(), sel["box"].to_pylist(),
                                           sel["score"].to_pylist(), sims)
        ])
    return out
