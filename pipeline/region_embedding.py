"""Region embedding, the library the regions stage runs and the oracle and benches share:
normalize(V(crop 1x) + V(crop 1.5x)) (ViLD) of every proposal box, by the CLIP teacher.

Per image: decode once (`load_rgb`) and make all 2M crops in a few batched ops on the compute
device, resampled as the teacher's own preprocess resamples a PIL crop (`pipeline/crops.py`),
in a small thread pool so they overlap the encoder; the encoder gets full batches cut across
images (`batch_size` crops). On CUDA each decode thread crops on a CUDA stream of its own from
pinned memory, and the embeddings stay on the device until one copy to the host.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from ovdistill.pipeline.clip_teacher import Teacher
from ovdistill.pipeline.crops import combine_views, preprocess_resize, region_crops
from ovdistill.pipeline.errors import reject
from ovdistill.pipeline.images import ImageError, load_rgb, to_uint8_tensor
from ovdistill.pipeline.prefetch import prefetch, to_device
from PIL import Image

BATCH_SIZE = 256  # crops per encoder call, cut across images
CONTEXT_SCALE = 1.5  # the second crop: same centre, width and height x this
DECODE_THREADS = 2  # decode + crop threads (0: inline)

# A box may overshoot its image by this many pixels (float rounding) before the image is
# rejected as not the one the proposals were made on.
BOX_SLACK = 1.0


def rebatch(chunks: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Re-cut a stream of Tensor[n_i, ...] into Tensor[batch_size, ...] (the last may be
    shorter), so the encoder sees full batches whatever the per-image counts."""
    buf: list[torch.Tensor] = []
    n = 0
    for chunk in chunks:
        buf.append(chunk)
        n += len(chunk)
        if n >= batch_size:
            joined = torch.cat(buf)
            start = 0
            while n - start >= batch_size:
                yield joined[start:start + batch_size]
                start += batch_size
            buf = [joined[start:]] if start < n else []
            n -= start
    if n:
        yield torch.cat(buf)


_streams = threading.local()


def crop_stream(device: str | torch.device) -> torch.cuda.Stream | None:
    """This thread's CUDA stream for making crops on `device`, or None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if device.index is None:  # "cuda": the current device (a stream's .device has an index)
        device = torch.device("cuda", torch.cuda.current_device())
    stream = getattr(_streams, "stream", None)
    if stream is None or stream.device != device:
        stream = _streams.stream = torch.cuda.Stream(device=device)
    return stream


def teacher_crops(teacher: Teacher, image: torch.Tensor, boxes: torch.Tensor,
                  scale: float = 1.5) -> torch.Tensor:
    """The teacher-ready 1x and `scale`x crops of `boxes`, made on the teacher's device with
    the interpolation and resize mode of the teacher's own preprocess.

    image: Tensor[3, H, W] uint8; boxes: Tensor[N, 4] (x1, y1, x2, y2) pixels
    returns: Tensor[2N, 3, S, S] (rows [0, N) 1x, rows [N, 2N) `scale`x)
    """
    interpolation, mode = preprocess_resize(teacher.preprocess, teacher.image_size)
    return region_crops(to_device(image, teacher.device), to_device(boxes, teacher.device),
                        teacher.image_size, teacher.mean, teacher.std, scale, interpolation,
                        mode)


def streamed_crops(teacher: Teacher, image: torch.Tensor, boxes: torch.Tensor,
                   scale: float = 1.5) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """`teacher_crops` made on this thread's `crop_stream` -> (crops, the event the consumer
    waits on before using them: `ready_on_current_stream`; None off CUDA)."""
    stream = crop_stream(teacher.device)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        crops = teacher_crops(teacher, image, boxes, scale)
    if stream is None:
        return crops, None
    ready = torch.cuda.Event()
    ready.record(stream)
    return crops, ready


def ready_on_current_stream(crops: torch.Tensor,
                            ready: torch.cuda.Event | None) -> torch.Tensor:
    """`crops` from `streamed_crops`, safe to use on this thread's current stream: it waits
    (on the device, not the host) for their stream, and their memory is not reused before
    this stream is done with them."""
    if ready is not None:
        current = torch.cuda.current_stream(crops.device)
        current.wait_event(ready)
        crops.record_stream(current)
    return crops


def region_embeddings(teacher: Teacher, crops: Iterable[torch.Tensor],
                      batch_size: int) -> torch.Tensor:
    """ViLD region embeddings from each image's `teacher_crops`, in input order.

    crops: per image Tensor[2N_i, 3, S, S] (N_i 1x crops, then their N_i context crops)
    returns: Tensor[sum N_i, D] float32 on the CPU, L2-normalised (made on the teacher's
    device, copied to the host once)
    """
    counts: list[int] = []

    def counted() -> Iterator[torch.Tensor]:
        for c in crops:
            counts.append(len(c) // 2)
            yield c

    feats = [teacher.encode_images(batch) for batch in rebatch(counted(), batch_size)]
    if not feats:  # no boxes at all
        return torch.empty(0, teacher.embed_dim)
    feats = torch.cat(feats)
    out, start = [], 0
    for n in counts:
        out.append(combine_views(feats[start:start + 2 * n]))
        start += 2 * n
    return torch.cat(out).cpu()


# ----------------------------------------------------------------------------- tables


def embedding_column(emb: torch.Tensor) -> pa.FixedSizeListArray:
    """emb: Tensor[R, D] -> fixed_size_list<float16>[D]."""
    flat = emb.to(torch.float16).contiguous().numpy().reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), emb.shape[1])


def with_embeddings(proposals: pa.Table, emb: torch.Tensor) -> pa.Table:
    """The proposal rows with their `embedding` column appended. emb: Tensor[R, D]."""
    if len(proposals) != len(emb):
        raise ValueError(f"{len(proposals)} proposal rows but {len(emb)} embeddings")
    return proposals.append_column("embedding", embedding_column(emb))


def image_groups(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image ids, first row, row count) of a table sorted by image_id."""
    ids = table.column("image_id").to_numpy()
    uniq, first, count = np.unique(ids, return_index=True, return_counts=True)
    return uniq, first, count


