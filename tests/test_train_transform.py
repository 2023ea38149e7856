"""The training pipeline against the authors' (RobustNet's) augmentation: Gaussian blur on every
image with σ in [0.15, 1.3], and a scaled mask that stays on the scaled image's pixels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from deft_lightning.data.transforms import train_transform


def only(transform_kwargs: dict, crop: tuple[int, int], scale: float = 1.0):
    """The training pipeline with every random step off except those in ``transform_kwargs``."""
    kwargs = dict(scale_range=(scale, scale), hflip_p=0.0, color_jitter_p=0.0, blur_p=0.0)
    return train_transform(crop, **(kwargs | transform_kwargs))


def test_every_image_is_blurred_with_sigma_between_0_15_and_1_3():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    mask = np.zeros((48, 48), np.uint8)
    transform = only({"blur_p": 1.0, "blur_sigma": (0.15, 1.3)}, (48, 48))
    transform.set_random_seed(0)

    def spread(x: np.ndarray) -> float:  # blurring noise lowers its spread, more with larger σ
        return float(x[8:-8, 8:-8].astype(np.float64).std())

    weakest = spread(cv2.GaussianBlur(image, (0, 0), 0.15))
    strongest = spread(cv2.GaussianBlur(image, (0, 0), 1.3))
    spreads = [spread(transform(image=image, mask=mask)["image"]) for _ in range(40)]
    assert all(strongest - 1.0 <= s <= weakest + 1.0 for s in spreads), (strongest, weakest, spreads)
    # p = 1: only σ under 0.29 (a 1-pixel kernel, ~12 % of draws) leaves an image sharp; p = 0.5 would leave ~56 %
    assert sum(s >= spread(image) - 1.0 for s in spreads) < 0.3 * len(spreads)
    assert max(spreads) - min(spreads) > 0.3 * (weakest - strongest)  # σ varies over the range


@pytest.mark.parametrize("scale", [0.75, 0.6, 1.5])
def test_scaled_mask_matches_nearest_neighbour_at_pixel_centres(scale: float):
    """OpenCV's INTER_NEAREST takes the source pixel under a target pixel's top-left corner (up
    to one source pixel up-left of the bilinear image); PIL's NEAREST (the authors') and
    INTER_NEAREST_EXACT take the one under its centre."""
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 19, (40, 60), dtype=np.uint8)
    image = np.zeros((40, 60, 3), np.uint8)
    height, width = round(40 * scale), round(60 * scale)
    scaled = only({}, (height, width), scale)(image=image, mask=mask)["mask"]
    expected = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
    assert scaled.shape == expected.shape
    assert np.array_equal(scaled, expected)
