"""Stage `pseudo_boxes`: GLIP's pseudo-grounding of the image-text pairs from the cache. For
every pair and each of its phrases (stage `phrases`), the pair proposal (stage `pair_regions`,
the teacher's region embeddings of the top_k proposals) whose embedding has the highest cosine
with the phrase's embedding is that phrase's candidate box; the candidates at or above a
threshold become grounding data in MDETR's format (pipeline/grounding.py).

The threshold is never chosen on the val split:
- `threshold` set: keep the candidates with cosine >= threshold;
- `threshold: null` (default), the rule on the pairs themselves: over all N candidates of all
  pairs, keep the ceil(keep_fraction x N) highest cosines (ties: lower image id, then the
  phrase's order in its row, first); the manifest's `threshold` is the lowest kept cosine.

Outputs, in `pseudo_boxes/`:
- `part-NNNNN.parquet`, one row per candidate (every phrase of the part's pairs that has at
  least one region): image_id int64, phrase string, rank int32 (the proposal's), box
  fixed_size_list<float32>[4] (x1, y1, x2, y2 pixels), score float32 (the cosine). Kept or
  not is decided in finalize (the rule needs every part).
- `pseudo_grounding.json` (PSEUDO_FILE), written atomically by finalize: `images` = the pair
  images with at least one kept box {id (the pair id), file_name (the pairs row's file,
  relative to the pair image root; a webdataset pair adds the member's `offset` and `size`
  inside that .tar), width, height, caption}; `annotations` = one per kept box {id, image_id,
  bbox [x, y, w, h], area, iscrowd 0, tokens_positive = the [start, end) spans of every
  mention of the phrase in the caption (`pipeline.phrases.phrase_spans`), phrase, score,
  rank, category_id when the phrase is a vocabulary category}; `categories` = the vocabulary
  {id, name, split}; `info` = {image_root, threshold, rule}. A kept candidate whose phrase
  cannot be found in its caption (a spaCy chunk the caption spells otherwise) is left out and
  counted (`no_span`). No pairs: zero parts and a valid file with no images.

For generated pairs the manifest reports the precision of the kept pseudo-boxes against the
pairs stage's own records (`pairs/part-NNNNN.json`: every object's box and category): a kept
box is correct when its IoU with an object of the phrase's category is >= `iou` (0.5); only
phrases that are vocabulary categories are judged. The same over all candidates shows what
the threshold bought.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from ovdistill.pipeline import layout
from ovdistill.pipeline.cache import atomic_write_bytes, canonical_hash, read_json
from ovdistill.pipeline.pair_sources import pair_image_root, read_pairs
from ovdistill.pipeline.phrases import ConceptDictionary, manifest_dictionary, phrase_spans, words
from ovdistill.pipeline.runner import (
    Part,
    PartOutput,
    PartResult,
    StageContext,
    StageError,
    chunk_parts,
)

NAME = layout.PSEUDO_BOXES
RESOURCES = {"num_cpus": 1, "num_gpus": 0}

SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("phrase", pa.string()),
    ("rank", pa.int32()),
    ("box", pa.list_(pa.float32(), 4)),
    ("score", pa.float32()),
])


@dataclass(frozen=True)
class Config:
    threshold: float | None = None  # None: the keep_fraction rule on the pairs themselves
    keep_fraction: float = 0.5  # the rule: keep this fraction of the best-match cosines
    iou: float = 0.5  # the precision report: IoU with an object of the phrase's category
    images_per_part: int = 1000


# ----------------------------------------------------------------------------- pure functions


def best_matches(regions: np.ndarray, phrases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per phrase, its best region by cosine similarity.

    regions: float[R, D] (R >= 1); phrases: float[P, D]
    returns: (index int64[P] into regions, the first on ties; cosine float32[P])
    """
    r = np.asarray(regions, np.float32)
    p = np.asarray(phrases, np.float32)
    r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    cos = p @ r.T  # [P, R]
    index = cos.argmax(axis=1) if len(p) else np.zeros(0, np.int64)
    return index.astype(np.int64), cos[np.arange(len(p)), index].astype(np.float32)


