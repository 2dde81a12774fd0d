"""Command-line pieces every CLI shares: `--set` assignments and argparse types."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import yaml


def assignment(pair: str, expected: str, error: Callable[[str], BaseException]
               ) -> tuple[str, Any]:
    """`"lr=1e-3"` -> ("lr", 0.001): the text before the first `=` and the YAML value after
    it. No `=`: `error("--set expects <expected>, got <pair>")` is raised."""
    key, sep, value = pair.partition("=")
    if not sep:
        raise error(f"--set expects {expected}, got {pair!r}")
    return key, yaml.safe_load(value)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


DEFAULT_MANIFEST = "data_manifests/toy.yaml"
DEFAULT_CACHE = "cache"
REQUIRED = object()  # add_data_options(manifest=REQUIRED): the option must be given


def add_data_options(p: argparse.ArgumentParser, *, manifest=DEFAULT_MANIFEST,
                     manifest_help: str | None = None, cache=DEFAULT_CACHE,
                     cache_help: str = "cache root (default: ./cache)", data_root: bool = False,
                     data_root_help: str = "overrides the manifest's root",
                     device: bool = False, device_help: str = "auto | cpu | cuda") -> None:
    """The options naming what a command reads: --manifest (default `manifest`; None: no
    default; REQUIRED: must be given), --cache (the cache root), and when asked --data-root
    (overrides the manifest's root) and --device (auto | cpu | cuda ...)."""
    for flag, default, help_ in (("--manifest", manifest, manifest_help),
                                 ("--cache", cache, cache_help)):
        if default is REQUIRED:
            p.add_argument(flag, required=True, help=help_)
        else:
            p.add_argument(flag, default=default, help=help_)
    if data_root:
        p.add_argument("--data-root", default=None, help=data_root_help)
    if device:
        p.add_argument("--device", default="auto", help=device_help)
