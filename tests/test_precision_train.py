"""Mixed precision in the trainer and the rpn stage (issue 18). Under bf16 autocast -- on CPU,
which follows CUDA's dtype rules -- the network runs in bf16, but anchors, proposals, regression
targets, logits and losses stay float32, so a bf16 step learns from the fp32 step's box targets.

The geometry is checked on a 1000 x 1333 canvas, where bf16 is coarse (spacing 4 px at 512-1024),
with the ResNet-FPN swapped for `PooledFeatures` so a step takes a fraction of a second.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable

import ovdistill.trainer.model  # noqa: F401 - binds ovdistill.trainer.model
import pytest
import torch
import torch.nn.functional as F
from ovdistill.bench.wds_fixture import TINY_SETTINGS, write_tiny_cache
from ovdistill.pipeline.precision import autocast
from ovdistill.stages.rpn import ProposalNet, RPNArch
from ovdistill.trainer.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    make_config,
    parse_set,
)
from ovdistill.trainer.detect import detect_image
from ovdistill.trainer.evaluate import main as evaluate_main
from ovdistill.trainer.losses import region_logits
from ovdistill.trainer.model import OpenVocabDetector
from ovdistill.trainer.train import RESUMABLE_CHANGES, build_optimizer, train_step
from ovdistill.trainer.train import main as train_main
from PIL import Image
from torch import nn

from ovdistill import trainer

DIM = 8
GT = [100.3, 200.7, 900.1, 950.9]  # bf16 would make it [100.5, 201, 900, 952]
CANVAS = (1000, 1333)  # H, W of the first image (batched: 1024 x 1344)
CPU = torch.device("cpu")


class PooledFeatures(nn.Module):
    """Stands in for ResNet-FPN with returned_layers=(4,) at a sliver of its cost: a 1x1 conv
    (bf16 under autocast, as the real features are) of the image average-pooled to stride 32,
    and FPN's "pool" level at stride 64."""

    out_channels = 256

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, self.out_channels, 1)

    def forward(self, x: torch.Tensor) -> OrderedDict:
        """x: Tensor[B, 3, H, W] -> {"0": Tensor[B, 256, H/32, W/32], "pool": .../64}."""
        f = self.conv(F.avg_pool2d(x, 32, ceil_mode=True))
        return OrderedDict([("0", f), ("pool", F.max_pool2d(f, 1, 2))])


def silence(head: nn.Module) -> None:
    """Objectness and box deltas exactly 0 in any precision: the proposals are then the anchors
    themselves, so a bf16 and an fp32 step see the same proposals iff their anchors agree."""
    with torch.no_grad():
        for conv in (head.cls_logits, head.bbox_pred):
            conv.weight.zero_()
            conv.bias.zero_()


def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, *CANVAS, generator=g), torch.rand(3, 900, 1200, generator=g)]


def detector_targets() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"boxes": torch.tensor([box]), "labels": torch.tensor([label]),
             "cached_boxes": torch.tensor([[10.0, 10.0, 300.0, 300.0]]),
             "cached_emb": F.normalize(torch.randn(1, DIM, generator=g), dim=-1)}
            for box, label in ((GT, 1), ([30.6, 40.2, 700.9, 610.3], 2))]


def big_canvas_detector(**overrides) -> OpenVocabDetector:
    """The same weights on every call: a trainer model sized for the 1000 x 1333 canvas."""
    cfg = make_config({"representation_size": 16, "returned_layers": [4],
                       "anchor_sizes": [512, 1024], "rpn_pre_nms_train": 200,
                       "rpn_post_nms_train": 100, "box_batch_size_per_image": 32,
                       "warmup_steps": 1, **overrides})
    torch.manual_seed(0)
    model = OpenVocabDetector(cfg, embed_dim=DIM)
    model.backbone = PooledFeatures()
    silence(model.rpn.head)
    model.set_vocabulary(torch.randn(3, DIM), torch.tensor([True, True, False]))
    return model.train()


