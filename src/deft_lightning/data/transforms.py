"""Albumentations pipelines for training (the RobustNet/DeFT recipe) and evaluation.

Training: random scale, pad (image 0, mask 255) and random crop, horizontal flip, colour
jitter (brightness, contrast, saturation, hue) with probability ``color_jitter_p``, and
Gaussian blur (RobustNet's ``RandomGaussianBlur``, which the DeFT authors train with: every
image, σ uniform in [0.15, 1.3]). The crop is a :class:`ClassCentredCrop`: random, or centred on a pixel of the
class given as ``crop_class`` (class-uniform sampling, data/class_uniform.py). Evaluation: none
(whole image at native resolution).

Batch-level, in torch: :func:`lab_style_augmentation`, DeFT's LAB restyling (any task turns it
on with ``style_augmentation=True``).
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from .labels import IGNORE_INDEX


class ClassCentredCrop(A.RandomCrop):
    """``RandomCrop`` that, given ``crop_class=c`` with the data, centres the crop on a pixel of
    class ``c`` drawn uniformly from the mask (clamped to stay inside the image), as RobustNet's
    class-uniform crops do. Without ``crop_class`` (or if ``c`` is absent after scaling) it is
    exactly ``RandomCrop``, drawing the same random numbers."""

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        crop_class = data.get("crop_class")
        if crop_class is None:
            return super().get_params_dependent_on_data(params, data)
        ys, xs = np.nonzero(data["mask"] == crop_class)
        if ys.size == 0:
            return super().get_params_dependent_on_data(params, data)
        height, width = params["shape"][:2]
        if self.height > height or self.width > width:
            raise ValueError(f"crop {self.height}x{self.width} exceeds the image {height}x{width}: pad first")
        k = int(self.random_generator.integers(ys.size))
        y_min = min(max(int(ys[k]) - self.height // 2, 0), height - self.height)
        x_min = min(max(int(xs[k]) - self.width // 2, 0), width - self.width)
        return {"crop_coords": (x_min, y_min, x_min + self.width, y_min + self.height), "pad_params": None}


def train_transform(
    crop_size: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip_p: float = 0.5,
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
    color_jitter_p: float = 0.5,
    blur_p: float = 1.0,
    blur_sigma: tuple[float, float] = (0.15, 1.3),
) -> A.Compose:
    """The training pipeline; ``crop_size`` is (height, width). The blur's kernel is sized from
    its σ (radius ⌊3.5σ⌋, as PIL; the authors' skimage filter truncates at 4σ, a difference
    below 0.1 % of the kernel's weight)."""
    height, width = crop_size
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    brightness, contrast, saturation, hue = color_jitter
    return A.Compose(
        [
            A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=cv2.INTER_LINEAR,
                          mask_interpolation=cv2.INTER_NEAREST_EXACT, p=1.0),
            A.PadIfNeeded(min_height=height, min_width=width, border_mode=cv2.BORDER_CONSTANT,
                          fill=0, fill_mask=IGNORE_INDEX),
            ClassCentredCrop(height, width),
            A.HorizontalFlip(p=hflip_p),
            A.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                          p=color_jitter_p),
            A.GaussianBlur(blur_limit=0, sigma_limit=blur_sigma, p=blur_p),
        ]
    )


# ---- LAB style augmentation (DeFT's ``SimpleAugLAB``), a batch transform in torch -------------
# sRGB (D65) <-> CIE LAB, the constants kornia uses. LAB is scaled to [0, 1] per channel for the
# restyling: L / 100, (a + 128) / 255, (b + 128) / 255, as in the DeFT authors' code.
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
               (0.212671, 0.715160, 0.072169),
               (0.019334, 0.119193, 0.950227))
_XYZ_TO_RGB = ((3.2404813432005266, -1.5371515162713185, -0.4985363261688878),
               (-0.9692549499965682, 1.8759900014898907, 0.0415559265582928),
               (0.0556466391351772, -0.2040413383665112, 1.0573110696453443))