def keep_mask(scores: np.ndarray, threshold: float | None, keep_fraction: float
              ) -> tuple[np.ndarray, float | None]:
    """Which candidates are kept, and the threshold that kept them.

    scores: float[N] best-match cosines, in candidate order (image id, then phrase order)
    threshold given: scores >= threshold. None: the ceil(keep_fraction * N) highest scores
    (ties: the earlier candidate first), and the lowest kept score is the threshold.
    returns: (bool[N], threshold or None when None was given and nothing is kept)
    """
    scores = np.asarray(scores, np.float32)
    if threshold is not None:
        return scores >= threshold, float(threshold)
    n_keep = math.ceil(keep_fraction * len(scores) - 1e-9)
    order = np.argsort(-scores, kind="stable")[:n_keep]
    mask = np.zeros(len(scores), bool)
    mask[order] = True
    return mask, (float(scores[order].min()) if n_keep else None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a: float[N, 4], b: float[M, 4] (x1, y1, x2, y2) -> IoU float[N, M]."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def precision_report(boxes: Sequence[tuple[int, str, Sequence[float]]],
                     records: Mapping[int, Sequence[dict]], splits: Mapping[str, str],
                     iou: float = 0.5) -> dict:
    """Precision of pseudo-boxes against the true objects.

    boxes: (image id, phrase, box (x1, y1, x2, y2)); records: image id -> its objects
    [{"category", "box" (x1, y1, x2, y2)}, ...]; splits: category name -> base | novel.
    A box whose phrase is a category is judged: correct when its IoU with an object of that
    category in its image is >= iou. -> {"judged", "correct", "precision", "by_split":
    {split: {"judged", "correct", "precision"}}} (precision None when nothing is judged)
    """
    tally: dict[str, list[int]] = {}
    for image_id, phrase, box in boxes:
        split = splits.get(phrase)
        if split is None:
            continue
        same = [o["box"] for o in records.get(image_id, ()) if o["category"] == phrase]
        ok = bool(same) and bool((box_iou(np.asarray(box), np.asarray(same)) >= iou).any())
        t = tally.setdefault(split, [0, 0])
        t[0] += 1
        t[1] += int(ok)

    def entry(judged: int, correct: int) -> dict:
        return {"judged": judged, "correct": correct,
                "precision": round(correct / judged, 4) if judged else None}

    judged = sum(t[0] for t in tally.values())
    correct = sum(t[1] for t in tally.values())
    return {**entry(judged, correct),
            "by_split": {s: entry(*tally[s]) for s in sorted(tally)}}


def text_spans(caption: str, phrase: str) -> list[tuple[int, int]]:
    """[start, end) of each case-insensitive, word-boundary occurrence of `phrase`'s words in
    `caption` (any punctuation or spacing between them): a phrase outside the dictionary."""
    w = words(phrase)
    if not w:
        return []
    pattern = (r"(?<![^\W_])" + r"[\W_]+".join(map(re.escape, w)) + r"(?![^\W_])")
    return [(m.start(), m.end()) for m in re.finditer(pattern, caption, re.IGNORECASE)]


def mention_spans(caption: str, phrases: Sequence[str], dictionary: ConceptDictionary
                  ) -> dict[str, list[tuple[int, int]]]:
    """phrase -> the [start, end) spans of its mentions in `caption`: a dictionary concept's
    matches (`phrase_spans`), else its words wherever they occur (`text_spans`)."""
    found: dict[str, list[tuple[int, int]]] = {}
    for name, s, e in phrase_spans(caption, dictionary):
        found.setdefault(name, []).append((s, e))
    return {p: found.get(p) or text_spans(caption, p) for p in phrases}


def grounding_doc(kept: Sequence[dict], pairs: Mapping[int, dict],
                  dictionary: ConceptDictionary, categories: Sequence[dict],
                  info: dict) -> tuple[dict, int]:
    """The MDETR-format document of the kept pseudo-boxes.

    kept: {"image_id", "phrase", "rank", "box" (x1, y1, x2, y2), "score"}, in output order;
    pairs: image id -> pairs row (caption, file, offset, size, width, height);
    categories: [{"id", "name", "split"}]. -> (doc, boxes left out for want of a span)
    """
    ids = {c["name"]: c["id"] for c in categories}
    by_image: dict[int, list[dict]] = {}
    for k in kept:
        by_image.setdefault(int(k["image_id"]), []).append(k)
    images, annotations, no_span = [], [], 0
    for image_id in sorted(by_image):
        row = pairs[image_id]
        caption = row["caption"]
        spans = mention_spans(caption, [k["phrase"] for k in by_image[image_id]], dictionary)
        anns = []
        for k in by_image[image_id]:
            if not spans[k["phrase"]]:
                no_span += 1
                continue
            x1, y1, x2, y2 = (float(v) for v in k["box"])
            ann = {"id": len(annotations) + len(anns) + 1, "image_id": image_id,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                   "iscrowd": 0, "tokens_positive": [list(s) for s in spans[k["phrase"]]],
                   "phrase": k["phrase"], "score": float(k["score"]), "rank": int(k["rank"])}
            if k["phrase"] in ids:
                ann["category_id"] = ids[k["phrase"]]
            anns.append(ann)
        if not anns:
            continue
        image = {"id": image_id, "file_name": row["file"], "width": int(row["width"]),
                 "height": int(row["height"]), "caption": caption}
        if row["offset"] >= 0:
            image.update(offset=int(row["offset"]), size=int(row["size"]))
        images.append(image)
        annotations.extend(anns)
    doc = {"info": info, "images": images, "annotations": annotations,
           "categories": [dict(c) for c in categories]}
    return doc, no_span


