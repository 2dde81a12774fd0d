"""The mechanics the stages, the trainer and the probe share (pipeline/optim.py, errors.reject,
precision.autocast_setting, options.assignment): each is bit-for-bit the code it replaced."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from ovdistill.pipeline.errors import OvdError, StageError, reject
from ovdistill.pipeline.optim import NonFiniteLoss, check_finite, warmup_cosine
from ovdistill.pipeline.precision import autocast_setting
from ovdistill.trainer.config import ConfigError, parse_set

from ovdistill.cli import parse_overrides

CONFIGS = [(0.02, 50, 1200), (1e-3, 0, 10), (2e-4, 2, 3), (0.1, 7, 7), (3e-4, 100, 1000)]


def old_rpn_lr(step, lr, warmup_steps, steps):  # stages/rpn.py lr_at before the merge
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def old_trainer_multiplier(step, warmup, total):  # trainer/train.py before the merge
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def test_one_schedule_is_bit_identical_to_the_three_it_replaced():
    from ovdistill.stages import rpn

    for lr, warmup, steps in CONFIGS:
        for step in range(steps + 3):
            assert warmup_cosine(step, warmup, steps, lr) == old_rpn_lr(step, lr, warmup, steps)
            assert rpn.lr_at(step, rpn.Config(lr=lr, warmup_steps=warmup, steps=steps)) == \
                old_rpn_lr(step, lr, warmup, steps)
            assert warmup_cosine(step, warmup, steps) == old_trainer_multiplier(step, warmup,
                                                                                steps)
            if steps >= 1:  # the probe's cosine without warmup
                assert warmup_cosine(step, 0, steps) == \
                    0.5 * (1.0 + math.cos(math.pi * min(1.0, step / steps)))


def test_check_finite_raises_the_callers_message_only_when_needed():
    said = []
    check_finite(torch.tensor(1.5), lambda: said.append("called") or "x")
    assert said == []
    with pytest.raises(NonFiniteLoss, match=r"^loss is nan at step 3$") as e:
        check_finite(torch.tensor(float("nan")), lambda: "loss is nan at step 3")
    assert isinstance(e.value, OvdError) and isinstance(e.value, FloatingPointError)
    with pytest.raises(StageError, match="diverged"):
        check_finite(torch.tensor(float("inf")), lambda: "diverged", StageError)


def test_reject_keeps_the_key_order_and_the_text():
    r = reject(3, Path("/d/a.jpg"), ValueError("bad"))
    assert list(r) == ["item", "file", "reason"]
    assert json.dumps(r) == '{"item": 3, "file": "/d/a.jpg", "reason": "bad"}'
    assert reject("line 2", None, "unreadable") == {"item": "line 2", "file": None,
                                                     "reason": "unreadable"}
    assert reject(1, "a.jpg", "why")["file"] == "a.jpg"


def test_autocast_setting_resolves_auto_for_the_device():
    with autocast_setting("cpu", "auto"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_setting(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu")
    with autocast_setting("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")


def test_set_parsers_keep_their_grammar_and_errors():
    assert parse_set([" lr =0.001", "train_sizes=[96,128]", "mode=a=b"]) == {
        "lr": 0.001, "train_sizes": [96, 128], "mode": "a=b"}
    with pytest.raises(ConfigError, match=r"^--set expects KEY=VALUE, got 'lr'$"):
        parse_set(["lr"])
    assert parse_overrides(["proposals.top_m=300", "teacher.model=x", "proposals.a=[1]"]) == {
        "proposals": {"top_m": 300, "a": [1]}, "teacher": {"model": "x"}}
    for bad in ("top_m=3", "proposals.top_m", "top_m"):
        with pytest.raises(SystemExit, match=r"^--set expects STAGE.KEY=VALUE, got "):
            parse_overrides([bad])
