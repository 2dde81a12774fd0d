"""faiss on a GPU machine, decided without one (issue 18 item 6): exactly one faiss build in
each install, the index stage says which faiss it built on and why, and GPU IVF-PQ gets a
sub-vector count it takes (at most 96; a 1024-d teacher gets 128 on the CPU)."""
from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
from ovdistill.bench.storage_bench import write_synthetic_cache
from ovdistill.pipeline.runner import PartOutput, StageError, make_config, run_stage
from ovdistill.stages import index as index_stage
from ovdistill.stages.index import (
    Config,
    faiss_distributions,
    faiss_placement,
    gpu_pq_ok,
    installed_faiss,
    ivf_pq_factory,
    pq_placement,
    pq_subvectors,
)

REPO = Path(__file__).resolve().parents[1]
TEACHER_DIMS = (32, 64, 128, 256, 384, 512, 640, 768, 1024, 1280)  # toy .. ViT-H/bigG


def test_gpu_pq_gets_a_valid_subvector_count_for_every_teacher_dim():
    assert pq_subvectors(1024) == 128  # the CPU's: the largest divisor <= D / 8
    assert pq_subvectors(1024, gpu=True) == 64
    assert pq_subvectors(768, gpu=True) == 96 and pq_subvectors(512, gpu=True) == 64
    for dim in TEACHER_DIMS:
        m = pq_subvectors(dim, gpu=True)
        assert gpu_pq_ok(dim, m) and m <= 96 and dim % m == 0, dim
        assert m <= pq_subvectors(dim)  # never more than the CPU's count
    assert ivf_pq_factory(10**6, 500_000, 1024, Config()) == "IVF4000,PQ128x8"
    assert ivf_pq_factory(10**6, 500_000, 1024, Config(), gpu=True) == "IVF4000,PQ64x8"
    # what faiss's GPU IVF-PQ refuses
    assert not gpu_pq_ok(1024, 128)  # more than 96 sub-vectors
    assert gpu_pq_ok(1280, 40) and not gpu_pq_ok(1280, 20)  # 64 dims per sub-vector: too many
    assert not gpu_pq_ok(640, 80) and gpu_pq_ok(640, 64)  # 80 bytes is no GPU code length
    assert not gpu_pq_ok(1024, 64, nbits=6)  # the GPU layout takes 8-bit codes


def test_a_pq_count_the_gpu_refuses_builds_on_the_cpu_with_one_reason():
    assert pq_placement(1024, 0, 8, gpu=True) == (64, True, "")
    assert pq_placement(1024, 0, 8, gpu=False) == (128, False, "")
    m, gpu, why = pq_placement(1024, 128, 8, gpu=True)  # pq_m=128 asked for explicitly
    assert (m, gpu) == (128, False)
    assert "PQ128x8" in why and "96" in why and why.endswith("building on the CPU")
    assert "\n" not in why
    m, gpu, why = pq_placement(1024, 0, 6, gpu=True)  # a small sample: 6-bit codes
    assert (m, gpu) == (128, False) and "PQ128x6" in why


def test_placement_names_the_faiss_it_builds_on():
    cpu, gpu = ["faiss-cpu 1.15.1"], ["faiss-gpu 1.15.1"]
    assert faiss_placement("cuda", cpu, gpu_api=False, gpus=0) == (
        False, ("faiss-cpu 1.15.1 has no GPU support: building on the CPU (for a GPU index "
                "install faiss-gpu instead of faiss-cpu)"))
    assert faiss_placement("cuda", gpu, gpu_api=True, gpus=1) == (
        True, "faiss-gpu 1.15.1: building on 1 GPU(s)")
    assert faiss_placement("cpu", gpu, gpu_api=True, gpus=1) == (
        False, "faiss-gpu 1.15.1: --device cpu, building on the CPU")
    assert faiss_placement("cuda", gpu, gpu_api=True, gpus=0) == (
        False, "faiss-gpu 1.15.1 sees no GPU: building on the CPU")
    # both at once: one line, not a silent CPU build
    with pytest.raises(StageError, match=r"^index: faiss-cpu 1.15.1 and faiss-gpu 1.15.1 are "
                                         r"both installed .*install one"):
        faiss_placement("cuda", cpu + gpu, gpu_api=False, gpus=0)


