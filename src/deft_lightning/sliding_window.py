"""Sliding-window inference: logits of overlapping windows, averaged where they overlap.

mmsegmentation's ``slide`` mode: windows of ``window = (h, w)`` placed every ``stride = (sh, sw)``
pixels, the last row and column of windows shifted back to end at the image's edge; each
pixel's logits are the mean over the windows that cover it. It bounds the memory of evaluating
full-resolution targets (Cityscapes' 2048x1024, Mapillary's 1536x1536) on a small GPU; the DG
protocol's default, and this library's, is whole-image inference. For a net whose output at a
pixel depends on a neighbourhood that stays inside every window covering it (e.g. a per-pixel
net), the result equals whole-image inference.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: every ``stride``, the last one ending at ``size``."""
    if window >= size:
        return [0]
    count = (size - window + stride - 1) // stride + 1
    return sorted({min(i * stride, size - window) for i in range(count)})


def check_windows(window: tuple[int, int], stride: tuple[int, int]) -> None:
    """Raise ``ValueError`` unless both are positive (height, width) and the stride fits the window."""
    (window_h, window_w), (stride_h, stride_w) = window, stride
    if min(window_h, window_w, stride_h, stride_w) <= 0:
        raise ValueError(f"window and stride must be positive, got window={window}, stride={stride}")
    if stride_h > window_h or stride_w > window_w:
        raise ValueError(f"stride {stride} larger than the window {window} would leave pixels uncovered")


def sliding_window_logits(net: Callable[[Tensor], Tensor], images: Tensor, window: tuple[int, int],
                          stride: tuple[int, int]) -> Tensor:
    """(N, C, H, W) logits of ``net`` over ``images`` (N, 3, H, W), window by window."""
    check_windows(window, stride)
    (window_h, window_w), (stride_h, stride_w) = window, stride
    height, width = images.shape[-2:]
    logits: Tensor | None = None
    count = torch.zeros((1, 1, height, width), device=images.device, dtype=torch.float32)
    for top in window_starts(height, window_h, stride_h):
        for left in window_starts(width, window_w, stride_w):
            bottom, right = min(top + window_h, height), min(left + window_w, width)
            out = net(images[..., top:bottom, left:right]).float()
            if logits is None:
                logits = torch.zeros((images.shape[0], out.shape[1], height, width), device=images.device,
                                     dtype=torch.float32)
            logits[..., top:bottom, left:right] += out
            count[..., top:bottom, left:right] += 1
    return logits / count
