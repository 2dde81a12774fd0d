"""The ablation driver: the targets' verdicts on planted row results, the summary built from
every finished row on disk, resumable rows, and the calibrated row reusing vild's checkpoint.
No training here: subprocess.run is replaced by a fake that writes what train / evaluate /
oracle would."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from ovdistill.trainer import ablation

MANIFEST = ('name: tiny\nformat: coco\nroot: "{cache}/tiny/dataset"\n'
            "splits:\n  train: {images: train, annotations: train.json}\n"
            "  val: {images: val, annotations: val.json}\n"
            "vocabulary:\n  base: [box, ball]\n  novel: [ring]\n"
            "trainer: {steps: 700}\n")
ZERO_SHOT = {"base_acc": 0.9, "novel_acc": 0.875, "n_crops": 40,
             "per_category": {"box": 0.95, "ball": 0.85, "ring": 0.875}}
# planted AP50 (base, novel) per row
AP = {"text": (0.5, 0.2), "image": (0.1, 0.1), "vild": (0.45, 0.32), "ensemble": (0.5, 0.25),
      "confident": (0.4, 0.1), "contrastive": (0.4, 0.1), "centered": (0.4, 0.1),
      "negatives": (0.4, 0.1), "calibrated": (0.3, 0.33), "ensemble_residual": (0.4, 0.1),
      "ensemble_confident": (0.4, 0.1), "pairs": (0.45, 0.3), "vild+pairs": (0.45, 0.35),
      "ensemble+pairs": (0.45, 0.3), "ensemble+pairs_frozen": (0.45, 0.3),
      "grounding": (0.45, 0.25), "grounding+fusion": (0.45, 0.27),
      "grounding+pseudo": (0.45, 0.3)}
ORACLE = {"AP50_base": 0.3, "AP50_novel": 0.5}


def _row(name, base, novel, image_fit=None):
    return {"name": name, "mode": "vild", "heads": "shared", "options": {},
            "AP50_base": base, "AP50_novel": novel, "AP50_all": (base + novel) / 2,
            "image_fit": image_fit, "train_seconds": 1.0}


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


class FakeTools:
    """Stands in for subprocess.run: records each command and writes its outputs."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, cmd, check):
        self.calls.append(cmd)
        tool = cmd[2].removeprefix("ovdistill.")
        if tool == self.fail_on:
            raise ablation.subprocess.CalledProcessError(3, cmd)
        if tool == "trainer.train":
            run = Path(_flag(cmd, "--out"))
            run.mkdir(parents=True, exist_ok=True)
            (run / "config.json").write_text(json.dumps(
                {"config": {"mode": _flag(cmd, "--mode"), "seed": 0,
                            "steps": int(next((c for c in cmd if c.startswith("--steps=")),
                                              "--steps=700")[8:])}}))
            (run / "metrics.jsonl").write_text(json.dumps(
                {"step": 700, "loss_image": 3.0, "image_mean_baseline": 4.0}) + "\n")
            (run / "latest.pt").write_bytes(b"")
        elif tool == "trainer.evaluate":
            run = Path(_flag(cmd, "--run"))
            ckpt = Path(_flag(cmd, "--checkpoint") or run / "latest.pt")
            assert ckpt.is_file(), f"evaluating without a checkpoint: {ckpt}"
            suffix = ablation.result_suffix("--ensemble" in cmd, False,
                                            _flag(cmd, "--calibration"))
            base, novel = AP[run.name]
            run.mkdir(parents=True, exist_ok=True)  # as trainer.evaluate does
            (run / f"detections_val{suffix}.json").write_text("[]")
            (run / f"eval{suffix}.json").write_text(json.dumps(
                {"AP50_base": base, "AP50_novel": novel, "AP50_all": (base + novel) / 2,
                 "top_class": {"name": "ring", "share": 0.8}}))
        elif tool == "trainer.oracle":
            out = Path(_flag(cmd, "--out"))
            out.mkdir(parents=True, exist_ok=True)
            (out / "oracle.json").write_text(json.dumps({"mode": "oracle", **ORACLE}))

    def tools(self):
        return [(c[2].removeprefix("ovdistill."), Path(_flag(c, "--out") or _flag(c, "--run")).name)
                for c in self.calls]


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(MANIFEST)
    cache = tmp_path / "cache"
    (cache / "tiny" / "teacher").mkdir(parents=True)
    (cache / "tiny" / "teacher" / "_MANIFEST.json").write_text(json.dumps(
        {"teacher": {"model": "x"}, "zero_shot": ZERO_SHOT}))
    fake = FakeTools()
    monkeypatch.setattr(ablation.subprocess, "run", fake)
    out = tmp_path / "out"

    def main(*extra):
        return ablation.main(["--manifest", str(manifest), "--cache", str(cache),
                              "--out", str(out), *extra])

    return SimpleNamespace(main=main, out=out, fake=fake, cache=cache)


