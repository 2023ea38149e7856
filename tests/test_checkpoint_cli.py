"""What `--ckpt_path` means on the command line: command-line/config values beat a checkpoint's
saved hyperparameters, the model class must match, `last`/`best` resolve from a new process, and
no checkpoint is an error for validate/test/predict.

One tiny DeFT run (`deft-lightning fit`, module fixture) serves every test.
"""

import csv

import pytest
import yaml
from lightning.pytorch import Trainer

from conftest import TINY_DATA, TINY_NET, trainer_kwargs
from deft_lightning import DGSegDataModule
from deft_lightning.cli import lightning_cli
from deft_lightning.cli import main as cli_main
from deft_lightning.export import load_task
from deft_lightning.safe_load import load_checkpoint
from test_cli import ROOT, deft_lightning

DEFT = str(ROOT / "configs/deft.yaml")
CPU = str(ROOT / "configs/trainer/cpu.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step DeFT run (warm-up 1 step, validation every 2 steps, best on val/mIoU_source)."""
    root = tmp_path_factory.mktemp("deft_run")
    run_config = root / "tiny_run.yaml"
    run_config.write_text(yaml.safe_dump({
        "data": {"init_args": {**TINY_DATA, "synthetic_image_size": [64, 128], "crop_size": [64, 128]}},
        "trainer": {"max_steps": 4, "val_check_interval": 2, "limit_val_batches": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                    "default_root_dir": str(root),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(root), "name": "run"}}},
    }))
    model_config = root / "tiny_deft.yaml"
    model_config.write_text(yaml.safe_dump({"model": {"init_args": {
        **TINY_NET, "warmup_steps": 1, "beta_encoder": 0.5, "beta_decoder": 0.5, "beta_reference_steps": None}}}))
    result = deft_lightning("fit", "--config", DEFT, "--config", CPU, "--config", str(run_config),
                            "--config", str(model_config), cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, run_config


def csv_metrics(path):
    rows = list(csv.DictReader(path.open()))
    return {key: float(value) for row in rows for key, value in row.items() if value not in ("", None)}


def final_model_metrics(ckpt, final_model, root):
    task = load_task(ckpt)
    task.hparams.final_model = final_model
    trainer = Trainer(**trainer_kwargs(root / "in_process"))
    return trainer.test(task, DGSegDataModule(**TINY_DATA), verbose=False)[0]


def test_command_line_final_model_beats_the_checkpoint(run):
    root, run_config = run
    last = root / "run/version_0/checkpoints/last.ckpt"
    result = deft_lightning("test", "--config", DEFT, "--config", CPU, "--config", str(run_config),
                            "--ckpt_path", "last", "--model.init_args.final_model=III", cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    scored = csv_metrics(root / "run/version_1/metrics.csv")
    model_iii = final_model_metrics(last, "III", root)
    model_iv = final_model_metrics(last, "IV", root)
    keys = [key for key in model_iii if key.endswith("mIoU")]
    assert len(keys) == 3
    assert any(model_iii[key] != pytest.approx(model_iv[key], abs=1e-6) for key in keys), "III and IV agree: no test"
    for key in keys:
        assert scored[key] == pytest.approx(model_iii[key], abs=1e-6), key


def test_a_checkpoint_of_another_model_class_is_refused(run, capsys):
    root, run_config = run
    with pytest.raises(SystemExit) as exit_info:  # the console script's entry point, in-process
        cli_main(["test", "--config", str(ROOT / "configs/joint.yaml"), "--config", CPU, "--config", str(run_config),
                  "--ckpt_path", "last"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "deft_lightning.DeFT" in err and "deft_lightning.JointFinetune" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_is_an_error(run, subcommand, capsys):
    root, run_config = run
    with pytest.raises(SystemExit) as exit_info:
        lightning_cli([subcommand, "--config", DEFT, "--config", CPU, "--config", str(run_config)])
    assert exit_info.value.code != 0
    assert "--ckpt_path" in capsys.readouterr().err


def test_allow_untrained_evaluates_the_net_as_built(run):
    root, run_config = run
    cli = lightning_cli(["validate", "--config", DEFT, "--config", CPU, "--config", str(run_config),
                         "--model.init_args.encoder_weights=null", "--allow_untrained=true"])
    assert cli.trainer.ckpt_path is None


def test_best_resolves_to_the_checkpoint_last_recorded_as_best(run):
    root, run_config = run
    folder = root / "run/version_0/checkpoints"
    recorded = [state["best_model_path"] for key, state in load_checkpoint(folder / "last.ckpt")["callbacks"].items()
                if key.startswith("ModelCheckpoint")]
    assert recorded and recorded[0].startswith(str(folder / "best-source-"))
    cli = lightning_cli(["validate", "--config", DEFT, "--config", CPU, "--config", str(run_config),
                         "--ckpt_path", "best"])
    assert cli.config.validate.ckpt_path == recorded[0]
    assert cli.trainer.ckpt_path == recorded[0]


def test_last_without_a_run_is_an_error_naming_the_folders(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lightning_cli(["test", "--config", DEFT, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
                       "--ckpt_path", "last"])
    assert exit_info.value.code != 0
    assert "no last*.ckpt" in capsys.readouterr().err
