"""Safe loading: a checkpoint whose unpickling would run code is refused by every entry point
(test/fit through the CLI, export, load_task, DAFT's init_checkpoint, encoder weights, a
Trainer with AtomicCheckpointIO) and the code does not run; a checkpoint naming a task class
that is not a SegmentationTask subclass is refused."""

import pathlib

import pytest
import torch
from lightning.pytorch import Trainer

from conftest import TINY_DATA, TINY_NET, trainer_kwargs
from deft_lightning import DAFT, DGSegDataModule, SegmentationNet
from deft_lightning.checkpoint_io import AtomicCheckpointIO
from deft_lightning.cli import lightning_cli
from deft_lightning.cli import main as cli_main
from deft_lightning.export import load_task
from deft_lightning.safe_load import CheckpointError, UnsafeCheckpointError, load_checkpoint
from deft_lightning.weights import EncoderWeightsError, load_encoder_weights
from test_cli import ROOT


class CreatesAFile:
    """Unpickling this calls ``Path.touch(marker)``: code run by loading a file."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture
def crafted(tmp_path):
    """A checkpoint-shaped file whose unpickling creates ``marker``."""
    marker = tmp_path / "marker"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {"net.weight": torch.zeros(1)}, "hyper_parameters": {},
                "task_class": "deft_lightning.tasks.joint.JointFinetune", "payload": CreatesAFile(marker)}, path)
    return path, marker


def test_the_crafted_file_runs_code_when_loaded_unsafely(crafted):
    path, marker = crafted
    torch.load(path, weights_only=False)
    assert marker.exists()  # so the refusals below are refusals of real code


def test_library_loaders_refuse_it(crafted):
    path, marker = crafted
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        load_task(path)
    with pytest.raises(UnsafeCheckpointError):
        AtomicCheckpointIO().load_checkpoint(path)
    net = SegmentationNet(**{k: v for k, v in TINY_NET.items() if k != "encoder_weights"})
    with pytest.raises(EncoderWeightsError):
        load_encoder_weights(net.encoder, TINY_NET["encoder_name"], path)
    assert not marker.exists()


@pytest.mark.parametrize("subcommand", ["test", "fit"])
def test_the_command_line_refuses_it(crafted, subcommand, capsys):
    path, marker = crafted
    with pytest.raises(SystemExit) as exit_info:
        lightning_cli([subcommand, "--config", str(ROOT / "configs/joint.yaml"), "--trainer.logger=false",
                       "--ckpt_path", str(path)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "refused to load" in err and str(path) in err
    assert not marker.exists()


def test_export_refuses_it(crafted, tmp_path, capsys):
    path, marker = crafted
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--ckpt_path", str(path), "--out", str(tmp_path / "out")])
    assert "refused to load" in str(exit_info.value.code)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ["resume", "daft_init_checkpoint"])
def test_training_refuses_it(crafted, tmp_path, entry):
    path, marker = crafted
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=1), plugins=[AtomicCheckpointIO()])
    task = DAFT(**TINY_NET, bn_conversion=False, init_checkpoint=str(path) if entry != "resume" else None)
    with pytest.raises(UnsafeCheckpointError):
        trainer.fit(task, DGSegDataModule(**TINY_DATA), ckpt_path=path if entry == "resume" else None)
    assert not marker.exists()


@pytest.mark.parametrize("class_path", ["subprocess.Popen", "collections.OrderedDict", "no_such_module.Task"])
def test_a_task_class_that_is_not_a_segmentation_task_is_refused(tmp_path, class_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "task_class": class_path}, path)
    with pytest.raises(CheckpointError, match="not an imported SegmentationTask subclass"):
        load_task(path)
