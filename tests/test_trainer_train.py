"""The training CLI end to end on the tiny fixture cache: resume, 2-process DDP on CPU (gloo),
and evaluation (plain and ViLD-ensemble)."""
import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import ovdistill.trainer.train  # noqa: F401 - binds ovdistill.trainer.train
import pytest
import torch
from ovdistill.bench.wds_fixture import BASE, TINY_SETTINGS, write_tiny_cache
from ovdistill.pipeline.manifests import load_manifest
from ovdistill.trainer.diagnose import main as diagnose_main
from ovdistill.trainer.evaluate import coco_metrics, load_run
from ovdistill.trainer.evaluate import main as evaluate_main
from ovdistill.trainer.train import main as train_main
from ovdistill.trainer.train import warmup_cosine

from ovdistill import trainer

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


def _replayable_stream(monkeypatch):
    """Makes the training stream one fixed list of batches, entered at the step the trainer
    seeds it with (seed + step), so a resumed run gets the batches an uninterrupted one would
    (the real stream is reseeded on resume, not replayed)."""
    real, batches = trainer.train.train_loader, []

    def loader(urls, cfg, embed_dim, labels, seed, **kwargs):
        if not batches:
            rng = torch.get_rng_state()  # drawing them must not move the trainer's RNG
            stream = iter(real(urls, cfg, embed_dim, labels, seed=cfg.seed))
            batches.extend(next(stream) for _ in range(cfg.steps))
            torch.set_rng_state(rng)
        return (copy.deepcopy(b) for b in batches[seed - cfg.seed:])

    monkeypatch.setattr(trainer.train, "train_loader", loader)


@pytest.mark.slow
def test_resume_continues_with_same_steps_and_lr(tiny, tmp_path, capsys, monkeypatch):
    """A run cut at step 1 and resumed ends where an uninterrupted run does: the same LR and
    loss at each step and bit-identical weights (given the same batches)."""
    _replayable_stream(monkeypatch)
    frozen = ("--set", "trainable_backbone_layers=0")  # fewer weights to train: faster
    assert _train(tiny, tmp_path / "full", "--steps", "3", *frozen) == 0
    assert _train(tiny, tmp_path / "cut", "--steps", "3", "--stop-at", "1", *frozen) == 0
    assert torch.load(tmp_path / "cut" / "latest.pt", weights_only=True)["step"] == 1
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # logged, then killed
        f.write(json.dumps({"step": 2, "lr": 0.0}) + "\n")
    assert _train(tiny, tmp_path / "cut", "--resume", "latest") == 0

    # the LR an uninterrupted run has at each step: warmup 2 steps, then cosine to step 3
    cut, full = _metrics(tmp_path / "cut"), _metrics(tmp_path / "full")
    assert [r["step"] for r in cut] == [1, 2, 3]
    assert [r["lr"] for r in cut] == pytest.approx([2e-4 * warmup_cosine(i, 2, 3)
                                                    for i in range(3)])
    assert [r["loss"] for r in cut] == [r["loss"] for r in full]
    ckpt = torch.load(tmp_path / "cut" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["scheduler"]["last_epoch"] == 3
    assert float(ckpt["optimizer"]["state"][0]["step"]) == 3  # AdamW moments carried over
    assert not list((tmp_path / "cut").glob(".latest.pt.tmp-*"))
    want = torch.load(tmp_path / "full" / "latest.pt", weights_only=True)["model"]
    assert ckpt["model"].keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(ckpt["model"][k], v), f"{k} differs from the uninterrupted run's"

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
    dets = json.loads((run / "detections_val_ensemble.json").read_text())
    assert all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in dets)
    # the ensemble ranks its own detections, not the text head's (after 2 steps every score
    # rounds to 0 at the 5 decimals written, but it keeps and orders other boxes), and what
    # it reports is the COCO evaluation of them
    plain_dets = json.loads((run / "detections_val.json").read_text())
    assert len(dets) == len(plain_dets) and dets != plain_dets
    want = coco_metrics(tiny.dataset_dir / "dataset" / "val.json", dets, {1, 2, 3}, {4})
    assert {k: ens[k] for k in want} == want

    # base-only vocabulary: only base classes are detected and scored
    assert evaluate_main(args + ["--vocabulary", "base"]) == 0
    base = json.loads((run / "eval_base_vocab.json").read_text())
    assert base["vocabulary"] == "base" and base["AP50_novel"] is None
    assert list(base["AP50_per_class"]) == list(BASE)
    dets = json.loads((run / "detections_val_base_vocab.json").read_text())
    assert dets and {d["category_id"] for d in dets} <= {1, 2, 3}  # the fixture's base ids

    # diagnose: the teacher's and the student's (image head) accuracy and their cosine on
    # cached boxes overlapping train GT, computed here straight from the tar files and the
    # run's weights (the fixture gives jittered GT boxes their class's text)
    train_json = tiny.dataset_dir / "dataset" / "train.json"
    assert diagnose_main(args[:-2] + ["--gt", str(train_json)]) == 0
    report = json.loads((run / "diagnose.json").read_text())
    model = load_run(run / "latest.pt", load_manifest(tiny.manifest, cache_root=tiny.cache),
                     tiny.dataset_dir, torch.device("cpu"))[0]
    want = _agreement_on_gt_overlaps(tiny, train_json, model)
    assert report["base"]["n"] == want["n"] > 0 and report["novel"] == {"n": 0}
    for k in ("teacher_acc", "student_acc", "cos"):
        assert report["base"][k] == pytest.approx(want[k], abs=1e-4), k
    assert report["n_images"] == tiny.n_train