def boxes_array(table: pa.Table) -> np.ndarray:
    """The `box` column -> float32[R, 4]."""
    col = table.column("box").combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, 4)


def embed_regions(teacher: Teacher, proposals: pa.Table, files: Sequence[tuple[int, Any]],
                  *, batch_size: int = BATCH_SIZE, context_scale: float = CONTEXT_SCALE,
                  decode_threads: int = DECODE_THREADS,
                  load: Callable[[Any], Image.Image] = load_rgb) -> tuple[pa.Table, list[dict]]:
    """The regions table of the images `files` ((image id, source) pairs) from their rows of
    `proposals` -> (proposal columns + embedding, sorted by image_id then rank; rejects).

    `load(source)` decodes an image (default `load_rgb` of a path; the pair stages pass a
    loader of pair images) and raises ImageError; `str(source)` names the reject's file.
    An image that cannot be decoded, or whose boxes do not fit it, is a reject and has no rows.
    `batch_size` crops per encoder call (cut across images); the context crop is
    `context_scale` x the box; `decode_threads` decode and crop (0: inline).
    """
    ids = pa.array([iid for iid, _ in files], pa.int64())
    table = proposals.filter(pc.is_in(proposals.column("image_id"), value_set=ids))
    table = table.sort_by([("image_id", "ascending"), ("rank", "ascending")])
    uniq, first, count = image_groups(table)
    boxes = torch.from_numpy(boxes_array(table))
    where = {int(iid): (int(f), int(c)) for iid, f, c in zip(uniq, first, count)}

    def decode(item):
        iid, path = item
        try:
            image = to_uint8_tensor(load(path))
        except ImageError as e:
            return iid, str(path), None, str(e)
        f, c = where.get(iid, (0, 0))
        b = boxes[f:f + c]
        h, w = image.shape[-2:]
        if c and (b[:, 2].max() > w + BOX_SLACK or b[:, 3].max() > h + BOX_SLACK):
            return iid, str(path), None, (f"{path}: proposal boxes reach beyond the {w}x{h} "
                                          f"image; it changed since the proposals were made")
        # Crops are made here, in the decoding threads, so they overlap the encoder.
        return iid, str(path), streamed_crops(teacher, image, b, context_scale), None

    rejects: list[dict] = []
    kept: list[int] = []

    def decoded() -> Iterator[torch.Tensor]:
        for iid, path, crops, reason in prefetch(decode, sorted(files), decode_threads):
            if crops is None:
                rejects.append(reject(iid, path, reason))
                continue
            kept.append(iid)
            yield ready_on_current_stream(*crops)

    emb = region_embeddings(teacher, decoded(), batch_size)
    if rejects:
        table = table.filter(pc.is_in(table.column("image_id"),
                                      value_set=pa.array(kept, pa.int64())))
    return with_embeddings(table, emb), rejects


def settings_from_config(config: dict) -> dict:
    """The `embed_regions` settings of a regions-stage config (its manifest's "config")."""
    return {k: config[k] for k in ("batch_size", "context_scale", "decode_threads")
            if k in config}
