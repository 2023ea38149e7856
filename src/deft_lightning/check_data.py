"""``deft-lightning check-data``: read every file of every dataset a config names, before training.

    deft-lightning check-data --config configs/data/gtav_to_cityscapes_bdd_mapillary.yaml [--data_root /data]

Builds the config's ``DGSegDataModule`` (the ``data:`` sections of the ``--config`` files,
merged in order as ``fit`` merges them), then, with a progress bar per dataset, fully decodes
every image and label (a truncated PNG or JPEG is an error naming it), checks that every image
has its label, that their sizes agree, and that every label id is one the dataset can map to a
train id. Prints the image count of each dataset and the share of pixels of each class per
domain; exits with status 1 listing every bad file, in one pass. ``fit`` runs the cheap part
itself when it starts (folders exist, every image has its label: the datasets are built before
the first step).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from jsonargparse import ArgumentParser
from torch.utils.data import Dataset
from tqdm import tqdm

from .data.datamodule import DGSegDataModule
from .data.datasets import SegmentationDataset, collect_missing_labels
from .data.labels import CLASSES, IGNORE_INDEX, NUM_CLASSES
from .yaml_files import load_yaml


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def datamodule_from_configs(configs: list[str], data_root: str | None = None) -> DGSegDataModule:
    """The ``DGSegDataModule`` the ``data:`` sections of ``configs`` describe."""
    data: dict[str, Any] = {}
    for config in configs:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = load_yaml(path) or {}
        data = _merge(data, loaded.get("data") or {})
    class_path = data.get("class_path", "deft_lightning.DGSegDataModule")
    if class_path.rsplit(".", 1)[-1] != "DGSegDataModule":
        raise ValueError(f"check-data reads DGSegDataModule configs, the config names {class_path}")
    init_args = dict(data.get("init_args") or {})
    if data_root is not None:
        init_args["data_root"] = data_root
    return DGSegDataModule(**init_args)


def _named_datasets(datamodule: DGSegDataModule) -> list[tuple[str, Any]]:
    """(role, entry) of every dataset the datamodule names: the training set first."""
    return [("train", datamodule.source_spec)] + [("eval", spec) for spec in datamodule.eval_specs]


def check_dataset(dataset: Dataset, problems: list[str], class_pixels: np.ndarray, desc: str) -> int:
    """Decode every pair of ``dataset`` (sizes, ids checked by its ``load``); returns the images
    read, adds ``"<file>: <reason>"`` to ``problems`` and the train-id pixel counts to
    ``class_pixels`` (length NUM_CLASSES + 1, the last for ignore)."""
    for index in tqdm(range(len(dataset)), desc=desc, unit="img", file=sys.stderr, leave=False):
        try:
            _, mask = dataset.load(index)
        except (OSError, ValueError) as error:
            problems.append(str(error).split("\n")[0])
            continue
        if mask is not None:
            counts = np.bincount(mask.ravel(), minlength=256)
            class_pixels[:NUM_CLASSES] += counts[:NUM_CLASSES]
            class_pixels[NUM_CLASSES] += counts[NUM_CLASSES:].sum()
    return len(dataset)


def check_data(datamodule: DGSegDataModule) -> tuple[list[str], dict[str, int], dict[str, np.ndarray]]:
    """Check every dataset of ``datamodule``: (problems, images per dataset, class pixels per domain)."""
    problems: list[str] = []
    counts: dict[str, int] = {}
    pixels: dict[str, np.ndarray] = {}
    for role, spec in _named_datasets(datamodule):
        label = f"{role} {spec.name}:{spec.split}" + (f" ({spec.domain})" if spec.domain else "")
        try:
            with collect_missing_labels() as missing, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                dataset = datamodule._from_spec(spec)
        except (OSError, ValueError) as error:
            problems.append(f"{label}: {str(error).splitlines()[0]}")
            continue
        problems += [f"{image}: no label (expected {expected})" for image, expected in missing]
        if not spec.domain and getattr(dataset, "domain", spec.name) != spec.name:  # e.g. one ACDC condition
            label += f" ({dataset.domain})"
        problems += [f"{label}: {warning.message}" for warning in caught if issubclass(warning.category, UserWarning)]
        if not isinstance(dataset, SegmentationDataset):  # synthetic: drawn, not read
            counts[label] = len(dataset)
            continue
        domain = dataset.domain if role == "eval" else f"{dataset.domain} (train)"
        class_pixels = pixels.setdefault(domain, np.zeros(NUM_CLASSES + 1, np.int64))
        counts[label] = check_dataset(dataset, problems, class_pixels, label) + len(missing)
    return problems, counts, pixels


def class_share_table(pixels: dict[str, np.ndarray]) -> str:
    """Markdown: one row per class, one column per domain, % of the labelled pixels."""
    domains = list(pixels)
    lines = ["| class | " + " | ".join(domains) + " |", "|" + "---|" * (len(domains) + 1)]
    totals = {d: max(1, int(pixels[d][:NUM_CLASSES].sum())) for d in domains}
    for index, name in enumerate(CLASSES):
        lines.append(f"| {name} | " + " | ".join(f"{100 * pixels[d][index] / totals[d]:.1f}" for d in domains) + " |")
    lines.append(f"| *ignore ({IGNORE_INDEX}), % of all* | " + " | ".join(
        f"{100 * pixels[d][NUM_CLASSES] / max(1, int(pixels[d].sum())):.1f}" for d in domains) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="deft-lightning check-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True,
                        help="config file(s) as given to fit (their data: sections are merged in order)")
    parser.add_argument("--data_root", type=str, default=None, help="overrides the config's data_root")
    args = parser.parse_args(argv)
    datamodule = datamodule_from_configs(args.config, args.data_root)
    problems, counts, pixels = check_data(datamodule)
    print("| dataset | images |\n|---|---|")
    for label, count in counts.items():
        print(f"| {label} | {count} |")
    if pixels:
        print("\nClass pixels per domain (% of labelled pixels):\n")
        print(class_share_table(pixels))
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        sys.exit(1)
    print("\nall files read, paired and valid")
