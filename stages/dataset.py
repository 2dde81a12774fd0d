"""The `dataset` stage: make the dataset the other stages read, or check a real one.

With a `synthetic:` block in the manifest it draws the toy open-vocabulary dataset into its own
stage folder, which is the manifest's root:

    train/<file_name>.jpg, train.json   COCO format, ONLY base-category boxes (novel objects are
                                        in the pictures, unlabelled, as in OV-COCO / LVIS)
    val/<file_name>.jpg,   val.json     every category
    captions/<n>.jpg,      captions.csv image-caption corpus for the teacher (filepath, title)
    part-NNNNN.json                     the generator's own full record of each part

Without it (a real dataset) it generates nothing: it checks the files and the vocabulary,
validates every split's annotation file with `pipeline.annotations` and records the files'
sha256 and counts; downstream stages depend on its fingerprint. A structural problem (an
unknown image or category id, a repeated image or annotation id, a bbox that is not a list
of 4 numbers, ...) stops the run here, in one line naming the file, before any expensive
stage. Degenerate boxes (width or height <= 0, NaN/inf, entirely outside the image) are
dropped and boxes overshooting the image clipped, by the same rules every later stage's
reader applies; `_MANIFEST.json` records them as

    "dropped_annotations": {"count": N, "per_split": {split: n}, "examples": [
        {"split", "id", "image_id", "reason"}, ...]}              (at most 100 examples)
    "clipped_annotations": {"count": N, "per_split": {split: n}, "examples": [
        {"split", "id", "image_id", "bbox": [x, y, w, h] as in the file, "clipped": [...]}]}

and its counts are those of the kept annotations.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ovdistill.pipeline import layout
from ovdistill.pipeline.annotations import MAX_EXAMPLES, load_annotations
from ovdistill.pipeline.cache import atomic_write_bytes, canonical_hash, read_json, sha256_file
from ovdistill.pipeline.errors import OvdError
from ovdistill.pipeline.manifests import ManifestError
from ovdistill.pipeline.runner import (
    PLAN_FILE,
    Part,
    PartOutput,
    PartResult,
    StageContext,
    StageError,
    chunk_parts,
)
from ovdistill.stages import synthetic
from pycocotools import mask as mask_utils

NAME = "dataset"
RESOURCES = {"num_cpus": 1}
# Bump when the drawing code changes what a seed produces, so old caches are refused.
GENERATOR_VERSION = "3"
TRAIN_FULL = layout.TRAIN_FULL  # synthetic only: train images with novel boxes too
SPLIT_CODES = {"train": 0, "val": 1, "captions": 2}  # part of every image's RNG seed


@dataclass(frozen=True)
class Config:
    images_per_part: int = 100  # detection images (train, val) per part
    captions_per_part: int = 2500  # caption images per part
    jpeg_quality: int = 92


# ----------------------------------------------------------------------------- helpers


def synthetic_spec(ctx: StageContext) -> synthetic.SyntheticSpec | None:
    """The manifest's `synthetic:` block, validated; None for a real dataset."""
    block = ctx.dataset.synthetic
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ManifestError(f"{ctx.dataset.path}: 'synthetic' must be a mapping")
    try:
        return synthetic.SyntheticSpec.from_dict(block, f"{ctx.dataset.path}: synthetic")
    except (TypeError, ValueError) as e:
        raise ManifestError(str(e)) from None


def vocabulary(ctx: StageContext) -> list[str]:
    """Synthetic category names in id order (ids 1..K): base, then novel."""
    return synthetic.drawable_vocabulary(ctx.dataset, "a synthetic dataset needs")


def image_id(spec: synthetic.SyntheticSpec, split: str, index: int) -> int:
    """Image ids are 1..n_train for train, then n_train+1.. for val: unique across splits."""
    return index + 1 + (spec.n_train if split == "val" else 0)


