"""The ``deft-lightning`` command: LightningCLI for fit/validate/test/predict, plus the
library's own verbs.

    deft-lightning fit --config configs/joint.yaml [--config configs/trainer/cpu.yaml] [--trainer.max_steps=100]
    deft-lightning export --ckpt_path run/checkpoints/last.ckpt --out exported/
    deft-lightning merge --checkpoints a.ckpt b.ckpt --anchor b.ckpt --out merged.ckpt

Model and data are chosen by class path in the YAML (any ``SegmentationTask`` subclass, any
``LightningDataModule``); every key can be overridden on the command line.
"""

from __future__ import annotations

import importlib
import os
import sys

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from .atomic_io import clean_stale_temporaries
from .callbacks import LogPredictions
from .callbacks.progress import ResumingProgressBar
from .checkpoint_args import RUN_CHECKPOINTS, checkpoint_folders, checkpoint_model_args, resolve_run_checkpoint
from .checkpoint_io import AtomicCheckpointIO
from .data.datamodule import DGSegDataModule
from .precision import precision_for_hardware
from .safe_load import CheckpointError, load_checkpoint
from .tasks.base import SegmentationTask

#: Verbs the library adds beside Lightning's: name -> "module:function". Each function takes
#: the remaining command-line arguments and runs a keyword-only function through jsonargparse,
#: so ``--help``, ``--config`` and error messages look the same for every verb.
LIBRARY_COMMANDS = {
    "export": "deft_lightning.export:main",
    "merge": "deft_lightning.merge_checkpoints:main",
    "sweep": "deft_lightning.sweep:main",
    "report": "deft_lightning.report:main",
}


def _quiet_environment() -> None:
    """No network at run time: albumentations' update check, the HF hub, wandb uploads."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


class DeftLightningCLI(LightningCLI):
    """LightningCLI with the library's checkpoint semantics (:mod:`deft_lightning.checkpoint_args`):
    ``--ckpt_path last|best`` from a new process, command-line/config values over a
    checkpoint's saved hyperparameters, a model-class check, and no evaluation of an untrained
    net without ``--allow_untrained true``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--allow_untrained", type=bool, default=False,
                            help="validate/test/predict without --ckpt_path: evaluate the net as "
                                 "built (pretrained encoder, untrained decoder)")
        parser.add_argument("--precision_by_hardware", type=bool, default=False,
                            help="set trainer.precision to bf16-mixed where the device has native "
                                 "bf16 (AMX/AVX512-BF16 CPU, bf16 GPU), else 32-true")

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if config.get("precision_by_hardware"):
            config.trainer.precision, reason = precision_for_hardware(config.trainer.accelerator)
            rank_zero_info(f"--precision_by_hardware: trainer.precision={config.trainer.precision} ({reason})")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # What the command line and --config files give, without defaults: these values win
        # over a checkpoint's saved hyperparameters.
        self.explicit_config = (parser.parse_args(args, defaults=False)
                                if args is None or isinstance(args, list) else None)

    def _explicit_model_args(self, subcommand: str) -> dict:
        if self.explicit_config is None:
            return {}
        init_args = self.explicit_config.get(f"{subcommand}.model.init_args")
        return dict(init_args.items(branches=True)) if init_args is not None else {}

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        try:
            if ckpt_path in RUN_CHECKPOINTS:
                which, ckpt_path = ckpt_path, str(resolve_run_checkpoint(ckpt_path, config))
                config.ckpt_path = ckpt_path
                rank_zero_info(f"--ckpt_path {which}: {ckpt_path}")
            if not ckpt_path:
                if subcommand != "fit" and not config.get("allow_untrained"):
                    raise CheckpointError(
                        f"`{subcommand}` without --ckpt_path would evaluate an untrained net; give "
                        f"--ckpt_path PATH (or last, best), or --allow_untrained true to evaluate it anyway")
                return
            checkpoint = load_checkpoint(ckpt_path, mmap=True)
            init_args, notes = checkpoint_model_args(checkpoint, ckpt_path, config.model,
                                                     self._explicit_model_args(subcommand))
        except CheckpointError as error:
            self.parser.error(str(error))
        for note in notes:
            rank_zero_info(f"model: {note}")
        update = {subcommand: {"model": {"class_path": config.model.class_path, "init_args": init_args}}}
        self.config = self.parser.parse_object(update, self.config)


    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        for folder in checkpoint_folders(self.config[self.subcommand] if self.subcommand else self.config):
            clean_stale_temporaries(folder)  # left by a killed run
        # Atomic checkpoint writes and weights-only loads, unless a plugin chose another IO.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        bar = trainer.progress_bar_callback
        if type(bar) is TQDMProgressBar:  # Lightning's default: one that knows mid-epoch resumes
            trainer.callbacks[trainer.callbacks.index(bar)] = ResumingProgressBar(
                bar.refresh_rate, bar.process_position, bar._leave)
        return trainer


def lightning_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return DeftLightningCLI(
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
