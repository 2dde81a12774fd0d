"""Run one stage: plan parts, skip finished ones, run the rest on Ray (or in-process), write
per-part stats and, last, the stage's `_MANIFEST.json`.

A stage is a module in `stages/` that defines:

    NAME: str                                   the stage's name (CLI, --set, manifests)
    FOLDER: str                                 optional: its folder if not NAME (pack -> wds)
    Config: type                                a frozen dataclass; its JSON is hashed
    RESOURCES: dict                             per worker, e.g. {"num_cpus": 1, "num_gpus": 0}
    def inputs(ctx, cfg) -> dict[str, str]      fingerprints of what the stage reads
    def plan(ctx, cfg) -> list[Part]            fixed, deterministic parts
    class Worker:                               one per Ray actor; loads its model once
        def __init__(self, ctx, cfg)
        def run_part(self, part, out: PartOutput) -> PartResult
    def finalize(ctx, cfg, stats: list[dict]) -> dict   extra manifest fields (reports)

Resume rule (as clip-retrieval / img2dataset): a part is finished iff its
`part-NNNNN.stats.json` exists; outputs are renamed into place before the stats are written.
"""
from __future__ import annotations

import dataclasses
import fcntl
import importlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from ovdistill.pipeline import precision
from ovdistill.pipeline.cache import (
    atomic_write_json,
    canonical_hash,
    library_versions,
    read_json,
    tmp_path,
)
from ovdistill.pipeline.errors import StageError, StageMismatch
from ovdistill.pipeline.layout import (
    LOCK_FILE,
    MANIFEST_FILE,
    PLAN_FILE,
    STATS_GLOB,
    DatasetCache,
    part_stem,
    stats_file,
)
from ovdistill.pipeline.manifests import DatasetManifest
from tqdm import tqdm

__all__ = ["MANIFEST_FILE", "PLAN_FILE", "StageError", "StageMismatch"]  # re-exported


@dataclass(frozen=True)
class Part:
    """A fixed unit of work: `items` (e.g. image ids) are processed together and written as
    `part-{index:05d}.*`."""

    index: int
    items: tuple = ()

    @property
    def stem(self) -> str:
        return part_stem(self.index)


@dataclass
class PartResult:
    rows: int
    rejects: list[dict] = field(default_factory=list)  # {"item":..., "file":..., "reason":...}
    extra: dict = field(default_factory=dict)


class PartOutput:
    """Hands a part temporary paths; `commit()` renames them all into place."""

    def __init__(self, stage_dir: Path):
        self.dir = Path(stage_dir)
        self._pending: list[tuple[Path, Path]] = []

    def tmp(self, name: str) -> Path:
        final = self.dir / name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(final)
        self._pending.append((tmp, final))
        return tmp

    def commit(self) -> None:
        for tmp, final in self._pending:
            if tmp.is_dir() and final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        self._pending.clear()

    def discard(self) -> None:
        for tmp, _ in self._pending:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        self._pending.clear()


@dataclass(frozen=True)
class StageContext:
    """What every stage is handed: the dataset, where its cache lives, and the device policy."""

    dataset: DatasetManifest
    cache: Path  # <cache root>/<dataset name>
    device: str = "auto"  # auto | cpu | cuda | cuda:N; run_stage resolves auto once
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16

    @property
    def files(self) -> DatasetCache:
        """This dataset's cache folders and files (pipeline/layout.py)."""
        return DatasetCache(self.cache)

    def stage_dir(self, name: str) -> Path:
        return self.files.stage_dir(name)

    def upstream(self, name: str) -> dict:
        """The finished `_MANIFEST.json` of stage `name`, or a clear error."""
        return self.files.read_manifest(name)

    def fingerprint(self, name: str) -> str:
        return self.upstream(name)["fingerprint"]

    def resolve_device(self) -> str:
        return precision.resolve_device(self.device)

    def resolve_precision(self) -> str:
        return precision.resolve_precision(self.precision, self.resolve_device())


def stage_folder(stage: ModuleType) -> str:
    """The folder of `stage` under <cache>/<dataset>/."""
    return getattr(stage, "FOLDER", stage.NAME)


