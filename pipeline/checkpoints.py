"""Loading a checkpoint a team may have received: tensors and plain containers only.

`torch.load(weights_only=True)` constructs nothing else, so nothing in the file runs; a file
that holds any other object, or is no checkpoint, is a CheckpointError naming it in one line.
Used by the trainer (resume, evaluate, diagnose, init_from) and the RPN stage.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from ovdistill.pipeline.errors import OvdError


class CheckpointError(OvdError, ValueError):
    """A checkpoint cannot be used; one line naming the file."""


def load_weights(path: str | Path, what: str = "checkpoint") -> dict:
    """torch.load(path, weights_only=True) on the CPU; CheckpointError naming the file and the
    refused object (or why it cannot be read)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln]
        if named:  # torch's weights-only unpickler met an object it will not construct
            raise CheckpointError(f"{path}: {what} refused: it holds objects beyond tensors "
                                  f"and plain containers ({named[0]})") from None
        detail = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln]
        reason = detail[0] if detail else type(e).__name__
        raise CheckpointError(f"{path}: cannot load {what}: not a torch checkpoint "
                              f"({reason})") from None
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot load {what} ({reason})") from None
