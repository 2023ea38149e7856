"""Known user errors print one line naming the file or parameter and exit 1, no traceback
(unless --debug); the failed commands leave no empty folder behind."""

from __future__ import annotations

import pytest

from test_cli import ROOT


@pytest.mark.parametrize("override, expected", [
    ("--model.init_args.encoder_name=resnet1", "resnet1"),
    ("--model.init_args.encoder_weights=missing_weights.pth", "missing_weights.pth"),
    ("--data.init_args.targets=[{name: cityscapes, root: no_such_folder, split: val}]", "no_such_folder"),
])
def test_one_clear_line_and_status_1(override, expected, tmp_path, monkeypatch, capsys):
    from deft_lightning.cli import main

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
    from deft_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="resnet1"):
        main(["fit", "--config", str(ROOT / "configs/joint.yaml"), "--model.init_args.encoder_name=resnet1", "--debug"])