def _student_embeddings(model, jpgs: list[bytes], boxes: list) -> list[torch.Tensor]:
    """The run's image-head embeddings Tensor[K_i, D] of each image's `boxes` (x1, y1, x2, y2
    pixels) at its test size, in one batch."""
    import io

    import numpy as np
    from ovdistill.trainer.data import resize_for_test
    from ovdistill.trainer.model import batch_images
    from PIL import Image

    images, scaled = [], []
    for jpg, b in zip(jpgs, boxes):
        pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(jpg)).convert("RGB")))
        x, scale = resize_for_test(pixels.permute(2, 0, 1), model.cfg.test_size,
                                   model.cfg.max_size)
        images.append(x)
        scaled.append(torch.as_tensor(b) * scale)
    batch = batch_images(images)
    with torch.no_grad():
        roi = model.roi_heads.box_roi_pool(model.backbone(batch.tensors), scaled,
                                           batch.image_sizes)
        return list(model.image_tower(roi)[1].split([len(b) for b in boxes]))


def _agreement_on_gt_overlaps(tiny, train_json, model) -> dict:
    """{n, teacher_acc, student_acc, cos} over the cached boxes with IoU >= 0.5 to a GT box,
    from the tar files, the text parquet and the run's image head."""
    import io
    import tarfile

    import numpy as np
    import pyarrow.parquet as pq

    text = pq.read_table(tiny.dataset_dir / "text" / "tiny.parquet").to_pydict()
    text_emb, cat_ids = np.asarray(text["embedding"]), text["category_id"]
    text_emb = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
    gt = {}
    for a in json.loads(train_json.read_text())["annotations"]:
        x, y, w, h = a["bbox"]
        gt.setdefault(a["image_id"], []).append(((x, y, x + w, y + h), a["category_id"]))
    samples = []  # (image id, jpg, boxes, teacher embeddings)
    for shard in tiny.shards:
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in files.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                samples.append((json.loads(data)["image_id"], files[key + ".jpg"],
                                np.load(io.BytesIO(files[key + ".boxes.npy"])),
                                np.load(io.BytesIO(files[key + ".emb.npy"])).astype(np.float32)))
    students = _student_embeddings(model, [s[1] for s in samples], [s[2] for s in samples])
    n = right = student_right = 0
    cos = 0.0
    for (image_id, _, boxes, emb), student in zip(samples, students):
        for box, e, s in zip(boxes, emb, student.numpy()):
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
            student_right += cat_ids[int(np.argmax(text_emb @ s))] == max(ious)[1]
            cos += float(s @ (e / np.linalg.norm(e)))
    return {"n": n, "teacher_acc": right / n, "student_acc": student_right / n,
            "cos": cos / n}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# trainer.train with each rank's losses and final weights saved to $RANK_STATE/rank<R>.pt
