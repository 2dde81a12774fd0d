"""`python -m ovdistill query TEXT`: text -> region search over the faiss index (faiss_index.py).

The text is embedded by the cache's own teacher (the prompt as given, L2-normalised), the
index returns the k most similar cached regions, and a contact sheet PNG shows each hit's
crop with its box and cosine similarity. Each hit is printed with the category of its
best-IoU ground-truth box where the dataset's annotation files (or `--gt` files) have one,
so precision@k can be read off. An open-vocabulary train split holds base boxes only, so
novel hits on train images are judged against a fuller file: `--gt`, or by default the
`train_full.json` that the dataset stage writes for a synthetic dataset.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ovdistill.pipeline.annotations import gt_boxes, read_json_doc
from ovdistill.pipeline.cache import read_json
from ovdistill.pipeline.errors import OvdError, report
from ovdistill.pipeline.layout import INDEX, DatasetCache
from ovdistill.pipeline.manifests import ManifestError, image_path, load_manifest
from ovdistill.pipeline.options import add_data_options
from ovdistill.pipeline.runner import StageContext, StageError

IOU_MATCH = 0.5  # a hit counts for precision@k when its best GT box overlaps this much


def add_arguments(p) -> None:
    p.add_argument("text", help="the query, used as given (e.g. 'a photo of a star')")
    add_data_options(p, manifest=None,
                     manifest_help="dataset manifest (default: the one the index stage recorded)",
                     device=True, device_help="auto | cpu | cuda (for the text encoder)")
    p.add_argument("--dataset", default="toy")
    p.add_argument("--k", type=int, default=24)
    p.add_argument("--out", default="results.png", help="contact sheet PNG")
    p.add_argument("--gt", action="append", default=[], metavar="JSON",
                   help="extra COCO/LVIS-format annotation file to match hits against")
    p.add_argument("--min-score", type=float, default=0.5,
                   help="search only regions whose proposal objectness score reaches this: "
                        "low-scored proposals are mostly object fragments and background, "
                        "which the teacher still names (0: every region)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit (IVF-PQ only)")
    p.add_argument("--cols", type=int, default=6, help="contact sheet columns")
    p.add_argument("--tile", type=int, default=160, help="contact sheet tile side in pixels")


# ----------------------------------------------------------------------------- GT


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: Path | None  # None: only a --gt file lists the image
    boxes: np.ndarray  # float32[G, 4] x1, y1, x2, y2
    category_ids: tuple[int, ...]


def image_records(ann_files: list[tuple[Path, Path]],
                  wanted: set[int]) -> tuple[dict[int, ImageRecord], set[int]]:
    """image_id -> its file and GT boxes, for the `wanted` ids, from (annotations json, image
    folder) pairs (later files add boxes to images an earlier one listed); and the category
    ids annotated anywhere in the files that hold a wanted image."""
    found: dict[int, ImageRecord] = {}
    annotated: set[int] = set()
    for ann, folder in ann_files:
        doc = read_json_doc(ann)  # lenient: answer keys and --gt files are not validated
        try:
            paths = {int(im["id"]): image_path(folder, im) for im in doc.get("images", [])
                     if int(im["id"]) in wanted}
        except ManifestError as e:
            raise ManifestError(f"{ann}: {e}") from None
        boxes = gt_boxes(doc, images=wanted, skip_crowd=True)
        cats = {int(a["category_id"]) for a in doc.get("annotations", [])}
        if paths or boxes:
            annotated |= cats
        for i in set(paths) | set(boxes):
            prev = found.get(i)
            items = [(list(b), c) for b, c in zip(prev.boxes.tolist(), prev.category_ids)] \
                if prev else []
            items += boxes.get(i, [])
            found[i] = ImageRecord(
                i, paths.get(i, prev.path if prev else None),
                np.array([b for b, _ in items], np.float32).reshape(-1, 4),
                tuple(c for _, c in items))
    return found, annotated


def best_gt(box, record: ImageRecord | None) -> tuple[int | None, float]:
    """box: (x1, y1, x2, y2) -> (category id of the GT box with the highest IoU, that IoU)."""
    import torch
    from torchvision.ops import box_iou

    if record is None or not len(record.boxes):
        return None, 0.0
    iou = box_iou(torch.tensor([box], dtype=torch.float32), torch.from_numpy(record.boxes))[0]
    j = int(iou.argmax())
    return record.category_ids[j], float(iou[j])


# ----------------------------------------------------------------------------- sheet


def tile_image(img: Image.Image, box, label: str, tile: int, context: float = 0.25) -> Image.Image:
    """A `tile` x `tile` thumbnail: the box plus `context` of its size on each side, the box
    drawn in red, `label` written top-left."""
    x1, y1, x2, y2 = box
    bw, bh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    cx1, cy1 = max(0, int(x1 - context * bw)), max(0, int(y1 - context * bh))
    cx2 = min(img.width, math.ceil(x2 + context * bw))
    cy2 = min(img.height, math.ceil(y2 + context * bh))
    crop = img.crop((cx1, cy1, max(cx2, cx1 + 1), max(cy2, cy1 + 1)))
    scale = tile / max(crop.width, crop.height)
    crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))))
    out = Image.new("RGB", (tile, tile), (32, 32, 32))
    ox, oy = (tile - crop.width) // 2, (tile - crop.height) // 2
    out.paste(crop, (ox, oy))
    draw = ImageDraw.Draw(out)
    draw.rectangle([ox + (x1 - cx1) * scale, oy + (y1 - cy1) * scale,
                    ox + (x2 - cx1) * scale, oy + (y2 - cy1) * scale], outline=(255, 0, 0),
                   width=2)
    font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((2, 2), label, font=font)
    draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=(0, 0, 0))
    draw.text((2, 2), label, fill=(255, 255, 255), font=font)
    return out


def contact_sheet(tiles: list[Image.Image], cols: int, tile: int) -> Image.Image:
    """Tiles in a grid of `cols` columns: a (cols * tile) x (rows * tile) RGB image."""
    cols = max(1, min(cols, len(tiles) or 1))
    rows = max(1, math.ceil(len(tiles) / cols))
    sheet = Image.new("RGB", (cols * tile, rows * tile), (0, 0, 0))
    for n, t in enumerate(tiles):
        sheet.paste(t, ((n % cols) * tile, (n // cols) * tile))
    return sheet


# ----------------------------------------------------------------------------- command


def index_record(cache_dir: Path) -> dict:
    path = DatasetCache(cache_dir).manifest_path(INDEX)
    if not path.exists():
        raise StageError(f"the index stage has not finished: {path} is missing; run "
                         f"`python -m ovdistill run --stages index` first")
    return read_json(path)


def query_embedding(ctx: StageContext, text: str, recorded_teacher: dict) -> np.ndarray:
    """The text's teacher embedding, float32[1, D] L2-normalised."""
    from ovdistill.pipeline.clip_teacher import teacher_from_cache

    teacher = teacher_from_cache(ctx, ctx.resolve_device())
    if teacher.identity != recorded_teacher:
        raise StageError(f"{ctx.stage_dir(INDEX)} was built with teacher "
                         f"{recorded_teacher} but the cache's teacher is {teacher.identity}; "
                         f"rebuild the index (`--stages index --rebuild`)")
    emb = teacher.encode_texts([text]).detach().float().cpu().numpy()
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def run(args) -> int:
    try:
        return _run(args)
    except OvdError as e:
        return report(e)


