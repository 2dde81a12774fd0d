"""GPU input paths, checked on the CPU (issue 18 item 5): the trainer's loader takes
`pin_memory` and a worker count, the regions stage copies its embeddings to the host once
per part (not once per encoder batch), and its CUDA-only helpers are no-ops on the CPU."""
from __future__ import annotations

import pytest
import torch
from ovdistill.bench.wds_fixture import TINY_SETTINGS, write_tiny_cache
from ovdistill.stages import regions
from ovdistill.trainer.config import ConfigError, make_config
from ovdistill.trainer.data import loader_workers, train_loader
from ovdistill.trainer.inputs import load_vocabulary


def test_loader_workers_share_the_node_and_keep_a_core_for_the_step():
    assert loader_workers(16) == 8  # the lent machine, one process: capped
    assert loader_workers(16, ranks=2) == 7
    assert loader_workers(4) == 3
    assert loader_workers(2) == 1 and loader_workers(1) == 1 and loader_workers(8, ranks=16) == 1
    assert loader_workers(64, cap=12) == 12


def test_train_loader_takes_pin_memory_and_a_worker_count(tmp_path):
    tiny = write_tiny_cache(tmp_path, n_train=4, n_val=2)
    vocab = load_vocabulary(tiny.dataset_dir / "text" / "tiny.parquet")
    cfg = make_config(dict(TINY_SETTINGS))
    args = (tiny.shards, cfg, vocab.dim, vocab.base_labels())
    plain = train_loader(*args, seed=0)
    loader = plain.pipeline[0]  # WebLoader wraps a torch DataLoader
    assert loader.pin_memory is False and loader.num_workers == cfg.num_workers == 0
    pinned = train_loader(*args, seed=0, pin_memory=True)
    assert pinned.pipeline[0].pin_memory is True
    more = train_loader(*args, seed=0, num_workers=3).pipeline[0]
    assert more.num_workers == 3 and more.persistent_workers and more.prefetch_factor == 4
    # same batches either way (on a machine without CUDA nothing is pinned)
    a, b = next(iter(plain)), next(iter(pinned))
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert [t["image_id"] for t in a[1]] == [t["image_id"] for t in b[1]]


class Counted(torch.Tensor):
    """A tensor that counts the device-to-host copies (`.cpu()`) made from it or its results."""

    copies = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu:
            cls.copies += 1
        return super().__torch_function__(func, types, args, kwargs or {})


class FakeTeacher:
    embed_dim = 8

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :8].float().as_subclass(Counted)


def test_region_embeddings_copy_to_the_host_once_per_part():
    crops = [torch.randn(2 * n, 3, 2, 2) for n in (3, 5, 2, 7, 1)]  # 36 crops
    Counted.copies = 0
    out = regions.region_embeddings(FakeTeacher(), iter(crops), batch_size=4)  # 9 batches
    assert Counted.copies == 1
    ref = torch.cat([regions.combine_views(c.flatten(1)[:, :8]) for c in crops])
    assert torch.equal(out.as_subclass(torch.Tensor), ref)


def test_cuda_helpers_are_no_ops_on_the_cpu():
    t = torch.arange(6.0)
    assert regions.to_device(t, "cpu") is t
    assert regions.crop_stream("cpu") is None
    crops = torch.ones(4, 3, 2, 2)
    assert regions.ready_on_current_stream(crops, None) is crops


def test_auto_loader_workers_are_one_on_the_cpu_and_the_nodes_share_on_cuda(monkeypatch):
    from ovdistill.trainer import data
    from ovdistill.trainer.config import make_config

    auto = make_config({})
    assert auto.num_workers is None
    assert data.resolve_workers(auto, torch.device("cpu")) == 1
    monkeypatch.setattr(data.os, "cpu_count", lambda: 16)
    assert data.resolve_workers(auto, torch.device("cuda", 0)) == 8
    assert data.resolve_workers(auto, torch.device("cuda", 0), ranks=4) == 3
    assert data.resolve_workers(make_config({"num_workers": 0}), torch.device("cuda")) == 0
    with pytest.raises(ConfigError, match=r"num_workers must be >= 0 or None \(auto\), got -1"):
        make_config({"num_workers": -1})