RANK_STATE = textwrap.dedent("""
    import os, sys
    import torch
    import ovdistill.trainer.train as T
    step, losses = T.train_step, []
    def recorded(ddp, model, *args, **kwargs):
        out = step(ddp, model, *args, **kwargs)
        losses.append(float(out[1]))
        torch.save({"losses": losses, "model": model.state_dict()},
                   os.path.join(os.environ["RANK_STATE"], f"rank{os.environ['RANK']}.pt"))
        return out
    T.train_step = recorded
    sys.exit(T.main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tiny, tmp_path):
    """Two ranks see different batches yet end with the same weights: DDP averages their
    gradients."""
    out = tmp_path / "ddp"
    script = tmp_path / "rank_state.py"
    script.write_text(RANK_STATE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "RANK_STATE": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(script), "--manifest", str(tiny.manifest), "--cache",
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
    assert all(r["images_per_sec"] > 0 for r in rows)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(a != b for a, b in zip(ranks[0]["losses"], ranks[1]["losses"]))  # own data
    # the logged loss is the mean over ranks
    assert [r["loss"] for r in rows] == pytest.approx(
        [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])], rel=1e-6)
    for k, v in ranks[0]["model"].items():
        assert torch.equal(ranks[1]["model"][k], v), f"{k} differs between the ranks"
        assert torch.equal(ckpt["model"][k], v), k


def test_a_run_with_remedies_evaluates_with_them(tiny, tmp_path):
    """The evaluation model holds what the run trained with: the centred texts and the
    negative prompts as background aliases (without them, regions trained to sit on a
    negative would be scored as the class nearest it)."""
    from ovdistill.pipeline.manifests import load_manifest
    from ovdistill.trainer.evaluate import load_run
    from ovdistill.trainer.inputs import load_negatives

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


def test_processes_beyond_the_gpus_stop_with_one_clear_line():
    from ovdistill.trainer.distributed import DistributedError, process_device

    assert process_device("cpu", 4, 3, 0) == torch.device("cpu")
    assert process_device("cuda", 2, 1, 2) == torch.device("cuda", 1)
    assert process_device("cuda:1", 1, 0, 2) == torch.device("cuda", 1)
    with pytest.raises(DistributedError) as e:
        process_device("cuda", 2, 1, 1)
    assert str(e.value) == ("torchrun started process 1 of 2 on this node, which has 1 GPU(s): "
                            "use --nproc_per_node 1, or --device cpu for gloo on the CPU")
    with pytest.raises(DistributedError, match=r"^--device cuda:0 puts all 2 processes on one"):
        process_device("cuda:0", 2, 0, 2)
    with pytest.raises(DistributedError, match=r"^--device cuda:3: this node has 2 GPU\(s\)$"):
        process_device("cuda:3", 1, 0, 2)


def test_train_cli_reports_too_many_processes_in_one_line(monkeypatch, capsys):
    from ovdistill.trainer import train as T

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    rc = T.main(["--manifest", "data_manifests/toy.yaml", "--cache", "/nonexistent",
                 "--out", "/tmp/unused-run", "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and err == ("error: torchrun started process 1 of 2 on this node, which has "
                               "1 GPU(s): use --nproc_per_node 1, or --device cpu for gloo on "
                               "the CPU\n")
