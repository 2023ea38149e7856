"""One folder per run: a config's fit, validate, test and predict outputs live together.

    runs/<name>/version_<N>/
      checkpoints/                     last.ckpt, best-*.ckpt (fit)
      fit/       config.yaml  metrics.csv  hparams.yaml
      validate/  config.yaml  metrics.csv
      test/      config.yaml  metrics.csv  test_iou.md
      predict/   config.yaml  predictions/<domain>/<name>_overlay.png, <name>_trainid.png

``<name>`` is the first ``--config`` file's stem (``--run.name`` sets it); ``fit`` opens the
next free version, and validate/test/predict write into the run folder of the checkpoint they
are given (``.../version_N/checkpoints/x.ckpt``), else into the newest version of ``<name>``,
else a new one. ``--run.version`` picks a version. Loggers write under the stage's folder, so
every run (and every wandb run) keeps its own ``config.yaml``. An explicit
``--trainer.default_root_dir`` (sweeps, benchmarks) opts out: Lightning's own layout under it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

STAGES = ("fit", "validate", "test", "predict")
VERSION = re.compile(r"version_(\d+)$")


def versions(root: str | Path, name: str) -> list[Path]:
    """The ``version_<N>`` folders of ``<root>/<name>``, by increasing ``N``."""
    folder = Path(root) / name
    found = [(int(m.group(1)), p) for p in folder.glob("version_*") if (m := VERSION.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def latest_run_dir(root: str | Path, name: str) -> Path | None:
    """The newest run folder of ``name``, or ``None``."""
    found = versions(root, name)
    return found[-1] if found else None


def new_run_dir(root: str | Path, name: str, create: bool = True) -> Path:
    """The next free ``<root>/<name>/version_<N>``, created exclusively (safe against a run
    starting at the same time) unless ``create`` is false."""
    folder = Path(root) / name
    found = versions(root, name)
    number = int(VERSION.match(found[-1].name).group(1)) + 1 if found else 0
    if not create:
        return folder / f"version_{number}"
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = folder / f"version_{number}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            number += 1


def run_dir_of_checkpoint(ckpt_path: str | Path | None) -> Path | None:
    """The run folder holding ``<run>/checkpoints/<file>.ckpt``, or ``None``."""
    if ckpt_path is None:
        return None
    path = Path(ckpt_path)
    return path.parent.parent if path.parent.name == "checkpoints" else None


def config_name(config_paths: list | None) -> str:
    """The run name: the first config file's stem (``default`` without one)."""
    return Path(str(config_paths[0])).stem if config_paths else "default"


def resolve_run_dir(stage: str, root: str | Path, name: str, version: int | None = None,
                    ckpt_path: str | None = None, create: bool = True) -> Path:
    """The run folder a command of ``stage`` writes into (created if new and ``create``); see
    the module doc."""
    if version is not None:
        path = Path(root) / name / f"version_{version}"
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path
    from_checkpoint = run_dir_of_checkpoint(ckpt_path)
    if from_checkpoint is not None:
        return from_checkpoint
    if stage != "fit":
        latest = latest_run_dir(root, name)
        if latest is not None:
            return latest
    return new_run_dir(root, name, create)


def remove_empty_dirs(run_dir: Path, stop: Path | None = None) -> None:
    """Remove ``run_dir``'s empty subfolders, then ``run_dir`` and its parents up to ``stop``
    (exclusive) while they are empty: a run that failed before writing leaves nothing."""
    if not run_dir.is_dir():
        return
    for folder, _, _ in sorted(os.walk(run_dir), key=lambda entry: -len(entry[0])):
        if not os.listdir(folder):
            os.rmdir(folder)
    path = run_dir
    while path != stop and (not path.exists() or (path.is_dir() and not os.listdir(path))):
        if path.exists():
            path.rmdir()
        path = path.parent
