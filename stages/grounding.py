"""Stage `grounding`: the grounding data of the manifest's `grounding:` block (GLIP; MDETR's
format, pipeline/grounding.py): captions whose `tokens_positive` spans point at boxes.

Generated (`grounding: {synthetic: {...}}`, GroundingSpec): scenes like the pair images drawn
from the whole vocabulary whose captions name BASE categories only, every box of a named
category tied to its phrase (stages/synthetic.py `grounding_caption`); novel objects may be in
the picture, never named and never boxed. Image `index` has its own stream
`default_rng([seed, 4, index])` (split code 4: detection 0-2, pairs 3), so the output does not
depend on how parts are cut. Written here:

    images/NNNNNN.jpg      NNNNNN = image_id = index + 1
    part-NNNNN.json        the generator's full record: per image its objects (category,
                           colour, box, area, spans), background and caption
    grounding.json         assembled by finalize (atomically) from the parts, MDETR's format:
                           images {id, file_name "NNNNNN.jpg" (relative to images/), width,
                           height, caption}; annotations {id, image_id, category_id, bbox
                           [x, y, w, h], area, iscrowd 0, tokens_positive [[start, end]],
                           phrase_ids}; categories: the BASE categories only (ids as in the
                           dataset stage: base then novel, 1..K)

Real (`grounding: {annotations: file.json, images: folder}`): the file is validated by
`pipeline.grounding.load_grounding` when the stage is planned (a structural problem stops the
run in one line), and every image is decoded once: a missing or corrupt image, a file name
that leaves the folder, an image whose size is not the one its record gives is a reject with
its reason. part-NNNNN.json lists the kept images; the file itself is read in place
(`pipeline.grounding.grounding_paths`).

Without a `grounding:` block the stage plans zero parts and its manifest says `"images": 0`.
finalize() reports images, boxes, phrases per caption, dropped / clipped boxes (real) and how
many novel category names the captions hold (dictionary matching, longest first, as the
phrases stage): generated data must hold none, and the stage fails if it does.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass

import numpy as np
from ovdistill.pipeline import layout
from ovdistill.pipeline.cache import atomic_write_bytes, canonical_hash, read_json, sha256_file
from ovdistill.pipeline.errors import StageError, reject
from ovdistill.pipeline.grounding import grounding_paths, load_grounding
from ovdistill.pipeline.images import DEFAULT_MAX_PIXELS, ImageError, load_rgb
from ovdistill.pipeline.manifests import Category, ManifestError, image_path
from ovdistill.pipeline.phrases import ConceptDictionary, extract_phrases
from ovdistill.pipeline.runner import Part, PartOutput, PartResult, StageContext, chunk_parts
from ovdistill.stages import synthetic
from ovdistill.stages.synthetic import GroundingSpec

NAME = layout.GROUNDING
RESOURCES = {"num_cpus": 1}
# Bump when the drawing or caption code changes what a seed produces.
GENERATOR_VERSION = "grounding-1"
SPLIT_CODE = 4  # after stages/dataset.py SPLIT_CODES (0-2) and stages/pairs.py (3)


@dataclass(frozen=True)
class Config:
    images_per_part: int = 250
    jpeg_quality: int = 92  # generated images
    max_pixels: int = DEFAULT_MAX_PIXELS  # real images: larger ones are rejects


# ----------------------------------------------------------------------------- helpers


def grounding_spec(ctx: StageContext) -> GroundingSpec | None:
    """The `grounding: synthetic:` block, validated; None for a real source or no block."""
    src = ctx.dataset.grounding
    if src is None or src.format != "synthetic":
        return None
    try:
        return GroundingSpec.from_dict(src.synthetic or {},
                                       f"{ctx.dataset.path}: grounding.synthetic")
    except (TypeError, ValueError) as e:
        raise ManifestError(str(e)) from None


def vocabulary(ctx: StageContext) -> tuple[list[str], set[str]]:
    """(every category name, base then novel, in manifest order; the base names) of generated
    grounding data: the generator must be able to draw each one."""
    names = synthetic.drawable_vocabulary(ctx.dataset, "generated grounding data needs",
                                          "grounding.synthetic")
    return names, set(ctx.dataset.base)


def item_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODE, index])


def image_file(image_id: int) -> str:
    """A generated image's file name, relative to the grounding images folder."""
    return f"{image_id:06d}.jpg"


def draw_grounding(spec: GroundingSpec, names: list[str], base: set[str], index: int):
    """(scene, caption, spans per object) of generated grounding image `index`: a pure
    function of them (spans: a tuple of [start, end) per object, empty when not boxed)."""
    rng = item_rng(spec.seed, index)
    scene = synthetic.grounding_scene(rng, spec, names, base)
    caption, spans = synthetic.grounding_caption(rng, scene.objects, scene.background, names,
                                                 base, spec.name_prob)
    return scene, caption, spans


