"""Ground-truth reading and box arithmetic shared by the rpn and proposals stages.

Boxes are `Tensor[N, 4]` (x1, y1, x2, y2) in pixels of the ORIGINAL (EXIF-transposed) image.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from ovdistill.pipeline.annotations import AnnotationError, images_by_id, load_annotations
from ovdistill.pipeline.manifests import ManifestError, image_file
from torchvision.ops import box_convert, box_iou, clip_boxes_to_image

__all__ = ["AnnotationError", "ImageRecord", "keep_categories", "read_annotations",
           "recall_at", "to_original"]


@dataclass(frozen=True)
class ImageRecord:
    """One image of a COCO/LVIS-format annotation file, with its usable GT boxes."""

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: torch.Tensor  # Tensor[G, 4] float32 (x1, y1, x2, y2)
    category_ids: torch.Tensor  # Tensor[G] int64


def read_annotations(path: str | Path) -> dict[int, ImageRecord]:
    """Images of a COCO/LVIS-format file by id, with their kept, non-crowd GT boxes.

    The file is read and validated by `pipeline.annotations.load_annotations` (the rules the
    dataset stage applies and reports): a structural problem raises AnnotationError,
    degenerate boxes are dropped, overshooting ones clipped to the image. File names follow
    `pipeline.manifests.image_file` (LVIS v1 records have only coco_url)."""
    valid = load_annotations(path)
    images = images_by_id(valid.images)
    out = {}
    for iid, anns in valid.by_image().items():
        anns = [a for a in anns if not a.get("iscrowd", 0)]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        im = images[iid]
        try:
            name = image_file(im)
        except ManifestError as e:
            raise AnnotationError(f"{path}: {e}") from None
        out[iid] = ImageRecord(iid, name, int(im["width"]), int(im["height"]),
                               box_convert(xywh, "xywh", "xyxy"),
                               torch.tensor([a["category_id"] for a in anns], dtype=torch.int64))
    return out


def keep_categories(rec: ImageRecord, category_ids: set[int] | frozenset[int]) -> ImageRecord:
    """`rec` with only the GT boxes whose category is in `category_ids`."""
    keep = torch.tensor([int(c) in category_ids for c in rec.category_ids], dtype=torch.bool)
    return ImageRecord(rec.image_id, rec.file_name, rec.width, rec.height,
                       rec.boxes[keep], rec.category_ids[keep])


def to_original(boxes: torch.Tensor, resized_hw: tuple[int, int],
                original_hw: tuple[int, int]) -> torch.Tensor:
    """Map boxes from a resized image back to the original one and clip them to it.

    boxes: Tensor[N, 4] (x1, y1, x2, y2) in the resized image of size `resized_hw` (h, w).
    Returns Tensor[N, 4] float32 in the original image of size `original_hw` (h, w)."""
    ry = original_hw[0] / resized_hw[0]
    rx = original_hw[1] / resized_hw[1]
    scale = torch.tensor([rx, ry, rx, ry], dtype=torch.float32, device=boxes.device)
    return clip_boxes_to_image(boxes.float() * scale, original_hw)


def recall_at(gt: list[torch.Tensor], proposals: list[torch.Tensor], ks: list[int],
              iou_thresh: float = 0.5) -> dict[int, float | None]:
    """Fraction of GT boxes matched (IoU >= `iou_thresh`) by any of the top-k proposals.

    gt: per image Tensor[G_i, 4]; proposals: per image Tensor[P_i, 4] ranked by score (the
    same images, same order). A GT box may be matched by the same proposal as another GT box
    (the usual proposal-recall definition). Returns {k: recall} (None when there is no GT)."""
    if len(gt) != len(proposals):
        raise ValueError(f"recall_at: {len(gt)} GT lists but {len(proposals)} proposal lists")
    total = sum(int(g.shape[0]) for g in gt)
    hits = dict.fromkeys(ks, 0)
    for g, p in zip(gt, proposals):
        if g.shape[0] == 0 or p.shape[0] == 0:
            continue
        iou = box_iou(g.float(), p.float())  # [G, P]
        for k in ks:
            hits[k] += int((iou[:, :k].max(dim=1).values >= iou_thresh).sum())
    return {k: (hits[k] / total if total else None) for k in ks}
