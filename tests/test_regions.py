"""The regions stage: crop geometry on hand cases, agreement with the per-crop PIL reference,
the Parquet contract, rejects, batching across images, and refusal of another teacher."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ovdistill.pipeline.cache import atomic_write_json, read_json
from ovdistill.pipeline.clip_teacher import TeacherSpec, load_teacher, register_model_config
from ovdistill.pipeline.crops import (
    INTERPOLATIONS,
    axis_taps,
    centre_offsets,
    combine_views,
    crop_boxes,
    enlarge_boxes,
    pixel_boxes,
    preprocess_resize,
    region_crops,
    resized_sizes,
    tap_weights,
)
from ovdistill.pipeline.images import load_rgb
from ovdistill.pipeline.manifests import load_manifest
from ovdistill.pipeline.runner import (
    Part,
    PartOutput,
    StageContext,
    StageError,
    StageMismatch,
    make_config,
    run_stage,
)
from ovdistill.stages import regions

TINY_MODEL = "d1-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
                   "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2},
}
BASE = ["circle", "square"]
NOVEL = ["star"]
PROPOSALS_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("rank", pa.int32()),
    ("box", pa.list_(pa.float32(), 4)), ("score", pa.float32()),
])


# ----------------------------------------------------------------------------- helpers


def make_teacher_files(folder: Path, seed: int) -> TeacherSpec:
    """A random-weight tiny open_clip CLIP saved as a checkpoint + model-config JSON."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{TINY_MODEL}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    spec = TeacherSpec(TINY_MODEL, None, str(config))
    register_model_config(spec)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_MODEL)
    weights = folder / f"weights-{seed}.pt"
    torch.save(model.state_dict(), weights)
    return TeacherSpec(TINY_MODEL, str(weights), str(config))


def write_teacher_manifest(cache: Path, spec: TeacherSpec) -> dict:
    """What the teacher stage leaves behind, as far as downstream stages read it."""
    identity = load_teacher(spec).identity
    atomic_write_json(cache / "teacher" / "_MANIFEST.json",
                      {"stage": "teacher", "teacher": identity,
                       "fingerprint": identity["sha256"][:16]})
    return identity


def textured_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour noise with filled shapes: content that differs from box to box."""
    small = rng.integers(0, 256, (max(2, height // 12), max(2, width // 12), 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, 30)
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
        else:
            draw.rectangle([x - r, y - r / 2, x + r, y + r / 2], fill=color)
    return im


def random_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """float32[n, 4] boxes inside the image, 3..70% of each side, fractional corners."""
    w = rng.uniform(0.03, 0.7, n) * width
    h = rng.uniform(0.03, 0.7, n) * height
    x1 = rng.uniform(0, width - w)
    y1 = rng.uniform(0, height - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def proposals_table(rows: list[tuple[int, np.ndarray]]) -> pa.Table:
    image_id, rank, box, score = [], [], [], []
    for iid, boxes in rows:
        for r, b in enumerate(boxes):
            image_id.append(iid)
            rank.append(r)
            box.append([float(v) for v in b])
            score.append(1.0 - r / 100)
    return pa.table([image_id, rank, box, score], schema=PROPOSALS_SCHEMA)


MANIFEST = """\
name: mini
format: coco
root: {root}
splits:
  train: {{images: train, annotations: train.json}}
  val: {{images: val, annotations: val.json}}
vocabulary:
  base: {base}
  novel: {novel}
"""


def make_dataset(tmp: Path, synonyms: dict[str, list[str]] | None = None) -> StageContext:
    """A tiny COCO-format dataset (5 train + 2 val images), its manifest and a context."""
    rng = np.random.default_rng(0)
    root = tmp / "data"
    cats = [{"id": i + 1, "name": n, **({"synonyms": synonyms[n]} if synonyms and n in
                                         synonyms else {})}
            for i, n in enumerate(BASE + NOVEL)]
    sizes = {"train": [(96, 64), (64, 112), (160, 120), (80, 80), (120, 90)],
             "val": [(100, 70), (90, 90)]}
    next_id = 1
    for split, dims in sizes.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        images = []
        for w, h in dims:
            name = f"{split}_{next_id:03d}.jpg"
            textured_image(rng, w, h).save(root / split / name, quality=95)
            images.append({"id": next_id, "file_name": name, "width": w, "height": h})
            next_id += 1
        (root / f"{split}.json").write_text(json.dumps(
            {"images": images, "annotations": [], "categories": cats}))
    manifest = tmp / "mini.yaml"
    manifest.write_text(MANIFEST.format(root=root, base=BASE, novel=NOVEL))
    return StageContext(dataset=load_manifest(manifest), cache=tmp / "cache" / "mini",
                        device="cpu")


def write_proposals(ctx: StageContext, per_image: int = 9) -> dict[int, np.ndarray]:
    """Proposals parts over train and val images: part 0 mixes both, part 1 is val only,
    part 2 is train only. Returns {image_id: boxes}."""
    rng = np.random.default_rng(1)
    boxes = {}
    for split in ("train", "val"):
        for im in json.loads(ctx.dataset.split(split).annotations.read_text())["images"]:
            boxes[im["id"]] = random_boxes(rng, per_image, im["width"], im["height"])
    boxes[3][0] = [0, 0, 160, 120]  # the whole image: its 1.5x crop is clipped everywhere
    parts = [[1, 2, 6], [7], [3, 4, 5]]
    out = ctx.stage_dir("proposals")
    out.mkdir(parents=True, exist_ok=True)
    for i, ids in enumerate(parts):
        pq.write_table(proposals_table([(iid, boxes[iid]) for iid in ids]),
                       out / f"part-{i:05d}.parquet")
    atomic_write_json(out / "_MANIFEST.json", {"stage": "proposals", "n_parts": len(parts),
                                               "fingerprint": "proposals-v1"})
    return boxes


def view_features(teacher, image: Image.Image, box) -> torch.Tensor:
    """PIL crop -> the teacher's own preprocess -> encode, for the 1x and the 1.5x box.
    -> Tensor[2, D] (1x, 1.5x), not normalised"""
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    big = (max(0.0, cx - 0.75 * w), max(0.0, cy - 0.75 * h),
           min(image.width, cx + 0.75 * w), min(image.height, cy + 0.75 * h))
    crops = torch.stack([teacher.preprocess(image.crop((x1, y1, x2, y2))),
                         teacher.preprocess(image.crop(big))])
    return teacher.encode_images(crops)


def reference_embedding(teacher, image: Image.Image, box) -> torch.Tensor:
    """The peers' way: `view_features`, summed, L2-normalised. -> Tensor[D]"""
    feats = view_features(teacher, image, box)
    return F.normalize(feats[0] + feats[1], dim=0)


