"""Host work ahead of the device: a thread map that keeps a window of results computed in
advance (image decoding releases the GIL), and the host-to-device copy that does not block
the calling thread. Used by the regions library and the proposals stage."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import torch


def to_device(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """`t` on `device`; a host tensor going to CUDA is copied from pinned memory without
    blocking the calling thread (a pageable copy waits for the whole stream first)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def prefetch(fn: Callable, items: Iterable, threads: int) -> Iterator:
    """`map(fn, items)` in order, computed up to 2 x `threads` items ahead in a thread pool."""
    if threads <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) > 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def chunks(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter) from any iterable."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk
