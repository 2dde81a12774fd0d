"""The CPU share of GPU stages (issue 18 item 5), planned without a GPU: each GPU actor gets a
node's CPUs per GPU (or `--cpus-per-gpu`), never more GPUs than exist, and no GPU when the
device resolves to cpu."""
from __future__ import annotations

import types

import pytest
from ovdistill.pipeline import runner
from ovdistill.pipeline.runner import gpu_cpu_share, plan_workers

from ovdistill import cli

REGIONS = {"num_cpus": 1, "num_gpus": 1}  # stages/regions.py, proposals.py, text.py
RPN = {"num_cpus": 8, "num_gpus": 1}


def test_default_share_is_a_nodes_cpus_per_gpu():
    assert gpu_cpu_share([{"CPU": 16.0, "GPU": 1.0}]) == 16
    assert gpu_cpu_share([{"CPU": 96.0, "GPU": 8.0}]) == 12
    # the fewest per GPU over the GPU nodes, so each node's GPUs all get an actor; a CPU-only
    # head node does not count
    assert gpu_cpu_share([{"CPU": 8.0}, {"CPU": 32.0, "GPU": 2.0},
                          {"CPU": 16.0, "GPU": 4.0}]) == 4
    assert gpu_cpu_share([{"CPU": 2.0, "GPU": 4.0}]) == 1
    assert gpu_cpu_share([{"CPU": 16.0}]) is None and gpu_cpu_share([]) is None


def test_a_gpu_actor_gets_the_cpu_share_on_a_one_gpu_node():
    # the lent machine: 16 cores, one GPU -> one regions actor with all 16 CPUs (it asked 1)
    assert plan_workers(REGIONS, None, 12, 16, 16, 1, cpus_per_gpu=16) == (
        {"num_cpus": 16, "num_gpus": 1}, 1)
    # the share replaces the stage's CPU-worker ask both ways (rpn asks 8)
    assert plan_workers(RPN, None, 1, 16, 16, 1, cpus_per_gpu=16) == (
        {"num_cpus": 16, "num_gpus": 1}, 1)
    assert plan_workers(RPN, None, 1, 16, 16, 1, cpus_per_gpu=2) == (
        {"num_cpus": 2, "num_gpus": 1}, 1)
    # never more CPUs than one node has
    assert plan_workers(REGIONS, None, 12, 16, 16, 1, cpus_per_gpu=64)[0]["num_cpus"] == 16


def test_an_eight_gpu_node_places_one_actor_per_gpu_with_its_share():
    said: list[str] = []
    want, n = plan_workers(REGIONS, None, 40, 96, 96, 8, log=said.append, cpus_per_gpu=12)
    assert (want, n) == ({"num_cpus": 12, "num_gpus": 1}, 8)
    # --workers above the GPU count is capped with one line, never more GPUs than exist
    want, n = plan_workers(REGIONS, 10, 40, 96, 96, 8, log=said.append, cpus_per_gpu=12)
    assert n == 8 and n * want["num_gpus"] <= 8
    assert said == [("--workers 10: the cluster places 8 such worker(s) at once "
                     "({'num_cpus': 12, 'num_gpus': 1}); using 8")]
    # fewer parts than GPUs: one actor per part
    assert plan_workers(REGIONS, None, 3, 96, 96, 8, cpus_per_gpu=12)[1] == 3


@pytest.mark.parametrize("gpus", [1, 2, 8])
@pytest.mark.parametrize("workers", [None, 1, 4, 16])
def test_a_plan_never_asks_for_more_gpus_than_exist(gpus, workers):
    share = 16 // gpus or 1
    want, n = plan_workers(REGIONS, workers, 50, 16, 16, gpus, log=lambda s: None,
                           cpus_per_gpu=share)
    assert n * want["num_gpus"] <= gpus and n * want["num_cpus"] <= 16


def test_no_gpu_when_the_device_is_cpu_keeps_the_stages_own_cpus():
    # cpu_only plans with gpus=0: no GPU asked, the share does not apply
    assert plan_workers(REGIONS, None, 12, 16, 16, 0, cpus_per_gpu=16) == (
        {"num_cpus": 1, "num_gpus": 0}, 12)
    assert plan_workers(RPN, None, 12, 16, 16, 0, cpus_per_gpu=16) == (
        {"num_cpus": 8, "num_gpus": 0}, 2)
    # a CPU stage (pack) never gets the share
    assert plan_workers({"num_cpus": 1, "num_gpus": 0}, None, 12, 16, 16, 1,
                        cpus_per_gpu=16) == ({"num_cpus": 1, "num_gpus": 0}, 12)


class FakeRay(types.SimpleNamespace):
    """`ray` as `_visible_gpus` / `_ray_resources` see it: `nodes` node resource dicts."""

    def __init__(self, nodes: list[dict], initialized: bool = True):
        total: dict = {}
        for n in nodes:
            for k, v in n.items():
                total[k] = total.get(k, 0) + v
        self.inits: list[dict] = []
        super().__init__(nodes=lambda: [{"Alive": True, "Resources": n} for n in nodes],
                         cluster_resources=lambda: dict(total),
                         is_initialized=lambda: initialized or bool(self.inits),
                         init=lambda **kw: self.inits.append(kw))


@pytest.mark.parametrize("cpu_only, asked, want", [
    (False, None, {"num_cpus": 16, "num_gpus": 1}),  # the default share: 16 CPUs // 1 GPU
    (False, 6, {"num_cpus": 6, "num_gpus": 1}),  # --cpus-per-gpu 6
    (True, None, {"num_cpus": 1, "num_gpus": 0}),  # --device cpu: no GPU, the stage's own CPU
])
def test_ray_resources_passes_the_share_from_the_cluster(monkeypatch, cpu_only, asked, want):
    import sys

    monkeypatch.setitem(sys.modules, "ray", FakeRay([{"CPU": 16.0, "GPU": 1.0}]))
    stage = types.SimpleNamespace(RESOURCES=dict(REGIONS))
    got, n = runner._ray_resources(stage, None, 12, cpu_only=cpu_only, cpus_per_gpu=asked)
    assert got == want and n == (12 if cpu_only else 1)


def test_cli_takes_cpus_per_gpu_and_passes_it_to_every_stage(monkeypatch, tmp_path):
    args = cli.build_parser().parse_args(["run", "--cpus-per-gpu", "6"])
    assert args.cpus_per_gpu == 6
    assert cli.build_parser().parse_args(["run"]).cpus_per_gpu is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--cpus-per-gpu", "0"])

    seen = []
    monkeypatch.setattr(cli, "run_stage",
                        lambda stage, ctx, cfg, **kw: seen.append(kw["cpus_per_gpu"]))
    manifest = tmp_path / "m.yaml"
    manifest.write_text("name: m\nformat: coco\nroot: .\nsplits:\n"
                        "  train: {images: i, annotations: a.json}\n"
                        "vocabulary: {base: [a], novel: [b]}\n")
    rc = cli.main(["run", "--manifest", str(manifest), "--cache", str(tmp_path / "c"),
                   "--stages", "text,regions", "--cpus-per-gpu", "6"])
    assert rc == 0 and seen == [6, 6]