PIXEL_DIM = 3 * 8 * 8


class PixelEncoder(torch.nn.Module):
    """A planted image encoder: the crop's 8x8 average-pooled normalised pixels minus their
    mean (D = PIXEL_DIM). Unlike a random-weight CLIP it maps different pixels to different
    directions, so a box's 1x and 1.5x crops get clearly different embeddings."""

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        f = F.adaptive_avg_pool2d(x.float(), 8).flatten(1)
        return f - f.mean(dim=1, keepdim=True)


def block_noise(rng: np.random.Generator, width: int, height: int,
                block: int = 4) -> Image.Image:
    """Random colour blocks of `block` x `block` pixels: content that changes within a few
    pixels."""
    small = rng.integers(0, 256, (-(-height // block), -(-width // block), 3), dtype=np.uint8)
    return Image.fromarray(small.repeat(block, 0).repeat(block, 1)[:height, :width])


PROJ_DIM = 64
SENSITIVE_SIZE = 48  # the toy teacher's input size


class ProjectionEncoder(torch.nn.Module):
    """A planted image encoder that sees every pixel: the crop's normalised pixels, centred,
    times a fixed-seed Gaussian matrix (D = PROJ_DIM). Random projections keep the angles
    between pixel vectors (Johnson-Lindenstrauss), so a resampling difference anywhere in the
    crop, at any frequency, moves the embedding as much as it moves the pixels; an 8x8
    average-pooling encoder would not see interpolation differences at all."""

    def __init__(self, size: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(3 * size * size, PROJ_DIM, generator=g))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        f = x.float().flatten(1)
        return (f - f.mean(dim=1, keepdim=True)) @ self.proj


def sensitive_teacher(teacher, interpolation: str = "bicubic", size: int = SENSITIVE_SIZE):
    """`teacher` with `ProjectionEncoder` and a val preprocess that resizes with
    `interpolation`: open_clip's own `image_transform` for bicubic / bilinear, the same
    torchvision steps for the modes open_clip does not offer."""
    from open_clip.transform import image_transform
    from torchvision import transforms as T

    if interpolation in ("bicubic", "bilinear"):
        pp = image_transform(size, is_train=False, mean=teacher.mean, std=teacher.std,
                             interpolation=interpolation)
    else:
        pp = T.Compose([T.Resize(size, interpolation=T.InterpolationMode(interpolation)),
                        T.CenterCrop(size), T.ToTensor(), T.Normalize(teacher.mean, teacher.std)])
    return dataclasses.replace(teacher, model=ProjectionEncoder(size), preprocess=pp,
                               image_size=size, embed_dim=PROJ_DIM)


def varied_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """float32[n, 4] boxes inside the image: a quarter each tiny (3..16 px sides, upsampled
    3..16x to a 48 px input), small (16..60 px), large (40 px .. 95% of the image, down-
    sampled up to ~5x) and thin (large, aspect 4..10, either way round)."""
    kind = rng.integers(0, 4, n)
    w = np.select([kind == 0, kind == 1], [rng.uniform(3, 16, n), rng.uniform(16, 60, n)],
                  rng.uniform(40, 0.95 * width, n))
    h = np.select([kind == 0, kind == 1], [rng.uniform(3, 16, n), rng.uniform(16, 60, n)],
                  rng.uniform(40, 0.95 * height, n))
    thin = rng.uniform(4, 10, n)
    tall = rng.random(n) < 0.5
    h = np.where((kind == 3) & ~tall, np.maximum(w / thin, 3), h)
    w = np.where((kind == 3) & tall, np.maximum(h / thin, 3), w)
    w, h = np.minimum(w, width), np.minimum(h, height)
    x1 = rng.uniform(0, width - w)
    y1 = rng.uniform(0, height - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def sized_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """float32[n, 4] boxes inside the image, sides from 8 px to 70% of the image's."""
    w = rng.uniform(8, 0.7 * width, n)
    h = rng.uniform(8, 0.7 * height, n)
    x1 = rng.uniform(0, width - w)
    y1 = rng.uniform(0, height - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> tuple[TeacherSpec, TeacherSpec]:
    folder = tmp_path_factory.mktemp("teachers")
    return make_teacher_files(folder, seed=0), make_teacher_files(folder, seed=1)


@pytest.fixture(scope="module")
def teacher(teacher_files):
    return load_teacher(teacher_files[0])


@pytest.fixture(scope="module")
def built(tmp_path_factory, teacher_files):
    """A regions stage run over the tiny dataset (one corrupt train image)."""
    tmp = tmp_path_factory.mktemp("regions")
    ctx = make_dataset(tmp)
    boxes = write_proposals(ctx)
    (ctx.dataset.root / "train" / "train_005.jpg").write_bytes(b"not a jpeg")
    write_teacher_manifest(ctx.cache, teacher_files[0])
    cfg = make_config(regions, {"batch_size": 16})
    manifest = run_stage(regions, ctx, cfg, distributor="local", progress=False,
                         log=lambda _: None)
    return ctx, cfg, boxes, manifest


@pytest.fixture(scope="module")
def planted(tmp_path_factory, teacher_files, teacher):
    """A regions stage run whose teacher is `PixelEncoder`, over block-noise train images
    with 20 proposals each. -> (ctx, planted teacher, table of all rows)"""
    tmp = tmp_path_factory.mktemp("planted")
    ctx = make_dataset(tmp)
    pixel_teacher = dataclasses.replace(teacher, model=PixelEncoder(),
                                        embed_dim=PIXEL_DIM)
    rng = np.random.default_rng(5)
    rows = []
    for im in json.loads(ctx.dataset.split("train").annotations.read_text())["images"]:
        w, h = im["width"], im["height"]
        block_noise(rng, w, h).save(ctx.dataset.root / "train" / im["file_name"], quality=95)
        rows.append((im["id"], sized_boxes(rng, 20, w, h)))
    out = ctx.stage_dir("proposals")
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(proposals_table(rows), out / "part-00000.parquet")
    atomic_write_json(out / "_MANIFEST.json", {"stage": "proposals", "n_parts": 1,
                                               "fingerprint": "proposals-planted"})
    write_teacher_manifest(ctx.cache, teacher_files[0])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(regions, "teacher_from_cache", lambda ctx, device="cpu": pixel_teacher)
        run_stage(regions, ctx, make_config(regions, {"batch_size": 16}), distributor="local",
                  progress=False, log=lambda _: None)
    table = pq.read_table(ctx.stage_dir("regions") / "part-00000.parquet")
    return ctx, pixel_teacher, table


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """4 JPEGs of 2-px colour blocks (4 sizes), 130 `varied_boxes` each (520 rows).
    -> (files [(image id, path)], proposals table, {image id: decoded PIL image})"""
    folder = tmp_path_factory.mktemp("varied")
    rng = np.random.default_rng(7)
    files, rows, images = [], [], {}
    for iid, (w, h) in enumerate([(200, 150), (160, 220), (260, 180), (120, 120)], start=1):
        path = folder / f"{iid:03d}.jpg"
        block_noise(rng, w, h, block=2).save(path, quality=95)
        files.append((iid, path))
        rows.append((iid, varied_boxes(rng, 130, w, h)))
        images[iid] = load_rgb(path)
    return files, proposals_table(rows), images


# ----------------------------------------------------------------------------- geometry


def test_enlarge_boxes_same_centre_and_clipped():
    boxes = torch.tensor([[40.0, 30.0, 60.0, 50.0],   # fits: 35..65, 25..55
                          [0.0, 10.0, 20.0, 30.0],    # clipped on the left
                          [80.0, 70.0, 100.0, 80.0],  # clipped right and bottom
                          [0.0, 0.0, 100.0, 80.0]])   # the whole image stays the whole image
    got = enlarge_boxes(boxes, 1.5, width=100, height=80)
    want = torch.tensor([[35.0, 25.0, 65.0, 55.0],
                         [0.0, 5.0, 25.0, 35.0],
                         [75.0, 67.5, 100.0, 80.0],
                         [0.0, 0.0, 100.0, 80.0]])
    assert torch.equal(got, want)


def test_pixel_boxes_round_like_pil_and_keep_one_pixel():
    got = pixel_boxes(torch.tensor([[10.4, 2.5, 20.6, 3.5], [5.2, 5.2, 5.3, 5.4]]))
    # Python's round(): 2.5 -> 2, 3.5 -> 4; a sub-pixel box keeps 1 pixel
    assert got.tolist() == [[10.0, 2.0, 21.0, 4.0], [5.0, 5.0, 6.0, 6.0]]


def test_resized_sizes_and_centre_offsets_follow_torchvision_rounding():
    w = torch.tensor([300.0, 30.0, 50.0, 7.0])
    h = torch.tensor([200.0, 100.0, 50.0, 3.0])
    new_w, new_h = resized_sizes(w, h, 64)
    # wide: 96x64; tall: 64 x int(64 * 100 / 30) = 213; square: w counts as the short side
    assert new_w.tolist() == [96, 64, 64, 149] and new_h.tolist() == [64, 213, 64, 64]
    # round((96 - 64) / 2) = 16, round(74.5) = 74 (half to even), round(42.5) = 42
    assert centre_offsets(new_w, 64).tolist() == [16, 0, 0, 42]
    assert centre_offsets(new_h, 64).tolist() == [0, 74, 0, 0]
    sq_w, sq_h = resized_sizes(w, h, 64, mode="squash")
    assert sq_w.tolist() == sq_h.tolist() == [64] * 4


def crop_weights(length: float, resized: float, offset: float, size: int,
                 interpolation: str) -> torch.Tensor:
    """One crop's `tap_weights` over the whole crop: Tensor[size, length]."""
    taps = axis_taps(torch.tensor([length]), torch.tensor([resized]), torch.tensor([offset]),
                     size, interpolation)
    return tap_weights(*taps, torch.tensor([0]), int(length), interpolation)[0]


def test_tap_weights_are_pils_on_hand_cases():
    # bilinear 2 -> 4: centres 0.25, 0.75, 1.25, 1.75; the crop edge cuts the triangle off
    lo, hi, _, _ = axis_taps(torch.tensor([2.0]), torch.tensor([4.0]), torch.tensor([0.0]), 4,
                             "bilinear")
    assert lo.tolist() == [[0, 0, 0, 1]] and hi.tolist() == [[1, 2, 2, 2]]
    assert torch.allclose(crop_weights(2, 4, 0, 4, "bilinear"),
                          torch.tensor([[1.0, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]]))
    # box 4 -> 2 averages pairs; bicubic at scale 1 is the identity
    assert torch.allclose(crop_weights(4, 2, 0, 2, "box"),
                          torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]))
    assert torch.allclose(crop_weights(5, 5, 0, 5, "bicubic"), torch.eye(5), atol=1e-7)
    # bicubic 8 -> 4 (scale 2): the kernel widened to 4 source pixels a side, PIL's a = -0.5
    w = crop_weights(8, 4, 0, 4, "bicubic")
    cubic = torch.tensor([((1.5 * x - 2.5) * x * x + 1) if x < 1 else
                          (((x - 5) * x + 8) * x - 4) * -0.5 if x < 2 else 0.0
                          for x in (abs(p + 0.5 - 3.0) / 2 for p in range(8))])  # centre 3
    assert torch.allclose(w[1], cubic / cubic.sum(), atol=1e-6)
    # nearest reads the pixel under each output centre; the centre crop offsets it
    assert crop_weights(3, 6, 1, 4, "nearest").argmax(dim=1).tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize("mode", ["shortest", "squash"])
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_crops_match_pil_preprocess_pixels(interpolation, mode):
    """Crop pixels against torchvision's Resize (PIL) + CenterCrop of the PIL crop, for up- and
    down-scaled boxes, in every interpolation torchvision hands to PIL: nearest exactly; the
    other filters to rounding (where Pillow >= 13 runs the vertical pass first, a clipped
    bicubic / lanczos overshoot at a hard edge can differ by a few levels more)."""
    from torchvision import transforms as T

    rng = np.random.default_rng(3)
    image = textured_image(rng, 200, 150)
    boxes = torch.from_numpy(random_boxes(rng, 60, 200, 150))
    pp = T.Compose([T.Resize((32, 32) if mode == "squash" else 32,
                             interpolation=T.InterpolationMode(interpolation)),
                    T.CenterCrop(32), T.PILToTensor()])
    ref = torch.stack([pp(image.crop(tuple(b))) for b in boxes.tolist()]).float()
    # mean 0, std 1 / 255: the crops in PIL's 0..255 levels
    ours = crop_boxes(torch.from_numpy(np.array(image)).permute(2, 0, 1), boxes, 32,
                      (0, 0, 0), (1 / 255,) * 3, interpolation, mode)
    assert ours.shape == ref.shape == (60, 3, 32, 32)
    diff = (ours - ref).abs()
    if interpolation.startswith("nearest"):
        assert torch.equal(ours, ref)
    elif interpolation in ("box", "bilinear", "hamming"):  # no overshoot: rounding only
        assert diff.max() <= 1.0 + 1e-4
    else:
        assert (diff > 1.5).float().mean() < 0.002 and diff.mean() < 0.05, diff.max()


def test_preprocess_resize_reads_the_teachers_own_transform():
    from open_clip.transform import image_transform
    from torchvision import transforms as T

    assert preprocess_resize(image_transform(32, is_train=False), 32) == ("bicubic", "shortest")
    assert preprocess_resize(image_transform(32, is_train=False, interpolation="bilinear"),
                             32) == ("bilinear", "shortest")
    assert preprocess_resize(image_transform(32, is_train=False, resize_mode="squash"),
                             32) == ("bicubic", "squash")
    nearest = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.NEAREST),
                         T.CenterCrop(32), T.ToTensor()])
    assert preprocess_resize(nearest, 32) == ("nearest", "shortest")
    with pytest.raises(ValueError, match="Resize"):  # open_clip's resize_mode='longest'
        preprocess_resize(image_transform(32, is_train=False, resize_mode="longest"), 32)
    with pytest.raises(ValueError, match="input size 32"):
        preprocess_resize(image_transform(40, is_train=False), 32)
    with pytest.raises(ValueError, match="CenterCrop"):
        preprocess_resize(T.Compose([T.Resize(32), T.ToTensor()]), 32)


