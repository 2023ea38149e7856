"""DGSegDataModule: one source training set, N named target sets for validation and test.

Data is named by ``DatasetSpec`` entries (``source``, ``source_val``, ``targets``; see
docs/datasets.md), given as dataclasses, as dicts, or in YAML/on the command line. The embedded
synthetic domains are entries too (``{name: synthetic, domain: fog, split: val}``). With no
entry at all the datamodule serves the synthetic default: training on ``synthetic_source``, a
held-out split of the same domain (model selection on source data, the safe default), and
every other synthetic domain as a named target; the ``synthetic_*`` arguments size those
default entries. A real ``source`` must name its ``targets``: the synthetic domains are never
silently added to a real protocol.

Evaluation dataloaders come one per domain, in ``eval_domains`` order, so a task maps
dataloader index -> domain. Under DDP each evaluation set is split across ranks without
padding or repeats (Lightning's ``UnrepeatedDistributedSampler``), so the summed confusion
matrices are exactly those of a single process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import os
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset, default_collate

from .class_uniform import ClassUniformDataset, class_image_index
from .datasets import DATASETS, build_dataset
from .labels import NUM_CLASSES
from .resumable import ResumableDataLoader, ResumableSampler
from .synthetic import DOMAINS, SOURCE_DOMAIN, SyntheticDomainDataset
from .transforms import train_transform

#: The source domain's held-out synthetic images start at this index (training uses 0..N-1).
SYNTHETIC_VAL_FIRST_INDEX = 1_000_000


#: Entry options that are paths: relative ones are read under ``data_root`` like ``root``.
PATH_OPTIONS = ("mask_root", "split_file")

#: Environment variable giving ``data_root`` when the datamodule's ``data_root`` is unset.
DATA_ROOT_ENV = "DEFT_DATA_ROOT"


@dataclass
class DatasetSpec:
    """A dataset: registry ``name`` (cityscapes, gtav, bdd100k, mapillary, synthia, acdc,
    folder, synthetic), its ``root`` folder (relative roots are taken under the datamodule's
    ``data_root``; unused by ``synthetic``), ``split``, the ``domain`` name used in metric keys
    (default: the dataset's own, e.g. ``cityscapes`` or ``acdc-night``; for ``synthetic`` the
    synthetic domain, default ``clear``), and dataset-specific ``options`` (``size``,
    ``condition``, ``split_file``, ``mask_root``, ``files``; synthetic: ``length``,
    ``image_size``)."""

    name: str
    root: str | None = None
    split: str = "train"
    domain: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def as_spec(entry: DatasetSpec | dict[str, Any], where: str = "dataset entry") -> DatasetSpec:
    """``entry`` as a :class:`DatasetSpec`: a dataclass, a plain dict of its fields, or a
    ``{class_path: deft_lightning.DatasetSpec, init_args: {...}}`` dict (what jsonargparse hands
    over from YAML and command-line overrides). Unknown keys are an error naming them."""
    if isinstance(entry, DatasetSpec):
        return entry
    if hasattr(entry, "as_dict"):  # a jsonargparse Namespace
        entry = entry.as_dict()
    if not isinstance(entry, dict):
        raise TypeError(f"{where}: expected a dataset entry {{name, root, split, domain, options}}, "
                        f"got {entry!r}")
    if "class_path" in entry:
        entry = entry.get("init_args") or {}
    known = set(DatasetSpec.__dataclass_fields__)
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; a dataset entry has {sorted(known)} "
                         "(dataset-specific settings go under `options`)")
    if "name" not in entry:
        raise ValueError(f"{where}: a dataset entry needs `name`, got {entry}")
    return DatasetSpec(**{key: value for key, value in entry.items() if value is not None or key == "root"})


def eval_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate``, refusing images of different sizes in one batch with a message
    (evaluation and predict run every image at its own size)."""
    sizes = sorted({tuple(sample["image"].shape[-2:]) for sample in samples})
    if len(sizes) > 1:
        raise ValueError(f"domain {samples[0]['domain']!r}: images of sizes {sizes} (height, width) in one "
                         "evaluation batch: set data.eval_batch_size=1, or give the dataset one size "
                         "(e.g. Mapillary's `size` option)")
    return default_collate(samples)


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
        source: training dataset entry; ``None`` uses the synthetic ``synthetic_source`` domain.
        source_val: held-out source split for model selection (synthetic source: automatic).
        targets: target evaluation entries; ``None`` uses the other synthetic domains when the
            source is synthetic, and is an error with a real source.
        data_root: folder under which the entries' relative paths (``root``, ``mask_root``,
            ``split_file``) are read (default: the ``DEFT_DATA_ROOT`` environment variable, else
            the working directory). The data presets in configs/data/ use relative roots, so
            this is the one thing a user sets.
        synthetic_source, synthetic_targets: synthetic domain names of the default entries
            (targets default to all other domains).
        synthetic_train_size, synthetic_val_size: images per synthetic split (default length
            of ``synthetic`` entries for split ``train`` / any other split).
        synthetic_image_size: (height, width) of synthetic images.
        seed: seed of the synthetic data (image ``i`` of domain ``d`` is a function of
            ``(seed, d, i)``) and of the augmentation generator.
        batch_size, eval_batch_size, num_workers: dataloader settings.
        crop_size, scale_range, hflip_p, color_jitter, color_jitter_p, blur_p, blur_sigma: training
            augmentation (see :func:`~deft_lightning.data.transforms.train_transform`);
            ``augment=False`` turns it off.
        class_uniform_pct: fraction of training crops centred on a pixel of a uniformly drawn
            class (RobustNet's class-uniform sampling: 0.5; :mod:`~deft_lightning.data.class_uniform`).
            0 turns it off.
        class_index_cache: JSON file caching which training images hold which classes (the scan
            reads every mask once); ``None`` scans at every start.
        predict_root: a folder of images to predict on (any sizes and formats, one image a
            batch); ``None`` predicts on the first ``predict_per_domain`` images of every
            evaluation domain.
    """

    #: Every dataset it serves labels pixels with Cityscapes' train ids 0..18 (255: ignore).
    num_classes = NUM_CLASSES

    def __init__(
        self,
        source: DatasetSpec | None = None,
        source_val: DatasetSpec | None = None,
        targets: list[DatasetSpec] | None = None,
        data_root: str | None = None,
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
        blur_p: float = 1.0,
        blur_sigma: tuple[float, float] = (0.15, 1.3),
        class_uniform_pct: float = 0.0,
        class_index_cache: str | None = None,
        shuffle: bool = True,
        predict_root: str | None = None,
        predict_per_domain: int = 4,
    ) -> None:
        super().__init__()
        source = None if source is None else as_spec(source, "source")
        source_val = None if source_val is None else as_spec(source_val, "source_val")
        targets = None if targets is None else [as_spec(t, f"targets[{i}]") for i, t in enumerate(targets)]
        self.source, self.source_val, self.targets = source, source_val, targets
        self.save_hyperparameters()
        # Plain dicts in the hyperparameters: checkpoints stay loadable with weights_only=True.
        self.hparams.update(source=source and asdict(source), source_val=source_val and asdict(source_val),
                            targets=targets and [asdict(t) for t in targets])
        unknown = [d for d in [synthetic_source, *(synthetic_targets or [])] if d not in DOMAINS]
        if unknown:
            raise ValueError(f"unknown synthetic domain(s) {unknown}; known: {list(DOMAINS)}")
        if source is not None and source.name != "synthetic" and targets is None:
            raise ValueError(f"source is the real dataset {source.name!r} but no `targets` are given: "
                             "name the target datasets to evaluate on (see docs/datasets.md); the "
                             "synthetic domains are only the default of a synthetic source")
        entries = {"source": source, "source_val": source_val, **{f"targets[{i}]": t for i, t in enumerate(targets or [])}}
        for where, spec in entries.items():
            if spec is not None and spec.name not in (*DATASETS, "synthetic"):
                raise ValueError(f"data {where}: unknown dataset {spec.name!r}; known: {', '.join(DATASETS)}, synthetic")
            if spec is not None and spec.name == "synthetic" and (spec.domain or SOURCE_DOMAIN) not in DOMAINS:
                raise ValueError(f"data {where}: unknown synthetic domain {spec.domain!r}; known: {list(DOMAINS)}")
        if not 0.0 <= class_uniform_pct <= 1.0:
            raise ValueError(f"class_uniform_pct must be in [0, 1], got {class_uniform_pct}")
        if class_uniform_pct > 0 and not augment:
            raise ValueError("class_uniform_pct > 0 needs augment=True: the training crop is what centres on the class")
        self.train_set: Dataset | None = None
        self.eval_sets: dict[str, Dataset] = {}
        self._source_val_domain: str | None = None
        self.predict_sets: list[Dataset] = []

    # ---- entries -----------------------------------------------------------------------
    @property
    def source_spec(self) -> DatasetSpec:
        """The training entry (the synthetic default when ``source`` is unset)."""
        hp = self.hparams
        return self.source or DatasetSpec("synthetic", split="train", domain=hp.synthetic_source)

    @property
    def eval_specs(self) -> list[DatasetSpec]:
        """The evaluation entries, in dataloader order: the held-out source split (if any) first."""
        hp = self.hparams
        source = self.source_spec
        specs = []
        if self.source_val is not None:
            specs.append(self.source_val)
        elif source.name == "synthetic":
            specs.append(DatasetSpec("synthetic", split="val", domain=source.domain or SOURCE_DOMAIN))
        if self.targets is not None:
            specs += self.targets
        else:
            source_domain = source.domain or SOURCE_DOMAIN
            domains = hp.synthetic_targets or [d for d in DOMAINS if d != source_domain]
            specs += [DatasetSpec("synthetic", split="val", domain=d) for d in domains]
        return specs

    def resolve_root(self, root: str | None) -> str | None:
        """``root`` as given if absolute, else under ``data_root`` (or ``$DEFT_DATA_ROOT``)."""
        if root is None:
            return None
        base = self.hparams.data_root or os.environ.get(DATA_ROOT_ENV)
        root = os.path.expanduser(root)
        return root if base is None or os.path.isabs(root) else str(Path(base).expanduser() / root)

    # ---- domains -----------------------------------------------------------------------
    @property
    def uses_synthetic_source(self) -> bool:
        return self.source_spec.name == "synthetic"

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
    def _synthetic(self, spec: DatasetSpec, transform=None) -> Dataset:
        """A synthetic entry: split ``train`` is images 0..N-1, ``val`` and ``test`` the held-out
        images; options ``length`` and ``image_size`` default to the ``synthetic_*`` arguments."""
        hp = self.hparams
        if spec.split not in ("train", "val", "test"):  # a typo must not train on the held-out images
            raise ValueError(f"synthetic entry {spec}: unknown split {spec.split!r}; known: train, val, test")
        options = dict(spec.options)
        unknown = sorted(set(options) - {"length", "image_size"})
        if unknown:
            raise ValueError(f"synthetic entry {spec}: unknown option(s) {unknown}; known: ['image_size', 'length']")
        train = spec.split == "train"
        length = options.get("length", hp.synthetic_train_size if train else hp.synthetic_val_size)
        dataset = SyntheticDomainDataset(
            spec.domain or SOURCE_DOMAIN, length, seed=hp.seed,
            size=tuple(options.get("image_size", hp.synthetic_image_size)),
            first_index=0 if train else SYNTHETIC_VAL_FIRST_INDEX, transform=transform)
        return dataset

    def _from_spec(self, spec: DatasetSpec, transform=None) -> Dataset:
        if spec.name == "synthetic":
            return self._synthetic(spec, transform)
        if spec.root is None:
            raise ValueError(f"dataset entry {spec}: `root` is required for {spec.name!r}")
        options = {key: self.resolve_root(value) if key in PATH_OPTIONS and isinstance(value, str) else value
                   for key, value in spec.options.items()}
        return build_dataset(spec.name, self.resolve_root(spec.root), spec.split, domain=spec.domain,
                             transform=transform, **options)

    def _augmentation_seed(self) -> int:
        """``seed`` plus the global rank: DDP ranks draw different crops and classes."""
        return self.hparams.seed + (self.trainer.global_rank if self.trainer is not None else 0)

    def _train_transform(self):
        hp = self.hparams
        if not hp.augment:
            return None
        transform = train_transform(tuple(hp.crop_size), tuple(hp.scale_range), hp.hflip_p,
                                    tuple(hp.color_jitter), hp.color_jitter_p, hp.blur_p,
                                    tuple(hp.blur_sigma))
        transform.set_random_seed(self._augmentation_seed())
        return transform

    def _eval_sets(self) -> dict[str, Dataset]:
        """Built once: {domain name: dataset}, the held-out source split first."""
        if self.eval_sets:
            return self.eval_sets
        hp = self.hparams
        sets = [self._from_spec(spec) for spec in self.eval_specs]
        has_source_val = self.source_val is not None or self.uses_synthetic_source
        self._source_val_domain = sets[0].domain if has_source_val and sets else None
        names = [dataset.domain for dataset in sets]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation domain names must be unique, got {names}: set `domain` in the dataset entries")
        self.eval_sets = dict(zip(names, sets))
        return self.eval_sets

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == "fit" and self.train_set is None:
            train_set = self._from_spec(self.source_spec, self._train_transform())
            if hp.class_uniform_pct > 0:
                class_images = class_image_index(train_set, cache_file=hp.class_index_cache, num_workers=hp.num_workers,
                                                 write_cache=self.trainer is None or self.trainer.global_rank == 0)
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

    def _eval_loader(self, dataset: Dataset, batch_size: int | None = None) -> DataLoader:
        hp = self.hparams
        sampler = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size,
                                                   rank=trainer.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=batch_size or hp.eval_batch_size, sampler=sampler, shuffle=False,
                          num_workers=hp.num_workers, collate_fn=eval_collate)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(self.eval_sets[domain]) for domain in self.eval_domains]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> list[DataLoader]:
        # A folder of photos comes in any mix of sizes: one image a batch, predicted at its size.
        return [self._eval_loader(dataset, batch_size=1 if self.hparams.predict_root is not None else None)
                for dataset in self.predict_sets]
