"""The CLIP teacher: loading and identity, offline failure, prompt ensembling, the zero-shot
report on planted crops, and the teacher stage training a micro CLIP with open_clip_train."""
from __future__ import annotations

import csv
import json
import os
import threading
import time

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip
from ovdistill.pipeline import clip_teacher as T
from ovdistill.pipeline.cache import atomic_write_json, sha256_file
from ovdistill.pipeline.manifests import Category, load_manifest
from ovdistill.pipeline.runner import StageContext, run_stage
from ovdistill.stages import teacher as TS


def _spec(micro, weights=None) -> T.TeacherSpec:
    config, default = micro
    return T.TeacherSpec("micro-clip", str(weights or default), str(config))


# ----------------------------------------------------------------------------- loading


def test_save_load_round_trip_gives_identical_embeddings(micro):
    config, weights = micro
    reference = open_clip.create_model("micro-clip")
    reference.load_state_dict(torch.load(weights, weights_only=True))
    reference.eval()
    teacher = T.load_teacher(_spec(micro))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = ["a photo of a star", "a red circle"]
    with torch.no_grad():
        want_img = reference.encode_image(x)
        want_txt = reference.encode_text(open_clip.get_tokenizer("micro-clip")(texts))
    assert torch.equal(teacher.encode_images(x), want_img)
    assert torch.equal(teacher.encode_texts(texts), want_txt)
    assert teacher.encode_images(x).dtype == torch.float32
    assert (teacher.embed_dim, teacher.image_size) == (32, 32)
    assert teacher.mean == open_clip.OPENAI_DATASET_MEAN
    assert teacher.identity == {"model": "micro-clip", "pretrained": str(weights.resolve()),
                                "model_config": str(config.resolve()),
                                "sha256": sha256_file(weights)}
    assert not teacher.model.training


def test_packaged_default_config_loads(tmp_path):
    spec = T.TeacherSpec(T.DEFAULT_MODEL)
    T.register_model_config(spec)
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model(T.DEFAULT_MODEL).state_dict(), weights)
    teacher = T.load_teacher(T.TeacherSpec(T.DEFAULT_MODEL, str(weights)))
    assert (teacher.image_size, teacher.embed_dim) == (48, 128)
    assert teacher.encode_images(torch.zeros(2, 3, 48, 48)).shape == (2, 128)
    assert teacher.preprocess(Image.new("RGB", (90, 30))).shape == (3, 48, 48)


def test_identity_sha256_follows_the_weights(micro, tmp_path):
    torch.manual_seed(5)
    other = tmp_path / "other.pt"
    torch.save(open_clip.create_model("micro-clip").state_dict(), other)
    a = T.load_teacher(_spec(micro)).identity
    b = T.load_teacher(_spec(micro, other)).identity
    assert a["sha256"] != b["sha256"]
    assert b["sha256"] == sha256_file(other)