def test_crops_do_not_depend_on_the_size_classes(monkeypatch):
    """Padding a box's patch into a bigger class (CUDA cuts fewer classes) reads only weight-0
    pixels: one class for all boxes, or one box per class, gives the default's crops."""
    from ovdistill.pipeline import crops

    rng = np.random.default_rng(8)
    image = torch.from_numpy(np.array(block_noise(rng, 150, 110, block=2))).permute(2, 0, 1)
    boxes = torch.from_numpy(varied_boxes(rng, 40, 150, 110))
    default = crop_boxes(image, boxes, 32, (0, 0, 0), (1 / 255,) * 3)
    for cut in (lambda sides, ratio=0: [(0, len(sides))],
                lambda sides, ratio=0: [(i, i + 1) for i in range(len(sides))]):
        monkeypatch.setattr(crops, "size_classes", cut)
        got = crop_boxes(image, boxes, 32, (0, 0, 0), (1 / 255,) * 3)
        assert (got - default).abs().max() <= 1.0 + 1e-4  # at most a rounding flip
        assert (got != default).float().mean() < 1e-3


def test_region_crops_orders_1x_then_context(teacher):
    image = torch.randint(0, 256, (3, 50, 80), dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 10.0, 30.0, 40.0], [50.0, 5.0, 79.0, 45.0]])
    both = region_crops(image, boxes, 32, teacher.mean, teacher.std, scale=1.5)
    assert both.shape == (4, 3, 32, 32)
    assert torch.equal(both[:2], crop_boxes(image, boxes, 32, teacher.mean, teacher.std))
    big = enlarge_boxes(boxes, 1.5, 80, 50)
    assert torch.equal(both[2:], crop_boxes(image, big, 32, teacher.mean, teacher.std))


