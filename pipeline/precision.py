"""Device and precision policy: what `--device` and `--precision` may say, what `auto` becomes,
and the one autocast context every model call (stages and trainer) runs under.

Mixed precision pays in the convolutions and matrix products of backbones, heads and the
teacher's encoder; it is wrong for geometry and for the numbers a loss or a score is made of.
So the callers run the network under `autocast` and compute boxes, anchors, proposals,
regression targets, logits and losses in float32 (`float32_region`). CPU autocast follows the
same dtype rules as CUDA's, so `precision=bf16` on CPU runs the mixed-precision paths in CI.
"""
from __future__ import annotations

import contextlib
import re

import torch
from ovdistill.pipeline.errors import OvdError

PRECISIONS = ("auto", "fp32", "bf16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(OvdError, ValueError):
    """A device or precision setting that cannot be honoured."""


def check_device(device: str) -> str:
    """`device` if it is auto, cpu, cuda or cuda:N, else a DeviceError naming it."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise DeviceError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
    return device


def resolve_device(device: str, gpus: int | None = None) -> str:
    """auto -> cuda when a GPU is there (`gpus`, default: what torch sees), else cpu; anything
    else is checked and kept."""
    device = check_device(device)
    if device != "auto":
        return device
    if gpus is None:
        gpus = torch.cuda.device_count()
    return "cuda" if gpus else "cpu"


def resolve_precision(precision: str, device: str) -> str:
    """auto -> bf16 on CUDA, fp32 elsewhere; fp32 and bf16 are kept (bf16 works on CPU too)."""
    if precision not in PRECISIONS:
        raise DeviceError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def autocast(device: str | torch.device, precision: str):
    """The autocast context for `precision` ("fp32": none; "bf16": bf16 autocast) on `device`.

    `precision` must be resolved (fp32 | bf16)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise DeviceError(f"autocast needs a resolved precision (fp32 | bf16), got "
                          f"{precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def float32_region(device: str | torch.device):
    """A region computed in float32 inside an autocast one (boxes, logits, losses); the
    caller casts its inputs with `.float()`."""
    return torch.autocast(torch.device(device).type, enabled=False)


def autocast_setting(device: str | torch.device, setting: str):
    """`autocast` for a precision setting not yet resolved (auto | fp32 | bf16) on `device`:
    auto is bf16 on CUDA, fp32 elsewhere (`resolve_precision`)."""
    return autocast(device, resolve_precision(setting, device))
