"""The ``deft-lightning`` command: LightningCLI for fit/validate/test/predict, plus the
library's own verbs.

    deft-lightning fit --config configs/joint.yaml [--config configs/trainer/cpu.yaml] [--trainer.max_steps=100]
    deft-lightning test --config configs/joint.yaml --ckpt_path runs/joint/version_0/checkpoints/last.ckpt
    deft-lightning export --ckpt_path runs/joint/version_0/checkpoints/last.ckpt --out exported/

Model and data are chosen by class path in the YAML (any ``SegmentationTask`` subclass, any
``LightningDataModule``); every key can be overridden on the command line. Each run writes
into one run folder (:mod:`deft_lightning.run_folder`), printed at the end; ``predict`` writes
an overlay and a train-id PNG per image there unless a prediction writer is configured.

Known user errors (a missing file or folder, a bad value) print one message and exit with
status 1; ``--debug`` or ``DEFT_LIGHTNING_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, Optional

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from . import run_folder
from .data.datamodule import DGSegDataModule
from .tasks.base import SegmentationTask

#: Verbs the library adds beside Lightning's: name -> "module:function". Each function takes
#: the remaining command-line arguments and runs a keyword-only function through jsonargparse,
#: so ``--help``, ``--config`` and error messages look the same for every verb.
LIBRARY_COMMANDS = {
    "export": "deft_lightning.export:main",
    "check-data": "deft_lightning.check_data:main",
}

#: Exceptions that are the user's input at fault (their messages name the file or parameter):
#: printed as one line, no traceback, exit status 1.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError, KeyError,
               OSError)
DEBUG_ENV = "DEFT_LIGHTNING_DEBUG"

PREDICTION_WRITER = "deft_lightning.callbacks.PredictionWriter"
CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"


def _quiet_environment() -> None:
    """No network at run time: albumentations' update check, the HF hub, wandb uploads."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _class_config(class_path: str, **init_args: Any) -> Namespace:
    return Namespace(class_path=class_path, init_args=Namespace(**init_args))


def _is(entry: Any, class_name: str) -> bool:
    return isinstance(entry, Namespace) and str(entry.get("class_path", "")).rsplit(".", 1)[-1] == class_name


