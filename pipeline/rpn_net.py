"""The RPN network the rpn stage trains and the proposals stage runs: a ResNet-FPN backbone,
torchvision's anchors and RPN, named like torchvision's Faster R-CNN (`backbone`, `rpn`), with
its checkpoint format. The trainer's detector shares the float32 anchor and head pieces and
the ImageNet input statistics.

Under bf16 autocast only the backbone and the RPN head's convolutions run in bf16: anchors,
proposals, NMS, anchor matching and losses are float32 (`Float32Anchors`, `Float32RPNHead`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from ovdistill.pipeline.boxes import to_original
from ovdistill.pipeline.checkpoints import CheckpointError, load_weights
from ovdistill.pipeline.errors import StageError
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
