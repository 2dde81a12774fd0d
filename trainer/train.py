"""`python -m ovdistill.trainer.train`: train the ViLD student on a cache's WebDataset shards.

    python -m ovdistill.trainer.train --manifest data_manifests/toy.yaml --cache cache --out runs/toy \
        [--mode text|image|vild] [--heads shared|separate] [--steps N] [--seed S] \
        [--shards 'cache/toy/wds/train-{000000..000009}.tar'] [--set KEY=VALUE ...] \
        [--resume latest|PATH]
    torchrun --nproc_per_node 2 -m ovdistill.trainer.train ...      # DDP (gloo on CPU, nccl on CUDA)

Writes to --out: config.json, metrics.jsonl (one line per logged step), tb/ (TensorBoard),
latest.pt (model, optimizer, scheduler, step, RNG state, config; replaced atomically).
Config precedence: TrainConfig defaults < the manifest's `trainer:` block < --set <
the dedicated flags. A resumed run keeps its checkpoint's config (only --steps may change).
`--set precision=fp32|bf16` (default auto: bf16 on CUDA, fp32 on CPU) is the autocast of the
network; anchors, proposals, box targets, logits and losses are float32 either way.

Joint training (DetCLIPv2, `--set pairs_ratio=R`): iteration i is a pair iteration with
probability R, drawn from (seed, i) (`pair_data.is_pair_iteration`: every rank and a resumed
run make the same choices). A detection iteration is the step above; a pair iteration takes a
batch of `pairs_wds/` shards and its loss is `loss_pairs` (`OpenVocabDetector.pair_losses`).
`steps` counts both; the LR schedule steps on each. metrics.jsonl logs each loss averaged over
the iterations of the logged steps that had it (loss_pairs only on pair iterations), and the
pairs skipped in them summed (pairs_skipped_no_phrase, pairs_skipped_no_box, pairs_rejected).
`--set dictionary_negatives=K` adds K sampled non-base dictionary concepts to the ViLD-text
classifier of each detection iteration.

Detection as grounding (GLIP, `--mode grounding`): the cache's teacher
(`teacher_from_cache`) encodes the prompts per token; a detection iteration's prompt per
image is its GT base classes plus grounding_negatives other base names, shuffled per
(seed, step, image) (`grounding_data.detection_prompt_targets`). With `--set
grounding_ratio=R` (`pseudo_ratio=R'`) an iteration that is not a pair iteration is a
grounding-data (pseudo-grounding) iteration with that probability, drawn from (seed, step)
(`grounding_data.iteration_kind`): a batch of the grounding split (`--grounding-file`,
default the grounding stage's) or of the pseudo-grounding file (`--pseudo-file`, default
the pseudo_boxes stage's), prompts = the captions. A frozen teacher is not saved in
latest.pt; its identity is, and a resumed run refuses another teacher.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
from ovdistill.pipeline.cache import tmp_path
from ovdistill.pipeline.checkpoints import CheckpointError, load_weights
from ovdistill.pipeline.clip_teacher import teacher_from_cache
from ovdistill.pipeline.errors import OvdError, report
from ovdistill.pipeline.layout import RPN, TEXT, WDS, DatasetCache, recorded_checkpoint
from ovdistill.pipeline.manifests import DatasetManifest, load_manifest
from ovdistill.pipeline.optim import check_finite, warmup_cosine
from ovdistill.pipeline.options import add_data_options
from ovdistill.pipeline.precision import autocast_setting, resolve_precision
from ovdistill.trainer import distributed
from ovdistill.trainer.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    detections_per_image,
    make_config,
    parse_set,
)
from ovdistill.trainer.data import resolve_workers, train_loader
from ovdistill.trainer.grounding_data import (
    GROUNDING,
    GROUNDING_SKIPPED,
    PAIRS,
    PSEUDO,
    GroundingStream,
    detection_prompt_targets,
    grounding_files,
    iteration_kind,
)
from ovdistill.trainer.inputs import (
    check_shard_dim,
    load_vocabulary,
    shard_has_scores,
    shard_urls,
    teacher_identity,
    text_parquet_path,
    vocabulary_extras,
)
from ovdistill.trainer.losses import mean_direction_baseline
from ovdistill.trainer.model import (
    OpenVocabDetector,
    arch_overrides,
    load_init_weights,
    read_init_checkpoint,
)
from ovdistill.trainer.pair_data import (
    SKIP_KEYS,
    check_pair_shard_dim,
    load_dictionary_negatives,
    load_pseudo_boxes,
    pair_loader,
    pair_shard_urls,
    sample_negatives,
)
from torch.nn.parallel import DistributedDataParallel

CHECKPOINT = "latest.pt"
SUMMED_KEYS = (*SKIP_KEYS, GROUNDING_SKIPPED)  # logged summed over the steps, not averaged
# settings a resumed run may change (they do not alter what is learned)
RESUMABLE_CHANGES = {"steps", "log_every", "ckpt_every", "num_workers", "grounding_eval_names"}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW (no weight decay on biases, norms and the background embedding) with the
    warmup + cosine schedule stepped once per optimizer step."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup=cfg.warmup_steps, total=cfg.steps))
    return optimizer, scheduler


def to_device(images: list, targets: list[dict], device: torch.device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


def train_step(ddp: torch.nn.Module, model: torch.nn.Module, optimizer, scheduler,
               images: list, targets: list[dict], cfg: TrainConfig, device: torch.device,
               **forward: object):
    """One optimizer step under the autocast of `cfg.precision` resolved for `device` (auto:
    bf16 on CUDA, fp32 on CPU). `ddp` is the model, DDP-wrapped under torchrun; `forward`
    are its keyword arguments (pairs=True for a pair batch, extra_negatives). Returns
    (losses, total loss, grad norm, the LR this step used)."""
    with autocast_setting(device, cfg.precision):
        losses = ddp(images, targets, **forward)
    loss = sum(losses.values())
    check_finite(loss, lambda: f"loss is {loss.item()} "
                               f"({ {k: float(v) for k, v in losses.items()} })")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # A clipped step has norm grad_clip whatever its loss weight, and AdamW then makes a pair
    # step as large as a detection step: clip a pair step at pairs_weight x grad_clip, so
    # pairs_weight sets its share of the update (BENCHMARKS lab log, entry 29).
    max_norm = cfg.grad_clip * (cfg.pairs_weight if forward.get("pairs") else 1.0)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return losses, loss.detach(), grad_norm, lr


def rng_state(device: torch.device) -> dict:
    """The torch RNG state this process draws on (CPU, and the device's on CUDA)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Continue the random draws of the run that saved `state` (`rng_state`)."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary sibling, then rename: `path` is always a whole checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    return load_weights(path)


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric rows logged after `step` (a run resumed from an earlier checkpoint
    logs those steps again)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))