def chunk_parts(items: list, per_part: int) -> list[Part]:
    """Split a sorted item list into parts of `per_part` items (the last may be shorter)."""
    if per_part < 1:
        raise ValueError(f"per_part must be >= 1, got {per_part}")
    return [
        Part(index=i, items=tuple(items[s : s + per_part]))
        for i, s in enumerate(range(0, len(items), per_part))
    ]


# ----------------------------------------------------------------------------- configs


def make_config(stage: ModuleType, overrides: dict[str, Any] | None = None):
    """The stage's Config with `overrides` (from the manifest's `stages:` block or --set)."""
    overrides = dict(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(stage.Config)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise StageError(
            f"stage '{stage.NAME}': unknown config key(s) {unknown}; known: {sorted(fields)}"
        )
    return stage.Config(**overrides)


def config_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# ----------------------------------------------------------------------------- locking


class CacheLock:
    """An exclusive lock on `<cache>/<dataset>/.lock`: stops two runs writing one cache."""

    def __init__(self, cache_dir: Path):
        self.path = Path(cache_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "CacheLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StageError(
                f"{self.path} is held by another run ({holder}); wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# ----------------------------------------------------------------------------- parts


def run_one_part(worker, part: Part, stage_dir: Path) -> dict:
    """Run `part` with `worker`, rename its outputs into place, then write its stats."""
    start = time.time()
    out = PartOutput(stage_dir)
    try:
        result = worker.run_part(part, out)
        out.commit()
    except BaseException:
        out.discard()
        raise
    stats = {
        "part": part.index,
        "items": len(part.items),
        "rows": int(result.rows),
        "rejects": result.rejects,
        "n_rejects": len(result.rejects),
        "seconds": round(time.time() - start, 3),
        "host": socket.gethostname(),
        "node_id": _ray_node_id(),
        **result.extra,
    }
    atomic_write_json(stats_file(stage_dir, part.stem), stats)
    return stats


def _ray_node_id() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - only informative
        return None
    return None


class _LocalDistributor:
    """Runs parts one after another in this process (debugging, tiny stages, tests)."""

    def __init__(self, stage: ModuleType, ctx: StageContext, cfg):
        self.worker = stage.Worker(ctx, cfg)

    def map(self, parts: list[Part], stage_dir: Path):
        for part in parts:
            yield run_one_part(self.worker, part, stage_dir)


class _StageActor:
    """A Ray actor holding one stage Worker (so a model is loaded once per actor)."""

    def __init__(self, module_name: str, ctx: StageContext, cfg, num_cpus: int):
        import torch

        torch.set_num_threads(max(1, int(num_cpus)))
        stage = importlib.import_module(module_name)
        self.worker = stage.Worker(ctx, cfg)

    def run(self, part: Part, stage_dir: str) -> dict:
        return run_one_part(self.worker, part, Path(stage_dir))


def ensure_ray() -> None:
    """Connect to RAY_ADDRESS when set, else start (or reuse) a local cluster."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
             log_to_driver=True, logging_level="WARNING")


def gpu_cpu_share(nodes: list[dict]) -> int | None:
    """The CPUs one GPU's actor gets by default: the fewest CPUs per GPU over the nodes that
    have GPUs (so every GPU of every node can be given its actor), or None without GPUs.

    nodes: each node's resources, {"CPU": 16.0, "GPU": 1.0, ...} (ray.nodes()' "Resources")"""
    shares = [int(n.get("CPU", 0) // n["GPU"]) for n in nodes if n.get("GPU", 0) >= 1]
    return max(1, min(shares)) if shares else None


def plan_workers(want: dict, workers: int | None, n_parts: int, max_cpus: float,
                 total_cpus: float, gpus: float, log=print,
                 cpus_per_gpu: int | None = None) -> tuple[dict, int]:
    """(per-actor resources, actor count) for a stage asking `want` per worker on a cluster
    with `total_cpus` CPUs (at most `max_cpus` on one node) and `gpus` GPUs.

    An actor that gets GPUs gets `cpus_per_gpu` CPUs per GPU in place of the stage's own
    `num_cpus` (which sizes a CPU worker), when given: its torch threads, decoding and loader
    work run on them. Without GPUs (`gpus` 0: none in the cluster, or --device cpu) it asks
    for none and keeps the stage's `num_cpus`.

    The count never exceeds what the cluster can place at once: an actor Ray cannot place
    never starts, and the parts handed to it would wait forever (`--workers 4` on a one-GPU
    node asked for four GPUs). A larger `workers` is capped, with one line saying so."""
    want = dict(want)
    if not gpus:
        want["num_gpus"] = 0
    if want.get("num_gpus") and cpus_per_gpu:
        want["num_cpus"] = max(1, int(cpus_per_gpu * want["num_gpus"]))
    want["num_cpus"] = max(1, min(want.get("num_cpus", 1), int(max_cpus)))
    fit = max(1, int(total_cpus // want["num_cpus"]))
    if want.get("num_gpus"):
        fit = min(fit, max(1, int(gpus // want["num_gpus"])))
    if workers and workers > fit:
        log(f"--workers {workers}: the cluster places {fit} such worker(s) at once "
            f"({want}); using {fit}")
    n = min(n_parts, min(workers, fit) if workers else fit)
    return want, max(1, n)


def _ray_resources(stage: ModuleType, workers: int | None, n_parts: int,
                   cpu_only: bool = False, cpus_per_gpu: int | None = None
                   ) -> tuple[dict, int]:
    """`plan_workers` on the connected Ray cluster; `cpus_per_gpu` None: `gpu_cpu_share`."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    max_cpus = max((n.get("CPU", 0) for n in nodes), default=1)
    resources = ray.cluster_resources()
    return plan_workers(getattr(stage, "RESOURCES", {"num_cpus": 1}), workers, n_parts,
                        max_cpus, resources.get("CPU", 1),
                        0 if cpu_only else resources.get("GPU", 0),
                        cpus_per_gpu=cpus_per_gpu or gpu_cpu_share(nodes))


def uses_device(stage: ModuleType) -> bool:
    """A stage whose workers compute on the device (it asks for a GPU where there is one)."""
    return bool(getattr(stage, "RESOURCES", {}).get("num_gpus"))


def _visible_gpus(distributor: str) -> int:
    """The GPUs the stage's workers will see: the Ray cluster's when connecting to one (or
    already connected), else this machine's."""
    if distributor == "ray" and (os.environ.get("RAY_ADDRESS") or _ray_initialized()):
        import ray

        ensure_ray()
        return int(ray.cluster_resources().get("GPU", 0))
    import torch

    return torch.cuda.device_count()


def _ray_initialized() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def compute_context(stage: ModuleType, ctx: StageContext, distributor: str) -> StageContext:
    """`ctx` with the device and precision resolved once, in the driver, for a stage that
    computes on the device (others get `ctx` back). A device the workers cannot have is one
    line: cuda on a cluster with no GPU, or cuda:N under Ray (each actor sees its own GPU as
    cuda:0, so cuda:1 would fail inside it)."""
    if not uses_device(stage):
        return ctx
    gpus = _visible_gpus(distributor)
    device = precision.resolve_device(ctx.device, gpus)
    if device.startswith("cuda") and not gpus:
        raise StageError(f"stage '{stage.NAME}': --device {ctx.device} but no GPU is visible "
                         f"({'the Ray cluster has none' if distributor == 'ray' else 'torch sees none'}); "
                         f"use --device cpu")
    if distributor == "ray" and ":" in device:
        raise StageError(f"stage '{stage.NAME}': --device {device} under Ray: each worker is "
                         f"given its own GPU and sees it as cuda:0; use --device cuda (or "
                         f"--distributor local for one chosen GPU)")
    return replace(ctx, device=device,
                   precision=precision.resolve_precision(ctx.precision, device))


def compute_inputs(stage: ModuleType, ctx: StageContext) -> dict:
    """What joins a device stage's inputs so a cache is never mixed across devices or
    precisions: {"device": cpu | cuda, "precision": fp32 | bf16} (ctx already resolved)."""
    if not uses_device(stage):
        return {}
    return {"device": torch_device_type(ctx.device), "precision": ctx.precision}


def torch_device_type(device: str) -> str:
    return device.split(":")[0]


class _RayDistributor:
    def __init__(self, stage: ModuleType, ctx: StageContext, cfg, n_parts: int,
                 workers: int | None, cpus_per_gpu: int | None = None):
        import ray
        from ray.util import ActorPool

        ensure_ray()
        resources, n = _ray_resources(stage, workers, n_parts,
                                      cpu_only=ctx.resolve_device() == "cpu",
                                      cpus_per_gpu=cpus_per_gpu)
        actor_cls = ray.remote(_StageActor).options(**resources)
        self.actors = [
            actor_cls.remote(stage.__name__, ctx, cfg, resources["num_cpus"]) for _ in range(n)
        ]
        self.pool = ActorPool(self.actors)

    def map(self, parts: list[Part], stage_dir: Path):
        yield from self.pool.map_unordered(
            lambda actor, part: actor.run.remote(part, str(stage_dir)), parts
        )

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


# ----------------------------------------------------------------------------- stage


def _describe_mismatch(old: dict, new: dict) -> str:
    diffs = []
    for key in ("config", "inputs"):
        a, b = old.get(key, {}), new.get(key, {})
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                diffs.append(f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
    if old.get("plan_hash") != new.get("plan_hash") and not diffs:
        diffs.append("the planned parts differ")
    return "; ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else "")


def clean_stray_tmp(stage_dir: Path) -> None:
    """Remove temporaries a killed run left (never a finished output)."""
    for p in Path(stage_dir).rglob(".*.tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def stage_record(stage: ModuleType, ctx: StageContext, cfg, distributor: str
                 ) -> tuple[StageContext, dict, list[Part]]:
    """(resolved ctx, plan record, parts) of one stage: what a run hashes and compares with
    the `_PLAN.json` it finds. Reads the cache, writes nothing."""
    cdict = config_dict(cfg)
    ctx = compute_context(stage, ctx, distributor)
    inputs = {**stage.inputs(ctx, cfg), **compute_inputs(stage, ctx)}
    parts = stage.plan(ctx, cfg)
    if sorted(p.index for p in parts) != list(range(len(parts))):
        raise StageError(f"stage '{stage.NAME}' planned parts with non-contiguous indices")
    record = {
        "stage": stage.NAME,
        "config": cdict,
        "config_hash": canonical_hash(cdict),
        "inputs": inputs,
        "n_parts": len(parts),
        "plan_hash": canonical_hash([list(p.items) for p in parts]),
    }
    return ctx, record, parts


def _same_record(old: dict, record: dict) -> bool:
    return all(old.get(k) == record[k] for k in ("config_hash", "inputs", "plan_hash"))


def dry_run_stage(stage: ModuleType, ctx: StageContext, cfg, *, rebuild: bool = False) -> str:
    """What `run_stage` would do with this stage, as one line, computed exactly as a run
    computes it (config, inputs, plan; the device resolved as the local distributor resolves
    it, so no Ray starts) and writing nothing: `up to date`, `would resume k/n parts`
    (k finished), `would run`, `would refuse: <the mismatch>` (`would rebuild: ...` with
    `rebuild`). A stage whose upstream has not finished is `would run after its upstream`."""
    stage_dir = ctx.stage_dir(stage_folder(stage))
    try:
        _, record, parts = stage_record(stage, ctx, cfg, "local")
    except StageError as e:
        return f"would run after its upstream ({e})"
    plan_path = stage_dir / PLAN_FILE
    if not plan_path.exists():
        return "would run"
    old = read_json(plan_path)
    if not _same_record(old, record):
        return f"would {'rebuild' if rebuild else 'refuse'}: {_describe_mismatch(old, record)}"
    if (stage_dir / MANIFEST_FILE).exists():
        return f"up to date ({len(parts)} parts)"
    done = sum(stats_file(stage_dir, p.stem).exists() for p in parts)
    return f"would resume {done}/{len(parts)} parts" if done else "would run"


def run_stage(
    stage: ModuleType,
    ctx: StageContext,
    cfg,
    *,
    distributor: str = "ray",
    workers: int | None = None,
    cpus_per_gpu: int | None = None,
    rebuild: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run (or resume, or skip) one stage and return its manifest. `cpus_per_gpu`: the CPUs
    each GPU actor of a Ray stage gets (None: a node's CPUs // its GPUs, `gpu_cpu_share`)."""
    stage_dir = ctx.stage_dir(stage_folder(stage))
    ctx, record, parts = stage_record(stage, ctx, cfg, distributor)
    inputs = record["inputs"]
    plan_path = stage_dir / PLAN_FILE
    if plan_path.exists():
        old = read_json(plan_path)
        same = _same_record(old, record)
        if not same:
            if not rebuild:
                raise StageMismatch(
                    f"stage '{stage.NAME}' in {stage_dir} was built with another config or "
                    f"input ({_describe_mismatch(old, record)}); pass --rebuild to discard it"
                )
            log(f"[{stage.NAME}] --rebuild: discarding {stage_dir}")
            shutil.rmtree(stage_dir)
        elif (stage_dir / MANIFEST_FILE).exists():
            log(f"[{stage.NAME}] up to date ({len(parts)} parts)")
            return read_json(stage_dir / MANIFEST_FILE)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if not plan_path.exists():
        atomic_write_json(plan_path, record)
    clean_stray_tmp(stage_dir)

    todo = [p for p in parts if not stats_file(stage_dir, p.stem).exists()]
    if len(todo) < len(parts):
        log(f"[{stage.NAME}] resuming: {len(parts) - len(todo)}/{len(parts)} parts already done")
    if todo:
        if distributor == "local":
            dist = _LocalDistributor(stage, ctx, cfg)
        elif distributor == "ray":
            dist = _RayDistributor(stage, ctx, cfg, len(todo), workers, cpus_per_gpu)
        else:
            raise StageError(f"unknown distributor {distributor!r} (use 'ray' or 'local')")
        bar = tqdm(total=len(parts), initial=len(parts) - len(todo), desc=stage.NAME,
                   unit="part", disable=not progress, dynamic_ncols=True)
        try:
            for stats in dist.map(todo, stage_dir):
                bar.update(1)
                bar.set_postfix(rows=stats["rows"], rejects=stats["n_rejects"])
        finally:
            bar.close()
            if hasattr(dist, "close"):
                dist.close()

    stats = [read_json(stats_file(stage_dir, p.stem)) for p in parts]
    extra = stage.finalize(ctx, cfg, stats) or {}
    rows = sum(s["rows"] for s in stats)
    rejects = sum(s["n_rejects"] for s in stats)
    manifest = {
        **record,
        "dataset": ctx.dataset.name,
        "rows": rows,
        "rejects": rejects,
        "seconds": round(sum(s["seconds"] for s in stats), 3),
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    manifest["fingerprint"] = canonical_hash(
        [record["config_hash"], inputs, record["plan_hash"], rows, extra.get("teacher")]
    )
    atomic_write_json(stage_dir / MANIFEST_FILE, manifest)
    log(f"[{stage.NAME}] done: {len(parts)} parts, {rows} rows, {rejects} rejects")
    return manifest


def stage_status(stage_dir: Path) -> dict:
    """done / total parts and rows of one stage folder (works while a run is in flight)."""
    plan = read_json(stage_dir / PLAN_FILE) if (stage_dir / PLAN_FILE).exists() else {}
    stats = [read_json(p) for p in sorted(stage_dir.glob(STATS_GLOB))]
    return {
        "stage": stage_dir.name,
        "done": len(stats),
        "total": plan.get("n_parts"),
        "rows": sum(s["rows"] for s in stats),
        "rejects": sum(s["n_rejects"] for s in stats),
        "complete": (stage_dir / MANIFEST_FILE).exists(),
    }
