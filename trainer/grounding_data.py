"""GLIP's data for the trainer: detection images as grounding (a prompt of class names per
image) and grounding data (a caption per image, its boxes tied to phrases), both as
`PromptTargets`: a prompt text and, per GT box, the tokens its phrase takes in it.

    detection batch ─► detection_prompts per image (seeded per (seed, step, image), chunked)
                     ─► one PromptTargets per chunk: positive[g] = the span of box g's class
    grounding json (pipeline.grounding) + images ─► GroundingStream (cycled, reshuffled per
        epoch, flip / scale jitter as detection) ─► PromptTargets(caption, the token spans of
        each box's tokens_positive: pipeline.prompts.caption_token_spans), or with
        grounding_span "eot" one PromptTargets per phrase (`phrase_prompts`)

A caption longer than the teacher's context, or an image whose boxes all fall out (unreadable
image, degenerate boxes after augmentation), is skipped and counted (`GROUNDING_SKIPPED`).
The pseudo-grounding file (written by the pseudo_boxes stage in the same MDETR format) is read
by the same stream. The iteration type of the joint loop is `iteration_kind`, a pure function
of (seed, step) like `pair_data.is_pair_iteration`, which it calls first, so a run without
grounding iterations makes the pair choices it made before they existed.
"""
from __future__ import annotations

import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from ovdistill.pipeline import layout
from ovdistill.pipeline.cache import read_json
from ovdistill.pipeline.errors import OvdError
from ovdistill.pipeline.grounding import GroundingDoc, load_grounding
from ovdistill.pipeline.images import ImageError, load_rgb, to_uint8_tensor
from ovdistill.pipeline.manifests import ManifestError, image_path
from ovdistill.pipeline.prompts import END, Tokenize, caption_token_spans, detection_prompts
from ovdistill.trainer.config import TrainConfig
from ovdistill.trainer.data import augment, choose_augmentation
from ovdistill.trainer.grounding import grounding_targets
from ovdistill.trainer.pair_data import is_pair_iteration
from torch import Tensor

DETECTION, PAIRS, GROUNDING, PSEUDO = "detection", "pairs", "grounding", "pseudo"
GROUNDING_SKIPPED = "grounding_skipped"  # metrics.jsonl: skipped grounding images, summed


class GroundingDataError(OvdError, ValueError):
    """Grounding data the trainer cannot use (no file, no usable image); one line."""


@dataclass(frozen=True)
class PromptTargets:
    """One prompt of one image: its text and positive Tensor[G, L] float 0/1 (L = the text
    encoder's context length, position 0 = start-of-text): row g is 1 on the tokens of GT box
    g's phrase in this prompt (all zero when the phrase is in another chunk)."""

    text: str
    positive: Tensor


def iteration_kind(seed: int, step: int, cfg: TrainConfig) -> str:
    """The type of iteration `step` (0-based) of a run seeded `seed`: PAIRS with the pair
    draw of `is_pair_iteration`; otherwise GROUNDING with probability grounding_ratio, PSEUDO
    with pseudo_ratio (a draw of its own per (seed, step)), else DETECTION."""
    if is_pair_iteration(seed, step, cfg.pairs_ratio):
        return PAIRS
    if cfg.grounding_ratio <= 0 and cfg.pseudo_ratio <= 0:
        return DETECTION
    u = random.Random(f"grounding:{seed}:{step}").random()
    if u < cfg.grounding_ratio:
        return GROUNDING
    if u < cfg.grounding_ratio + cfg.pseudo_ratio:
        return PSEUDO
    return DETECTION


