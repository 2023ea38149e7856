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
    assert preprocessing["pad_to_multiple_of"] is None  # smp's Unet runs at any size
    # Any size, 720x1280/8 (BDD100K) and sides that are multiples of nothing included.
    for size in [(64, 128), (97, 131), (90, 160), (64, 64)]:
        images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            exported = model((images - mean) / std)
            expected = task.eval().inference_net()(images)
        torch.testing.assert_close(exported, expected, rtol=0, atol=1e-5, msg=f"at {size}")
        assert torch.equal(exported.argmax(1), expected.argmax(1)), size
    # The trained weights, not a fresh init: the pair's other components give other outputs.
    if method == "deft":
        with torch.no_grad():
            adaptive = task.pair("adaptive_encoder", "adaptive_decoder")(images)
        assert not torch.allclose(adaptive, exported, atol=1e-4)


def pad_as_preprocessing_says(normalised, multiple):
    """What preprocessing.json tells a user of the export to do (zeros at bottom/right)."""
    height, width = normalised.shape[-2:]
    return torch.nn.functional.pad(normalised, (0, -width % multiple, 0, -height % multiple)), (height, width)


def test_export_of_an_architecture_smp_runs_only_at_stride_multiples(tmp_path):
    """FPN: smp raises at 97x131; padded as preprocessing.json says, the export gives the
    library's logits (the library pads the same way)."""
    task = JointFinetune(arch="FPN", encoder_name="resnet18", encoder_weights=None,
                         arch_kwargs={"decoder_segmentation_channels": 32, "decoder_pyramid_channels": 32})
    ckpt = tmp_path / "fpn.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "task_class": "deft_lightning.tasks.joint.JointFinetune"}, ckpt)
    out = tmp_path / "exported"
    cli_main(["export", "--ckpt_path", str(ckpt), "--out", str(out)])
    model = smp.from_pretrained(str(out)).eval()
    preprocessing = json.loads((out / "preprocessing.json").read_text())
    assert preprocessing["pad_to_multiple_of"] == 32
    mean = torch.tensor(preprocessing["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing["std"]).view(1, 3, 1, 1)
    for size in [(97, 131), (90, 160), (64, 64)]:
        images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
        padded, (height, width) = pad_as_preprocessing_says((images - mean) / std, preprocessing["pad_to_multiple_of"])
        with torch.no_grad():
            exported = model(padded)[..., :height, :width]
            expected = task.eval().inference_net()(images)
        torch.testing.assert_close(exported, expected, rtol=0, atol=1e-5, msg=f"at {size}")
        assert torch.equal(exported.argmax(1), expected.argmax(1)), size
    with pytest.raises(RuntimeError, match="divisible by 32"):
        model(torch.rand(1, 3, 97, 131))


def test_a_checkpoint_loads_inside_no_grad(tmp_path):
    """`with torch.no_grad(): load_task(ckpt)(images)`, as inference code is written: the probe that
    drops unused encoder stages (encoder_depth < 5) needs gradients and takes them itself."""
    from deft_lightning.export import load_task

    task = JointFinetune(**TINY_NET)
    ckpt = tmp_path / "task.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "task_class": "deft_lightning.tasks.joint.JointFinetune"}, ckpt)
    images = torch.rand(1, 3, 32, 64)
    with torch.no_grad():
        loaded = load_task(ckpt)
        torch.testing.assert_close(loaded(images), task.eval()(images))
    assert all(p.requires_grad for p in loaded.net.parameters())