def test_teacher_from_cache_checks_the_recorded_sha256(micro, tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(micro[1].read_bytes())
    ident = T.load_teacher(_spec(micro, weights)).identity
    ctx = StageContext(dataset=None, cache=tmp_path / "cache")  # type: ignore[arg-type]
    atomic_write_json(ctx.stage_dir("teacher") / "_MANIFEST.json",
                      {"teacher": ident, "fingerprint": "f"})
    assert T.teacher_from_cache(ctx).identity == ident

    # A cache moved since it was built: the weights are found in the teacher stage folder and
    # the recorded identity (which downstream fingerprints hash) is kept as it was.
    moved = ctx.stage_dir("teacher") / "w.pt"
    moved.write_bytes(weights.read_bytes())
    gone = {**ident, "pretrained": str(tmp_path / "elsewhere" / "w.pt")}
    atomic_write_json(ctx.stage_dir("teacher") / "_MANIFEST.json",
                      {"teacher": gone, "fingerprint": "f"})
    assert T.teacher_from_cache(ctx).identity == gone
    atomic_write_json(ctx.stage_dir("teacher") / "_MANIFEST.json",
                      {"teacher": ident, "fingerprint": "f"})

    torch.manual_seed(9)
    torch.save(open_clip.create_model("micro-clip").state_dict(), weights)
    with pytest.raises(T.TeacherError, match="changed since .* was built"):
        T.teacher_from_cache(ctx)


def _assert_offline_failure(spec: T.TeacherSpec, within: float = 10.0) -> None:
    """Loading `spec` fails, well within `within` seconds, with one line saying what to pass."""
    start = time.monotonic()
    with pytest.raises(T.TeacherError) as err:
        T.load_teacher(spec)
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert elapsed < within, f"offline failure took {elapsed:.2f}s"
    assert "\n" not in message
    assert "offline" in message and "--teacher-pretrained" in message


def test_named_tag_offline_fails_fast_with_one_line(monkeypatch):
    """With HF_HUB_OFFLINE the network is not even tried (no name lookup, no connection)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dialled = []

    def no_network(*args, **kwargs):
        dialled.append(args[:2])
        raise OSError("no network in this test")

    monkeypatch.setattr(T.socket, "getaddrinfo", no_network)
    monkeypatch.setattr(T.socket, "create_connection", no_network)
    _assert_offline_failure(T.TeacherSpec("ViT-B-32", "laion2b_s34b_b79k"))
    _assert_offline_failure(T.TeacherSpec("ViT-B-32", "openai"))  # a URL tag, not the HF hub
    assert dialled == []


def test_unreachable_hub_fails_fast_even_without_hf_hub_offline(monkeypatch):
    """A hub that never answers (DNS or connect hanging) is given up on after the probe's
    second, not waited for: the hang here lasts 30 s, the load must fail within 15."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    dialled, release = threading.Event(), threading.Event()

    def hang(*args, **kwargs):
        dialled.set()
        release.wait(30.0)
        raise OSError("unreachable")

    monkeypatch.setattr(T.socket, "create_connection", hang)
    try:
        _assert_offline_failure(T.TeacherSpec("ViT-B-32", "laion2b_s34b_b79k"), within=15.0)
    finally:
        release.set()
    assert dialled.is_set()  # the hub was probed (and not answered)


def test_bad_specs_have_clear_errors(micro, tmp_path):
    config, weights = micro
    with pytest.raises(T.TeacherError, match="neither a file nor an open_clip tag of 'ViT-B-32'"):
        T.load_teacher(T.TeacherSpec("ViT-B-32", "no-such-tag"))
    with pytest.raises(T.TeacherError, match="checkpoint .*missing.pt not found"):
        T.load_teacher(T.TeacherSpec("ViT-B-32", str(tmp_path / "missing.pt")))
    with pytest.raises(T.TeacherError, match="defines model 'micro-clip'"):
        T.load_teacher(T.TeacherSpec("other-name", str(weights), str(config)))
    with pytest.raises(T.TeacherError, match="unknown open_clip model 'nope'"):
        T.load_teacher(T.TeacherSpec("nope", str(weights)))
    with pytest.raises(T.TeacherError, match="cannot load .* into open_clip model 'ViT-S-32'"):
        T.load_teacher(T.TeacherSpec("ViT-S-32", str(weights)))
    with pytest.raises(T.TeacherError, match="has no weights"):
        T.load_teacher(T.TeacherSpec("micro-clip", None, str(config)))


# ----------------------------------------------------------------------------- text


def test_text_embeddings_match_a_per_template_reference(micro):
    teacher = T.load_teacher(_spec(micro))
    names = ["star", "hexagon", "crescent moon"]
    templates = T.prompt_templates("simple")
    got = text_embeddings = T.text_embeddings(teacher, names, templates)
    assert got.shape == (3, 32) and got.dtype == torch.float32
    for i, name in enumerate(names):
        per_template = torch.nn.functional.normalize(
            teacher.encode_texts([t(name) for t in templates]), dim=-1)
        want = torch.nn.functional.normalize(per_template.mean(0), dim=-1)
        assert torch.allclose(text_embeddings[i], want, atol=1e-5)
    assert len(T.prompt_templates("openai")) == 80
    with pytest.raises(T.TeacherError, match="unknown prompt templates 'x'"):
        T.prompt_templates("x")


# ----------------------------------------------------------------------------- zero-shot report

# Each category is a colour; the planted model embeds a crop as its mean colour and a prompt as
# the colour of the category it names, so a crop is classified by the colour inside its box.
COLOURS = {"circle": (255, 0, 0), "square": (0, 255, 0), "star": (0, 0, 255),
           "heart": (255, 255, 0)}
PLANTED = [Category(1, "circle", "base"), Category(2, "square", "base"),
           Category(3, "star", "novel"), Category(4, "heart", "novel")]


class ColourModel(torch.nn.Module):
    def encode_image(self, x):  # x: Tensor[B, 3, S, S] in [0, 1]
        return x.mean(dim=(2, 3))

    def encode_text(self, tokens, normalize=False):  # tokens: Tensor[N, 1] category index
        colours = torch.tensor([COLOURS[c.name] for c in PLANTED], dtype=torch.float32)
        emb = colours[tokens[:, 0]]
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb


def colour_tokenizer(texts):
    names = [c.name for c in PLANTED]
    return torch.tensor([[next(i for i, n in enumerate(names) if n in t)] for t in texts])


def planted_teacher() -> T.Teacher:
    from torchvision.transforms import v2

    preprocess = v2.Compose([v2.Resize((8, 8)), v2.PILToTensor(), v2.ToDtype(torch.float32,
                                                                              scale=True)])
    return T.Teacher(model=ColourModel(), preprocess=preprocess, tokenizer=colour_tokenizer,
                     identity={}, embed_dim=3, image_size=8, mean=(0, 0, 0), std=(1, 1, 1),
                     device="cpu")


def test_zero_shot_report_on_planted_crops(tmp_path):
    images = tmp_path / "val"
    images.mkdir()
    # Image 1 (120 x 60): red, green, blue, yellow blocks 30 px wide side by side.
    im = Image.new("RGB", (120, 60), (128, 128, 128))
    for i, name in enumerate(["circle", "square", "star", "heart"]):
        im.paste(COLOURS[name], (30 * i, 0, 30 * i + 30, 60))
    im.save(images / "a.png")
    # COCO boxes are [x, y, w, h]: read as (x1, y1, x2, y2) they would cover other blocks.
    anns = [
        (1, [30, 10, 30, 40], 2, 0),  # square on green: right
        (1, [0, 0, 30, 60], 1, 0),  # circle on red: right
        (1, [60, 5, 30, 50], 1, 0),  # circle on blue: wrong (planted)
        (1, [60.4, 0.6, 29.2, 58.8], 3, 0),  # star on blue, fractional box: right
        (1, [90, 0, 30, 60], 3, 0),  # star on yellow: wrong (planted)
        (1, [90, 20, 30, 30], 4, 0),  # heart on yellow: right
        (1, [0, 0, 120, 60], 1, 1),  # crowd: not counted
        (1, [30, 0, 30, 60], 99, 0),  # not in the vocabulary: not counted
        (2, [0, 0, 10, 10], 1, 0),  # its image is missing: a reject, not counted
    ]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 120, "height": 60},
                   {"id": 2, "file_name": "missing.png", "width": 20, "height": 20}],
        "categories": [{"id": c.id, "name": c.name} for c in PLANTED] + [{"id": 99,
                                                                             "name": "x"}],
        "annotations": [{"id": k + 1, "image_id": img, "bbox": box, "category_id": cat,
                         "iscrowd": crowd, "area": box[2] * box[3]}
                        for k, (img, box, cat, crowd) in enumerate(anns)],
    }
    (tmp_path / "val.json").write_text(json.dumps(coco))

    report, rejects = TS.zero_shot_report(planted_teacher(), tmp_path / "val.json", images,
                                         PLANTED, T.prompt_templates("simple"), batch_size=2)
    assert report["n_crops"] == 6
    assert report["base_acc"] == round(2 / 3, 4)
    assert report["novel_acc"] == round(2 / 3, 4)
    assert report["per_category"] == {"circle": 0.5, "square": 1.0, "star": 0.5, "heart": 1.0}
    assert len(rejects) == 1 and rejects[0]["item"] == 2
    assert rejects[0]["file"] == "missing.png" and "missing.png" in rejects[0]["reason"]

    capped, bad = TS.zero_shot_report(planted_teacher(), tmp_path / "val.json", images,
                                     PLANTED, T.prompt_templates("simple"), max_crops=3)
    assert capped["n_crops"] + len(bad) == 3  # the missing image has one annotation

    # given class embeddings replace the prompt-ensembled ones: the same ones give the same
    # report; circle's and square's rows swapped send the square crop (right before) to circle
    text = T.text_embeddings(planted_teacher(), [c.name for c in PLANTED],
                             T.prompt_templates("simple"))
    same, _ = TS.zero_shot_report(planted_teacher(), tmp_path / "val.json", images, PLANTED,
                                  T.prompt_templates("simple"), text=text)
    assert same == report
    swapped, _ = TS.zero_shot_report(planted_teacher(), tmp_path / "val.json", images, PLANTED,
                                     T.prompt_templates("simple"), text=text[[1, 0, 2, 3]])
    assert swapped["per_category"]["square"] == 0.0
    assert swapped["per_category"]["star"] == report["per_category"]["star"]