def captured(model: nn.Module, step: Callable) -> tuple[object, dict]:
    """(step(), what the model's pieces produced on the way): "features" (the backbone's),
    "anchors", "proposals" (the RPN's), "rpn_targets" (the RPN's regression targets) and, for
    the trainer model, "sampled" (select_training_samples' proposals, matched indices, labels,
    regression targets) and "logits" (every region_logits result)."""
    seen: dict = {"logits": []}

    def keep(name, part=lambda out: out):
        def hook(module, args, out):  # returns None: the output is left as it is
            seen.setdefault(name, part(out))
        return hook

    def logits_spy(*args):
        seen["logits"].append(region_logits(*args))
        return seen["logits"][-1]

    hooks = [model.backbone.register_forward_hook(keep("features")),
             model.rpn.anchor_generator.register_forward_hook(keep("anchors")),
             model.rpn.register_forward_hook(keep("proposals", lambda out: out[0]))]
    encode = model.rpn.box_coder.encode
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model.rpn.box_coder, "encode",
                   lambda gt, anchors: seen.setdefault("rpn_targets", encode(gt, anchors)))
        if hasattr(model, "roi_heads"):
            sample = model.roi_heads.select_training_samples
            mp.setattr(model.roi_heads, "select_training_samples",
                       lambda p, t: seen.setdefault("sampled", sample(p, t)))
            mp.setattr(trainer.model, "region_logits", logits_spy)
        try:
            return step(), seen
        finally:
            for h in hooks:
                h.remove()


def all_float32(tensors) -> bool:
    return all(t.dtype == torch.float32 for t in tensors)


def test_bf16_autocast_keeps_the_trainer_geometry_and_logits_float32():
    model = big_canvas_detector()
    with autocast("cpu", "bf16"):
        losses, seen = captured(model, lambda: model(images(), detector_targets()))
    assert seen["features"]["0"].dtype == torch.bfloat16  # the network did run in bf16
    assert all_float32(seen["anchors"])
    assert all_float32(model.rpn.anchor_generator.cell_anchors)  # the cached ones too
    assert all_float32(seen["proposals"]) and all_float32(seen["rpn_targets"])
    proposals, _, labels, regression_targets = seen["sampled"]
    assert all_float32(proposals) and all_float32(regression_targets)
    assert int(torch.cat(labels).gt(0).sum()) > 0  # the GT boxes matched some proposals
    assert len(seen["logits"]) == 1 and all_float32(seen["logits"])
    assert all_float32(losses.values()) and all(torch.isfinite(v) for v in losses.values())


def test_region_logits_are_float32_cosines_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    region = F.normalize(torch.randn(5, DIM, generator=g), dim=-1).bfloat16()
    text = F.normalize(torch.randn(3, DIM, generator=g), dim=-1)
    bg = torch.randn(DIM, generator=g)
    with autocast("cpu", "bf16"):
        z = region_logits(region, bg, text, 0.01)
    assert z.dtype == torch.float32
    assert torch.equal(z, region_logits(region.float(), bg, text, 0.01))  # as in fp32


def test_a_bf16_training_step_learns_from_the_fp32_step_box_targets():
    assert torch.tensor(GT).bfloat16().float().tolist() == [100.5, 201.0, 900.0, 952.0]
    runs = {}
    for precision in ("fp32", "bf16"):
        model = big_canvas_detector(precision=precision)
        optimizer, scheduler = build_optimizer(model, model.cfg)
        torch.manual_seed(1)  # the RPN's and the RoI sampler's draws
        (losses, loss, _, _), seen = captured(model, lambda m=model, o=optimizer, s=scheduler:
                                              train_step(m, m, o, s, images(),
                                                         detector_targets(), m.cfg, CPU))
        assert torch.isfinite(loss) and all_float32(losses.values())
        runs[precision] = seen
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert fp32["features"]["0"].dtype == torch.float32
    assert bf16["features"]["0"].dtype == torch.bfloat16  # precision=bf16 reached autocast
    for key in ("anchors", "proposals", "rpn_targets"):
        assert all(torch.equal(a, b) for a, b in zip(fp32[key], bf16[key], strict=True)), key
    for a, b in zip(fp32["sampled"], bf16["sampled"], strict=True):  # boxes, labels, targets
        assert all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(a, b, strict=True))
    assert all_float32(bf16["sampled"][3])


