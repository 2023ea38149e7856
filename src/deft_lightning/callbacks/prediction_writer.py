"""Write predictions as PNGs: a coloured overlay on the image and the raw train-id map.

``deft-lightning predict`` adds this writer to every run (output folder: the run folder's
``predict/predictions``, or ``--run.predictions_dir``) unless the config names one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from ..data.labels import colorize


class PredictionWriter(BasePredictionWriter):
    """For every predicted image, ``<output_dir>/<domain>/<name>_overlay.png`` (palette
    colours blended over the image with weight ``alpha``) and ``<name>_trainid.png``
    (uint8 train ids, the format evaluation servers take), both at the size of the network's
    input (a folder of photos is read at each photo's own size). A name already written in this
    run gets a ``_1``, ``_2``... suffix rather than overwriting it."""

    def __init__(self, output_dir: str, alpha: float = 0.5) -> None:
        super().__init__(write_interval="batch")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.output_dir = Path(output_dir)
        self.alpha = alpha
        self._written: set[Path] = set()

    def _free_stem(self, folder: Path, name: str) -> Path:
        stem, count = folder / name, 0
        while stem in self._written:
            count += 1
            stem = folder / f"{name}_{count}"
        self._written.add(stem)
        return stem

    def write_on_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, prediction: dict[str, Any], *args: Any
    ) -> None:
        preds = prediction["pred"].cpu().numpy().astype(np.uint8)
        images = (prediction["image"].float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for pred, image, name, domain in zip(preds, images, prediction["name"], prediction["domain"]):
            stem = self._free_stem(self.output_dir / domain, name)
            stem.parent.mkdir(parents=True, exist_ok=True)
            overlay = (1 - self.alpha) * image + self.alpha * colorize(pred)
            Image.fromarray(overlay.round().astype(np.uint8)).save(f"{stem}_overlay.png")
            Image.fromarray(pred).save(f"{stem}_trainid.png")
