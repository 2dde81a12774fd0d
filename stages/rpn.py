"""Stage `rpn`: train a class-agnostic region proposal network on BASE-category boxes only
(or take a given checkpoint), then it stays frozen for `proposals`.

Built from torchvision's detection pieces: a ResNet-FPN backbone (`resnet_fpn_backbone`,
weights=None; optionally initialised from a local ResNet state dict), `AnchorGenerator`,
`RPNHead`, `RegionProposalNetwork` and `GeneralizedRCNNTransform`. The module names
`backbone` / `rpn` match torchvision's Faster R-CNN, so a Faster R-CNN state dict with the
same architecture loads as a `checkpoint` too. Under bf16 autocast (`precision`) only the
backbone and the RPN head's convolutions run in bf16: anchors, proposals, NMS, anchor matching
and losses are float32 (`Float32Anchors`, `Float32RPNHead`).

Output: `<cache>/<ds>/rpn/rpn.pt` = {"arch": RPNArch fields, "model": state_dict, "train":
{...}}; the manifest records its path and sha256 (`proposals` refuses a changed file), and
"fed": the distinct images and their GT boxes per category id that training handed the model.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.rpn import (
    RegionProposalNetwork,
    RPNHead,
    concat_box_prediction_layers,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import nms, remove_small_boxes

from pipeline import layout
from pipeline.cache import canonical_hash, sha256_file
from pipeline.checkpoints import CheckpointError, load_weights
from pipeline.errors import reject
from pipeline.manifests import ManifestError, contained_path
from pipeline.optim import check_finite, warmup_cosine
from pipeline.precision import autocast
from pipeline.runner import Part, PartOutput, PartResult, StageContext, StageError
from stages.boxes import ImageRecord, keep_categories, read_annotations, to_original
from stages.images import DEFAULT_MAX_PIXELS, ImageError, load_rgb, to_float_tensor

NAME = "rpn"
RESOURCES = {"num_cpus": 8, "num_gpus": 1}
CHECKPOINT_FILE = layout.RPN_CHECKPOINT

# torchvision's ImageNet statistics, as its detectors use.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class RPNArch:
    """What it takes to rebuild the network (stored in the checkpoint)."""

    backbone: str = "resnet18"
    returned_layers: tuple[int, ...] = (2, 3, 4)  # FPN levels at strides 8, 16, 32 (+ pool 64)
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128)  # one per level, pool level included
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    min_size: int = 160  # short side the transform resizes to
    max_size: int = 224  # cap on the long side

    @classmethod
    def from_dict(cls, d: dict) -> "RPNArch":
        known = {f.name for f in fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**kw)


@dataclass(frozen=True)
class Config:
    checkpoint: str | None = None  # use this RPN and skip training (--rpn-checkpoint)
    backbone_checkpoint: str | None = None  # local torchvision ResNet state dict to start from
    backbone: str = "resnet18"
    returned_layers: tuple[int, ...] = (2, 3, 4)
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    min_size: int = 160  # the toy images are 160-320 px with objects >= 24 px
    max_size: int = 224
    steps: int = 500  # ~0.5 s a step on 2 idle CPU cores at these sizes
    batch_size: int = 4
    lr: float = 2e-3  # AdamW, linear warmup then cosine to 0
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    hflip: bool = True
    seed: int = 0
    num_workers: int = 0  # DataLoader workers (raise on a GPU machine)
    log_every: int = 50
    max_pixels: int = DEFAULT_MAX_PIXELS

    def arch(self) -> RPNArch:
        return RPNArch(self.backbone, tuple(self.returned_layers), tuple(self.anchor_sizes),
                       tuple(float(a) for a in self.aspect_ratios), self.min_size, self.max_size)


# ----------------------------------------------------------------------------- model


class Float32Anchors(AnchorGenerator):
    """torchvision's AnchorGenerator with its anchors always float32. It makes them, and
    caches `cell_anchors`, in the feature maps' dtype: bf16 under autocast, where a corner near
    x = 1000 is rounded to a multiple of 4 px."""

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device) -> None:
        super().set_cell_anchors(torch.float32, device)


class Float32RPNHead(RPNHead):
    """torchvision's RPNHead (its convs run under autocast) whose outputs are float32, so the
    box decoding, NMS, anchor matching and losses after it are computed in float32."""

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """x: per level Tensor[B, C, H_l, W_l] -> (objectness per level Tensor[B, A, H_l, W_l],
        box deltas per level Tensor[B, 4A, H_l, W_l]), float32."""
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class ProposalNet(nn.Module):
    """Transform + ResNet-FPN backbone + RPN, named like torchvision's Faster R-CNN."""

    def __init__(self, arch: RPNArch):
        super().__init__()
        levels = len(arch.returned_layers) + 1  # + the max-pool level FPN adds
        if len(arch.anchor_sizes) != levels:
            raise ValueError(f"anchor_sizes needs one size per FPN level ({levels} for "
                             f"returned_layers={list(arch.returned_layers)}), "
                             f"got {list(arch.anchor_sizes)}")
        self.arch = arch
        self.transform = GeneralizedRCNNTransform(arch.min_size, arch.max_size,
                                                  list(IMAGE_MEAN), list(IMAGE_STD))
        # Trainable BatchNorm: the network trains from scratch (FrozenBatchNorm2d, the
        # detection default, would freeze the identity statistics of an untrained net).
        self.backbone = resnet_fpn_backbone(
            backbone_name=arch.backbone, weights=None, norm_layer=nn.BatchNorm2d,
            trainable_layers=5, returned_layers=list(arch.returned_layers))
        anchors = Float32Anchors(sizes=tuple((int(s),) for s in arch.anchor_sizes),
                                 aspect_ratios=(tuple(arch.aspect_ratios),) * levels)
        head = Float32RPNHead(self.backbone.out_channels,
                              anchors.num_anchors_per_location()[0])
        # Proposals made during training feed no box head here, so their NMS is kept small;
        # `propose` sets the test-time counts it is asked for.
        self.rpn = RegionProposalNetwork(
            anchors, head, fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256,
            positive_fraction=0.5, pre_nms_top_n=dict(training=100, testing=1000),
            post_nms_top_n=dict(training=100, testing=1000), nms_thresh=0.7)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict:
        """Training losses. images: Tensor[3, H, W] floats in [0, 1]; targets: {"boxes":
        Tensor[G, 4] (x1, y1, x2, y2) in the image's pixels}."""
        batch, targets = self.transform(images, targets)
        features = self.backbone(batch.tensors)
        _, losses = self.rpn(batch, features, targets)
        return losses

    @torch.no_grad()
    def propose(self, images: list[Tensor], *, pre_nms_top_n: int = 1000,
                nms_thresh: float = 0.7, score_thresh: float = 0.0,
                min_box_size: float = 1.0, top_m: int = 300,
                ) -> list[tuple[Tensor, Tensor]]:
        """Ranked class-agnostic proposals per image, in ORIGINAL image pixels.

        images: Tensor[3, H, W] floats in [0, 1]. Per FPN level the `pre_nms_top_n` best
        anchors are decoded and NMS'd (torchvision's RPN); the survivors of all levels then
        go through one more NMS across levels (the same box found at two levels would
        otherwise take two of the M slots), the score threshold, a minimum side of
        `min_box_size` original pixels, and the top `top_m` by score are kept.
        Returns [(boxes Tensor[K, 4] float32, scores Tensor[K] float32 in (0, 1))], K <= top_m,
        sorted by descending score."""
        original = [tuple(im.shape[-2:]) for im in images]
        batch, _ = self.transform(images)
        features = list(self.backbone(batch.tensors).values())
        objectness, deltas = self.rpn.head(features)
        anchors = self.rpn.anchor_generator(batch, features)
        per_level = [int(o[0].numel()) for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        decoded = self.rpn.box_coder.decode(deltas.float(), anchors).view(len(images), -1, 4)
        self.rpn._pre_nms_top_n["testing"] = int(pre_nms_top_n)
        self.rpn._post_nms_top_n["testing"] = int(pre_nms_top_n) * len(per_level)
        self.rpn.nms_thresh = float(nms_thresh)
        boxes, scores = self.rpn.filter_proposals(decoded, objectness.float(),
                                                  batch.image_sizes, per_level)
        out = []
        for b, s, resized, orig in zip(boxes, scores, batch.image_sizes, original):
            b, s = b.float(), s.float()
            keep = nms(b, s, nms_thresh)  # sorted by descending score
            b, s = to_original(b[keep], tuple(resized), orig), s[keep]
            keep = s >= score_thresh
            b, s = b[keep], s[keep]
            keep = remove_small_boxes(b, max(min_box_size, 1e-3))  # never an empty box
            b, s = b[keep][:top_m], s[keep][:top_m]
            out.append((b.cpu(), s.cpu()))
        return out


def save_checkpoint(model: ProposalNet, path: Path, train: dict) -> None:
    """Write {"arch", "model", "train"} to `path` (the caller renames it into place)."""
    torch.save({"arch": asdict(model.arch), "model": model.state_dict(), "train": train}, path)


def load_rpn(path: str | Path, fallback: RPNArch | None = None,
             device: str = "cpu") -> ProposalNet:
    """Rebuild a ProposalNet from a checkpoint: ours ({"arch", "model"}) or a bare state dict
    (e.g. torchvision Faster R-CNN's; its `backbone.*` and `rpn.*` keys are used, the
    architecture comes from `fallback`). Raises StageError naming the file on mismatch."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"RPN checkpoint {path} not found")
    try:
        blob = load_weights(path, "RPN checkpoint")
    except CheckpointError as e:
        raise StageError(f"RPN checkpoint {path} cannot be read ({e})") from None
    if isinstance(blob, dict) and "model" in blob and "arch" in blob:
        arch, state = RPNArch.from_dict(blob["arch"]), blob["model"]
    elif isinstance(blob, dict):
        arch = fallback or RPNArch()
        state = blob.get("model", blob.get("state_dict", blob))
        state = {k: v for k, v in state.items() if k.startswith(("backbone.", "rpn."))}
    else:
        raise StageError(f"RPN checkpoint {path}: expected a dict, got {type(blob).__name__}")
    model = ProposalNet(arch)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise StageError(f"RPN checkpoint {path} does not fit architecture {asdict(arch)}: "
                         f"{detail}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise StageError(f"RPN checkpoint {path} does not fit architecture {asdict(arch)}: "
                         f"missing {missing[:3]}, unexpected {list(unexpected)[:3]}")
    return model.to(device).eval()


def load_backbone_weights(model: ProposalNet, path: str | Path) -> None:
    """Initialise the ResNet body from a local torchvision ResNet state dict (fc ignored)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    body = model.backbone.body
    state = {k: v for k, v in state.items() if k in body.state_dict()}
    missing, _ = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise StageError(f"backbone checkpoint {path} is not a torchvision "
                         f"{model.arch.backbone} state dict (missing {missing[:3]})")


# ----------------------------------------------------------------------------- training


class BaseBoxImages(torch.utils.data.Dataset):
    """Train images with their base-category boxes: (image, boxes, image id, category id of
    each box row); a bad image yields a reject dict."""

    def __init__(self, records: list[ImageRecord], image_dir: Path, hflip: bool,
                 max_pixels: int):
        self.records, self.image_dir = records, Path(image_dir)
        self.hflip, self.max_pixels = hflip, max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        path = self.image_dir / rec.file_name
        try:
            path = contained_path(self.image_dir, rec.file_name)
            img = to_float_tensor(load_rgb(path, self.max_pixels))
        except (ImageError, ManifestError) as e:
            return reject(rec.image_id, path, e)
        boxes = rec.boxes.clone()
        h, w = img.shape[-2:]
        if (w, h) != (rec.width, rec.height):
            # Annotations give the size the boxes refer to; scale if the file differs.
            boxes = to_original(boxes, (rec.height, rec.width), (h, w))
        if self.hflip and random.random() < 0.5:
            img = img.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        return img, boxes, rec.image_id, rec.category_ids


def base_train_records(ctx: StageContext) -> tuple[list[ImageRecord], Path]:
    """The train split's images with only base-category boxes (real manifests hold every
    category in train; the toy train.json already holds only base ones)."""
    split = ctx.dataset.split("train")
    base = frozenset(c.id for c in ctx.dataset.categories() if c.split == "base")
    recs = read_annotations(split.annotations)
    return [keep_categories(recs[i], base) for i in sorted(recs)], split.images


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def lr_at(step: int, cfg: Config) -> float:
    return warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.lr)


