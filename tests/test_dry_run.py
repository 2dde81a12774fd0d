"""`run --dry-run`: each selected stage's state computed as a run computes it (config, inputs,
plan), one line per stage, nothing written and no Ray started."""
from __future__ import annotations

from pathlib import Path

from ovdistill.pipeline.runner import dry_run_stage, make_config

from ovdistill import cli
from tests import stage_fixture as squares
from tests.test_runner import make_ctx, run


def snapshot(root: Path) -> dict:
    """Every path under `root` with its bytes and mtime (directories: None)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (None if p.is_dir() else (p.read_bytes(),
                                                                 p.stat().st_mtime_ns))
            for p in sorted(root.rglob("*"))}


def dry(ctx, **overrides) -> str:
    return dry_run_stage(squares, ctx, make_config(squares, overrides))


def test_each_state_is_one_line_and_nothing_is_written(tmp_path, monkeypatch):
    ctx = make_ctx(tmp_path)
    d = ctx.stage_dir("squares")
    assert dry(ctx) == "would run"
    assert not ctx.cache.exists()  # no stage folder, no lock, no plan

    run(ctx)
    before = snapshot(tmp_path / "cache")
    assert dry(ctx) == "up to date (6 parts)"
    monkeypatch.setenv("SQUARES_INPUT", "v2")  # an input changed
    assert dry(ctx) == "would refuse: inputs.source: 'v1' -> 'v2'"
    assert dry_run_stage(squares, ctx, make_config(squares, {}), rebuild=True) == \
        "would rebuild: inputs.source: 'v1' -> 'v2'"
    monkeypatch.delenv("SQUARES_INPUT")
    assert dry(ctx, salt="b") == "would refuse: config.salt: '' -> 'b'"
    assert snapshot(tmp_path / "cache") == before

    (d / "_MANIFEST.json").unlink()
    (d / "part-00004.stats.json").unlink()
    (d / "part-00005.stats.json").unlink()
    before = snapshot(tmp_path / "cache")
    assert dry(ctx) == "would resume 4/6 parts"
    assert snapshot(tmp_path / "cache") == before
    for p in d.glob("part-*.stats.json"):
        p.unlink()
    assert dry(ctx) == "would run"


def test_cli_dry_run_prints_one_line_per_stage_and_starts_no_ray(tmp_path, monkeypatch,
                                                                 capsys):
    ctx = make_ctx(tmp_path)
    run(ctx)
    monkeypatch.setattr(cli, "STAGES", ["tests.stage_fixture"])
    argv = ["run", "--manifest", str(tmp_path / "tiny.yaml"), "--cache",
            str(tmp_path / "cache"), "--dry-run", "--device", "cpu"]
    before = snapshot(tmp_path / "cache")
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == ["[squares] up to date (6 parts)"]
    monkeypatch.setenv("SQUARES_INPUT", "v2")
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        "[squares] would refuse: inputs.source: 'v1' -> 'v2'"]
    assert snapshot(tmp_path / "cache") == before
    try:
        import ray
    except ImportError:
        return
    assert not ray.is_initialized()
