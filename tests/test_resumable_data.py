"""The resumable training data (data/resumable.py) without a Trainer: order from (seed, epoch),
a mid-epoch start, per-sample draws independent of what was loaded before, and independent
streams for the transforms of one pipeline."""

import torch

from conftest import TINY_DATA
from deft_lightning import DGSegDataModule
from deft_lightning.data.resumable import (ResumableDataLoader, ResumableSampler, SampleKey, SeededSamples, _seed_transform,
                                           global_rng_state, set_global_rng_state)


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


class FakeCuda:
    """``count`` CUDA devices' generator states, this process drawing on ``current``."""

    def __init__(self, count, current, states):
        self.count, self.current, self.states = count, current, dict(enumerate(states))

    def _index(self, device):
        index = self.current if device == "cuda" else device
        if index >= self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        return index

    def install(self, monkeypatch):
        for name, value in {"is_available": lambda: True, "is_initialized": lambda: True,
                            "device_count": lambda: self.count, "current_device": lambda: self.current,
                            "get_rng_state": lambda device="cuda": self.states[self._index(device)].clone(),
                            "get_rng_state_all": lambda: [self.states[i].clone() for i in range(self.count)],
                            "set_rng_state": lambda state, device="cuda": self.states.__setitem__(self._index(device), state),
                            "set_rng_state_all": lambda states: [self.states.__setitem__(self._index(i), s)
                                                                 for i, s in enumerate(states)]}.items():
            monkeypatch.setattr(torch.cuda, name, value)


def test_a_ddp_rank_resumes_the_cuda_generator_of_its_own_device(monkeypatch):
    """Rank r draws on cuda:r; every rank loads the loader state rank 0 saved. Seeded and drawing
    alike, rank r's device is where rank 0's device is: rank 1 (and a resume on one GPU) must
    continue from rank 0's cuda:0 state, not from cuda:1 as rank 0 left it (never drawn on)."""
    seeded, advanced = torch.zeros(4, dtype=torch.uint8), torch.arange(4, dtype=torch.uint8)
    cpu = torch.get_rng_state()
    try:
        FakeCuda(2, 0, [advanced, seeded]).install(monkeypatch)  # rank 0 saves
        saved = global_rng_state()
        rank_1 = FakeCuda(2, 1, [seeded, seeded])
        rank_1.install(monkeypatch)
        set_global_rng_state(saved)
        assert torch.equal(rank_1.states[1], advanced)
        one_gpu = FakeCuda(1, 0, [seeded])  # resumed on a machine with one GPU
        one_gpu.install(monkeypatch)
        set_global_rng_state(saved)
        assert torch.equal(one_gpu.states[0], advanced)
    finally:
        torch.set_rng_state(cpu)


def test_a_resume_on_another_number_of_processes_skips_the_samples_every_rank_saw():
    """The ranks train on disjoint shards of one order: resumed on another world size, the
    epoch continues after the samples all ranks had seen, none skipped unseen."""
    order = [key.index for key in ResumableSampler(range(48), seed=5)]
    loaders = [ResumableDataLoader(range(48), batch_size=2, sampler=ResumableSampler(range(48), 2, r, seed=5))
               for r in range(2)]
    for loader in loaders:
        batches = iter(loader)
        for _ in range(3):  # 3 batches of 2 on each of 2 ranks: the first 12 samples of the order
            next(batches)
    state = loaders[0].state_dict()
    for world in (1, 3, 4):
        seen = []
        for rank in range(world):
            resumed = ResumableDataLoader(range(48), batch_size=2, sampler=ResumableSampler(range(48), world, rank, seed=5))
            resumed.load_state_dict(state)
            seen += [int(i) for batch in resumed for i in batch]
        assert sorted(seen) == sorted(order[12:]), world