def test_combine_views_sums_each_box_with_its_own_context_crop():
    # rows: box 0 at 1x, box 1 at 1x, box 0 at 1.5x, box 1 at 1.5x
    feats = torch.tensor([[1.0, 0, 0], [2, 0, 0], [0, 3, 0], [0, 0, -6]], dtype=torch.bfloat16)
    got = combine_views(feats)
    want = torch.tensor([[1.0, 3, 0], [1, 0, -3]]) / 10 ** 0.5
    assert got.dtype == torch.float32 and got.shape == (2, 3)
    assert torch.allclose(got, want, atol=1e-7)


def test_rebatch_cuts_full_batches_in_order():
    chunks = [torch.arange(0, 5), torch.arange(5, 6), torch.arange(6, 19), torch.arange(19, 22)]
    batches = list(regions.rebatch(iter(chunks), 4))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 2]
    assert torch.equal(torch.cat(batches), torch.arange(22))


def test_embeddings_do_not_depend_on_batch_size(teacher):
    rng = np.random.default_rng(4)
    images = []
    for w, h, n in ((90, 60, 5), (70, 100, 0), (120, 80, 11)):
        im = torch.from_numpy(np.array(textured_image(rng, w, h))).permute(2, 0, 1)
        images.append((im, torch.from_numpy(random_boxes(rng, n, w, h))))
    crops = [regions.teacher_crops(teacher, im, b) for im, b in images]
    small = regions.region_embeddings(teacher, iter(crops), batch_size=3)
    large = regions.region_embeddings(teacher, iter(crops), batch_size=1000)
    assert small.shape == (16, TINY_CONFIG["embed_dim"])
    assert torch.allclose(small, large, atol=1e-5)


