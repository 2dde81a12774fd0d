"""Every trainer command prints a missing or refused input as one `error:` line with exit
status 2 (a project error, pipeline.errors.OvdError), never a traceback: the checkpoint a run
resumes from or evaluates, an init_from checkpoint, a diagnosis answer key, an ablation row."""
from __future__ import annotations

import json

import pytest
from ovdistill.bench.wds_fixture import write_tiny_cache
from ovdistill.pipeline.checkpoints import CheckpointError
from ovdistill.pipeline.errors import OvdError
from ovdistill.trainer import ablation, diagnose, evaluate, train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_cache(tmp_path_factory.mktemp("cli_errors"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_a_missing_checkpoint_is_a_project_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train.load_checkpoint(tmp_path / "latest.pt")
    assert issubclass(CheckpointError, OvdError)


def test_resume_from_nothing_is_one_line(tiny, tmp_path, capsys):
    rc = train.main(["--manifest", str(tiny.manifest), "--cache", str(tiny.cache),
                     "--out", str(tmp_path / "run"), "--resume", str(tmp_path / "none.pt")])
    assert rc == 2
    assert "none.pt: no checkpoint to resume from" in one_error_line(capsys)


def test_init_from_a_missing_file_is_one_line(tiny, tmp_path, capsys):
    rc = train.main(["--manifest", str(tiny.manifest), "--cache", str(tiny.cache),
                     "--out", str(tmp_path / "run"), "--set",
                     f"init_from={json.dumps(str(tmp_path / 'gone.pt'))}"])
    assert rc == 2
    assert "gone.pt: init_from checkpoint not found" in one_error_line(capsys)


def test_evaluate_without_a_checkpoint_is_one_line(tiny, tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    rc = evaluate.main(["--manifest", str(tiny.manifest), "--cache", str(tiny.cache),
                        "--run", str(tmp_path / "empty_run")])
    assert rc == 2
    assert "no checkpoint" in one_error_line(capsys)


def test_diagnose_without_an_answer_key_is_one_line(tiny, tmp_path, capsys):
    rc = diagnose.main(["--manifest", str(tiny.manifest), "--cache", str(tiny.cache),
                        "--run", str(tmp_path), "--gt", str(tmp_path / "none.json")])
    assert rc == 2
    assert "none.json: no ground-truth json" in one_error_line(capsys)


def test_an_unknown_ablation_row_is_one_line(tiny, tmp_path, capsys):
    rc = ablation.main(["--manifest", str(tiny.manifest), "--cache", str(tiny.cache),
                        "--out", str(tmp_path / "abl"), "--rows", "text,clip"])
    assert rc == 2
    assert "unknown row(s) ['clip']" in one_error_line(capsys)
