"""`python -m ovdistill.trainer.probe`: a head-only proxy, so that each distillation idea costs minutes.

The backbone and RPN are frozen at the cache's RPN-stage checkpoint (the weights every
training run starts from; --init-from takes another, e.g. a trainer run's latest.pt). Their 7x7 RoI features are extracted once, at the test size, and
saved to <out>/features.pt; later invocations reuse that file while its metadata (cache,
checkpoint, shards, answer key, image counts, sizes) still matches, else extract again.

    cached  the CACHED proposals of --images train images and their teacher embeddings
            (the ViLD-image targets); their RPN scores where the shards hold .scores.npy
    live    the frozen RPN's proposals of the same images, sampled as RoIHeads samples them
            (box_batch_size_per_image, box_positive_fraction, GT boxes added) and labelled
            by IoU >= 0.5 with the image's BASE ground truth (the shard's .json)
    held    the ground-truth boxes of --heldout OTHER train images, every object, novel too,
            from the answer key `dataset/train_full.json` (never the val split: settings are
            chosen with this probe), each with the teacher embedding of the cached proposal
            that overlaps it best (IoU >= 0.5; a box without one is left out of the cosine
            and the teacher's accuracy only)

Then a fresh region-embedding head (`EmbeddingTower`, a second one for --heads separate) and
a learned background embedding train with Adam on minibatches of those features, with the
trainer's own loss functions: ViLD-text on the live samples (`--mode text|vild`; image mode:
the class-agnostic foreground loss), ViLD-image L1 on the cached ones (`--mode image|vild`),
and the remedies of `TrainConfig`: --contrastive-weight, --center-targets,
--negative-prompts, --min-score / --top-k.

The report, printed and appended to <out>/probe.json (one entry per invocation), gives on the
held-out boxes: accuracy over ALL vocabulary texts (argmax of cosine; for --heads separate
the image head, the text head and the ViLD-ensemble), base and novel; the share of the class
predicted most (a collapse shows as one class far above 1 / C); the mean cosine of the
distilled head to the teacher; the final loss_image over the mean-direction baseline on the
cached targets (1.0 = only the teacher's common direction learned); the teacher's own
accuracy on the same boxes, the ceiling. With --center-targets the texts, targets and
teacher are all compared in the centred space.

    python -m ovdistill.trainer.probe --manifest data_manifests/toy.yaml --cache cache --out runs/probe \\
        --mode vild [--heads separate] [--images 300] [--heldout 200] [--steps 2500]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ovdistill.pipeline.annotations import AnnotationError
from ovdistill.pipeline.cache import atomic_write_bytes, sha256_file, tmp_path
from ovdistill.pipeline.errors import OvdError
from ovdistill.pipeline.errors import report as report_error
from ovdistill.pipeline.layout import DATASET, TRAIN_FULL, WDS, DatasetCache
from ovdistill.pipeline.manifests import load_manifest
from ovdistill.pipeline.optim import check_finite, warmup_cosine
from ovdistill.pipeline.options import add_data_options
from ovdistill.pipeline.precision import resolve_device
from ovdistill.trainer.config import HEADS, MODES, ConfigError, TrainConfig, make_config, parse_set
from ovdistill.trainer.data import SampleError, decode_sample, resize_for_test
from ovdistill.trainer.diagnose import gt_by_image
from ovdistill.trainer.inputs import (
    CacheMismatch,
    Vocabulary,
    check_shard_dim,
    load_negatives,
    load_region_mean,
    load_vocabulary,
    shard_urls,
    text_parquet_path,
)
from ovdistill.trainer.losses import (
    center_embeddings,
    confident_mask,
    contrastive_distill_loss,
    foreground_loss,
    mean_direction_baseline,
    region_logits,
    vild_image_loss,
    vild_text_loss_with_aliases,
)
from ovdistill.trainer.model import (
    EmbeddingTower,
    OpenVocabDetector,
    batch_images,
    ensemble_scores,
    load_init_weights,
    read_init_checkpoint,
)
from torch import Tensor, nn
from torchvision.ops import box_iou

FEATURES_FILE = "features.pt"
RESULTS_FILE = "probe.json"
FEATURES_VERSION = 1
LIVE_SAMPLING_SEED = 0  # the live samples are part of the features, not of a probe run


@dataclass(frozen=True)
class ProbeConfig:
    # what is trained (the TrainConfig names, in brackets, where they differ)
    mode: str = "vild"  # text | image | vild
    heads: str = "shared"  # separate: a text head and an image head (needs mode=vild)
    temperature: float = 0.01
    image_loss_weight: float = 0.5
    contrastive_weight: float = 0.0
    contrastive_tau: float = 0.07
    center_targets: bool = False
    negative_prompts: bool = False
    min_score: float = 0.0  # (distill_min_score)
    top_k: int = 0  # (distill_top_k)
    # the head-only optimisation
    steps: int = 2500
    batch_size: int = 128  # live samples and cached proposals per step, each
    lr: float = 1e-3  # Adam, cosine decay to 0
    seed: int = 0
    # the features
    images: int = 300  # train images for the cached and live sets
    heldout: int = 200  # other train images whose GT boxes score the head
    iou: float = 0.5  # held-out box <-> cached proposal, for the teacher's embedding

    def validate(self) -> ProbeConfig:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.heads not in HEADS:
            raise ConfigError(f"heads must be one of {HEADS}, got {self.heads!r}")
        if self.heads == "separate" and self.mode != "vild":
            raise ConfigError(f"heads=separate trains a text head and an image head; it needs "
                              f"mode=vild (got mode={self.mode!r})")
        for key in ("steps", "batch_size", "images", "heldout"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("temperature", "contrastive_tau", "lr"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("image_loss_weight", "contrastive_weight", "top_k"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.min_score <= 1.0:
            raise ConfigError(f"min_score is an RPN score threshold in [0, 1], got "
                              f"{self.min_score}")
        if not 0.0 < self.iou <= 1.0:
            raise ConfigError(f"iou must be in (0, 1], got {self.iou}")
        return self

    @property
    def distils(self) -> bool:
        """Whether the cached proposals train the head (modes image and vild)."""
        return self.mode in ("image", "vild")

    def variant(self) -> str:
        """A short name of the run: mode/heads plus every setting off its default."""
        default = ProbeConfig()
        parts = [f"{self.mode}/{self.heads}"]
        for f in dataclasses.fields(self):
            if f.name in ("mode", "heads", "images", "heldout", "iou"):
                continue
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                parts.append(f"{f.name}={value}")
        return " ".join(parts)


TRAIN_NAMES = {"min_score": "distill_min_score", "top_k": "distill_top_k"}


def probe_config(train: TrainConfig, overrides: dict) -> ProbeConfig:
    """A ProbeConfig whose loss settings default to `train`'s (the manifest's trainer block)
    and whose other fields to ProbeConfig's; `overrides` (None values ignored) win."""
    inherited = {f.name: getattr(train, TRAIN_NAMES.get(f.name, f.name))
                 for f in dataclasses.fields(ProbeConfig)
                 if f.name not in ("steps", "batch_size", "lr", "seed")
                 and hasattr(train, TRAIN_NAMES.get(f.name, f.name))}
    given = {k: v for k, v in overrides.items() if v is not None}
    return ProbeConfig(**{**inherited, **given}).validate()


