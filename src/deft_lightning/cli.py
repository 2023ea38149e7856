"""The ``deft-lightning`` command: LightningCLI for fit/validate/test/predict, plus the
library's own verbs.

    deft-lightning fit --config configs/joint.yaml [--config configs/trainer/cpu.yaml] [--trainer.max_steps=100]
    deft-lightning export --ckpt_path run/checkpoints/last.ckpt --out exported/

Model and data are chosen by class path in the YAML (any ``SegmentationTask`` subclass, any
``LightningDataModule``); every key can be overridden on the command line.
"""

from __future__ import annotations

import importlib
import os
import sys

from lightning.pytorch.cli import LightningCLI

from .callbacks import LogPredictions
from .data.datamodule import DGSegDataModule
from .tasks.base import SegmentationTask

#: Verbs the library adds beside Lightning's: name -> "module:function". Each function takes
#: the remaining command-line arguments and runs a keyword-only function through jsonargparse,
#: so ``--help``, ``--config`` and error messages look the same for every verb.
LIBRARY_COMMANDS = {
    "export": "deft_lightning.export:main",
    "sweep": "deft_lightning.sweep:main",
}


def _quiet_environment() -> None:
    """No network at run time: albumentations' update check, the HF hub, wandb uploads."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def lightning_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(
        SegmentationTask,
        DGSegDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # Appended to the config's callbacks; acts only with a wandb or TensorBoard logger.
        trainer_defaults={"callbacks": [LogPredictions()]},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    _quiet_environment()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in LIBRARY_COMMANDS:
        module_name, _, function_name = LIBRARY_COMMANDS[argv[0]].partition(":")
        getattr(importlib.import_module(module_name), function_name)(argv[1:])
        return
    lightning_cli(argv)


if __name__ == "__main__":
    main()