# ----------------------------------------------------------------------------- the stage


def test_schema_norms_and_row_counts(built):
    ctx, _, boxes, manifest = built
    out = ctx.stage_dir("regions")
    files = sorted(out.glob("part-*.parquet"))
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet",
                                       "part-00002.parquet"]
    d = TINY_CONFIG["embed_dim"]
    want = PROPOSALS_SCHEMA.append(pa.field("embedding", pa.list_(pa.float16(), d)))
    tables = [pq.read_table(f) for f in files]
    for t in tables:
        assert t.schema.remove_metadata() == want
    assert len(tables[1]) == 0  # the val-only proposals part
    table = pa.concat_tables(tables)
    # train images 1..5 have proposals; image 5 is corrupt; 6 and 7 are val
    assert sorted(set(table.column("image_id").to_pylist())) == [1, 2, 3, 4]
    assert len(table) == sum(len(boxes[i]) for i in (1, 2, 3, 4)) == manifest["rows"]
    emb = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, d)
    assert emb.dtype == np.float16
    norms = np.linalg.norm(emb.astype(np.float32), axis=1)
    assert np.abs(norms - 1).max() < 1e-3
    assert manifest["teacher"] == read_json(ctx.cache / "teacher" / "_MANIFEST.json")["teacher"]


def test_corrupt_image_is_a_reject_and_the_part_goes_on(built):
    ctx, _, _, manifest = built
    stats = read_json(ctx.stage_dir("regions") / "part-00002.stats.json")
    assert manifest["rejects"] == 1
    [reject] = stats["rejects"]
    assert reject["item"] == 5 and reject["file"].endswith("train_005.jpg")
    assert "train_005.jpg" in reject["reason"] and "\n" not in reject["reason"]
    assert stats["images"] == 2 and stats["rows"] == 18


