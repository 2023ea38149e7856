"""`deft-lightning check-data`: every bad file of every dataset a config names, in one pass."""

from __future__ import annotations

import numpy as np
import pytest

from fake_datasets import make_bdd100k, make_cityscapes, write_grey_label

CONFIG = """data:
  class_path: deft_lightning.DGSegDataModule
  init_args:
    source: {name: cityscapes, root: cityscapes, split: train}
    targets:
      - {name: cityscapes, root: cityscapes, split: val}
      - {name: bdd100k, root: bdd100k, split: val}
"""


@pytest.fixture
def data_root(tmp_path):
    make_cityscapes(tmp_path / "cityscapes")
    make_bdd100k(tmp_path / "bdd100k", splits=("val",))
    (tmp_path / "data.yaml").write_text(CONFIG)
    return tmp_path


def check(data_root, capsys):
    from deft_lightning.cli import main

    try:
        main(["check-data", "--config", str(data_root / "data.yaml"), "--data_root", str(data_root)])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_clean_copy_passes_with_counts_and_class_shares(data_root, capsys):
    code, out, err = check(data_root, capsys)
    assert code == 0, err
    assert "| train cityscapes:train | 4 |" in out and "| eval bdd100k:val | 4 |" in out
    assert "| class | cityscapes (train) | cityscapes | bdd100k |" in out
    road = next(line for line in out.splitlines() if line.startswith("| road |"))
    assert all(float(cell) > 0 for cell in road.strip("|").split("|")[1:])


def test_every_kind_of_bad_file_is_named_in_one_pass(data_root, capsys):
    city_train = sorted((data_root / "cityscapes/leftImg8bit/train").glob("*/*.png"))
    bdd_images = sorted((data_root / "bdd100k/images/10k/val").glob("*.jpg"))
    bdd_labels = sorted((data_root / "bdd100k/labels/sem_seg/masks/val").glob("*.png"))
    bad = {
        "truncated PNG": truncate(city_train[0]),
        "truncated JPEG": truncate(bdd_images[0]),
        "size mismatch": write_grey_label(bdd_labels[2], np.zeros((10, 10), np.uint8)),
        "id out of range": write_grey_label(bdd_labels[3], np.full((48, 80), 40, np.uint8)),
    }
    missing = sorted((data_root / "cityscapes/gtFine/train").glob("*/*_labelIds.png"))[1]
    missing.unlink()
    bad["missing mask"] = city_train[1]
    code, _, err = check(data_root, capsys)
    assert code == 1
    assert "5 problem(s):" in err, err
    problems = err[err.index("5 problem(s):"):].splitlines()[1:]
    assert len(problems) == 5
    for kind, path in bad.items():
        assert any(str(path) in line for line in problems), (kind, err)
    assert any("truncated" in line and str(bad["truncated JPEG"]) in line for line in problems)


def test_a_config_that_is_not_yaml_is_named_with_its_line(tmp_path):
    from test_cli import deft_lightning

    broken = tmp_path / "broken.yaml"
    broken.write_text("data:\n  init_args:\n    targets: [{name: cityscapes\n")
    result = deft_lightning("check-data", "--config", str(broken), cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert f"{broken}: not valid YAML at line 4, column 1" in errors[0] and "Traceback" not in result.stderr
