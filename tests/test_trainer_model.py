"""The student model: init from the RPN stage's checkpoint, config validation, vocabulary."""
import pytest
import torch

from trainer.config import ConfigError, make_config, parse_set
from trainer.model import (
    CheckpointError,
    OpenVocabDetector,
    arch_overrides,
    load_init_weights,
    read_init_checkpoint,
)

TINY = {"representation_size": 16, "train_sizes": [64], "returned_layers": [2, 3, 4],
        "anchor_sizes": [8, 16, 32, 64]}


def test_init_from_rpn_stage_checkpoint_copies_backbone_and_rpn(tmp_path):
    from stages.rpn import ProposalNet, RPNArch, save_checkpoint

    torch.manual_seed(1)
    rpn = ProposalNet(RPNArch(anchor_sizes=(8, 16, 32, 64)))
    path = tmp_path / "rpn.pt"
    save_checkpoint(rpn, path, {"steps": 0})
    blob = read_init_checkpoint(str(path))
    over = arch_overrides(blob)
    assert over == {"backbone": "resnet18", "returned_layers": (2, 3, 4),
                    "anchor_sizes": (8, 16, 32, 64), "norm": "batch"}
    cfg = make_config({**TINY, **over})
    model = OpenVocabDetector(cfg, embed_dim=8)
    assert load_init_weights(model, str(path)) == ["backbone", "rpn"]
    theirs = rpn.state_dict()
    for k, v in model.state_dict().items():
        if k.startswith(("backbone.", "rpn.")):
            torch.testing.assert_close(v, theirs[k], msg=k)

    # a group-norm model with 5 FPN levels does not fit: one line naming the file
    other = OpenVocabDetector(make_config({**TINY, "returned_layers": [1, 2, 3, 4],
                                           "anchor_sizes": [8, 16, 32, 64, 128]}), 8)
    with pytest.raises(CheckpointError, match=r"rpn\.pt: backbone\..* has shape"):
        load_init_weights(other, str(path))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt: cannot load init checkpoint"):
        read_init_checkpoint(str(tmp_path / "junk.pt"))


def test_config_validation_messages():
    with pytest.raises(ConfigError, match=r"unknown train config key\(s\) \['lrr'\]"):
        make_config({"lrr": 1})
    with pytest.raises(ConfigError, match="heads=separate .* needs mode=vild"):
        make_config({"heads": "separate", "mode": "text"})
    with pytest.raises(ConfigError, match="anchor_sizes needs one size per FPN level"):
        make_config({"anchor_sizes": [8, 16]})
    cfg = make_config(parse_set(["lr=1e-3", "train_sizes=[96,128]", "mode=image"]))
    assert cfg.lr == 1e-3 and cfg.train_sizes == (96, 128) and cfg.mode == "image"


def test_vocabulary_is_swappable_and_checked():
    model = OpenVocabDetector(make_config(TINY), embed_dim=8)
    with pytest.raises(ValueError, match=r"expects \[C, 8\]"):
        model.set_vocabulary(torch.randn(3, 16), torch.tensor([True, False, True]))
    model.set_vocabulary(torch.randn(5, 8) * 3, torch.tensor([True] * 3 + [False] * 2))
    assert torch.allclose(model.text_emb.norm(dim=-1), torch.ones(5))
    assert "text_emb" not in model.state_dict()  # one checkpoint, any vocabulary of this D
    model.eval()
    dets = model.detect([torch.rand(3, 64, 80)])
    assert dets[0].labels.max().item() < 5 if len(dets[0].labels) else True
    with pytest.raises(ValueError, match="heads=separate"):
        model.detect([torch.rand(3, 64, 64)], ensemble=True)
