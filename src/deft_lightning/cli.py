"""The ``deft-lightning`` command: LightningCLI for fit/validate/test/predict, plus the
library's own verbs.

    deft-lightning fit --config configs/joint.yaml [--config configs/trainer/cpu.yaml] [--trainer.max_steps=100]
    deft-lightning test --config configs/joint.yaml --ckpt_path runs/joint/version_0/checkpoints/last.ckpt
    deft-lightning export --ckpt_path runs/joint/version_0/checkpoints/last.ckpt --out exported/
    deft-lightning merge --checkpoints a.ckpt b.ckpt --anchor b.ckpt --out merged.ckpt

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
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from . import run_folder
from .atomic_io import clean_stale_temporaries
from .callbacks import LogPredictions
from .callbacks.progress import ResumingProgressBar
from .checkpoint_args import RUN_CHECKPOINTS, checkpoint_folders, checkpoint_model_args, resolve_run_checkpoint
from .checkpoint_io import AtomicCheckpointIO
from .data.datamodule import DGSegDataModule
from .precision import precision_for_hardware
from .safe_load import CheckpointError, load_checkpoint
from .tasks.base import SegmentationTask
from .yaml_files import config_files, load_yaml

#: Verbs the library adds beside Lightning's: name -> "module:function". Each function takes
#: the remaining command-line arguments and runs a keyword-only function through jsonargparse,
#: so ``--help``, ``--config`` and error messages look the same for every verb.
LIBRARY_COMMANDS = {
    "export": "deft_lightning.export:main",
    "merge": "deft_lightning.merge_checkpoints:main",
    "sweep": "deft_lightning.sweep:main",
    "report": "deft_lightning.report:main",
    "check-data": "deft_lightning.check_data:main",
}

LIGHTNING_COMMANDS = {
    "fit": "train a method (a config per method: --config configs/<method>.yaml)",
    "validate": "evaluate a checkpoint on the validation split of every domain",
    "test": "evaluate a checkpoint on every domain; per-class IoU table in <run>/test/",
    "predict": "coloured overlays and train-id PNGs for a folder of images",
}


def overview() -> str:
    """``deft-lightning`` / ``--help``: every command, Lightning's and the library's."""
    library = {name: importlib.import_module(target.partition(":")[0]).__doc__.splitlines()[0]
               .split(":", 1)[1].strip().rstrip(".") for name, target in LIBRARY_COMMANDS.items()}
    width = max(map(len, [*LIGHTNING_COMMANDS, *library]))
    lines = ["usage: deft-lightning <command> [--config FILE ...] [--key=value ...]",
             "       deft-lightning <command> --help   (the command's options)", "", "Lightning's commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "The library's commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in library.items()]
    return "\n".join(lines)


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


def _parse_error_reason(message: str) -> str:
    """jsonargparse's message for a class inside a config that did not validate ("Does not
    validate against any of the Union subtypes", then one bullet per subtype), reduced to one
    line: the key and the class's own reason (``Parser key "model": Problem with given
    class_path 'deft_lightning.JointFinetune': Option 'lrr' is not accepted``)."""
    lines = message.splitlines()
    errors = next((i for i, line in enumerate(lines) if line.strip() == "Errors:"), None)
    if "Union subtypes" not in message or errors is None:
        return message
    depth = len(lines[errors]) - len(lines[errors].lstrip())
    bullets: list[list[str]] = []
    for line in lines[errors + 1:]:
        if len(line) - len(line.lstrip()) <= depth:
            break
        if line.strip().startswith("- "):
            bullets.append([line.strip()[2:]])
        elif bullets:
            bullets[-1].append(line.strip())
    reasons = [" ".join(bullet) for bullet in bullets if "Expected a <class 'NoneType'>" not in bullet[0]]
    return f"{lines[0].strip()} {reasons[0]}" if reasons else message


class DeftArgumentParser(LightningArgumentParser):
    """Parse errors as ``error: <one line>`` and the ``--help`` tip, without the usage listing
    of every option (60 lines for ``fit``) above them."""

    def print_usage(self, file=None) -> None:
        pass

    def error(self, message: str, ex: Exception | None = None):
        super().error(_parse_error_reason(message), ex)


class DeftLightningCLI(LightningCLI):
    """LightningCLI with the library's run folder (:mod:`deft_lightning.run_folder`: every output
    of a run under one folder, ``run_dir``) and checkpoint semantics
    (:mod:`deft_lightning.checkpoint_args`): ``--ckpt_path last|best`` from a new process (the
    newest run folder of the config), command-line/config values over a checkpoint's saved
    hyperparameters, a model-class check, and no evaluation of an untrained net without
    ``--allow_untrained true``."""

    #: The run folder of the command being run (set before the trainer is built).
    run_dir: Path | None = None
    #: Where ``predict`` writes its PNGs (``None`` for other commands).
    predictions_dir: Path | None = None

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--allow_untrained", type=bool, default=False,
                            help="validate/test/predict without --ckpt_path: evaluate the net as "
                                 "built (pretrained encoder, untrained decoder)")
        parser.add_argument("--run.root", type=str, default="runs", help="folder of the run folders")
        parser.add_argument("--run.name", type=Optional[str], default=None,
                            help="run name (default: the first --config file's stem)")
        parser.add_argument("--run.version", type=Optional[int], default=None,
                            help="run version (default: fit a new one; others the checkpoint's run or the newest)")
        parser.add_argument("--run.predictions_dir", type=Optional[str], default=None,
                            help="predict: output folder (default: <run folder>/predict/predictions)")
        parser.add_argument("--precision_by_hardware", type=bool, default=False,
                            help="set trainer.precision to bf16-mixed where the device has native "
                                 "bf16 (AMX/AVX512-BF16 CPU, bf16 GPU), else 32-true")

    def parse_arguments(self, parser, args) -> None:
        words = sys.argv[1:] if args is None else args
        for path in config_files(words) if isinstance(words, list) else []:
            if path.is_file():  # jsonargparse's own message names no file ("<unicode string>")
                try:
                    load_yaml(path)
                except ValueError as error:
                    parser.error(f"--config {error}")
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
        self._place_run(config, subcommand)  # --ckpt_path last|best look in the run folder
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
            self._remove_empty_run_dir()
            self.parser.error(str(error))
        for note in notes:
            rank_zero_info(f"model: {note}")
        update = {subcommand: {"model": {"class_path": config.model.class_path, "init_args": init_args}}}
        self.config = self.parser.parse_object(update, self.config)

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if not subcommand:  # run=False: the caller drives the trainer; fit's layout
            self._place_run(config, None)
        if config.get("precision_by_hardware"):
            config.trainer.precision, reason = precision_for_hardware(config.trainer.accelerator)
            rank_zero_info(f"--precision_by_hardware: trainer.precision={config.trainer.precision} ({reason})")

    @classmethod
    def _remove_empty_run_dir(cls) -> None:
        if cls.run_dir is not None:
            run_folder.remove_empty_dirs(cls.run_dir, stop=cls.run_dir.parents[min(2, len(cls.run_dir.parents) - 1)])

    def _place_run(self, config: Namespace, subcommand: str | None) -> None:
        """Point the trainer's root, loggers, checkpoints and (predict) writer into the run folder."""
        stage = subcommand or "fit"
        trainer = config.trainer
        callbacks = list(trainer.callbacks or [])
        if trainer.default_root_dir is not None:
            # An explicit root (sweeps, benchmarks, own layouts): Lightning's layout under it.
            run_dir = Path(trainer.default_root_dir)
            predictions = run_dir / "predictions"
        else:
            run = config.run
            ckpt_path = config.get("ckpt_path")
            run_dir = run_folder.resolve_run_dir(
                "validate" if ckpt_path in RUN_CHECKPOINTS else stage,  # last|best: the newest run
                run.root, run.name or run_folder.config_name(config.get("config")), run.version,
                None if ckpt_path in RUN_CHECKPOINTS else ckpt_path,
                create=subcommand is not None and _launched_as_global_zero())
            predictions = run_dir / "predict" / "predictions"
            trainer.default_root_dir = str(run_dir / stage)
            trainer.logger = self._loggers_under(trainer.logger, run_dir, stage)
            for callback in callbacks:
                if _is(callback, "ModelCheckpoint") and callback.init_args.get("dirpath") is None:
                    callback.init_args.dirpath = str(run_dir / "checkpoints")
            if stage == "fit" and trainer.enable_checkpointing is not False and not any(
                    _is(c, "ModelCheckpoint") for c in callbacks):
                callbacks.append(_class_config(CHECKPOINT, dirpath=str(run_dir / "checkpoints"), save_last=True))
        type(self).run_dir = self.run_dir = run_dir
        if stage == "predict":
            writers = [c for c in callbacks if _is(c, "PredictionWriter")]
            if not writers:
                callbacks.append(_class_config(PREDICTION_WRITER, output_dir=config.run.predictions_dir
                                               or str(predictions)))
            elif config.run.predictions_dir is not None:
                writers[0].init_args.output_dir = config.run.predictions_dir
            writer = writers[0] if writers else callbacks[-1]
            self.predictions_dir = Path(writer.init_args.output_dir)
        trainer.callbacks = callbacks

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

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        # predict: the writer saves each batch; Lightning's default would also keep every image
        # and map in memory until the end (--return_predictions true still asks for that).
        if subcommand == "predict" and kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        # The task prints one table per stage, domains as columns (Lightning's own repeats every
        # metric under every dataloader's column).
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
        parser_class=DeftArgumentParser,
        save_config_kwargs={"overwrite": True},
        # Appended to the config's callbacks; acts only with a wandb or TensorBoard logger.
        trainer_defaults={"callbacks": [LogPredictions()]},
        args=args,
        run=run,
    )


def _launched_as_global_zero() -> bool:
    """Whether this process is DDP's global rank 0 as its launcher says (``RANK``, ``LOCAL_RANK``,
    ``SLURM_PROCID`` as Lightning reads them, ``NODE_RANK``): every rank runs the CLI, and only
    rank 0 may open a new run folder (the others would each leave an empty ``version_<N>``)."""
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"


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
        DeftLightningCLI._remove_empty_run_dir()
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
        if not words or words[0] in ("-h", "--help"):
            print(overview(), file=sys.stdout if words else sys.stderr)
            sys.exit(0 if words else 2)
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
