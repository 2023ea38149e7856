import time

import numpy as np
import pytest
import torch

from deft_lightning.data.labels import IGNORE_INDEX, NUM_CLASSES
from deft_lightning.data.sample import check_mask_ids
from deft_lightning.data.synthetic import DOMAINS, SOURCE_DOMAIN, SyntheticDomainDataset, render_scene


def test_domains_include_the_source():
    assert SOURCE_DOMAIN == "clear" and SOURCE_DOMAIN in DOMAINS
    assert len(DOMAINS) >= 5 and len(set(DOMAINS)) == len(DOMAINS)


@pytest.mark.parametrize("domain", DOMAINS)
def test_render_is_a_pure_function_of_seed_domain_index(domain):
    first_image, first_mask = render_scene(3, domain, 7)
    for other in (0, 1, 8):  # calls in between must not change the result
        render_scene(3, domain, other)
    image, mask = render_scene(3, domain, 7)
    np.testing.assert_array_equal(image, first_image)
    np.testing.assert_array_equal(mask, first_mask)


def test_index_and_seed_change_the_scene():
    base = render_scene(0, SOURCE_DOMAIN, 0)[1]
    assert not np.array_equal(base, render_scene(0, SOURCE_DOMAIN, 1)[1])
    assert not np.array_equal(base, render_scene(1, SOURCE_DOMAIN, 0)[1])


@pytest.mark.parametrize("index", [0, 1, 2])
def test_layout_is_shared_and_style_differs_across_domains(index):
    scenes = {domain: render_scene(0, domain, index) for domain in DOMAINS}
    source_image, source_mask = scenes[SOURCE_DOMAIN]
    for domain, (image, mask) in scenes.items():
        np.testing.assert_array_equal(mask, source_mask, err_msg=domain)
    for i, a in enumerate(DOMAINS):
        for b in DOMAINS[i + 1:]:
            difference = np.abs(scenes[a][0].astype(int) - scenes[b][0].astype(int)).mean()
            assert difference > 5, (a, b, difference)


def test_output_types_and_valid_ids():
    for index in range(4):
        image, mask = render_scene(0, "night", index)
        assert image.shape == (128, 256, 3) and image.dtype == np.uint8
        assert mask.shape == (128, 256) and mask.dtype == np.uint8
        check_mask_ids(mask, "synthetic")


def test_many_classes_appear():
    seen = set()
    for index in range(8):
        seen |= set(np.unique(render_scene(0, SOURCE_DOMAIN, index)[1]).tolist())
    seen.discard(IGNORE_INDEX)
    assert len(seen) >= 10, sorted(seen)


@pytest.mark.parametrize("size", [(32, 64), (96, 160), (256, 512)])
def test_any_size_divisible_by_32(size):
    for domain in DOMAINS:
        image, mask = render_scene(0, domain, 4, *size)
        assert image.shape == (*size, 3) and mask.shape == size
        check_mask_ids(mask, "synthetic")


def test_size_not_divisible_by_32_is_rejected():
    with pytest.raises(ValueError, match="multiples of 32"):
        render_scene(0, SOURCE_DOMAIN, 0, 100, 256)
    with pytest.raises(ValueError, match="multiples of 32"):
        SyntheticDomainDataset(SOURCE_DOMAIN, length=4, size=(128, 250))


def test_unknown_domain_lists_the_known_ones():
    with pytest.raises(ValueError, match="known domains: clear"):
        render_scene(0, "mars", 0)
    with pytest.raises(ValueError, match="fog"):
        SyntheticDomainDataset("mars", length=4)


def test_dataset_sample_format():
    data = SyntheticDomainDataset("fog", length=3, seed=2, size=(64, 128))
    assert len(data) == 3
    sample = data[1]
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 64, 128)
    assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (64, 128)
    assert int(sample["mask"].max()) < NUM_CLASSES
    assert sample["domain"] == "fog" and sample["name"] == "fog_000001"
    image, mask = render_scene(2, "fog", 1, 64, 128)
    np.testing.assert_array_equal(sample["mask"].numpy(), mask)
    np.testing.assert_allclose(sample["image"].permute(1, 2, 0).numpy() * 255, image, atol=1e-3)
    with pytest.raises(IndexError):
        data[3]


def test_first_index_offsets_the_scenes():
    shifted = SyntheticDomainDataset(SOURCE_DOMAIN, length=2, first_index=10)[1]
    plain = SyntheticDomainDataset(SOURCE_DOMAIN, length=12)[11]
    assert shifted["name"] == plain["name"] == "clear_000011"
    assert torch.equal(shifted["image"], plain["image"]) and torch.equal(shifted["mask"], plain["mask"])


def test_transform_is_applied():
    def flip(image, mask):
        return {"image": image[:, ::-1], "mask": mask[:, ::-1]}

    sample = SyntheticDomainDataset("snow", length=1, transform=flip)[0]
    np.testing.assert_array_equal(sample["mask"].numpy(), render_scene(0, "snow", 0)[1][:, ::-1])


def test_rendering_is_fast():
    # The target is a few ms per 128x256 image on one core; the bound leaves room for a busy machine.
    render_scene(0, SOURCE_DOMAIN, 0)
    started = time.perf_counter()
    for index in range(12):
        render_scene(0, DOMAINS[index % len(DOMAINS)], index)
    assert (time.perf_counter() - started) / 12 < 0.03
