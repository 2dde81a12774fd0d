"""Stage `index`: a faiss index over every region embedding, for text -> region search.

Inner product on the L2-normalised float32 vectors (= cosine). Exact `IndexFlatIP` up to
`exact_max` vectors; above it IVF-PQ from `faiss.index_factory`, trained on a seeded
uniform sample. Built on the GPU when the installed faiss has GPU support (faiss-gpu, installed
instead of faiss-cpu: `pip install ".[gpu]"`), sees a GPU and the device is not cpu, then
stored as a CPU index; the stage prints one line saying which faiss it built on and why, and
the manifest's `index` records it. GPU IVF-PQ takes only some sub-vector counts (at most 96):
with `pq_m` 0 the count is chosen among them; a `pq_m` the GPU refuses builds on the CPU.
Outputs in `<cache>/<ds>/index/`:

    regions.faiss   the index; faiss id = row number
    ids.parquet     row int64, image_id int64, rank int32, box fixed_size_list<float32>[4],
                    score float32 (row i describes faiss id i)
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ovdistill.pipeline import layout
from ovdistill.pipeline.faiss_index import (  # noqa: F401 - the search library's names, re-exported
    ID_COLUMNS,
    Hit,
    IdMap,
    import_faiss,
    load_index,
    normalized,
    search,
)
from ovdistill.pipeline.runner import Part, PartOutput, PartResult, StageContext, StageError

NAME = "index"
RESOURCES = {"num_cpus": 2, "num_gpus": 1}  # the runner drops the GPU when the cluster has none

INDEX_FILE = layout.INDEX_FILE
IDS_FILE = layout.IDS_FILE


@dataclass(frozen=True)
class Config:
    exact_max: int = 2_000_000  # up to this many vectors: exact IndexFlatIP; above: IVF-PQ
    ivf_lists: int = 0  # 0: about 4 sqrt(N), with >= 39 training vectors per list
    pq_m: int = 0  # PQ sub-vectors (must divide D); 0: the largest divisor of D <= D / 8
    #                (on the GPU: the largest such count GPU IVF-PQ takes, `gpu_pq_ok`)
    train_max: int = 500_000  # vectors sampled to train IVF-PQ
    nprobe: int = 32  # IVF lists visited per query (recorded; the query applies it)
    seed: int = 0


def region_files(ctx: StageContext) -> list[Path]:
    return ctx.files.parts(layout.REGIONS)


# What faiss's GPU IVF-PQ takes (faiss/gpu/impl/IVFPQ.cu, the default non-interleaved layout,
# no precomputed tables): code bytes = sub-vectors, dims per sub-vector, and 8-bit codes.
GPU_PQ_CODE_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
GPU_PQ_SUB_DIMS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32)
GPU_PQ_NBITS = 8


def gpu_pq_ok(dim: int, m: int, nbits: int = GPU_PQ_NBITS) -> bool:
    """Whether faiss's GPU IVF-PQ builds `m` sub-vectors of `nbits` over `dim` dimensions."""
    return (m in GPU_PQ_CODE_BYTES and dim % m == 0 and dim // m in GPU_PQ_SUB_DIMS
            and nbits == GPU_PQ_NBITS)


