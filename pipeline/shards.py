"""WebDataset shard bytes, computed before anything is written: tar member and file sizes,
npy payloads without pickle, the greedy shard plan, and the `.jpg` payload of an image. The
pack and pair_pack stages plan their shards with these, so part index == shard index and a
rerun writes byte-identical tars.
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
from ovdistill.pipeline.errors import StageError
from ovdistill.pipeline.images import DEFAULT_MAX_PIXELS, decode_rgb, load_rgb
from PIL import Image, UnidentifiedImageError

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads a closed archive to a multiple of this
TAR_MTIME = 0  # fixed member mtime: the same inputs give byte-identical shards


def tar_member_bytes(n: int) -> int:
    """Bytes one tar member of `n` payload bytes takes: header block + padded payload."""
    return TAR_BLOCK + TAR_BLOCK * math.ceil(n / TAR_BLOCK)


def tar_file_bytes(member_bytes: int) -> int:
    """Size of a closed tar holding members of `member_bytes` in all (end blocks, record pad)."""
    return TAR_RECORD * math.ceil((member_bytes + 2 * TAR_BLOCK) / TAR_RECORD)


def sample_tar_bytes(sample: dict) -> int:
    """Tar bytes of one webdataset sample {"__key__", member: bytes, ...} (its members only)."""
    return sum(tar_member_bytes(len(v)) for k, v in sample.items() if k != "__key__")


def write_shard(path: Path, items, make_sample) -> tuple[int, int, list[dict]]:
    """Write the tar shard at `path`: `make_sample(item)` gives (sample dict of plain bytes
    members with its "__key__", None) or (None, a reject) for each of `items`, in order.
    Members get the fixed mtime TAR_MTIME (the same inputs give byte-identical shards); the
    file is fsynced. Returns (samples written, their member bytes, the rejects)."""
    import webdataset as wds

    rejects, written, members = [], 0, 0
    with open(path, "wb") as fh:
        with wds.TarWriter(fh, encoder=False, mtime=TAR_MTIME) as tw:
            for item in items:
                sample, bad = make_sample(item)
                if bad is not None:
                    rejects.append(bad)
                    continue
                tw.write(sample)
                members += sample_tar_bytes(sample)
                written += 1
        fh.flush()
        os.fsync(fh.fileno())
    return written, members, rejects


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def npy_nbytes(shape: tuple[int, ...], dtype) -> int:
    """Length of `npy_bytes` for an array of `shape` and `dtype`, without making it."""
    dtype = np.dtype(dtype)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": tuple(int(s) for s in shape)})
    return buf.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def json_bytes(doc: dict) -> bytes:
    """A `.json` member: sorted keys, no spaces (the same dict gives the same bytes)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def plan_shards(ids: list[int], sizes: list[int], max_samples: int, max_bytes: int,
                stage: str = "pack") -> list[list[int]]:
    """Greedy, order-preserving split of `ids` into shards of at most `max_samples` samples
    whose tar file is at most `max_bytes` (a sample alone above `max_bytes` gets its own
    shard). `sizes[i]` is the tar bytes of sample `ids[i]` (its members' tar_member_bytes)."""
    if max_samples < 1 or max_bytes < 1:
        raise StageError(f"{stage}: max_samples and max_bytes must be >= 1 "
                         f"(got {max_samples}, {max_bytes})")
    shards: list[list[int]] = []
    cur: list[int] = []
    cur_bytes = 0
    for i, size in zip(ids, sizes):
        if cur and (len(cur) >= max_samples or tar_file_bytes(cur_bytes + size) > max_bytes):
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += size
    if cur:
        shards.append(cur)
    return shards


def _open(src: Path | bytes):
    return Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)


def is_plain_jpeg(src: Path | bytes) -> bool:
    """True when the file's (or the encoded bytes') own bytes decode to the same pixels
    `load_rgb` gives: a JPEG in RGB or gray with no EXIF rotation (CMYK and rotated files are
    re-encoded)."""
    try:
        with _open(src) as im:
            return (im.format == "JPEG" and im.mode in ("RGB", "L")
                    and im.getexif().get(0x0112, 1) == 1)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return False


def jpeg_payload(src: Path | bytes, quality: int, name: str | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, tuple[int, int]]:
    """The `.jpg` member for one image (a file, or encoded bytes labelled `name` in errors)
    and its (width, height) as `load_rgb` sees it: the source's own bytes when it is a plain
    JPEG, else the decoded image re-encoded at `quality`.

    Raises `ImageError` (one line naming the file) when the image cannot be decoded."""
    if isinstance(src, (bytes, bytearray)):
        img = decode_rgb(src, name or "<image>", max_pixels=max_pixels)
        data = bytes(src)
    else:
        img = load_rgb(src, max_pixels)
        data = None
    if is_plain_jpeg(src):
        return (Path(src).read_bytes() if data is None else data), img.size
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), img.size
