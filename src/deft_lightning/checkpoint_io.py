"""AtomicCheckpointIO: Lightning's ``TorchCheckpointIO`` with atomic saves and weights-only loads.

Saves go through :func:`~deft_lightning.atomic_io.atomic_torch_save` (temporary in the
destination folder, fsync, rename: a kill never leaves a truncated checkpoint, and nothing in
the system temp folder); loads through :func:`~deft_lightning.safe_load.load_checkpoint` (no
code from pickles). The ``deft-lightning`` command installs it; under Python:
``Trainer(plugins=[AtomicCheckpointIO()])``.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .atomic_io import atomic_torch_save
from .safe_load import load_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic saves in the destination folder, weights-only loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: _PATH, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(f"{type(self).__name__} loads checkpoints weights-only (no code from pickles)")
        return load_checkpoint(path, map_location="cpu" if map_location is None else map_location)
