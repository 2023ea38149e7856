"""Pictures and tables for the experiment trackers: prediction overlays at every validation,
the per-class IoU table at test. ``deft-lightning`` adds this callback to every run; it only
acts when a wandb or TensorBoard logger is attached."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from ..data.labels import class_names, colorize


def overlay_strip(image: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor) -> np.ndarray:
    """``image | ground truth | prediction`` side by side, an ``H x 3W x 3`` uint8 array
    (image in [0, 1] RGB, ``C x H x W``; ignored pixels black in the truth)."""
    rgb = (image.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return np.concatenate([rgb, colorize(mask.cpu().numpy().astype(np.uint8)),
                           colorize(pred.cpu().numpy().astype(np.uint8))], axis=1)


class LogPredictions(Callback):
    """With a wandb or TensorBoard logger: at every validation (not the sanity check), the first
    ``images_per_domain`` images of every evaluation domain as ``image | truth | prediction``
    under ``val/predictions/<domain>``; at the end of test, the per-class IoU per domain
    (``test/per_class_iou``: a wandb table, TensorBoard text)."""

    def __init__(self, images_per_domain: int = 1) -> None:
        if images_per_domain < 1:
            raise ValueError(f"images_per_domain must be >= 1, got {images_per_domain}")
        self.images_per_domain = images_per_domain

    @staticmethod
    def _trackers(trainer: Trainer) -> list[Any]:
        if not trainer.is_global_zero:
            return []
        return [lg for lg in trainer.loggers if isinstance(lg, (WandbLogger, TensorBoardLogger))]

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._strips: dict[str, list[np.ndarray]] = {}

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or not self._trackers(trainer):
            return
        strips = self._strips.setdefault(pl_module.metrics.domains[dataloader_idx], [])
        missing = self.images_per_domain - len(strips)  # the first images, over as many batches as they take
        if missing <= 0:
            return
        images = batch["image"][:missing]
        preds = pl_module(images).argmax(1)
        strips += [overlay_strip(i, m, p) for i, m, p in zip(images, batch["mask"], preds)]

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strips, self._strips = self._strips, {}
        if not strips:
            return
        step = trainer.global_step
        for tracker in self._trackers(trainer):
            if isinstance(tracker, WandbLogger):
                import wandb

                tracker.log_metrics({f"val/predictions/{domain}": [
                    wandb.Image(strip, caption=f"{domain}: image | truth | prediction") for strip in images]
                    for domain, images in strips.items()}, step=step)
            else:
                for domain, images in strips.items():
                    width = max(image.shape[1] for image in images)  # batches of a domain may differ in size
                    column = np.concatenate([np.pad(image, ((0, 0), (0, width - image.shape[1]), (0, 0)))
                                             for image in images])
                    tracker.experiment.add_image(f"val/predictions/{domain}", column, step, dataformats="HWC")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trackers = self._trackers(trainer)
        ious = getattr(pl_module, "test_ious", None)
        if not trackers or not ious:
            return
        from ..tasks.base import format_iou_table

        domains = list(ious)
        source = getattr(pl_module, "source_val_domain", None)
        columns = ["class", *(f"{d} (source)" if d == source else d for d in domains)]
        rows = []
        for index, name in enumerate(class_names(len(ious[domains[0]]))):
            values = [float(ious[d][index]) for d in domains]
            if not all(math.isnan(v) for v in values):
                rows.append([name, *(None if math.isnan(v) else round(100 * v, 2) for v in values)])
        rows.append(["mIoU", *(round(100 * float(ious[d].nanmean()), 2) for d in domains)])
        for tracker in trackers:
            if isinstance(tracker, WandbLogger):
                tracker.log_table(key="test/per_class_iou", columns=columns, data=rows)
            else:
                tracker.experiment.add_text("test/per_class_iou", format_iou_table(ious, source), trainer.global_step)