# ----------------------------------------------------------------------------- features


def plan_images(stream_ids: list[int], n_train: int, n_heldout: int,
                answer_key: set[int]) -> tuple[list[int], list[int]]:
    """Which train images feed the head and which score it.

    stream_ids: image ids in shard order. The first `n_train` are the training images; the
    held-out ones are the next `n_heldout` that the answer key names. Returns (train ids,
    held-out ids), disjoint by construction.
    """
    train = list(stream_ids[:n_train])
    taken = set(train)
    heldout = []
    for i in stream_ids[n_train:]:
        if len(heldout) >= n_heldout:
            break
        if i in answer_key and i not in taken:
            heldout.append(i)
            taken.add(i)
    return train, heldout


def teacher_for_boxes(gt_boxes: Tensor, cached_boxes: Tensor, cached_emb: Tensor,
                      iou: float) -> tuple[Tensor, Tensor]:
    """The teacher's embedding of each GT box: that of the cached proposal overlapping it best.

    gt_boxes: Tensor[G, 4]; cached_boxes: Tensor[M, 4] (x1, y1, x2, y2, same pixels);
    cached_emb: Tensor[M, D]. Returns (Tensor[G, D] float32, Tensor[G] bool: best IoU >= iou;
    rows without a match are zero).
    """
    g, d = gt_boxes.shape[0], cached_emb.shape[1]
    if g == 0 or cached_boxes.shape[0] == 0:
        return torch.zeros(g, d), torch.zeros(g, dtype=torch.bool)
    best, j = box_iou(gt_boxes.float(), cached_boxes.float()).max(1)
    has = best >= iou
    emb = cached_emb[j].float() * has[:, None]
    return emb, has