def test_faiss_builds_are_found_among_the_installed_distributions():
    names = [("faiss-cpu", "1.15.1"), ("numpy", "2.4"), ("faiss-haystack", "3.0"),
             ("faiss_gpu_cu12", "1.14.1"), ("faissx", "0.2"), ("faiss-gpu-cu13-cuvs", "1.15")]
    assert faiss_distributions(names) == ["faiss-cpu 1.15.1", "faiss-gpu-cu13-cuvs 1.15",
                                          "faiss_gpu_cu12 1.14.1"]
    assert len(installed_faiss()) == 1, installed_faiss()  # this test environment's own


def _site(folder: Path, *dists: tuple[str, str]):
    """A site-packages folder holding faiss/ and the dist-info of `dists` -> a stand-in for
    the imported faiss module."""
    (folder / "faiss").mkdir(parents=True)
    (folder / "faiss" / "__init__.py").write_text("")
    for name, version in dists:
        info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\n"
                                       f"Version: {version}\n")
    return types.SimpleNamespace(__file__=str(folder / "faiss" / "__init__.py"))


def test_only_the_builds_beside_the_imported_faiss_count(tmp_path):
    # pip --target + PYTHONPATH: a second faiss-cpu earlier on the path shadows the first
    shadowing = _site(tmp_path / "target", ("faiss-cpu", "1.15.1"))
    _site(tmp_path / "venv", ("faiss-cpu", "1.15.1"))
    assert installed_faiss(shadowing) == ["faiss-cpu 1.15.1"]
    # faiss-gpu installed on top of faiss-cpu in one site-packages: both own its files
    mixed = _site(tmp_path / "mixed", ("faiss-cpu", "1.15.1"), ("faiss-gpu", "1.15.1"))
    assert installed_faiss(mixed) == ["faiss-cpu 1.15.1", "faiss-gpu 1.15.1"]
    with pytest.raises(StageError, match="both installed"):
        faiss_placement("cuda", installed_faiss(mixed), gpu_api=True, gpus=1)


def test_every_install_path_gets_exactly_one_faiss():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def faiss_of(reqs):
        return sorted(re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in reqs
                      if r.lower().startswith("faiss"))

    extras = project["optional-dependencies"]
    assert faiss_of(project["dependencies"]) == []  # the plain install: only via an extra
    assert faiss_of(extras["dev"]) == ["faiss-cpu"]  # make setup / make test / CI
    assert faiss_of(extras["cpu"]) == ["faiss-cpu"]
    assert faiss_of(extras["gpu"]) == ["faiss-gpu"]
    assert faiss_of(extras["test"]) == []  # so ".[gpu,test]" holds faiss-gpu alone
    # the Makefile's setup installs the dev extra
    assert '-e ".[dev]"' in (REPO / "Makefile").read_text()


def test_the_stage_records_which_faiss_it_built_on(tmp_path, capsys):
    ctx = write_synthetic_cache(tmp_path, n_images=8, m=10, dim=16, per_part=4)
    manifest = run_stage(index_stage, ctx, make_config(index_stage, {}), distributor="local",
                         progress=False, log=lambda s: None)
    info, build = manifest["index"], installed_faiss()[0]
    assert info["faiss"] == build and info["gpu"] is False
    assert info["placement"] == f"{build}: --device cpu, building on the CPU"
    assert f"[index] {build}: --device cpu, building on the CPU (Flat, " in capsys.readouterr().out

    # asked for cuda with this CPU-only faiss: the CPU, and the line says why
    from dataclasses import replace

    worker = index_stage.Worker(replace(ctx, device="cuda", precision="bf16"), Config())
    part = index_stage.plan(ctx, Config())[0]
    out = PartOutput(tmp_path / "again")
    result = worker.run_part(part, out)
    out.discard()
    placement = result.extra["index"]["placement"]
    if "faiss-cpu" in build:
        assert placement == (f"{build} has no GPU support: building on the CPU (for a GPU "
                             f"index install faiss-gpu instead of faiss-cpu)")
