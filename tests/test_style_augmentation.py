"""LAB style augmentation: colour conversions, batch doubling, restyled channel statistics."""

import pytest
import torch

from deft_lightning.data.transforms import lab_style_augmentation, lab_to_rgb, restyle_lab, rgb_to_lab


def test_rgb_lab_rgb_round_trip_is_identity():
    rgb = torch.rand(4, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    rgb[0, :, 0, :3] = torch.tensor([[0.0, 1.0, 0.5]])  # black, white, grey pixels included
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=2e-5, rtol=0)


def test_lab_of_known_colours():
    white_black_red = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).view(1, 3, 1, 3)
    lab = rgb_to_lab(white_black_red)[0, :, 0].T
    torch.testing.assert_close(lab[0], torch.tensor([100.0, 0.0, 0.0]), atol=1e-2, rtol=0)
    torch.testing.assert_close(lab[1], torch.tensor([0.0, 0.0, 0.0]), atol=1e-2, rtol=0)
    torch.testing.assert_close(lab[2], torch.tensor([53.24, 80.09, 67.20]), atol=5e-2, rtol=0)


def test_batch_is_doubled_with_labels_duplicated():
    images = torch.rand(3, 3, 32, 32)
    masks = torch.randint(0, 19, (3, 32, 32))
    out_images, out_masks = lab_style_augmentation(images, masks, generator=torch.Generator().manual_seed(1))
    assert out_images.shape == (6, 3, 32, 32) and out_masks.shape == (6, 32, 32)
    assert torch.equal(out_images[:3], images)
    assert torch.equal(out_masks[:3], masks) and torch.equal(out_masks[3:], masks)
    assert out_images.min() >= 0 and out_images.max() <= 1
    assert (out_images[3:] - images).abs().mean() > 0.05  # restyled, not a copy


def test_restyled_lab_channels_have_the_drawn_statistics():
    lab01 = (rgb_to_lab(torch.rand(256, 3, 16, 16)) + torch.tensor([0.0, 128, 128]).view(1, 3, 1, 1)) / torch.tensor(
        [100.0, 255, 255]).view(1, 3, 1, 1)
    out = restyle_lab(lab01, (0.2, 0.8), (0.1, 0.4), generator=torch.Generator().manual_seed(2))
    means, stds = out.mean(dim=(-2, -1)), out.std(dim=(-2, -1))
    assert means.min() >= 0.2 - 1e-5 and means.max() <= 0.8 + 1e-5
    assert stds.min() >= 0.1 - 1e-4 and stds.max() <= 0.4 + 1e-4
    # Drawn uniformly per image and channel: the 768 draws fill both ranges.
    assert means.min() < 0.22 and means.max() > 0.78 and stds.min() < 0.11 and stds.max() > 0.39
    assert means.mean().item() == pytest.approx(0.5, abs=0.03)


def test_runs_in_float32_under_bf16_autocast():
    images = torch.rand(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = lab_style_augmentation(images, torch.zeros(2, 8, 8, dtype=torch.long))
    assert out.dtype == torch.float32 and torch.equal(out[:2], images)


def test_lab_to_rgb_clamps_fz_at_zero_as_kornia():
    """kornia's lab_to_rgb clamps f_z = (L + 16)/116 − b/200 at 0: at L = 0, a = 0 every b beyond
    200 · 16/116 gives the colour of f_z = 0, i.e. Z = −(4/29)/7.787 · Z_n (R the only channel > 0)."""
    lab = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [127.0, 60.0, 200 * 16 / 116]]).view(1, 3, 1, 3)
    rgb = lab_to_rgb(lab)[0, :, 0].T
    red = 1.055 * (0.4985363261688878 * 1.08883 * (4 / 29) / 7.787) ** (1 / 2.4) - 0.055
    for pixel in rgb:
        torch.testing.assert_close(pixel, torch.tensor([red, 0.0, 0.0]), atol=1e-5, rtol=0)
