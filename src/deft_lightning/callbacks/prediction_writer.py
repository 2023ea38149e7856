"""Write predictions as PNGs: a coloured overlay on the image and the raw train-id map."""

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
    (uint8 train ids, the format evaluation servers take)."""

    def __init__(self, output_dir: str, alpha: float = 0.5) -> None:
        super().__init__(write_interval="batch")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.output_dir = Path(output_dir)
        self.alpha = alpha

    def write_on_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, prediction: dict[str, Any], *args: Any
    ) -> None:
        preds = prediction["pred"].cpu().numpy().astype(np.uint8)
        images = (prediction["image"].float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for pred, image, name, domain in zip(preds, images, prediction["name"], prediction["domain"]):
            folder = self.output_dir / domain
            folder.mkdir(parents=True, exist_ok=True)
            overlay = (1 - self.alpha) * image + self.alpha * colorize(pred)
            Image.fromarray(overlay.round().astype(np.uint8)).save(folder / f"{name}_overlay.png")
            Image.fromarray(pred).save(folder / f"{name}_trainid.png")
