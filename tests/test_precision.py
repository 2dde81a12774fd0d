"""Device and precision policy (pipeline/precision.py) and how the runner applies it: `auto`
resolved once in the driver, device and precision in a device stage's inputs so a cache is
never mixed across them, devices the workers cannot have refused with one line."""
from __future__ import annotations

import pytest
import torch
from ovdistill.pipeline import precision, runner
from ovdistill.pipeline.runner import StageError, StageMismatch, make_config, run_stage

from tests import stage_fixture as squares
from tests.test_runner import make_ctx

SEEN: list[tuple[str, str]] = []


class _DeviceWorker(squares.Worker):
    def __init__(self, ctx, cfg):
        super().__init__(ctx, cfg)
        SEEN.append((ctx.device, ctx.precision))


# the squares stage, declared as one that computes on the device
device_stage = squares.like(Worker=_DeviceWorker, RESOURCES={"num_cpus": 1, "num_gpus": 1},
                            __name__="device_squares")


def run(ctx, stage=device_stage, distributor="local", **kw):
    return run_stage(stage, ctx, make_config(squares, {}), distributor=distributor,
                     progress=False, log=lambda _: None, **kw)


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "CPU", "", "mps"])
def test_unknown_devices_are_refused_naming_them(bad):
    with pytest.raises(precision.DeviceError, match=f"device {bad!r} is not one of"):
        precision.check_device(bad)


def test_auto_resolves_from_the_gpus_the_workers_see():
    assert precision.resolve_device("auto", gpus=0) == "cpu"
    assert precision.resolve_device("auto", gpus=2) == "cuda"
    assert precision.resolve_device("cuda:1", gpus=0) == "cuda:1"  # explicit: kept, checked
    assert precision.resolve_precision("auto", "cuda:0") == "bf16"
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(precision.DeviceError, match="precision 'fp16' is not one of"):
        precision.resolve_precision("fp16", "cuda")


def test_bf16_autocast_runs_on_cpu_and_fp32_is_none():
    x = torch.randn(4, 8)
    w = torch.randn(8, 3)
    with precision.autocast("cpu", "bf16"):
        assert (x @ w).dtype == torch.bfloat16
        with precision.float32_region("cpu"):
            assert (x.float() @ w.float()).dtype == torch.float32
    with precision.autocast("cpu", "fp32"):
        assert (x @ w).dtype == torch.float32
    with pytest.raises(precision.DeviceError, match="resolved precision"):
        precision.autocast("cpu", "auto")


def test_a_device_stage_records_device_and_precision_and_refuses_a_mixed_resume(tmp_path):
    SEEN.clear()
    ctx = make_ctx(tmp_path)  # device="cpu"
    manifest = run(ctx)
    assert manifest["inputs"] == {"source": "v1", "device": "cpu", "precision": "fp32"}
    assert SEEN == [("cpu", "fp32")]  # the workers get the resolved policy
    bf16 = runner.replace(ctx, precision="bf16")
    with pytest.raises(StageMismatch, match=r"\(inputs.precision: 'fp32' -> 'bf16'\); "
                                            r"pass --rebuild"):
        run(bf16)
    # a stage that does not compute on the device records neither
    (tmp_path / "other").mkdir()
    other = make_ctx(tmp_path / "other")
    assert run(other, stage=squares)["inputs"] == {"source": "v1"}


def test_auto_is_resolved_once_in_the_driver(tmp_path, monkeypatch):
    SEEN.clear()
    monkeypatch.setattr(runner, "_visible_gpus", lambda distributor: 0)
    ctx = runner.replace(make_ctx(tmp_path), device="auto")
    assert run(ctx)["inputs"]["device"] == "cpu"
    assert SEEN == [("cpu", "fp32")]


def test_devices_the_workers_cannot_have_are_one_line(tmp_path, monkeypatch):
    ctx = make_ctx(tmp_path)
    monkeypatch.setattr(runner, "_visible_gpus", lambda distributor: 0)
    with pytest.raises(StageError, match=r"--device cuda but no GPU is visible \(torch sees "
                                         r"none\); use --device cpu"):
        run(runner.replace(ctx, device="cuda"))
    monkeypatch.setattr(runner, "_visible_gpus", lambda distributor: 1)
    with pytest.raises(StageError, match=r"--device cuda:1 under Ray: each worker is given "
                                         r"its own GPU"):
        run(runner.replace(ctx, device="cuda:1"), distributor="ray")
    assert not ctx.stage_dir("squares").exists()  # refused before anything was written
