"""ResumingProgressBar: Lightning's progress bar, right after a mid-epoch resume too.

Lightning sets the bar's epoch and length when an epoch starts; a run resumed mid-epoch does
not start one, so the bar would show "Training 0/?" and count from zero. This bar starts at
the epoch and batch the run resumed at. The ``deft-lightning`` command uses it in place of
Lightning's default bar.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar


class ResumingProgressBar(TQDMProgressBar):
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done and self.train_progress_bar is not None:  # resumed mid-epoch
            self.on_train_epoch_start(trainer)
            self.train_progress_bar.n = self.train_progress_bar.initial = done
            self.train_progress_bar.refresh()
