"""trainer/roi_pool.py: the faster CPU backward of RoIAlign is torchvision's, bit for bit."""
from __future__ import annotations

import pytest
import torch
from ovdistill.trainer.roi_pool import (
    FastBackwardMultiScaleRoIAlign,
    _RoIAlignFastBackward,
    roi_align,
    roi_align_backward,
)
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align


def _rois(n: int, n_images: int, width: float, height: float, seed: int) -> torch.Tensor:
    """Rois [n, 5] with every case the kernel branches on: inside, touching the right and
    bottom edges, narrower than one cell (clamped to 1), overlapping one another heavily, and
    reaching more than a cell beyond the map (points that add nothing)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) * 0.9
    wh = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) * 0.5 + 0.3
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([width, height]))], 1)
    special = torch.tensor([
        [0.0, 0.0, width, height],  # the whole image: points on the last cell's edge
        [width - 3.0, height - 3.0, width, height],  # the bottom-right corner
        [5.0, 5.0, 5.2, 5.1],  # under one cell wide and high
        [width * 0.5, height * 0.5, width * 1.6, height * 1.7],  # far beyond the map
        [5.0, 5.0, 5.0 + width * 0.3, 5.0 + height * 0.3],  # overlaps its duplicate below
        [5.0, 5.0, 5.0 + width * 0.3, 5.0 + height * 0.3],
    ])
    boxes = torch.cat([boxes, special])
    index = torch.randint(0, n_images, (len(boxes), 1), generator=g).float()
    return torch.cat([index, boxes], 1)


@pytest.mark.parametrize("sampling_ratio", [1, 2])
@pytest.mark.parametrize("stride", [4, 16])
def test_backward_is_torchvisions_bit_for_bit(sampling_ratio, stride):
    torch.manual_seed(0)
    height, width = 13, 17  # odd sizes: rows and columns cannot be swapped unnoticed
    features = torch.randn(3, 8, height, width, requires_grad=True)
    rois = _rois(120, 3, width * stride, height * stride, seed=stride)
    grad = torch.randn(len(rois), 8, 7, 7)

    tv_roi_align(features, rois, 7, 1.0 / stride, sampling_ratio).backward(grad)
    expected, features.grad = features.grad, None
    out = roi_align(features, rois, 7, 1.0 / stride, sampling_ratio)
    assert out.grad_fn.name() == "_RoIAlignFastBackwardBackward"  # the fast path ran
    out.backward(grad)

    assert torch.equal(features.grad, expected)
    assert expected.abs().sum() > 0
    direct = roi_align_backward(grad, rois, features.shape, 1.0 / stride, sampling_ratio)
    assert torch.equal(direct, expected)


def test_points_beyond_the_map_add_nothing():
    """A roi reaching more than one cell past the map contributes only its inside points;
    the dropped points would otherwise land on cell 0 of the image."""
    features = torch.randn(1, 2, 6, 6, requires_grad=True)
    # stride 8, a map 48 px across: the roi spans cells 3..25, bins 3.14 cells wide, so only
    # bin (0, 0)'s point (4.57, 4.57) lies inside
    rois = torch.tensor([[0.0, 24.0, 24.0, 200.0, 200.0]])
    grad = torch.ones(1, 2, 7, 7)
    tv_roi_align(features, rois, 7, 1 / 8, 1).backward(grad)
    expected, features.grad = features.grad, None
    roi_align(features, rois, 7, 1 / 8, 1).backward(grad)
    assert torch.equal(features.grad, expected)
    assert expected[0, :, 0, 0].abs().sum() == 0  # nothing spilt onto the first cell
    assert expected.sum().item() == pytest.approx(2.0)  # one point of 49, 2 channels


def test_fallbacks_keep_torchvision():
    """No gradient wanted, or an adaptive sampling ratio: torchvision's own op runs."""
    features = torch.randn(1, 4, 8, 8)
    rois = torch.tensor([[0.0, 1.0, 1.0, 30.0, 20.0]])
    assert roi_align(features, rois, 7, 0.25, 1).grad_fn is None
    features.requires_grad_(True)
    out = roi_align(features, rois, 7, 0.25, 0)
    assert out.grad_fn.name() != "_RoIAlignFastBackwardBackward"
    assert torch.equal(out, tv_roi_align(features, rois, 7, 0.25, 0))


def test_multiscale_pooling_is_torchvisions_outputs_and_gradients():
    """The student's pooler against torchvision's MultiScaleRoIAlign on a 3-level FPN, with
    boxes small and large enough to reach every level."""
    torch.manual_seed(1)
    names = ["0", "1", "2"]
    # level k holds boxes of side 112 * 2^k .. (the LevelMapper, strides 4, 8, 16)
    image_sizes = [(320, 384), (288, 352)]
    shapes = {"0": (80, 96), "1": (40, 48), "2": (20, 24)}
    levels = {k: torch.randn(2, 16, *shapes[k], requires_grad=True) for k in names}
    levels["pool"] = torch.randn(2, 16, 3, 4)  # not pooled from, as in the FPN's output
    g = torch.Generator().manual_seed(3)
    boxes = []
    for h, w in image_sizes:
        xy = torch.rand(40, 2, generator=g) * torch.tensor([w * 0.2, h * 0.2])
        side = torch.rand(40, 1, generator=g) * 280 + 4  # 4..284 px: levels 0, 1 and 2
        boxes.append(torch.cat([xy, torch.minimum(xy + side, torch.tensor([w, h]))], 1))
    ours = FastBackwardMultiScaleRoIAlign(names, output_size=7, sampling_ratio=1)
    reference = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=1)
    grad = torch.randn(80, 16, 7, 7)

    expected_out = reference(levels, boxes, image_sizes)
    expected_out.backward(grad)
    expected = {k: levels[k].grad for k in names}
    for k in names:
        levels[k].grad = None
    out = ours(levels, boxes, image_sizes)
    out.backward(grad)

    assert torch.equal(out, expected_out)
    level_of = ours.map_levels(boxes)
    assert set(level_of.tolist()) == {0, 1, 2}
    for k in names:
        assert torch.equal(levels[k].grad, expected[k]), k
        assert expected[k].abs().sum() > 0, k


def test_function_passes_no_gradient_to_the_boxes():
    features = torch.randn(1, 2, 8, 8, requires_grad=True)
    rois = torch.tensor([[0.0, 2.0, 2.0, 20.0, 20.0]], requires_grad=True)
    _RoIAlignFastBackward.apply(features, rois, 7, 0.25, 1).sum().backward()
    assert rois.grad is None and features.grad is not None
