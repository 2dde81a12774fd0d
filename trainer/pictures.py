"""Pictures of detections: image panels with labelled boxes, contact sheets, and the
precision-recall plot, for `python -m ovdistill.trainer.detect` and `trainer.evaluate --pictures`.

Boxes are drawn with `torchvision.utils.draw_bounding_boxes` and sheets laid out with
`torchvision.utils.make_grid`; labels, titles, legends and the PR plot are drawn with PIL
(`ImageDraw`), so no plotting library is needed.

    trainer.evaluate --pictures  ->  <run>/<split>_detections<suffix>.png  (contact sheet)
                                     <run>/<split>_pr<suffix>.png          (PR curves)

The contact sheet shows the first `EVAL_IMAGES` evaluated images by id, each as a pair of
panels: ground truth, then the predictions (score >= `EVAL_SCORE`, the `EVAL_TOP` best), with
base categories in `BASE_COLOUR` and novel ones in `NOVEL_COLOUR`. The PR plot draws, at
IoU 0.5, the precision of each of COCOeval's 101 recall thresholds averaged over the base
categories and over the novel ones (`pr_curve`); the mean of a curve is that subset's AP50.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes, make_grid

BASE_COLOUR = (30, 110, 255)  # blue
NOVEL_COLOUR = (255, 120, 0)  # orange
# per-class colours (trainer.detect): distinct on a photo, cycled beyond 12 classes
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
           (170, 110, 40), (255, 225, 25))
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
TITLE_HEIGHT = 20
GRID_PADDING = 4

EVAL_IMAGES = 8  # the contact sheet's images: the first 8 evaluated ones by image id
EVAL_SCORE = 0.3  # predictions drawn: score at least this ...
EVAL_TOP = 10  # ... and at most this many per image, the best first


def font(size: int = 13) -> ImageFont.ImageFont:
    """PIL's own font at `size` px (a scalable one where Pillow has FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


@dataclass(frozen=True)
class Box:
    """One box to draw: (x1, y1, x2, y2) in the pixels of the original image."""

    xyxy: tuple[float, float, float, float]
    label: str
    colour: tuple[int, int, int]


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def panel(image: Image.Image, boxes: Sequence[Box], side: int = 384, title: str = ""
          ) -> Image.Image:
    """`image` scaled so its longer side is `side` px, `boxes` drawn on it with their labels,
    on a `side` x (`side` + TITLE_HEIGHT) canvas with `title` above (every panel of one side
    has the same size, so panels tile into a grid).

    Boxes are given best first: labels are placed in that order (each at the first of above
    the box, inside its top, below it that no earlier label covers) and drawn in the reverse
    order, so the best box's label is on top."""
    w, h = image.size
    scale = side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    im = image.convert("RGB").resize(size, Image.BILINEAR)
    if boxes:
        xyxy = torch.tensor([b.xyxy for b in boxes], dtype=torch.float32) * scale
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, size[0] - 1)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, size[1] - 1)
        drawn = draw_bounding_boxes(pil_to_tensor(im), xyxy, colors=[b.colour for b in boxes],
                                    width=2)
        im = to_pil_image(drawn)
        draw = ImageDraw.Draw(im)
        f = font(13)
        placed, offsets = [], []
        for b, (x1, y1, x2, y2) in zip(boxes, xyxy.tolist()):
            left, top, right, bottom = draw.textbbox((0, 0), b.label, font=f)
            tw, th = right - left + 4, bottom - top + 4
            x = min(max(0.0, x1), max(0.0, size[0] - tw))
            spots = [(x, y1 - th), (x, y1 + 2), (x, y2 + 2)]
            spots = [(sx, sy) for sx, sy in spots if 0 <= sy <= size[1] - th] or [(x, 0.0)]
            rect = next((r for r in ((sx, sy, sx + tw, sy + th) for sx, sy in spots)
                         if not any(_overlaps(r, p) for p in placed)),
                        (*spots[0], spots[0][0] + tw, spots[0][1] + th))
            placed.append(rect)
            offsets.append((left, top))
        for b, rect, (left, top) in reversed(list(zip(boxes, placed, offsets))):
            draw.rectangle(rect, fill=b.colour)
            draw.text((rect[0] + 2 - left, rect[1] + 2 - top), b.label, font=f,
                      fill=_text_colour(b.colour))
    out = Image.new("RGB", (side, side + TITLE_HEIGHT), BACKGROUND)
    out.paste(im, (0, TITLE_HEIGHT))
    ImageDraw.Draw(out).text((4, 3), title, font=font(13), fill=TEXT)
    return out


