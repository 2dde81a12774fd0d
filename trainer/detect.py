"""`python -m ovdistill.trainer.detect`: a trained run on your own images with your own class names.

    python -m ovdistill.trainer.detect --run runs/toy --cache cache [--manifest data_manifests/toy.yaml] \\
        --image a.jpg b.png --classes "red star,green heart,a red square" \\
        [--classes-file names.txt] [--ensemble] [--score 0.3] [--top 10] --out det.png

The class names are embedded by the cache's own teacher with the text stage's prompt ensemble
(`clip_teacher.category_embeddings`, the templates and `use_synonyms` the text stage recorded
in `text/_MANIFEST.json`), one class at a time, so a list of any length works. A name that
equals a category of the dataset (case, spacing and LVIS underscores aside) is embedded as
that category, synonyms included: the vector the text stage cached for it. The run's
checkpoint (`<run>/latest.pt` or `--checkpoint`, loaded weights-only) gets this vocabulary
(with the region mean and negatives the run trained with) and detects on each image.

Base or novel: ViLD-ensemble (`--ensemble`) weights the text head more for base classes
(p_text^(2/3) p_image^(1/3)) and the image head more for novel ones, because only the base
classes were ever labelled in training. So a class is base when its name equals a base
category of the run's vocabulary (the cache's `text/<dataset>.parquet`, what the run trained
on), and novel otherwise: a novel category of the dataset and a name the run never saw alike.
Without `--ensemble` the split changes no score; it is recorded in the JSON and marked with
a * in the picture's legend.

Writes the PNG (one panel per image: boxes with class and score, the `--top` best at score
>= `--score`, one colour per class) and beside it a COCO-style JSON (`det.png` -> `det.json`):
{"info": {...}, "images": [{"id", "file_name", "width", "height"}], "categories": [{"id",
"name", "split"}], "annotations": [{"id", "image_id", "file_name", "category_id", "category",
"bbox": [x, y, w, h] (original pixels), "score", "area"}]}, every detection at score >=
`--score` (at most the run's detections per image). An empty class list, a missing run or an
image that cannot be decoded is one `error:` line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from ovdistill.pipeline.clip_teacher import (
    TextPrompts,
    category_embeddings,
    prompt_templates,
    teacher_from_cache,
)
from ovdistill.pipeline.errors import OvdError, report
from ovdistill.pipeline.layout import TEXT, DatasetCache
from ovdistill.pipeline.manifests import Category, DatasetManifest, load_manifest
from ovdistill.pipeline.options import add_data_options
from ovdistill.pipeline.precision import autocast_setting, resolve_device
from ovdistill.trainer import distributed
from ovdistill.trainer.data import resize_for_test
from ovdistill.trainer.evaluate import coco_results, load_run
from ovdistill.trainer.inputs import Vocabulary
from ovdistill.trainer.model import OpenVocabDetector
from ovdistill.trainer.pictures import PALETTE, Box, grid, panel, with_header
from ovdistill.trainer.train import CHECKPOINT
from PIL import Image


class DetectError(OvdError, ValueError):
    """The command cannot run as asked; one line says why."""


# ----------------------------------------------------------------------------- classes


def name_key(name: str) -> str:
    """How class names are compared: LVIS underscores as spaces, spacing and case ignored."""
    return " ".join(name.replace("_", " ").split()).lower()


def parse_classes(classes: str | None, classes_file: str | None) -> list[str]:
    """The class names of `--classes` (comma-separated) then `--classes-file` (one a line;
    blank lines and lines starting with # skipped), spacing normalised, repeats (by
    `name_key`) dropped. Raises DetectError for an unreadable file or no name at all."""
    names = [] if classes is None else classes.split(",")
    if classes_file:
        try:
            lines = Path(classes_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DetectError(f"{classes_file}: cannot read the class list "
                              f"({getattr(e, 'strerror', None) or e})") from None
        names += [ln for ln in lines if not ln.strip().startswith("#")]
    seen, out = set(), []
    for n in (" ".join(n.split()) for n in names):
        if n and name_key(n) not in seen:
            seen.add(name_key(n))
            out.append(n)
    if not out:
        raise DetectError("no class names: pass --classes \"a,b,c\" or --classes-file with "
                          "one name a line")
    return out


def class_categories(names: list[str], run_vocab: Vocabulary,
                     dataset_categories: list[Category]) -> list[Category]:
    """One Category per name, ids 1..C in the given order: base when the name equals a base
    category of `run_vocab`, else novel; a name equal to a dataset category is prompted as
    that category (its name and synonyms, like the text stage), any other name as given."""
    base = {name_key(n) for n, b in zip(run_vocab.names, run_vocab.is_base.tolist()) if b}
    known = {name_key(c.name): c for c in dataset_categories}
    out = []
    for i, n in enumerate(names):
        c = known.get(name_key(n))
        out.append(Category(i + 1, c.name if c else n,
                            "base" if name_key(n) in base else "novel",
                            c.synonyms if c else ()))
    return out


TextSettings = TextPrompts  # templates, use_synonyms


def text_settings(cache, dataset: DatasetManifest | None = None) -> TextPrompts:
    """The prompt settings the cache's text stage recorded (its manifest's config), or,
    for a cache without one, the dataset manifest's `stages: text:` block over the stage's
    defaults. `cache`: a DatasetCache (with `dataset`) or a StageContext."""
    dataset = dataset if dataset is not None else cache.dataset
    recorded = (getattr(cache, "files", cache).read_manifest(TEXT, required=False)
                or {}).get("config")
    return TextPrompts.from_dict(recorded if recorded is not None
                                 else dataset.stages.get(TEXT, {}))


def class_embeddings(teacher, categories: list[Category], settings: TextPrompts
                     ) -> torch.Tensor:
    """Tensor[C, D] float32, L2-normalised: the text stage's own prompt ensemble."""
    return category_embeddings(teacher, categories, prompt_templates(settings.templates),
                               settings.use_synonyms)


