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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from ovdistill.pipeline import layout
from ovdistill.pipeline.boxes import ImageRecord, keep_categories, read_annotations, to_original
from ovdistill.pipeline.cache import canonical_hash, sha256_file
from ovdistill.pipeline.errors import reject
from ovdistill.pipeline.images import DEFAULT_MAX_PIXELS, ImageError, load_rgb, to_float_tensor
from ovdistill.pipeline.manifests import ManifestError, contained_path
from ovdistill.pipeline.optim import check_finite, warmup_cosine
from ovdistill.pipeline.precision import autocast
from ovdistill.pipeline.rpn_net import (  # noqa: F401 - the network's names, re-exported
    IMAGE_MEAN,
    IMAGE_STD,
    Float32Anchors,
    Float32RPNHead,
    ProposalNet,
    RPNArch,
    load_rpn,
    save_checkpoint,
)
from ovdistill.pipeline.runner import Part, PartOutput, PartResult, StageContext, StageError
from torch import Tensor

NAME = "rpn"
RESOURCES = {"num_cpus": 8, "num_gpus": 1}
CHECKPOINT_FILE = layout.RPN_CHECKPOINT


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