def item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Each image has its own stream, so the output does not depend on how parts are cut."""
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def _relative(ctx: StageContext, path: Path) -> str:
    try:
        return str(path.relative_to(ctx.dataset.root))
    except ValueError:
        raise ManifestError(f"{ctx.dataset.path}: a synthetic split path must be under the root "
                            f"{ctx.dataset.root}, got {path}") from None


def _check_synthetic_layout(ctx: StageContext) -> None:
    ds = ctx.dataset
    stage_dir = ctx.stage_dir(NAME)
    if Path(ds.root).resolve() != stage_dir.resolve():
        raise ManifestError(f"{ds.path}: a synthetic dataset is written to its stage folder; "
                            f"set root to {stage_dir} (\"{{cache}}/{ds.name}/{NAME}\"), "
                            f"got {ds.root}")
    extra = sorted(set(ds.splits) - {"train", "val"})
    if extra:
        raise ManifestError(f"{ds.path}: the generator makes splits train and val, not {extra}")
    for s in ds.splits.values():
        _relative(ctx, s.images)
        _relative(ctx, s.annotations)


def _encode_jpeg(image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------- protocol


def inputs(ctx: StageContext, cfg: Config) -> dict[str, str]:
    spec = synthetic_spec(ctx)
    if spec is not None:
        _check_synthetic_layout(ctx)
        names = vocabulary(ctx)
        return {
            "synthetic": canonical_hash(asdict(spec)),
            "vocabulary": canonical_hash([names, len(ctx.dataset.base)]),
            "generator": GENERATOR_VERSION,
        }
    ctx.dataset.check_files()
    ctx.dataset.categories()  # the vocabulary must resolve before anything runs
    return {f"{s.name}.annotations": sha256_file(s.annotations)
            for s in ctx.dataset.splits.values()}


def plan(ctx: StageContext, cfg: Config) -> list[Part]:
    spec = synthetic_spec(ctx)
    if spec is None:
        return []
    parts: list[Part] = []
    todo = [("train", spec.n_train, cfg.images_per_part),
            ("val", spec.n_val if "val" in ctx.dataset.splits else 0, cfg.images_per_part),
            ("captions", spec.n_captions, cfg.captions_per_part)]
    for split, n, per_part in todo:
        for p in chunk_parts([(split, i) for i in range(n)], per_part):
            parts.append(Part(index=len(parts), items=p.items))
    return parts


class Worker:
    def __init__(self, ctx: StageContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.spec = synthetic_spec(ctx)
        self.names = vocabulary(ctx)
        self.folders = {s.name: _relative(ctx, s.images) for s in ctx.dataset.splits.values()}
        self.folders["captions"] = "captions"

    def run_part(self, part: Part, out: PartOutput) -> PartResult:
        records = []
        for split, index in part.items:
            rng = item_rng(self.spec.seed, split, index)
            if split == "captions":
                image, title = synthetic.caption_sample(
                    rng, self.names, self.spec.caption_size, self.spec.caption_crop_fraction,
                    self.spec.caption_colour_prob)
                rel = f"captions/{index:06d}.jpg"
                out.tmp(rel).write_bytes(_encode_jpeg(image, self.cfg.jpeg_quality))
                records.append({"split": split, "filepath": rel, "title": title})
                continue
            scene = synthetic.random_scene(rng, self.spec, self.names)
            iid = image_id(self.spec, split, index)
            file_name = f"{iid:06d}.jpg"
            out.tmp(f"{self.folders[split]}/{file_name}").write_bytes(
                _encode_jpeg(scene.image, self.cfg.jpeg_quality))
            records.append({
                "split": split, "image_id": iid, "file_name": file_name,
                "width": scene.image.width, "height": scene.image.height,
                "background": scene.background,
                "objects": [_object_record(o, self.names) for o in scene.objects],
            })
        with open(out.tmp(f"{part.stem}.json"), "w") as f:
            json.dump(records, f)
        split = part.items[0][0] if part.items else None
        n_obj = sum(len(r.get("objects", ())) for r in records)
        return PartResult(rows=len(records), extra={"split": split, "objects": n_obj})


def _object_record(o: synthetic.SceneObject, names: list[str]) -> dict:
    rle = mask_utils.encode(np.asfortranarray(o.mask.astype(np.uint8)))
    return {
        "category": o.category,
        "category_id": names.index(o.category) + 1,
        "colour": o.colour,
        "box": [round(v, 2) for v in o.box],
        "area": o.area,
        "segmentation": {"size": [int(x) for x in rle["size"]],
                         "counts": rle["counts"].decode("ascii")},
    }


def finalize(ctx: StageContext, cfg: Config, stats: list[dict]) -> dict:
    spec = synthetic_spec(ctx)
    if spec is None:
        try:
            return _describe_real(ctx)
        except OvdError:
            # Nothing was built (a real dataset has no parts): leave no plan behind, so the
            # corrected files are checked anew instead of being refused as "other inputs".
            stage_dir = ctx.stage_dir(NAME)
            (stage_dir / PLAN_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                stage_dir.rmdir()  # only when empty
            raise
    return _assemble_synthetic(ctx, spec, stats)


# ----------------------------------------------------------------------------- synthetic


def _assemble_synthetic(ctx: StageContext, spec, stats: list[dict]) -> dict:
    stage_dir = ctx.stage_dir(NAME)
    names = vocabulary(ctx)
    base = set(ctx.dataset.base)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"}
                  for i, n in enumerate(names)]
    splits = {n: ("base" if n in base else "novel") for n in names}
    images: dict[str, list] = {"train": [], "val": []}
    anns: dict[str, list] = {"train": [], "val": []}
    captions: list[dict] = []
    train_full: list[dict] = []  # every train object, novel included: never read by training
    unlabelled_novel = 0
    per_category = {"train": Counter(), "val": Counter()}
    for s in sorted(stats, key=lambda s: s["part"]):
        for r in read_json(layout.part_file(stage_dir, s["part"], ".json")):
            if r["split"] == "captions":
                captions.append({"filepath": r["filepath"], "title": r["title"]})
                continue
            split = r["split"]
            images[split].append({"id": r["image_id"], "file_name": r["file_name"],
                                  "width": r["width"], "height": r["height"]})
            for o in r["objects"]:
                x1, y1, x2, y2 = o["box"]
                ann = {
                    "id": 0, "image_id": r["image_id"], "category_id": o["category_id"],
                    "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
                    "area": o["area"], "iscrowd": 0, "segmentation": o["segmentation"],
                }
                if split == "train":
                    train_full.append(dict(ann))
                if split == "train" and o["category"] not in base:
                    unlabelled_novel += 1
                    continue
                anns[split].append(ann)
                per_category[split][o["category"]] += 1
    next_id = 1
    for split in ("train", "val"):
        for a in anns[split]:
            a["id"] = next_id
            next_id += 1
    for i, a in enumerate(train_full, 1):
        a["id"] = i

    files = {}
    for split in ("train", "val"):
        if split not in ctx.dataset.splits:
            continue
        path = ctx.dataset.splits[split].annotations
        doc = {"info": {"description": f"synthetic shapes ({ctx.dataset.name}), seed {spec.seed}",
                        "version": GENERATOR_VERSION},
               "images": images[split], "annotations": anns[split], "categories": categories}
        atomic_write_bytes(path, json.dumps(doc, separators=(",", ":")).encode())
        files[_relative(ctx, path)] = sha256_file(path)
    if "train" in ctx.dataset.splits:
        # The oracle answer key for `pipeline query` on train images (precision@k of novel
        # prompts); training reads the manifest's train.json, which holds base boxes only.
        doc = {"info": {"description": f"synthetic shapes ({ctx.dataset.name}), seed "
                                       f"{spec.seed}: train split, every category",
                        "version": GENERATOR_VERSION},
               "images": images["train"], "annotations": train_full, "categories": categories}
        atomic_write_bytes(stage_dir / TRAIN_FULL, json.dumps(doc, separators=(",", ":")).encode())
        files[TRAIN_FULL] = sha256_file(stage_dir / TRAIN_FULL)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["filepath", "title"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(captions)
    atomic_write_bytes(stage_dir / layout.CAPTIONS_CSV, buf.getvalue().encode())
    files[layout.CAPTIONS_CSV] = sha256_file(stage_dir / layout.CAPTIONS_CSV)

    return {
        "counts": {
            "images": {k: len(v) for k, v in images.items()},
            "boxes": {k: len(v) for k, v in anns.items()},
            "unlabelled_novel_in_train": unlabelled_novel,
            "per_category": {k: dict(sorted(v.items(), key=lambda kv: names.index(kv[0])))
                             for k, v in per_category.items()},
            "captions": len(captions),
        },
        "categories": [{**c, "split": splits[c["name"]]} for c in categories],
        "files": files,
    }


# ----------------------------------------------------------------------------- real data


def _check_some_images(ctx: StageContext, split: str, images: list[dict], n: int = 5) -> None:
    """The first, last and a few evenly spaced images must exist: a wrong image folder is
    reported here, in one line, rather than as thousands of rejects later."""
    if not images:
        return
    picks = sorted({round(i * (len(images) - 1) / max(n - 1, 1)) for i in range(n)})
    for i in picks:
        path = ctx.dataset.image_path(split, images[i])
        if not path.is_file():
            raise StageError(f"{ctx.dataset.path}: split '{split}': image {path} (image id "
                             f"{images[i].get('id')}) is missing; is the image folder right?")


def _describe_real(ctx: StageContext) -> dict:
    """Validate every split's annotation file (`pipeline.annotations`: a structural problem
    stops here, in one line; degenerate boxes are dropped and overshooting ones clipped, as
    every later stage's reader does) and describe what the later stages will see."""
    ds = ctx.dataset
    ds.check_files()
    cats = ds.categories()
    split_of = {c.id: c.split for c in cats}
    counts: dict = {"images": {}, "boxes": {}, "per_category": {}}
    files = {}
    dropped: dict = {"count": 0, "per_split": {}, "examples": []}
    clipped: dict = {"count": 0, "per_split": {}, "examples": []}
    for s in ds.splits.values():
        valid = load_annotations(s.annotations)
        _check_some_images(ctx, s.name, valid.images)
        by_cat = Counter(a["category_id"] for a in valid.annotations)
        counts["images"][s.name] = len(valid.images)
        counts["boxes"][s.name] = {
            "base": sum(n for c, n in by_cat.items() if split_of.get(c) == "base"),
            "novel": sum(n for c, n in by_cat.items() if split_of.get(c) == "novel"),
            "other": sum(n for c, n in by_cat.items() if c not in split_of),
        }
        counts["per_category"][s.name] = {str(c.id): by_cat.get(c.id, 0) for c in cats}
        files[s.name] = {"annotations": str(s.annotations), "sha256": sha256_file(s.annotations)}
        for total, rule in ((dropped, valid.dropped), (clipped, valid.clipped)):
            total["count"] += rule.count
            total["per_split"][s.name] = rule.count
            room = MAX_EXAMPLES - len(total["examples"])
            total["examples"] += [{"split": s.name, **e} for e in rule.examples[:room]]
    return {
        "counts": counts,
        "categories": [{"id": c.id, "name": c.name, "split": c.split} for c in cats],
        "n_base": sum(c.split == "base" for c in cats),
        "n_novel": sum(c.split == "novel" for c in cats),
        "files": files,
        "dropped_annotations": dropped,
        "clipped_annotations": clipped,
    }
