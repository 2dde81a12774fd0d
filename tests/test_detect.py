"""`python -m ovdistill.trainer.detect` and `trainer.evaluate --pictures` on a tiny trained run.

The fixture is the trainer's tiny cache (bench/wds_fixture.py) with a real tiny open_clip
teacher (random weights, tests/test_regions.py) whose text stage has run for real, so the
cache's `text/tiny.parquet` holds the teacher's prompt-ensembled texts; a 2-step run with
separate heads and centred targets is trained on it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ovdistill.bench.wds_fixture import TINY_SETTINGS, write_tiny_cache
from ovdistill.pipeline.clip_teacher import prompt_templates, teacher_from_cache
from ovdistill.pipeline.images import load_rgb
from ovdistill.pipeline.manifests import Category, load_manifest
from ovdistill.pipeline.runner import StageContext, make_config, run_stage
from ovdistill.stages import text
from ovdistill.trainer import detect, pictures
from ovdistill.trainer.data import resize_for_test
from ovdistill.trainer.evaluate import coco_metrics, load_run, precision_summary
from ovdistill.trainer.evaluate import main as evaluate_main
from ovdistill.trainer.train import main as train_main

from tests.test_regions import TINY_CONFIG, make_teacher_files, write_teacher_manifest
from tests.test_text import reference, write_regions

ROOT = Path(__file__).resolve().parents[1]
SETS = [arg for k, v in TINY_SETTINGS.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
CLASSES = ["box", "ball", "ring", "a yellow thing"]  # fixture: box, ball, bar base; ring novel
SPLITS = ["base", "base", "novel", "novel"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("detect")
    tiny = write_tiny_cache(root, dim=TINY_CONFIG["embed_dim"])
    spec = make_teacher_files(root / "teacher-files", seed=0)
    write_teacher_manifest(tiny.dataset_dir, spec)
    write_regions(tiny.dataset_dir, tiny.dim)
    dataset = load_manifest(tiny.manifest, cache_root=tiny.cache)
    ctx = StageContext(dataset=dataset, cache=tiny.dataset_dir, device="cpu")
    # the text stage for real: templates "simple" (its default is "openai")
    run_stage(text, ctx, make_config(text, {"templates": "simple"}), distributor="local",
              progress=False, log=lambda _: None)
    run = root / "run"
    assert train_main(["--manifest", str(tiny.manifest), "--cache", str(tiny.cache),
                       "--out", str(run), "--device", "cpu", *SETS, "--steps", "2",
                       "--heads", "separate", "--set", "center_targets=true",
                       "--set", "score_thresh=0.0"]) == 0
    val = sorted((tiny.dataset_dir / "dataset" / "val").glob("*.jpg"))
    return tiny, dataset, ctx, run, val


def _cli(tiny, run, out, *extra):
    return ["--run", str(run), "--cache", str(tiny.cache), "--manifest", str(tiny.manifest),
            "--device", "cpu", "--out", str(out), *extra]


def _text_stage_rows(tiny) -> dict[str, torch.Tensor]:
    table = pq.read_table(tiny.dataset_dir / "text" / "tiny.parquet")
    emb = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    return dict(zip(table.column("name").to_pylist(), torch.from_numpy(emb)))


# ----------------------------------------------------------------------------- detect CLI


def test_cli_writes_png_and_json_equal_to_model_detect(tiny_run, tmp_path, capsys):
    tiny, dataset, ctx, run, val = tiny_run
    images = [str(p) for p in val[:2]]
    out = tmp_path / "det.png"
    rc = detect.main(_cli(tiny, run, out, "--image", *images, "--classes", ",".join(CLASSES),
                          "--ensemble", "--score", "0.0", "--side", "128"))
    assert rc == 0
    assert f"wrote {out}" in capsys.readouterr().out
    doc = json.loads((tmp_path / "det.json").read_text())
    assert [c["name"] for c in doc["categories"]] == CLASSES
    assert [c["split"] for c in doc["categories"]] == SPLITS
    assert [(im["id"], im["file_name"]) for im in doc["images"]] == list(enumerate(images, 1))

    # the reference: the run's model with the same vocabulary, called directly
    model, _, _ = load_run(run / "latest.pt", dataset, tiny.dataset_dir, torch.device("cpu"))
    teacher = teacher_from_cache(ctx, "cpu")
    emb = text.category_embeddings(
        teacher, [Category(i + 1, n, s) for i, (n, s) in enumerate(zip(CLASSES, SPLITS))],
        prompt_templates("simple"))
    model.set_vocabulary(emb, torch.tensor([s == "base" for s in SPLITS]))
    want = []
    for image_id, path in enumerate(images, 1):
        pixels = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1).contiguous()
        resized, scale = resize_for_test(pixels, model.cfg.test_size, model.cfg.max_size)
        det = model.detect([resized], ensemble=True)[0]
        for (x1, y1, x2, y2), s, c in zip((det.boxes / scale).tolist(), det.scores.tolist(),
                                          det.labels.tolist()):
            want.append({"image_id": image_id, "category": CLASSES[c], "category_id": c + 1,
                         "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2),
                                  round(y2 - y1, 2)], "score": round(s, 5)})
    got = [{k: a[k] for k in ("image_id", "category", "category_id", "bbox", "score")}
           for a in doc["annotations"]]
    assert want and got == want
    assert all(a["file_name"] == images[a["image_id"] - 1] for a in doc["annotations"])

    # the picture: 2 panels of 128 x (128 + title) in one row, under the header strip
    png = Image.open(out)
    pad = pictures.GRID_PADDING
    assert png.format == "PNG"
    assert png.width == 2 * 128 + 3 * pad
    assert png.height > 128 + pictures.TITLE_HEIGHT + 2 * pad

    # --score keeps only detections at or above it
    rc = detect.main(_cli(tiny, run, tmp_path / "hi.png", "--image", *images, "--classes",
                          ",".join(CLASSES), "--ensemble", "--score", "0.2"))
    assert rc == 0
    high = json.loads((tmp_path / "hi.json").read_text())["annotations"]
    assert [a["score"] for a in high] == [w["score"] for w in want if w["score"] >= 0.2]


def test_class_embeddings_are_the_text_stages(tiny_run):
    tiny, dataset, ctx, run, _ = tiny_run
    teacher = teacher_from_cache(ctx, "cpu")
    settings = detect.text_settings(ctx)
    assert settings == detect.TextSettings("simple", True)  # what the text stage recorded
    _, _, run_vocab = load_run(run / "latest.pt", dataset, tiny.dataset_dir,
                               torch.device("cpu"))
    names = ["ring", " BOX ", "ball"]  # case and spacing aside, categories of the dataset
    cats = detect.class_categories(names, run_vocab, dataset.categories())
    assert [(c.name, c.split) for c in cats] == [("ring", "novel"), ("box", "base"),
                                                 ("ball", "base")]
    got = detect.class_embeddings(teacher, cats, settings)
    rows = _text_stage_rows(tiny)
    assert torch.allclose(got, torch.stack([rows["ring"], rows["box"], rows["ball"]]),
                          atol=1e-6)

    # a free-text name: the same prompt ensemble, computed prompt by prompt
    free = detect.class_categories(["a yellow thing"], run_vocab, dataset.categories())
    assert free[0].split == "novel" and free[0].synonyms == ()
    want = reference(teacher, ["a yellow thing"], prompt_templates("simple"))
    assert torch.allclose(detect.class_embeddings(teacher, free, settings)[0], want,
                          atol=1e-5)

    # more classes than the teacher's context holds tokens, and a name longer than it: each
    # class is embedded on its own, so the list's length changes no row
    context = TINY_CONFIG["text_cfg"]["context_length"]
    many = [f"thing number {i}" for i in range(3 * context)] + ["box", "very " * 40 + "long"]
    big = detect.class_embeddings(
        teacher, detect.class_categories(many, run_vocab, dataset.categories()), settings)
    assert big.shape == (len(many), tiny.dim)
    assert torch.allclose(big[-2], rows["box"], atol=1e-6)
    assert torch.allclose(big.norm(dim=1), torch.ones(len(many)), atol=1e-5)


def test_parse_classes(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("# my classes\nred  star\n\nGreen heart\nbox\n")
    assert detect.parse_classes("box, ball ,,", str(f)) == ["box", "ball", "red star",
                                                            "Green heart"]
    with pytest.raises(detect.DetectError, match="no class names"):
        detect.parse_classes(" , ", None)
    with pytest.raises(detect.DetectError, match="cannot read"):
        detect.parse_classes(None, str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("case", ["empty classes", "missing run", "undecodable image"])
def test_errors_are_one_line_with_status_2(tiny_run, tmp_path, case):
    tiny, _, _, run, val = tiny_run
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a JPEG")
    image, classes = str(val[0]), "box,ring"
    if case == "empty classes":
        classes, expect = " , ", "no class names"
    elif case == "missing run":
        run, expect = tmp_path / "no-such-run", "no checkpoint"
    else:
        image, expect = str(bad), "bad.jpg"
    proc = subprocess.run(
        [sys.executable, "-m", "ovdistill.trainer.detect",
         *_cli(tiny, run, tmp_path / "det.png", "--image", image, "--classes", classes)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], proc.stderr
    assert not (tmp_path / "det.png").exists()


def test_a_cache_with_another_teacher_is_refused(tiny_run, tmp_path, capsys):
    tiny, _, _, run, val = tiny_run
    manifest = tiny.dataset_dir / "teacher" / "_MANIFEST.json"
    original = manifest.read_bytes()
    try:
        write_teacher_manifest(tiny.dataset_dir, make_teacher_files(tmp_path, seed=1))
        rc = detect.main(_cli(tiny, run, tmp_path / "d.png", "--image", str(val[0]),
                              "--classes", "box"))
    finally:
        manifest.write_bytes(original)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "was trained with teacher" in err[0]


# ----------------------------------------------------------------------------- pictures


def test_pr_curve_by_hand():
    # T=2 IoUs, R=5 recall thresholds, K=3 categories; the third has no ground truth
    p = -np.ones((2, 5, 3))
    p[0, :, 0] = [1.0, 1.0, 0.5, 0.5, 0.0]
    p[0, :, 1] = [1.0, 0.5, 0.5, 0.0, 0.0]
    p[1, :, :2] = 0.1  # another IoU: never read
    curve = pictures.pr_curve(p, [0, 1])
    assert curve.tolist() == [[0.0, 1.0], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1.0, 0.0]]
    assert pictures.pr_curve(p, [0, 2]).tolist() == [[0.0, 1.0], [0.25, 1.0], [0.5, 0.5],
                                                     [0.75, 0.5], [1.0, 0.0]]
    assert pictures.pr_curve(p, [2]) is None and pictures.pr_curve(p, []) is None
    # its mean is the subset's AP50 as evaluate reports it
    summary = precision_summary(p, [1, 2, 3], {1: "a", 2: "b", 3: "c"}, {1, 2}, {3})
    assert curve[:, 1].mean() == pytest.approx(summary["AP50_base"])
    assert summary["AP50_novel"] is None


def test_plot_area_by_hand():
    area = pictures.PlotArea(left=60, top=36, right=540, bottom=360)
    assert area.xy(0, 0) == (60, 360)
    assert area.xy(1, 1) == (540, 36)
    assert area.xy(0.5, 0.25) == (300, 279)


def _near(im: Image.Image, xy, colour, r: int = 1) -> bool:
    x, y = round(xy[0]), round(xy[1])
    return any(im.getpixel((x + dx, y + dy)) == colour
               for dx in range(-r, r + 1) for dy in range(-r, r + 1))


def test_eval_pictures_draw_the_precision_array(tiny_run, tmp_path):
    _, dataset, _, _, _ = tiny_run
    recall = np.linspace(0, 1, 101)
    precision = -np.ones((10, 101, 4))  # categories 1, 2, 3 base, 4 novel
    precision[0, :, 0] = 1 - recall
    precision[0, :, 1] = 0.9
    precision[0, :, 3] = 0.2  # category 3: no ground truth
    gt = dataset.split("val").annotations
    names = {1: "box", 2: "ball", 3: "bar", 4: "ring"}
    sheet, pr = pictures.eval_pictures(
        tmp_path, "val", "_x", gt, dataset.split("val").images, [], names, {1, 2, 3},
        precision, [1, 2, 3, 4], {"AP50_base": 0.7, "AP50_novel": 0.2}, "hand")
    assert (sheet.name, pr.name) == ("val_detections_x.png", "val_pr_x.png")
    im = Image.open(pr).convert("RGB")
    assert im.size == pictures.PR_SIZE
    assert pictures.PR_AREA == pictures.PlotArea(60, 36, 540, 360)

    def xy(recall, precision):  # by hand: axes 60..540 px wide, 360 (p=0) up to 36 (p=1)
        return 60 + 480 * recall, 360 - 324 * precision

    for r in (0.1, 0.3, 0.5, 0.7, 0.9):
        base = 0.95 - r / 2  # the mean of 1 - r and 0.9; category 3 has no entry
        assert _near(im, xy(r, base), pictures.BASE_COLOUR), r
        assert _near(im, xy(r, 0.2), pictures.NOVEL_COLOUR), r
        assert not _near(im, xy(r, (base + 0.2) / 2), pictures.BASE_COLOUR, r=3)
        assert not _near(im, xy(r, (base + 0.2) / 2), pictures.NOVEL_COLOUR, r=3)


def test_make_eval_pictures_and_unchanged_outputs(tiny_run, capsys):
    tiny, _, _, run, _ = tiny_run
    args = ["--manifest", str(tiny.manifest), "--cache", str(tiny.cache), "--run", str(run),
            "--device", "cpu", "--ensemble"]
    assert evaluate_main(args) == 0
    plain = json.loads((run / "eval_ensemble.json").read_text())
    dets = (run / "detections_val_ensemble.json").read_text()
    assert not list(run.glob("*.png"))
    assert evaluate_main(args + ["--pictures"]) == 0
    assert "pictures: " in capsys.readouterr().out
    again = json.loads((run / "eval_ensemble.json").read_text())
    plain.pop("seconds"), again.pop("seconds")
    assert again == plain and (run / "detections_val_ensemble.json").read_text() == dets

    # the contact sheet: the fixture's 6 val images (< 8), GT | predictions = 12 panels of
    # 256 x (256 + title), 4 a row, under a one-line header
    sheet = Image.open(run / "val_detections_ensemble.png").convert("RGB")
    pad, side = pictures.GRID_PADDING, 256
    assert sheet.size == (4 * side + 5 * pad,
                          26 + 3 * (side + pictures.TITLE_HEIGHT) + 4 * pad)
    val = json.loads((tiny.dataset_dir / "dataset" / "val.json").read_text())
    colours = {c for _, c in sheet.getcolors(sheet.width * sheet.height)}
    assert pictures.BASE_COLOUR in colours  # every fixture image holds objects
    if any(a["category_id"] == 4 for a in val["annotations"]):  # a ring: novel
        assert pictures.NOVEL_COLOUR in colours

    # the PR plot: its curves are the evaluator's precision array, their means its AP50s
    pr = Image.open(run / "val_pr_ensemble.png")
    assert pr.size == pictures.PR_SIZE
    arrays: dict = {}
    metrics = coco_metrics(tiny.dataset_dir / "dataset" / "val.json", json.loads(dets),
                           {1, 2, 3}, {4}, arrays=arrays)
    assert arrays["cat_ids"] == [1, 2, 3, 4] and arrays["precision"].shape == (10, 101, 4)
    base = pictures.pr_curve(arrays["precision"], [0, 1, 2])
    assert base[:, 1].mean() == pytest.approx(metrics["AP50_base"])
    assert metrics["AP50_base"] == pytest.approx(again["AP50_base"])


def test_text_settings_without_a_text_stage_manifest(tmp_path):
    """A cache whose texts were not made by the text stage: the dataset manifest's `stages:
    text:` block over the stage's defaults."""
    tiny = write_tiny_cache(tmp_path, n_train=2, n_val=1, n_shards=1)
    dataset = load_manifest(tiny.manifest, cache_root=tiny.cache)
    ctx = StageContext(dataset=dataset, cache=tiny.dataset_dir, device="cpu")
    assert detect.text_settings(ctx) == detect.TextSettings("openai", True)
    tiny.manifest.write_text(tiny.manifest.read_text()
                             + "stages:\n  text: {templates: simple, use_synonyms: false}\n")
    dataset = load_manifest(tiny.manifest, cache_root=tiny.cache)
    ctx = StageContext(dataset=dataset, cache=tiny.dataset_dir, device="cpu")
    assert detect.text_settings(ctx) == detect.TextSettings("simple", False)
