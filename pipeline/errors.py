"""The root of the project's errors.

Every error the project raises on purpose (a bad manifest, a stage that cannot run, an
annotation file that does not hold together, a checkpoint refused, ...) is an `OvdError`: its
message is one line naming the file or the setting and the problem. Every command-line entry
point (`python -m ovdistill`, `python -m ovdistill.trainer.*`, `python -m ovdistill.bench.*`) catches `OvdError`
and prints it as `error: <message>` with exit status 2; anything else is a bug and keeps its
traceback.

This module imports nothing of the project, so every layer (pipeline, stages, trainer,
bench) can derive from it. Subclasses keep their other bases (ValueError, RuntimeError) so
code that catches those still does.
"""
from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

EXIT_ERROR = 2  # the exit status of a CLI that stopped on an OvdError


class OvdError(Exception):
    """An error the project raises on purpose; the message says what and where in one line."""


class StageError(OvdError, RuntimeError):
    """A stage cannot run as asked; the message says why and what to do."""


class StageMismatch(StageError):
    """Existing outputs were made with another config or other inputs."""


def report(error: BaseException, file=None) -> int:
    """Print `error: <message>` (to stderr by default) and return the CLI exit status."""
    print(f"error: {error}", file=file or sys.stderr)
    return EXIT_ERROR


def reports_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a CLI `main`: an OvdError is printed by `report` and returns status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except OvdError as e:
            return report(e)

    return wrapper


def reject(item, file, reason) -> dict:
    """One rejected input, as every stage and the evaluator record it: {"item", "file",
    "reason"} in that order (a JSON dump keeps it). `file`: a path (kept as text) or None;
    `reason`: text or the exception whose message it is."""
    if isinstance(file, os.PathLike):
        file = os.fspath(file)
    if isinstance(reason, BaseException):
        reason = str(reason)
    return {"item": item, "file": file, "reason": reason}