_D65_WHITE = (0.95047, 1.0, 1.08883)
_LAB_SHIFT = (0.0, 128.0, 128.0)
_LAB_SCALE = (100.0, 255.0, 255.0)


def _per_channel(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)


def _mix_channels(matrix, images: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", torch.tensor(matrix, dtype=images.dtype, device=images.device), images)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> CIE LAB (L in [0, 100], a and b roughly in [-128, 127])."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).pow(2.4), rgb / 12.92)
    xyz = _mix_channels(_RGB_TO_XYZ, linear) / _per_channel(_D65_WHITE, rgb)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856).pow(1 / 3), 7.787 * xyz + 4 / 29)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE LAB -> sRGB, clipped to [0, 1] (colours outside the sRGB gamut are clipped).

    As kornia's ``lab_to_rgb`` (the authors' conversion), ``f_z = f_y − b/200`` is clamped at 0
    first: a large ``b`` at a low ``L`` (frequent after restyling) would give a negative Z."""
    lightness, a, b = lab.unbind(1)
    fy = (lightness + 16) / 116
    f = torch.stack([a / 500 + fy, fy, (fy - b / 200).clamp(min=0.0)], dim=1)
    xyz = torch.where(f > 6 / 29, f.pow(3), (f - 4 / 29) / 7.787) * _per_channel(_D65_WHITE, lab)
    linear = _mix_channels(_XYZ_TO_RGB, xyz)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp(min=0.0031308).pow(1 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0.0, 1.0)


def restyle_lab(
    lab01: torch.Tensor,
    mean_range: tuple[float, float] = (0.2, 0.8),
    std_range: tuple[float, float] = (0.1, 0.4),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Re-standardise every channel of every image (LAB scaled to [0, 1]) to a random mean and std:

        x' = σ' (x − μ) / (σ + 1e-7) + μ',   μ' ~ U(mean_range),  σ' ~ U(std_range)

    with μ, σ the image's own channel mean and (unbiased) std over its pixels.
    """
    mean = lab01.mean(dim=(-2, -1), keepdim=True)
    std = lab01.std(dim=(-2, -1), keepdim=True) + 1e-7
    shape, options = mean.shape, {"dtype": lab01.dtype, "device": lab01.device, "generator": generator}
    new_mean = mean_range[0] + (mean_range[1] - mean_range[0]) * torch.rand(shape, **options)
    new_std = std_range[0] + (std_range[1] - std_range[0]) * torch.rand(shape, **options)
    return new_std * (lab01 - mean) / std + new_mean


def lab_style_augmentation(
    images: torch.Tensor,
    masks: torch.Tensor,
    mean_range: tuple[float, float] = (0.2, 0.8),
    std_range: tuple[float, float] = (0.1, 0.4),
    noise_std: float = 0.01,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeFT's batch-level LAB restyling: returns ``(cat[images, restyled], cat[masks, masks])``.

    Each image (RGB in [0, 1]) goes RGB -> LAB scaled to [0, 1], gets every channel
    re-standardised (:func:`restyle_lab`), Gaussian noise ``N(0, noise_std²)``, a clamp to
    [0, 1], and goes back to RGB. Runs in float32 with autocast off, on the batch's device;
    random numbers come from ``generator`` (default: the global generator of that device).
    """
    with torch.autocast(images.device.type, enabled=False):
        rgb = images.float()
        shift, scale = _per_channel(_LAB_SHIFT, rgb), _per_channel(_LAB_SCALE, rgb)
        lab01 = (rgb_to_lab(rgb) + shift) / scale
        lab01 = restyle_lab(lab01, mean_range, std_range, generator)
        noise = torch.randn(lab01.shape, dtype=lab01.dtype, device=lab01.device, generator=generator)
        lab01 = (lab01 + noise_std * noise).clamp(0.0, 1.0)
        restyled = lab_to_rgb(lab01 * scale - shift).to(images.dtype)
    return torch.cat([images, restyled]), torch.cat([masks, masks])