def test_agreement_with_per_crop_pil_reference(built, teacher):
    """cosine >= 0.99 against PIL crop -> teacher.preprocess -> encode (1x + 1.5x, sum,
    normalise), for every stored row; and each row is closest to its own reference."""
    ctx, _, _, _ = built
    table = pa.concat_tables(pq.read_table(p) for p in
                             sorted(ctx.stage_dir("regions").glob("part-*.parquet")))
    d = TINY_CONFIG["embed_dim"]
    stored = torch.from_numpy(np.asarray(table.column("embedding").combine_chunks().flatten())
                              .reshape(-1, d).astype(np.float32))
    names = {1: "train_001.jpg", 2: "train_002.jpg", 3: "train_003.jpg", 4: "train_004.jpg"}
    images = {i: load_rgb(ctx.dataset.root / "train" / n) for i, n in names.items()}
    ref = torch.stack([reference_embedding(teacher, images[iid], box) for iid, box in
                       zip(table.column("image_id").to_pylist(), table.column("box").to_pylist())])
    cos = F.cosine_similarity(stored, ref)
    print(f"cosine to reference: min {cos.min():.6f} mean {cos.mean():.6f}")
    off = (F.normalize(stored, dim=1) @ ref.T).fill_diagonal_(float("nan"))
    print(f"cosine to other rows' references: median {off.nanmedian():.4f}")
    assert cos.min() >= 0.99, cos.min()
    sim = F.normalize(stored, dim=1) @ ref.T
    assert (sim.argmax(dim=1) == torch.arange(len(ref))).float().mean() > 0.9


def test_context_crop_counts_with_a_pixel_dependent_teacher(planted):
    """With `PixelEncoder` a box's 1x and 1.5x crops point elsewhere, so every stored row must
    be clearly closer to the reference normalize(V(1x) + V(1.5x)) than to normalize(V(1x))
    (the context crop dropped or replaced by the 1x one) or normalize(V(1.5x))."""
    ctx, teacher, table = planted
    stored = torch.from_numpy(np.asarray(table.column("embedding").combine_chunks().flatten())
                              .reshape(-1, PIXEL_DIM).astype(np.float32))
    assert len(stored) == 5 * 20
    records = json.loads(ctx.dataset.split("train").annotations.read_text())["images"]
    images = {im["id"]: load_rgb(ctx.dataset.root / "train" / im["file_name"])
              for im in records}
    views = torch.stack([view_features(teacher, images[iid], box) for iid, box in
                         zip(table.column("image_id").to_pylist(),
                             table.column("box").to_pylist())])
    ref = F.normalize(views[:, 0] + views[:, 1], dim=1)
    only_1x, only_context = F.normalize(views[:, 0], dim=1), F.normalize(views[:, 1], dim=1)
    between = F.cosine_similarity(views[:, 0], views[:, 1])
    cos = F.cosine_similarity(stored, ref)
    print(f"planted teacher: cos(1x, 1.5x) max {between.max():.4f} mean {between.mean():.4f}; "
          f"stored vs reference min {cos.min():.6f} mean {cos.mean():.6f}")
    assert between.mean() < 0.5  # the teacher does tell the two crops apart
    for wrong in (only_1x, only_context):
        gap = 1 - F.cosine_similarity(ref, wrong)  # how far the wrong answer is from the right
        assert gap.min() > 0.02
        # nearer the reference than the wrong answer by at least half the gap, on every row
        margin = (cos - F.cosine_similarity(stored, wrong)) / gap
        assert margin.min() > 0.5, (margin.min(), margin.argmin())
    assert cos.min() > 0.99, cos.min()