def detection_prompt_targets(labels: Sequence[Tensor], names: Sequence[str], seed: int,
                             step: int, n_negatives: int, max_tokens: int, tokenize: Tokenize,
                             context_length: int, names_per_prompt: int = 0
                             ) -> list[list[PromptTargets]]:
    """Per image its detection prompts (GLIP: the GT classes and up to `n_negatives` other
    `names`, shuffled by a generator of (seed, step, image), chunked to `max_tokens` and at
    most `names_per_prompt` names a prompt, 0 = as many as fit).

    labels: per image Tensor[G] int64 in [1, C] (the trainer's base labels, 0 = bg unused);
    names: the C base class names (label l is names[l - 1]). Returns per image one
    PromptTargets per chunk, positive Tensor[G, context_length]."""
    out = []
    for i, lab in enumerate(labels):
        classes = (lab.long().cpu() - 1)
        rng = random.Random(f"prompts:{seed}:{step}:{i}")
        prompts = detection_prompts(names, classes.tolist(), rng, n_negatives, max_tokens,
                                    tokenize, names_per_prompt)
        out.append([PromptTargets(p.text, grounding_targets(classes, p.spans, context_length))
                    for p in prompts])
    return out


def caption_positive(caption: str, box_spans: Sequence[Sequence[tuple[int, int]]],
                     tokenize: Tokenize, context_length: int) -> Tensor:
    """positive Tensor[G, context_length] of a caption prompt: row g is 1 on the tokens of
    box g's character spans (`caption_token_spans`)."""
    out = torch.zeros(len(box_spans), context_length)
    for g, spans in enumerate(box_spans):
        for start, end in caption_token_spans(caption, spans, tokenize):
            out[g, start:end] = 1.0
    return out


def phrase_prompts(caption: str, box_spans: Sequence[Sequence[tuple[int, int]]],
                   tokenize: Tokenize, context_length: int) -> list[PromptTargets]:
    """A caption's phrases as prompts of their own (grounding_span "eot"): one prompt per
    distinct phrase, its text the phrase's characters (spans joined by a space) and END; row g
    of its positive is 1 on the prompt's phrase tokens when box g points at that phrase."""
    groups: dict[tuple, list[int]] = {}
    for g, spans in enumerate(box_spans):
        groups.setdefault(tuple(tuple(s) for s in spans), []).append(g)
    out = []
    for spans, boxes in groups.items():
        text = " ".join(caption[s:e].strip() for s, e in spans) + END
        n_ids = len(list(tokenize(text[:-len(END)])))
        positive = torch.zeros(len(box_spans), context_length)
        positive[boxes, 1:1 + n_ids] = 1.0
        out.append(PromptTargets(text, positive))
    return out


def grounding_files(dataset, cache_dir: str | Path, kind: str, file: str | None = None,
                    images: str | None = None) -> tuple[Path, Path]:
    """(MDETR json, its images folder) of `kind` GROUNDING (default: the grounding stage's,
    `pipeline.grounding.grounding_paths`) or PSEUDO (default: the pseudo_boxes stage's
    `layout.PSEUDO_FILE`, its images the `info.image_root` it records, else the pairs
    stage's images/); `file` / `images` override (images default: the file's folder).
    Pair images inside webdataset tars (real pairs: file_name + offset) are not read here."""
    cache = layout.DatasetCache(cache_dir)
    if kind == GROUNDING and file is None:
        from ovdistill.pipeline.grounding import grounding_paths

        default_file, default_images = grounding_paths(dataset, cache)
    elif kind == PSEUDO and file is None:
        default_file = cache.pseudo_grounding()
        default_images = cache.stage_dir(layout.PAIRS) / layout.PAIR_IMAGES
        if images is None and default_file.is_file():  # the stage records its image root
            root = (read_json(default_file).get("info") or {}).get("image_root")
            if root:  # relative: to the dataset's cache folder (stages/pseudo_boxes.py)
                default_images = Path(root) if Path(root).is_absolute() else cache.root / root
    else:
        default_file, default_images = Path(file), Path(images or Path(file).parent)
    path, folder = Path(default_file), Path(images) if images else Path(default_images)
    if not path.is_file():
        stage = "grounding" if kind == GROUNDING else "pseudo_boxes"
        raise GroundingDataError(f"{path}: not found; {kind}_ratio > 0 trains on it: run "
                                 f"`python -m ovdistill run --stages {stage}` (or pass "
                                 f"--{kind}-file)")
    return path, folder


