"""`python -m pipeline query TEXT`: text -> region search over the faiss index (stages/index.py)."""
from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("text")
    p.add_argument("--cache", default="cache")
    p.add_argument("--dataset", default="toy")
    p.add_argument("--k", type=int, default=24)
    p.add_argument("--out", default="results.png")


def run(args) -> int:
    raise SystemExit("query is not built yet (issue 5)")