def test_split_accuracy_reports_none_for_an_empty_split():
    pred, label = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0])
    got = TS.split_accuracy(pred, label, torch.tensor([False, False, True]))
    assert got == {"base_acc": round(2 / 3, 4), "novel_acc": None, "n_crops": 3}


# ----------------------------------------------------------------------------- training


def test_captions_missing_column_is_one_line(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_text("filepath,caption\na.jpg,x\n")
    with pytest.raises(T.TeacherError, match=r"captions.csv: missing column\(s\) \['title'\]"):
        TS.read_captions(path, tmp_path)


MANIFEST = """
name: micro
format: coco
root: {root}
splits:
  train: {{images: val, annotations: train.json}}
  val: {{images: val, annotations: val.json}}
vocabulary:
  base: [circle, square]
  novel: [star]
"""


def test_stage_inputs_follow_the_packaged_model_config(tmp_path, monkeypatch):
    """Editing the packaged config in place changes the teacher stage's inputs (so a cache
    trained from the old one is refused, not reused)."""
    packaged = tmp_path / "configs"
    packaged.mkdir()
    original = (T.CONFIG_DIR / f"{T.DEFAULT_MODEL}.json").read_text()
    (packaged / f"{T.DEFAULT_MODEL}.json").write_text(original)
    monkeypatch.setattr(TS, "CONFIG_DIR", packaged)

    class Ctx:
        def fingerprint(self, stage):
            return "d0"

    before = TS.inputs(Ctx(), TS.Config())
    assert before == {"dataset": "d0",
                      "model_config_sha256": sha256_file(packaged / f"{T.DEFAULT_MODEL}.json")}
    (packaged / f"{T.DEFAULT_MODEL}.json").write_text(original.replace('"layers": 2',
                                                                       '"layers": 3'))
    assert TS.inputs(Ctx(), TS.Config())["model_config_sha256"] != before["model_config_sha256"]


def _caption_loss(teacher: T.Teacher, images: list, names: list[str]) -> float:
    """Cross-entropy of telling each (path, class index) image's class among the texts
    "a photo of a <name>", at the model's own logit scale."""
    x = torch.stack([teacher.preprocess(Image.open(path)) for path, _ in images])
    with torch.no_grad():
        img = torch.nn.functional.normalize(teacher.encode_images(x), dim=-1)
        txt = torch.nn.functional.normalize(
            teacher.encode_texts([f"a photo of a {n}" for n in names]), dim=-1)
        logits = teacher.model.logit_scale.exp() * img @ txt.t()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor([c for _, c in images])))