def test_rows_in_order_with_the_remedies_as_vild_plus_options():
    assert list(ablation.ROWS) == ["text", "image", "vild", "ensemble", "confident",
                                   "contrastive", "centered", "negatives", "calibrated",
                                   "ensemble_residual", "ensemble_confident", "pairs",
                                   "vild+pairs", "ensemble+pairs", "ensemble+pairs_frozen",
                                   "grounding",
                                   "grounding+fusion", "grounding+pseudo"]
    args = SimpleNamespace(out="o", manifest="m", cache="c", steps=None, seed=3,
                           set=["lr=1e-3"])
    cmd = ablation.train_command(ablation.ROWS["centered"], args)
    assert cmd[cmd.index("--mode") + 1] == "vild" and "--heads" not in cmd
    assert cmd[-5:] == ["--seed=3", "--set", "lr=1e-3", "--set", "center_targets=true"]
    cmd = ablation.train_command(ablation.ROWS["confident"], args)
    assert cmd[-4:] == ["--set", "distill_min_score=0.3", "--set", "distill_top_k=20"]
    cmd = ablation.train_command(ablation.ROWS["ensemble"], args)
    assert cmd[cmd.index("--heads") + 1] == "separate"
    assert "--ensemble" in ablation.eval_command(ablation.ROWS["ensemble"], args)
    cmd = ablation.train_command(ablation.ROWS["grounding+pseudo"], args)
    assert cmd[cmd.index("--mode") + 1] == "grounding"
    assert cmd[-8:] == ["--set", "grounding_ratio=0.25", "--set", "grounding_train_names=1",
                        "--set", "grounding_span=\"eot\"", "--set", "pseudo_ratio=0.25"]
    cmd = ablation.train_command(ablation.ROWS["grounding+fusion"], args)
    assert cmd[-2:] == ["--set", "fusion_layers=1"]
    row = ablation.ROWS["ensemble+pairs"]
    cmd = ablation.train_command(row, args)
    assert cmd[cmd.index("--heads") + 1] == "separate" and row.ensemble
    assert cmd[-12:] == ["--set", "center_targets=true", "--set", "contrastive_weight=1.0",
                         "--set", "pairs_ratio=0.5", "--set", "pairs_weight=0.1",
                         "--set", "pairs_top_k=10", "--set", "pairs_negatives=\"unnamed\""]


def test_targets_met_on_planted_results():
    rows = {"text": _row("text", 0.5, 0.2), "vild": _row("vild", 0.4, 0.3),
            "ensemble": _row("ensemble", 0.5, 0.31)}
    got = ablation.targets(rows, ZERO_SHOT, ORACLE)
    assert got["T1"] == {"text_novel": 0.2, "vild_novel": 0.3, "text_base": 0.5,
                         "vild_base": 0.4, "novel_ratio": 1.5, "base_ratio": 0.8, "met": True}
    assert got["T2"] == {"best_row": "ensemble", "novel": 0.31, "oracle_novel": 0.5,
                         "ratio": 0.62, "met": True}
    assert got["T3"] == {"base_acc": 0.9, "novel_acc": 0.875,
                         "worst_category": {"name": "ball", "acc": 0.85}, "below_floor": [],
                         "met": True}


def test_targets_missed_on_planted_results():
    # novel 1.5 x text but base below 0.8 x text: T1 missed
    rows = {"text": _row("text", 0.5, 0.2), "vild": _row("vild", 0.39, 0.4)}
    got = ablation.targets(rows, {**ZERO_SHOT, "per_category": {"box": 0.95, "ring": 0.49}},
                           {"AP50_base": 0.5, "AP50_novel": 0.8})
    assert got["T1"]["met"] is False and got["T1"]["base_ratio"] == 0.78
    assert got["T2"]["met"] is False and got["T2"]["best_row"] == "vild"  # 0.4 < 0.6 x 0.8
    assert got["T3"]["met"] is False and got["T3"]["below_floor"] == ["ring"]
    # novel below 1.5 x text: missed, base fine
    rows["vild"] = _row("vild", 0.5, 0.29)
    assert ablation.targets(rows, ZERO_SHOT, ORACLE)["T1"]["met"] is False
    # teacher accuracy below 0.85 with every category above the floor: T3 missed
    assert ablation.targets(rows, {**ZERO_SHOT, "base_acc": 0.84}, ORACLE)["T3"]["met"] is False
    # text at 0 novel: only a vild above 0 meets it
    rows = {"text": _row("text", 0.5, 0.0), "vild": _row("vild", 0.5, 0.0)}
    assert ablation.targets(rows, ZERO_SHOT, ORACLE)["T1"]["met"] is False