def resolve_init_from(value: str, cache_dir: Path) -> tuple[str, dict | None]:
    """(checkpoint path, its RPN-stage arch or None). "rpn" = the checkpoint the RPN stage of
    this cache recorded in its _MANIFEST.json; anything else is a path."""
    arch = None
    if value == "rpn":
        manifest = DatasetCache(cache_dir).manifest_path(RPN)
        if not manifest.exists():
            raise CheckpointError(f"{manifest}: not found; run the `rpn` stage first "
                                  f"(init_from=rpn)")
        with open(manifest) as f:
            record = json.load(f)
        value, arch = recorded_checkpoint(manifest.parent, record), record.get("arch")
    if not Path(value).exists():
        raise CheckpointError(f"{value}: init_from checkpoint not found")
    return str(value), arch


def with_init_weights(overrides: dict, cache_dir: Path) -> dict:
    """`overrides` with init_from resolved to a path and, since the backbone and RPN must be
    built the way that checkpoint was, its architecture keys."""
    if not overrides.get("init_from"):
        return overrides
    path, arch = resolve_init_from(overrides["init_from"], cache_dir)
    return {**overrides, "init_from": path,
            **arch_overrides({"arch": arch} if arch else read_init_checkpoint(path))}


def resolve_config(args, dataset: DatasetManifest, cache_dir: Path, resumed: dict | None
                   ) -> TrainConfig:
    overrides = dict(dataset.trainer)
    overrides.update(parse_set(args.set))
    for key in ("mode", "heads", "steps", "seed", "batch_size", "init_from"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if resumed is None:
        return make_config(with_init_weights(overrides, cache_dir))
    overrides.pop("init_from", None)  # a resumed run starts from its own checkpoint
    saved = config_from_dict(resumed["config"])
    wanted = make_config(overrides, base=saved)
    changed = sorted(k for k, v in wanted.to_dict().items()
                     if v != saved.to_dict()[k] and k not in RESUMABLE_CHANGES
                     and k in overrides)
    if changed:
        was = ", ".join(f"{k}={saved.to_dict()[k]!r}" for k in changed)
        raise ConfigError(f"resuming a run trained with {was}; start a new --out to change "
                          f"{changed}")
    return wanted


def check_teacher(recorded: dict | None, teacher_identity_now: dict, where: str) -> None:
    """Refuse a run whose recorded teacher (sha256) is not the cache's teacher now."""
    if recorded and recorded.get("sha256") != teacher_identity_now.get("sha256"):
        raise CheckpointError(f"{where} was trained with teacher {recorded.get('model')} "
                              f"sha256 {str(recorded.get('sha256'))[:12]}, the cache's is "
                              f"{teacher_identity_now.get('model')} sha256 "
                              f"{str(teacher_identity_now.get('sha256'))[:12]}; use that "
                              f"cache or retrain")


def setup_grounding(model: OpenVocabDetector, cfg: TrainConfig, args, dataset, cache_dir: Path,
                    info, resumed: dict | None, base_names: list[str]) -> dict:
    """Mode grounding: attach the cache's teacher (checked against a resumed run's) and
    find the grounding / pseudo-grounding files the ratios ask for. Returns {"base_names",
    "files": {kind: (json, images folder)}} (empty for the other modes)."""
    if cfg.mode != "grounding":
        return {"base_names": [], "files": {}}
    teacher = teacher_from_cache(DatasetCache(cache_dir), device=str(info.device),
                                 precision=cfg.precision)
    if resumed is not None:
        check_teacher(resumed.get("teacher"), teacher.identity, "the resumed run")
    model.attach_teacher(teacher)
    files = {}
    for kind, ratio in ((GROUNDING, cfg.grounding_ratio), (PSEUDO, cfg.pseudo_ratio)):
        if ratio > 0:
            files[kind] = grounding_files(dataset, cache_dir, kind,
                                          getattr(args, f"{kind}_file", None),
                                          getattr(args, f"{kind}_images", None))
    if info.is_main:
        print(f"grounding: teacher {teacher.identity.get('model')} "
              f"(context {model.context_length}, text encoder "
              f"{'trained' if cfg.train_text_encoder else 'frozen'}), "
              f"{cfg.grounding_negatives} negatives per prompt, fusion layers "
              f"{cfg.fusion_layers}" + "".join(f", {k} {p}" for k, (p, _) in files.items()))
    return {"base_names": list(base_names), "files": files}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovdistill.trainer.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(p, cache_help=f"cache root (holds <dataset>/{WDS}, {TEXT})", data_root=True,
                     device=True, device_help="auto | cpu | cuda | cuda:N (one process)")
    p.add_argument("--out", default="runs/toy", help="run folder")
    p.add_argument("--shards", default=None,
                   help="brace pattern of shards (local or pipe:); default: <cache>/<ds>/wds/")
    p.add_argument("--mode", choices=("text", "image", "vild", "grounding"), default=None)
    p.add_argument("--heads", choices=("shared", "separate"), default=None,
                   help="separate: text + image heads, for `trainer.evaluate --ensemble`")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="images per process")
    p.add_argument("--init-from", default=None,
                   help="checkpoint with backbone.* / rpn.* weights (e.g. the RPN stage's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one TrainConfig field (repeatable)")
    for kind in (GROUNDING, PSEUDO):
        p.add_argument(f"--{kind}-file", default=None,
                       help=f"MDETR-format json of the {kind} iterations (default: the "
                            f"{'grounding' if kind == GROUNDING else 'pseudo_boxes'} stage's)")
        p.add_argument(f"--{kind}-images", default=None,
                       help=f"folder the --{kind}-file file_names are relative to")
    p.add_argument("--resume", default=None, help="'latest' (= <out>/latest.pt) or a path")
    p.add_argument("--stop-at", type=int, default=None,
                   help="checkpoint and exit after this step (the schedule still ends at --steps)")
    return p