def test_agreement_with_pil_reference_under_a_pixel_sensitive_teacher(varied, teacher):
    """The regions path (decode, batched crops, encode, sum, normalise, float16 rows) against
    the per-crop reference (PIL crop of the 1x and 1.5x box, the teacher's own open_clip
    preprocess, encode, sum, normalise) under `ProjectionEncoder`, over 520 rows of tiny,
    small, large and thin boxes: cosine >= 0.99 on every row. The teacher must tell the crops
    apart for that bar to mean anything: other rows' references, and a box's own 1x and 1.5x
    views, point elsewhere. (The previous roi_align crops, adaptive averaging instead of PIL's
    antialiased bicubic, gave min 0.971 here, 13% of the rows below 0.99.)"""
    files, proposals, images = varied
    sensitive = sensitive_teacher(teacher)
    table, rejects = regions.embed_proposals(sensitive, proposals, files,
                                             regions.Config(batch_size=64))
    assert not rejects and len(table) == len(proposals) == 520
    boxes = pixel_boxes(torch.tensor(table.column("box").to_pylist()))
    short = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert (short < SENSITIVE_SIZE / 2).sum() > 100  # upsampled at least 2x
    assert (short > 2 * SENSITIVE_SIZE).sum() > 30  # downsampled at least 2x (1.5x: more)
    stored = torch.from_numpy(np.asarray(table.column("embedding").combine_chunks().flatten())
                              .reshape(-1, PROJ_DIM).astype(np.float32))
    views = torch.stack([view_features(sensitive, images[iid], box) for iid, box in
                         zip(table.column("image_id").to_pylist(),
                             table.column("box").to_pylist())])
    ref = F.normalize(views[:, 0] + views[:, 1], dim=1)
    others = (ref @ ref.T).fill_diagonal_(float("nan"))
    between = F.cosine_similarity(views[:, 0], views[:, 1])
    cos = F.cosine_similarity(stored, ref)
    print(f"pixel-sensitive teacher: other rows' references median {others.nanmedian():.4f}, "
          f"cos(1x, 1.5x) mean {between.mean():.4f}; stored vs reference min {cos.min():.6f} "
          f"mean {cos.mean():.6f}")
    assert others.nanmedian() < 0.2 and between.mean() < 0.5
    assert cos.min() >= 0.99, (cos.min(), cos.argmin())


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_a_teachers_interpolation_is_honoured(varied, teacher, interpolation):
    """A teacher whose preprocess resizes with bilinear (open_clip's option) or nearest gets
    crops resampled that way: cosine >= 0.99 to its own per-crop reference on every row, while
    bicubic crops (the default) fall short of it for the same teacher."""
    _, proposals, images = varied
    sensitive = sensitive_teacher(teacher, interpolation)
    assert preprocess_resize(sensitive.preprocess, SENSITIVE_SIZE) == (interpolation,
                                                                       "shortest")
    got, bicubic, ref = [], [], []
    for iid in images:
        rows = proposals.filter(pc.equal(proposals.column("image_id"), iid))
        boxes = torch.tensor(rows.column("box").to_pylist())
        image = torch.from_numpy(np.array(images[iid])).permute(2, 0, 1)
        got.append(regions.region_embeddings(
            sensitive, [regions.teacher_crops(sensitive, image, boxes)], 64))
        bicubic.append(regions.region_embeddings(sensitive, [region_crops(
            image, boxes, SENSITIVE_SIZE, sensitive.mean, sensitive.std)], 64))
        ref += [reference_embedding(sensitive, images[iid], b) for b in boxes]
    ref = torch.stack(ref)
    cos = F.cosine_similarity(torch.cat(got), ref)
    wrong = F.cosine_similarity(torch.cat(bicubic), ref)
    print(f"{interpolation} teacher: min cosine {cos.min():.6f}; with bicubic crops "
          f"{wrong.min():.4f}")
    assert len(ref) == 520 and cos.min() >= 0.99
    assert wrong.min() < 0.99


def test_rerun_is_up_to_date_and_another_teacher_is_refused(built, teacher_files):
    ctx, cfg, _, _ = built
    stats = ctx.stage_dir("regions") / "part-00000.stats.json"
    before = stats.stat().st_mtime_ns
    run_stage(regions, ctx, cfg, distributor="local", progress=False, log=lambda _: None)
    assert stats.stat().st_mtime_ns == before
    manifest_path = ctx.cache / "teacher" / "_MANIFEST.json"
    original = manifest_path.read_bytes()
    try:
        write_teacher_manifest(ctx.cache, teacher_files[1])
        with pytest.raises(StageMismatch, match="inputs.teacher"):
            run_stage(regions, ctx, cfg, distributor="local", progress=False,
                      log=lambda _: None)
    finally:
        manifest_path.write_bytes(original)


def test_rows_made_with_other_crops_are_refused(built, monkeypatch):
    ctx, cfg, _, _ = built
    monkeypatch.setattr(regions, "CROPS_VERSION", "roi-align-bilinear")
    with pytest.raises(StageMismatch, match="inputs.crops"):
        run_stage(regions, ctx, cfg, distributor="local", progress=False, log=lambda _: None)


def test_agreement_tool_reads_a_built_cache(built, capsys):
    from ovdistill.bench import regions_agreement

    ctx, _, _, _ = built
    manifest = ctx.cache.parent.parent / "mini.yaml"
    assert regions_agreement.main(["--manifest", str(manifest), "--cache",
                                   str(ctx.cache.parent), "--rows", "0"]) == 0
    out = capsys.readouterr().out
    assert "part-00000.parquet: 18 rows of 2 images" in out
    assert "for the stored rows: met" in out


