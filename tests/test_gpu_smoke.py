"""bench/gpu_smoke.sh's pieces that run without a GPU or minutes: the script parses, its tiny
manifest is a valid one with every stage config known, and the summary reads the benches'
own table formats (so a change there shows here, not on the lent GPU)."""
from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from ovdistill.bench import gpu_smoke, gpu_wheels
from ovdistill.pipeline.manifests import load_manifest
from ovdistill.pipeline.runner import make_config
from ovdistill.stages.synthetic import SyntheticSpec
from ovdistill.trainer.config import make_config as train_config

from ovdistill import cli

REPO = Path(__file__).resolve().parents[1]

REGIONS_LOG = """\
model=ViT-B-32 (S=224, D=512) device=cuda images=32 of 640x480, M=300, batch=1024, torch threads=16
path                                           crops   seconds    crops/s     cpu s
end-to-end (decode+crops+encode+write)         19200     0.700    27428.6     1.100
bare teacher forward (crops already made)      19200     0.600    32000.0     0.610
  ratio end-to-end / bare: wall 0.857, cpu 0.555  (target >= 0.80)
crops: per-crop PIL crop + preprocess           2400     1.200     2000.0     1.190
crops: batched (a few ops per image)            2400     0.100    24000.0     0.090
  crop speed-up batched / PIL: wall 12.0x, cpu 13.2x
"""

TRAIN_LOG = """\
train step: streaming vs in-memory, 16 steps each, batch 4, mode vild, 4 loader worker(s), \
device cuda (NVIDIA H200)
source     s/step  steps/s  images/s  data wait
stream      0.050    20.00      80.0       2.0%
memory      0.048    20.83      83.3       0.0%
ratio (in-memory time / streaming time): 0.960  (meets the 0.90 target)
"""


def test_the_script_parses_and_documents_its_cpu_mode():
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_smoke.sh")], check=True)
    text = (REPO / "bench" / "gpu_smoke.sh").read_text()
    assert "--cpu" in text and "DEVICE=cpu" in text and "--distributor local" in text
    assert "--no-index" in text  # installs the carried wheels offline


def test_the_setup_step_sees_every_variable_it_reads():
    """setup runs as `bash -c setup` (a new shell): each script variable its body reads must
    be exported (the rename once left $REPO unexported, and setup read /bench/gpu_wheels.py)."""
    import re

    text = (REPO / "bench" / "gpu_smoke.sh").read_text()
    body = text[text.index("\nsetup() {"):text.index("\n}\n", text.index("\nsetup() {"))]
    local = set(re.findall(r"local (\w+)", body)) | set(re.findall(r"(?m)^\s*(\w+)=", body))
    read = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", body)) - local - {"PYTHONPATH"}
    exported = set()
    for line in re.findall(r"(?m)^export (?!-f)(.+)$", text):
        exported |= {w.split("=")[0] for w in line.split()}
    optional = {"FORCE_WHEELS"}  # read as ${FORCE_WHEELS:-}: the caller's environment
    assert read - optional and read - optional <= exported, sorted(read - optional - exported)


def test_tiny_manifest_is_valid_and_every_stage_key_is_known(tmp_path):
    toy = yaml.safe_load((REPO / "data_manifests" / "toy.yaml").read_text())
    doc = gpu_smoke.tiny_manifest(toy)
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(doc))
    ds = load_manifest(path, cache_root=tmp_path)
    assert ds.name == "smoke" and SyntheticSpec.from_dict(ds.synthetic).n_train == 24
    stages = {cli.stage_name(m) for m in cli.STAGES}
    for name, overrides in doc["stages"].items():
        assert name in stages
        make_config(importlib.import_module(f"ovdistill.stages.{name}"), overrides)  # unknown keys raise
    train_config(dict(ds.trainer))


def test_summary_reads_the_benches_tables():
    reg = gpu_smoke.parse_regions_bench(REGIONS_LOG)
    assert (reg["model"], reg["m"], reg["batch"], reg["threads"]) == ("ViT-B-32", 300, 1024, 16)
    assert reg["e2e"]["crops_per_s"] == 27428.6 and reg["bare"]["crops"] == 19200
    assert reg["ratio_wall"] == 0.857 and reg["batched"]["crops_per_s"] == 24000.0
    tb = gpu_smoke.parse_train_bench(TRAIN_LOG)
    assert (tb["steps"], tb["batch"], tb["mode"], tb["workers"]) == (16, 4, "vild", 4)
    assert tb["stream"]["steps_per_s"] == 20.0 and tb["memory"]["images_per_s"] == 83.3
    assert tb["ratio"] == 0.96


def test_summary_block_from_a_work_folder(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    (work / "logs").mkdir(parents=True)
    results.mkdir()
    (work / "logs" / "regions_bench.log").write_text(REGIONS_LOG)
    (work / "logs" / "train_bench.log").write_text(TRAIN_LOG)
    (work / "steps.tsv").write_text("setup\tok\t9.0\nregions_bench\tok\t40.2\n"
                                    "pipeline\ttimeout\t330.0\n")
    (work / "machine.txt").write_text("some CPU, 16 cores, NVIDIA H200, torch 2.11.0\n")
    assert gpu_smoke.main(["summary", "--work", str(work), "--results", str(results),
                           "--mode", "gpu", "--quiet"]) == 0
    text = (results / "summary.txt").read_text()
    assert "machine: some CPU, 16 cores, NVIDIA H200" in text
    assert "end-to-end 27,429 crops/s, bare forward 32,000 crops/s, end-to-end / bare 0.857" \
        in text
    assert "in-memory / streaming time 0.960" in text
    assert text.strip().endswith("result: NOT every step ok: pipeline")
    figures = json.loads((results / "summary.json").read_text())
    assert figures["regions_bench"]["e2e"]["crops_per_s"] == 27428.6


def test_eval_agreement_compares_one_checkpoint(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = {"checkpoint": str(tmp_path / "latest.pt"), "step": 200, "n_images": 100}
    a.write_text(json.dumps({**common, "AP50_novel": 0.25, "AP50_base": 0.5,
                             "AP50_all": 0.4, "n_detections": 900}))
    b.write_text(json.dumps({**common, "AP50_novel": 0.24, "AP50_base": 0.5,
                             "AP50_all": 0.39, "n_detections": 901}))
    out = gpu_smoke.eval_agreement(a, b)
    assert round(out["abs_diff"]["AP50_novel"], 6) == 0.01 and out["abs_diff"]["AP50_base"] == 0
    b.write_text(json.dumps({**common, "step": 100}))
    with pytest.raises(gpu_smoke.SmokeError, match="different checkpoints"):
        gpu_smoke.eval_agreement(a, b)


def test_gpu_wheels_pins_and_sizes(tmp_path):
    pins = gpu_wheels.pins()
    assert [p.split("==")[0] for p in pins] == [d for d, _ in gpu_wheels.WHEELS]
    assert "ray" not in " ".join(pins)  # too large to travel: the script uses --distributor local
    (tmp_path / "a-1-py3-none-any.whl").write_bytes(b"x" * 2048)
    (tmp_path / "b-1-py3-none-any.whl").write_bytes(b"x" * 1024)
    files, total = gpu_wheels.sizes(tmp_path)
    assert files == [("a-1-py3-none-any.whl", 2048), ("b-1-py3-none-any.whl", 1024)]
    assert total == 3072
