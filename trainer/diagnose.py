"""`python -m ovdistill.trainer.diagnose`: has the student learned its teacher where objects are?

On the train shards' cached proposals that overlap a ground-truth box (IoU >= --iou) of a COCO
json naming EVERY object of those images (toy: `dataset/train_full.json`, whose novel boxes
the trainer never reads), each region is classified over the whole vocabulary twice:

    teacher  its cached CLIP embedding: the best that distillation can pass on
    student  the run's region embedding of the same box (the image head; the shared head
             when there is one)

and the report gives, for base and for novel objects, both accuracies, the mean
cosine(student, teacher), and the class the student names most with its share. A student far
below its teacher, with a low cosine and one class named for most regions, has learned the
teacher's common direction and not what tells regions apart (see `losses.
mean_direction_baseline`). Written to <run>/diagnose.json.

    python -m ovdistill.trainer.diagnose --manifest data_manifests/toy.yaml --cache cache \\
        --run runs/ablation/vild
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ovdistill.pipeline.annotations import AnnotationError, gt_boxes, read_json_doc
from ovdistill.pipeline.errors import OvdError
from ovdistill.pipeline.errors import report as report_error
from ovdistill.pipeline.layout import DATASET, TRAIN_FULL, DatasetCache
from ovdistill.pipeline.manifests import load_manifest
from ovdistill.pipeline.options import add_data_options
from ovdistill.trainer.data import resize_for_test
from ovdistill.trainer.inputs import shard_urls
from ovdistill.trainer.model import OpenVocabDetector, batch_images
from torch import Tensor
from torchvision.ops import box_iou


class DiagnoseError(OvdError, ValueError):
    """The diagnosis has nothing to measure; the message says why, in one line."""


def agreement(student: Tensor, teacher: Tensor, text: Tensor, labels: Tensor,
              is_base: Tensor, names: list[str]) -> dict:
    """Teacher and student zero-shot accuracy on regions with known classes.

    student, teacher: Tensor[N, D] L2-normalized region embeddings of the same N boxes;
    text: Tensor[C, D] L2-normalized; labels: Tensor[N] int64 vocabulary index of each
    region's object; is_base: Tensor[C] bool. Returns {"base": {...}, "novel": {...}} with n,
    teacher_acc, student_acc, cos (mean cosine student-teacher), student_top (the class the
    student names most) and student_top_share.
    """
    t_pred = (teacher @ text.t()).argmax(1)
    s_pred = (student @ text.t()).argmax(1)
    cos = (student * teacher).sum(1)
    out = {}
    for split, mask in (("base", is_base[labels]), ("novel", ~is_base[labels])):
        n = int(mask.sum())
        if n == 0:
            out[split] = {"n": 0}
            continue
        counts = torch.bincount(s_pred[mask], minlength=len(names))
        out[split] = {
            "n": n,
            "teacher_acc": round(float((t_pred[mask] == labels[mask]).float().mean()), 4),
            "student_acc": round(float((s_pred[mask] == labels[mask]).float().mean()), 4),
            "cos": round(float(cos[mask].mean()), 4),
            "student_top": names[int(counts.argmax())],
            "student_top_share": round(float(counts.max()) / n, 4),
        }
    return out


def matched_regions(boxes: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray,
                    iou: float) -> tuple[np.ndarray, np.ndarray]:
    """Cached boxes Tensor-like [M, 4] and GT [G, 4] (x1, y1, x2, y2) -> (indices of the boxes
    whose best IoU is >= iou, the label of that best GT box)."""
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    best, j = box_iou(torch.from_numpy(boxes), torch.from_numpy(gt_boxes)).max(1)
    keep = (best >= iou).numpy()
    return np.flatnonzero(keep), gt_labels[j.numpy()[keep]]


def student_embeddings(model: OpenVocabDetector, image: Tensor, boxes: Tensor) -> Tensor:
    """image: Tensor[3, H, W] uint8; boxes: Tensor[K, 4] in its pixels -> Tensor[K, D] from
    the image head at the model's test size."""
    x, scale = resize_for_test(image, model.cfg.test_size, model.cfg.max_size)
    batch = batch_images([x])
    features = model.backbone(batch.tensors)
    roi = model._roi_features(features, [boxes * scale], batch.image_sizes)
    return model._image_tower()(roi)[1]