@torch.no_grad()
def image_features(model: OpenVocabDetector, image: Tensor, cached_boxes: Tensor,
                   gt_boxes: Tensor, gt_labels: Tensor, heldout_boxes: Tensor | None
                   ) -> dict[str, Tensor]:
    """The frozen model's RoI features of one image at the test size.

    image: Tensor[3, H, W] uint8; cached_boxes: Tensor[M, 4], gt_boxes: Tensor[G, 4] (base GT)
    and heldout_boxes: Tensor[K, 4] in its pixels; gt_labels: Tensor[G] int64 in [1, B].
    Returns {"cached": Tensor[M, C, 7, 7], "live": Tensor[S, C, 7, 7], "live_labels":
    Tensor[S] in [0, B]} (the RPN's proposals sampled as RoIHeads samples them), or with
    `heldout_boxes` only {"heldout": Tensor[K, C, 7, 7]}.
    """
    x, scale = resize_for_test(image, model.cfg.test_size, model.cfg.max_size)
    batch = batch_images([x])
    features = model.backbone(batch.tensors)
    pool = model.roi_heads.box_roi_pool
    if heldout_boxes is not None:
        return {"heldout": pool(features, [heldout_boxes * scale], batch.image_sizes)}
    proposals, _ = model.rpn(batch, features)
    target = [{"boxes": gt_boxes * scale, "labels": gt_labels}]
    sampled, _, labels, _ = model.roi_heads.select_training_samples(proposals, target)
    return {"cached": pool(features, [cached_boxes * scale], batch.image_sizes),
            "live": pool(features, sampled, batch.image_sizes), "live_labels": labels[0]}


def _samples(urls: list[str]):
    import webdataset as wds

    return wds.WebDataset(urls, shardshuffle=False, empty_check=False)


def stream_image_ids(urls: list[str]) -> list[int]:
    """Image ids of the shards' samples, in shard order (reads only their .json)."""
    ids = []
    for sample in _samples(urls):
        try:
            ids.append(int(json.loads(sample["json"])["image_id"]))
        except (KeyError, ValueError) as e:
            print(f"reject: {sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}: "
                  f"no image id ({e})", file=sys.stderr)
    return ids


def extract_features(model: OpenVocabDetector, vocab: Vocabulary, urls: list[str],
                     answer: dict[int, tuple], cfg: ProbeConfig) -> dict:
    """Stream the shards once and collect the cached, live and held-out features (float16).

    answer: image id -> (GT boxes float32 [G, 4], vocabulary indices [G]), every object.
    Returns the dict `save_features` writes (tensors + "train_ids" / "heldout_ids").
    """
    train_ids, heldout_ids = plan_images(stream_image_ids(urls), cfg.images, cfg.heldout,
                                         set(answer))
    role = {**{i: "train" for i in train_ids}, **{i: "heldout" for i in heldout_ids}}
    index = {i: k for k, i in enumerate(train_ids)}
    labels = vocab.base_labels()
    out: dict[str, list] = {k: [] for k in (
        "cached", "cached_emb", "cached_image", "cached_score", "live", "live_labels",
        "heldout", "heldout_labels", "heldout_teacher", "heldout_has_teacher")}
    has_scores, done = True, set()
    torch.manual_seed(LIVE_SAMPLING_SEED)
    for sample in _samples(urls):
        try:
            meta = json.loads(sample["json"])
            iid = int(meta["image_id"])
        except (KeyError, ValueError):
            continue
        if iid not in role or iid in done:
            continue
        try:
            s = decode_sample(sample, vocab.dim, labels, model.cfg.cached_per_image)
        except SampleError as e:
            print(f"reject: {e}", file=sys.stderr)
            continue
        done.add(iid)
        emb = s["cached_emb"].float()
        if role[iid] == "train":
            f = image_features(model, s["image"], s["cached_boxes"], s["gt_boxes"],
                               s["labels"], None)
            m = len(s["cached_boxes"])
            out["cached"].append(f["cached"].half())
            out["cached_emb"].append(emb.half())
            out["cached_image"].append(torch.full((m,), index[iid], dtype=torch.int64))
            has_scores = has_scores and "scores.npy" in sample  # else decode gives ones
            out["cached_score"].append(s["cached_scores"])
            out["live"].append(f["live"].half())
            out["live_labels"].append(f["live_labels"])
        else:
            boxes, lab = answer[iid]
            boxes = torch.from_numpy(boxes)
            f = image_features(model, s["image"], s["cached_boxes"], s["gt_boxes"],
                               s["labels"], boxes)
            t, has = teacher_for_boxes(boxes, s["cached_boxes"], emb, cfg.iou)
            out["heldout"].append(f["heldout"].half())
            out["heldout_labels"].append(torch.from_numpy(np.asarray(lab, np.int64)))
            out["heldout_teacher"].append(F.normalize(t, dim=-1).half())
            out["heldout_has_teacher"].append(has)
        if len(done) == len(role):
            break
    if not out["cached"]:
        raise CacheMismatch("no training image could be read from the shards")
    if not out["heldout"]:
        raise CacheMismatch("no held-out image: the shards hold no image of the answer key "
                            "beyond the --images training ones (lower --images)")
    tensors = {k: torch.cat(v) for k, v in out.items() if v and k != "cached_score"}
    tensors["cached_score"] = (torch.cat(out["cached_score"]) if has_scores
                               else torch.zeros(0))
    tensors["train_ids"] = torch.tensor([i for i in train_ids if i in done])
    tensors["heldout_ids"] = torch.tensor([i for i in heldout_ids if i in done])
    return tensors


