"""The resumable training data (data/resumable.py) without a Trainer: order from (seed, epoch),
a mid-epoch start, per-sample draws independent of what was loaded before, and independent
streams for the transforms of one pipeline."""

import torch

from conftest import TINY_DATA
from deft_lightning import DGSegDataModule
from deft_lightning.data.resumable import ResumableSampler, SampleKey, SeededSamples, _seed_transform


def test_order_depends_on_seed_and_epoch_and_a_resumed_epoch_skips_what_was_seen():
    sampler = ResumableSampler(range(20), seed=3)
    sampler.set_epoch(1)
    epoch_1 = list(sampler)
    assert list(sampler) == epoch_1 and sorted(k.index for k in epoch_1) == list(range(20))
    sampler.set_epoch(2)
    assert list(sampler) != epoch_1
    resumed = ResumableSampler(range(20), seed=3)
    resumed.start_at(1, 8)
    assert list(resumed) == epoch_1[8:]
    assert len(list(resumed)) == 20  # the skip applies once


def augmented_train_set():
    datamodule = DGSegDataModule(**dict(TINY_DATA, augment=True, synthetic_train_size=64))
    datamodule.setup("fit")
    return datamodule.train_set


def test_a_sample_is_the_same_whatever_was_loaded_before_it():
    samples = SeededSamples(augmented_train_set())
    key = SampleKey(5, 1234)
    alone = samples[key]["image"]
    for other in range(10):
        samples[SampleKey(other, other)]
    assert torch.equal(samples[key]["image"], alone)
    assert not torch.equal(samples[SampleKey(5, 4321)]["image"], alone)


def test_each_transform_draws_from_its_own_stream():
    """albumentations seeds every transform of a Compose alike: reseeded per sample, the flip
    and colour-jitter decisions (both p = 0.5) would always agree. Here they agree about half the time."""
    transform = augmented_train_set().transform
    flip, jitter = (next(t for t in transform.transforms if type(t).__name__ == name)
                    for name in ("HorizontalFlip", "ColorJitter"))
    transform.set_random_seed(0)
    assert flip.py_random.random() == jitter.py_random.random()  # albumentations' own seeding
    agree = 0
    for seed in range(200):
        _seed_transform(transform, seed)
        agree += (flip.py_random.random() < 0.5) == (jitter.py_random.random() < 0.5)
    assert 60 < agree < 140, agree