def train(args) -> int:
    info = distributed.setup(args.device)
    out = Path(args.out)
    dataset = load_manifest(args.manifest, cache_root=args.cache, data_root=args.data_root)
    cache_dir = Path(args.cache) / dataset.name
    resumed = None
    if args.resume:
        resumed = load_checkpoint(out / CHECKPOINT if args.resume == "latest" else args.resume)
    cfg = resolve_config(args, dataset, cache_dir, resumed)

    vocab = load_vocabulary(text_parquet_path(cache_dir, dataset.name),
                            expect_dim=resumed["embed_dim"] if resumed else None)
    urls = shard_urls(args.shards, cache_dir)
    check_shard_dim(urls[0], vocab)
    confident_only = cfg.distill_min_score > 0 or cfg.distill_top_k > 0
    if confident_only and info.is_main and not shard_has_scores(urls[0]):
        print(f"note: {urls[0]} has no .scores.npy (packed before it existed): every cached "
              f"proposal counts as confident; re-pack with `--stages pack --rebuild`")

    torch.manual_seed(cfg.seed)
    model = OpenVocabDetector(cfg, vocab.dim, detections_per_image(cfg, dataset.format))
    if cfg.init_from and resumed is None:
        loaded = load_init_weights(model, cfg.init_from)
        if info.is_main:
            print(f"initialised {loaded} from {cfg.init_from}")
    model.to(info.device)
    model.set_vocabulary(vocab.embeddings, vocab.is_base,
                         **vocabulary_extras(cfg, cache_dir, vocab.dim))
    pair_urls = pair_shard_urls(cache_dir) if cfg.pairs_ratio > 0 else []
    if pair_urls:
        check_pair_shard_dim(pair_urls[0], vocab.dim)
    # pairs_pseudo_weight > 0 needs pairs_ratio > 0 (TrainConfig), so pair_urls is not empty
    pseudo = (load_pseudo_boxes(DatasetCache(cache_dir).pseudo_grounding())
              if cfg.pairs_pseudo_weight > 0 else None)
    if pseudo is not None and info.is_main:
        print(f"pseudo-boxes: {sum(map(len, pseudo.values()))} kept boxes on {len(pseudo)} "
              f"pair images")
    dictionary = None  # Tensor[N, D] on the device: the dictionary negatives' pool
    if cfg.dictionary_negatives > 0:
        base_names = [n for n, b in zip(vocab.names, vocab.is_base.tolist()) if b]
        names, dictionary = load_dictionary_negatives(cache_dir, vocab.dim, base_names)
        dictionary = dictionary.to(info.device)
        if info.is_main:
            print(f"dictionary negatives: {min(cfg.dictionary_negatives, len(names))} of "
                  f"{len(names)} non-base concepts per detection iteration")
    grounding = setup_grounding(model, cfg, args, dataset, cache_dir, info, resumed,
                                [n for n, b in zip(vocab.names, vocab.is_base.tolist()) if b])
    optimizer, scheduler = build_optimizer(model, cfg)
    step = 0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        step = int(resumed["step"])
    ddp = model
    if info.world_size > 1:
        # a pair iteration leaves the RPN, the box regressor and the background unused
        ddp = DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=cfg.pairs_ratio > 0 or cfg.mode == "grounding")

    # a resumed stream is seeded by its start step, so it does not replay the first batches
    workers = resolve_workers(cfg, info.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    loader = train_loader(urls, cfg, vocab.dim, vocab.base_labels(), seed=cfg.seed + step,
                          pin_memory=info.device.type == "cuda", num_workers=workers)
    pairs_stream = (pair_loader(pair_urls, cfg, vocab.dim, seed=cfg.seed + step,
                                num_workers=workers, pin_memory=info.device.type == "cuda",
                                pseudo=pseudo)
                    if pair_urls else None)
    meta = {"embed_dim": vocab.dim, "dataset": dataset.name, "format": dataset.format,
            "vocabulary": {"path": vocab.path, "category_ids": list(vocab.category_ids),
                           "names": list(vocab.names)},
            "teacher": teacher_identity(cache_dir), "world_size": info.world_size}
    writer = metrics = None
    if info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"config": cfg.to_dict(), **meta},
                                                    indent=2) + "\n")
        writer = SummaryWriter(str(out / "tb"), purge_step=step + 1 if step else None)
        keep_metrics_until(out / "metrics.jsonl", step)
        metrics = open(out / "metrics.jsonl", "a")  # noqa: SIM115 - open for the whole loop
        pairs_note = (f", pairs {cfg.pairs_ratio:g} of the iterations from {len(pair_urls)} "
                      f"shards" if pair_urls else "")
        print(f"training mode={cfg.mode} heads={cfg.heads} steps={step}->{cfg.steps} "
              f"on {info.world_size} x {info.device} "
              f"({resolve_precision(cfg.precision, info.device)}), {len(urls)} shards, "
              f"D={vocab.dim}{pairs_note}")

    model.train()
    batches = iter(loader)
    pair_batches = iter(pairs_stream) if pairs_stream is not None else None
    streams = {kind: GroundingStream.from_file(
        path, images_dir, cfg, model.tokenize, model.max_tokens, model.context_length,
        seed=cfg.seed + step + (0 if kind == GROUNDING else 1), rank=info.rank,
        world_size=info.world_size) for kind, (path, images_dir) in grounding["files"].items()}
    if resumed is not None and "rng" in resumed:
        # the RPN and RoI proposal samplers draw on it; restored after iter(loader) (and the
        # pairs stream's), which take a seed from it
        set_rng_state(resumed["rng"], info.device)
    # logged sums stay on the device (float64) until a log step: no host sync per step;
    # each key is averaged over the iterations that added it, the skip counters summed
    sums: dict[str, torch.Tensor | float] = {}
    counts: dict[str, int] = {}

    def add(key: str, value) -> None:
        value = value.detach().double() if torch.is_tensor(value) else value
        sums[key] = sums.get(key, 0.0) + value
        counts[key] = counts.get(key, 0) + 1

    last = time.time()
    while step < cfg.steps:
        kind = iteration_kind(cfg.seed, step, cfg)
        pair_iteration = kind == PAIRS
        t_data = time.time()
        if pair_iteration:
            images, targets, skipped = next(pair_batches)
            images, targets = to_device(images, targets, info.device)
            forward = {"pairs": True}
        elif kind in streams:  # grounding or pseudo-grounding data: captions as prompts
            images, targets, prompts, n_skipped = next(streams[kind])
            images, targets = to_device(images, targets, info.device)
            forward = {"prompts": prompts}
        else:
            images, targets = to_device(*next(batches), info.device)
            forward = {}
            if cfg.mode == "grounding":
                forward["prompts"] = detection_prompt_targets(
                    [t["labels"] for t in targets], grounding["base_names"], cfg.seed, step,
                    cfg.grounding_negatives, model.max_tokens, model.tokenize,
                    model.context_length, cfg.grounding_train_names)
            if dictionary is not None:
                rows = sample_negatives(len(dictionary), cfg.dictionary_negatives, cfg.seed,
                                        step)
                forward["extra_negatives"] = dictionary[rows]
        t_data = time.time() - t_data
        losses, loss, grad_norm, lr = train_step(ddp, model, optimizer, scheduler, images,
                                                 targets, cfg, info.device, **forward)
        step += 1

        for k, v in losses.items():
            add(k, v)
        add("loss", loss)
        if "loss_image" in losses:  # what loss_image must beat to be more than the mean
            teacher = model.cached_targets(targets)[1]  # the (masked, centred) targets
            add("image_mean_baseline", mean_direction_baseline(teacher, cfg.image_loss_weight))
        if pair_iteration:
            for k in SKIP_KEYS:  # summed on logging: every rank adds the same keys
                add(k, skipped[k])
        if kind in streams:
            add(GROUNDING_SKIPPED, n_skipped)
        add("grad_norm", grad_norm)
        add("data_sec", t_data)
        add("n", 1)
        add("images", len(images))
        if step % cfg.log_every == 0 or step == cfg.steps:
            n, n_images = sums.pop("n"), sums.pop("images")
            row = {k: float(v) if k in SUMMED_KEYS else float(v) / counts[k]
                   for k, v in sums.items()}
            row = distributed.mean_across(row, info)
            for k in SUMMED_KEYS:
                if k in row:
                    row[k] = round(row[k] * info.world_size)  # summed over the ranks
            now = time.time()
            row.update(step=step, lr=lr, sec_per_step=(now - last) / n,
                       images_per_sec=float(n_images) * info.world_size / (now - last))
            last, sums, counts = now, {}, {}
            if info.is_main:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                for k, v in row.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, step)
                print(f"step {step:>6}/{cfg.steps} loss {row['loss']:.4f} lr {lr:.2e} "
                      f"{row['sec_per_step']:.2f}s/step", flush=True)
        stop = args.stop_at is not None and step >= args.stop_at
        if info.is_main and (step % cfg.ckpt_every == 0 or step == cfg.steps or stop):
            save_checkpoint(out / CHECKPOINT, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "config": cfg.to_dict(),
                "rng": rng_state(info.device), **meta})
        if stop:
            break
    if info.is_main:
        metrics.close()
        writer.close()
        print(f"done at step {step}: {out / CHECKPOINT}")
    distributed.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return train(args)
    except OvdError as e:
        distributed.cleanup()
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