def save_features(path: Path, tensors: dict, meta: dict) -> None:
    """torch.save({"meta": meta, **tensors}) to a temporary sibling, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        torch.save({"meta": meta, **tensors}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_features(path: Path, meta: dict) -> dict | None:
    """The saved features when their metadata equals `meta`; None (saying why) otherwise."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        print(f"note: {path}: unreadable ({str(e).splitlines()[0] if str(e) else e}); "
              f"extracting again", file=sys.stderr)
        return None
    saved = blob.get("meta", {}) if isinstance(blob, dict) else {}
    differ = sorted(k for k in set(saved) | set(meta) if saved.get(k) != meta.get(k))
    if differ:
        print(f"note: {path} was extracted with other {differ}; extracting again",
              file=sys.stderr)
        return None
    return blob


def features_meta(cache_dir: Path, cfg: ProbeConfig, train: TrainConfig, urls: list[str],
                  gt_path: Path, dim: int) -> dict:
    """What the features depend on: equal metadata = reusable features."""
    wds_record = DatasetCache(cache_dir).manifest_path(WDS)
    shards = (sha256_file(wds_record) if wds_record.exists()
              else [[u, Path(u).stat().st_size if Path(u).exists() else None] for u in urls])
    return {"version": FEATURES_VERSION, "cache": str(Path(cache_dir).resolve()),
            "shards": shards, "init_from": str(Path(train.init_from).resolve()),
            "init_sha256": sha256_file(Path(train.init_from)),
            "answer_key_sha256": sha256_file(gt_path), "embed_dim": dim,
            "images": cfg.images, "heldout": cfg.heldout, "iou": cfg.iou,
            "live_sampling_seed": LIVE_SAMPLING_SEED,
            **{k: getattr(train, k) for k in (
                "test_size", "max_size", "cached_per_image", "box_batch_size_per_image",
                "box_positive_fraction", "roi_sampling_ratio", "backbone", "returned_layers",
                "anchor_sizes", "norm", "rpn_pre_nms_test", "rpn_post_nms_test", "rpn_nms")}}


# ----------------------------------------------------------------------------- the head


class Heads(nn.Module):
    """The trainable part of the probe: the text tower (also the image tower when shared),
    an image tower for heads=separate, and the background embedding."""

    def __init__(self, in_features: int, representation_size: int, embed_dim: int,
                 separate: bool):
        super().__init__()
        self.text_tower = EmbeddingTower(in_features, representation_size, embed_dim)
        self.image_tower = (EmbeddingTower(in_features, representation_size, embed_dim)
                            if separate else None)
        self.bg_embedding = nn.Parameter(F.normalize(torch.randn(embed_dim), dim=0))

    def text(self, roi: Tensor) -> Tensor:
        """roi: Tensor[N, C, 7, 7] -> Tensor[N, D] from the text tower."""
        return self.text_tower(roi.float())[1]

    def image(self, roi: Tensor) -> Tensor:
        """roi: Tensor[N, C, 7, 7] -> Tensor[N, D] from the image tower (the shared one)."""
        tower = self.image_tower if self.image_tower is not None else self.text_tower
        return tower(roi.float())[1]


def probe_losses(heads: Heads, cfg: ProbeConfig, live: Tensor, live_labels: Tensor,
                 cached: Tensor, target: Tensor, base_text: Tensor,
                 negatives: Tensor | None = None) -> dict[str, Tensor]:
    """The trainer's losses on one minibatch of features (as `OpenVocabDetector.forward`).

    live: Tensor[S, C, 7, 7] with live_labels Tensor[S] in [0, B]; cached: Tensor[M, C, 7, 7]
    with target Tensor[M, D] (the teacher embeddings, centred if the run centres);
    base_text: Tensor[B, D]; negatives: Tensor[K, D] background aliases in the
    ViLD-text classifier (not of the image-mode foreground loss), or None.
    """
    losses = {}
    region = heads.text(live)
    if cfg.mode == "image":
        logits = region_logits(region, heads.bg_embedding, base_text, cfg.temperature)
        losses["loss_foreground"] = foreground_loss(logits, live_labels)
    else:
        classifier = base_text if negatives is None else torch.cat([base_text, negatives])
        logits = region_logits(region, heads.bg_embedding, classifier, cfg.temperature)
        losses["loss_text"] = vild_text_loss_with_aliases(
            logits, live_labels, classifier.shape[0] - base_text.shape[0])
    if cfg.distils:
        emb = heads.image(cached)
        losses["loss_image"] = vild_image_loss(emb, target, cfg.image_loss_weight)
        if cfg.contrastive_weight > 0:
            losses["loss_contrastive"] = cfg.contrastive_weight * contrastive_distill_loss(
                emb, target, cfg.contrastive_tau)
    return losses


