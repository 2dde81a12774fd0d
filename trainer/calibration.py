"""Inference-side calibration of the class logits (`python -m ovdistill.trainer.evaluate --calibration`).

`mean_logit`: a student whose region embeddings share one direction gives one class a high
logit on every region, whatever the region shows (the modality-gap hub, DESIGN.md). Its
per-class bias is measured without labels: the mean, over the RPN proposals of a few
unlabeled TRAIN images, of each class's logit cos(region, text_c) / tau -- the logits the
model's text head produces for the class columns (1:) of `losses.region_logits`, centred
over the classes (its mean over the C classes removed). Evaluation subtracts it from every
proposal's class logits before the softmax (`OpenVocabDetector.detect(..., logit_bias=bias)`).
Centring keeps the classes' mean logit against the background: the raw mean logits are mean
cosines / tau (9 to 34 for the toy's vild run at tau 0.01), so subtracting them whole lowers
every class against the background column by that much, a score threshold in disguise
(vild's 1,000-step row, AP50 base / novel: 17.1 / 8.1 uncalibrated, 0.8 / 4.0 raw, 11.6 / 5.1
centred; BENCHMARKS.md lab log 42).

    images (train split, deterministic choice) -> backbone -> RPN proposals -> RoIAlign
        -> text tower -> region embedding [N, D] -> logits [N, C] = emb @ text.T / tau
        -> mean over N (all proposals of all images) -> minus its mean over C -> bias [C]
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ovdistill.pipeline.annotations import read_images
from ovdistill.pipeline.errors import OvdError, reject
from ovdistill.pipeline.manifests import DatasetManifest, ManifestError, image_path
from ovdistill.pipeline.precision import autocast_setting
from ovdistill.trainer.data import resize_for_test
from ovdistill.trainer.model import OpenVocabDetector, batch_images
from torch import Tensor


class CalibrationError(OvdError, ValueError):
    """A calibration cannot be computed; the message says why, in one line."""

METHODS = ("mean_logit",)


def class_logits(region_emb: Tensor, text_emb: Tensor, temperature: float) -> Tensor:
    """region_emb: Tensor[N, D] and text_emb: Tensor[C, D], both L2-normalized ->
    Tensor[N, C] = cosine / temperature (columns 1: of `losses.region_logits`)."""
    return region_emb.float() @ text_emb.float().t() / temperature


@torch.no_grad()
def proposal_embeddings(model: OpenVocabDetector, images: list[Tensor]) -> Tensor:
    """The text head's region embeddings of the model's own RPN proposals, as `detect` makes
    them: images list of Tensor[3, H_i, W_i] in [0, 1] -> Tensor[N, D] (N = all proposals of
    all images), L2-normalized."""
    batch = batch_images(images)
    features = model.backbone(batch.tensors)
    proposals, _ = model.rpn(batch, features)
    roi = model.roi_heads.box_roi_pool(features, proposals, batch.image_sizes)
    _, emb = model.text_tower(roi)
    return emb.float()


def bias_from_embeddings(embeddings: Sequence[Tensor], text_emb: Tensor,
                         temperature: float) -> Tensor:
    """Mean class logit over every row of every Tensor[N_i, D] in `embeddings` ->
    Tensor[C] (each proposal counts once, whichever image it comes from)."""
    total, count = None, 0
    for emb in embeddings:
        if len(emb) == 0:
            continue
        s = class_logits(emb, text_emb, temperature).sum(0).double()
        total = s if total is None else total + s
        count += len(emb)
    if not count:
        raise CalibrationError("mean_logit calibration: no proposals in the calibration images")
    return (total / count).float()


def mean_logit_bias(model: OpenVocabDetector, images: list[Tensor],
                    batch_size: int = 8) -> Tensor:
    """Per-class mean logit of `model` over the RPN proposals of `images` (list of
    Tensor[3, H_i, W_i] in [0, 1], on the model's device) -> Tensor[C] for the model's
    current vocabulary (`model.text_emb`), centred (sums to 0 over the classes). Subtract it
    from the class logits to calibrate."""
    was_training = model.training
    model.eval()
    device = images[0].device if images else torch.device("cpu")
    mixed = autocast_setting(device, model.cfg.precision)
    try:
        with mixed:
            embs = [proposal_embeddings(model, images[i:i + batch_size])
                    for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    bias = bias_from_embeddings(embs, model.text_emb, model.cfg.temperature)
    return bias - bias.mean()


def pick_images(records: list[dict], n: int) -> list[dict]:
    """`n` image records spread evenly over `records` sorted by id (deterministic; all of
    them when there are at most `n`)."""
    records = sorted(records, key=lambda im: im["id"])
    if n <= 0 or len(records) <= n:
        return records if n > 0 else []
    return [records[int(i)] for i in np.linspace(0, len(records) - 1, n).round()]


def calibration_images(dataset: DatasetManifest, n: int, test_size: int, max_size: int,
                       device: torch.device | None = None, split: str = "train"
                       ) -> tuple[list[Tensor], list[int], list[dict]]:
    """`n` unlabeled images of `split` (default train: never the evaluated split), resized
    as for testing -> (images, their ids, rejects). Only the image list of the annotation
    file is read, none of its boxes."""
    from ovdistill.pipeline.images import ImageError, load_rgb, to_uint8_tensor

    s = dataset.split(split)
    records = pick_images(read_images(s.annotations), n)
    images, ids, rejects = [], [], []
    for rec in records:
        path = s.images  # until the record's file is known to stay inside it
        try:
            path = image_path(s.images, rec)
            pixels = to_uint8_tensor(load_rgb(path))
        except (ImageError, ManifestError) as e:
            rejects.append(reject(rec["id"], path, e))
            continue
        resized, _ = resize_for_test(pixels, test_size, max_size)
        images.append(resized.to(device or torch.device("cpu")))
        ids.append(int(rec["id"]))
    return images, ids, rejects