def test_bench_runs_and_prints_its_table(capsys):
    from ovdistill.bench import regions_bench

    assert regions_bench.main(["--device", "cpu", "--images", "2", "--m", "6", "--size",
                               "96x64", "--batch-size", "8", "--pil-images", "1",
                               "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "end-to-end (decode+crops+encode+write)" in out and "24" in out
    assert "ratio end-to-end / bare" in out and "crop speed-up batched / PIL" in out


# ----------------------------------------------------------------------------- what the stage records


class FakeClock:
    """Stands in for the stage module's `time`: `time()` returns the given readings in turn."""

    def __init__(self, *readings: float):
        self.readings = list(readings)

    def time(self) -> float:
        return self.readings.pop(0)


def test_a_parts_result_counts_images_crops_speed_and_refused_names(built, tmp_path,
                                                                     monkeypatch):
    """Part 2 (train images 3, 4 and the corrupt 5) plus a name that leaves the image folder:
    the refused name and the corrupt image are the rejects, in that order; "images" counts
    the decoded ones, "crops" two per row, "crops_per_s" from the part's own clock (0.7 s)."""
    ctx, cfg, _, _ = built
    worker = regions.Worker(ctx, cfg)
    part = regions.plan(ctx, cfg)[2]
    part = Part(part.index, part.items + ((99, "../escape.jpg"),))
    monkeypatch.setattr(regions, "time", FakeClock(100.0, 100.7))
    out = PartOutput(tmp_path / "regions")
    result = worker.run_part(part, out)
    out.commit()
    assert result.rows == 18 == len(pq.read_table(tmp_path / "regions" / "part-00002.parquet"))
    assert result.extra == {"images": 2, "crops": 36, "embed_dim": TINY_CONFIG["embed_dim"],
                            "crops_per_s": 51.4}  # 36 / 0.7 = 51.43
    refused, corrupt = result.rejects
    images = ctx.dataset.split("train").images
    assert refused["item"] == 99 and refused["file"] == str(images)
    assert refused["reason"].startswith("image 99: ") and "../escape.jpg" in refused["reason"]
    assert corrupt["item"] == 5 and corrupt["file"].endswith("train_005.jpg")


def test_the_worker_loads_the_teacher_on_the_contexts_device(built, monkeypatch):
    ctx, cfg, _, _ = built
    calls = []
    monkeypatch.setattr(regions, "teacher_from_cache",
                        lambda *args, **kw: calls.append((args, kw)) or "the teacher")
    monkeypatch.setattr(type(ctx), "resolve_device", lambda self: "cuda:3")
    worker = regions.Worker(ctx, cfg)
    assert calls == [((ctx, "cuda:3"), {})] and worker.teacher == "the teacher"
    assert worker.images_dir == ctx.dataset.split("train").images


def test_embed_proposals_hands_on_the_stage_settings(monkeypatch):
    seen = []
    monkeypatch.setattr(regions, "embed_regions",
                        lambda *args, **kw: seen.append((args, kw)) or "rows")
    cfg = regions.Config(batch_size=7, context_scale=2.0, decode_threads=3)
    assert regions.embed_proposals("teacher", "proposals", "files", cfg) == "rows"
    assert seen == [(("teacher", "proposals", "files"),
                     {"batch_size": 7, "context_scale": 2.0, "decode_threads": 3})]


def test_inputs_and_totals_in_the_manifest(built):
    ctx, cfg, _, manifest = built
    want = {"teacher": ctx.fingerprint("teacher"), "proposals": "proposals-v1",
            "crops": regions.CROPS_VERSION}
    assert regions.inputs(ctx, cfg) == want  # the runner adds where it ran
    assert manifest["inputs"] == {**want, "device": "cpu", "precision": "fp32"}
    assert manifest["images"] == 4 and manifest["crops"] == 2 * manifest["rows"] == 72
    assert manifest["embed_dim"] == TINY_CONFIG["embed_dim"]
    teacher = read_json(ctx.cache / "teacher" / "_MANIFEST.json")["teacher"]
    stats = [{"crops": 20, "seconds": 2.0, "images": 2, "embed_dim": 32},
             {"crops": 0, "seconds": 1.0, "images": 0, "embed_dim": 32}]
    assert regions.finalize(ctx, cfg, stats) == {  # 20 crops / 3 s = 6.67
        "teacher": teacher, "embed_dim": 32, "images": 2, "crops": 20, "crops_per_s": 6.7}
    assert regions.finalize(ctx, cfg, []) == {
        "teacher": teacher, "embed_dim": None, "images": 0, "crops": 0, "crops_per_s": None}


def test_an_image_list_without_ids_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": [{"file_name": "a.jpg"}], "annotations": []}))
    with pytest.raises(StageError) as e:
        regions.image_files(path)
    assert str(e.value) == f"{path}: cannot read the image list (KeyError: 'id')"


def test_a_missing_proposals_part_is_one_error_naming_it(tmp_path):
    ctx = make_dataset(tmp_path)
    write_proposals(ctx)
    missing = ctx.stage_dir("proposals") / "part-00001.parquet"
    missing.unlink()
    with pytest.raises(StageError) as e:
        regions.plan(ctx, regions.Config())
    assert str(e.value) == (f"{missing} is missing although the proposals stage finished; "
                            f"rerun it with --rebuild")