def train_heads(cfg: ProbeConfig, live: Tensor, live_labels: Tensor, cached: Tensor,
                target: Tensor, base_text: Tensor, representation_size: int,
                negatives: Tensor | None = None, device: torch.device | None = None,
                log_every: int = 0) -> tuple[Heads, dict[str, float]]:
    """Adam on random minibatches of the features for cfg.steps steps.

    live: Tensor[S, C, 7, 7], live_labels: Tensor[S]; cached: Tensor[M, C, 7, 7] and target:
    Tensor[M, D] (the cached proposals to distil, already filtered); base_text: Tensor[B, D];
    negatives: Tensor[K, D] or None (see `probe_losses`). Returns (the trained heads in eval
    mode, each loss averaged over the last 10 % of steps).
    """
    device = device or torch.device("cpu")
    torch.manual_seed(cfg.seed)
    in_features = int(np.prod(live.shape[1:]))
    heads = Heads(in_features, representation_size, base_text.shape[1],
                  cfg.heads == "separate").to(device)
    opt = torch.optim.Adam(heads.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, 0, cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    base_text = base_text.float().to(device)
    if negatives is not None:
        negatives = negatives.float().to(device)
    tail = max(1, cfg.steps // 10)
    sums: dict[str, float] = {}
    heads.train()
    for step in range(cfg.steps):
        li = torch.randint(len(live), (min(cfg.batch_size, len(live)),), generator=gen)
        if cfg.distils and len(cached):
            ci = torch.randint(len(cached), (min(cfg.batch_size, len(cached)),), generator=gen)
        else:
            ci = torch.zeros(0, dtype=torch.int64)
        losses = probe_losses(heads, cfg, live[li].to(device), live_labels[li].to(device),
                              cached[ci].to(device), target[ci].float().to(device), base_text,
                              negatives)
        loss = sum(losses.values())
        check_finite(loss, lambda: f"probe loss is {loss.item()} at step {step}")  # noqa: B023
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= cfg.steps - tail:
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / tail
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1:>6}/{cfg.steps} " + " ".join(
                f"{k} {float(v.detach()):.4f}" for k, v in losses.items()), flush=True)
    return heads.eval(), {k: round(v, 4) for k, v in sums.items()}


@torch.no_grad()
def embed(fn, roi: Tensor, device: torch.device, chunk: int = 2048) -> Tensor:
    """fn over roi Tensor[N, C, 7, 7] in chunks -> Tensor[N, D] on the CPU."""
    if len(roi) == 0:
        return torch.zeros(0, 0)
    return torch.cat([fn(roi[i:i + chunk].to(device)).cpu() for i in range(0, len(roi), chunk)])


# ----------------------------------------------------------------------------- the report


def accuracy_report(pred: Tensor, labels: Tensor, is_base: Tensor, names: list[str]) -> dict:
    """pred, labels: Tensor[N] int64 vocabulary indices; is_base: Tensor[C] bool.

    Returns {"acc_base", "acc_novel", "acc_all" (None for an empty subset), "n_base",
    "n_novel", "top" (the class predicted most), "top_share" (its share of the N
    predictions; 1 / C when every class is predicted equally)}.
    """
    out: dict = {}
    base = is_base[labels]
    for key, mask in (("base", base), ("novel", ~base), ("all", torch.ones_like(base))):
        n = int(mask.sum())
        out[f"acc_{key}"] = (round(float((pred[mask] == labels[mask]).float().mean()), 4)
                             if n else None)
        if key != "all":
            out[f"n_{key}"] = n
    if len(pred):
        counts = torch.bincount(pred, minlength=len(names))
        out["top"], out["top_share"] = names[int(counts.argmax())], round(
            float(counts.max()) / len(pred), 4)
    else:
        out["top"], out["top_share"] = None, None
    return out


def cosine_report(student: Tensor, teacher: Tensor, has: Tensor, labels: Tensor,
                  is_base: Tensor) -> dict:
    """Mean cosine student-teacher over the boxes that have a teacher embedding.

    student, teacher: Tensor[N, D] L2-normalized; has: Tensor[N] bool; labels: Tensor[N]
    vocabulary indices; is_base: Tensor[C]. Returns {"all", "base", "novel", "n"} (None for an
    empty subset).
    """
    cos = (student.float() * teacher.float()).sum(1)
    base = is_base[labels]
    out: dict = {"n": int(has.sum())}
    for key, mask in (("all", has), ("base", has & base), ("novel", has & ~base)):
        out[key] = round(float(cos[mask].mean()), 4) if bool(mask.any()) else None
    return out