class DeftLightningCLI(LightningCLI):
    """LightningCLI that puts every output of a run under one run folder (``run_dir``)."""

    #: The run folder of the command being run (set before the trainer is built).
    run_dir: Path | None = None
    #: Where ``predict`` writes its PNGs (``None`` for other commands).
    predictions_dir: Path | None = None

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run.root", type=str, default="runs", help="folder of the run folders")
        parser.add_argument("--run.name", type=Optional[str], default=None,
                            help="run name (default: the first --config file's stem)")
        parser.add_argument("--run.version", type=Optional[int], default=None,
                            help="run version (default: fit a new one; others the checkpoint's run or the newest)")
        parser.add_argument("--run.predictions_dir", type=Optional[str], default=None,
                            help="predict: output folder (default: <run folder>/predict/predictions)")

    def before_instantiate_classes(self) -> None:
        stage = self.subcommand
        if stage is None:  # run=False: the caller drives the trainer; fit's layout
            config, stage = self.config, "fit"
        else:
            config = self.config[stage]
        trainer = config.trainer
        if trainer.default_root_dir is not None:  # explicit: the run folder itself
            run_dir = Path(trainer.default_root_dir)
        else:
            run = config.run
            run_dir = run_folder.resolve_run_dir(
                stage, run.root, run.name or run_folder.config_name(config.get("config")), run.version,
                config.get("ckpt_path"), create=self.subcommand is not None)
        type(self).run_dir = self.run_dir = run_dir
        trainer.default_root_dir = str(run_dir / stage)
        trainer.logger = self._loggers_under(trainer.logger, run_dir, stage)
        callbacks = list(trainer.callbacks or [])
        for callback in callbacks:
            if _is(callback, "ModelCheckpoint") and callback.init_args.get("dirpath") is None:
                callback.init_args.dirpath = str(run_dir / "checkpoints")
        if stage == "fit" and trainer.enable_checkpointing is not False and not any(
                _is(c, "ModelCheckpoint") for c in callbacks):
            callbacks.append(_class_config(CHECKPOINT, dirpath=str(run_dir / "checkpoints"), save_last=True))
        if stage == "predict":
            writers = [c for c in callbacks if _is(c, "PredictionWriter")]
            if not writers:
                callbacks.append(_class_config(PREDICTION_WRITER, output_dir=config.run.predictions_dir
                                               or str(run_dir / "predict" / "predictions")))
            elif config.run.predictions_dir is not None:
                writers[0].init_args.output_dir = config.run.predictions_dir
            writer = writers[0] if writers else callbacks[-1]
            self.predictions_dir = Path(writer.init_args.output_dir)
        trainer.callbacks = callbacks

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        # The task prints one table per stage, domains as columns (Lightning's own repeats every
        # metric under every dataloader's column).
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        return {**kwargs, "verbose": False} if subcommand in ("validate", "test") else kwargs

    @staticmethod
    def _loggers_under(logger: Any, run_dir: Path, stage: str) -> Any:
        """The configured logger(s) writing under ``<run_dir>/<stage>``; the default (unset or
        ``true``) is a CSVLogger there; ``false`` stays off."""
        if logger is False:
            return False
        if logger is None or logger is True:
            return _class_config("lightning.pytorch.loggers.CSVLogger", save_dir=str(run_dir), name="",
                                 version=stage)
        for entry in logger if isinstance(logger, list) else [logger]:
            if _is(entry, "WandbLogger"):
                entry.init_args.save_dir = str(run_dir / stage)
            elif isinstance(entry, Namespace) and "init_args" in entry:
                entry.init_args.save_dir = str(run_dir)
                entry.init_args.name = ""
                entry.init_args.version = stage
        return logger


def lightning_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return DeftLightningCLI(
        SegmentationTask,
        DGSegDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


@rank_zero_only
def _report(cli: DeftLightningCLI) -> None:
    print(f"Run folder: {cli.run_dir}")
    if cli.predictions_dir is not None:
        print(f"Predictions: {cli.predictions_dir}")


def _run_lightning(argv: list[str] | None) -> None:
    DeftLightningCLI.run_dir = None
    try:
        cli = lightning_cli(argv)
    except BaseException:
        run_dir = DeftLightningCLI.run_dir
        if run_dir is not None:
            run_folder.remove_empty_dirs(run_dir, stop=run_dir.parents[min(2, len(run_dir.parents) - 1)])
        raise
    _report(cli)


def _user_message(error: BaseException) -> str:
    """``error``'s message; for a class that failed to build inside a config (jsonargparse
    reports it as "Does not validate against any of the Union subtypes ..."), its own message."""
    text = str(error)
    if "Union subtypes" in text:
        reasons = [line.strip()[2:] for line in text.splitlines()
                   if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line]
        if reasons:
            text = reasons[0].removeprefix("Problem with given class_path ")
    return f"{type(error).__name__}: {text}"


def main(argv: list[str] | None = None) -> None:
    _quiet_environment()
    words = sys.argv[1:] if argv is None else argv
    debug = "--debug" in words or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if "--debug" in words:
        words = [word for word in words if word != "--debug"]
        if argv is None:
            sys.argv[1:] = words
    try:
        if words and words[0] in LIBRARY_COMMANDS:
            module_name, _, function_name = LIBRARY_COMMANDS[words[0]].partition(":")
            getattr(importlib.import_module(module_name), function_name)(words[1:])
            return
        # args=None when the words are the process's own: LightningCLI warns when given both.
        _run_lightning(argv if argv is None else words)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"error: {_user_message(error)}", file=sys.stderr)
        print(f"(run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