# ----------------------------------------------------------------------------- reading


def rows_of(files: list[Path], image_ids, columns: list[str] | None = None) -> pa.Table | None:
    """The rows of `image_ids` in Parquet `files` (None without files)."""
    if not files:
        return None
    data = pads.dataset([str(f) for f in files], format="parquet")
    return data.to_table(columns=columns,
                         filter=pads.field("image_id").isin(pa.array(list(image_ids),
                                                                     pa.int64())))


def fixed_list(column: pa.ChunkedArray | pa.Array, dim: int | None = None) -> np.ndarray:
    """fixed_size_list<float>[D] -> float32[R, D]."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = dim or col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def candidates(regions: pa.Table, phrases: pa.Table) -> tuple[pa.Table, int]:
    """Every phrase's best region, per pair present in both tables.

    regions: pair_regions rows (image_id, rank, box, embedding [D]); phrases: phrases rows
    (image_id, phrases list<string>, phrase_emb list<[D]>). -> (SCHEMA rows sorted by image
    id then phrase order; phrases of pairs without any region)
    """
    regions = regions.sort_by([("image_id", "ascending"), ("rank", "ascending")])
    ids = regions["image_id"].to_numpy()
    emb = fixed_list(regions["embedding"])
    boxes = fixed_list(regions["box"], 4)
    ranks = regions["rank"].to_numpy()
    uniq, first, count = np.unique(ids, return_index=True, return_counts=True)
    where = {int(i): (int(f), int(c)) for i, f, c in zip(uniq, first, count)}
    out = {name: [] for name in SCHEMA.names}
    without = 0
    phrases = phrases.sort_by("image_id")
    for image_id, names, vectors in zip(phrases["image_id"].to_pylist(),
                                        phrases["phrases"].to_pylist(),
                                        phrases["phrase_emb"].to_pylist()):
        names = names or []
        if not names:
            continue
        if image_id not in where:
            without += len(names)
            continue
        f, c = where[image_id]
        index, cos = best_matches(emb[f:f + c], np.asarray(vectors, np.float32))
        for name, j, s in zip(names, index, cos):
            out["image_id"].append(image_id)
            out["phrase"].append(name)
            out["rank"].append(int(ranks[f + j]))
            out["box"].append(boxes[f + j].tolist())
            out["score"].append(float(s))
    return pa.table(out, schema=SCHEMA), without


def pair_records(stage_dir: Path) -> dict[int, list[dict]]:
    """image id -> objects [{"category", "box"}] of the pairs stage's generator records."""
    out = {}
    for path in sorted(Path(stage_dir).glob("part-*.json")):
        if path.name.endswith(".stats.json"):
            continue
        for r in read_json(path):
            out[int(r["image_id"])] = r["objects"]
    return out


def vocabulary(ctx: StageContext) -> list[dict]:
    return [{"id": c.id, "name": c.name, "split": c.split} for c in ctx.dataset.categories()]


# ----------------------------------------------------------------------------- the stage


def inputs(ctx: StageContext, cfg: Config) -> dict[str, str]:
    out = {"pairs": ctx.fingerprint(layout.PAIRS)}
    if ctx.dataset.pairs is None:
        return out
    return {**out, "pair_regions": ctx.fingerprint(layout.PAIR_REGIONS),
            "phrases": ctx.fingerprint(layout.PHRASES),
            "vocabulary": canonical_hash(vocabulary(ctx))}


def plan(ctx: StageContext, cfg: Config) -> list[Part]:
    if cfg.threshold is not None and not -1.0 <= cfg.threshold <= 1.0:
        raise StageError(f"pseudo_boxes.threshold must be a cosine in [-1, 1] or null, got "
                         f"{cfg.threshold}")
    if not 0.0 < cfg.keep_fraction <= 1.0:
        raise StageError(f"pseudo_boxes.keep_fraction must be in (0, 1], got "
                         f"{cfg.keep_fraction}")
    if cfg.images_per_part < 1:
        raise StageError(f"pseudo_boxes.images_per_part must be >= 1, got "
                         f"{cfg.images_per_part}")
    if ctx.dataset.pairs is None:
        return []
    ids = read_pairs(ctx.files, columns=["image_id"])["image_id"].to_pylist()
    return chunk_parts(sorted(ids), cfg.images_per_part)