def test_targets_not_judged_without_their_inputs():
    got = ablation.targets({"vild": _row("vild", 0.4, 0.3)}, {}, None)
    assert got["T1"]["met"] is None and got["T2"]["met"] is None and got["T3"]["met"] is None
    assert got["T2"]["best_row"] == "vild"
    lines = ablation.format_targets({"targets": got, "oracle": None, "rows": [],
                                     "steps": None, "seed": None})
    assert [line.split(":")[-1].strip() for line in lines[:3]] == \
        ["not judged (needs the finished rows text and vild)",
         "not judged (needs a finished row and <out>/oracle/oracle.json)",
         "not judged (no zero-shot report in the teacher stage's _MANIFEST.json)"]


def test_summary_holds_finished_rows_not_in_this_invocation(setup, capsys):
    assert setup.main("--rows", "image") == 0
    capsys.readouterr()
    assert setup.main("--rows", "text,vild") == 0
    out = capsys.readouterr().out
    assert setup.fake.tools() == [("trainer.train", "image"), ("trainer.evaluate", "image"),
                                  ("trainer.oracle", "oracle"),
                                  ("trainer.train", "text"), ("trainer.evaluate", "text"),
                                  ("trainer.train", "vild"), ("trainer.evaluate", "vild")]
    doc = json.loads((setup.out / "ablation.json").read_text())
    assert list(doc) == ["steps", "seed", "teacher", "oracle", "rows", "targets"]
    assert (doc["steps"], doc["seed"]) == (700, 0)
    assert doc["teacher"] == {"base_acc": 0.9, "novel_acc": 0.875}
    assert doc["oracle"] == ORACLE
    assert [r["name"] for r in doc["rows"]] == ["text", "image", "vild"]  # ROWS order
    for r in doc["rows"]:
        assert list(r) == ["name", "mode", "heads", "options", "AP50_base", "AP50_novel",
                           "AP50_all", "image_fit", "train_seconds"]
        assert all(0.0 <= r[k] <= 1.0 for k in ("AP50_base", "AP50_novel", "AP50_all"))
        assert r["train_seconds"] >= 0
    assert [r["image_fit"] for r in doc["rows"]] == [0.75] * 3
    assert list(doc["targets"]) == ["T1", "T2", "T3"]
    assert doc["targets"]["T1"]["met"] is True  # 0.32 >= 1.5 x 0.2, 0.45 >= 0.8 x 0.5
    assert doc["targets"]["T2"]["met"] is True and doc["targets"]["T2"]["best_row"] == "vild"
    assert doc["targets"]["T3"]["met"] is True
    assert "T1 vild against text: novel AP50 0.320 vs 1.5 x 0.200 = 0.300, base AP50 0.450 " \
           "vs 0.8 x 0.500 = 0.400: met" in out
    md = (setup.out / "ablation.md").read_text().splitlines()
    assert md[2] == "| text | text / shared | - | 50.0 | 20.0 | 35.0 | 0.75 | 0 | ring 80% |"
    assert [line.split(" | ")[0] for line in md[2:5]] == ["| text", "| image", "| vild"]
    assert (setup.out / "text" / "detections_val.json").is_file()


def test_calibrated_reuses_the_vild_checkpoint(setup):
    assert setup.main("--rows", "calibrated") == 0
    assert setup.fake.tools() == [("trainer.train", "vild"), ("trainer.evaluate", "vild"),
                                  ("trainer.evaluate", "calibrated"),
                                  ("trainer.oracle", "oracle")]
    cal = setup.fake.calls[2]
    assert _flag(cal, "--checkpoint") == str(setup.out / "vild" / "latest.pt")
    assert _flag(cal, "--calibration") == "mean_logit"
    assert (setup.out / "calibrated" / "detections_val_mean_logit.json").is_file()
    # every row folder holds its detections under the plain name too
    assert ((setup.out / "calibrated" / "detections_val.json").read_bytes()
            == (setup.out / "calibrated" / "detections_val_mean_logit.json").read_bytes())
    assert (setup.out / "calibrated" / "eval_mean_logit.json").is_file()
    assert not (setup.out / "calibrated" / "latest.pt").exists()
    doc = json.loads((setup.out / "ablation.json").read_text())
    cal_row = doc["rows"][-1]
    assert cal_row["name"] == "calibrated" and cal_row["train_seconds"] is None
    assert cal_row["image_fit"] == 0.75  # the vild run's
    md = (setup.out / "ablation.md").read_text()
    assert "| calibrated | vild / shared | vild checkpoint, --calibration mean_logit |" in md
    assert doc["targets"]["T2"]["best_row"] == "calibrated"


