"""DGSegDataModule: one source training set, N named target sets for validation and test.

With no dataset configured it serves the embedded synthetic domains: training on
``synthetic_source``, a held-out split of the same domain (model selection on source data,
the safe default), and every other synthetic domain as a named target. Real datasets are
named by ``DatasetSpec`` entries (see docs/datasets.md).

Evaluation dataloaders come one per domain, in ``eval_domains`` order, so a task maps
dataloader index -> domain. Under DDP each evaluation set is split across ranks without
padding or repeats (Lightning's ``UnrepeatedDistributedSampler``), so the summed confusion
matrices are exactly those of a single process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset

from .class_uniform import ClassUniformDataset, class_image_index
from .datasets import build_dataset
from .resumable import ResumableDataLoader, ResumableSampler
from .synthetic import DOMAINS, SOURCE_DOMAIN, SyntheticDomainDataset
from .transforms import train_transform

#: The source domain's held-out synthetic images start at this index (training uses 0..N-1).
SYNTHETIC_VAL_FIRST_INDEX = 1_000_000


@dataclass
class DatasetSpec:
    """A dataset on disk: registry ``name`` (cityscapes, gtav, bdd100k, mapillary, synthia,
    acdc, folder), its ``root`` folder, ``split``, the ``domain`` name used in metric keys
    (default: the dataset's own, e.g. ``cityscapes`` or ``acdc-night``), and
    dataset-specific ``options`` (``size``, ``condition``, ``split_file``, ``mask_root``)."""

    name: str
    root: str
    split: str = "train"
    domain: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def _seed_worker(worker_id: int) -> None:
    """Lightning's worker seeding, plus the generators that ignore global seeds: albumentations'
    own, and the class-uniform draws."""
    pl_worker_init_function(worker_id)
    dataset = torch.utils.data.get_worker_info().dataset
    target = dataset if hasattr(dataset, "set_random_seed") else getattr(dataset, "transform", None)
    if target is not None and hasattr(target, "set_random_seed"):
        target.set_random_seed(torch.initial_seed() % 2**32)


class DGSegDataModule(LightningDataModule):
    """Source train set + named target evaluation sets.

    Args:
        source: training dataset; ``None`` uses the synthetic ``synthetic_source`` domain.
        source_val: held-out source split for model selection (synthetic: automatic).
        targets: target evaluation datasets; ``None`` uses the other synthetic domains.
        synthetic_source, synthetic_targets: synthetic domain names (targets default to all
            other domains).
        synthetic_train_size, synthetic_val_size: images per synthetic split.
        synthetic_image_size: (height, width) of synthetic images.
        seed: seed of the synthetic data (image ``i`` of domain ``d`` is a function of
            ``(seed, d, i)``) and of the augmentation generator.
        batch_size, eval_batch_size, num_workers: dataloader settings.
        crop_size, scale_range, hflip_p, color_jitter, color_jitter_p, blur_p: training
            augmentation (see :func:`~deft_lightning.data.transforms.train_transform`);
            ``augment=False`` turns it off.
        class_uniform_pct: fraction of training crops centred on a pixel of a uniformly drawn
            class (RobustNet's class-uniform sampling: 0.5; :mod:`~deft_lightning.data.class_uniform`).
            0 turns it off.
        class_index_cache: JSON file caching which training images hold which classes (the scan
            reads every mask once); ``None`` scans at every start.
        predict_root: a folder of images to predict on; ``None`` predicts on the first
            ``predict_per_domain`` images of every evaluation domain.
    """

    def __init__(
        self,
        source: DatasetSpec | None = None,
        source_val: DatasetSpec | None = None,
        targets: list[DatasetSpec] | None = None,
        synthetic_source: str = SOURCE_DOMAIN,
        synthetic_targets: list[str] | None = None,
        synthetic_train_size: int = 2000,
        synthetic_val_size: int = 64,
        synthetic_image_size: tuple[int, int] = (128, 256),
        seed: int = 0,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        augment: bool = True,
        crop_size: tuple[int, int] = (128, 256),
        scale_range: tuple[float, float] = (0.75, 1.5),
        hflip_p: float = 0.5,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        color_jitter_p: float = 0.5,
        blur_p: float = 0.5,
        class_uniform_pct: float = 0.0,
        class_index_cache: str | None = None,
        shuffle: bool = True,
        predict_root: str | None = None,
        predict_per_domain: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        unknown = [d for d in [synthetic_source, *(synthetic_targets or [])] if d not in DOMAINS]
        if unknown:
            raise ValueError(f"unknown synthetic domain(s) {unknown}; known: {list(DOMAINS)}")
        if not 0.0 <= class_uniform_pct <= 1.0:
            raise ValueError(f"class_uniform_pct must be in [0, 1], got {class_uniform_pct}")
        if class_uniform_pct > 0 and not augment:
            raise ValueError("class_uniform_pct > 0 needs augment=True: the training crop is what centres on the class")
        self.train_set: Dataset | None = None
        self.eval_sets: dict[str, Dataset] = {}
        self._source_val_domain: str | None = None
        self.predict_sets: list[Dataset] = []

    # ---- domains -----------------------------------------------------------------------
    @property
    def uses_synthetic_source(self) -> bool:
        return self.hparams.source is None

    @property
    def eval_domains(self) -> list[str]:
        """Evaluation domain names, in dataloader order: the source's held-out split (if any) first."""
        return list(self._eval_sets())

    @property
    def source_val_domain(self) -> str | None:
        """The held-out source domain among ``eval_domains`` (model selection), if any."""
        self._eval_sets()
        return self._source_val_domain

    # ---- datasets ----------------------------------------------------------------------
    def _synthetic(self, domain: str, length: int, first_index: int = 0, transform=None) -> Dataset:
        hp = self.hparams
        return SyntheticDomainDataset(domain, length, seed=hp.seed, size=tuple(hp.synthetic_image_size),
                                      first_index=first_index, transform=transform)

    @staticmethod
    def _from_spec(spec: DatasetSpec, transform=None) -> Dataset:
        return build_dataset(spec.name, spec.root, spec.split, domain=spec.domain,
                             transform=transform, **spec.options)

    def _augmentation_seed(self) -> int:
        """``seed`` plus the global rank: DDP ranks draw different crops and classes."""
        return self.hparams.seed + (self.trainer.global_rank if self.trainer is not None else 0)

    def _train_transform(self):
        hp = self.hparams
        if not hp.augment:
            return None
        transform = train_transform(tuple(hp.crop_size), tuple(hp.scale_range), hp.hflip_p,
                                    tuple(hp.color_jitter), hp.color_jitter_p, hp.blur_p)
        transform.set_random_seed(self._augmentation_seed())
        return transform

    def _eval_sets(self) -> dict[str, Dataset]:
        """Built once: {domain name: dataset}, the held-out source split first."""
        if self.eval_sets:
            return self.eval_sets
        hp = self.hparams
        sets: list[Dataset] = []
        if hp.source_val is not None:
            sets.append(self._from_spec(hp.source_val))
        elif self.uses_synthetic_source:
            sets.append(self._synthetic(hp.synthetic_source, hp.synthetic_val_size, SYNTHETIC_VAL_FIRST_INDEX))
        self._source_val_domain = sets[0].domain if sets else None
        if hp.targets is not None:
            sets += [self._from_spec(spec) for spec in hp.targets]
        else:
            targets = hp.synthetic_targets or [d for d in DOMAINS if d != hp.synthetic_source]
            sets += [self._synthetic(d, hp.synthetic_val_size, SYNTHETIC_VAL_FIRST_INDEX) for d in targets]
        names = [dataset.domain for dataset in sets]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation domain names must be unique, got {names}: set `domain` in the dataset entries")
        self.eval_sets = dict(zip(names, sets))
        return self.eval_sets

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == "fit" and self.train_set is None:
            transform = self._train_transform()
            train_set = (self._synthetic(hp.synthetic_source, hp.synthetic_train_size, 0, transform)
                         if self.uses_synthetic_source else self._from_spec(hp.source, transform))
            if hp.class_uniform_pct > 0:
                class_images = class_image_index(train_set, cache_file=hp.class_index_cache,
                                                 num_workers=hp.num_workers)
                train_set = ClassUniformDataset(train_set, class_images, hp.class_uniform_pct,
                                                seed=self._augmentation_seed())
            self.train_set = train_set
        if stage in ("fit", "validate", "test"):
            self._eval_sets()
        if stage == "predict" and not self.predict_sets:
            if hp.predict_root is not None:
                self.predict_sets = [build_dataset("folder", hp.predict_root, "", domain="predict")]
            else:
                count = hp.predict_per_domain
                self.predict_sets = [torch.utils.data.Subset(ds, range(min(count, len(ds))))
                                     for ds in self._eval_sets().values()]

    # ---- dataloaders -------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        if len(self.train_set) < hp.batch_size:
            raise ValueError(f"the training set has {len(self.train_set)} images, fewer than "
                             f"batch_size={hp.batch_size}")
        # Exact mid-epoch resume: order from (seed, epoch), per-sample augmentation seeds (data/resumable.py).
        trainer = self.trainer
        sampler = ResumableSampler(self.train_set, num_replicas=trainer.world_size if trainer else 1,
                                   rank=trainer.global_rank if trainer else 0, shuffle=hp.shuffle, seed=hp.seed)
        return ResumableDataLoader(self.train_set, sampler=sampler, batch_size=hp.batch_size, drop_last=True,
                                   num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0,
                                   worker_init_fn=_seed_worker if hp.num_workers > 0 else None)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        hp = self.hparams
        sampler = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size,
                                                   rank=trainer.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=hp.eval_batch_size, sampler=sampler, shuffle=False,
                          num_workers=hp.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(self.eval_sets[domain]) for domain in self.eval_domains]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(dataset) for dataset in self.predict_sets]
