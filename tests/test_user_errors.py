"""Known user errors print one line naming the file or parameter and exit 1 (2 for a bad
--ckpt_path, an argument error), no traceback (unless --debug); the failed commands leave no
empty folder behind and write nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from deft_lightning.cli import main  # imported here: Lightning's log handler binds the stderr of its import
from test_cli import ROOT, deft_lightning


@pytest.mark.parametrize("override, expected", [
    ("--model.init_args.encoder_name=resnet1", "resnet1"),
    ("--model.init_args.encoder_weights=missing_weights.pth", "missing_weights.pth"),
    ("--data.init_args.targets=[{name: cityscapes, root: no_such_folder, split: val}]", "no_such_folder"),
])
def test_one_clear_line_and_status_1(override, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/joint.yaml"), "--trainer.max_steps=1",
              "--trainer.enable_progress_bar=false", "--data.init_args.synthetic_image_size=[32,64]", override])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err
    assert all(any(folder.iterdir()) for folder in tmp_path.rglob("*") if folder.is_dir())  # no empty folder


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="resnet1"):
        main(["fit", "--config", str(ROOT / "configs/joint.yaml"), "--model.init_args.encoder_name=resnet1", "--debug"])


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error: " in line]


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Files users give to --ckpt_path by mistake: a run's folder, a config, a checkpoint cut in
    half (an interrupted copy), a bare net state dict."""
    import torch

    folder = tmp_path_factory.mktemp("bad_checkpoints")
    torch.save({"state_dict": {"net.weight": torch.zeros(1000)}, "pytorch-lightning_version": "2"}, folder / "full.ckpt")
    data = (folder / "full.ckpt").read_bytes()
    (folder / "half.ckpt").write_bytes(data[: len(data) // 2])
    torch.save({"encoder.weight": torch.zeros(3)}, folder / "net_state.pth")
    return {"folder": folder, "config": ROOT / "configs/joint.yaml", "truncated": folder / "half.ckpt",
            "state dict": folder / "net_state.pth"}


@pytest.mark.parametrize("kind, expected", [
    ("folder", "is a folder; give a checkpoint file in it (full.ckpt, half.ckpt)"),
    ("config", "is not a PyTorch checkpoint"),
    ("truncated", "is truncated or damaged"),
    ("state dict", "is not a Lightning checkpoint"),
])
def test_a_file_that_is_not_a_checkpoint_is_named(bad_checkpoints, kind, expected, tmp_path):
    path = bad_checkpoints[kind]
    result = deft_lightning("test", "--config", str(ROOT / "configs/joint.yaml"), f"--ckpt_path={path}", cwd=tmp_path)
    errors = _error_lines(result)
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert str(path) in errors[0] and expected in errors[0], errors
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, expected", [
    # Labels are train ids 0..18: 7 output classes used to fail in the confusion matrix's reshape.
    ("--model.init_args.num_classes=7", "num_classes=7, but the data's labels are train ids 0..18"),
    ("--data.init_args.targets=[{name: synthetic, domain: fog, split: val}, {name: cityscape, root: x}]",
     "targets[1]: unknown dataset 'cityscape'"),
])
def test_fit_settings_that_cannot_work_are_one_line(override, expected, tmp_path):
    result = deft_lightning("fit", "--config", str(ROOT / "configs/joint.yaml"), "--trainer.max_steps=1",
                            "--model.init_args.encoder_weights=null", "--data.init_args.synthetic_image_size=[32,64]",
                            "--trainer.enable_progress_bar=false", override, cwd=tmp_path)
    errors = _error_lines(result)
    assert result.returncode == 1 and len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("verb, make_out, expected", [
    ("export", lambda out: out.write_text("mine"), "is a file; an export is a folder"),
    ("merge", lambda out: out.mkdir(), "is a folder; give the merged checkpoint's file name"),
])
def test_an_output_of_the_wrong_kind_is_refused_before_any_work(verb, make_out, expected, tmp_path):
    out = tmp_path / "out"
    make_out(out)
    inputs = ["--ckpt_path", "never_read.ckpt"] if verb == "export" else ["--checkpoints", "never_read.ckpt"]
    result = deft_lightning(verb, *inputs, "--out", str(out), cwd=tmp_path)
    assert result.returncode == 1 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "never_read" not in result.stderr  # the output was checked before the input was read
    assert out.is_file() == (verb == "export") and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_daft_init_checkpoint_of_another_net_is_named(tmp_path):
    """DAFT step 2 from the wrong run's checkpoint: both nets named, not load_state_dict's traceback."""
    import torch

    other = tmp_path / "step1_resnet18.ckpt"
    torch.save({"state_dict": {"net.encoder.conv1.weight": torch.zeros(1)}, "pytorch-lightning_version": "2",
                "hyper_parameters": {"arch": "Unet", "encoder_name": "resnet18", "num_classes": 19}}, other)
    result = deft_lightning("fit", "--config", str(ROOT / "configs/daft.yaml"), "--trainer.max_steps=1",
                            "--model.init_args.encoder_weights=null", "--data.init_args.synthetic_image_size=[32,64]",
                            "--trainer.enable_progress_bar=false", f"--model.init_args.init_checkpoint={other}", cwd=tmp_path)
    errors = _error_lines(result)
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert f"init_checkpoint {other} holds a Unet/resnet18/19 net" in errors[0]
    assert "this run builds Unet/mobilenet_v2/19" in errors[0] and "Traceback" not in result.stderr


def test_a_config_that_is_not_yaml_is_named_with_its_line(tmp_path):
    """jsonargparse reports a YAML syntax error in "<unicode string>": with several --config
    files the user could not tell which one is broken."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  init_args:\n    lr: [0.01\n")
    result = deft_lightning("fit", "--config", str(ROOT / "configs/joint.yaml"), "--config", str(broken), cwd=tmp_path)
    errors = _error_lines(result)
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert f"--config {broken}: not valid YAML at line 4, column 1" in errors[0], errors
    assert "Traceback" not in result.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml"]
