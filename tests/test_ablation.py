"""The ablation driver: its verdict on the paper's two claims, the table, and that a re-run
reuses finished rows instead of training again."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from trainer import ablation


def _row(base, novel, step=10):
    return {"AP50_base": base, "AP50_novel": novel, "AP50_all": (base + novel) / 2,
            "AP_novel": novel / 2, "step": step}


def test_checks_compare_vild_with_text():
    got = ablation.checks({"text": _row(0.6, 0.2), "vild": _row(0.6, 0.31)})
    assert got == {"vild_over_text_novel": 1.55, "vild_over_text_novel_ok": True,
                   "vild_novel_ok": True}
    got = ablation.checks({"text": _row(0.6, 0.25), "vild": _row(0.6, 0.29)})
    assert got == {"vild_over_text_novel": 1.16, "vild_over_text_novel_ok": False,
                   "vild_novel_ok": False}
    assert ablation.checks({"vild": _row(0.6, 0.3)}) == {}


def test_table_rows_in_percent():
    md = ablation.table({"text": _row(0.5, 0.125, 700),
                         "ensemble": {**_row(0.25, 0.5, 700), "image_fit": 0.614,
                                      "AP50_base_base_vocab": 0.3333}})
    assert md.splitlines()[2] == "| text | 50.0 | 12.5 | 31.2 | 6.2 | 700 | - | - |"
    assert md.splitlines()[3] == "| ensemble | 25.0 | 50.0 | 37.5 | 25.0 | 700 | 0.61 | 33.3 |"


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


def test_finished_rows_are_reused(tmp_path, monkeypatch, capsys):
    for name, (_, ensemble) in ablation.ROWS.items():
        run = tmp_path / name
        run.mkdir()
        ablation.row_eval_file(run, ensemble).write_text(json.dumps(_row(0.5, 0.4)))
    ablation.row_eval_file(tmp_path / "ensemble", True, base_vocab=True).write_text(
        json.dumps(_row(0.75, 0.0)))

    def no_training(*a, **k):
        raise AssertionError("a finished row was trained again")

    monkeypatch.setattr(ablation.subprocess, "run", no_training)
    assert ablation.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("already evaluated") == 4
    assert "vild / text novel AP50: 1.0 (target >= 1.5: missed)" in out
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert list(saved["rows"]) == ["text", "image", "vild", "ensemble"]
    assert [r["AP50_base_base_vocab"] for r in saved["rows"].values()] == [None] * 3 + [0.75]
    assert (tmp_path / "ensemble" / "eval_ensemble_base_vocab.json").is_file()


def test_unknown_row_is_one_line(capsys):
    assert ablation.main(["--rows", "text,clip"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown row(s) ['clip']; known: ['text', 'image', 'vild', 'ensemble']")


def test_a_failed_training_names_the_command(tmp_path, monkeypatch, capsys):
    def fail(cmd, check):
        raise ablation.subprocess.CalledProcessError(3, cmd)

    monkeypatch.setattr(ablation.subprocess, "run", fail)
    assert ablation.main(["--out", str(tmp_path), "--rows", "text"]) == 1
    assert "-m trainer.train" in capsys.readouterr().err
    with pytest.raises(ablation.subprocess.CalledProcessError):
        ablation.run_row("text", SimpleNamespace(out=str(tmp_path), manifest="m", cache="c",
                                                 steps=None, seed=None, set=[]), log=lambda s: 0)
