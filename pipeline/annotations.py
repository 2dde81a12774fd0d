"""Reading and validating COCO/LVIS-format annotation files: one set of rules for the project.

`validate_annotations(doc, source)` is a pure function (it never changes `doc`): records in,
kept records plus reports of what was dropped or clipped out. `load_annotations(path)` reads
a file and validates it. The `dataset` stage runs it on every split of a real dataset (and
records the reports in its `_MANIFEST.json`); the readers of the later stages
(`pipeline.boxes.read_annotations` for rpn and proposals, the teacher's zero-shot crops, the
pack stage's split index) read through it, so they see the same kept annotations. (The
trainer's evaluation and diagnostics, `pipeline query` and the regions stage's image list
still read the JSON themselves.)

Structural problems stop everything with an `AnnotationError`, one line naming the file and
the record: the top level is not {images: [...], annotations: [...], categories: [...]}; an
image without an integer id or a positive width and height; an image id, annotation id or
category id used twice; an annotation without an integer id, image_id or category_id, or
naming an image or category the file does not hold; a bbox that is not a list of 4 numbers.
An image's file name is not checked here: an image that has none, or one that would leave
its folder, is a reject of the stage that reads it (`pipeline.manifests.image_path`).

Degenerate boxes are dropped, each with a reason (REASONS): a coordinate that is NaN or
infinite, a width or height <= 0, or a box entirely outside its image. Boxes that overshoot
their image are clipped to it (`bbox` = the clipped [x, y, w, h]; `area` and `segmentation`
are left as they are). Crowd annotations follow the same rules.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ovdistill.pipeline.errors import OvdError

MAX_EXAMPLES = 100  # examples kept per report

NON_FINITE = "non-finite bbox coordinate"
EMPTY = "bbox width or height <= 0"
OUTSIDE = "bbox entirely outside the image"
REASONS = (NON_FINITE, EMPTY, OUTSIDE)


class AnnotationError(OvdError, ValueError):
    """An annotation file is unreadable or does not hold together; one line naming the file
    and the record."""


@dataclass
class Report:
    """How many annotations one rule touched, with the first MAX_EXAMPLES of them."""

    count: int = 0
    examples: list[dict] = field(default_factory=list)

    def add(self, example: dict) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(example)

    def as_dict(self) -> dict:
        return {"count": self.count, "examples": list(self.examples)}


@dataclass(frozen=True)
class Annotations:
    """A validated annotation file."""

    source: str
    images: list[dict]  # as in the file
    annotations: list[dict]  # the kept ones in file order; a clipped one is a copy
    categories: list[dict]  # as in the file
    dropped: Report  # examples: {"id", "image_id", "reason"}
    clipped: Report  # examples: {"id", "image_id", "bbox" (as in the file), "clipped"}

    def by_image(self) -> dict[int, list[dict]]:
        """{image id: its kept annotations} for every image (images without any map to [])."""
        out: dict[int, list[dict]] = {int(im["id"]): [] for im in self.images}
        for a in self.annotations:
            out[a["image_id"]].append(a)
        return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list(doc: dict, key: str, source: str, required: bool) -> list:
    if key not in doc:
        if required:
            raise AnnotationError(f"{source}: not a COCO/LVIS annotation file: no '{key}' list")
        return []
    value = doc[key]
    if not isinstance(value, list):
        raise AnnotationError(f"{source}: '{key}' must be a list, got {type(value).__name__}")
    return value


def _record_id(rec, key: str, what: str, first: dict[int, int], i: int, source: str) -> int:
    """The integer id of record `i` of the list `key` ("images", ...), noted in `first`;
    raises when `rec` is not a record, its id is not an integer, or another record has it."""
    where = f"{source}: {key}[{i}]"
    if not isinstance(rec, dict):
        raise AnnotationError(f"{where} is not a record ({type(rec).__name__})")
    rid = rec.get("id")
    if not _is_int(rid):
        raise AnnotationError(f"{where}: id must be an integer, got {rid!r}")
    if rid in first:
        raise AnnotationError(f"{where}: duplicate {what} id {rid} "
                              f"(also {key}[{first[rid]}])")
    first[rid] = i
    return rid


def _check_images(images: list, source: str) -> dict[int, tuple]:
    """{image id: (width, height)}; raises on the first malformed or repeated image."""
    sizes: dict[int, tuple] = {}
    first: dict[int, int] = {}
    for i, im in enumerate(images):
        where = f"{source}: images[{i}]"
        iid = _record_id(im, "images", "image", first, i, source)
        w, h = im.get("width"), im.get("height")
        if not (_is_number(w) and _is_number(h) and w > 0 and h > 0
                and math.isfinite(w) and math.isfinite(h)):
            raise AnnotationError(f"{where} (id {iid}): width and height must be positive "
                                  f"numbers, got {w!r} x {h!r}")
        sizes[iid] = (w, h)
    return sizes


def _check_categories(categories: list, source: str) -> set[int]:
    ids: dict[int, int] = {}
    for i, c in enumerate(categories):
        _record_id(c, "categories", "category", ids, i, source)
    return set(ids)


def validate_annotations(doc, source: str | Path) -> Annotations:
    """Check the structure of a COCO/LVIS-format document (raises AnnotationError), drop the
    degenerate boxes and clip the overshooting ones. `doc` is not modified."""
    source = str(source)
    if not isinstance(doc, dict):
        raise AnnotationError(f"{source}: not a COCO/LVIS annotation file (the top level is "
                              f"{type(doc).__name__}, not a mapping)")
    images = _list(doc, "images", source, required=True)
    anns = _list(doc, "annotations", source, required=False)
    categories = _list(doc, "categories", source, required=False)
    sizes = _check_images(images, source)
    category_ids = _check_categories(categories, source)

    kept: list[dict] = []
    dropped, clipped = Report(), Report()
    seen: dict[int, int] = {}
    for i, a in enumerate(anns):
        aid = _record_id(a, "annotations", "annotation", seen, i, source)
        where = f"{source}: annotations[{i}] (id {aid})"
        iid, cid, bbox = a.get("image_id"), a.get("category_id"), a.get("bbox")
        if not _is_int(iid):
            raise AnnotationError(f"{where}: image_id must be an integer, got {iid!r}")
        if iid not in sizes:
            raise AnnotationError(f"{where}: unknown image id {iid} (not in 'images')")
        if not _is_int(cid):
            raise AnnotationError(f"{where}: category_id must be an integer, got {cid!r}")
        if cid not in category_ids:
            raise AnnotationError(f"{where}: unknown category id {cid} (not in 'categories')")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            raise AnnotationError(f"{where}: bbox must be a list of 4 numbers [x, y, w, h], "
                                  f"got {bbox!r}")

        x, y, w, h = bbox
        width, height = sizes[iid]
        reason = None
        if not all(math.isfinite(v) for v in bbox):
            reason = NON_FINITE
        elif w <= 0 or h <= 0:
            reason = EMPTY
        elif x >= width or y >= height or x + w <= 0 or y + h <= 0:
            reason = OUTSIDE
        if reason is not None:
            dropped.add({"id": aid, "image_id": iid, "reason": reason})
            continue
        if x < 0 or y < 0 or x + w > width or y + h > height:
            x1, y1 = max(x, 0), max(y, 0)
            x2, y2 = min(x + w, width), min(y + h, height)
            box = [x1, y1, x2 - x1, y2 - y1]
            clipped.add({"id": aid, "image_id": iid, "bbox": list(bbox), "clipped": box})
            a = {**a, "bbox": box}
        kept.append(a)
    return Annotations(source, images, kept, categories, dropped, clipped)


def read_json_doc(path: str | Path) -> dict:
    """The parsed JSON of a COCO/LVIS-format file, unvalidated: every annotation file is
    opened here, so an unreadable one is always the same one-line AnnotationError."""
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{path}: cannot read a COCO/LVIS annotation file "
                              f"({type(e).__name__}: {e})") from None


def load_annotations(path: str | Path) -> Annotations:
    """Read a COCO/LVIS-format file and validate it (`validate_annotations`)."""
    path = Path(path)
    return validate_annotations(read_json_doc(path), path)


def read_images(path: str | Path) -> list[dict]:
    """The `images` records of a COCO/LVIS-format file, in the file's order, without
    validating the rest (an evaluation split's image list, the calibration images)."""
    doc = read_json_doc(path)
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise AnnotationError(f"{path}: no `images` list")
    return images


def images_by_id(images: list[dict]) -> dict[int, dict]:
    """{image id: record} of an `images` list."""
    return {int(im["id"]): im for im in images}


def xywh_to_xyxy(bbox) -> list:
    """A COCO box (x, y, w, h) -> [x1, y1, x2, y2], values as given."""
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def gt_boxes(doc: dict, images: set[int] | None = None, categories=None,
             skip_crowd: bool = False) -> dict[int, list[tuple[list, int]]]:
    """The lenient ground-truth reader (answer keys, `--gt` files and evaluation sets, which
    are read as given, not validated): {image_id: [([x1, y1, x2, y2], category_id), ...]} in
    file order, for the `images` ids (None: all), the `categories` ids (None: all), crowd
    annotations left out when `skip_crowd`."""
    out: dict[int, list[tuple[list, int]]] = {}
    for a in doc.get("annotations", []):
        i, c = int(a["image_id"]), int(a["category_id"])
        if (images is not None and i not in images) or (
                categories is not None and c not in categories):
            continue
        if skip_crowd and a.get("iscrowd", 0):
            continue
        out.setdefault(i, []).append((xywh_to_xyxy(a["bbox"]), c))
    return out
