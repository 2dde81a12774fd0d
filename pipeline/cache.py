"""Small file helpers for the cache: atomic writes, hashes, library versions."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any


def tmp_path(path: Path) -> Path:
    """A hidden sibling of `path` that a rename will move into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def canonical_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys), first 16 hex digits."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """The installed versions of what makes a stage's bytes, for its _MANIFEST.json (Pillow
    draws the synthetic images and decodes every image; BENCHMARKS lab log 62), and the CPU
    kernels torch picked (AVX2 / AVX512 ...): the same versions trained another teacher on
    another host (lab log 64)."""
    import torch

    out = {"python": platform.python_version(), "machine": platform.machine(),
           "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for dist in ("torch", "torchvision", "open_clip_torch", "pyarrow", "webdataset",
                 "faiss-cpu", "faiss-gpu", "ray", "numpy", "pillow", "pycocotools",
                 "ovdistill"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