def image_fit(student: Tensor, target: Tensor, weight: float) -> dict:
    """loss_image of the student embeddings Tensor[M, D] on targets Tensor[M, D] against the
    mean-direction baseline (`losses.mean_direction_baseline`), both at `weight` (1.0 when it
    is 0, a contrastive-only run); ratio 1.0 = no better than the common direction."""
    w = weight if weight > 0 else 1.0  # the ratio does not depend on the weight
    if len(target) == 0:
        return {"loss_image": None, "baseline": None, "ratio": None, "weight": w}
    loss = float(vild_image_loss(student.float(), target.float(), w))
    base = float(mean_direction_baseline(target.float(), w))
    return {"loss_image": round(loss, 4), "baseline": round(base, 4),
            "ratio": round(loss / base, 4) if base > 0 else None, "weight": w}


def head_predictions(text_emb: Tensor, image_emb: Tensor | None, bg: Tensor, text: Tensor,
                     is_base: Tensor, tau: float) -> dict[str, Tensor]:
    """Predicted vocabulary index per box, per head: argmax of cosine to the texts.

    text_emb: Tensor[N, D] of the text (or shared) head; image_emb: Tensor[N, D] of the image
    head for heads=separate, else None; bg: Tensor[D]; text: Tensor[C, D] (all classes).
    Returns {"shared": Tensor[N]} or {"text", "image", "ensemble"}: the ensemble takes
    p_text = softmax over [bg, classes] without the bg column and p_image = softmax over the
    classes (`model.ensemble_scores`).
    """
    if image_emb is None:
        return {"shared": (text_emb @ text.t()).argmax(1)}
    p_text = region_logits(text_emb, bg, text, tau).softmax(-1)[:, 1:]
    p_image = (image_emb @ text.t() / tau).softmax(-1)
    return {"text": (text_emb @ text.t()).argmax(1), "image": (image_emb @ text.t()).argmax(1),
            "ensemble": ensemble_scores(p_text, p_image, is_base).argmax(1)}


# ----------------------------------------------------------------------------- run


def confident_rows(scores: Tensor, image: Tensor, min_score: float, top_k: int) -> Tensor:
    """`losses.confident_mask` image by image (top_k is a per-image cap).

    scores: Tensor[M] RPN scores of the cached proposals; image: Tensor[M] int64, the image
    each belongs to. Returns Tensor[M] bool.
    """
    keep = torch.zeros(len(scores), dtype=torch.bool)
    for i in image.unique().tolist():
        rows = (image == i).nonzero().flatten()
        keep[rows] = confident_mask(scores[rows], min_score, top_k)
    return keep


def region_mean(cache_dir: Path, cached_emb: Tensor, dim: int) -> tuple[Tensor, str]:
    """The mean the run centres by, normalized: `<cache>/<ds>/text/region_mean.npy`
    (`inputs.load_region_mean`) when the cache has it, else the mean of the extracted cached
    teacher embeddings Tensor[M, D]. Returns (Tensor[D], where it came from)."""
    path = DatasetCache(cache_dir).region_mean()
    if path.exists():
        return F.normalize(load_region_mean(cache_dir, dim), dim=0), str(path)
    return F.normalize(cached_emb.float().mean(0), dim=0), "the extracted cached embeddings"


ARCH_KEYS = ("backbone", "returned_layers", "anchor_sizes", "norm")


def init_overrides(overrides: dict, cache_dir: Path) -> dict:
    """`train.with_init_weights`, and for a trainer run's checkpoint (it holds its "config")
    that run's backbone keys, so a trained student's backbone can be probed as well."""
    from ovdistill.trainer.train import with_init_weights

    if not overrides.get("init_from"):
        raise ConfigError("the probe needs a backbone: --init-from rpn or a checkpoint path")
    overrides = with_init_weights(overrides, cache_dir)
    blob = read_init_checkpoint(overrides["init_from"])
    saved = blob.get("config") if isinstance(blob, dict) else None
    if isinstance(saved, dict) and "arch" not in blob:
        overrides.update({k: saved[k] for k in ARCH_KEYS if k in saved})
    return overrides


def build_frozen_model(train: TrainConfig, dim: int) -> OpenVocabDetector:
    model = OpenVocabDetector(train, dim)
    load_init_weights(model, train.init_from)
    return model.eval().requires_grad_(False)


def evaluate_heads(heads: Heads, cfg: ProbeConfig, feats: dict, text: Tensor, is_base: Tensor,
                   names: list[str], cached: Tensor, target: Tensor, center: Tensor | None,
                   device: torch.device) -> dict:
    """The report of one trained head on the held-out boxes (see the module docstring)."""
    roi, labels = feats["heldout"], feats["heldout_labels"]
    teacher, has = feats["heldout_teacher"].float(), feats["heldout_has_teacher"]
    if center is not None:
        teacher = center_embeddings(teacher, center) * has[:, None]
    s_text = embed(heads.text, roi, device)
    s_image = embed(heads.image, roi, device) if heads.image_tower is not None else None
    preds = head_predictions(s_text, s_image, heads.bg_embedding.detach().cpu().float(), text,
                             is_base, cfg.temperature)
    report = {name: accuracy_report(p, labels, is_base, names) for name, p in preds.items()}
    t_pred = (teacher @ text.t()).argmax(1)
    report["teacher"] = accuracy_report(t_pred[has], labels[has], is_base, names)
    distilled = s_image if s_image is not None else s_text
    return {"heads": report,
            "cos_teacher": cosine_report(distilled, teacher, has, labels, is_base),
            "image_fit": image_fit(embed(heads.image, cached, device), target,
                                   cfg.image_loss_weight)}


