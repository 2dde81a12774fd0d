"""The `teacher` stage: name or train the CLIP teacher and report its zero-shot accuracy.

A teacher is (open_clip model name, pretrained tag or local checkpoint path, optional
model-config JSON); pipeline/clip_teacher.py loads it. Its identity adds the sha256 of the
weights file; every stage that uses the teacher records that identity, so a cache built with
another teacher is refused.

The stage either loads the named weights (tag or path) or, when none are named (the embedded
default), trains a small CLIP from the packaged config `pipeline/teacher_configs/ovd-tiny-clip.json` on
the dataset's image-caption corpus with open_clip's own trainer (`open_clip_train.main`, run
as a subprocess). Either way it reports prompt-ensembled zero-shot accuracy on the val split's
ground-truth crops, base and novel separately.

`ovd-tiny-clip` is a timm ResNet image tower (`test_resnet`, 48 px) with a 2-layer text
transformer: at equal CPU cost a small CNN learned the toy shapes several times faster than a
ViT (3 layers, patch 8) in our runs, and the whole training must fit a few minutes on 2 cores.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from ovdistill.pipeline import layout
from ovdistill.pipeline.annotations import images_by_id, load_annotations
from ovdistill.pipeline.cache import sha256_file, tmp_path
from ovdistill.pipeline.clip_teacher import (  # noqa: F401 - the library's names, re-exported
    CONFIG_DIR,
    DEFAULT_MODEL,
    Teacher,
    TeacherError,
    TeacherSpec,
    load_teacher,
    prompt_templates,
    register_model_config,
    teacher_from_cache,
    text_embeddings,
)
from ovdistill.pipeline.errors import reject
from ovdistill.pipeline.manifests import ManifestError, contained_path, image_file
from ovdistill.pipeline.runner import Part, PartOutput, PartResult, StageContext

NAME = "teacher"
RESOURCES = {"num_cpus": 4, "num_gpus": 1}

# ----------------------------------------------------------------------------- zero-shot report


def classify(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """image_emb: Tensor[N, D], text_emb: Tensor[C, D] -> Tensor[N] index of the most
    cosine-similar class."""
    return (F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T
            ).argmax(dim=-1)


def split_accuracy(pred: torch.Tensor, label: torch.Tensor, is_novel: torch.Tensor) -> dict:
    """pred, label: Tensor[N] class indices; is_novel: Tensor[C] bool ->
    {"base_acc", "novel_acc", "n_crops"} (an accuracy is None when its split has no crop)."""
    correct = pred == label
    novel = is_novel[label]

    def acc(mask):
        n = int(mask.sum())
        return round(float(correct[mask].sum()) / n, 4) if n else None

    return {"base_acc": acc(~novel), "novel_acc": acc(novel), "n_crops": int(label.numel())}


def gt_boxes(ann_file: Path, category_ids: Sequence[int], max_crops: int | None,
             seed: int = 0) -> list[dict]:
    """Non-crowd GT annotations of `category_ids` at least a pixel wide and high, sorted by
    image then id; a seeded sample of `max_crops` of them when there are more. The file is
    read through `pipeline.annotations.load_annotations` (the kept, clipped boxes)."""
    valid = load_annotations(ann_file)
    images = images_by_id(valid.images)
    keep = set(category_ids)
    anns = [dict(a) for a in valid.annotations
            if a["category_id"] in keep and not a.get("iscrowd", 0)
            and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
    if max_crops and len(anns) > max_crops:
        anns = random.Random(seed).sample(anns, max_crops)
    anns.sort(key=lambda a: (a["image_id"], a["id"]))
    for a in anns:
        a["file_name"] = image_file(images[a["image_id"]])
    return anns


def crop_box(image, bbox_xywh: Sequence[float]):
    """The pixels of a COCO box [x, y, w, h] (grown to whole pixels, clipped to the image)."""
    x, y, w, h = bbox_xywh
    x1, y1 = max(0, math.floor(x)), max(0, math.floor(y))
    x2, y2 = min(image.width, math.ceil(x + w)), min(image.height, math.ceil(y + h))
    return image.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))


def zero_shot_report(teacher: Teacher, ann_file: Path, images_dir: Path, categories,
                     templates: Sequence, max_crops: int | None = None,
                     batch_size: int = 256, text: torch.Tensor | None = None
                     ) -> tuple[dict, list[dict]]:
    """Prompt-ensembled zero-shot classification of the GT crops of one split over all
    `categories` (pipeline.manifests.Category) -> (report, rejects). `text`: class
    embeddings Tensor[C, D] in `categories` order to classify by instead (a diagnostic's)."""
    from ovdistill.pipeline.images import ImageError, load_rgb

    categories = list(categories)
    index = {c.id: i for i, c in enumerate(categories)}
    if text is None:
        text = text_embeddings(teacher, [c.name for c in categories], templates)
    anns = gt_boxes(ann_file, list(index), max_crops)

    rejects: list[dict] = []
    feats, labels, batch, batch_labels = [], [], [], []

    def flush():
        if batch:
            feats.append(teacher.encode_images(torch.stack(batch)).cpu())
            labels.extend(batch_labels)
            batch.clear()
            batch_labels.clear()

    image, image_id = None, None
    for a in anns:
        if a["image_id"] != image_id:
            image_id = a["image_id"]
            try:
                image = load_rgb(contained_path(images_dir, a["file_name"]))
            except (ImageError, ManifestError) as e:
                image = None
                rejects.append(reject(image_id, a["file_name"], e))
        if image is None:
            continue
        batch.append(teacher.preprocess(crop_box(image, a["bbox"])))
        batch_labels.append(index[a["category_id"]])
        if len(batch) >= batch_size:
            flush()
    flush()

    is_novel = torch.tensor([c.split == "novel" for c in categories])
    if not labels:
        return {"base_acc": None, "novel_acc": None, "n_crops": 0, "per_category": {}}, rejects
    label = torch.tensor(labels)
    pred = classify(torch.cat(feats), text)
    report = split_accuracy(pred, label, is_novel)
    report["per_category"] = {
        c.name: round(float((pred[label == i] == i).float().mean()), 4)
        for i, c in enumerate(categories) if bool((label == i).any())
    }
    return report, rejects


# ----------------------------------------------------------------------------- training


def read_captions(csv_file: Path, root: Path) -> tuple[list[tuple[str, str]], list[dict]]:
    """Rows (absolute image path, caption) of an image-caption CSV with columns `filepath`
    (relative to `root`) and `title`; unreadable images and empty captions become rejects."""
    from PIL import Image, UnidentifiedImageError

    if not csv_file.is_file():
        raise TeacherError(
            f"teacher: no pretrained weights given and no caption corpus at {csv_file}; pass "
            f"--teacher-pretrained (an open_clip tag or checkpoint file)"
        )
    rows, rejects = [], []
    with open(csv_file, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"filepath", "title"} - set(reader.fieldnames or ())
        if missing:
            raise TeacherError(f"{csv_file}: missing column(s) {sorted(missing)} "
                               f"(have {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            title = " ".join((row["title"] or "").split())
            reason = None if title else "empty caption"
            try:
                path = contained_path(root, row["filepath"] or "").resolve()
                if not reason:
                    with Image.open(path) as im:
                        im.verify()
            except ManifestError as e:
                reason = f"{csv_file}: {e}"
            except (OSError, UnidentifiedImageError, SyntaxError) as e:
                reason = f"unreadable image ({type(e).__name__}: {e})"
            if reason:
                rejects.append(reject(line, row["filepath"], reason))
            else:
                rows.append((str(path), title))
    return rows, rejects


# Runs open_clip_train.main with our model configs registered (pandas, which its CSV dataset
# reads with, is a project dependency).
_TRAIN_BOOTSTRAP = """
import sys
import open_clip
from open_clip_train.main import main
for path in sys.argv[1].split(","):
    open_clip.add_model_config(path)
sys.exit(main(sys.argv[2:]) or 0)
"""


def train_command(cfg: "Config", spec: TeacherSpec, train_tsv: Path, logs: Path,
                  device: str, precision: str = "fp32") -> list[str]:
    """The `open_clip_train.main` command line (run with the packaged model configs added)."""
    cuda = torch.device(device).type == "cuda"
    configs = [str(CONFIG_DIR)] + ([str(Path(spec.model_config).resolve())]
                                   if spec.model_config else [])
    return [
        sys.executable, "-c", _TRAIN_BOOTSTRAP, ",".join(configs),
        "--train-data", str(train_tsv), "--dataset-type", "csv", "--csv-separator", "\t",
        "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--model", spec.model,
        "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size),
        "--lr", str(cfg.lr), "--wd", str(cfg.wd), "--warmup", str(cfg.warmup),
        "--workers", str(cfg.workers), "--seed", str(cfg.seed),
        "--aug-cfg", f"scale=({cfg.crop_scale_min},1.0)",
        "--device", "cuda" if cuda else "cpu",
        "--precision", "amp_bf16" if precision == "bf16" else "fp32",
        "--save-frequency", "0", "--log-every-n-steps", "10",
        "--logs", str(logs), "--name", "run",
    ]


def train_clip(cfg: "Config", spec: TeacherSpec, rows: list[tuple[str, str]], workdir: Path,
               device: str, precision: str = "fp32") -> tuple[dict, str, float]:
    """Train `spec.model` from scratch on `rows` with open_clip_train in a subprocess ->
    (state_dict, training log, CPU seconds the subprocess used)."""
    workdir.mkdir(parents=True, exist_ok=True)
    tsv = workdir / "train.tsv"
    with open(tsv, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    log_file = workdir / "stdout.log"
    cpu_before = _children_cpu_seconds()
    with open(log_file, "w") as log:
        proc = subprocess.run(train_command(cfg, spec, tsv, workdir / "logs", device,
                                            precision),
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    cpu_seconds = _children_cpu_seconds() - cpu_before
    log_text = log_file.read_text(errors="replace")
    checkpoint = workdir / "logs" / "run" / "checkpoints" / f"epoch_{cfg.epochs}.pt"
    if proc.returncode != 0 or not checkpoint.is_file():
        kept = workdir.parent / "train-failed.log"
        shutil.copyfile(log_file, kept)
        tail = [ln for ln in log_text.splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise TeacherError(f"teacher: open_clip_train exited with {proc.returncode}: "
                           f"{tail[0][:300]} (log: {kept})")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}, log_text, cpu_seconds


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def last_loss(log_text: str) -> float | None:
    """The last contrastive loss open_clip_train logged."""
    hits = re.findall(r"Contrastive_loss: ([0-9.]+)", log_text)
    return float(hits[-1]) if hits else None


# ----------------------------------------------------------------------------- release file


def release_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A trained teacher's state_dict as a committed release file holds it: every floating
    tensor in float16 (half the bytes: the toy teacher's 7.3 M parameters, 6.3 M of them
    open_clip's 49,408-token embedding table, fit in 15 MB), the others (BatchNorm's step
    counts) unchanged. open_clip loads it into its float32 model as it is. A finite value
    beyond float16's range (65,504) is refused, naming its tensor."""
    out = {}
    for k, v in state.items():
        v = v.detach()
        if v.is_floating_point():
            half = v.to(torch.float16)
            if bool((torch.isinf(half) & torch.isfinite(v)).any()):
                big = float(v[torch.isfinite(v)].abs().max())
                raise TeacherError(f"teacher tensor {k}: |value| {big:.6g} does not fit "
                                   f"float16 (max 65504); keep this teacher in float32")
            v = half
        out[k] = v
    return out


def write_release(weights: Path, out: Path) -> str:
    """Write `release_state` of the state_dict file `weights` to `out` (atomically) ->
    sha256 of `out`. torch.save writes no time stamp, so one input gives one file, byte for
    byte, for one file name: the archive inside is named after the file (the temporary's name
    up to its random suffix, i.e. `.<out name>`), so another name gives other bytes."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(out)
    torch.save(release_state(state), tmp)
    os.replace(tmp, out)
    return sha256_file(out)


def release_difference(a: Path, b: Path) -> str:
    """What differs between two state_dict files, in one line (keys, shapes, the largest
    absolute difference of a tensor)."""
    sa = torch.load(a, map_location="cpu", weights_only=True)
    sb = torch.load(b, map_location="cpu", weights_only=True)
    if sa.keys() != sb.keys():
        return f"keys differ: {sorted(set(sa) ^ set(sb))[:5]}"
    worst, name, changed = 0.0, None, 0
    for k in sa:
        if sa[k].shape != sb[k].shape:
            return f"{k}: shape {tuple(sa[k].shape)} != {tuple(sb[k].shape)}"
        if torch.equal(sa[k], sb[k]):
            continue
        changed += 1  # unequal with one shape: not empty
        d = float((sa[k].double() - sb[k].double()).abs().max())
        if d > worst:
            worst, name = d, k
    return (f"{changed} of {len(sa)} tensors differ, largest |difference| {worst:.3g} "
            f"({name})" if changed else
            "equal tensors; the bytes differ (torch.save records the file's name in its "
            "archive: give --out the committed file's name)")


# ----------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class Config:
    model: str = DEFAULT_MODEL  # open_clip model name
    pretrained: str | None = None  # open_clip tag or checkpoint file; None: train on captions
    model_config: str | None = None  # custom model-config JSON (file stem = model name)
    captions: str = layout.CAPTIONS_CSV  # image-caption corpus, relative to the dataset root
    # open_clip_train hyper-parameters (only when training)
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    wd: float = 0.1
    warmup: int = 100
    crop_scale_min: float = 0.9  # RandomResizedCrop scale lower bound
    workers: int = 1
    seed: int = 0
    # zero-shot report
    templates: str = "simple"  # open_clip.zero_shot_metadata list: simple | openai
    report_split: str = "val"
    report_max_crops: int = 5000
    report_batch: int = 256


def _spec(cfg: Config) -> TeacherSpec:
    return TeacherSpec(cfg.model, cfg.pretrained, cfg.model_config)


def inputs(ctx: StageContext, cfg: Config) -> dict[str, str]:
    out = {"dataset": ctx.fingerprint(layout.DATASET)}
    if cfg.pretrained and os.path.isfile(cfg.pretrained):
        out["weights_sha256"] = sha256_file(Path(cfg.pretrained))
    # A packaged config edited in place must not pass for the one the cache was built with.
    config = Path(cfg.model_config) if cfg.model_config else CONFIG_DIR / f"{cfg.model}.json"
    if config.is_file():
        out["model_config_sha256"] = sha256_file(config)
    return out


def plan(ctx: StageContext, cfg: Config) -> list[Part]:
    return [Part(index=0, items=(cfg.model,))]


class Worker:
    def __init__(self, ctx: StageContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.device = ctx.resolve_device()
        self.precision = ctx.resolve_precision()

    def run_part(self, part: Part, out: PartOutput) -> PartResult:
        cfg, ctx = self.cfg, self.ctx
        spec = _spec(cfg)
        extra: dict = {}
        rejects: list[dict] = []
        if cfg.pretrained:
            teacher = load_teacher(spec, self.device, self.precision)
        else:
            register_model_config(spec)
            rows, rejects = read_captions(ctx.dataset.root / cfg.captions, ctx.dataset.root)
            if len(rows) < cfg.batch_size:
                raise TeacherError(f"teacher: {ctx.dataset.root / cfg.captions} has "
                                   f"{len(rows)} usable rows, fewer than one batch "
                                   f"({cfg.batch_size})")
            workdir = tmp_path(out.dir / "train")
            start = time.time()
            try:
                state, log_text, cpu_seconds = train_clip(cfg, spec, rows, workdir,
                                                          self.device, self.precision)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            name = f"{spec.model}.pt"
            weights = out.tmp(name)
            torch.save(state, weights)
            out.tmp("train.log").write_text(log_text)
            teacher = load_teacher(replace(spec, pretrained=str(weights)), self.device,
                                   self.precision)
            teacher.identity["pretrained"] = str((out.dir / name).resolve())
            extra["train"] = {"seconds": round(time.time() - start, 1),
                              "cpu_seconds": round(cpu_seconds, 1),
                              "captions": len(rows), "final_loss": last_loss(log_text),
                              "device": self.device}
        split = ctx.dataset.split(cfg.report_split)
        report, bad = zero_shot_report(teacher, split.annotations, split.images,
                                       ctx.dataset.categories(),
                                       prompt_templates(cfg.templates),
                                       cfg.report_max_crops, cfg.report_batch)
        extra.update(teacher=teacher.identity, zero_shot=report)
        return PartResult(rows=1, rejects=rejects + bad, extra=extra)


def finalize(ctx: StageContext, cfg: Config, stats: list[dict]) -> dict:
    s = stats[0]
    out = {"teacher": s["teacher"], "zero_shot": s["zero_shot"]}
    if "train" in s:
        out["train"] = s["train"]
    print(f"[{NAME}] {json.dumps(out, sort_keys=True)}")
    return out