def test_the_rpn_stage_net_keeps_anchors_and_proposals_float32_under_bf16():
    arch = RPNArch(returned_layers=(4,), anchor_sizes=(512, 1024), min_size=CANVAS[0],
                   max_size=CANVAS[1])
    image, runs = images()[:1], {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        net = ProposalNet(arch)
        net.backbone = PooledFeatures()
        silence(net.rpn.head)
        net.train()
        torch.manual_seed(1)
        with autocast("cpu", precision):
            losses, seen = captured(net, lambda n=net: n(image, [{"boxes": torch.tensor([GT])}]))
            assert all_float32(losses.values())
            assert all_float32(net.rpn.anchor_generator.cell_anchors)
            net.eval()
            seen["propose"] = net.propose(image, top_m=50)[0]
        runs[precision] = seen
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert bf16["features"]["0"].dtype == torch.bfloat16
    assert all_float32(bf16["anchors"]) and all_float32(bf16["rpn_targets"])
    for key in ("anchors", "proposals", "rpn_targets", "propose"):
        assert all(torch.equal(a, b) for a, b in zip(fp32[key], bf16[key], strict=True)), key
    assert all_float32(bf16["propose"]) and len(bf16["propose"][0]) > 0


@pytest.mark.parametrize("heads", ["shared", "separate"])
def test_detect_under_bf16_gives_float32_boxes_and_scores(heads):
    cfg = make_config({"representation_size": 16, "train_sizes": [64], "test_size": 64,
                       "returned_layers": [2, 3, 4], "anchor_sizes": [8, 16, 32, 64],
                       "heads": heads, "rpn_post_nms_test": 50, "score_thresh": 0.0})
    torch.manual_seed(0)
    model = OpenVocabDetector(cfg, embed_dim=DIM).eval()
    model.set_vocabulary(torch.randn(4, DIM), torch.tensor([True, True, False, False]))
    image = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(1))]
    with autocast("cpu", "bf16"):
        det = model.detect(image, ensemble=heads == "separate")[0]
    assert len(det.scores) > 0 and all_float32([det.boxes, det.scores])

    # `trainer.detect` runs the model under the precision of the checkpoint's config
    dtypes = []
    model.backbone.register_forward_hook(lambda m, a, out: dtypes.append(out["0"].dtype))
    pil = Image.fromarray((image[0].permute(1, 2, 0) * 255).byte().numpy())
    for precision in ("fp32", "bf16"):
        model.cfg = make_config({"precision": precision}, base=cfg)
        boxes, scores, _ = detect_image(model, pil, ensemble=heads == "separate", score=0.0,
                                        device=CPU)
        assert all_float32([boxes, scores])
    assert dtypes == [torch.float32, torch.bfloat16]


def test_precision_bf16_trains_and_evaluates_on_cpu(tmp_path, capsys, monkeypatch):
    """`--set precision=bf16` on CPU: two steps with finite float32 losses computed under bf16
    autocast, then evaluation of the run under the precision its checkpoint records."""
    tiny = write_tiny_cache(tmp_path / "tiny")
    seen = []
    real_loss, real_post = trainer.model.box_regression_loss, trainer.model.postprocess

    def loss_spy(deltas, targets, labels):
        seen.append(("train", torch.is_autocast_enabled("cpu"), deltas.dtype, targets.dtype))
        return real_loss(deltas, targets, labels)

    def post_spy(boxes, scores, *args, **kw):
        seen.append(("detect", torch.is_autocast_enabled("cpu"), boxes.dtype, scores.dtype))
        return real_post(boxes, scores, *args, **kw)

    monkeypatch.setattr(trainer.model, "box_regression_loss", loss_spy)
    monkeypatch.setattr(trainer.model, "postprocess", post_spy)
    sets = [a for k, v in TINY_SETTINGS.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    run = tmp_path / "run"
    common = ["--manifest", str(tiny.manifest), "--cache", str(tiny.cache), "--device", "cpu"]
    assert train_main([*common, "--out", str(run), *sets, "--steps", "2",
                       "--set", "precision=bf16"]) == 0
    assert "on 1 x cpu (bf16)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert json.loads((run / "config.json").read_text())["config"]["precision"] == "bf16"
    f32 = torch.float32
    assert seen and set(seen) == {("train", True, f32, f32)}

    seen.clear()
    assert evaluate_main([*common, "--run", str(run)]) == 0
    assert seen and set(seen) == {("detect", True, f32, f32)}


def test_precision_setting_is_checked_and_defaults_to_auto_for_old_checkpoints():
    with pytest.raises(ConfigError, match=r"precision must be one of .*got 'fp16'") as e:
        make_config(parse_set(["precision=fp16"]))
    assert "\n" not in str(e.value)
    assert make_config(parse_set(["precision=bf16"])).precision == "bf16"
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "precision"}
    assert config_from_dict(old).precision == "auto"  # a checkpoint saved before the key
    assert "precision" not in RESUMABLE_CHANGES  # it changes what is learned
