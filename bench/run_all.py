"""`make bench`: every benchmark in one run, each printing ratios measured side by side.

Uses the real cache of the manifest when its stages are built, else stand-in data. Copy the
printed tables, with the machine line, into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
from ovdistill.bench import regions_bench, roi_pool_bench, storage_bench, train_bench
from ovdistill.pipeline.errors import reports_errors
from ovdistill.pipeline.layout import WDS, DatasetCache
from ovdistill.pipeline.manifests import load_manifest
from ovdistill.pipeline.options import add_data_options


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


@reports_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovdistill.bench.run_all", description=__doc__)
    add_data_options(p)
    args = p.parse_args(argv)
    cache_dir = Path(args.cache) / load_manifest(args.manifest, cache_root=args.cache).name
    packed = DatasetCache(cache_dir).manifest_path(WDS).exists()
    print(f"machine: {machine()}\n")

    print("== regions: end-to-end vs bare teacher forward; batched vs per-crop PIL crops")
    if rc := regions_bench.main([]):
        return rc
    print(f"\n== storage: bytes per image ({cache_dir if packed else 'synthetic cache'})")
    if rc := storage_bench.main([str(cache_dir)] if packed else []):
        return rc
    print("\n== trainer RoIAlign: torchvision's CPU backward vs trainer.roi_pool's")
    if rc := roi_pool_bench.main([]):
        return rc
    print(f"\n== training input pipeline ({cache_dir / WDS if packed else 'stand-in shards'})")
    with tempfile.TemporaryDirectory() as tmp:
        return train_bench.main(["--manifest", args.manifest, "--cache", args.cache] if packed
                                else ["--fixture", tmp])


if __name__ == "__main__":
    sys.exit(main())
