"""What the stage runner records and says, checked field by field: each part's stats, the
manifest and its fingerprint (what downstream stages key their caches on), the log lines and
the progress bar, the mismatch description, the part outputs' rename and discard, and the
Ray path on a real one-node cluster (the actors' rows equal the in-process run's, the
actors give their CPUs back). Written against the survivors of `make mutate` on
pipeline/runner.py (BENCHMARKS.md, session 15)."""
from __future__ import annotations

import calendar
import dataclasses
import os
import re
import socket
import stat
import sys
import time
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from ovdistill.pipeline import runner
from ovdistill.pipeline.cache import canonical_hash, library_versions, read_json
from ovdistill.pipeline.runner import (
    CacheLock,
    Part,
    PartOutput,
    StageError,
    StageMismatch,
    chunk_parts,
    clean_stray_tmp,
    config_dict,
    make_config,
    plan_workers,
    run_stage,
    stage_status,
)

from tests import stage_fixture as squares
from tests.test_gpu_plan import FakeRay
from tests.test_precision import device_stage
from tests.test_runner import REPO, make_ctx, rows, run

# ----------------------------------------------------------------------------- records


def test_each_parts_stats_hold_exactly_what_the_part_did(tmp_path):
    ctx = make_ctx(tmp_path)
    start = time.time()
    run(ctx, reject_item=5, sleep=0.02)
    wall = time.time() - start
    d = ctx.stage_dir("squares")
    for i in range(6):
        s = read_json(d / f"part-0000{i}.stats.json")
        assert set(s) == {"part", "items", "rows", "rejects", "n_rejects", "seconds", "host",
                          "node_id"}
        assert (s["part"], s["items"], s["rows"], s["n_rejects"]) == (
            i, 4, 3 if i == 1 else 4, 1 if i == 1 else 0)
        assert s["host"] == socket.gethostname() and s["node_id"] is None  # no Ray here
        assert 0.02 <= s["seconds"] <= wall and s["seconds"] == round(s["seconds"], 3)


