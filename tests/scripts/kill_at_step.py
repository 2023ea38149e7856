"""A callback that SIGKILLs its own process when batch ``step`` starts (after the checkpoint
of the step before was written): how test_resume.py kills a run mid-epoch at a known step.
Importable by `deft-lightning` when this folder is on PYTHONPATH."""

import os
import signal

from lightning.pytorch import Callback


class KillAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
