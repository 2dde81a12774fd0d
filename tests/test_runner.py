"""The stage runner: resume after a real kill, refusal of mismatched caches, the lock,
stray temporaries, failing parts, and parts spread over a two-node Ray cluster."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ovdistill.pipeline.cache import read_json
from ovdistill.pipeline.manifests import load_manifest
from ovdistill.pipeline.runner import (
    CacheLock,
    StageContext,
    StageError,
    StageMismatch,
    make_config,
    run_stage,
    stage_status,
)

from tests import stage_fixture as squares

REPO = Path(__file__).resolve().parents[1]

MANIFEST = """\
name: tiny
format: coco
root: {root}
splits:
  train: {{images: train, annotations: train.json}}
vocabulary:
  base: [a, b]
  novel: [c]
"""


def make_ctx(tmp_path: Path) -> StageContext:
    path = tmp_path / "tiny.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(MANIFEST.format(root=tmp_path / "data"))
    return StageContext(dataset=load_manifest(path), cache=tmp_path / "cache" / "tiny",
                        device="cpu")


def rows(stage_dir: Path) -> list[int]:
    out = []
    for p in sorted(stage_dir.glob("part-*.parquet")):
        out += pq.read_table(p).column("item").to_pylist()
    return out


def run(ctx, distributor="local", stage=squares, log=None, **overrides):
    return run_stage(stage, ctx, make_config(squares, overrides), distributor=distributor,
                     progress=False, log=log or (lambda _: None))


def test_uninterrupted_run_writes_every_row_and_manifest(tmp_path):
    ctx = make_ctx(tmp_path)
    manifest = run(ctx, reject_item=5)
    d = ctx.stage_dir("squares")
    assert sorted(rows(d)) == [i for i in range(24) if i != 5]
    assert manifest["rows"] == 23 and manifest["rejects"] == 1 and manifest["n_parts"] == 6
    assert manifest["report"] == {"parts": 6}
    assert read_json(d / "part-00001.stats.json")["rejects"] == [
        {"item": 5, "reason": "planted bad item"}]
    assert stage_status(d) == {"stage": "squares", "done": 6, "total": 6, "rows": 23,
                               "rejects": 1, "complete": True}
    # a second run with the same config is a no-op returning the same manifest
    assert run(ctx, reject_item=5) == manifest


KILLABLE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from ovdistill.pipeline.manifests import load_manifest
    from ovdistill.pipeline.runner import StageContext, make_config, run_stage
    from tests import stage_fixture as squares
    tmp = Path(sys.argv[1])
    ctx = StageContext(dataset=load_manifest(tmp / "tiny.yaml"), cache=tmp / "cache" / "tiny",
                       device="cpu")
    run_stage(squares, ctx, make_config(squares, {"sleep": float(sys.argv[2])}),
              distributor="local", progress=False)
""")


def test_killed_run_resumes_without_redoing_finished_parts(tmp_path):
    ctx = make_ctx(tmp_path)
    d = ctx.stage_dir("squares")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(tmp_path), "0.5"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(list(d.glob("part-*.stats.json"))) < 2 and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in d.glob("part-*.stats.json")}
    assert 2 <= len(finished) < 6, "the kill must land mid-stage"
    assert not (d / "_MANIFEST.json").exists()

    manifest = run(ctx, sleep=0.5)

    assert sorted(rows(d)) == list(range(24))  # exactly the rows of an uninterrupted run
    assert len(rows(d)) == 24  # and no duplicates
    for name, mtime in finished.items():
        assert (d / name).stat().st_mtime_ns == mtime, f"{name} was recomputed"
    assert manifest["rows"] == 24
    assert not list(d.glob(".*.tmp-*"))


def test_other_config_is_refused_unless_rebuild(tmp_path):
    ctx = make_ctx(tmp_path)
    run(ctx, salt="a")
    with pytest.raises(StageMismatch, match=r"config\.salt: 'a' -> 'b'.*pass --rebuild"):
        run(ctx, salt="b")
    manifest = run_stage(squares, ctx, make_config(squares, {"salt": "b"}), distributor="local",
                         rebuild=True, progress=False, log=lambda _: None)
    assert manifest["config"]["salt"] == "b" and sorted(rows(ctx.stage_dir("squares"))) == \
        list(range(24))


def test_other_input_is_refused(tmp_path, monkeypatch):
    ctx = make_ctx(tmp_path)
    run(ctx)
    monkeypatch.setenv("SQUARES_INPUT", "v2")
    with pytest.raises(StageMismatch, match=r"inputs\.source: 'v1' -> 'v2'"):
        run(ctx)


