"""Loading checkpoints without running code from them.

Every checkpoint, weights file and cache the library reads goes through ``torch.load`` with
``weights_only=True`` (or safetensors / JSON): tensors, numbers, strings, lists, dicts and the
few library types registered below. A pickle that would import or call anything else (a
crafted ``__reduce__``, an ``nn.Module`` pickled whole) is refused before any of it runs:
:class:`UnsafeCheckpointError` names the file and the first forbidden global.

The task class a checkpoint names is resolved without importing new modules and accepted only
if it is a :class:`~deft_lightning.tasks.base.SegmentationTask` subclass.
"""

from __future__ import annotations

import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe, or not a deft-lightning task's."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would import or call objects outside the weights-only allowlist."""


def _allow_library_types() -> None:
    """Plain-data types the library itself puts into checkpoints (datamodule hparams)."""
    from .data.datamodule import DatasetSpec

    torch.serialization.add_safe_globals([DatasetSpec])


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    Raises :class:`CheckpointError` for a missing or unreadable file and
    :class:`UnsafeCheckpointError` for a pickle that would run code.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give a checkpoint file in it "
                              f"({', '.join(p.name for p in sorted(path.glob('*.ckpt'))[:5]) or 'it has no *.ckpt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as file:
        head = file.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip (new) or a pickle (legacy)
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive; "
                              f"this file starts with {head!r})")
    if head[:2] == b"PK" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is truncated or damaged (a zip archive without its end; "
                              f"was its copy or save cut short?)")
    _allow_library_types()
    try:
        content = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and head[:2] == b"PK")
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refused to load {path}: it holds Python objects that weights-only loading does not "
            f"allow, so unpickling it could run code ({str(error).splitlines()[0][:300]}). "
            f"deft-lightning checkpoints hold only tensors and plain values; load a file you do "
            f"not trust only after inspecting it"
        ) from None
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: "
                              f"{str(error).splitlines()[0].split('. ')[0][:300]}") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a checkpoint dict")
    return content


def _loaded_object(dotted: str) -> Any:
    """``module.attr`` from a module that is already imported (never imports), else None."""
    module_name, _, attr = dotted.rpartition(".")
    module = sys.modules.get(module_name)
    return getattr(module, attr, None) if module is not None else None


def task_class_named(dotted: str, source: str | Path = "the checkpoint") -> type:
    """The SegmentationTask subclass named ``dotted`` (``package.module.Class``).

    Only modules that are already imported are searched (importing ``deft_lightning`` imports
    every built-in task; a custom task's module must be imported first). Anything that is not
    a SegmentationTask subclass is refused.
    """
    from .tasks.base import SegmentationTask

    if dotted.partition(".")[0] == "deft_lightning":
        import deft_lightning  # noqa: F401  (the built-in tasks)
    task_class = _loaded_object(dotted)
    if not (isinstance(task_class, type) and issubclass(task_class, SegmentationTask)):
        raise CheckpointError(
            f"{source} names the task class {dotted!r}, which is not an imported SegmentationTask "
            f"subclass; only SegmentationTask subclasses are accepted (import a custom task's "
            f"module before loading)"
        )
    return task_class


def same_class(dotted: str, cls: type) -> bool:
    """Whether ``dotted`` names ``cls`` (by its canonical or an imported alias path)."""
    return dotted == f"{cls.__module__}.{cls.__qualname__}" or _loaded_object(dotted) is cls