def run(args) -> dict:
    t0 = time.time()
    dataset = load_manifest(args.manifest, cache_root=args.cache)
    cache_dir = Path(args.cache) / dataset.name
    overrides = {**dataset.trainer, **parse_set(args.set), "init_from": args.init_from}
    train = make_config(init_overrides(overrides, cache_dir))
    cfg = probe_config(train, {k: getattr(args, k) for k in (
        "mode", "heads", "temperature", "image_loss_weight", "contrastive_weight",
        "center_targets", "negative_prompts", "min_score", "top_k", "steps", "batch_size",
        "lr", "seed", "images", "heldout")})
    device = torch.device(resolve_device(args.device))
    vocab = load_vocabulary(text_parquet_path(cache_dir, dataset.name))
    urls = shard_urls(args.shards, cache_dir)
    check_shard_dim(urls[0], vocab)
    gt_path = Path(args.gt) if args.gt else DatasetCache(cache_dir).train_full()
    if not gt_path.is_file():
        raise AnnotationError(f"{gt_path}: no answer key naming every object of the train "
                                f"images (pass --gt)")

    negatives = (F.normalize(load_negatives(cache_dir, vocab.dim), dim=-1)
                 if cfg.negative_prompts else None)

    out = Path(args.out)
    path = out / FEATURES_FILE
    meta = features_meta(cache_dir, cfg, train, urls, gt_path, vocab.dim)
    feats = load_features(path, meta)
    extract_seconds = None
    if feats is None:
        t = time.time()
        model = build_frozen_model(train, vocab.dim)
        answer = gt_by_image(gt_path, {c: i for i, c in enumerate(vocab.category_ids)})
        feats = extract_features(model, vocab, urls, answer, cfg)
        del model
        save_features(path, feats, meta)
        extract_seconds = round(time.time() - t, 1)
        print(f"extracted features of {len(feats['train_ids'])} + {len(feats['heldout_ids'])} "
              f"images in {extract_seconds} s -> {path}")
    else:
        print(f"reusing {path}")
    overlap = set(feats["train_ids"].tolist()) & set(feats["heldout_ids"].tolist())
    if overlap:  # cannot happen with plan_images; a hand-edited file would be caught here
        raise CacheMismatch(f"{path}: held-out images {sorted(overlap)[:5]} are training images")

    # what this run distils: the confident cached proposals, centred targets and texts
    cached, target = feats["cached"], feats["cached_emb"].float()
    notes = []
    if cfg.min_score > 0 or cfg.top_k > 0:
        scores = feats["cached_score"]
        if len(scores) != len(cached):
            notes.append("confident filter skipped: the shards hold no .scores.npy")
            print(f"note: {notes[-1]}", file=sys.stderr)
        else:
            keep = confident_rows(scores, feats["cached_image"], cfg.min_score, cfg.top_k)
            cached, target = cached[keep], target[keep]
            notes.append(f"confident filter kept {int(keep.sum())} of {len(keep)} cached")
    text = vocab.embeddings.float()
    center = None
    if cfg.center_targets:
        center, source = region_mean(cache_dir, feats["cached_emb"], vocab.dim)
        notes.append(f"centred by {source}")
        target, text = center_embeddings(target, center), center_embeddings(text, center)
    if negatives is not None:
        if center is not None:
            negatives = center_embeddings(negatives, center)
        notes.append(f"{len(negatives)} negative prompts in the ViLD-text classifier")

    t_train = time.time()
    heads, final = train_heads(cfg, feats["live"], feats["live_labels"], cached, target,
                               text[vocab.is_base], train.representation_size, negatives,
                               device, log_every=args.log_every)
    train_seconds = time.time() - t_train
    report = evaluate_heads(heads, cfg, feats, text, vocab.is_base, list(vocab.names),
                            cached, target, center, device)
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "variant": cfg.variant(),
        "settings": dataclasses.asdict(cfg), "dataset": dataset.name,
        "n_classes": len(vocab.names), "notes": notes, **report, "final_losses": final,
        "features": {"file": str(path), "train_images": len(feats["train_ids"]),
                     "heldout_images": len(feats["heldout_ids"]),
                     "n_cached": len(feats["cached"]), "n_distilled": len(cached),
                     "n_live": len(feats["live"]),
                     "n_live_foreground": int((feats["live_labels"] > 0).sum()),
                     "n_heldout_boxes": len(feats["heldout"]),
                     "extract_seconds": extract_seconds},
        "train_seconds": round(train_seconds, 1), "seconds": round(time.time() - t0, 1),
    }
    results = out / RESULTS_FILE
    history = json.loads(results.read_text()) if results.exists() else []
    history.append(entry)
    atomic_write_bytes(results, (json.dumps(history, indent=2) + "\n").encode())
    return {"entry": entry, "history": history}


