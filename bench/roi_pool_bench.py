"""RoIAlign forward + backward on the student's shapes: torchvision's CPU backward against
`trainer.roi_pool`'s, side by side in one run, outputs and gradients compared bit for bit.

    python -m ovdistill.bench.roi_pool_bench [--rois 656] [--repeats 5]

The shapes are a distillation step of the toy's trainer: 4 images of ~176 x 256 px, FPN levels
at strides 8, 16 and 32 with 256 channels, 4 x 64 live + 4 x 100 cached boxes, 7 x 7 bins,
sampling ratio 1.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from ovdistill.trainer.roi_pool import FastBackwardMultiScaleRoIAlign
from torchvision.ops import MultiScaleRoIAlign

IMAGE = (192, 256)  # padded batch (height, width)
STRIDES = (8, 16, 32)


def _inputs(n_rois: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = IMAGE
    levels = {str(i): torch.randn(4, 256, h // s, w // s, generator=g, requires_grad=True)
              for i, s in enumerate(STRIDES)}
    boxes = []
    for _ in range(4):
        xy = torch.rand(n_rois // 4, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        side = torch.rand(n_rois // 4, 2, generator=g) * 150 + 8
        boxes.append(torch.cat([xy, torch.minimum(xy + side, torch.tensor([w, h]))], 1))
    return levels, boxes


def _time(pool, levels, boxes, grad, repeats: int) -> tuple[float, torch.Tensor, dict]:
    best = float("inf")
    for _ in range(repeats):
        for t in levels.values():
            t.grad = None
        start = time.perf_counter()
        out = pool(levels, boxes, [IMAGE] * 4)
        out.backward(grad)
        best = min(best, time.perf_counter() - start)
    return best, out.detach(), {k: t.grad.clone() for k, t in levels.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovdistill.bench.roi_pool_bench",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rois", type=int, default=656, help="boxes per step (4 x (64 + 100))")
    p.add_argument("--repeats", type=int, default=5, help="best of this many")
    args = p.parse_args(argv)
    levels, boxes = _inputs(args.rois)
    names = list(levels)
    grad = torch.randn(sum(len(b) for b in boxes), 256, 7, 7,
                       generator=torch.Generator().manual_seed(1))
    tv_s, tv_out, tv_grads = _time(MultiScaleRoIAlign(names, 7, 1), levels, boxes, grad,
                                   args.repeats)
    our_s, our_out, our_grads = _time(FastBackwardMultiScaleRoIAlign(names, 7, 1), levels,
                                      boxes, grad, args.repeats)
    same = torch.equal(tv_out, our_out) and all(torch.equal(tv_grads[k], our_grads[k])
                                                for k in names)
    print(f"{'pooler':<34}{'fwd+bwd ms':>12}")
    print(f"{'torchvision MultiScaleRoIAlign':<34}{tv_s * 1e3:>12.1f}")
    print(f"{'trainer.roi_pool (index_add_ bwd)':<34}{our_s * 1e3:>12.1f}")
    print(f"speed-up {tv_s / our_s:.2f}x on {args.rois} boxes; outputs and gradients "
          f"bit-identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
