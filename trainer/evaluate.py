"""`python -m ovdistill.trainer.evaluate`: detect on the val split over the whole vocabulary (base and
novel), write COCO-format detections and score them (pycocotools; lvis-api for LVIS manifests).

    python -m ovdistill.trainer.evaluate --manifest data_manifests/toy.yaml --cache cache --run runs/toy \
        [--ensemble] [--checkpoint PATH] [--max-images N] [--calibration mean_logit]

Writes <run>/detections_val.json and <run>/eval.json (with --ensemble: *_ensemble.json):
{"mode", "AP50_all", "AP50_base", "AP50_novel", "AP_all", "AP_base", "AP_novel",
 "AP50_per_class": {name: AP50}, "top_class": {"name", "share"}, ...} (LVIS adds APr / APc /
APf), and prints a table row. AP values are fractions in [0, 1]; a subset with no ground truth
gets null. "top_class" is the most frequent class among the written detections and its share
of them: a student whose regions collapse onto one text shows a share far above 1 / C.

`--calibration mean_logit` (`trainer/calibration.py`) subtracts from each class's logits its
mean logit over the RPN proposals of `--calibration-images N` (default 100) unlabeled train
images, centred over the classes, the images spread evenly over the train split by image id;
files *_mean_logit.json, the result records "calibration" and the subtracted "logit_bias"
per class.

A run of mode grounding (GLIP) scores class c by the mean sigmoid of its alignment logits
over c's tokens in `all_class_prompts(vocabulary)` (base and novel; `grounding_eval_names`
names a prompt, default 1, 0 = as many as the teacher's context holds; encoded once; eval.json
records them as "prompts"); the cache's teacher must be the one the run recorded. The
detections, their cap and the AP are as for the other modes; `--ensemble` and
`--calibration` are ViLD's and refused for it.

`--vocabulary base` is a diagnostic, not the open-vocabulary metric: the classifier gets only
the base texts and only base categories are scored (files *_base_vocab.json). Set beside the
full-vocabulary AP50_base it tells a student that cannot classify base objects from one whose
base classification is intact but whose regions some novel text outscores.

`--pictures` (`make eval` passes it) also writes <run>/<split>_detections<suffix>.png, ground
truth beside predictions for the first 8 evaluated images by id (base and novel categories in
two colours), and <run>/<split>_pr<suffix>.png, the base and novel precision-recall curves at
IoU 0.5 from the evaluator's precision array (`trainer/pictures.py`); the JSON files are the
same with or without it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ovdistill.pipeline.annotations import read_images, read_json_doc
from ovdistill.pipeline.errors import OvdError, reject, report
from ovdistill.pipeline.manifests import DatasetManifest, ManifestError, image_path, load_manifest
from ovdistill.pipeline.options import add_data_options
from ovdistill.pipeline.precision import autocast_setting
from ovdistill.trainer import distributed
from ovdistill.trainer.calibration import METHODS as CALIBRATIONS
from ovdistill.trainer.config import ConfigError, config_from_dict, detections_per_image
from ovdistill.trainer.data import resize_for_test
from ovdistill.trainer.inputs import (
    Vocabulary,
    load_vocabulary,
    text_parquet_path,
    vocabulary_extras,
)
from ovdistill.trainer.model import OpenVocabDetector
from ovdistill.trainer.train import CHECKPOINT, load_checkpoint
from torch import Tensor

TABLE_KEYS = ("AP50_novel", "AP50_base", "AP50_all", "AP_novel", "AP_base", "AP_all")


# ----------------------------------------------------------------------------- metrics


def _mean_valid(p: np.ndarray) -> float | None:
    valid = p[p > -1]
    return float(valid.mean()) if valid.size else None


def precision_summary(precision: np.ndarray, cat_ids: list[int], names: dict[int, str],
                      base_ids: set[int], novel_ids: set[int]) -> dict:
    """AP / AP50 over all, base and novel categories, and per-class AP50.

    precision: the evaluator's precision array reduced to [T, R, K] (area "all", largest
    maxDets; entries -1 where a category has no ground truth), T over IoU 0.50:0.95 with
    index 0 = IoU 0.5, K in the order of `cat_ids`. Averages run over the valid entries, as
    COCOeval.summarize does.
    """
    index = {c: k for k, c in enumerate(cat_ids)}
    out: dict = {}
    for name, ids in (("all", set(cat_ids)), ("base", base_ids), ("novel", novel_ids)):
        ks = sorted(index[c] for c in ids if c in index)
        out[f"AP_{name}"] = _mean_valid(precision[:, :, ks]) if ks else None
        out[f"AP50_{name}"] = _mean_valid(precision[0, :, ks]) if ks else None
    out["AP50_per_class"] = {names[c]: _mean_valid(precision[0, :, index[c]])
                             for c in cat_ids}
    return out


def coco_metrics(gt_json: str | Path, detections: list[dict], base_ids: set[int],
                 novel_ids: set[int], arrays: dict | None = None) -> dict:
    """pycocotools bbox evaluation of COCO-format `detections` against `gt_json`.
    `arrays`, when given, receives the reduced precision array [T, R, K] and its "cat_ids"
    (for the PR plot of `--pictures`)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
    cat_ids = sorted(gt.getCatIds())
    names = {c["id"]: c["name"] for c in gt.loadCats(cat_ids)}
    if not detections:
        precision = np.where(_has_gt(gt, cat_ids)[None, None, :], 0.0, -1.0)
        if arrays is not None:  # the shape COCOeval's would have: [T, R, K]
            arrays.update(precision=np.broadcast_to(precision, (10, 101, len(cat_ids))),
                          cat_ids=cat_ids)
        return precision_summary(precision, cat_ids, names, base_ids, novel_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # area all, maxDets 100
    if arrays is not None:
        arrays.update(precision=precision, cat_ids=cat_ids)
    return precision_summary(precision, cat_ids, names, base_ids, novel_ids)


def top_class(detections: list[dict], names: dict[int, str]) -> dict:
    """The most frequent category among COCO-format `detections` and its share of them:
    {"name", "share"} (both None without detections; a tie goes to the lower id).
    names: category id -> name."""
    if not detections:
        return {"name": None, "share": None}
    counts = Counter(d["category_id"] for d in detections)
    cid, n = max(counts.items(), key=lambda kv: (kv[1], -kv[0]))
    return {"name": names.get(cid, str(cid)), "share": round(n / len(detections), 4)}


def _has_gt(gt, cat_ids: list[int]) -> np.ndarray:
    return np.array([len(gt.getAnnIds(catIds=[c], iscrowd=None)) > 0 for c in cat_ids])


@contextlib.contextmanager
def _numpy_float_alias():
    # lvis-api 0.5.3 (its latest release) calls np.float, which NumPy 1.24 removed.
    added = not hasattr(np, "float")
    if added:
        np.float = float
    try:
        yield
    finally:
        if added:
            del np.float


def lvis_metrics(gt_json: str | Path, detections: list[dict], base_ids: set[int],
                 novel_ids: set[int], max_dets: int = 300, arrays: dict | None = None) -> dict:
    """lvis-api (federated) bbox evaluation; adds APr / APc / APf to the subset metrics.
    `arrays` as for `coco_metrics`."""
    from lvis import LVIS, LVISEval, LVISResults

    gt = LVIS(str(gt_json))
    cat_ids = sorted(gt.get_cat_ids())
    names = {c["id"]: c["name"] for c in gt.load_cats(cat_ids)}
    if not detections:
        if arrays is not None:
            arrays.update(precision=-np.ones((10, 101, len(cat_ids))), cat_ids=cat_ids)
        out = precision_summary(-np.ones((10, 101, len(cat_ids))), cat_ids, names, base_ids,
                                novel_ids)
        return {**out, "APr": 0.0, "APc": 0.0, "APf": 0.0}
    ev = LVISEval(gt, LVISResults(gt, detections, max_dets=max_dets), "bbox")
    with _numpy_float_alias():
        ev.run()
    precision = ev.eval["precision"][:, :, :, 0]  # area all
    if arrays is not None:
        arrays.update(precision=precision, cat_ids=cat_ids)
    out = precision_summary(precision, cat_ids, names, base_ids, novel_ids)
    res = ev.get_results()
    out.update({k: float(res[k]) for k in ("APr", "APc", "APf")})
    return out


# ----------------------------------------------------------------------------- inference


def load_run(checkpoint: Path, dataset: DatasetManifest, cache_dir: Path,
             device: torch.device) -> tuple[OpenVocabDetector, dict, Vocabulary]:
    """The trained model with the cache's vocabulary (refused if its D differs)."""
    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_dict(ckpt["config"])
    vocab = load_vocabulary(text_parquet_path(cache_dir, dataset.name),
                            expect_dim=int(ckpt["embed_dim"]))
    model = OpenVocabDetector(cfg, vocab.dim, detections_per_image(cfg, dataset.format))
    if cfg.mode == "grounding":  # before the weights: token_proj (and text_encoder) are in
        attach_grounding_teacher(model, ckpt, cache_dir, device, checkpoint)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    # negative prompts are background aliases at inference too (OpenVocabDetector.detect)
    model.set_vocabulary(vocab.embeddings, vocab.is_base,
                         **vocabulary_extras(cfg, cache_dir, vocab.dim))
    if cfg.mode == "grounding":
        model.set_class_prompts(list(vocab.names))
    return model, ckpt, vocab


def attach_grounding_teacher(model: OpenVocabDetector, ckpt: dict, cache_dir: Path,
                             device: torch.device, checkpoint: Path) -> None:
    """A grounding run's text encoder: the cache's teacher (refused when it is not the one
    the run recorded), its class prompts encoded once (`PromptCache`)."""
    from ovdistill.pipeline.clip_teacher import teacher_from_cache
    from ovdistill.pipeline.layout import DatasetCache
    from ovdistill.trainer.train import check_teacher

    teacher = teacher_from_cache(DatasetCache(cache_dir), device=str(device),
                                 precision=model.cfg.precision)
    check_teacher(ckpt.get("teacher"), teacher.identity, str(checkpoint))
    model.eval()
    model.attach_teacher(teacher, cache_prompts=True)


def coco_results(image_id: int, boxes: Tensor, scores: Tensor, labels: Tensor,
                 category_ids: Sequence[int]) -> list[dict]:
    """One image's detections in the COCO results format: boxes Tensor[K, 4] (x1, y1, x2, y2)
    in original pixels, scores Tensor[K], labels Tensor[K] vocabulary indices."""
    return [{"image_id": image_id, "category_id": category_ids[c],
             "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
             "score": round(sc, 5)}
            for (x1, y1, x2, y2), sc, c in zip(boxes.float().tolist(), scores.float().tolist(),
                                               labels.tolist())]


def detect_split(model: OpenVocabDetector, vocab: Vocabulary, dataset: DatasetManifest,
                 split: str, *, ensemble: bool, batch_size: int = 8,
                 max_images: int | None = None, device: torch.device | None = None,
                 logit_bias: Tensor | None = None
                 ) -> tuple[list[dict], list[int], list[dict]]:
    """Detections (COCO results format, original pixels) on `split`'s images; `logit_bias`
    Tensor[C] is subtracted from the class logits (`calibration.mean_logit_bias`).
    Returns (detections, evaluated image ids, rejects)."""
    from ovdistill.pipeline.images import ImageError, load_rgb, to_uint8_tensor

    images = sorted(read_images(dataset.split(split).annotations), key=lambda im: im["id"])
    if max_images:
        images = images[:max_images]
    cfg = model.cfg
    device = device or torch.device("cpu")
    detections, done, rejects = [], [], []
    for start in range(0, len(images), batch_size):
        batch, records, scales = [], [], []
        for rec in images[start:start + batch_size]:
            folder = dataset.split(split).images
            path = folder  # until the record's file is known to stay inside it
            try:
                path = image_path(folder, rec)
                pixels = to_uint8_tensor(load_rgb(path))
            except (ImageError, ManifestError) as e:
                rejects.append(reject(rec["id"], path, e))
                continue
            resized, scale = resize_for_test(pixels, cfg.test_size, cfg.max_size)
            batch.append(resized.to(device))
            records.append(rec)
            scales.append(scale)
        if not batch:
            continue
        with autocast_setting(device, cfg.precision):
            calibrated = {} if logit_bias is None else {"logit_bias": logit_bias}
            results = model.detect(batch, ensemble=ensemble, **calibrated)
        for rec, scale, det in zip(records, scales, results):
            boxes = (det.boxes.float() / scale).cpu()
            detections += coco_results(int(rec["id"]), boxes, det.scores, det.labels,
                                       vocab.category_ids)
            done.append(int(rec["id"]))
    return detections, done, rejects


def restrict_gt(gt_json: Path, image_ids: list[int], out: Path,
                category_ids: Sequence[int] | None = None) -> Path:
    """A copy of `gt_json` holding only `image_ids` (for --max-images and rejected images)
    and, if given, only `category_ids` (for --vocabulary base)."""
    gt = read_json_doc(gt_json)  # raw: scored against the official records, none dropped
    keep = set(image_ids)
    all_cats = {c["id"] for c in gt["categories"]}
    cats = all_cats if category_ids is None else set(category_ids)
    if len(keep) == len(gt["images"]) and cats >= all_cats:
        return gt_json
    gt["images"] = [im for im in gt["images"] if im["id"] in keep]
    gt["categories"] = [c for c in gt["categories"] if c["id"] in cats]
    gt["annotations"] = [a for a in gt["annotations"]
                         if a["image_id"] in keep and a["category_id"] in cats]
    out.write_text(json.dumps(gt))
    return out


def result_suffix(ensemble: bool, base_vocab: bool, calibration: str | None = None) -> str:
    """What an evaluation appends to its file names: eval{suffix}.json (val;
    eval_<split>{suffix}.json for another split), detections_<split>{suffix}.json
    (calibration: a `calibration.METHODS` name or None)."""
    return (("_ensemble" if ensemble else "") + ("_base_vocab" if base_vocab else "")
            + (f"_{calibration}" if calibration else ""))


def format_row(result: dict) -> str:
    def pct(v):
        return "   -  " if v is None or (isinstance(v, float) and math.isnan(v)) \
            else f"{100 * v:6.1f}"

    head = f"{'mode':<10}" + "".join(f"{k:>11}" for k in TABLE_KEYS)
    row = f"{result['mode']:<10}" + "".join(f"{pct(result.get(k)):>11}" for k in TABLE_KEYS)
    top = result.get("top_class") or {}
    if top.get("name") is not None:
        head += "  top class (share of detections)"
        row += f"  {top['name']} {100 * top['share']:.1f}%"
    return head + "\n" + row


def format_per_class(result: dict) -> str:
    novel = set(result["novel_categories"])
    return "AP50 per class (* novel): " + ", ".join(
        f"{name}{'*' if name in novel else ''} {'-' if v is None else f'{100 * v:.1f}'}"
        for name, v in result["AP50_per_class"].items())


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovdistill.trainer.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(p, data_root=True, device=True)
    p.add_argument("--run", default="runs/toy", help="run folder (holds latest.pt)")
    p.add_argument("--checkpoint", default=None, help="default: <run>/latest.pt")
    p.add_argument("--split", default="val")
    p.add_argument("--ensemble", action="store_true",
                   help="ViLD-ensemble of the text and image heads (needs heads=separate)")
    p.add_argument("--vocabulary", choices=("all", "base"), default="all",
                   help="base: only the base texts and base categories (a diagnostic)")
    p.add_argument("--calibration", choices=("none", *CALIBRATIONS), default="none",
                   help="mean_logit: subtract each class's mean logit over the proposals of "
                        "unlabeled train images")
    p.add_argument("--calibration-images", type=int, default=100, metavar="N",
                   help="train images the calibration bias is measured on (default 100)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--pictures", action="store_true",
                   help="also write <split>_detections*.png (GT | predictions) and "
                        "<split>_pr*.png (base / novel PR curves)")
    return p


def calibrate(model: OpenVocabDetector, vocab: Vocabulary, dataset: DatasetManifest, args,
              device: torch.device) -> tuple[Tensor, dict]:
    """The `--calibration mean_logit` bias for the model's current vocabulary, measured on
    `--calibration-images` train images -> (bias Tensor[C], what the result records)."""
    from ovdistill.trainer.calibration import calibration_images, mean_logit_bias

    images, ids, rejects = calibration_images(dataset, args.calibration_images,
                                              model.cfg.test_size, model.cfg.max_size,
                                              device)
    if not images:
        raise ConfigError(f"--calibration {args.calibration}: no readable train image "
                          f"({len(rejects)} rejected)")
    bias = mean_logit_bias(model, images, args.batch_size)
    values = [round(float(b), 4) for b in bias.cpu()]
    # one value per text of the model's vocabulary: by name when those are the category texts
    named = len(values) == len(vocab.names)
    return bias, {"calibration_images": ids,
                  "logit_bias": dict(zip(vocab.names, values)) if named else values}


def evaluate(args) -> dict:
    device = torch.device(distributed.resolve_device(args.device))
    run = Path(args.run)
    dataset = load_manifest(args.manifest, cache_root=args.cache, data_root=args.data_root)
    cache_dir = Path(args.cache) / dataset.name
    model, ckpt, vocab = load_run(Path(args.checkpoint or run / CHECKPOINT), dataset,
                                  cache_dir, device)
    if args.ensemble and model.image_tower is None:
        raise ConfigError(f"{args.checkpoint or run / CHECKPOINT}: --ensemble needs a run "
                          f"trained with --heads separate (this one has heads=shared)")
    if model.cfg.mode == "grounding" and (args.ensemble or args.calibration != "none"):
        raise ConfigError("--ensemble and --calibration score ViLD's softmax; a grounding run "
                          "scores its alignment logits (drop them)")
    base_vocab = args.vocabulary == "base"
    if base_vocab:
        vocab = vocab.base_only()
        model.set_vocabulary(vocab.embeddings, vocab.is_base)
        if model.cfg.mode == "grounding":
            model.set_class_prompts(list(vocab.names))
    calibration = None if args.calibration == "none" else args.calibration
    bias, calibration_info = None, {}
    if calibration:
        bias, calibration_info = calibrate(model, vocab, dataset, args, device)
    t0 = time.time()
    detections, image_ids, rejects = detect_split(
        model, vocab, dataset, args.split, ensemble=args.ensemble,
        batch_size=args.batch_size, max_images=args.max_images, device=device,
        logit_bias=bias)
    seconds = time.time() - t0
    suffix = result_suffix(args.ensemble, base_vocab, calibration)
    run.mkdir(parents=True, exist_ok=True)
    (run / f"detections_{args.split}{suffix}.json").write_text(json.dumps(detections))

    base_ids = {c for c, b in zip(vocab.category_ids, vocab.is_base.tolist()) if b}
    novel_ids = set(vocab.category_ids) - base_ids
    gt = restrict_gt(dataset.split(args.split).annotations, image_ids,
                     run / f"gt_{args.split}_subset{suffix}.json",
                     vocab.category_ids if base_vocab else None)
    arrays: dict = {}
    if dataset.format == "lvis":
        metrics = lvis_metrics(gt, detections, base_ids, novel_ids,
                               max_dets=model.detections_per_image, arrays=arrays)
    else:
        metrics = coco_metrics(gt, detections, base_ids, novel_ids, arrays=arrays)
    result = {"mode": "ensemble" if args.ensemble else ckpt["config"]["mode"],
              "train_mode": ckpt["config"]["mode"], "heads": ckpt["config"]["heads"],
              "vocabulary": args.vocabulary, "calibration": calibration, **calibration_info,
              **metrics, "step": int(ckpt["step"]), "split": args.split,
              "top_class": top_class(detections, dict(zip(vocab.category_ids, vocab.names))),
              "novel_categories": [n for n, b in zip(vocab.names, vocab.is_base.tolist())
                                   if not b],
              "n_images": len(image_ids), "n_detections": len(detections),
              "rejects": rejects, "seconds": round(seconds, 2),
              "checkpoint": str(args.checkpoint or run / CHECKPOINT),
              "teacher": ckpt.get("teacher")}
    if model.cfg.mode == "grounding":  # how the vocabulary was put to the text encoder
        result["prompts"] = [p.text for p in model.class_prompts]
    # another split's result sits beside val's, never over it (the ablation reads eval.json)
    name = f"eval{suffix}.json" if args.split == "val" else f"eval_{args.split}{suffix}.json"
    (run / name).write_text(json.dumps(result, indent=2) + "\n")
    if getattr(args, "pictures", False):
        from ovdistill.trainer.pictures import eval_pictures

        paths = eval_pictures(run, args.split, suffix, gt, dataset.split(args.split).images,
                              detections, dict(zip(vocab.category_ids, vocab.names)),
                              base_ids, arrays["precision"], arrays["cat_ids"], metrics,
                              f"{run.name} ({result['mode']})")
        print("pictures: " + ", ".join(str(p) for p in paths))
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(args)
    except OvdError as e:
        return report(e)
    print(format_row(result))
    print(format_per_class(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
