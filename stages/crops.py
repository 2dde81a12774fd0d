"""Batched crop geometry for region embeddings: every proposal's 1x and 1.5x crop of one image,
made in one `torchvision.ops.roi_align` call straight at the teacher's input size.

The teacher's own (open_clip val) preprocess of a crop is: resize the shortest side to S, take
the centred S x S square, normalise with mean/std. That equals resampling the centred
(near-)square window of the crop that survives the centre crop straight to S x S, so that window
is what `roi_align` samples (`preprocess_windows` reproduces torchvision's integer rounding).
Its adaptive sampling (`sampling_ratio=-1`: ceil(side / S) samples per bin and axis, averaged)
makes downscaling average like an antialiased resize. Large windows are sampled from a 2x
box-filtered pyramid of the image (`pyramid_levels`): the same average for a fraction of the
samples.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align


def enlarge_boxes(boxes: Tensor, scale: float, width: int, height: int) -> Tensor:
    """Same centre, width and height times `scale`, clipped to the image.

    boxes: Tensor[N, 4] (x1, y1, x2, y2) in pixels -> Tensor[N, 4]
    """
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    half_w = (boxes[:, 2] - boxes[:, 0]) * (scale / 2)
    half_h = (boxes[:, 3] - boxes[:, 1]) * (scale / 2)
    out = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1)
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out


def pixel_boxes(boxes: Tensor) -> Tensor:
    """Round box edges to whole pixels, as `PIL.Image.crop` does, keeping at least 1 pixel.

    boxes: Tensor[N, 4] (x1, y1, x2, y2) -> Tensor[N, 4] float64 with integral values
    """
    b = boxes.double().round()  # half to even, like Python's round() in PIL
    x2 = torch.maximum(b[:, 2], b[:, 0] + 1)
    y2 = torch.maximum(b[:, 3], b[:, 1] + 1)
    return torch.stack([b[:, 0], b[:, 1], x2, y2], dim=1)


def preprocess_windows(boxes: Tensor, size: int) -> Tensor:
    """The part of each box that "resize the shortest side to `size`, centre-crop `size`"
    keeps, with torchvision's integer arithmetic (long side -> int(size * long / short),
    crop offset round((new_long - size) / 2)), in the box's pixel coordinates.

    boxes: Tensor[N, 4] (x1, y1, x2, y2) whole pixels -> Tensor[N, 4] float64 (may be
    slightly non-square: the long side is resampled by long / int(size * long / short))
    """
    b = boxes.double()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    short, long = torch.minimum(w, h), torch.maximum(w, h)
    new_long = torch.floor(size * long / short)
    step = long / new_long  # source pixels per resized pixel along the long side
    start = torch.round((new_long - size) / 2) * step
    span = size * step
    wide = w > h  # torchvision treats w == h as "w is the short side"
    x1 = torch.where(wide, b[:, 0] + start, b[:, 0])
    x2 = torch.where(wide, x1 + span, b[:, 2])
    y1 = torch.where(wide, b[:, 1], b[:, 1] + start)
    y2 = torch.where(wide, b[:, 3], y1 + span)
    return torch.stack([x1, y1, x2, y2], dim=1)


def pyramid_levels(windows: Tensor, size: int) -> Tensor:
    """The 2x-pyramid level each window is sampled from: the deepest whose pixels are still no
    larger than the window's output pixels (source pixels per output pixel, long side).

    Adaptive `roi_align` sampling costs ceil(step)^2 samples per output pixel for a window of
    `step` source pixels per output pixel; on the level-l box-filtered image it costs
    ceil(step / 2^l)^2 while averaging the same pixels, so large windows get cheap.

    windows: Tensor[N, 4] (x1, y1, x2, y2) -> Tensor[N] int64 >= 0
    """
    step = torch.maximum(windows[:, 2] - windows[:, 0], windows[:, 3] - windows[:, 1]) / size
    return torch.floor(torch.log2(step.clamp(min=1.0))).long()


def crop_boxes(image: Tensor, boxes: Tensor, size: int, mean: Sequence[float],
               std: Sequence[float]) -> Tensor:
    """Teacher-ready crops of `boxes`, as "PIL crop, then the teacher's own preprocess" makes
    them.

    image: Tensor[3, H, W] uint8 (or float in [0, 1]) on the compute device
    boxes: Tensor[N, 4] (x1, y1, x2, y2) in pixels of `image`
    returns: Tensor[N, 3, size, size] float32, normalised with mean / std
    """
    x = image.float() / 255 if image.dtype == torch.uint8 else image.float()
    windows = preprocess_windows(pixel_boxes(boxes), size).to(device=x.device,
                                                              dtype=torch.float32)
    levels = pyramid_levels(windows, size)
    crops = x.new_empty((len(windows), x.shape[0], size, size))
    level_image = x[None]
    for level in range(int(levels.max()) + 1 if len(levels) else 0):
        if level:
            # 2x2 box filter: partial edge blocks average only the pixels they hold
            level_image = F.avg_pool2d(level_image, 2, ceil_mode=True)
        at = (levels == level).nonzero().squeeze(1)
        if len(at):
            # aligned=True puts pixel i's centre at i + 0.5, as PIL's resize does; a level-l
            # pixel j is the block of source pixels [j 2^l, (j + 1) 2^l), centre (j + 0.5) 2^l.
            crops[at] = roi_align(level_image, [windows[at]], output_size=size,
                                  spatial_scale=0.5 ** level, sampling_ratio=-1, aligned=True)
    m = torch.tensor(mean, dtype=crops.dtype, device=crops.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=crops.dtype, device=crops.device).view(1, 3, 1, 1)
    return (crops - m) / s


def region_crops(image: Tensor, boxes: Tensor, size: int, mean: Sequence[float],
                 std: Sequence[float], scale: float = 1.5) -> Tensor:
    """The 1x crops of `boxes`, then their `scale`x crops, in one batched op.

    image: Tensor[3, H, W]; boxes: Tensor[N, 4] (x1, y1, x2, y2)
    returns: Tensor[2N, 3, size, size]; rows [0, N) are 1x, rows [N, 2N) are `scale`x
    """
    height, width = image.shape[-2:]
    boxes = boxes.to(device=image.device, dtype=torch.float32)
    both = torch.cat([boxes, enlarge_boxes(boxes, scale, width, height)])
    return crop_boxes(image, both, size, mean, std)


def combine_views(features: Tensor) -> Tensor:
    """Sum each box's 1x and 1.5x embedding, then L2-normalise.

    features: Tensor[2N, D] (1x rows first, as `region_crops` orders them) -> Tensor[N, D]
    """
    n = features.shape[0] // 2
    summed = features[:n].float() + features[n:].float()
    return torch.nn.functional.normalize(summed, dim=1)
