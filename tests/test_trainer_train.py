"""The training CLI end to end on the tiny fixture cache: resume, 2-process DDP on CPU (gloo),
and evaluation (plain and ViLD-ensemble)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.wds_fixture import BASE, TINY_SETTINGS, write_tiny_cache
from trainer.diagnose import main as diagnose_main
from trainer.evaluate import main as evaluate_main
from trainer.train import main as train_main
from trainer.train import warmup_cosine

ROOT = Path(__file__).resolve().parents[1]
SETS = [arg for k, v in TINY_SETTINGS.items() for arg in ("--set", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_cache(tmp_path_factory.mktemp("tiny"))


def _train(tiny, out, *extra):
    return train_main(["--manifest", str(tiny.manifest), "--cache", str(tiny.cache),
                       "--out", str(out), "--device", "cpu", *SETS, *extra])


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_continues_with_same_steps_and_lr(tiny, tmp_path, capsys):
    assert _train(tiny, tmp_path / "cut", "--steps", "4", "--stop-at", "2") == 0
    assert torch.load(tmp_path / "cut" / "latest.pt", weights_only=True)["step"] == 2
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # logged, then killed
        f.write(json.dumps({"step": 3, "lr": 0.0}) + "\n")
    assert _train(tiny, tmp_path / "cut", "--resume", "latest") == 0

    # the LR an uninterrupted run has at each step: warmup 2 steps, cosine to 0 at step 4
    cut = _metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    assert [r["lr"] for r in cut] == pytest.approx([2e-4 * warmup_cosine(i, 2, 4)
                                                    for i in range(4)])
    ckpt = torch.load(tmp_path / "cut" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["scheduler"]["last_epoch"] == 4
    assert float(ckpt["optimizer"]["state"][0]["step"]) == 4  # AdamW moments carried over
    assert not list((tmp_path / "cut").glob(".latest.pt.tmp-*"))

    capsys.readouterr()
    rc = _train(tiny, tmp_path / "cut", "--resume", "latest", "--mode", "text")
    assert rc == 2
    assert "resuming a run trained with mode='vild'" in capsys.readouterr().err

    # a shared-head run cannot be ensembled: one clear line
    rc = evaluate_main(["--manifest", str(tiny.manifest), "--cache", str(tiny.cache),
                        "--run", str(tmp_path / "cut"), "--ensemble", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--heads separate" in err[0]


@pytest.mark.slow
def test_separate_heads_train_and_evaluate_with_ensemble(tiny, tmp_path, capsys):
    run = tmp_path / "ens"
    # score_thresh 0: two steps do not make confident detections, and every file below
    # should hold some to check
    assert _train(tiny, run, "--steps", "2", "--heads", "separate",
                  "--set", "score_thresh=0.0") == 0
    args = ["--manifest", str(tiny.manifest), "--cache", str(tiny.cache), "--run", str(run),
            "--device", "cpu"]
    assert evaluate_main(args) == 0
    assert evaluate_main(args + ["--ensemble"]) == 0
    out = capsys.readouterr().out
    assert "AP50_novel" in out and "\nensemble " in out
    plain = json.loads((run / "eval.json").read_text())
    ens = json.loads((run / "eval_ensemble.json").read_text())
    assert plain["mode"] == "vild" and ens["mode"] == "ensemble"
    assert plain["n_images"] == ens["n_images"] == tiny.n_val
    for k in ("AP50_all", "AP50_base", "AP_all"):
        assert 0.0 <= ens[k] <= 1.0
    dets = json.loads((run / "detections_val_ensemble.json").read_text())
    assert all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in dets)

    # base-only vocabulary: only base classes are detected and scored
    assert evaluate_main(args + ["--vocabulary", "base"]) == 0
    base = json.loads((run / "eval_base_vocab.json").read_text())
    assert base["vocabulary"] == "base" and base["AP50_novel"] is None
    assert list(base["AP50_per_class"]) == list(BASE)
    dets = json.loads((run / "detections_val_base_vocab.json").read_text())
    assert dets and {d["category_id"] for d in dets} <= {1, 2, 3}  # the fixture's base ids

    # diagnose: the teacher's accuracy on cached boxes overlapping train GT, counted here
    # straight from the tar files (the fixture gives jittered GT boxes their class's text)
    train_json = tiny.dataset_dir / "dataset" / "train.json"
    assert diagnose_main(args[:-2] + ["--gt", str(train_json)]) == 0
    report = json.loads((run / "diagnose.json").read_text())
    n, right = _teacher_right_on_gt_overlaps(tiny, train_json)
    assert report["base"]["n"] == n > 0 and report["novel"] == {"n": 0}
    assert report["base"]["teacher_acc"] == pytest.approx(right / n, abs=1e-4)
    assert report["n_images"] == tiny.n_train
    assert -1.0 <= report["base"]["cos"] <= 1.0


def _teacher_right_on_gt_overlaps(tiny, train_json) -> tuple[int, int]:
    import io
    import tarfile

    import numpy as np
    import pyarrow.parquet as pq

    text = pq.read_table(tiny.dataset_dir / "text" / "tiny.parquet").to_pydict()
    text_emb, cat_ids = np.asarray(text["embedding"]), text["category_id"]
    gt = {}
    for a in json.loads(train_json.read_text())["annotations"]:
        x, y, w, h = a["bbox"]
        gt.setdefault(a["image_id"], []).append(((x, y, x + w, y + h), a["category_id"]))
    n = right = 0
    for shard in tiny.shards:
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in files.items():
            if not name.endswith(".json"):
                continue
            key = name[: -len(".json")]
            image_id = json.loads(data)["image_id"]
            boxes = np.load(io.BytesIO(files[key + ".boxes.npy"]))
            emb = np.load(io.BytesIO(files[key + ".emb.npy"])).astype(np.float32)
            for box, e in zip(boxes, emb):
                ious = []
                for g, c in gt.get(image_id, []):
                    iw = max(0.0, min(box[2], g[2]) - max(box[0], g[0]))
                    ih = max(0.0, min(box[3], g[3]) - max(box[1], g[1]))
                    inter = iw * ih
                    union = ((box[2] - box[0]) * (box[3] - box[1])
                             + (g[2] - g[0]) * (g[3] - g[1]) - inter)
                    ious.append((inter / union, c))
                if not ious or max(ious)[0] < 0.5:
                    continue
                n += 1
                right += cat_ids[int(np.argmax(text_emb @ e))] == max(ious)[1]
    return n, right


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tiny, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "trainer.train", "--manifest", str(tiny.manifest), "--cache",
           str(tiny.cache), "--out", str(out), "--device", "cpu", "--steps", "3", *SETS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 x cpu" in proc.stdout
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # 2 processes x batch 2 images per step
    assert all(r["images_per_sec"] > 0 and torch.isfinite(torch.tensor(r["loss"]))
               for r in rows)


def test_a_run_with_remedies_evaluates_with_them(tiny, tmp_path):
    """The evaluation model holds what the run trained with: the centred texts and the
    negative prompts as background aliases (without them, regions trained to sit on a
    negative would be scored as the class nearest it)."""
    from pipeline.manifests import load_manifest
    from trainer.evaluate import load_run
    from trainer.inputs import load_negatives

    run = tmp_path / "remedies"
    assert _train(tiny, run, "--steps", "1", "--set", "negative_prompts=true",
                  "--set", "center_targets=true") == 0
    dataset = load_manifest(tiny.manifest, cache_root=tiny.cache)
    cache_dir = Path(tiny.cache) / dataset.name
    model, _, vocab = load_run(run / "latest.pt", dataset, cache_dir, torch.device("cpu"))
    negatives = load_negatives(cache_dir, vocab.dim)
    assert model.neg_emb.shape == negatives.shape and model.region_mean.numel() == vocab.dim
    # the texts are centred: not the raw normalised text embeddings any more
    raw = torch.nn.functional.normalize(vocab.embeddings.float(), dim=-1)
    assert not torch.allclose(model.text_emb, raw, atol=1e-3)
