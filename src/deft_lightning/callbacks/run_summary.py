"""Write a run's final metrics to ``summary.json``: what ``deft-lightning sweep`` and
``deft-lightning report`` read, whatever logger the run used."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class RunSummary(Callback):
    """At the end of ``fit``, ``validate`` and ``test``, the last value of every logged metric
    (as a wandb run summary holds), the step (of the checkpoint evaluated, when ``validate`` or
    ``test`` loads one), the evaluation domains, and (fit) the checkpoints
    ModelCheckpoint wrote, under the key ``"fit"``, ``"validate"`` or ``"test"`` of one JSON
    file (the other stages' entries are kept).

    Args:
        path: the JSON file (default ``<trainer.default_root_dir>/summary.json``).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._checkpoint_step: int | None = None

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning restores the step only when fitting; an evaluation of a checkpoint says 0.
        self._checkpoint_step = checkpoint.get("global_step")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._checkpoint_step = None  # from here on the weights are at the trainer's step

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        self._write(trainer, "fit", {
            "last_checkpoint": getattr(checkpoint, "last_model_path", "") or None,
            "best_checkpoint": getattr(checkpoint, "best_model_path", "") or None,
        })

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":  # a `validate` run; fit's validations end up in "fit"
            self._write(trainer, "validate", {})

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, "test", {})

    def _write(self, trainer: Trainer, stage: str, extra: dict[str, Any]) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
        if not trainer.is_global_zero:
            return
        path = Path(self.path or Path(trainer.default_root_dir) / "summary.json")
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1}
        domains = getattr(getattr(trainer.lightning_module, "metrics", None), "domains", None)
        entry = {"metrics": {k: (None if math.isnan(v) else v) for k, v in sorted(metrics.items())},
                 "domains": domains, "source_domain": getattr(trainer.lightning_module, "source_val_domain", None),
                 "global_step": trainer.global_step if self._checkpoint_step is None else self._checkpoint_step,
                 "log_dir": log_dir, **extra}
        summary = json.loads(path.read_text()) if path.exists() else {}
        summary[stage] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(partial, path)
