"""The CLIP teacher as a library: who it is (model, weights, model config, the weights'
sha256), how it loads (open_clip; a pretrained tag is downloaded only when the hub answers),
how it encodes images and texts, and its prompt-ensembled class embeddings.

The stages (teacher, regions, text), the trainer (detect, oracle), query and bench all load
the teacher through here; the `teacher` stage (stages/teacher.py) trains or names one and
records its identity in `teacher/_MANIFEST.json`, which `teacher_from_cache` reads back.
"""
from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from ovdistill.pipeline.cache import sha256_file
from ovdistill.pipeline.errors import StageError
from ovdistill.pipeline.layout import TEACHER
from ovdistill.pipeline.manifests import Category
from ovdistill.pipeline.precision import autocast, resolve_precision

CONFIG_DIR = Path(__file__).parent / "teacher_configs"  # the packaged model configs
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

    def encode_tokens(self, texts: Sequence[str] | torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token text features, as GLIP's language features: texts (B strings, or their
        token ids LongTensor[B, L] from `self.tokenizer`) -> (Tensor[B, L, W] float32, the text
        transformer's outputs after `ln_final`, before pooling and `text_projection`;
        Tensor[B, L] bool, True on the real tokens: start-of-text, the text's tokens and
        end-of-text, so the end-of-text position is `mask.sum(1) - 1`).

        The steps of open_clip's `CLIP.encode_text` (and of a `TextTransformer` tower's
        forward), stopped before the pooling: the end-of-text row times `text_projection` is
        exactly `encode_text`'s unnormalised output. Runs under the caller's grad mode, so a
        trainable text encoder gets gradients; wrap it in `torch.no_grad()` when frozen."""
        tower = _text_tower(self.model)
        ids = texts if isinstance(texts, torch.Tensor) else self.tokenizer(list(texts))
        ids = ids.to(self.device)
        with self.autocast():
            cast_dtype = tower.transformer.get_cast_dtype()
            x = tower.token_embedding(ids).to(cast_dtype)
            x = x + tower.positional_embedding[:ids.shape[1]].to(cast_dtype)
            attn_mask = tower.attn_mask
            if attn_mask is not None:
                attn_mask = attn_mask[:ids.shape[1], :ids.shape[1]]
            x = tower.transformer(x, attn_mask=attn_mask)
            x = tower.ln_final(x)
        eot = _eot_positions(tower, ids)
        mask = torch.arange(ids.shape[1], device=ids.device)[None] <= eot[:, None]
        return x.float(), mask


def _text_tower(model: torch.nn.Module):
    """The module holding the text transformer's parts: a `CLIP` itself, or the
    `TextTransformer` of a `CustomTextCLIP`; other towers (Hugging Face, CoCa's class token,
    padding masks) are refused."""
    tower = model
    if not hasattr(model, "token_embedding") and hasattr(model, "text"):
        tower = model.text
    for part in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
        if not hasattr(tower, part):
            raise TeacherError(f"teacher text tower {type(tower).__name__} has no {part}: "
                               f"per-token features need open_clip's own text transformer")
    if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
        raise TeacherError(f"teacher text tower {type(tower).__name__} uses a class token or "
                           f"a padding mask; per-token features support causal CLIP towers")
    return tower


def _eot_positions(tower, ids: torch.Tensor) -> torch.Tensor:
    """ids: LongTensor[B, L] -> LongTensor[B], each text's end-of-text position, found as
    open_clip's pooling finds it (argmax: the highest id; eos: the first eos id)."""
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    if pool == "argmax":
        return ids.argmax(dim=-1)
    eos = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
    if pool == "eos" and eos is not None:
        return (ids == eos).int().argmax(dim=-1)
    raise TeacherError(f"teacher text pooling '{pool}' has no end-of-text position; per-token "
                       f"features support open_clip's 'argmax' and 'eos' pooling")


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


def teacher_from_cache(cache, device: str = "cpu", precision: str | None = None) -> Teacher:
    """The teacher recorded in `<cache>/<ds>/teacher/_MANIFEST.json`, its sha256 checked.

    `cache`: a `layout.DatasetCache` or a stage's `StageContext` (anything with `stage_dir`
    and `upstream`/`read_manifest`). The returned `.identity` is exactly the recorded one, so
    downstream fingerprints do not change when the cache is moved. `precision` defaults to the
    context's (auto for a DatasetCache)."""
    files = getattr(cache, "files", cache)  # a StageContext's DatasetCache
    recorded = files.read_manifest(TEACHER)["teacher"]
    spec = TeacherSpec(recorded["model"], recorded["pretrained"], recorded["model_config"])
    stage_copy = files.stage_dir(TEACHER) / Path(str(spec.pretrained)).name
    if not os.path.isfile(str(spec.pretrained)) and stage_copy.is_file():
        spec = replace(spec, pretrained=str(stage_copy))  # a cache moved since it was built
    if precision is None:
        precision = getattr(cache, "precision", "auto")
    teacher = load_teacher(spec, device, precision)
    if teacher.identity["sha256"] != recorded["sha256"]:
        raise TeacherError(
            f"teacher weights {spec.pretrained} changed since {files.stage_dir(TEACHER)} was "
            f"built "
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

@dataclass(frozen=True)
class TextPrompts:
    """How a category is prompted: an open_clip template list (`prompt_templates`) and whether
    the annotation file's synonyms join the ensemble (the text stage's Config extends it)."""

    templates: str = "openai"  # open_clip.zero_shot_metadata list: openai | simple
    use_synonyms: bool = True  # average in the annotation file's synonyms (LVIS)

    @classmethod
    def from_dict(cls, d: dict) -> TextPrompts:
        """The prompt settings of a text-stage config (other keys ignored)."""
        return cls(**{k: d[k] for k in ("templates", "use_synonyms") if k in d})


def prompt_names(category: Category, use_synonyms: bool = True) -> list[str]:
    """The names a category is prompted with: its name, then its synonyms, with LVIS-style
    underscores read as spaces and duplicates dropped (LVIS lists the name as a synonym)."""
    names = [category.name, *(category.synonyms if use_synonyms else ())]
    return list(dict.fromkeys(n.replace("_", " ").strip() for n in names))


def synonym_templates(names: Sequence[str], templates: Sequence[Callable[[str], str] | str]
                      ) -> list[Callable[[str], str]]:
    """Every (name, template) pair as one template of its category, so a plain prompt ensemble
    over them is the flat (synonym x template) average. A template is a callable or a
    `str.format` pattern, as open_clip takes them."""
    def prompt(_category: str, n: str, t) -> str:
        return t.format(n) if isinstance(t, str) else t(n)

    return [partial(prompt, n=n, t=t) for n in names for t in templates]


def category_embeddings(teacher: Teacher, categories: Sequence[Category], templates: Sequence,
                        use_synonyms: bool = True) -> torch.Tensor:
    """Prompt-ensembled text embeddings -> Tensor[C, D] float32, L2-normalised, in the order
    of `categories`."""
    rows = [text_embeddings(teacher, [c.name],
                            synonym_templates(prompt_names(c, use_synonyms), templates))
            for c in categories]
    return torch.cat(rows).float().cpu()