class GroundingStream:
    """Endless batches of grounding data: (images list of Tensor[3, H_i, W_i] float in [0, 1],
    targets per image {"boxes": Tensor[G, 4] augmented pixels, "labels": Tensor[G] ones},
    prompts per image [PromptTargets], skipped images since the previous batch).

    The images of `doc` are cycled in a seeded order per epoch (seed, epoch); each image is
    flipped and resized (train_sizes, max_size, flip_prob) as detection images are. Runs in
    the training process (decoding a batch of small JPEGs is cheap beside a step)."""

    def __init__(self, doc: GroundingDoc, images_dir: str | Path, cfg: TrainConfig,
                 tokenize: Tokenize, max_tokens: int, context_length: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.doc, self.folder, self.cfg = doc, Path(images_dir), cfg
        self.tokenize, self.max_tokens, self.context = tokenize, max_tokens, context_length
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.rng = random.Random(seed * 1_000_003 + rank * 1009 + 29)
        usable = [im for im in doc.images if len(im.spans)]
        if not usable:
            raise GroundingDataError(f"{doc.source}: no image with a grounded box")
        self.images = usable
        self._order = self._epochs()

    @classmethod
    def from_file(cls, path: str | Path, images_dir: str | Path, cfg: TrainConfig,
                  tokenize: Tokenize, max_tokens: int, context_length: int, seed: int,
                  **kw) -> GroundingStream:
        return cls(load_grounding(path), images_dir, cfg, tokenize, max_tokens,
                   context_length, seed, **kw)

    def _epochs(self) -> Iterator:
        epoch = 0
        while True:
            order = list(range(len(self.images)))
            random.Random(self.seed * 7919 + epoch).shuffle(order)
            yield from order[self.rank::self.world_size]
            epoch += 1

    def sample(self, im) -> tuple[Tensor, dict, list[PromptTargets]]:
        """One GroundedImage -> (image, target, its prompts: the caption, or one per phrase
        with grounding_span "eot"); raises GroundingDataError to skip."""
        eot = self.cfg.grounding_span == "eot"
        if not eot and len(list(self.tokenize(im.caption))) > self.max_tokens:
            raise GroundingDataError(f"{self.doc.source}: image {im.id}: caption longer than "
                                     f"the text encoder's {self.max_tokens} tokens")
        try:
            pixels = to_uint8_tensor(load_rgb(image_path(self.folder, im.record)))
        except (ImageError, ManifestError) as e:
            raise GroundingDataError(f"{self.doc.source}: image {im.id}: {e}") from None
        image, boxes, _ = augment(pixels, im.boxes, torch.zeros(0, 4),
                                  choose_augmentation(self.rng, self.cfg))
        keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        if not bool(keep.any()):
            raise GroundingDataError(f"{self.doc.source}: image {im.id}: no box left")
        if eot:
            prompts = phrase_prompts(im.caption, im.spans, self.tokenize, self.context)
            if any(len(list(self.tokenize(p.text))) > self.max_tokens for p in prompts):
                raise GroundingDataError(f"{self.doc.source}: image {im.id}: a phrase longer "
                                         f"than the text encoder's {self.max_tokens} tokens")
        else:
            prompts = [PromptTargets(im.caption, caption_positive(im.caption, im.spans,
                                                                  self.tokenize, self.context))]
        return (image, {"boxes": boxes[keep], "labels": torch.ones(int(keep.sum()),
                                                                   dtype=torch.int64)},
                [PromptTargets(p.text, p.positive[keep]) for p in prompts
                 if not eot or bool(p.positive[keep].any())])  # no phrase left: no prompt

    def __iter__(self):
        return self

    def __next__(self) -> tuple[list[Tensor], list[dict], list[list[PromptTargets]], int]:
        images, targets, prompts, skipped = [], [], [], 0
        while len(images) < self.cfg.batch_size:
            im = self.images[next(self._order)]
            try:
                image, target, image_prompts = self.sample(im)
            except GroundingDataError as e:
                skipped += 1
                print(f"skip: {e}", file=sys.stderr)
                if skipped > 10 * len(self.images):
                    raise GroundingDataError(f"{self.doc.source}: no usable grounding image "
                                             f"({skipped} skipped in a row)") from None
                continue
            images.append(image)
            targets.append(target)
            prompts.append(image_prompts)
        return images, targets, prompts, skipped
