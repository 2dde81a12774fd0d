"""The CLIP teacher: who it is, how it loads, and the `teacher` stage.

A teacher is (open_clip model name, pretrained tag or local checkpoint path, optional
model-config JSON). Its identity adds the sha256 of the weights file; every stage that uses
the teacher records that identity, so a cache built with another teacher is refused.

The stage either loads the named weights (tag or path) or, when none are named (the embedded
default), trains a small CLIP from the packaged config `teacher_configs/ovd-tiny-clip.json` on
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
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from pipeline import layout
from pipeline.annotations import load_annotations
from pipeline.cache import sha256_file, tmp_path
from pipeline.errors import reject
from pipeline.manifests import ManifestError, contained_path, image_file
from pipeline.precision import autocast, resolve_precision
from pipeline.runner import Part, PartOutput, PartResult, StageContext, StageError

NAME = "teacher"
RESOURCES = {"num_cpus": 4, "num_gpus": 1}

CONFIG_DIR = Path(__file__).parent / "teacher_configs"
DEFAULT_MODEL = "ovd-tiny-clip"
HUB_PROBE_SECONDS = 1.0


class TeacherError(StageError):
    """The teacher cannot be loaded or trained as asked; one line says why and what to do."""


# ----------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class TeacherSpec:
    """open_clip model name; pretrained tag or local checkpoint path (None: train one, in the
    stage); optional model-config JSON whose file stem is the model name."""

    model: str
    pretrained: str | None = None
    model_config: str | None = None


def register_model_config(spec: TeacherSpec) -> None:
    """Make `spec.model` known to open_clip: the packaged configs, plus `spec.model_config`."""
    import open_clip

    if CONFIG_DIR not in _REGISTERED:
        open_clip.add_model_config(CONFIG_DIR)
        _REGISTERED.add(CONFIG_DIR)
    if spec.model_config:
        path = Path(spec.model_config).resolve()
        if not path.is_file():
            raise TeacherError(f"teacher model config {spec.model_config} not found")
        if path.stem != spec.model:
            raise TeacherError(
                f"teacher model config {path} defines model '{path.stem}' (its file stem), "
                f"but the model is '{spec.model}'; pass --teacher-model {path.stem}"
            )
        if path not in _REGISTERED:
            try:
                json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise TeacherError(f"teacher model config {path}: not valid JSON ({e})") from None
            open_clip.add_model_config(path)
            _REGISTERED.add(path)
    if spec.model.startswith(("hf-hub:", "local-dir:")):
        raise TeacherError(
            f"teacher model '{spec.model}': pass an open_clip model name with "
            f"--teacher-pretrained (tag or checkpoint file) and, for a custom architecture, "
            f"--teacher-model-config JSON instead of a schema prefix"
        )
    if open_clip.get_model_config(spec.model) is None:
        raise TeacherError(
            f"unknown open_clip model '{spec.model}'; pass --teacher-model-config "
            f"path/to/{spec.model}.json or one of open_clip.list_models()"
        )


_REGISTERED: set[Path] = set()


def _hub_offline(url: str) -> bool:
    """True when HF_HUB_OFFLINE is set or `url`'s host does not answer within a second."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if flag in {"1", "true", "yes", "on"}:
        return True
    host = urlparse(url).hostname or "huggingface.co"
    reached: list[bool] = []

    def probe():
        # getaddrinfo has no timeout of its own, hence the thread.
        try:
            socket.create_connection((host, 443), timeout=HUB_PROBE_SECONDS).close()
            reached.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(HUB_PROBE_SECONDS)
    return not reached


def _cached_tag_file(tag_cfg: dict) -> str | None:
    """The local file of a pretrained tag when a previous download left it in the cache."""
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(tag_cfg["hf_hub"])
        names = [filename] if filename else ["open_clip_model.safetensors",
                                             "open_clip_pytorch_model.bin"]
        for name in names + [n[:-4] + ".safetensors" for n in names if n.endswith(".bin")]:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                return hit
    if tag_cfg.get("url"):
        path = Path("~/.cache/clip").expanduser() / os.path.basename(tag_cfg["url"])
        if path.is_file():
            return str(path)
    return None