def test_the_manifest_records_dataset_seconds_versions_and_creation_time(tmp_path,
                                                                        monkeypatch):
    ctx = make_ctx(tmp_path)
    monkeypatch.setenv("TZ", "JST-9")  # UTC+9 (POSIX form, no tz database): still UTC
    time.tzset()
    before = time.time()
    try:
        manifest = run(ctx, sleep=0.01)
    finally:
        monkeypatch.undo()  # TZ as it was, for the rest of the process too
        time.tzset()
    d = ctx.stage_dir("squares")
    stats = [read_json(d / f"part-0000{i}.stats.json") for i in range(6)]
    assert manifest["dataset"] == "tiny"
    assert manifest["seconds"] == round(sum(s["seconds"] for s in stats), 3) >= 0.06
    assert manifest["versions"] == library_versions()
    created = calendar.timegm(time.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%SZ"))
    assert before - 2 <= created <= time.time() + 1
    assert manifest["stage"] == "squares" and manifest["n_parts"] == 6
    assert manifest == read_json(d / "_MANIFEST.json")


def test_the_fingerprint_follows_config_inputs_plan_rows_and_the_teacher(tmp_path, monkeypatch):
    """Downstream stages key their caches on this value, so it must change with each of them."""
    def fingerprint(name, stage=squares, **overrides):
        ctx = make_ctx(tmp_path / name)
        return run(ctx, stage=stage, **overrides)

    base = fingerprint("base")
    assert base["fingerprint"] == canonical_hash(
        [base["config_hash"], base["inputs"], base["plan_hash"], 24, None])
    seen = {base["fingerprint"]}
    monkeypatch.setenv("SQUARES_INPUT", "v2")
    seen.add(fingerprint("input")["fingerprint"])
    monkeypatch.delenv("SQUARES_INPUT")
    seen.add(fingerprint("config", salt="x")["fingerprint"])
    for teacher in ("sha-a", "sha-b"):
        stage = squares.like(finalize=lambda ctx, cfg, stats, t=teacher: {"teacher": t})
        m = fingerprint(teacher, stage=stage)
        assert m["teacher"] == teacher
        seen.add(m["fingerprint"])
    assert len(seen) == 5


def test_a_changed_plan_alone_is_refused_naming_the_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("SQUARES_N", "8")
    stage = squares.like(
        plan=lambda ctx, cfg: chunk_parts(list(range(int(os.environ["SQUARES_N"]))), 4))
    ctx = make_ctx(tmp_path)
    run(ctx, stage=stage)
    monkeypatch.setenv("SQUARES_N", "7")  # same config, same inputs, other items
    with pytest.raises(StageMismatch, match=r"\(the planned parts differ\); pass --rebuild"):
        run(ctx, stage=stage)


def test_the_mismatch_names_at_most_six_differences():
    old = {"config": {f"k{i}": i for i in range(7)}, "inputs": {}, "plan_hash": "p"}
    new = {"config": {f"k{i}": i + 1 for i in range(7)}, "inputs": {}, "plan_hash": "q"}
    said = runner._describe_mismatch(old, new)
    assert said == "; ".join(f"config.k{i}: {i} -> {i + 1}" for i in range(6)) + " ..."
    new["config"]["k6"] = 6
    assert runner._describe_mismatch(old, new) == "; ".join(
        f"config.k{i}: {i} -> {i + 1}" for i in range(6))
    # a key only one side has is a difference too; the plan is named only when nothing else is
    assert runner._describe_mismatch({"config": {}, "inputs": {"a": 1}, "plan_hash": "p"},
                                     {"config": {"new": 2}, "inputs": {"a": 1},
                                      "plan_hash": "q"}) == "config.new: None -> 2"
    assert runner._describe_mismatch({"config": {}, "inputs": {}, "plan_hash": "p"},
                                     {"config": {}, "inputs": {}, "plan_hash": "p"}) == ""


def test_log_lines_of_a_run_a_no_op_a_resume_and_a_rebuild(tmp_path):
    ctx = make_ctx(tmp_path)
    d = ctx.stage_dir("squares")
    said: list[str] = []
    run(ctx, log=said.append, reject_item=5)
    assert said == ["[squares] done: 6 parts, 23 rows, 1 rejects"]
    said.clear()
    run(ctx, log=said.append, reject_item=5)
    assert said == ["[squares] up to date (6 parts)"]
    said.clear()
    (d / "_MANIFEST.json").unlink()
    for i in (2, 4):
        (d / f"part-0000{i}.stats.json").unlink()
    run(ctx, log=said.append, reject_item=5)
    assert said == ["[squares] resuming: 4/6 parts already done",
                    "[squares] done: 6 parts, 23 rows, 1 rejects"]
    said.clear()
    run_stage(squares, ctx, make_config(squares, {"salt": "z"}), distributor="local",
              rebuild=True, progress=False, log=said.append)
    assert said == [f"[squares] --rebuild: discarding {d}",
                    "[squares] done: 6 parts, 24 rows, 0 rejects"]


def test_the_progress_bar_counts_parts_from_the_finished_ones(tmp_path, capsys):
    ctx = make_ctx(tmp_path)
    d = ctx.stage_dir("squares")
    run(ctx, reject_item=21)
    (d / "_MANIFEST.json").unlink()
    for i in (4, 5):
        (d / f"part-0000{i}.stats.json").unlink()
    capsys.readouterr()
    run_stage(squares, ctx, make_config(squares, {"reject_item": 21}), distributor="local",
              log=lambda _: None)  # progress is on by default
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert bar[0].startswith("squares:  67%") and "4/6" in bar[0]
    last = bar[-1]
    assert last.startswith("squares: 100%") and " 6/6 " in last, last
    assert re.search(r"part/s|s/part", last), last
    assert "rows=3" in last and "rejects=1" in last  # the last part done: part 5 (item 21)
    (d / "_MANIFEST.json").unlink()
    (d / "part-00005.stats.json").unlink()
    run(ctx, reject_item=21)  # a part to run, with progress=False: silent
    assert capsys.readouterr().err == ""


def test_status_of_a_folder_with_no_plan_yet(tmp_path):
    (tmp_path / "squares").mkdir()
    assert stage_status(tmp_path / "squares") == {
        "stage": "squares", "done": 0, "total": None, "rows": 0, "rejects": 0,
        "complete": False}


# ----------------------------------------------------------------------------- parts


def test_part_outputs_make_their_folders_replace_folders_and_discard_cleanly(tmp_path):
    out = PartOutput(tmp_path / "stage")
    nested = out.tmp("a/b/part-00000.bin")  # parents made
    nested.write_bytes(b"x")
    folder = out.tmp("part-00000.d")
    folder.mkdir()
    (folder / "new").write_bytes(b"n")
    (tmp_path / "stage" / "part-00000.d").mkdir()
    (tmp_path / "stage" / "part-00000.d" / "old").write_bytes(b"o")
    out.commit()
    assert (tmp_path / "stage" / "a" / "b" / "part-00000.bin").read_bytes() == b"x"
    assert sorted(p.name for p in (tmp_path / "stage" / "part-00000.d").iterdir()) == ["new"]

    out = PartOutput(tmp_path / "stage")
    d = out.tmp("part-00001.d")
    d.mkdir()
    (d / "inner").write_bytes(b"i")
    f = out.tmp("part-00001.bin")
    f.write_bytes(b"f")
    out.tmp("part-00001.never")  # a part that failed before writing this one
    out.discard()
    assert not d.exists() and not f.exists()
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == ["a", "part-00000.d"]


def test_stray_temporaries_are_removed_files_and_folders_alike(tmp_path):
    (tmp_path / ".part-00000.parquet.tmp-1").write_bytes(b"half")
    (tmp_path / ".part-00001.d.tmp-2").mkdir()
    (tmp_path / ".part-00001.d.tmp-2" / "x").write_bytes(b"half")
    (tmp_path / "part-00002.parquet").write_bytes(b"finished")
    clean_stray_tmp(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["part-00002.parquet"]


def test_chunk_parts_and_its_bad_size():
    assert chunk_parts([1, 2, 3], 1) == [Part(0, (1,)), Part(1, (2,)), Part(2, (3,))]
    assert chunk_parts([1, 2, 3], 2) == [Part(0, (1, 2)), Part(1, (3,))]
    with pytest.raises(ValueError, match=r"^per_part must be >= 1, got 0$"):
        chunk_parts([1], 0)


def test_configs_name_unknown_keys_and_serialise_paths():
    with pytest.raises(StageError, match=re.escape(
            "stage 'squares': unknown config key(s) ['bogus']; known: ['n_items', 'per_part', "
            "'reject_item', 'salt', 'sleep']")):
        make_config(squares, {"bogus": 1, "salt": "a"})

    @dataclasses.dataclass(frozen=True)
    class WithPath:
        root: Path = Path("/data/x")

    assert config_dict(WithPath()) == {"root": "/data/x"}


def test_non_contiguous_parts_are_refused_naming_the_stage(tmp_path):
    stage = squares.like(plan=lambda ctx, cfg: [Part(0, (1,)), Part(2, (2,))])
    with pytest.raises(StageError, match="stage 'squares' planned parts with non-contiguous"):
        run(make_ctx(tmp_path), stage=stage)


def test_the_lock_file_is_readable_by_all_writable_by_its_owner(tmp_path):
    old = os.umask(0o022)
    try:
        with CacheLock(tmp_path):
            mode = stat.S_IMODE((tmp_path / ".lock").stat().st_mode)
    finally:
        os.umask(old)
    assert mode == 0o644


# ----------------------------------------------------------------------------- devices, Ray


def test_device_type_and_stages_without_resources():
    assert runner.torch_device_type("cuda:1") == "cuda" == runner.torch_device_type("cuda")
    assert runner.uses_device(types.SimpleNamespace(NAME="x")) is False
    assert runner.uses_device(device_stage) is True


def test_visible_gpus_are_the_clusters_under_ray_and_torchs_otherwise(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = torch.cuda.device_count()
    monkeypatch.setitem(sys.modules, "ray", FakeRay([{"CPU": 4.0, "GPU": 3.0}]))
    assert runner._visible_gpus("ray") == 3
    assert runner._visible_gpus("local") == local
    monkeypatch.setitem(sys.modules, "ray", FakeRay([{"CPU": 4.0}]))
    assert runner._visible_gpus("ray") == 0  # a CPU cluster has no "GPU" key
    # not connected and no RAY_ADDRESS: the workers will be local, torch's count
    monkeypatch.setitem(sys.modules, "ray", FakeRay([{"CPU": 4.0, "GPU": 3.0}], False))
    assert runner._visible_gpus("ray") == local
    # RAY_ADDRESS: connect, then ask the cluster
    fake = FakeRay([{"CPU": 4.0, "GPU": 2.0}], False)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert runner._visible_gpus("ray") == 2
    assert [kw["address"] for kw in fake.inits] == ["ray://head:10001"]


def test_auto_device_under_ray_follows_the_clusters_gpus(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ctx = runner.replace(make_ctx(tmp_path), device="auto")
    monkeypatch.setitem(sys.modules, "ray", FakeRay([{"CPU": 4.0, "GPU": 1.0}]))
    got = runner.compute_context(device_stage, ctx, "ray")
    assert (got.device, got.precision) == ("cuda", "bf16")
    monkeypatch.setitem(sys.modules, "ray", FakeRay([{"CPU": 4.0}]))
    with pytest.raises(StageError, match=r"\(the Ray cluster has none\); use --device cpu"):
        runner.compute_context(device_stage, runner.replace(ctx, device="cuda"), "ray")


def test_ray_resources_keep_workers_and_read_nodes_without_cpus(monkeypatch):
    gpu_stage = types.SimpleNamespace(RESOURCES={"num_cpus": 1, "num_gpus": 1})
    # a GPU-less head started with --num-cpus 0 has no "CPU" key
    monkeypatch.setitem(sys.modules, "ray", FakeRay([{"memory": 1.0}, {"CPU": 8.0}]))
    assert runner._ray_resources(types.SimpleNamespace(), None, 12, cpu_only=False) == (
        {"num_cpus": 1, "num_gpus": 0}, 8)  # no RESOURCES: one CPU a worker
    assert runner._ray_resources(gpu_stage, 2, 12, cpu_only=False) == (
        {"num_cpus": 1, "num_gpus": 0}, 2)  # --workers 2 kept; no GPU key: no GPU asked
    monkeypatch.setitem(sys.modules, "ray", FakeRay([{"CPU": 8.0, "GPU": 2.0}]))
    assert runner._ray_resources(gpu_stage, 1, 12) == (
        {"num_cpus": 4, "num_gpus": 1}, 1)


def test_plan_workers_edges():
    said: list[str] = []
    # one CPU per GPU is one, not two; half a GPU an actor gets half the share
    assert plan_workers({"num_gpus": 1}, None, 4, 8, 8, 1, cpus_per_gpu=1) == (
        {"num_gpus": 1, "num_cpus": 1}, 1)
    assert plan_workers({"num_gpus": 0.5}, None, 4, 8, 8, 1, cpus_per_gpu=8) == (
        {"num_gpus": 0.5, "num_cpus": 4}, 2)
    # a one-CPU cluster places one worker; a stage asking no CPUs gets one
    assert plan_workers({"num_cpus": 1}, None, 4, 1, 1, 0) == ({"num_cpus": 1, "num_gpus": 0}, 1)
    assert plan_workers({}, None, 4, 2, 2, 0) == ({"num_gpus": 0, "num_cpus": 1}, 2)
    # --workers equal to what fits: used as asked, no line
    assert plan_workers({"num_cpus": 1}, 2, 4, 2, 2, 0, log=said.append)[1] == 2
    assert said == []
    assert runner.gpu_cpu_share([{"GPU": 1.0}]) == 1  # a GPU node reporting no CPUs


@pytest.mark.timeout(60, method="thread")  # a mutant asking resources Ray cannot place waits forever
def test_a_stage_on_a_local_ray_cluster_writes_the_in_process_rows(tmp_path, monkeypatch):
    import ray  # a project dependency: a missing one fails here, it is not skipped

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # so the actors import tests.stage_fixture
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = make_ctx(tmp_path / "local")
    run(local, reject_item=5)
    want = pq.read_table(local.stage_dir("squares") / "part-00001.parquet").column(
        "item").to_pylist()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        ctx = make_ctx(tmp_path / "ray")
        said: list[str] = []
        # the default distributor is Ray; --workers 1: one actor runs every part
        manifest = run_stage(squares, ctx, make_config(squares, {"reject_item": 5}),
                             workers=1, progress=False, log=said.append)
        d = ctx.stage_dir("squares")
        assert sorted(rows(d)) == sorted(rows(local.stage_dir("squares")))
        assert pq.read_table(d / "part-00001.parquet").column("item").to_pylist() == want
        pids = {pid for p in d.glob("part-*.parquet")
                for pid in pq.read_table(p).column("pid").to_pylist()}
        assert len(pids) == 1 and os.getpid() not in pids  # one actor, not this process
        node = ray.get_runtime_context().get_node_id()
        assert {read_json(p)["node_id"] for p in d.glob("part-*.stats.json")} == {node}
        assert manifest["rows"] == 23 and manifest["rejects"] == 1
        assert said == ["[squares] done: 6 parts, 23 rows, 1 rejects"]
        deadline = time.time() + 30  # the stage's actors are killed: their CPUs come back
        while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU", 0) == 2
    finally:
        ray.shutdown()


def test_a_dry_run_of_a_device_stage_resolves_its_device_as_a_run_does(tmp_path):
    ctx = make_ctx(tmp_path)  # device cpu
    cfg = make_config(squares, {})
    assert runner.dry_run_stage(device_stage, ctx, cfg) == "would run"
    run_stage(device_stage, ctx, cfg, distributor="local", progress=False, log=lambda _: None)
    assert runner.dry_run_stage(device_stage, ctx, cfg) == "up to date (6 parts)"
    assert runner.dry_run_stage(device_stage, runner.replace(ctx, precision="bf16"), cfg) == (
        "would refuse: inputs.precision: 'fp32' -> 'bf16'")


def test_an_unknown_distributor_is_one_line_naming_it(tmp_path):
    with pytest.raises(StageError, match=r"^unknown distributor 'dask' \(use 'ray' or 'local'\)$"):
        run_stage(squares, make_ctx(tmp_path), make_config(squares, {}), distributor="dask",
                  progress=False, log=lambda _: None)
