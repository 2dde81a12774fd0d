"""torchrun DDP setup: gloo on CPU, nccl on CUDA; a single process when not under torchrun."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from ovdistill.pipeline.errors import OvdError
from ovdistill.pipeline.precision import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DistributedError(OvdError, ValueError):
    """The processes torchrun started cannot each get a device; one line saying what to run."""


def process_device(device: str, world: int, local_rank: int, n_gpus: int) -> torch.device:
    """The device of process `local_rank` of `world` for `device` (cpu | cuda | cuda:N,
    already resolved from auto) on a node with `n_gpus` GPUs.

    Under torchrun each process takes GPU LOCAL_RANK; more processes than GPUs, or one fixed
    GPU for several processes (NCCL refuses two ranks on one GPU), is a DistributedError."""
    if not device.startswith("cuda"):
        return torch.device(device)
    if ":" in device:
        dev = torch.device(device)
        if world > 1:
            raise DistributedError(f"--device {device} puts all {world} processes on one GPU, "
                                   f"which NCCL refuses; use --device cuda (one GPU per "
                                   f"process) or --device cpu (gloo)")
        if dev.index >= n_gpus:
            raise DistributedError(f"--device {device}: this node has {n_gpus} GPU(s)")
        return dev
    if local_rank >= n_gpus:
        raise DistributedError(f"torchrun started process {local_rank} of {world} on this node, "
                               f"which has {n_gpus} GPU(s): use --nproc_per_node "
                               f"{max(n_gpus, 1)}, or --device cpu for gloo on the CPU")
    return torch.device("cuda", local_rank)


def setup(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK), if any.

    `device`: auto | cpu | cuda | cuda:N (see `process_device`)."""
    device = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    n_gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    dev = process_device(device, world, local_rank, n_gpus)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_across(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average logged scalars over processes (every process must call this)."""
    if info.world_size == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if info.device.type == "cuda":
        t = t.to(info.device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist())}
