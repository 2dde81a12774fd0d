"""The committed teacher release file: the float16 export, `release-teacher`'s byte-for-byte
comparison, and the embedded default's committed teacher itself (what `make stages` loads).
The micro CLIP fixture `micro` is conftest.py's."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ovdistill.pipeline import clip_teacher as T
from ovdistill.pipeline.cache import atomic_write_json, sha256_file
from ovdistill.stages import synthetic
from ovdistill.stages import teacher as TS

from ovdistill import cli
from tests.test_teacher import MANIFEST  # the micro dataset's manifest

REPO = Path(__file__).resolve().parents[1]


def test_release_state_halves_floats_and_keeps_the_rest():
    state = {"w": torch.tensor([1.0, 1 / 3, -65504.0, float("inf")]), "n": torch.tensor(7),
             "d": torch.tensor([0.1], dtype=torch.float64)}
    out = TS.release_state(state)
    assert out["w"].dtype == torch.float16 and out["d"].dtype == torch.float16
    # float16's rounding; an infinity stays one
    assert out["w"].tolist() == [1.0, 0.333251953125, -65504.0, float("inf")]
    assert out["d"].tolist() == [0.0999755859375]
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 7
    with pytest.raises(T.TeacherError, match=r"^teacher tensor w: \|value\| 70000 does not "
                                             r"fit float16"):
        TS.release_state({"n": torch.tensor(1), "w": torch.tensor([1.0, -70000.0])})


def test_write_release_is_byte_for_byte_repeatable_and_loads(micro, tmp_path):
    config, weights = micro
    a, b = tmp_path / "a" / "t.pt", tmp_path / "b" / "t.pt"
    sha = TS.write_release(weights, a)
    assert sha == sha256_file(a) == TS.write_release(weights, b)
    assert a.stat().st_size < 0.55 * weights.stat().st_size  # half the bytes, plus headers
    assert not [p for p in a.parent.iterdir() if p.name.startswith(".")]  # no temporaries
    fp32 = T.load_teacher(T.TeacherSpec("micro-clip", str(weights), str(config)))
    fp16 = T.load_teacher(T.TeacherSpec("micro-clip", str(a), str(config)))
    assert fp16.identity["sha256"] == sha
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    e32, e16 = fp32.encode_images(images), fp16.encode_images(images)
    cos = torch.nn.functional.cosine_similarity(e32.float(), e16.float())
    assert cos.min() > 0.999
    assert not torch.equal(e32, e16)  # the float16 weights are really what was loaded
    # an input-dependent model: the six images' embeddings differ from each other
    assert torch.nn.functional.cosine_similarity(e32[:1], e32[1:]).max() < 0.999


def test_release_difference_names_what_differs(micro, tmp_path):
    _, weights = micro
    a = tmp_path / "a.pt"
    TS.write_release(weights, a)
    renamed = tmp_path / "renamed.pt"
    TS.write_release(weights, renamed)
    assert sha256_file(renamed) != sha256_file(a)  # the archive inside carries the file's name
    assert TS.release_difference(a, renamed) == (
        "equal tensors; the bytes differ (torch.save records the file's name in its archive: "
        "give --out the committed file's name)")
    state = torch.load(a, weights_only=True)
    key = sorted(state)[3]
    state[key] = state[key] + 0.25
    b = tmp_path / "b.pt"
    torch.save(state, b)
    line = TS.release_difference(a, b)
    assert line.startswith(f"1 of {len(state)} tensors differ, largest |difference| 0.25 ")
    assert line.endswith(f"({key})")
    del state[key]
    torch.save(state, b)
    assert TS.release_difference(a, b) == f"keys differ: [{key!r}]"


def _teacher_cache(tmp_path: Path, micro, trained: bool) -> tuple[Path, Path]:
    """A manifest and a cache whose teacher stage finished with the micro weights."""
    config, weights = micro
    manifest = tmp_path / "micro.yaml"
    manifest.write_text(MANIFEST.format(root=tmp_path / "data"))
    stage = tmp_path / "cache" / "micro" / "teacher"
    stage.mkdir(parents=True)
    copy = stage / "micro-clip.pt"
    copy.write_bytes(weights.read_bytes())
    doc = {"teacher": {"model": "micro-clip", "pretrained": str(copy),
                       "model_config": str(config), "sha256": sha256_file(copy)},
           "zero_shot": {"base_acc": 0.5, "novel_acc": 0.25}}
    if trained:
        doc["train"] = {"seconds": 1.0}
    atomic_write_json(stage / "_MANIFEST.json", doc)
    return manifest, tmp_path / "cache"


def test_release_teacher_command_compares_byte_for_byte(micro, tmp_path, capsys):
    manifest, cache = _teacher_cache(tmp_path, micro, trained=True)
    out = tmp_path / "out" / "teacher.pt"
    argv = ["release-teacher", "--manifest", str(manifest), "--cache", str(cache),
            "--out", str(out)]
    assert cli.main(argv) == 0
    sha = sha256_file(out)
    first = capsys.readouterr().out
    assert f"{out}: sha256 {sha}" in first and "zero-shot base 0.5 / novel 0.25" in first

    committed = tmp_path / "committed.pt"
    committed.write_bytes(out.read_bytes())
    assert cli.main(argv + ["--compare", str(committed)]) == 0
    assert f"identical to {committed} (sha256 {sha[:12]}...)" in capsys.readouterr().out

    state = torch.load(committed, weights_only=True)
    key = min(k for k in state if state[k].is_floating_point())
    state[key] = state[key] * 2 + 1
    torch.save(state, committed)
    assert cli.main(argv + ["--compare", str(committed)]) == 1
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith(f"[release-teacher] differs from {committed}: sha256 {sha[:12]}")
    assert f"1 of {len(state)} tensors differ" in line and line.endswith(f"({key})")

    assert cli.main(argv + ["--compare", str(tmp_path / "nope.pt")]) == 2
    assert "--compare" in capsys.readouterr().err


def test_release_teacher_refuses_a_teacher_the_stage_did_not_train(micro, tmp_path, capsys):
    manifest, cache = _teacher_cache(tmp_path, micro, trained=False)
    rc = cli.main(["release-teacher", "--manifest", str(manifest), "--cache", str(cache),
                   "--out", str(tmp_path / "t.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "not trained by the stage" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t.pt").exists()


# ----------------------------------------------------------------------------- the committed file


def _committed() -> Path:
    doc = yaml.safe_load((REPO / "data_manifests" / "toy.yaml").read_text())
    return REPO / doc["stages"]["teacher"]["pretrained"]


def test_the_toy_manifest_names_a_committed_release_file_under_20_mb():
    path = _committed()
    assert path.is_file() and path.stat().st_size <= 20 * 10**6
    state = torch.load(path, weights_only=True)
    floats = [v for v in state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert TS.release_state(state).keys() == state.keys()


def test_the_committed_teacher_names_rendered_shapes():
    """The committed teacher tells the toy's 24 categories apart on freshly drawn objects
    (single shapes on the generator's textured backgrounds, cropped at their boxes), prompt-
    ensembled as the stages use it: far above chance (1/24), near its val zero-shot report."""
    doc = yaml.safe_load((REPO / "data_manifests" / "toy.yaml").read_text())
    names = doc["vocabulary"]["base"] + doc["vocabulary"]["novel"]
    teacher = T.load_teacher(T.TeacherSpec(T.DEFAULT_MODEL, str(_committed())))
    text = T.text_embeddings(teacher, names, T.prompt_templates("simple"))
    rng = np.random.default_rng(0)
    crops, labels = [], []
    for label, name in enumerate(names):
        for _ in range(4):
            scene = synthetic.draw_scene(rng, 112, 112, [name], (40, 64), 1)
            box = scene.objects[0].box
            crops.append(teacher.preprocess(scene.image.crop(tuple(round(v) for v in box))))
            labels.append(label)
    pred = TS.classify(teacher.encode_images(torch.stack(crops)), text)
    accuracy = float((pred == torch.tensor(labels)).float().mean())
    assert accuracy >= 0.75, accuracy


def test_stage_overrides_record_a_relative_file_absolute(tmp_path, monkeypatch):
    """The manifest names the committed teacher relative to the working directory; Ray
    workers may run elsewhere, so the stage config records it absolute. A missing file and a
    path that is not a FILE_FIELDS key (captions: relative to the dataset root) stay as given."""
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "t.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)

    Dataset = SimpleNamespace(stages={
        "teacher": {"pretrained": "w/t.pt", "captions": "w/t.pt", "epochs": 3},
        "rpn": {"checkpoint": "w/missing.pt"}})

    got = cli.stage_overrides(Dataset, {"teacher": {"epochs": 4}}, "teacher")
    assert got == {"pretrained": str(tmp_path / "w" / "t.pt"), "captions": "w/t.pt",
                   "epochs": 4}
    assert cli.stage_overrides(Dataset, {}, "rpn") == {"checkpoint": "w/missing.pt"}
    over = {"rpn": {"backbone_checkpoint": "w/t.pt"}}
    assert cli.stage_overrides(Dataset, over, "rpn") == {
        "checkpoint": "w/missing.pt", "backbone_checkpoint": str(tmp_path / "w" / "t.pt")}
    assert cli.stage_overrides(Dataset, {}, "text") == {}
