"""The `deft-lightning` console script, as a user runs it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def deft_lightning(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the console script as a user would (stdin closed; ``env`` added to the environment)."""
    executable = shutil.which("deft-lightning") or str(Path(sys.executable).parent / "deft-lightning")
    return subprocess.run([executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def test_fit_joint_config_for_two_steps(tmp_path):
    result = deft_lightning("fit", "--config", str(ROOT / "configs/joint.yaml"), "--trainer.max_steps=2",
                            "--trainer.limit_val_batches=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert list(tmp_path.glob("runs/joint/version_0/checkpoints/*.ckpt"))
    assert (tmp_path / "runs/joint/version_0/fit/config.yaml").exists()
    assert "Run folder: runs/joint/version_0" in result.stdout
    assert "args parameter" not in result.stderr  # LightningCLI's warning when given argv twice


@pytest.mark.parametrize("typo, expected", [
    (("    lr: 0.01", "    lr: 0.01\n    learning_rat: 0.1"),
     "Parser key \"model\": Problem with given class_path 'deft_lightning.JointFinetune': Option 'learning_rat' is not accepted"),
    (("deft_lightning.JointFinetune", "deft_lightning.JointFinetun"),
     "Parser key \"model\": Problem with given class_path 'deft_lightning.JointFinetun': module 'deft_lightning' "
     "has no attribute 'JointFinetun'"),
])
def test_a_typo_in_the_config_is_one_line_naming_it(tmp_path, typo, expected):
    """The reason on one line, under no listing of every option (fit's usage is 60 lines)."""
    config = tmp_path / "bad.yaml"
    config.write_text((ROOT / "configs/joint.yaml").read_text().replace(*typo))
    result = deft_lightning("fit", "--config", str(config), "--trainer.max_steps=1", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["tip: For details of accepted options run: deft-lightning fit --help",
                                          f"error: {expected}"], result.stderr


@pytest.mark.parametrize("config", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.yaml")))
def test_every_method_config_parses(config):
    """Each top-level config parses and instantiates model and data (no training)."""
    from deft_lightning.cli import lightning_cli

    cli = lightning_cli(["--config", str(ROOT / config), "--trainer.logger=false"], run=False)
    assert cli.model is not None and cli.datamodule is not None


def test_bare_command_and_help_list_every_command_and_each_command_has_help(tmp_path, capsys):
    from deft_lightning.cli import LIBRARY_COMMANDS, LIGHTNING_COMMANDS, main

    bare = deft_lightning(cwd=tmp_path)
    assert bare.returncode == 2
    listed = [line.split()[0] for line in bare.stderr.splitlines() if line[:3].count(" ") == 2]
    assert listed == [*LIGHTNING_COMMANDS, *LIBRARY_COMMANDS]
    for command in listed:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0, command
        assert "--help" in capsys.readouterr().out, command


def test_predict_keeps_no_predictions_in_memory(tmp_path, monkeypatch):
    """The writer saves every batch as it comes: the command holds no list of every image and map
    (Lightning's default, ~40 MB a 1080p photo), unless --return_predictions true asks for it."""
    from deft_lightning.cli import lightning_cli
    from test_data_presets import TINY_ARGS

    monkeypatch.chdir(tmp_path)
    args = ["predict", "--config", str(ROOT / "configs/joint.yaml"), *TINY_ARGS, "--allow_untrained=true",
            "--data.init_args.synthetic_targets=[fog]", "--trainer.enable_progress_bar=false"]
    cli = lightning_cli(args)
    assert len(list(tmp_path.glob("runs/joint/version_0/predict/predictions/*/*_trainid.png"))) == 4
    assert cli.trainer.predict_loop.predictions == []
    assert len(lightning_cli([*args, "--return_predictions=true"]).trainer.predict_loop.predictions) == 2
