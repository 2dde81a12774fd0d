"""The student's multi-level RoIAlign: torchvision's, with a faster CPU backward.

torchvision's CPU `roi_align` backward is a scalar loop over rois x channels x bins that took a
quarter of a distillation step on 2 cores (BENCHMARKS lab log 50). Here the forward is
torchvision's own and the backward scatters whole channel rows with `index_add_`: the same
sample points and bilinear weights in torchvision's float32 arithmetic, added in torchvision's
order (roi, bin row, bin column, sample, corner) into each feature cell, so the gradient is
bit-identical (`tests/test_roi_pool.py`) and training is too. CUDA, reduced precision and
adaptive sampling (sampling_ratio <= 0) keep torchvision's backward.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def sample_points(rois: Tensor, height: int, width: int, output_size: int,
                  spatial_scale: float, sampling_ratio: int) -> tuple[Tensor, Tensor, Tensor]:
    """RoIAlign's bilinear sample points (aligned=False), computed as torchvision's CPU kernel.

    rois: Tensor[K, 5] (batch index, x1, y1, x2, y2) float32 in image pixels; the feature map
    is [B, C, height, width] at `spatial_scale`. With P = output_size, S = sampling_ratio:
    returns (weights Tensor[K, P, P, S, S, 4] of the corners (y_low, x_low), (y_low, x_high),
    (y_high, x_low), (y_high, x_high); cells Tensor[K, P, P, S, S, 4] int64, their rows in
    the features flattened to [B * height * width, C]; valid Tensor[K, P, P, S, S] bool, False
    where the point lies beyond the map by more than one cell and adds nothing).
    """
    dt = rois.dtype
    scale = torch.tensor(spatial_scale, dtype=dt)
    x1, y1 = rois[:, 1] * scale, rois[:, 2] * scale
    roi_w = (rois[:, 3] * scale - x1).clamp(min=1.0)
    roi_h = (rois[:, 4] * scale - y1).clamp(min=1.0)
    bin_w = roi_w / torch.tensor(float(output_size), dtype=dt)
    bin_h = roi_h / torch.tensor(float(output_size), dtype=dt)
    bins = torch.arange(output_size, dtype=dt)
    offsets = torch.arange(sampling_ratio, dtype=dt) + 0.5
    grid = torch.tensor(float(sampling_ratio), dtype=dt)
    # start + p * bin + (i + 0.5) * bin / S, in that order: [K, P, S]
    y = (y1[:, None, None] + bins[None, :, None] * bin_h[:, None, None]) + (
        offsets[None, None, :] * bin_h[:, None, None]) / grid
    x = (x1[:, None, None] + bins[None, :, None] * bin_w[:, None, None]) + (
        offsets[None, None, :] * bin_w[:, None, None]) / grid
    shape = (-1, output_size, output_size, sampling_ratio, sampling_ratio)
    y = y[:, :, None, :, None].expand(shape)
    x = x[:, None, :, None, :].expand(shape)
    valid = ~((y < -1.0) | (y > height) | (x < -1.0) | (x > width))
    y, x = y.clamp(min=0), x.clamp(min=0)
    y_low, x_low = y.long(), x.long()
    y_edge, x_edge = y_low >= height - 1, x_low >= width - 1
    y_low = torch.where(y_edge, height - 1, y_low)
    x_low = torch.where(x_edge, width - 1, x_low)
    y_high = torch.where(y_edge, y_low, y_low + 1)
    x_high = torch.where(x_edge, x_low, x_low + 1)
    ly = torch.where(y_edge, y_low.to(dt), y) - y_low.to(dt)
    lx = torch.where(x_edge, x_low.to(dt), x) - x_low.to(dt)
    hy, hx = 1.0 - ly, 1.0 - lx
    weights = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], dim=-1)
    row = rois[:, 0].long().view(-1, 1, 1, 1, 1) * (height * width)
    cells = torch.stack([row + y_low * width + x_low, row + y_low * width + x_high,
                         row + y_high * width + x_low, row + y_high * width + x_high], dim=-1)
    return weights, cells, valid


def roi_align_backward(grad: Tensor, rois: Tensor, feature_shape: torch.Size,
                       spatial_scale: float, sampling_ratio: int) -> Tensor:
    """The gradient of torchvision's roi_align (aligned=False) with respect to its features.

    grad: Tensor[K, C, P, P] float32; rois: Tensor[K, 5]; feature_shape: (B, C, H, W).
    Returns Tensor[B, C, H, W], equal bit for bit to torchvision's CPU backward.
    """
    n_images, channels, height, width = feature_shape
    k, _, p, _ = grad.shape
    weights, cells, valid = sample_points(rois, height, width, p, spatial_scale,
                                          sampling_ratio)
    rows = grad.permute(0, 2, 3, 1).contiguous().view(k, p, p, 1, 1, 1, channels)
    contrib = (rows * weights[..., None]).view(-1, channels)
    count = sampling_ratio * sampling_ratio
    if count != 1:
        contrib = contrib / float(count)
    cells = cells.reshape(-1)
    if not bool(valid.all()):
        keep = valid[..., None].expand(weights.shape).reshape(-1)
        cells, contrib = cells[keep], contrib[keep]
    out = torch.zeros(n_images * height * width, channels, dtype=grad.dtype)
    out.index_add_(0, cells, contrib)  # serial over cells' order: torchvision's sum order
    return out.view(n_images, height, width, channels).permute(0, 3, 1, 2).contiguous()


class _RoIAlignFastBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: Tensor, rois: Tensor, output_size: int, spatial_scale: float,
                sampling_ratio: int) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.args = (features.shape, spatial_scale, sampling_ratio)
        return tv_roi_align(features, rois, output_size, spatial_scale, sampling_ratio)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rois,) = ctx.saved_tensors
        return roi_align_backward(grad, rois, *ctx.args), None, None, None, None


def roi_align(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float,
              sampling_ratio: int) -> Tensor:
    """torchvision's roi_align (aligned=False); on the CPU in float32 with a fixed sampling
    ratio, with `roi_align_backward` as its backward.

    features: Tensor[B, C, H, W]; rois: Tensor[K, 5] (batch index, x1, y1, x2, y2).
    Returns Tensor[K, C, output_size, output_size].
    """
    if (features.device.type == "cpu" and features.dtype == torch.float32
            and rois.dtype == torch.float32 and sampling_ratio > 0
            and features.requires_grad and torch.is_grad_enabled()):
        return _RoIAlignFastBackward.apply(features, rois, output_size, spatial_scale,
                                           sampling_ratio)
    return tv_roi_align(features, rois, output_size, spatial_scale, sampling_ratio)


class FastBackwardMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (same levels, scales and outputs) pooling each level
    with `roi_align` above. Square outputs only (the student's 7 x 7)."""

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int):
        super().__init__(featmap_names, output_size, sampling_ratio)
        if self.output_size[0] != self.output_size[1]:
            raise ValueError(f"square RoIAlign outputs only, got {self.output_size}")

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        """x: the FPN levels {name: Tensor[B, C, H_l, W_l]}; boxes: per image Tensor[K_i, 4]
        (x1, y1, x2, y2) in image pixels; image_shapes: per image (height, width).
        Returns Tensor[sum K_i, C, P, P]."""
        levels = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                levels, image_shapes, self.canonical_scale, self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        size = self.output_size[0]
        if len(levels) == 1:
            return roi_align(levels[0], rois, size, self.scales[0], self.sampling_ratio)
        level_of = self.map_levels(boxes)
        first = levels[0]
        result = torch.zeros((len(rois), first.shape[1], size, size), dtype=first.dtype,
                             device=first.device)
        for level, (features, scale) in enumerate(zip(levels, self.scales)):
            idx = torch.where(level_of == level)[0]
            result[idx] = roi_align(features, rois[idx], size, scale,
                                    self.sampling_ratio).to(result.dtype)
        return result