def record_fed(fed: dict[int, dict[int, int]], targets: list[dict[str, Tensor]],
               good: list[tuple]) -> None:
    """Note, for each image fed for the first time, its GT boxes per category id: the rows of
    the `boxes` tensor handed to the model, labelled by the category ids that came with them."""
    for t, (_, _, image_id, cats) in zip(targets, good):
        if len(cats) != len(t["boxes"]):
            raise StageError(f"rpn: image {image_id} has {len(t['boxes'])} boxes but "
                             f"{len(cats)} category ids")
        if image_id not in fed:
            ids, counts = torch.unique(cats, return_counts=True)
            fed[image_id] = dict(zip(ids.tolist(), counts.tolist()))


def fed_summary(fed: dict[int, dict[int, int]]) -> dict:
    """{"images": distinct images fed, "gt_boxes": {category id: their GT boxes}}."""
    total: dict[int, int] = {}
    for counts in fed.values():
        for c, n in counts.items():
            total[c] = total.get(c, 0) + n
    return {"images": len(fed), "gt_boxes": {str(c): total[c] for c in sorted(total)}}


def train_rpn(model: ProposalNet, data: BaseBoxImages, cfg: Config, device: str,
              precision: str = "fp32", log=print) -> dict:
    """The training loop: AdamW, warmup + cosine, autocast for `precision` (fp32 | bf16).
    Returns a summary
    (loss history, rejects, seconds, and "fed": what the model was given, `fed_summary`).
    Seed the RNGs (`seed_everything`) before building the model for a reproducible run."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = torch.utils.data.DataLoader(
        data, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
        collate_fn=list, drop_last=len(data) > cfg.batch_size,
        generator=torch.Generator().manual_seed(cfg.seed))
    rejects: dict[int, dict] = {}
    fed: dict[int, dict[int, int]] = {}
    history, running, start, step = [], [], time.time(), 0
    while step < cfg.steps:
        got_any = False
        for batch in loader:
            good = []
            for item in batch:
                if isinstance(item, dict):
                    rejects.setdefault(item["item"], item)
                else:
                    good.append(item)
            if not good:
                continue
            got_any = True
            images = [im.to(device, non_blocking=True) for im, *_ in good]
            targets = [{"boxes": b.to(device)} for _, b, *_ in good]
            record_fed(fed, targets, good)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            with autocast(device, precision):
                losses = model(images, targets)
            loss = losses["loss_objectness"] + losses["loss_rpn_box_reg"]
            check_finite(loss, lambda: f"rpn training diverged at step {step} "  # noqa: B023
                                       f"(loss {loss.item()}); lower rpn.lr",  # noqa: B023
                         StageError)  # (called at once, in this iteration)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running.append([losses["loss_objectness"].item(), losses["loss_rpn_box_reg"].item()])
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                obj, reg = np.mean(running, axis=0)
                history.append({"step": step, "loss_objectness": round(float(obj), 4),
                                "loss_rpn_box_reg": round(float(reg), 4),
                                "seconds": round(time.time() - start, 1)})
                log(f"[rpn] step {step}/{cfg.steps} objectness {obj:.4f} box {reg:.4f} "
                    f"({time.time() - start:.0f}s)")
                running = []
            if step >= cfg.steps:
                break
        if not got_any:
            raise StageError("rpn: no train image could be decoded (see the rejects)")
    model.eval()
    return {"history": history, "rejects": list(rejects.values()),
            "seconds": round(time.time() - start, 1), "steps": step,
            "images": len(data), "fed": fed_summary(fed)}


# ----------------------------------------------------------------------------- stage


def inputs(ctx: StageContext, cfg: Config) -> dict[str, str]:
    if cfg.checkpoint:
        path = Path(cfg.checkpoint)
        if not path.is_file():
            raise StageError(f"rpn.checkpoint {path} not found")
        return {"checkpoint_sha256": sha256_file(path)}
    split = ctx.dataset.split("train")
    ctx.dataset.check_files()
    base = sorted(c.id for c in ctx.dataset.categories() if c.split == "base")
    out = {"train_annotations": sha256_file(split.annotations),
           "base_category_ids": canonical_hash(base)}
    if cfg.backbone_checkpoint:
        out["backbone_checkpoint_sha256"] = sha256_file(Path(cfg.backbone_checkpoint))
    return out


def plan(ctx: StageContext, cfg: Config) -> list[Part]:
    return [Part(0, ("checkpoint",) if cfg.checkpoint else ("train",))]


class Worker:
    def __init__(self, ctx: StageContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg

    def run_part(self, part: Part, out: PartOutput) -> PartResult:
        cfg = self.cfg
        if cfg.checkpoint:
            load_rpn(cfg.checkpoint, cfg.arch())  # fails clearly now, not in `proposals`
            return PartResult(rows=1, extra={"trained": False})
        seed_everything(cfg.seed)
        model = ProposalNet(cfg.arch())
        if cfg.backbone_checkpoint:
            load_backbone_weights(model, cfg.backbone_checkpoint)
        records, image_dir = base_train_records(self.ctx)
        data = BaseBoxImages(records, image_dir, cfg.hflip, cfg.max_pixels)
        summary = train_rpn(model, data, cfg, self.ctx.resolve_device(),
                            self.ctx.resolve_precision())
        rejects, fed = summary.pop("rejects"), summary.pop("fed")  # rpn.pt as before
        save_checkpoint(model.cpu(), out.tmp(CHECKPOINT_FILE), summary)
        return PartResult(rows=1, rejects=rejects,
                          extra={"trained": True, "train": summary, "fed": fed})


def checkpoint_path(ctx: StageContext, cfg: Config) -> Path:
    return Path(cfg.checkpoint).resolve() if cfg.checkpoint else \
        (ctx.stage_dir(NAME) / CHECKPOINT_FILE).resolve()


recorded_checkpoint = layout.recorded_checkpoint  # the RPN file a finished manifest names


def finalize(ctx: StageContext, cfg: Config, stats: list[dict]) -> dict:
    path = checkpoint_path(ctx, cfg)
    arch = load_rpn(path, cfg.arch()).arch
    recorded = str(path) if cfg.checkpoint else CHECKPOINT_FILE
    extra = {"checkpoint": recorded, "checkpoint_sha256": sha256_file(path),
             "arch": json.loads(json.dumps(asdict(arch))),
             "trained": bool(stats[0].get("trained"))}
    if "train" in stats[0]:
        extra["train"] = stats[0]["train"]
    if "fed" in stats[0]:  # what training was given: GT boxes per category id
        extra["fed"] = stats[0]["fed"]
    return extra