def _encode_jpeg(image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def vocabulary_dictionary(ctx: StageContext) -> ConceptDictionary:
    """The vocabulary (base and novel) as a phrase dictionary: which categories a caption
    names, longest match first (pipeline/phrases.py)."""
    ds = ctx.dataset
    if ds.base is not None:
        cats = [Category(i + 1, n, "base") for i, n in enumerate(ds.base)]
        cats += [Category(len(cats) + i + 1, n, "novel") for i, n in enumerate(ds.novel or ())]
    else:
        cats = ds.categories()
    return ConceptDictionary.build(cats)


def mention_report(captions: list[str], dictionary: ConceptDictionary) -> dict:
    """{"base": matches, "novel": matches, "captions_naming_novel": n, "novel_examples":
    [up to 10 names]} of vocabulary names in `captions`."""
    out = {"base": 0, "novel": 0, "captions_naming_novel": 0}
    examples: list[str] = []
    for c in captions:
        novel = 0
        for name, k in extract_phrases(c, dictionary):
            split = dictionary.split_of(name)
            if split in ("base", "novel"):
                out[split] += k
            if split == "novel":
                novel += k
                if name not in examples and len(examples) < 10:
                    examples.append(name)
        out["captions_naming_novel"] += novel > 0
    out["novel_examples"] = examples
    return out


def per_caption(values: list[int]) -> dict:
    """{"min", "mean", "max"} of a per-caption count; {} for no captions."""
    if not values:
        return {}
    return {"min": int(min(values)), "mean": round(float(np.mean(values)), 3),
            "max": int(max(values))}


# ----------------------------------------------------------------------------- protocol


def inputs(ctx: StageContext, cfg: Config) -> dict[str, str]:
    src = ctx.dataset.grounding
    if src is None:
        return {"grounding": "none"}
    spec = grounding_spec(ctx)
    if spec is not None:
        names, base = vocabulary(ctx)
        return {"format": "synthetic", "spec": canonical_hash(asdict(spec)),
                "vocabulary": canonical_hash([names, sorted(base)]),
                "generator": GENERATOR_VERSION}
    if not src.annotations.is_file():
        raise StageError(f"{ctx.dataset.path}: grounding.annotations {src.annotations} is "
                         f"{'not a file' if src.annotations.exists() else 'missing'}")
    if not src.images.is_dir():
        raise StageError(f"{ctx.dataset.path}: grounding.images {src.images} is "
                         f"{'not a folder' if src.images.exists() else 'missing'}")
    return {"format": src.format, "annotations": sha256_file(src.annotations),
            "images": str(src.images)}


def plan(ctx: StageContext, cfg: Config) -> list[Part]:
    src = ctx.dataset.grounding
    if src is None:
        return []
    spec = grounding_spec(ctx)
    if spec is not None:
        return chunk_parts(list(range(spec.n_images)), cfg.images_per_part)
    doc = load_grounding(src.annotations)  # a structural problem stops here, in one line
    return chunk_parts([im.id for im in doc.images], cfg.images_per_part)


class Worker:
    def __init__(self, ctx: StageContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.spec = grounding_spec(ctx)
        if self.spec is not None:
            self.names, self.base = vocabulary(ctx)
        else:
            self.annotations, self.root = grounding_paths(ctx.dataset, ctx.files)
            self.images = load_grounding(self.annotations).by_id()

    def run_part(self, part: Part, out: PartOutput) -> PartResult:
        if self.spec is not None:
            return self._generate(part, out)
        return self._check(part, out)

    def _generate(self, part: Part, out: PartOutput) -> PartResult:
        records, boxes = [], 0
        for index in part.items:
            scene, caption, spans = draw_grounding(self.spec, self.names, self.base, index)
            iid = index + 1
            file = image_file(iid)
            out.tmp(f"{layout.GROUNDING_IMAGES}/{file}").write_bytes(
                _encode_jpeg(scene.image, self.cfg.jpeg_quality))
            w, h = scene.image.size
            records.append({
                "image_id": iid, "file_name": file, "width": w, "height": h,
                "background": scene.background, "caption": caption,
                "objects": [{"category": o.category, "colour": o.colour,
                             "box": [round(v, 2) for v in o.box], "area": o.area,
                             "spans": [list(s) for s in sp]}
                            for o, sp in zip(scene.objects, spans)],
            })
            boxes += sum(bool(sp) for sp in spans)
        with open(out.tmp(f"{part.stem}.json"), "w") as f:
            json.dump(records, f)
        return PartResult(rows=len(records), extra={"boxes": boxes})

    def _check(self, part: Part, out: PartOutput) -> PartResult:
        kept, rejects, boxes = [], [], 0
        for iid in part.items:
            im = self.images[iid]
            name = im.record.get("file_name")
            try:
                path = image_path(self.root, im.record)
                size = load_rgb(path, self.cfg.max_pixels).size
                if size != (im.width, im.height):
                    raise ImageError(f"{path}: the image is {size[0]}x{size[1]}, its record "
                                     f"says {im.width}x{im.height}")
            except (ImageError, ManifestError) as err:
                rejects.append(reject(iid, name, err))
                continue
            kept.append({"image_id": iid, "file_name": name, "width": size[0],
                         "height": size[1]})
            boxes += len(im.spans)
        with open(out.tmp(f"{part.stem}.json"), "w") as f:
            json.dump(kept, f)
        return PartResult(rows=len(kept), rejects=rejects, extra={"boxes": boxes})


def finalize(ctx: StageContext, cfg: Config, stats: list[dict]) -> dict:
    src = ctx.dataset.grounding
    if src is None:
        return {"images": 0}
    out = {"format": src.format, "images": sum(s["rows"] for s in stats),
           "boxes": sum(s["boxes"] for s in stats),
           "rejects": sum(s["n_rejects"] for s in stats)}
    dictionary = vocabulary_dictionary(ctx)
    if src.format == "synthetic":
        return {**out, **_assemble(ctx, stats, dictionary)}
    doc = load_grounding(src.annotations)
    rejected = sorted(r["item"] for s in stats for r in s["rejects"])
    gone = set(rejected)
    images = [im for im in doc.images if im.id not in gone]
    return {**out, "annotations": str(src.annotations),
            "sha256": sha256_file(src.annotations), "image_folder": str(src.images),
            "rejected_image_ids": rejected,
            "phrases_per_caption": per_caption([len(im.phrase_groups()) for im in images]),
            "boxes_per_caption": per_caption([len(im.spans) for im in images]),
            "dropped_annotations": doc.dropped.as_dict(),
            "clipped_annotations": doc.clipped.as_dict(),
            "mentions": mention_report([im.caption for im in images], dictionary)}


def grounding_document(records: list[dict], names: list[str], base: set[str]) -> dict:
    """MDETR-format document of generated records (the parts' `part-NNNNN.json`, in image
    order): one annotation per boxed object (ids 1.. in that order), the base categories."""
    images, annotations = [], []
    for r in records:
        images.append({"id": r["image_id"], "file_name": r["file_name"], "width": r["width"],
                       "height": r["height"], "caption": r["caption"]})
        phrases: dict[tuple, int] = {}
        for o in r["objects"]:
            if not o["spans"]:
                continue
            x1, y1, x2, y2 = o["box"]
            key = tuple(map(tuple, o["spans"]))
            annotations.append({
                "id": len(annotations) + 1, "image_id": r["image_id"],
                "category_id": names.index(o["category"]) + 1,
                "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], "area": o["area"],
                "iscrowd": 0, "tokens_positive": o["spans"],
                "phrase_ids": phrases.setdefault(key, len(phrases)),
            })
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"}
                  for i, n in enumerate(names) if n in base]
    return {"images": images, "annotations": annotations, "categories": categories}


def _assemble(ctx: StageContext, stats: list[dict], dictionary: ConceptDictionary) -> dict:
    """Write grounding.json from the parts (atomically) and report on it; raises StageError
    when a caption names a novel category or a novel object is boxed (a generator bug)."""
    names, base = vocabulary(ctx)
    stage_dir = ctx.stage_dir(NAME)
    records = [r for s in sorted(stats, key=lambda s: s["part"])
               for r in read_json(layout.part_file(stage_dir, s["part"], ".json"))]
    doc = grounding_document(records, names, base)
    doc["info"] = {"description": f"synthetic grounding ({ctx.dataset.name}), seed "
                                  f"{grounding_spec(ctx).seed}", "version": GENERATOR_VERSION}
    path = stage_dir / layout.GROUNDING_FILE
    atomic_write_bytes(path, json.dumps(doc, separators=(",", ":")).encode())

    mentions = mention_report([r["caption"] for r in records], dictionary)
    objects = [o for r in records for o in r["objects"]]
    novel_boxed = sum(1 for o in objects if o["category"] not in base and o["spans"])
    if mentions["novel"] or novel_boxed:
        raise StageError(f"grounding: generated captions name {mentions['novel']} novel "
                         f"categories ({mentions['novel_examples']}) and {novel_boxed} novel "
                         f"objects are boxed; the novel protocol needs 0 (a generator bug)")
    return {
        "files": {layout.GROUNDING_FILE: sha256_file(path)},
        "phrases_per_caption": per_caption(
            [len({tuple(map(tuple, o["spans"])) for o in r["objects"] if o["spans"]})
             for r in records]),
        "boxes_per_caption": per_caption(
            [sum(bool(o["spans"]) for o in r["objects"]) for r in records]),
        "novel_names_in_captions": mentions["novel"],
        "novel_objects_boxed": novel_boxed,
        "novel_objects_unboxed": sum(1 for o in objects if o["category"] not in base),
        "base_objects_unnamed": sum(1 for o in objects
                                    if o["category"] in base and not o["spans"]),
        "captions_without_phrase": sum(1 for r in records
                                       if not any(o["spans"] for o in r["objects"])),
        "mentions": mentions,
    }
