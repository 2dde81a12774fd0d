"""What the three training loops share (the RPN stage, the trainer, the probe): the LR
schedule and the guard against a non-finite loss."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from ovdistill.pipeline.errors import OvdError


class NonFiniteLoss(OvdError, FloatingPointError):
    """The loss became NaN or infinite; the message names the step or the losses."""


def warmup_cosine(step: int, warmup: int, total: int, scale: float = 1.0) -> float:
    """`scale` x the LR multiplier at `step` (0-based): linear warmup from 1/warmup to 1 over
    `warmup` steps, then cosine decay to 0 at `total`.

    `scale` multiplies first (scale * (step + 1) / warmup), so an absolute LR (`scale` = the
    base LR) is bit-identical to the RPN stage's earlier formula."""
    if step < warmup:
        return scale * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return scale * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_finite(loss: torch.Tensor, describe: Callable[[], str],
                 error: type[Exception] = NonFiniteLoss) -> None:
    """Raise `error(describe())` when `loss` (a scalar tensor) is NaN or infinite; `describe`
    is called only then (it may read the loss back from the device)."""
    if not torch.isfinite(loss):
        raise error(describe())
