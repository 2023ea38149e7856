"""Class-uniform sampling: the class-centred crop, the class index, and the draws."""

import multiprocessing
import os
from collections import Counter
from types import SimpleNamespace

import albumentations as A
import numpy as np
import pytest

from deft_lightning import DGSegDataModule
from deft_lightning.data.class_uniform import ClassUniformDataset, class_image_index
from deft_lightning.data.synthetic import SyntheticDomainDataset
from deft_lightning.data.transforms import ClassCentredCrop


def test_crop_is_centred_on_a_pixel_of_the_class():
    mask = np.zeros((64, 64), np.uint8)
    pixels = [(10, 50), (40, 20), (33, 33)]
    for y, x in pixels:
        mask[y, x] = 5
    image = np.zeros((64, 64, 3), np.uint8)
    crop = ClassCentredCrop(16, 16)
    centres = set()
    for seed in range(30):
        crop.set_random_seed(seed)
        out = A.Compose([crop])(image=image, mask=mask, crop_class=5)["mask"]
        assert out.shape == (16, 16) and out[8, 8] == 5  # the drawn pixel sits at the crop centre
        centres.add(tuple(np.argwhere(out == 5)[0]))
    assert len(centres) == 1
    # near a border the crop is clamped inside the image and still holds the pixel
    mask[:] = 0
    mask[2, 62] = 5
    out = A.Compose([crop])(image=image, mask=mask, crop_class=5)["mask"]
    assert out[2, 14] == 5


def test_without_a_class_it_is_random_crop_with_the_same_draws():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)
    mask = rng.integers(0, 19, (48, 80), dtype=np.uint8)
    ours, theirs = A.Compose([ClassCentredCrop(16, 24)]), A.Compose([A.RandomCrop(16, 24)])
    ours.set_random_seed(3)
    theirs.set_random_seed(3)
    for _ in range(20):
        a, b = ours(image=image, mask=mask), theirs(image=image, mask=mask)
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    # a class absent from the mask falls back to the random crop too
    assert ours(image=image, mask=mask, crop_class=250)["mask"].shape == (16, 24)


def test_class_index_lists_the_images_holding_each_class(tmp_path):
    dataset = SyntheticDomainDataset("clear", 12, size=(64, 128))
    index = class_image_index(dataset)
    for c, images in enumerate(index):
        assert images == [i for i in range(12) if (dataset.load_mask(i) == c).any()]
    assert any(index) and not all(len(images) == 12 for images in index)
    cache = tmp_path / "index.json"
    assert class_image_index(dataset, cache_file=cache) == index
    assert class_image_index(dataset, cache_file=cache) == index  # read back
    with pytest.raises(ValueError, match="index.json"):
        class_image_index(SyntheticDomainDataset("clear", 13, size=(64, 128)), cache_file=cache)


class RecordingDataset:
    """Stands in for a training set: records which item and class each draw asked for."""

    transform = None

    def __init__(self, length: int):
        self.length, self.calls = length, []

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int, crop_class: int | None = None) -> dict:
        self.calls.append((index, crop_class))
        return {}


def test_draws_are_uniform_over_classes_then_images():
    base = RecordingDataset(100)
    class_images = [list(range(100)), [7], [], list(range(0, 100, 2))] + [[]] * 15  # class 2 absent
    dataset = ClassUniformDataset(base, class_images, pct=0.5, seed=0)
    draws = 6000
    for i in range(draws):
        dataset[i % 100]
    centred = [(index, c) for index, c in base.calls if c is not None]
    assert abs(len(centred) / draws - 0.5) < 0.03
    per_class = Counter(c for _, c in centred)
    assert set(per_class) == {0, 1, 3}  # never a class no image holds
    for c in per_class:
        assert abs(per_class[c] / len(centred) - 1 / 3) < 0.04  # uniform over classes, not pixels
    assert all(index in class_images[c] for index, c in centred)
    plain = [index for index, c in base.calls if c is None]
    assert plain == [i % 100 for i, (_, c) in enumerate(base.calls) if c is None]  # the asked item


def test_datamodule_wraps_the_training_set_and_rejects_bad_settings():
    datamodule = DGSegDataModule(class_uniform_pct=0.5, synthetic_train_size=16, synthetic_image_size=(64, 128),
                                 crop_size=(32, 64), batch_size=4)
    datamodule.setup("fit")
    assert isinstance(datamodule.train_set, ClassUniformDataset)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 64) and batch["mask"].shape == (4, 32, 64)
    with pytest.raises(ValueError, match="class_uniform_pct"):
        DGSegDataModule(class_uniform_pct=1.5)
    with pytest.raises(ValueError, match="augment=True"):
        DGSegDataModule(class_uniform_pct=0.5, augment=False)


def _build_index_in_step(cache, barrier, errors) -> None:
    """One "DDP rank" building the cached index: every rank writes its file, then all rename."""
    real_replace = os.replace

    def replace_after_everyone_wrote(source, target):
        barrier.wait(timeout=60)
        real_replace(source, target)

    os.replace = replace_after_everyone_wrote
    try:
        class_image_index(SyntheticDomainDataset("clear", 3, size=(32, 64)), cache_file=cache)
    except Exception as error:  # noqa: BLE001 - reported to the parent
        errors.put(repr(error))


def test_ranks_building_the_class_index_cache_at_once_do_not_collide(tmp_path):
    """Every DDP rank runs the datamodule's setup and scans the masks at the same time: the
    ranks' writes of the cache file must not share one temporary (a rank then found it renamed
    away by another: FileNotFoundError)."""
    context = multiprocessing.get_context("fork")
    barrier, errors, cache = context.Barrier(2), context.Queue(), tmp_path / "index.json"
    ranks = [context.Process(target=_build_index_in_step, args=(cache, barrier, errors)) for _ in range(2)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=120)
    assert [rank.exitcode for rank in ranks] == [0, 0]
    assert errors.empty(), errors.get()
    assert class_image_index(SyntheticDomainDataset("clear", 3, size=(32, 64)), cache_file=cache)
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_only_ddp_rank_0_writes_the_class_index_cache(tmp_path):
    """Every rank scans the masks when there is no cache yet; only rank 0 writes it (a writer on
    another node could take the others' temporaries for a dead process's and delete them)."""
    cache = tmp_path / "index.json"
    for rank in (1, 0):
        datamodule = DGSegDataModule(synthetic_train_size=4, synthetic_image_size=(32, 64), crop_size=(32, 64),
                                     class_uniform_pct=0.5, class_index_cache=str(cache))
        datamodule.trainer = SimpleNamespace(global_rank=rank)
        datamodule.setup("fit")
        assert cache.exists() == (rank == 0)