def gt_by_image(path: Path, category_index: dict[int, int]) -> dict[int, tuple]:
    """COCO json -> {image_id: (boxes float32 [G, 4] x1y1x2y2, vocabulary indices [G])};
    annotations of categories outside the vocabulary are left out."""
    out = gt_boxes(read_json_doc(path), categories=category_index)
    return {i: (np.asarray([b for b, _ in v], np.float32),
                np.asarray([category_index[c] for _, c in v])) for i, v in out.items()}


def diagnose(model: OpenVocabDetector, vocab, urls: list[str], gt: dict[int, tuple],
             iou: float, max_images: int) -> dict:
    """Stream the shards in order, pair every matched cached region's teacher and student
    embeddings, and score them with `agreement`."""
    import webdataset as wds
    from ovdistill.pipeline.images import decode_rgb, to_uint8_tensor

    students, teachers, labels, n_images = [], [], [], 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        if meta["image_id"] not in gt:
            continue
        boxes = np.load(io.BytesIO(sample["boxes.npy"]), allow_pickle=False).astype(np.float32)
        idx, lab = matched_regions(boxes, *gt[meta["image_id"]], iou)
        if len(idx):
            image = to_uint8_tensor(decode_rgb(sample["jpg"], sample["__key__"]))
            with torch.no_grad():
                students.append(student_embeddings(model, image, torch.from_numpy(boxes[idx])))
            emb = np.load(io.BytesIO(sample["emb.npy"]), allow_pickle=False)[idx].astype(
                np.float32)
            # a center_targets model holds centred texts: centre the teacher the same way
            teachers.append(model._center(F.normalize(torch.from_numpy(emb), dim=-1)))
            labels.append(torch.from_numpy(lab))
        n_images += 1
        if n_images >= max_images:
            break
    if not labels:
        raise DiagnoseError("no cached proposal overlaps a ground-truth box of the given json "
                            "(is --gt the answer key of these shards' images?)")
    report = agreement(torch.cat(students).float(), torch.cat(teachers), model.text_emb,
                       torch.cat(labels), model.is_base, list(vocab.names))
    return {"n_images": n_images, "iou": iou, **report}


def format_report(report: dict) -> str:
    header = (f"{'objects':<8} {'n':>6} {'teacher acc':>12} {'student acc':>12} "
              f"{'cos(s, t)':>10}  student names most")
    lines = [header]
    for split in ("base", "novel"):
        r = report[split]
        if not r["n"]:
            lines.append(f"{split:<8} {0:>6}")
            continue
        lines.append(f"{split:<8} {r['n']:>6} {r['teacher_acc']:>12.3f} "
                     f"{r['student_acc']:>12.3f} {r['cos']:>10.3f}  {r['student_top']} "
                     f"({100 * r['student_top_share']:.0f} %)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ovdistill.trainer.evaluate import load_run

    p = argparse.ArgumentParser(prog="python -m ovdistill.trainer.diagnose", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(p)
    p.add_argument("--run", required=True, help="run folder holding latest.pt")
    p.add_argument("--gt", default=None, help="COCO json naming every object of the train "
                   f"images (default: <cache>/<dataset>/{DATASET}/{TRAIN_FULL})")
    p.add_argument("--shards", default=None, help="brace pattern (default: the cache's wds)")
    p.add_argument("--images", type=int, default=120, help="train images to look at")
    p.add_argument("--iou", type=float, default=0.5)
    args = p.parse_args(argv)
    try:
        dataset = load_manifest(args.manifest, cache_root=args.cache)
        cache_dir = Path(args.cache) / dataset.name
        gt_path = Path(args.gt) if args.gt else DatasetCache(cache_dir).train_full()
        if not gt_path.is_file():
            raise AnnotationError(f"{gt_path}: no ground-truth json (pass --gt)")
        model, _, vocab = load_run(Path(args.run) / "latest.pt", dataset, cache_dir,
                                   torch.device("cpu"))
        index = {c: i for i, c in enumerate(vocab.category_ids)}
        report = diagnose(model, vocab, shard_urls(args.shards, cache_dir),
                          gt_by_image(gt_path, index), args.iou, args.images)
    except OvdError as e:
        return report_error(e)
    report.update(run=str(args.run), gt=str(gt_path))
    (Path(args.run) / "diagnose.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
