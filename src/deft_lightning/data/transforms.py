"""Albumentations pipelines for training (the RobustNet/DeFT recipe) and evaluation.

Training: random scale, pad (image 0, mask 255) and random crop, horizontal flip, colour
jitter (brightness, contrast, saturation, hue) with probability ``color_jitter_p``, and
Gaussian blur. Evaluation: none (whole image at native resolution).
"""

from __future__ import annotations

import albumentations as A
import cv2

from .labels import IGNORE_INDEX


def train_transform(
    crop_size: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip_p: float = 0.5,
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
    color_jitter_p: float = 0.5,
    blur_p: float = 0.5,
) -> A.Compose:
    """The training pipeline; ``crop_size`` is (height, width)."""
    height, width = crop_size
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    brightness, contrast, saturation, hue = color_jitter
    return A.Compose(
        [
            A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=cv2.INTER_LINEAR,
                          mask_interpolation=cv2.INTER_NEAREST, p=1.0),
            A.PadIfNeeded(min_height=height, min_width=width, border_mode=cv2.BORDER_CONSTANT,
                          fill=0, fill_mask=IGNORE_INDEX),
            A.RandomCrop(height, width),
            A.HorizontalFlip(p=hflip_p),
            A.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                          p=color_jitter_p),
            A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.1, 2.0), p=blur_p),
        ]
    )
