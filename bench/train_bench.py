"""Training step time streaming from the cached shards vs the same steps on batches already in
memory, in one run: does the WebDataset stream keep the model fed?

    python -m ovdistill.bench.train_bench --manifest data_manifests/toy.yaml --cache cache [--steps 8]

The stream is read once into memory (N batches), then the same N batches are trained on
twice streaming (a fresh stream with the same seed yields the same batches) and twice from
memory, in the order stream / memory / memory / stream so that drift in machine load (shared
CPUs) falls on both sides alike. ratio = memory time / stream time (1.0 = streaming costs
nothing; target >= 0.90). On CUDA the table also gives steps/s and images/s.
Without shards in the cache, `--fixture DIR` benchmarks a generated stand-in cache.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from ovdistill.pipeline.errors import reports_errors
from ovdistill.pipeline.layout import DatasetCache
from ovdistill.pipeline.manifests import load_manifest
from ovdistill.pipeline.options import add_data_options
from ovdistill.trainer import distributed
from ovdistill.trainer.config import make_config, parse_set
from ovdistill.trainer.data import resolve_workers, train_loader
from ovdistill.trainer.inputs import check_shard_dim, load_vocabulary, shard_urls, text_parquet_path
from ovdistill.trainer.model import OpenVocabDetector, load_init_weights
from ovdistill.trainer.train import build_optimizer, to_device, train_step, with_init_weights


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovdistill.bench.train_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(p, device=True)
    p.add_argument("--shards", default=None)
    p.add_argument("--fixture", default=None,
                   help="write and use a generated stand-in cache in this folder")
    p.add_argument("--steps", type=int, default=8, help="N: batches per timed pass")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mode", default="vild")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return p


def _inputs(args):
    if args.fixture:
        from ovdistill.bench.wds_fixture import write_tiny_cache

        tiny = write_tiny_cache(args.fixture, n_train=64, n_val=2, size=256, dim=64, m=300,
                                n_shards=4)
        return tiny.dataset_dir, DatasetCache(tiny.dataset_dir).text_parquet("tiny"), {}
    dataset = load_manifest(args.manifest, cache_root=args.cache)
    cache_dir = Path(args.cache) / dataset.name
    return (cache_dir, text_parquet_path(cache_dir, dataset.name),
            dict(dataset.trainer))


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(distributed.resolve_device(args.device))
    cache_dir, text_path, overrides = _inputs(args)
    overrides.update(parse_set(args.set))
    overrides["mode"] = args.mode
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.num_workers is not None:
        overrides["num_workers"] = args.num_workers
    cfg = make_config(with_init_weights(overrides, cache_dir))
    vocab = load_vocabulary(text_path)
    urls = shard_urls(args.shards, cache_dir)
    check_shard_dim(urls[0], vocab)

    torch.manual_seed(cfg.seed)
    model = OpenVocabDetector(cfg, vocab.dim)
    if cfg.init_from:  # as `make train` starts: a trained RPN proposes far fewer junk boxes
        load_init_weights(model, cfg.init_from)
    model.to(device)
    model.set_vocabulary(vocab.embeddings, vocab.is_base)
    model.train()
    optimizer, scheduler = build_optimizer(model, cfg)
    n, warm = args.steps, args.warmup

    def stream():
        return iter(train_loader(urls, cfg, vocab.dim, vocab.base_labels(), seed=cfg.seed,
                                 pin_memory=device.type == "cuda",
                                 num_workers=resolve_workers(cfg, device)))

    source = stream()
    memory = [next(source) for _ in range(warm + n)]
    del source

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed_pass(from_stream: bool) -> tuple[float, float]:
        """Seconds for N steps (after `warm` untimed ones) and seconds spent waiting for data."""
        batches = stream() if from_stream else iter(memory)
        for _ in range(warm):
            train_step(model, model, optimizer, scheduler,
                       *to_device(*next(batches), device), cfg, device)
        sync()
        total = wait = 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            images, targets = to_device(*next(batches), device)
            t1 = time.perf_counter()
            train_step(model, model, optimizer, scheduler, images, targets, cfg, device)
            sync()
            wait += t1 - t0
            total += time.perf_counter() - t0
        return total, wait

    times = {"stream": [0.0, 0.0], "memory": [0.0, 0.0]}
    for kind in ("stream", "memory", "memory", "stream"):
        total, wait = timed_pass(kind == "stream")
        times[kind][0] += total
        times[kind][1] += wait
    steps = 2 * n
    images = steps * cfg.batch_size
    ratio = times["memory"][0] / times["stream"][0]

    print(f"train step: streaming vs in-memory, {steps} steps each, batch {cfg.batch_size}, "
          f"mode {cfg.mode}, {resolve_workers(cfg, device)} loader worker(s), device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"{'source':<8} {'s/step':>8} {'steps/s':>8} {'images/s':>9} {'data wait':>10}")
    for kind, (total, wait) in times.items():
        print(f"{kind:<8} {total / steps:>8.3f} {steps / total:>8.2f} {images / total:>9.1f} "
              f"{100 * wait / total:>9.1f}%")
    print(f"ratio (in-memory time / streaming time): {ratio:.3f}  "
          f"({'meets' if ratio >= 0.90 else 'BELOW'} the 0.90 target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
