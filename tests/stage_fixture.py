"""A tiny stage for the runner's tests: each part writes one Parquet row per item."""
from __future__ import annotations

import os
import time
import types
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from ovdistill.pipeline.runner import Part, PartResult, chunk_parts

NAME = "squares"
RESOURCES = {"num_cpus": 1}


@dataclass(frozen=True)
class Config:
    n_items: int = 24
    per_part: int = 4
    sleep: float = 0.0
    salt: str = ""
    reject_item: int = -1  # this item is bad input: recorded as a reject, the part goes on


def inputs(ctx, cfg) -> dict:
    return {"source": os.environ.get("SQUARES_INPUT", "v1")}


def plan(ctx, cfg) -> list[Part]:
    return chunk_parts(list(range(cfg.n_items)), cfg.per_part)


class Worker:
    def __init__(self, ctx, cfg):
        self.cfg = cfg

    def run_part(self, part: Part, out) -> PartResult:
        if int(os.environ.get("SQUARES_FAIL_ITEM", "-1")) in part.items:  # a crash, not bad input
            raise RuntimeError(f"boom in part {part.index}")
        time.sleep(self.cfg.sleep)
        keep = [i for i in part.items if i != self.cfg.reject_item]
        rejects = [{"item": i, "reason": "planted bad item"} for i in part.items
                   if i == self.cfg.reject_item]
        table = pa.table({"item": pa.array(keep, pa.int64()),
                          "square": pa.array([i * i for i in keep], pa.int64()),
                          "pid": pa.array([os.getpid()] * len(keep), pa.int64())})
        pq.write_table(table, out.tmp(f"{part.stem}.parquet"))
        return PartResult(rows=len(keep), rejects=rejects)


def finalize(ctx, cfg, stats) -> dict:
    return {"report": {"parts": len(stats)}}


def like(**changes) -> types.SimpleNamespace:
    """This stage with some of its attributes replaced (another plan, finalize, Worker...)."""
    fields = {k: globals()[k] for k in
              ("NAME", "Config", "RESOURCES", "inputs", "plan", "Worker", "finalize")}
    return types.SimpleNamespace(**{"__name__": __name__, **fields, **changes})
