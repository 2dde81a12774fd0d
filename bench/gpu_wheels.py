"""The wheels a lent GPU machine lacks, for `make gpu-wheels` and `bench/gpu_smoke.sh`.

That machine has torch, torchvision, pyarrow, numpy, pandas, pillow, pyyaml, tqdm, tensorboard,
matplotlib, opencv (headless), huggingface_hub, safetensors and regex, but no package registry.
`make gpu-wheels` downloads the rest here, for its Python, into `wheels/` (ignored; it travels
with the working tree, <= 64 MiB in all). Ray is left out (its wheel alone is larger than
that): the smoke script runs the stages with `--distributor local`. Only the standard library
is used here, so any python3 runs it.

    python3 bench/gpu_wheels.py --pins          # name==version of each (from this Python)
    python3 bench/gpu_wheels.py --missing       # on the GPU machine: what is not importable
    python3 bench/gpu_wheels.py --sizes wheels  # the downloaded files and their total
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from importlib import metadata
from pathlib import Path

# (distribution, module it provides): the project's needs the GPU machine does not have,
# with those of their own needs it lacks (ftfy -> wcwidth, webdataset -> braceexpand).
# timm is there, but the toy teacher's `test_resnet` tower needs a recent one: it travels too.
WHEELS = (
    ("open_clip_torch", "open_clip"),
    ("ftfy", "ftfy"),
    ("wcwidth", "wcwidth"),
    ("timm", "timm"),
    ("webdataset", "webdataset"),
    ("braceexpand", "braceexpand"),
    ("faiss-cpu", "faiss"),  # faiss-gpu needs the CUDA 12 runtime wheels (hundreds of MB)
    ("pycocotools", "pycocotools"),
    ("lvis", "lvis"),
)
# what the project imports that the GPU machine is expected to have already
PRESENT = ("torch", "torchvision", "pyarrow", "numpy", "pandas", "PIL", "yaml", "tqdm",
           "tensorboard", "huggingface_hub", "safetensors", "regex", "cv2", "matplotlib")
LIMIT_MIB = 64  # what a working tree may carry to the GPU machine


def pins(wheels=WHEELS) -> list[str]:
    """`name==version` as installed in this Python (the versions the CPU tests ran with), or
    the bare name where it is not installed."""
    out = []
    for dist, _ in wheels:
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(dist)
    return out


def missing(modules) -> list[str]:
    """The modules of `modules` this Python cannot import."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def sizes(folder: Path) -> tuple[list[tuple[str, int]], int]:
    """([(wheel file, bytes)], total bytes) of the wheels in `folder`, largest first."""
    files = sorted(((p.name, p.stat().st_size) for p in Path(folder).glob("*.whl")),
                   key=lambda x: -x[1])
    return files, sum(n for _, n in files)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 bench/gpu_wheels.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--pins", action="store_true")
    g.add_argument("--missing", action="store_true")
    g.add_argument("--sizes", metavar="DIR")
    args = p.parse_args(argv)
    if args.pins:
        print(" ".join(pins()))
    elif args.missing:
        print(f"python {sys.version.split()[0]} ({sys.executable})")
        gone = missing([m for _, m in WHEELS])
        print("to install from wheels/: " + (", ".join(gone) or "nothing"))
        absent = missing(PRESENT)
        print("expected on the machine but missing: " + (", ".join(absent) or "none"))
    else:
        files, total = sizes(Path(args.sizes))
        for name, n in files:
            print(f"{n / 2**20:8.2f} MiB  {name}")
        print(f"{total / 2**20:8.2f} MiB  total in {len(files)} wheels (a tree carries at "
              f"most {LIMIT_MIB} MiB)")
        if total > LIMIT_MIB * 2**20:
            print(f"error: {args.sizes} is over {LIMIT_MIB} MiB", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
