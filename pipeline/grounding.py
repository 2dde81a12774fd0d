"""Grounding annotations in MDETR's convention (the one GLIP trains on): a COCO-format json
whose `images` carry a `caption` and whose `annotations` tie a box to character spans of it.

    {"images": [{"id": 1, "file_name": "000001.jpg", "width": 200, "height": 160,
                 "caption": "a red circle next to two blue stars"}, ...],
     "annotations": [{"id": 1, "image_id": 1, "bbox": [x, y, w, h],
                      "tokens_positive": [[2, 12]],          # [start, end) into the caption
                      "category_id": 1, "phrase_ids": 0}, ...],   # both optional
     "categories": [{"id": 1, "name": "red circle"}, ...]}        # optional

`load_grounding(path)` reads such a file through the rules of `pipeline.annotations` (the file
is opened by `read_json_doc`; images, ids, image ids and bboxes are checked, degenerate boxes
dropped and overshooting ones clipped by `validate_annotations` itself, so the two readers can
never disagree about a box). On top of those: every image has a non-empty string `caption`;
every annotation has `tokens_positive`, a list of [start, end] integer pairs with
0 <= start < end <= len(caption); a `category_id`, when given, is an integer naming a category
of the file (any integer when the file has no `categories` list).
A structural problem is an `AnnotationError`, one line naming the file and the record. An
annotation whose `tokens_positive` is empty is dropped (NO_SPAN) and counted with the
degenerate boxes.

A box's phrase is the text of its spans, `caption[start:end]` joined by single spaces
(`phrase_text`). `grounding_paths` says where a dataset's grounding file and images are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from ovdistill.pipeline import layout
from ovdistill.pipeline.annotations import (
    AnnotationError,
    Report,
    _is_int,
    _list,
    read_json_doc,
    validate_annotations,
    xywh_to_xyxy,
)
from ovdistill.pipeline.errors import StageError

NO_SPAN = "empty tokens_positive"  # a drop reason, beside pipeline.annotations.REASONS
_ANY_CATEGORY = 0  # the stand-in category validate_annotations sees (category_id is optional)

Span = tuple[int, int]  # [start, end) character offsets into a caption


@dataclass(frozen=True, eq=False)
class GroundedImage:
    """One captioned image and its kept boxes, each tied to spans of the caption."""

    id: int
    record: dict  # the image record as in the file (file_name, width, height, caption, ...)
    caption: str
    boxes: torch.Tensor  # float32[G, 4] (x1, y1, x2, y2) image pixels, clipped to the image
    spans: tuple[tuple[Span, ...], ...]  # per box: its [start, end) spans, at least one
    annotation_ids: tuple[int, ...]  # per box
    category_ids: tuple[int | None, ...]  # per box; None where the file gives none

    @property
    def width(self):
        return self.record["width"]

    @property
    def height(self):
        return self.record["height"]

    def phrases(self) -> list[str]:
        """The phrase text of each box (`phrase_text`), in box order."""
        return [phrase_text(self.caption, s) for s in self.spans]

    def phrase_groups(self) -> list[tuple[Span, ...]]:
        """The distinct span sets of the image's boxes (its grounded phrases), first seen first."""
        return list(dict.fromkeys(self.spans))


@dataclass(frozen=True)
class GroundingDoc:
    """A validated grounding file."""

    source: str
    images: list[GroundedImage]  # in file order
    categories: list[dict]  # as in the file
    dropped: Report  # examples: {"id", "image_id", "reason"}
    clipped: Report  # examples: {"id", "image_id", "bbox" (as in the file), "clipped"}

    def by_id(self) -> dict[int, GroundedImage]:
        return {im.id: im for im in self.images}

    @property
    def n_boxes(self) -> int:
        return sum(len(im.spans) for im in self.images)


def phrase_text(caption: str, spans) -> str:
    """The text a box's spans point at: caption[start:end] of each, joined by one space."""
    return " ".join(caption[s:e] for s, e in spans)


def _spans(value, caption: str, where: str) -> tuple[Span, ...]:
    """`tokens_positive` checked against `caption`; raises AnnotationError on the first bad one."""
    if not isinstance(value, list):
        raise AnnotationError(f"{where}: tokens_positive must be a list of [start, end] spans, "
                              f"got {value!r}")
    out = []
    for span in value:
        if not (isinstance(span, (list, tuple)) and len(span) == 2
                and all(map(_is_int, span))):
            raise AnnotationError(f"{where}: a tokens_positive span must be [start, end] "
                                  f"integers, got {span!r}")
        s, e = span
        if not 0 <= s < e <= len(caption):
            raise AnnotationError(f"{where}: span [{s}, {e}] is outside its caption "
                                  f"({len(caption)} characters) or empty")
        out.append((s, e))
    return tuple(out)