def resolve_weights(model: str, pretrained: str) -> tuple[str, dict]:
    """(weights file, open_clip tag config or {}) for a checkpoint path or a pretrained tag.

    An uncached tag is downloaded only when the hub is reachable; offline this fails at once
    with one line that says how to pass a local checkpoint instead."""
    import open_clip

    if os.path.isfile(pretrained):
        return str(Path(pretrained).resolve()), {}
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag_cfg:
        if os.sep in pretrained or Path(pretrained).suffix in {".pt", ".pth", ".bin",
                                                                 ".safetensors"}:
            raise TeacherError(f"teacher checkpoint {pretrained} not found")
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise TeacherError(
            f"teacher pretrained '{pretrained}' is neither a file nor an open_clip tag of "
            f"'{model}' (tags: {', '.join(tags) or 'none'})"
        )
    cached = _cached_tag_file(tag_cfg)
    if cached:
        return cached, tag_cfg
    if _hub_offline(tag_cfg.get("url") or "https://huggingface.co"):
        raise TeacherError(
            f"teacher weights '{model}' pretrained='{pretrained}' are not cached and the model "
            f"hub is unreachable (offline); download them where there is network "
            f"(open_clip.create_model('{model}', pretrained='{pretrained}')) and pass the file: "
            f"--teacher-pretrained /path/to/open_clip_model.safetensors "
            f"(or --set teacher.pretrained=PATH)"
        )
    try:
        return open_clip.download_pretrained(tag_cfg), tag_cfg
    except Exception as e:  # noqa: BLE001 - any download failure becomes one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TeacherError(f"teacher weights '{model}' / '{pretrained}': download failed "
                           f"({first}); pass a local checkpoint with --teacher-pretrained "
                           f"PATH") from None


# ----------------------------------------------------------------------------- the teacher