@pytest.mark.slow
def test_stage_trains_with_open_clip_train_and_reports(micro, tmp_path, monkeypatch):
    """Trains the micro CLIP one epoch through `open_clip_train.main` (a subprocess), then
    checks what the manifest records against the files, and that the saved teacher is the one
    open_clip_train trained (moved from its initial weights, better on the captions)."""
    config, init_weights = micro
    trained = {}

    def train_clip(*args, **kwargs):
        state, *rest = real_train_clip(*args, **kwargs)
        trained.update(state)
        return state, *rest

    real_train_clip = TS.train_clip
    monkeypatch.setattr(TS, "train_clip", train_clip)
    root = tmp_path / "data"
    (root / "captions").mkdir(parents=True)
    (root / "val").mkdir()
    shapes = {"circle": (255, 0, 0), "square": (0, 255, 0), "star": (0, 0, 255)}
    rows = []
    for i in range(20):
        name = list(shapes)[i % 3]
        Image.new("RGB", (32, 32), shapes[name]).save(root / "captions" / f"{i}.jpg")
        rows.append([f"captions/{i}.jpg", f"a photo of a {name}"])
    rows.append(["captions/missing.jpg", "a photo of nothing"])
    with open(root / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["filepath", "title"]] + rows)
    Image.new("RGB", (64, 32), (255, 0, 0)).save(root / "val" / "v.jpg")
    (root / "val.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "v.jpg", "width": 64, "height": 32}],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(shapes)],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 32, 32], "category_id": 1,
                         "iscrowd": 0, "area": 1024},
                        {"id": 2, "image_id": 1, "bbox": [32, 0, 32, 32], "category_id": 3,
                         "iscrowd": 0, "area": 1024}],
    }))
    (root / "train.json").write_text((root / "val.json").read_text())
    manifest = tmp_path / "micro.yaml"
    manifest.write_text(MANIFEST.format(root=root))
    ctx = StageContext(dataset=load_manifest(manifest), cache=tmp_path / "cache" / "micro")
    atomic_write_json(ctx.stage_dir("dataset") / "_MANIFEST.json", {"fingerprint": "d0"})
    cfg = TS.Config(model="micro-clip", model_config=str(config), epochs=1, batch_size=8,
                   warmup=1, workers=0)

    got = run_stage(TS, ctx, cfg, distributor="local", progress=False, log=lambda s: None)

    weights = ctx.stage_dir("teacher") / "micro-clip.pt"
    assert got["teacher"] == {"model": "micro-clip", "pretrained": str(weights.resolve()),
                              "model_config": str(config.resolve()),
                              "sha256": sha256_file(weights)}
    assert got["zero_shot"]["n_crops"] == 2
    assert got["train"]["captions"] == 20 and got["train"]["final_loss"] is not None
    assert got["train"]["cpu_seconds"] > 0
    assert got["rejects"] == 1
    stats = json.loads((ctx.stage_dir("teacher") / "part-00000.stats.json").read_text())
    assert stats["rejects"][0]["file"] == "captions/missing.jpg"
    assert "Train Epoch: 0" in (ctx.stage_dir("teacher") / "train.log").read_text()
    assert not list(ctx.stage_dir("teacher").glob(".*"))  # no temporaries left behind
    assert T.teacher_from_cache(ctx).identity == got["teacher"]

    # the saved weights are open_clip_train's, and it trained them: open_clip_train with
    # --seed 0 starts from the micro fixture's weights (torch.manual_seed(0); create_model)
    saved = torch.load(weights, weights_only=True)
    init = torch.load(init_weights, weights_only=True)
    assert saved.keys() == trained.keys() == init.keys()
    assert all(torch.equal(saved[k], trained[k]) for k in saved)
    moved = [k for k in saved if not torch.equal(saved[k], init[k])]
    assert moved == list(saved)  # every tensor was trained
    images = [(root / "captions" / f"{i}.jpg", i % 3) for i in range(20)]
    before = _caption_loss(T.load_teacher(_spec(micro)), images, list(shapes))
    after = _caption_loss(T.teacher_from_cache(ctx), images, list(shapes))
    assert after < before - 0.1, (before, after)