def _captions(images: list[dict], source: str) -> dict[int, str]:
    out = {}
    for i, im in enumerate(images):
        caption = im.get("caption")
        if not isinstance(caption, str) or not caption:
            raise AnnotationError(f"{source}: images[{i}] (id {im['id']}): caption must be a "
                                  f"non-empty string, got {caption!r}")
        out[im["id"]] = caption
    return out


def validate_grounding(doc, source: str | Path) -> GroundingDoc:
    """Check an MDETR-format document (raises AnnotationError), drop degenerate boxes and clip
    overshooting ones (pipeline.annotations' rules), tie each kept box to its spans. `doc` is
    not modified."""
    source = str(source)
    if not isinstance(doc, dict):
        raise AnnotationError(f"{source}: not a grounding annotation file (the top level is "
                              f"{type(doc).__name__}, not a mapping)")
    anns = _list(doc, "annotations", source, required=False)
    categories = _list(doc, "categories", source, required=False)
    # validate_annotations checks everything but the optional category_id: it sees one
    # stand-in category, and the real ids are checked below
    shadow = {"images": doc.get("images"), "categories": [{"id": _ANY_CATEGORY}],
              "annotations": [{**a, "category_id": _ANY_CATEGORY} if isinstance(a, dict) else a
                              for a in anns]}
    if "images" not in doc:
        shadow.pop("images")
    valid = validate_annotations(shadow, source)
    captions = _captions(valid.images, source)
    category_ids = ({c.get("id") for c in categories if isinstance(c, dict)}
                    if "categories" in doc else None)  # no list: any integer id

    spans: dict[int, tuple[Span, ...]] = {}
    for i, a in enumerate(anns):  # every record: ids, image ids and bboxes are valid here
        where = f"{source}: annotations[{i}] (id {a['id']})"
        if "tokens_positive" not in a:
            raise AnnotationError(f"{where}: no tokens_positive (the caption spans of its box)")
        cid = a.get("category_id")
        if cid is not None and not (_is_int(cid) and (category_ids is None
                                                       or cid in category_ids)):
            raise AnnotationError(f"{where}: category_id {cid!r} is not a category of the file")
        spans[a["id"]] = _spans(a["tokens_positive"], captions[a["image_id"]], where)

    dropped = valid.dropped
    kept: dict[int, list[dict]] = {im["id"]: [] for im in valid.images}
    original = {a["id"]: a for a in anns}
    for a in valid.annotations:
        if not spans[a["id"]]:
            dropped.add({"id": a["id"], "image_id": a["image_id"], "reason": NO_SPAN})
            continue
        kept[a["image_id"]].append(a)
    images = []
    for im in valid.images:
        boxes = [xywh_to_xyxy(a["bbox"]) for a in kept[im["id"]]]
        images.append(GroundedImage(
            id=im["id"], record=im, caption=captions[im["id"]],
            boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            spans=tuple(spans[a["id"]] for a in kept[im["id"]]),
            annotation_ids=tuple(a["id"] for a in kept[im["id"]]),
            category_ids=tuple(original[a["id"]].get("category_id") for a in kept[im["id"]]),
        ))
    return GroundingDoc(source, images, categories, dropped, valid.clipped)


def load_grounding(path: str | Path) -> GroundingDoc:
    """Read an MDETR-format grounding file and validate it (`validate_grounding`)."""
    path = Path(path)
    return validate_grounding(read_json_doc(path), path)


def grounding_paths(dataset, cache: layout.DatasetCache) -> tuple[Path, Path]:
    """(grounding json, the folder its file_names are relative to) of a dataset: the grounding
    stage's own `grounding.json` and `images/` for generated data, the manifest's
    `grounding: {annotations, images}` for a real source. `dataset`: a DatasetManifest."""
    src = dataset.grounding
    if src is None:
        raise StageError(f"{dataset.path}: no grounding: block (grounding data)")
    if src.format == "synthetic":
        folder = cache.stage_dir(layout.GROUNDING)
        return folder / layout.GROUNDING_FILE, folder / layout.GROUNDING_IMAGES
    return src.annotations, src.images