def test_finished_rows_are_skipped_and_stopped_ones_resume(setup, capsys):
    assert setup.main() == 0
    assert len([t for t, _ in setup.fake.tools() if t == "trainer.train"]) == 17
    capsys.readouterr()
    setup.fake.calls.clear()
    assert setup.main() == 0  # everything finished: nothing runs again
    assert setup.fake.calls == []
    assert capsys.readouterr().out.count("already evaluated") == 19  # 18 rows + oracle
    doc = json.loads((setup.out / "ablation.json").read_text())
    assert [r["name"] for r in doc["rows"]] == list(ablation.ROWS)
    assert doc["rows"][4]["options"] == {"distill_min_score": 0.3, "distill_top_k": 20}

    (setup.out / "negatives" / "eval.json").unlink()  # its training was cut off
    assert setup.main("--rows", "negatives") == 0
    train = setup.fake.calls[0]
    assert train[-4:] == ["--set", "negative_prompts=true", "--resume", "latest"]


def test_unknown_row_is_one_line(capsys):
    assert ablation.main(["--rows", "text,clip"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown row(s) ['clip']; known: " + str(list(ablation.ROWS)))


def test_a_failed_training_names_the_command_and_keeps_the_summary(setup, capsys):
    assert setup.main("--rows", "image") == 0
    setup.fake.fail_on = "trainer.train"
    assert setup.main("--rows", "text") == 1
    assert f"{sys.executable} -m ovdistill.trainer.train" in capsys.readouterr().err
    doc = json.loads((setup.out / "ablation.json").read_text())
    assert [r["name"] for r in doc["rows"]] == ["image"]
    assert (setup.out / "text" / ablation.TRAIN_TIME).is_file()  # its seconds still count


def test_image_fit_averages_the_last_logged_rows(tmp_path):
    rows = [{"step": 10, "loss_text": 1.0},
            {"step": 20, "loss_image": 9.0, "image_mean_baseline": 3.0},
            {"step": 30, "loss_image": 3.0, "image_mean_baseline": 3.0},
            {"step": 40, "loss_image": 1.5, "image_mean_baseline": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ablation.image_fit(tmp_path, last=2) == 0.75  # (3 + 1.5) / (3 + 3)
    assert ablation.image_fit(tmp_path / "nothing") is None
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert ablation.image_fit(tmp_path) is None


def test_a_detection_budget_row_trains_its_pair_iterations_on_top(setup, tmp_path):
    """ensemble+pairs_frozen trains round(steps / (1 - 0.3333)) steps in all: 1,050 for the
    manifest's 700, 1,500 for --steps 1000, 450 for --set steps=300; the other rows take the
    steps as given; the summary counts its steps as the others' (no disagreement note)."""
    row = ablation.ROWS["ensemble+pairs_frozen"]
    assert row.detection_budget and row.ensemble and row.heads == "separate"
    assert row.options == {"center_targets": True, "contrastive_weight": 1.0,
                           "pairs_ratio": 0.3333, "pairs_weight": 0.1, "pairs_top_k": 10,
                           "pairs_negatives": "unnamed", "pairs_pseudo_weight": 1.0,
                           "pairs_frozen_backbone": True}
    args = SimpleNamespace(out="o", manifest=str(tmp_path / "m.yaml"), cache=str(setup.cache),
                           steps=None, seed=None, set=[])
    steps = [c for c in ablation.train_command(row, args) if c.startswith("--steps")]
    assert steps == ["--steps=1050"]
    assert "--steps=1500" in ablation.train_command(row, SimpleNamespace(**{
        **vars(args), "steps": 1000}))
    assert "--steps=450" in ablation.train_command(row, SimpleNamespace(**{
        **vars(args), "set": ["steps=300"]}))
    assert not [c for c in ablation.train_command(ablation.ROWS["ensemble+pairs"], args)
                if c.startswith("--steps")]
    assert setup.main("--rows", "text,ensemble+pairs_frozen") == 0
    cfg = json.loads((setup.out / "ensemble+pairs_frozen" / "config.json").read_text())
    assert cfg["config"]["steps"] == 1050
    doc = json.loads((setup.out / "ablation.json").read_text())
    assert doc["steps"] == 700 and [r["name"] for r in doc["rows"]] == [
        "text", "ensemble+pairs_frozen"]
    md = (setup.out / "ablation.md").read_text()
    assert "steps / (1 - pairs_ratio) in all" in md and "disagree" not in md
