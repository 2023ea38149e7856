"""Class-uniform sampling, RobustNet's recipe (docs/methods.md §1): a fraction of the training crops
is centred on a pixel of a uniformly drawn class, so rare classes (poles, lights, signs) are
seen far more often than their pixel share.

Each item of :class:`ClassUniformDataset` is, with probability ``pct``, replaced by: a class
``c`` drawn uniformly among the classes present in the training set, an image drawn uniformly
among those whose mask contains ``c``, and a crop centred on a pixel of ``c`` drawn uniformly
(:class:`~deft_lightning.data.transforms.ClassCentredCrop`, after the random scaling). Otherwise
the item is the base dataset's own, randomly cropped. Which images hold which classes is scanned
once from the masks (:func:`class_image_index`) and can be cached in a JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..atomic_io import atomic_write_bytes
from .labels import NUM_CLASSES


class _PresentClasses(Dataset):
    """Item i: a bool vector, which train ids occur in mask i (masks only; images not decoded)."""

    def __init__(self, dataset: Dataset, num_classes: int):
        self.dataset, self.num_classes = dataset, num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        present = np.zeros(self.num_classes, dtype=bool)
        mask = self.dataset.load_mask(index)
        if mask is not None:
            ids = np.unique(mask)
            present[ids[ids < self.num_classes]] = True
        return torch.from_numpy(present)


def dataset_identity(dataset: Dataset) -> list[str]:
    """What a cached class index was built from: the label files, or the synthetic scene range."""
    if hasattr(dataset, "pairs"):
        return [str(label) for _, label in dataset.pairs]
    if hasattr(dataset, "first_index"):
        return [f"synthetic domain={dataset.domain} seed={dataset.seed} size={list(dataset.size)} "
                f"scenes={dataset.first_index}..{dataset.first_index + len(dataset) - 1}"]
    raise TypeError(f"cannot cache a class index for {type(dataset).__name__}: no `pairs` or scene range")


def class_image_index(
    dataset: Dataset,
    num_classes: int = NUM_CLASSES,
    cache_file: str | Path | None = None,
    num_workers: int = 0,
    write_cache: bool = True,
) -> list[list[int]]:
    """For each train id ``c``, the indices of the images whose mask contains ``c``.

    ``dataset`` needs ``load_mask(index)``. With ``cache_file`` the index is read from that JSON
    file if it was built from the same images, else built and, with ``write_cache`` (DDP: rank 0
    only), written there (atomically, through a temporary of this process).
    """
    identity = dataset_identity(dataset) if cache_file is not None else None
    if cache_file is not None and Path(cache_file).exists():
        cached = json.loads(Path(cache_file).read_text())
        if cached.get("images") != identity or len(cached.get("class_images", [])) != num_classes:
            raise ValueError(f"class index cache {cache_file} was built for other images or classes "
                             f"({len(cached.get('images', []))} entries vs {len(identity)}); delete it to rebuild")
        return cached["class_images"]
    loader = DataLoader(_PresentClasses(dataset, num_classes), batch_size=64, num_workers=num_workers)
    present = torch.cat(list(loader)) if len(dataset) else torch.zeros(0, num_classes, dtype=torch.bool)
    class_images = [torch.nonzero(present[:, c]).flatten().tolist() for c in range(num_classes)]
    if cache_file is not None and write_cache:
        text = json.dumps({"images": identity, "class_images": class_images})
        atomic_write_bytes(cache_file, lambda file: file.write(text.encode()))
    return class_images


class ClassUniformDataset(Dataset):
    """``dataset`` with a fraction ``pct`` of its items replaced by class-centred crops.

    Args:
        dataset: the training set; needs ``sample(index, crop_class=...)`` and a transform
            that ends in a :class:`~deft_lightning.data.transforms.ClassCentredCrop`.
        class_images: :func:`class_image_index` of ``dataset``.
        pct: probability that an item is a class-uniform one (RobustNet: 0.5).
        seed: seed of the class/image draws (DataLoader workers reseed via ``set_random_seed``).
    """

    def __init__(self, dataset: Dataset, class_images: list[list[int]], pct: float, seed: int = 0):
        if not 0.0 <= pct <= 1.0:
            raise ValueError(f"class_uniform_pct must be in [0, 1], got {pct}")
        self.classes = [c for c, images in enumerate(class_images) if images]
        if not self.classes:
            raise ValueError("class-uniform sampling: no class occurs in any training mask")
        self.dataset, self.class_images, self.pct = dataset, class_images, pct
        self.set_random_seed(seed)

    def set_random_seed(self, seed: int) -> None:
        """Seed the class/image draws and the base dataset's transform."""
        self.rng = np.random.default_rng(seed)
        transform = getattr(self.dataset, "transform", None)
        if transform is not None and hasattr(transform, "set_random_seed"):
            transform.set_random_seed(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        if self.rng.random() >= self.pct:
            return self.dataset.sample(index)
        crop_class = self.classes[self.rng.integers(len(self.classes))]
        images = self.class_images[crop_class]
        return self.dataset.sample(images[self.rng.integers(len(images))], crop_class=crop_class)