def grid(panels: Sequence[Image.Image], cols: int) -> Image.Image:
    """Equal-sized panels in rows of `cols` (torchvision's make_grid), 4 px apart."""
    tensors = [pil_to_tensor(p) for p in panels]
    sheet = make_grid(tensors, nrow=max(1, min(cols, len(tensors))), padding=GRID_PADDING,
                      pad_value=64)
    return to_pil_image(sheet)


def with_header(image: Image.Image, text: str,
                legend: Sequence[tuple[tuple[int, int, int], str]] = ()) -> Image.Image:
    """`image` under a strip holding `text` and then one colour swatch per legend entry,
    wrapped onto as many lines as the image's width needs."""
    f = font(14)
    probe = ImageDraw.Draw(image)
    items = [(None, text)] + [(c, t) for c, t in legend]
    lines, line, x = [], [], 6
    for colour, t in items:
        width = probe.textlength(t, font=f) + (18 if colour else 0) + 14
        if line and x + width > image.width:
            lines.append(line)
            line, x = [], 6
        line.append((colour, t, x))
        x += width
    lines.append(line)
    line_h = 20
    out = Image.new("RGB", (image.width, image.height + line_h * len(lines) + 6), BACKGROUND)
    draw = ImageDraw.Draw(out)
    for n, row in enumerate(lines):
        y = 4 + n * line_h
        for colour, t, x0 in row:
            if colour:
                draw.rectangle([x0, y + 2, x0 + 12, y + 14], fill=colour)
                x0 += 18
            draw.text((x0, y), t, font=f, fill=TEXT)
    out.paste(image, (0, line_h * len(lines) + 6))
    return out


# ----------------------------------------------------------------------------- PR curves


def pr_curve(precision: np.ndarray, ks: Sequence[int]) -> np.ndarray | None:
    """The IoU-0.5 precision-recall curve averaged over categories `ks`.

    precision: the evaluator's array reduced to [T, R, K] (area all, largest maxDets; T = 0
    is IoU 0.5; entries -1 where a category has no ground truth), as `evaluate.
    precision_summary` takes it. Returns float[R, 2] rows (recall threshold r / (R - 1),
    mean precision at it over the categories with a valid entry there), or None when no
    category of `ks` has one. Its mean precision is AP50 over `ks` (COCOeval's average over
    the valid entries)."""
    ks = list(ks)
    if not ks:
        return None
    p = np.asarray(precision, dtype=np.float64)[0][:, ks]  # [R, K']
    valid = p > -1
    counts = valid.sum(axis=1)
    if not counts.any():
        return None
    mean = np.where(valid, p, 0.0).sum(axis=1) / np.maximum(counts, 1)
    recall = np.linspace(0.0, 1.0, p.shape[0])
    keep = counts > 0
    return np.stack([recall[keep], mean[keep]], axis=1)


@dataclass(frozen=True)
class PlotArea:
    """The axes rectangle of a plot, in pixels; recall 0..1 left to right, precision 0..1
    bottom to top."""

    left: int
    top: int
    right: int
    bottom: int

    def xy(self, recall: float, precision: float) -> tuple[float, float]:
        return (self.left + recall * (self.right - self.left),
                self.bottom - precision * (self.bottom - self.top))


PR_SIZE = (560, 440)
PR_AREA = PlotArea(left=60, top=36, right=540, bottom=360)