def test_crashed_part_keeps_finished_parts_and_resume_does_only_the_rest(tmp_path,
                                                                          monkeypatch):
    ctx = make_ctx(tmp_path)
    d = ctx.stage_dir("squares")
    monkeypatch.setenv("SQUARES_FAIL_ITEM", "13")
    with pytest.raises(RuntimeError, match="boom in part 3"):
        run(ctx)
    kept = {p.name: p.stat().st_mtime_ns for p in d.glob("part-*.stats.json")}
    assert sorted(kept) == [f"part-0000{i}.stats.json" for i in range(3)]
    assert not (d / "part-00003.parquet").exists() and not list(d.glob(".*.tmp-*"))
    with pytest.raises(StageMismatch, match="n_parts|plan|per_part"):
        run(ctx, per_part=6)  # a half-built stage is refused with another config too
    monkeypatch.delenv("SQUARES_FAIL_ITEM")
    manifest = run(ctx)
    assert manifest["rows"] == 24 and sorted(rows(d)) == list(range(24))
    assert all((d / n).stat().st_mtime_ns == t for n, t in kept.items())


def test_stray_temporaries_are_removed_and_not_counted(tmp_path):
    ctx = make_ctx(tmp_path)
    d = ctx.stage_dir("squares")
    run(ctx, n_items=8)
    (d / "_MANIFEST.json").unlink()
    (d / "part-00001.stats.json").unlink()
    stray = d / ".part-00001.parquet.tmp-deadbeef"
    stray.write_bytes(b"half written")
    manifest = run(ctx, n_items=8)
    assert not stray.exists()
    assert manifest["rows"] == 8 and sorted(rows(d)) == list(range(8))


def test_lock_stops_a_second_run(tmp_path):
    cache = tmp_path / "cache"
    with CacheLock(cache):
        with pytest.raises(StageError, match=r"\.lock is held by another run \(pid \d+"):
            with CacheLock(cache):
                pass
        holder = subprocess.run(
            [sys.executable, "-c",
             "import sys; from ovdistill.pipeline.runner import CacheLock\n"
             "try:\n  CacheLock(sys.argv[1]).__enter__()\n"
             "except Exception as e: print(e); sys.exit(3)", str(cache)],
            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        assert holder.returncode == 3 and "held by another run" in holder.stdout
    with CacheLock(cache):  # released on exit
        pass


@pytest.mark.slow
def test_parts_run_on_both_nodes_of_a_two_node_ray_cluster(tmp_path, monkeypatch):
    import ray  # a project dependency: a missing one fails here, it is not skipped
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # so the workers import tests.stage_fixture
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, include_dashboard=False, logging_level="ERROR")
        cluster.wait_for_nodes()
        ctx = make_ctx(tmp_path)
        manifest = run(ctx, distributor="ray", n_items=16, sleep=0.3)
        d = ctx.stage_dir("squares")
        nodes = {read_json(p)["node_id"] for p in d.glob("part-*.stats.json")}
        assert len(nodes) == 2, nodes
        assert manifest["rows"] == 16 and sorted(rows(d)) == list(range(16))
        assert len({read_json(p)["part"] for p in d.glob("part-*.stats.json")}) == 4
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_status_command_reports_done_total_and_rows(tmp_path):
    ctx = make_ctx(tmp_path)
    run(ctx, n_items=8, reject_item=2)
    (ctx.stage_dir("squares") / "_MANIFEST.json").unlink()
    (ctx.stage_dir("squares") / "part-00001.stats.json").unlink()
    out = subprocess.run([sys.executable, "-m", "ovdistill", "status", "--cache",
                          str(tmp_path / "cache")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.split()[:1] == ["squares"])
    assert line.split() == ["squares", "1/2", "3", "1", "in", "progress"]
    assert any(ln.split()[:2] == ["dataset", "-"] for ln in out.splitlines())


def test_worker_count_never_exceeds_what_the_cluster_places():
    from ovdistill.pipeline.runner import plan_workers

    said = []
    gpu = {"num_cpus": 1, "num_gpus": 1}
    # --workers 4 on a one-GPU node: one actor (four would wait for GPUs that never come)
    assert plan_workers(gpu, 4, 12, 16, 16, 1, log=said.append) == (gpu, 1)
    assert said == [("--workers 4: the cluster places 1 such worker(s) at once "
                     "({'num_cpus': 1, 'num_gpus': 1}); using 1")]
    assert plan_workers(gpu, None, 12, 16, 16, 2, log=said.append) == (gpu, 2)
    assert plan_workers(gpu, 1, 12, 16, 16, 2, log=said.append) == (gpu, 1)
    # no GPU in the cluster: the stage runs on CPU actors, as many as the CPUs hold
    assert plan_workers(gpu, None, 12, 8, 16, 0) == ({"num_cpus": 1, "num_gpus": 0}, 12)
    cpu = {"num_gpus": 0}
    assert plan_workers({"num_cpus": 4}, None, 12, 8, 16, 0) == ({"num_cpus": 4, **cpu}, 4)
    assert plan_workers({"num_cpus": 32}, 3, 12, 8, 16, 0, log=said.append) == (
        {"num_cpus": 8, **cpu}, 2)
    assert plan_workers({"num_cpus": 1}, None, 3, 8, 16, 0) == ({"num_cpus": 1, **cpu}, 3)
    assert len(said) == 2