def _run(args) -> int:
    from ovdistill.pipeline.faiss_index import load_index, search
    from ovdistill.pipeline.images import ImageError, load_rgb

    cache_dir = Path(args.cache) / args.dataset
    rec = index_record(cache_dir)
    manifest = args.manifest or rec.get("dataset_manifest")
    if not manifest or not Path(manifest).exists():
        raise StageError(f"dataset manifest {manifest} (recorded by the index stage) not "
                         f"found; pass --manifest")
    dataset = load_manifest(manifest, cache_root=args.cache,
                            data_root=None if args.manifest else rec.get("data_root"))
    ctx = StageContext(dataset=dataset, cache=cache_dir, device=args.device)
    query = query_embedding(ctx, args.text, rec["teacher"])
    if query.shape[1] != rec["index"]["dim"]:
        raise StageError(f"text embedding dim {query.shape[1]} != index dim "
                         f"{rec['index']['dim']} ({ctx.stage_dir(INDEX)})")
    index, ids = load_index(ctx.stage_dir(INDEX), args.nprobe or rec["index"].get("nprobe"))
    hits = search(index, ids, query, args.k, args.min_score)[0]

    names = {c.id: c.name for c in dataset.categories()}
    ann_files = [(s.annotations, s.images) for s in dataset.splits.values()]
    gt_files = [Path(g) for g in args.gt]
    full = ctx.files.train_full()
    if not gt_files and "train" in dataset.splits and full.is_file():
        gt_files = [full]  # a synthetic dataset's answer key: train images, novel boxes too
    ann_files += [(g, dataset.split("train").images) for g in gt_files]
    records, annotated = image_records(ann_files, {h.image_id for h in hits})
    named = sorted((n for n in names.values()
                    if re.search(rf"\b{re.escape(n.lower())}\b", args.text.lower())),
                   key=len, reverse=True)

    scope = f", proposal score >= {args.min_score}" if args.min_score > 0 else ""
    print(f'query "{args.text}": {len(hits)} hits from {rec["index"]["factory"]} over '
          f'{rec["index"]["ntotal"]} regions{scope}')
    print(f"{'#':>3} {'image_id':>9} {'rank':>5} {'sim':>7}  {'box (x1, y1, x2, y2)':<28} "
          f"best-IoU GT")
    tiles, matches = [], 0
    for n, h in enumerate(hits, 1):
        record = records.get(h.image_id)
        cat, iou = best_gt(h.box, record)
        gt = f"{names.get(cat, cat)} ({iou:.2f})" if cat is not None else "-"
        if named and cat is not None and names.get(cat) == named[0] and iou >= IOU_MATCH:
            matches += 1
        box = "[" + ", ".join(f"{v:.1f}" for v in h.box) + "]"
        print(f"{n:>3} {h.image_id:>9} {h.rank:>5} {h.similarity:>7.4f}  {box:<28} {gt}")
        if record is None or record.path is None:
            print(f"    (image {h.image_id} is in no annotation file's image list: not drawn)")
            continue
        try:
            img = load_rgb(record.path)
        except ImageError as e:
            print(f"    ({e}: not drawn)")
            continue
        tiles.append(tile_image(img, h.box, f"{n} {h.similarity:.3f}", args.tile))
    if named:
        ids = {n: i for i, n in names.items()}
        if ids[named[0]] in annotated:
            print(f"precision@{len(hits)} for '{named[0]}' (best GT IoU >= {IOU_MATCH}): "
                  f"{matches}/{len(hits)}")
        else:
            print(f"precision@{len(hits)} for '{named[0]}': not measurable, the annotation "
                  f"files of these images have no '{named[0]}' box (an open-vocabulary train "
                  f"split holds base boxes only); pass --gt with a fuller file")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(tiles, args.cols, args.tile).save(out, format="PNG")
    print(f"contact sheet: {out} ({len(tiles)} tiles)")
    return 0