class Worker:
    def __init__(self, ctx: StageContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.region_files = ctx.files.parts(layout.PAIR_REGIONS)
        self.phrase_files = ctx.files.parts(layout.PHRASES)

    def run_part(self, part: Part, out: PartOutput) -> PartResult:
        regions = rows_of(self.region_files, part.items, ["image_id", "rank", "box",
                                                          "embedding"])
        phrases = rows_of(self.phrase_files, part.items, ["image_id", "phrases",
                                                          "phrase_emb"])
        if regions is None or phrases is None:
            table, without = SCHEMA.empty_table(), 0
            if phrases is not None:
                without = sum(len(p or []) for p in phrases["phrases"].to_pylist())
        else:
            table, without = candidates(regions, phrases)
        pq.write_table(table, out.tmp(f"{part.stem}.parquet"))
        return PartResult(rows=len(table), extra={"phrases_without_regions": without})


def read_candidates(ctx: StageContext) -> pa.Table:
    files = ctx.files.parts(NAME)
    if not files:
        return SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files])


def recorded_root(root: Path | None, cache: Path) -> str | None:
    """The pair image root as the pseudo file records it: relative to the dataset's cache
    folder when inside it ("pairs" for generated pairs, so a moved or copied cache still
    finds its images; the reader joins it to the cache folder), else absolute."""
    if root is None:
        return None
    try:
        return Path(root).resolve().relative_to(Path(cache).resolve()).as_posix()
    except ValueError:
        return str(Path(root).resolve())


def finalize(ctx: StageContext, cfg: Config, stats: list[dict]) -> dict:
    table = read_candidates(ctx)
    scores = table["score"].to_numpy() if len(table) else np.zeros(0, np.float32)
    mask, threshold = keep_mask(scores, cfg.threshold, cfg.keep_fraction)
    rule = ("fixed" if cfg.threshold is not None else
            f"keep the top {cfg.keep_fraction} of best-match cosines over all phrases")
    root = pair_image_root(ctx.dataset, ctx.files) if ctx.dataset.pairs is not None else None
    kept = table.filter(pa.array(mask)).to_pylist() if len(table) else []
    pairs = {}
    if kept:
        rows = read_pairs(ctx.files, columns=["image_id", "caption", "file", "offset", "size",
                                              "width", "height"])
        pairs = {r["image_id"]: r for r in rows.to_pylist()}
    categories = vocabulary(ctx)
    info = {"image_root": recorded_root(root, ctx.cache), "threshold": threshold, "rule": rule,
            "source": "ovdistill pseudo_boxes"}
    dictionary = manifest_dictionary(ctx.dataset) if kept else None
    doc, no_span = grounding_doc(kept, pairs, dictionary, categories, info)
    path = ctx.stage_dir(NAME) / layout.PSEUDO_FILE
    atomic_write_bytes(path, (json.dumps(doc) + "\n").encode())
    extra = {"file": layout.PSEUDO_FILE, "image_root": info["image_root"], "rule": rule,
             "threshold": threshold, "keep_fraction": cfg.keep_fraction,
             "candidates": len(table), "kept": int(mask.sum()), "no_span": no_span,
             "boxes": len(doc["annotations"]), "images": len(doc["images"]),
             "phrases_without_regions": sum(s.get("phrases_without_regions", 0)
                                            for s in stats),
             "teacher": (ctx.upstream(layout.PAIR_REGIONS).get("teacher")
                         if ctx.dataset.pairs is not None else None)}
    src = ctx.dataset.pairs
    if src is not None and src.format == "synthetic":
        records = pair_records(ctx.stage_dir(layout.PAIRS))
        splits = {c["name"]: c["split"] for c in categories}
        kept_boxes = [(a["image_id"], a["phrase"], xyxy(a["bbox"])) for a in doc["annotations"]]
        every = [(r["image_id"], r["phrase"], r["box"]) for r in table.to_pylist()]
        extra["precision"] = {"iou": cfg.iou,
                              "kept": precision_report(kept_boxes, records, splits, cfg.iou),
                              "all_candidates": precision_report(every, records, splits,
                                                                 cfg.iou)}
        p = extra["precision"]
        print(f"[pseudo_boxes] {extra['kept']} of {len(table)} phrases kept (threshold "
              f"{threshold}); precision @IoU{cfg.iou}: kept {p['kept']['precision']}, all "
              f"candidates {p['all_candidates']['precision']}")
    return extra


def xyxy(bbox: Sequence[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]