def _pct(v) -> str:
    return "    –" if v is None else f"{100 * v:5.1f}"


def format_entry(e: dict) -> str:
    """The table of one probe run."""
    f = e["features"]
    lines = [(f"probe {e['variant']}  ({f['train_images']} train / {f['heldout_images']} "
              f"held-out images, {f['n_heldout_boxes']} boxes, {e['n_classes']} classes: "
              f"1/C = {100 / e['n_classes']:.1f} %)")]
    lines += [f"  note: {n}" for n in e["notes"]]
    lines.append(f"{'head':<10} {'acc base':>9} {'acc novel':>10} {'acc all':>8}  "
                 f"top class (share)")
    for name, r in e["heads"].items():
        top = f"{r['top']} ({_pct(r['top_share']).strip()} %)" if r["top"] else "–"
        lines.append(f"{name:<10} {_pct(r['acc_base']):>9} {_pct(r['acc_novel']):>10} "
                     f"{_pct(r['acc_all']):>8}  {top}")
    c = e["cos_teacher"]

    def num(v):
        return "–" if v is None else f"{v:.3f}"

    lines.append(f"cos(student, teacher) {num(c['all'])} (base {num(c['base'])} / novel "
                 f"{num(c['novel'])}) on the {c['n']} boxes a cached proposal overlaps "
                 f"(IoU >= {e['settings']['iou']}); the teacher row is on those boxes")
    fit = e["image_fit"]
    if fit["loss_image"] is not None:
        lines.append(f"image fit on the {e['features']['n_distilled']} cached targets: "
                     f"loss_image {fit['loss_image']:.3f} / mean-direction baseline "
                     f"{fit['baseline']:.3f} = {fit['ratio']:.3f}")
    lines.append(f"final losses {e['final_losses']}; train {e['train_seconds']} s, "
                 f"wall {e['seconds']} s")
    return "\n".join(lines)


def format_history(history: list[dict]) -> str:
    """One line per probe run in probe.json: the main head (the ensemble for separate heads)."""
    lines = [(f"{'#':>3} {'variant':<56} {'base':>6} {'novel':>6} {'top %':>6} {'cos':>6} "
              f"{'fit':>6} {'s':>6}")]
    for k, e in enumerate(history):
        heads = e["heads"]
        main = heads.get("ensemble") or heads.get("shared") or next(iter(heads.values()))
        fit = e["image_fit"]["ratio"]
        cos = e["cos_teacher"]["all"]
        lines.append(f"{k:>3} {e['variant'][:56]:<56} {_pct(main['acc_base']):>6} "
                     f"{_pct(main['acc_novel']):>6} {_pct(main['top_share']):>6} "
                     f"{'–' if cos is None else f'{cos:.3f}':>6} "
                     f"{'–' if fit is None else f'{fit:.3f}':>6} {e['seconds']:>6}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovdistill.trainer.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(p, device=True, device_help="auto | cpu | cuda")
    p.add_argument("--out", default="runs/probe", help="holds features.pt and probe.json")
    p.add_argument("--shards", default=None, help="brace pattern (default: the cache's wds)")
    p.add_argument("--gt", default=None, help="COCO json naming every object of the train "
                   f"images (default: <cache>/<dataset>/{DATASET}/{TRAIN_FULL})")
    p.add_argument("--init-from", default="rpn",
                   help="frozen backbone + RPN: 'rpn' = the cache's RPN stage, or a checkpoint "
                        "path (a trainer run's latest.pt brings its architecture)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one TrainConfig field (sizes, representation_size, ...)")
    p.add_argument("--mode", choices=MODES, default=None)
    p.add_argument("--heads", choices=HEADS, default=None)
    p.add_argument("--image-loss-weight", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--contrastive-weight", type=float, default=None)
    p.add_argument("--center-targets", action="store_true", default=None)
    p.add_argument("--negative-prompts", action="store_true", default=None)
    p.add_argument("--min-score", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--images", type=int, default=None, help="train images (default 300)")
    p.add_argument("--heldout", type=int, default=None,
                   help="held-out train images (default 200)")
    p.add_argument("--log-every", type=int, default=500, help="print losses every N steps")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default; 1 can be faster on a busy "
                        "machine)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        result = run(args)
    except OvdError as e:
        return report_error(e)
    print(format_entry(result["entry"]))
    if len(result["history"]) > 1:
        print(f"\nall runs in {Path(args.out) / RESULTS_FILE}:")
        print(format_history(result["history"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