# ----------------------------------------------------------------------------- detection


def read_images(paths: list[str]) -> list[Image.Image]:
    """Each file decoded the pipeline's way (`pipeline.images.load_rgb`); DetectError (one
    line naming the file) for one that cannot be."""
    from ovdistill.pipeline.images import ImageError, load_rgb

    out = []
    for p in paths:
        try:
            out.append(load_rgb(p))
        except ImageError as e:
            raise DetectError(f"--image {e}") from None
    return out


def detect_image(model: OpenVocabDetector, image: Image.Image, *, ensemble: bool,
                 score: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
    """One image through the model at its test size -> (boxes Tensor[K, 4] x1, y1, x2, y2 in
    the image's pixels, scores Tensor[K], vocabulary indices Tensor[K]), best first, the
    detections at score >= `score`."""
    from ovdistill.pipeline.images import to_uint8_tensor

    cfg = model.cfg
    resized, scale = resize_for_test(to_uint8_tensor(image), cfg.test_size, cfg.max_size)
    with autocast_setting(device, cfg.precision):
        det = model.detect([resized.to(device)], ensemble=ensemble)[0]
    keep = det.scores.float() >= score
    return ((det.boxes.float() / scale)[keep].cpu(), det.scores.float()[keep].cpu(),
            det.labels[keep].cpu())


def detections_json(paths: list[str], images: list[Image.Image], categories: list[Category],
                    names: list[str], results: list[tuple], info: dict) -> dict:
    """The COCO-style file (see the module docstring). results: per image (boxes, scores,
    labels) as `detect_image` returns them."""
    cat_ids = [c.id for c in categories]
    anns = []
    for image_id, (path, (boxes, scores, labels)) in enumerate(zip(paths, results), start=1):
        for d in coco_results(image_id, boxes, scores, labels, cat_ids):
            w, h = d["bbox"][2:]
            anns.append({"id": len(anns) + 1, **d, "file_name": path,
                         "category": names[d["category_id"] - 1],
                         "area": round(w * h, 2)})
    return {"info": info,
            "images": [{"id": i, "file_name": p, "width": im.width, "height": im.height}
                       for i, (p, im) in enumerate(zip(paths, images), start=1)],
            "categories": [{"id": c.id, "name": n, "split": c.split}
                           for c, n in zip(categories, names)],
            "annotations": anns}


def class_colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def detections_picture(paths: list[str], images: list[Image.Image], names: list[str],
                       categories: list[Category], results: list[tuple], top: int,
                       score: float, title: str, side: int = 384) -> Image.Image:
    """One panel per image (the `top` best boxes, labelled "class score"), 4 panels a row,
    under a header with the class colours (novel classes marked *)."""
    panels = []
    for path, image, (boxes, scores, labels) in zip(paths, images, results):
        shown = [Box(tuple(b), f"{names[c]} {s:.2f}", class_colour(c))
                 for b, s, c in zip(boxes.tolist()[:top], scores.tolist()[:top],
                                    labels.tolist()[:top])]
        more = f", {len(scores)} in all" if len(scores) > len(shown) else ""
        panels.append(panel(image, shown, side, f"{Path(path).name}  ({len(shown)}{more})"))
    legend = [(class_colour(i), n + ("*" if c.split == "novel" else ""))
              for i, (n, c) in enumerate(zip(names, categories))]
    return with_header(grid(panels, 4), f"{title}, score >= {score:g}  (* novel)", legend)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovdistill.trainer.detect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder (holds latest.pt)")
    p.add_argument("--checkpoint", default=None, help="default: <run>/latest.pt")
    add_data_options(p, data_root=True, device=True)
    p.add_argument("--image", nargs="+", required=True, metavar="PATH")
    p.add_argument("--classes", default=None, help='comma-separated, e.g. "star,a red square"')
    p.add_argument("--classes-file", default=None, help="one class name a line")
    p.add_argument("--ensemble", action="store_true",
                   help="ViLD-ensemble of the text and image heads (needs heads=separate)")
    p.add_argument("--score", type=float, default=0.3,
                   help="keep detections scoring at least this (default 0.3)")
    p.add_argument("--top", type=int, default=10,
                   help="boxes drawn per image, the best first (the JSON holds all)")
    p.add_argument("--side", type=int, default=384,
                   help="panel size in pixels: each image is scaled to this longer side")
    p.add_argument("--out", default="det.png", help="the PNG; the JSON goes beside it")
    return p


def check_teacher(ckpt: dict, teacher_identity: dict, checkpoint: Path, cache_dir: Path
                  ) -> None:
    """Refuse a cache whose teacher is not the one the run was trained with: its texts
    would live in another embedding space."""
    trained = ckpt.get("teacher")
    if trained and trained.get("sha256") != teacher_identity.get("sha256"):
        raise DetectError(f"{checkpoint} was trained with teacher {trained.get('model')} "
                          f"(sha256 {str(trained.get('sha256'))[:12]}), but {cache_dir} has "
                          f"{teacher_identity.get('model')} (sha256 "
                          f"{str(teacher_identity.get('sha256'))[:12]}); pass the run's cache")


def detect(args) -> dict:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise DetectError(f"--out {out}: must name a .png file (the JSON goes beside it)")
    names = parse_classes(args.classes, args.classes_file)
    images = read_images(args.image)
    checkpoint = Path(args.checkpoint or Path(args.run) / CHECKPOINT)
    if not checkpoint.is_file():
        raise DetectError(f"{checkpoint}: no checkpoint (--run must be a trained run folder "
                          f"holding {CHECKPOINT}, or pass --checkpoint)")
    device = torch.device(distributed.resolve_device(args.device))
    dataset: DatasetManifest = load_manifest(args.manifest, cache_root=args.cache,
                                             data_root=args.data_root)
    cache_dir = Path(args.cache) / dataset.name
    model, ckpt, run_vocab = load_run(checkpoint, dataset, cache_dir, device)
    if args.ensemble and model.image_tower is None:
        raise DetectError(f"{checkpoint}: --ensemble needs a run trained with --heads "
                          f"separate (this one has heads=shared)")

    cache = DatasetCache(cache_dir)
    teacher = teacher_from_cache(cache, resolve_device(device.type))
    check_teacher(ckpt, teacher.identity, checkpoint, cache_dir)
    settings = text_settings(cache, dataset)
    categories = class_categories(names, run_vocab, dataset.categories())
    emb = class_embeddings(teacher, categories, settings)
    if emb.shape[1] != model.embed_dim:
        raise DetectError(f"{cache_dir}: the teacher's texts have D={emb.shape[1]}, the run "
                          f"D={model.embed_dim}")
    is_base = torch.tensor([c.split == "base" for c in categories])
    model.set_vocabulary(emb, is_base)  # the run's region mean / negatives stay set
    if model.cfg.mode == "grounding":  # GLIP scores the given names' own prompts
        model.set_class_prompts(list(names))

    results = [detect_image(model, im, ensemble=args.ensemble, score=args.score,
                            device=device) for im in images]
    info = {"run": str(args.run), "checkpoint": str(checkpoint), "step": int(ckpt["step"]),
            "ensemble": bool(args.ensemble), "score_threshold": args.score,
            "teacher": teacher.identity, "templates": settings.templates,
            "use_synonyms": settings.use_synonyms}
    doc = detections_json(list(args.image), images, categories, names, results, info)
    title = f"{args.run} step {int(ckpt['step'])}" + (" ensemble" if args.ensemble else "")
    picture = detections_picture(list(args.image), images, names, categories, results,
                                 args.top, args.score, title, args.side)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, format="PNG", optimize=True)
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    return {"png": out, "json": json_path, "doc": doc}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        done = detect(args)
    except OvdError as e:
        return report(e)
    doc = done["doc"]
    for im in doc["images"]:
        mine = [a for a in doc["annotations"] if a["image_id"] == im["id"]]
        best = ", ".join(f"{a['category']} {a['score']:.2f}" for a in mine[:3])
        print(f"{im['file_name']}: {len(mine)} detections" + (f" (best: {best})" if best else ""))
    print(f"wrote {done['png']} and {done['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
