"""Fixtures several test modules share."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip
from ovdistill.pipeline import clip_teacher as T

MICRO = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                   "patch_size": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    """A micro CLIP config JSON and random weights saved for it: (config path, weights path)."""
    d = tmp_path_factory.mktemp("micro")
    config = d / "micro-clip.json"
    config.write_text(json.dumps(MICRO))
    T.register_model_config(T.TeacherSpec("micro-clip", None, str(config)))
    torch.manual_seed(0)
    model = open_clip.create_model("micro-clip")
    weights = d / "micro.pt"
    torch.save(model.state_dict(), weights)
    return config, weights