def pr_plot(curves: Sequence[tuple[str, tuple[int, int, int], np.ndarray | None]],
            title: str, area: PlotArea = PR_AREA, size: tuple[int, int] = PR_SIZE
            ) -> Image.Image:
    """A precision-recall plot: axes with ticks every 0.2, one 2-px line per curve (label,
    colour, float[R, 2] points or None for a subset without ground truth) and a legend under
    the axes."""
    im = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(im)
    f, small = font(14), font(12)
    grey, black = (215, 215, 215), (0, 0, 0)
    for i in range(6):
        v = i / 5
        x, _ = area.xy(v, 0)
        _, y = area.xy(0, v)
        if 0 < i < 5:
            draw.line([(x, area.top), (x, area.bottom)], fill=grey)
            draw.line([(area.left, y), (area.right, y)], fill=grey)
        draw.line([(x, area.bottom), (x, area.bottom + 5)], fill=black)
        draw.line([(area.left - 5, y), (area.left, y)], fill=black)
        label = f"{v:.1f}"
        tw = draw.textlength(label, font=small)
        draw.text((x - tw / 2, area.bottom + 7), label, font=small, fill=black)
        draw.text((area.left - 9 - tw, y - 7), label, font=small, fill=black)
    draw.rectangle([area.left, area.top, area.right, area.bottom], outline=black)
    draw.text(((area.left + area.right) / 2 - 20, area.bottom + 24), "recall", font=f,
              fill=black)
    ylabel = Image.new("RGB", (80, 18), (255, 255, 255))
    ImageDraw.Draw(ylabel).text((2, 1), "precision", font=f, fill=black)
    ylabel = ylabel.rotate(90, expand=True)
    im.paste(ylabel, (4, (area.top + area.bottom) // 2 - ylabel.height // 2))
    draw.text((area.left, 10), title, font=f, fill=black)
    for _, colour, points in curves:
        if points is not None and len(points):
            draw.line([area.xy(r, p) for r, p in points], fill=colour, width=2, joint="curve")
    x, y = area.left, area.bottom + 48
    for label, colour, points in curves:
        draw.line([(x, y + 8), (x + 24, y + 8)], fill=colour, width=3)
        text = label if points is not None else f"{label} (no ground truth)"
        draw.text((x + 30, y), text, font=f, fill=black)
        x += 30 + draw.textlength(text, font=f) + 24
    return im


def _ap(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


# ----------------------------------------------------------------------------- evaluation


def eval_pictures(run: Path, split: str, suffix: str, gt_json: Path, images_dir: Path,
                  detections: list[dict], names: dict[int, str], base_ids: set[int],
                  precision: np.ndarray, cat_ids: Sequence[int], metrics: dict,
                  title: str, n_images: int = EVAL_IMAGES, score: float = EVAL_SCORE,
                  top: int = EVAL_TOP) -> tuple[Path, Path]:
    """Write `<run>/<split>_detections<suffix>.png` (ground truth | predictions for the first
    `n_images` images of `gt_json` by id) and `<run>/<split>_pr<suffix>.png` (base and novel
    PR curves at IoU 0.5 from `precision`, [T, R, K] with K in `cat_ids` order; legend AP50
    from `metrics`). names: category id -> name. Returns the two paths."""
    from ovdistill.pipeline.annotations import read_json_doc, xywh_to_xyxy
    from ovdistill.pipeline.images import ImageError, load_rgb
    from ovdistill.pipeline.manifests import ManifestError, image_path

    gt = read_json_doc(gt_json)  # the evaluated (restricted) GT, as written
    records = sorted(gt["images"], key=lambda im: im["id"])[:n_images]
    gt_boxes: dict[int, list] = {}
    for a in gt["annotations"]:
        gt_boxes.setdefault(a["image_id"], []).append(a)
    dets: dict[int, list] = {}
    for d in detections:
        if d["score"] >= score:
            dets.setdefault(d["image_id"], []).append(d)

    def colour(cid: int) -> tuple[int, int, int]:
        return BASE_COLOUR if cid in base_ids else NOVEL_COLOUR

    def xyxy(bbox):
        return tuple(xywh_to_xyxy(bbox))

    panels = []
    for rec in records:
        try:
            image = load_rgb(image_path(images_dir, rec))
        except (ImageError, ManifestError):
            continue
        truth = [Box(xyxy(a["bbox"]), names.get(a["category_id"], str(a["category_id"])),
                     colour(a["category_id"])) for a in gt_boxes.get(rec["id"], [])
                 if not a.get("iscrowd", 0)]
        best = sorted(dets.get(rec["id"], []), key=lambda d: -d["score"])[:top]
        pred = [Box(xyxy(d["bbox"]), f"{names.get(d['category_id'], d['category_id'])} "
                                     f"{d['score']:.2f}", colour(d["category_id"]))
                for d in best]
        panels.append(panel(image, truth, 256, f"{rec['id']}  ground truth ({len(truth)})"))
        panels.append(panel(image, pred, 256, f"{rec['id']}  predicted ({len(pred)})"))
    sheet_path = run / f"{split}_detections{suffix}.png"
    if panels:
        sheet = grid(panels, 4)
    else:
        sheet = Image.new("RGB", (512, 64), BACKGROUND)
    with_header(sheet, f"{title}: ground truth | predictions (score >= {score:g}, "
                       f"best {top} per image)",
                [(BASE_COLOUR, "base"), (NOVEL_COLOUR, "novel")]).save(sheet_path,
                                                                        optimize=True)

    index = {c: k for k, c in enumerate(cat_ids)}
    base_ks = [index[c] for c in cat_ids if c in base_ids]
    novel_ks = [index[c] for c in cat_ids if c not in base_ids]
    curves = [(f"base AP50 {_ap(metrics.get('AP50_base'))}", BASE_COLOUR,
               pr_curve(precision, base_ks)),
              (f"novel AP50 {_ap(metrics.get('AP50_novel'))}", NOVEL_COLOUR,
               pr_curve(precision, novel_ks))]
    pr_path = run / f"{split}_pr{suffix}.png"
    pr_plot(curves, f"{title}: precision-recall at IoU 0.5").save(pr_path, optimize=True)
    return sheet_path, pr_path
