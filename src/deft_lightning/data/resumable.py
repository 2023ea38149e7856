"""A training dataloader that resumes mid-epoch exactly.

Lightning checkpoints the state of any training dataloader that has ``state_dict`` /
``load_state_dict`` (its "stateful" loaders) and restores it before the first batch of a
resumed run. :class:`ResumableDataLoader` uses that to make a run killed at any step and
resumed from its checkpoint continue exactly as the uninterrupted run would have:

* **order**: :class:`ResumableSampler` draws the epoch's order from ``(seed, epoch)`` only
  (a ``DistributedSampler``, so each DDP rank takes its own shard) and starts a resumed epoch
  after the batches already trained on;
* **augmentation**: every sample's random draws (crop, flip, jitter, blur, class-uniform
  choice) are seeded from ``(seed, epoch, index)`` (:class:`SeededSamples`), so they depend
  neither on what came before nor on the worker that loads it; each transform of an
  albumentations pipeline gets its own stream (albumentations seeds them all alike);
* **global RNG**: the loader's state also carries the global torch (CPU and CUDA), numpy and
  ``random`` generators, restored right before the resumed epoch continues; the training step
  draws from them (DeFT's LAB style augmentation, dropout).

The loader's own ``generator`` seeds worker processes, so creating an iterator draws nothing
from the global generator.
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class SampleKey(NamedTuple):
    """What the sampler hands the dataset: the index and the seed of its random draws."""

    index: int
    seed: int


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class ResumableSampler(DistributedSampler):
    """The epoch's order from ``(seed, epoch)``; yields :class:`SampleKey`; can start mid-epoch.

    Args:
        dataset: the training set.
        num_replicas, rank: DDP world size and this process's rank (1 and 0 alone).
        shuffle: a permutation per epoch (else dataset order).
        seed: seed of the order and of every sample's draws.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._resume: tuple[int, int] | None = None  # (epoch, samples already seen)

    def start_at(self, epoch: int, samples: int) -> None:
        """The next iteration is epoch ``epoch`` from its ``samples``-th sample on."""
        self.set_epoch(epoch)
        self._resume = (epoch, samples)

    def pending_offset(self) -> int:
        """Samples the next iteration skips (0 unless resuming this epoch)."""
        return self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0

    def __iter__(self):
        offset = self.pending_offset()
        self._resume = None
        indices = list(super().__iter__())
        return iter([SampleKey(index, sample_seed(self.seed, self.epoch, index)) for index in indices[offset:]])


def _seed_transform(transform: Any, seed: int) -> None:
    """Seed an albumentations pipeline with one independent stream per transform."""
    transform.set_random_seed(seed)
    children = [child for child in getattr(transform, "transforms", None) or [] if hasattr(child, "set_random_seed")]
    if children:
        for child, child_seed in zip(children, np.random.SeedSequence(seed).generate_state(len(children))):
            _seed_transform(child, int(child_seed))


class SeededSamples(Dataset):
    """``dataset`` indexed by :class:`SampleKey`: item ``(i, s)`` is ``dataset[i]`` with every
    random draw seeded from ``s`` (the dataset's ``set_random_seed``, e.g. class-uniform
    sampling, and its transform's). A plain index gives ``dataset[i]`` as it is."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey | int) -> Any:
        if not isinstance(key, tuple):  # a plain index (code that iterates ``loader.dataset``): unseeded
            return self.dataset[key]
        index, seed = key
        if hasattr(self.dataset, "set_random_seed"):
            self.dataset.set_random_seed(seed)
        base = getattr(self.dataset, "dataset", self.dataset)
        transform = getattr(base, "transform", None)
        if transform is not None and hasattr(transform, "set_random_seed"):
            _seed_transform(transform, seed)
        return self.dataset[index]


def global_rng_state() -> dict[str, Any]:
    """The global torch (CPU, and this process's CUDA device if in use), numpy and ``random``
    states, as plain data and tensors (weights-only loadable)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)],
             "python": [version, list(internal), python_gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device only: DDP rank r draws on device r, and every rank restores the
        # state rank 0 saved (its ranks are seeded and draw alike) onto its own device.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, python_gauss = state["python"]
    random.setstate((version, tuple(internal), python_gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, list):  # saved with every device's state (older checkpoints)
            cuda = cuda[torch.cuda.current_device()]
        torch.cuda.set_rng_state(cuda)


class ResumableDataLoader(DataLoader):
    """A training DataLoader over a :class:`ResumableSampler` that Lightning checkpoints and
    restores mid-epoch (see the module docstring). Takes DataLoader's arguments; ``dataset`` is
    the plain training set (wrapped in :class:`SeededSamples` here)."""

    def __init__(self, dataset: Dataset, *, sampler: ResumableSampler, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        super().__init__(SeededSamples(dataset), sampler=sampler, **kwargs)
        self.batches_done = 0  # in the current epoch

    def __iter__(self):
        self.batches_done = self.sampler.pending_offset() // self.batch_size
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.sampler.epoch, "batches": self.batches_done, "replicas": self.sampler.num_replicas,
                "rng": global_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, replicas = state["epoch"], state.get("replicas", self.sampler.num_replicas)
        # The ranks saw the first batches·batch_size·replicas samples of the epoch's order between
        # them: resumed on another number of processes, each skips its share of those.
        samples = state["batches"] * self.batch_size * replicas // self.sampler.num_replicas
        if samples // self.batch_size >= len(self):  # saved at the end of the epoch: the next one starts afresh
            epoch, samples = epoch + 1, 0
        self.sampler.start_at(epoch, samples)
        set_global_rng_state(state["rng"])
