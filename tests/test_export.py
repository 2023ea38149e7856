"""`deft-lightning export` round trip: checkpoint -> smp save_pretrained folder -> plain smp model.

The exported model, loaded offline with ``segmentation_models_pytorch.from_pretrained`` and fed
images normalised as ``preprocessing.json`` says, must compute what the task's ``inference_net()``
computes: the EMA net for joint + EMA, the chosen final-model pair (IV) for DeFT.
"""

import json

import pytest
import segmentation_models_pytorch as smp
import torch
from lightning.pytorch import Trainer

from conftest import TINY_NET, trainer_kwargs
from deft_lightning import DeFT, DGSegDataModule, JointFinetune
from deft_lightning.cli import main as cli_main


def trained_checkpoint(task, data_kwargs, tmp_path, steps):
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=steps))
    trainer.fit(task, DGSegDataModule(**data_kwargs))
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("method", ["joint_ema", "deft"])
def test_exported_model_matches_the_inference_net(tmp_path, tiny_data_kwargs, method):
    if method == "joint_ema":
        task = JointFinetune(**TINY_NET, ema_beta=0.5)
        ckpt = trained_checkpoint(task, tiny_data_kwargs, tmp_path, 2)
        assert task.inference_net().encoder is task.ema_net.encoder
    else:
        task = DeFT(**TINY_NET, warmup_steps=1, beta_encoder=0.5, beta_decoder=0.5)
        ckpt = trained_checkpoint(task, tiny_data_kwargs, tmp_path, 3)
        assert task.stage == 2 and task.hparams.final_model == "IV"
        net = task.inference_net()
        assert net.encoder is task.retentive_encoder and net.decoder is task.retentive_decoder
    out = tmp_path / "exported"
    cli_main(["export", "--ckpt_path", str(ckpt), "--out", str(out)])

    model = smp.from_pretrained(str(out)).eval()
    preprocessing = json.loads((out / "preprocessing.json").read_text())
    assert preprocessing["input_range"] == [0, 1]
    mean = torch.tensor(preprocessing["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing["std"]).view(1, 3, 1, 1)
    images = torch.rand(2, 3, 64, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = model((images - mean) / std)
        expected = task.eval().inference_net()(images)
    torch.testing.assert_close(exported, expected, rtol=1e-5, atol=1e-5)
    # The trained weights, not a fresh init: the pair's other components give other outputs.
    if method == "deft":
        with torch.no_grad():
            adaptive = task.pair("adaptive_encoder", "adaptive_decoder")(images)
        assert not torch.allclose(adaptive, exported, atol=1e-4)
