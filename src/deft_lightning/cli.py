"""The ``deft-lightning`` command: LightningCLI for fit/validate/test/predict.

    deft-lightning fit --config configs/joint.yaml [--config configs/trainer/cpu.yaml] [--trainer.max_steps=100]
    deft-lightning export --ckpt_path run/checkpoints/last.ckpt --out exported/

Model and data are chosen by class path in the YAML (any ``SegmentationTask`` subclass, any
``LightningDataModule``); every key can be overridden on the command line.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from .data.datamodule import DGSegDataModule
from .tasks.base import SegmentationTask


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
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    _quiet_environment()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "export":
        from .export import main as export_main

        export_main(argv[1:])
        return
    lightning_cli(argv)


if __name__ == "__main__":
    main()