@dataclass
class Teacher:
    """A loaded, frozen open_clip model and what the stages need to feed it."""

    model: torch.nn.Module
    preprocess: Callable  # PIL image -> Tensor[3, S, S] (open_clip's own val transform)
    tokenizer: Callable  # list[str] -> LongTensor[N, context_length]
    identity: dict  # model, pretrained, model_config, sha256 (of the weights file)
    embed_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: str
    precision: str = "fp32"  # resolved: fp32 | bf16 (autocast of the encoders)

    def autocast(self):
        return autocast(self.device, self.precision)

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """x: Tensor[B, 3, S, S] already normalized -> Tensor[B, D] float32 (not normalized)."""
        with self.autocast():
            return self.model.encode_image(x.to(self.device)).float()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """texts: N strings -> Tensor[N, D] float32 (not normalized)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with self.autocast():
            return self.model.encode_text(tokens).float()


def load_teacher(spec: TeacherSpec, device: str = "cpu", precision: str = "auto") -> Teacher:
    """Load `spec` with open_clip's own API (`create_model_and_transforms`) in eval mode;
    `precision` auto: bf16 autocast on CUDA, fp32 on CPU."""
    import open_clip

    if not spec.pretrained:
        raise TeacherError(
            f"teacher '{spec.model}' has no weights: pass --teacher-pretrained (an open_clip "
            f"tag or a checkpoint file), or let the teacher stage train one"
        )
    register_model_config(spec)
    weights, tag_cfg = resolve_weights(spec.model, spec.pretrained)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.model,
            pretrained=weights,
            device=device,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            image_mean=tag_cfg.get("mean"),
            image_std=tag_cfg.get("std"),
            image_interpolation=tag_cfg.get("interpolation"),
            image_resize_mode=tag_cfg.get("resize_mode"),
        )
    except (RuntimeError, ValueError, KeyError, OSError, AssertionError) as e:
        first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise TeacherError(f"teacher: cannot load {weights} into open_clip model "
                           f"'{spec.model}': {first}") from None
    model.eval()
    pp = model.visual.preprocess_cfg
    size = pp["size"]
    cfg = open_clip.get_model_config(spec.model)
    identity = {
        "model": spec.model,
        "pretrained": spec.pretrained if tag_cfg else weights,  # a tag, or an absolute path
        "model_config": str(Path(spec.model_config).resolve()) if spec.model_config else None,
        "sha256": sha256_file(Path(weights)),
    }
    return Teacher(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(spec.model),
        identity=identity,
        embed_dim=int(cfg["embed_dim"]),
        image_size=int(size if isinstance(size, int) else size[0]),
        mean=tuple(float(v) for v in pp["mean"]),
        std=tuple(float(v) for v in pp["std"]),
        device=str(device),
        precision=resolve_precision(precision, str(device)),
    )


def teacher_from_cache(ctx: StageContext, device: str = "cpu",
                       precision: str | None = None) -> Teacher:
    """The teacher recorded in `<cache>/<ds>/teacher/_MANIFEST.json`, its sha256 checked.

    The returned `.identity` is exactly the recorded one, so downstream fingerprints do not
    change when the cache is moved. `precision` defaults to the context's."""
    recorded = ctx.upstream(NAME)["teacher"]
    spec = TeacherSpec(recorded["model"], recorded["pretrained"], recorded["model_config"])
    stage_copy = ctx.stage_dir(NAME) / Path(str(spec.pretrained)).name
    if not os.path.isfile(str(spec.pretrained)) and stage_copy.is_file():
        spec = replace(spec, pretrained=str(stage_copy))  # a cache moved since it was built
    teacher = load_teacher(spec, device, ctx.precision if precision is None else precision)
    if teacher.identity["sha256"] != recorded["sha256"]:
        raise TeacherError(
            f"teacher weights {spec.pretrained} changed since {ctx.stage_dir(NAME)} was built "
            f"(sha256 {teacher.identity['sha256'][:12]} != recorded "
            f"{recorded['sha256'][:12]}); rerun with --rebuild"
        )
    teacher.identity = dict(recorded)
    return teacher


# ----------------------------------------------------------------------------- text


def prompt_templates(name: str) -> tuple:
    """An open_clip template list by name: 'simple' (7 templates) or 'openai' (80)."""
    from open_clip import zero_shot_metadata as zsm

    lists = {"simple": zsm.SIMPLE_IMAGENET_TEMPLATES, "openai": zsm.OPENAI_IMAGENET_TEMPLATES}
    if name not in lists:
        raise TeacherError(f"unknown prompt templates {name!r}; use one of {sorted(lists)}")
    return tuple(lists[name])


def text_embeddings(teacher: Teacher, names: Sequence[str],
                    templates: Sequence[Callable[[str], str] | str]) -> torch.Tensor:
    """Prompt-ensembled class embeddings -> Tensor[C, D] float32, L2-normalized.

    Each template's text embedding is L2-normalized, the C class means are taken over the
    templates and L2-normalized again (open_clip's `build_zero_shot_classifier`)."""
    from open_clip import build_zero_shot_classifier

    with teacher.autocast():
        weights = build_zero_shot_classifier(teacher.model, teacher.tokenizer, list(names),
                                             list(templates), device=teacher.device)
    return F.normalize(weights.T.float(), dim=-1)


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
    images = {im["id"]: im for im in valid.images}
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
                     batch_size: int = 256) -> tuple[dict, list[dict]]:
    """Prompt-ensembled zero-shot classification of the GT crops of one split over all
    `categories` (pipeline.manifests.Category) -> (report, rejects)."""
    from stages.images import ImageError, load_rgb

    categories = list(categories)
    index = {c.id: i for i, c in enumerate(categories)}
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
