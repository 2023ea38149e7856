"""What ``--ckpt_path`` means on the command line (used by :mod:`deft_lightning.cli`).

* ``--ckpt_path last`` / ``best`` name files of the run folder, found from a new process: the
  newest ``last*.ckpt`` under the checkpoint folders the config's ``ModelCheckpoint`` and
  logger write to; ``best`` is the best checkpoint that ``last`` recorded.
* A checkpoint's saved hyperparameters fill in what the command line and ``--config`` files
  leave unset; a value given there wins, except for hyperparameters that fix the weights'
  shapes (``SegmentationTask.weight_shape_hparams``), which always come from the checkpoint.
* The checkpoint's task class must be the config's model class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

from .safe_load import CheckpointError, load_checkpoint, same_class

RUN_CHECKPOINTS = ("last", "best")


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    return value.as_dict() if hasattr(value, "as_dict") else dict(value)


def _import_class(class_path: str) -> type | None:
    from jsonargparse._util import import_object

    try:
        return import_object(class_path)
    except Exception:
        return None


def checkpoint_folders(config: Any) -> list[Path]:
    """The folders a run with ``config`` (a subcommand's parsed config) writes checkpoints to."""
    trainer = config.get("trainer") or {}
    root = Path(trainer.get("default_root_dir") or ".")
    folders: list[Path] = []
    for callback in trainer.get("callbacks") or []:
        callback = _as_dict(callback)
        cls = _import_class(callback.get("class_path", ""))
        dirpath = _as_dict(callback.get("init_args")).get("dirpath")
        if cls is not None and issubclass(cls, ModelCheckpoint) and dirpath:
            folders.append(Path(dirpath))
    logger = trainer.get("logger")
    logger_args = _as_dict(_as_dict(logger).get("init_args")) if hasattr(logger, "get") else {}
    if logger in (None, True) or logger_args:
        save_dir = Path(logger_args.get("save_dir") or root)
        name = logger_args.get("name") or logger_args.get("project") or "lightning_logs"
        version = logger_args.get("version")
        versions = [save_dir / name / (version if isinstance(version, str) else f"version_{version}")] \
            if version is not None else sorted((save_dir / name).glob("*"))
        folders += [folder / "checkpoints" for folder in versions]
    folders.append(root / "checkpoints")  # logger=False
    return [folder for folder in dict.fromkeys(folders) if folder.is_dir()]


def resolve_run_checkpoint(which: str, config: Any) -> Path:
    """The file ``--ckpt_path last|best`` names for this config (error if there is none)."""
    folders = checkpoint_folders(config)
    lasts = [path for folder in folders for path in folder.glob("last*.ckpt")]
    if not lasts:
        searched = ", ".join(str(f) for f in folders) or "none exists"
        raise CheckpointError(f"--ckpt_path {which}: no last*.ckpt in the run's checkpoint folders "
                              f"(searched: {searched}); give the checkpoint's path instead")
    last = max(lasts, key=lambda path: path.stat().st_mtime)
    if which == "last":
        return last
    for key, state in load_checkpoint(last).get("callbacks", {}).items():
        best = state.get("best_model_path") if key.startswith("ModelCheckpoint") else None
        if best:
            candidates = [Path(best), last.parent / Path(best).name]
            found = next((path for path in candidates if path.is_file()), None)
            if found is None:
                raise CheckpointError(f"--ckpt_path best: {last} records {best} as best, which does not exist")
            return found
    raise CheckpointError(f"--ckpt_path best: {last} records no best checkpoint (its ModelCheckpoint "
                          f"has no `monitor`); give the checkpoint's path instead")


def checkpoint_model_args(checkpoint: dict[str, Any], ckpt_path: str | Path, config_model: Any,
                          explicit: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The checkpoint's model init args that the config should take, and notes for the user.

    ``config_model``: the parsed ``model`` entry (``class_path``, ``init_args``); ``explicit``:
    the init args given on the command line or in ``--config`` files. Raises
    :class:`CheckpointError` if it is not a Lightning checkpoint or was written by another task class.
    """
    if "state_dict" not in checkpoint or "pytorch-lightning_version" not in checkpoint:
        raise CheckpointError(f"{ckpt_path} is not a Lightning checkpoint (it has no 'state_dict' and "
                              f"'pytorch-lightning_version'): --ckpt_path takes a checkpoint of `deft-lightning fit` "
                              f"or `merge`; a bare net state dict becomes one with `deft-lightning merge "
                              f"--checkpoints FILE --net '{{arch: ..., encoder_name: ...}}' --out FILE.ckpt`")
    hparams = {k: v for k, v in _as_dict(checkpoint.get("hyper_parameters")).items() if k != "_instantiator"}
    config_class = _import_class(config_model.class_path)
    written_by = hparams.pop("_class_path", None) or checkpoint.get("task_class")
    if written_by and config_class is not None and not same_class(written_by, config_class):
        raise CheckpointError(f"checkpoint {ckpt_path} was written by {written_by}, but the config's model is "
                              f"{config_model.class_path}: use the checkpoint's model class (its run folder "
                              f"has the config.yaml it was trained with)")
    shapes = set(getattr(config_class, "weight_shape_hparams", ()))
    known = set(_as_dict(config_model.get("init_args")))
    taken, notes = {}, []
    for key, value in hparams.items():
        if key not in known:
            notes.append(f"ignoring the checkpoint's {key}={value!r}: not a parameter of {config_model.class_path}")
        elif key in shapes:
            taken[key] = value
            if key in explicit and _plain(explicit[key]) != _plain(value):
                notes.append(f"{key}={value!r} from the checkpoint (it fixes the weights' shapes), "
                             f"not {_plain(explicit[key])!r}")
        elif key not in explicit:
            taken[key] = value
        elif _plain(explicit[key]) != _plain(value):
            notes.append(f"{key}={_plain(explicit[key])!r} from the command line/config (the checkpoint has {value!r})")
    return taken, notes


def _plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