def pq_subvectors(dim: int, requested: int = 0, gpu: bool = False) -> int:
    """PQ sub-vector count for `dim`: `requested` when > 0 (checked by the caller), else the
    largest divisor of `dim` <= dim / 8; on the GPU the largest count <= that one which
    `gpu_pq_ok` (a 1024-d teacher: 128 on the CPU, 64 on the GPU). Raises StageError when
    no count fits the GPU (the caller then builds on the CPU)."""
    if requested:
        return requested
    cap = max(1, dim // 8)
    ok = [d for d in range(1, cap + 1) if dim % d == 0 and (not gpu or gpu_pq_ok(dim, d))]
    if not ok:
        raise StageError(f"index: no PQ sub-vector count <= {cap} that GPU IVF-PQ takes "
                         f"divides the embedding dim {dim}")
    return max(ok)


def pq_nbits(n_train: int) -> int:
    """Bits per PQ code: k-means needs at least 2**nbits points; 8 once the sample allows."""
    return int(max(1, min(8, math.floor(math.log2(max(2, n_train // 4))))))


def pq_placement(dim: int, requested: int, nbits: int, gpu: bool) -> tuple[int, bool, str]:
    """(PQ sub-vectors, build on the GPU?, why it is not, or "") for an IVF-PQ over `dim` with
    `nbits`-bit codes when the GPU is wanted (`gpu`). With `requested` 0 the GPU gets a count
    it takes; a `requested` count the GPU refuses (or none fitting) builds on the CPU."""
    if not gpu:
        return pq_subvectors(dim, requested), False, ""
    try:
        m = pq_subvectors(dim, requested, gpu=True)
    except StageError:
        m = 0
    if m and gpu_pq_ok(dim, m, nbits):
        return m, True, ""
    m = pq_subvectors(dim, requested)
    return m, False, (f"PQ{m}x{nbits} over {dim} dims is not one GPU IVF-PQ takes (at most 96 "
                      f"sub-vectors of 1-32 dims, 8-bit codes): building on the CPU")


def ivf_pq_factory(n: int, n_train: int, dim: int, cfg: Config, gpu: bool = False) -> str:
    """The `index_factory` string for `n` vectors of `dim` trained on `n_train` of them
    (`gpu`: with a sub-vector count GPU IVF-PQ takes, when `cfg.pq_m` is 0)."""
    nlist = cfg.ivf_lists or max(1, min(round(4 * math.sqrt(n)), n_train // 39))
    m = pq_subvectors(dim, cfg.pq_m, gpu)
    if dim % m:
        raise StageError(f"index: pq_m={m} does not divide the embedding dim {dim}")
    return f"IVF{nlist},PQ{m}x{pq_nbits(n_train)}"


def read_embeddings(path: Path) -> tuple[pa.Table, np.ndarray]:
    """One regions part -> (its id columns, float32[N, D] normalised embeddings)."""
    t = pq.read_table(path, columns=ID_COLUMNS + ["embedding"])
    dim = t.schema.field("embedding").type.list_size
    emb = t["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return t.select(ID_COLUMNS), normalized(emb)


def sample_rows(files: list[Path], counts: list[int], size: int, seed: int) -> np.ndarray:
    """A seeded uniform sample of `size` rows over all `files`: float32[size, D]."""
    total = sum(counts)
    pick = np.sort(np.random.default_rng(seed).choice(total, size=min(size, total),
                                                      replace=False))
    out, start = [], 0
    for f, n in zip(files, counts):
        local = pick[(pick >= start) & (pick < start + n)] - start
        if len(local):
            out.append(read_embeddings(f)[1][local])
        start += n
    return np.concatenate(out)


def to_gpu(index):
    faiss = import_faiss()
    opts = faiss.GpuMultipleClonerOptions()
    opts.useFloat16 = True  # IVF-PQ with many sub-vectors needs float16 lookup tables
    return faiss.index_cpu_to_all_gpus(index, co=opts)


FAISS_DIST = re.compile(r"^faiss([-_.](cpu|gpu|cuda)[-_.a-z0-9]*)?$")


def faiss_distributions(names: Iterable[tuple[str, str]]) -> list[str]:
    """The faiss builds among installed distributions ((name, version) pairs), as
    "name version", sorted and distinct: faiss-cpu, faiss-gpu, faiss-gpu-cu12, ... (all own
    the module `faiss`)."""
    return sorted({f"{n.lower()} {v}" for n, v in names if FAISS_DIST.match(n.lower())})


def installed_faiss(faiss_module=None) -> list[str]:
    """`faiss_distributions` installed where the imported `faiss` module lives (its
    site-packages folder): the builds that share its files. A copy earlier on sys.path (pip
    --target + PYTHONPATH) shadows, it does not mix, so only the one imported counts."""
    from importlib import metadata

    faiss = faiss_module or import_faiss()
    where = Path(faiss.__file__).resolve().parent.parent
    return faiss_distributions((d.metadata["Name"] or "", d.version)
                               for d in metadata.distributions(path=[str(where)]))


def faiss_name(builds: list[str]) -> str:
    """The one installed faiss build of `builds` ("name version"), for the stage's line."""
    return builds[0] if len(builds) == 1 else "faiss (no pip metadata)"


def faiss_placement(device: str, builds: list[str], gpu_api: bool, gpus: int) -> tuple[bool, str]:
    """(build on the GPU?, the line saying which faiss and why) for the resolved `device`, the
    installed faiss `builds` ("name version"), whether the imported module has GPU support
    and how many GPUs it sees. Two builds installed side by side is a StageError: they own
    the same faiss/_swigfaiss*.so, so whichever installed last is the one imported."""
    if len(builds) > 1:
        raise StageError(f"index: {' and '.join(builds)} are both installed and overwrite each "
                         f"other's faiss/_swigfaiss*.so; uninstall both, then install one "
                         f"(faiss-cpu, or faiss-gpu: pip install '.[gpu]')")
    name = faiss_name(builds)
    if device == "cpu":
        return False, f"{name}: --device cpu, building on the CPU"
    if not gpu_api:
        return False, (f"{name} has no GPU support: building on the CPU (for a GPU index "
                       f"install faiss-gpu instead of faiss-cpu)")
    if gpus < 1:
        return False, f"{name} sees no GPU: building on the CPU"
    return True, f"{name}: building on {gpus} GPU(s)"


def use_gpu(ctx: StageContext, builds: list[str]) -> tuple[bool, str]:
    """`faiss_placement` of this process's faiss (`builds`: `installed_faiss()`) for
    `ctx.device` (faiss-cpu has `get_num_gpus` too, returning 0; only a GPU build has
    `StandardGpuResources`)."""
    faiss = import_faiss()

    gpu_api = hasattr(faiss, "StandardGpuResources")
    gpus = faiss.get_num_gpus() if gpu_api else 0
    return faiss_placement(ctx.resolve_device(), builds, gpu_api, gpus)


def inputs(ctx: StageContext, cfg: Config) -> dict[str, str]:
    return {name: ctx.fingerprint(name) for name in (layout.TEACHER, layout.REGIONS)}


def plan(ctx: StageContext, cfg: Config) -> list[Part]:
    files = region_files(ctx)
    if not files:
        raise StageError(f"index: no regions parquet under {ctx.stage_dir(layout.REGIONS)}")
    return [Part(index=0, items=tuple(f.name for f in files))]


class Worker:
    def __init__(self, ctx: StageContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg

    def run_part(self, part: Part, out: PartOutput) -> PartResult:
        faiss = import_faiss()

        files = [self.ctx.stage_dir(layout.REGIONS) / name for name in part.items]
        counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
        dims = {pq.read_schema(f).field("embedding").type.list_size for f in files}
        if len(dims) != 1:
            raise StageError(f"index: regions parts disagree on the embedding dim {dims}")
        dim, n = dims.pop(), sum(counts)

        builds = installed_faiss(faiss)
        gpu, why = use_gpu(self.ctx, builds)
        if n <= self.cfg.exact_max:
            factory, train = "Flat", None
        else:
            train = sample_rows(files, counts, self.cfg.train_max, self.cfg.seed)
            _, gpu, refused = pq_placement(dim, self.cfg.pq_m, pq_nbits(len(train)), gpu)
            if refused:
                why = f"{faiss_name(builds)}: {refused}"
            factory = ivf_pq_factory(n, len(train), dim, self.cfg, gpu=gpu)
        print(f"[{NAME}] {why} ({factory}, {n} vectors of {dim})")
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if gpu:
            index = to_gpu(index)
        if train is not None:
            index.train(train)
            del train

        ids_path = out.tmp(IDS_FILE)
        row = 0
        schema = pa.schema([("row", pa.int64()), ("image_id", pa.int64()), ("rank", pa.int32()),
                            ("box", pa.list_(pa.float32(), 4)), ("score", pa.float32())])
        with pq.ParquetWriter(ids_path, schema) as writer:
            for f in files:
                ids, emb = read_embeddings(f)
                index.add(emb)
                rows = pa.array(np.arange(row, row + len(emb), dtype=np.int64))
                writer.write_table(ids.add_column(0, "row", rows).cast(schema))
                row += len(emb)
        if gpu:
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(out.tmp(INDEX_FILE)))
        info = {"type": type(index).__name__, "factory": factory, "metric": "inner_product",
                "ntotal": int(index.ntotal), "dim": int(dim), "gpu": bool(gpu),
                "faiss": faiss_name(builds), "placement": why,
                "nprobe": self.cfg.nprobe if factory != "Flat" else None}
        return PartResult(rows=int(index.ntotal), extra={"index": info})


def finalize(ctx: StageContext, cfg: Config, stats: list[dict]) -> dict:
    return {
        "index": stats[0]["index"],
        "teacher": ctx.upstream(layout.TEACHER)["teacher"],
        # where the query command finds the images and GT of this cache
        "dataset_manifest": str(ctx.dataset.path),
        "data_root": str(ctx.dataset.root),
    }
