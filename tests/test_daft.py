"""DAFT task and the Table 1 baselines it configures (LP, FT, LP-FT), on tiny synthetic data."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from conftest import TINY_NET, trainer_kwargs
from deft_lightning import DAFT, BNConversion, DGSegDataModule
from deft_lightning.safe_load import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def fit(task, data_kwargs, tmp_path, max_steps, callbacks=(), **overrides):
    trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=max_steps, callbacks=list(callbacks), **overrides))
    trainer.fit(task, DGSegDataModule(**data_kwargs))
    return trainer


def batch(size=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(size, 3, 64, 128, generator=generator),
            torch.randint(0, 19, (size, 64, 128), generator=generator))


def test_zero_head_gives_zero_logits_and_no_encoder_gradient_at_the_first_step():
    task = DAFT(**TINY_NET, head_init="zero")
    images, masks = batch()
    task.train()
    logits = task.net(images)
    assert torch.count_nonzero(logits) == 0
    task.training_loss(images, masks).backward()
    final_conv = [m for m in task.net.decoder.head.modules() if isinstance(m, nn.Conv2d)][-1]
    assert final_conv.weight.grad.abs().sum() > 0
    for name, param in [*task.net.encoder.named_parameters(), *task.net.decoder.decoder.named_parameters()]:
        assert param.grad is not None and torch.count_nonzero(param.grad) == 0, name


def test_random_head_sends_gradient_into_the_encoder():
    task = DAFT(**TINY_NET, head_init="random")
    images, masks = batch()
    assert torch.count_nonzero(task.net(images)) > 0
    task.training_loss(images, masks).backward()
    assert any(torch.count_nonzero(p.grad) > 0 for p in task.net.encoder.parameters())


def test_encoder_and_head_learning_rates_reach_the_optimizer():
    task = DAFT(**TINY_NET, lr=3e-3, decoder_lr=0.3, weight_decay=1e-4, schedule_steps=10)
    optimizer = task.configure_optimizers()["optimizer"]
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["encoder"]["lr"] == 3e-3 and groups["decoder"]["lr"] == 0.3
    assert {id(p) for p in groups["encoder"]["params"]} == {id(p) for p in task.net.encoder.parameters()}
    assert {id(p) for p in groups["decoder"]["params"]} == {id(p) for p in task.net.decoder.parameters()}


class RecordBNModes(Callback):
    """The training flag of every BN layer during each step's forward (seen before backward)."""

    def __init__(self):
        self.modes = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.modes.append({name: m.training for name, m in pl_module.net.named_modules()
                           if isinstance(m, nn.modules.batchnorm._BatchNorm)})


def test_lp_leaves_the_encoder_untouched_and_lpft_finetunes_it_with_bn_in_eval(tmp_path, tiny_data_kwargs):
    """LP: the frozen encoder (parameters and BN statistics) is bit-for-bit unchanged and only
    the decoder is optimised. LP-FT: starts from the LP weights, keeps every BN layer in eval
    mode through every step (validation in between included), so no statistic moves."""
    lp = DAFT(**TINY_NET, freeze_encoder=True, head_init="random", bn_conversion=False, weight_decay=1e-2)
    encoder_start = {k: v.clone() for k, v in lp.net.encoder.state_dict().items()}
    decoder_start = {k: v.clone() for k, v in lp.net.decoder.state_dict().items()}
    lp_modes = RecordBNModes()
    trainer = fit(lp, tiny_data_kwargs, tmp_path / "lp", 2, [lp_modes])
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == ["decoder"]
    for key, value in lp.net.encoder.state_dict().items():
        assert torch.equal(value, encoder_start[key]), key
    assert any(not torch.equal(v, decoder_start[k]) for k, v in lp.net.decoder.state_dict().items())
    for modes in lp_modes.modes:
        assert not any(mode for name, mode in modes.items() if name.startswith("encoder."))
        assert all(mode for name, mode in modes.items() if name.startswith("decoder."))
    checkpoint = tmp_path / "lp.ckpt"
    trainer.save_checkpoint(checkpoint)

    lpft = DAFT(**TINY_NET, init_checkpoint=str(checkpoint), bn_mode="eval", head_init="random",
                bn_conversion=False, lr=1e-3, decoder_lr=1e-3)
    ft_modes = RecordBNModes()
    fit(lpft, tiny_data_kwargs, tmp_path / "ft", 2, [ft_modes], limit_val_batches=1, val_check_interval=1)
    assert len(ft_modes.modes) == 2
    assert not any(mode for modes in ft_modes.modes for mode in modes.values())
    finetuned = lpft.net.state_dict()
    for key, value in lp.net.state_dict().items():
        if "running_" in key:
            assert torch.equal(finetuned[key], value), key
    encoder_lp, encoder_ft = dict(lp.net.encoder.named_parameters()), dict(lpft.net.encoder.named_parameters())
    assert any(not torch.equal(encoder_ft[k], v) for k, v in encoder_lp.items())  # the encoder trains

    # Resuming LP-FT needs its own checkpoint only, not the LP checkpoint it started from.
    lpft_checkpoint = tmp_path / "lpft.ckpt"
    lpft.trainer.save_checkpoint(lpft_checkpoint)
    checkpoint.unlink()
    resumed = DAFT(**TINY_NET, init_checkpoint=str(checkpoint), bn_mode="eval", head_init="random",
                   bn_conversion=False, lr=1e-3, decoder_lr=1e-3)
    trainer = Trainer(**trainer_kwargs(tmp_path / "resumed", max_steps=3))
    trainer.fit(resumed, DGSegDataModule(**tiny_data_kwargs), ckpt_path=lpft_checkpoint)
    assert trainer.global_step == 3
    fresh = DAFT(**TINY_NET, init_checkpoint=str(checkpoint), bn_conversion=False)
    with pytest.raises(CheckpointError, match="lp.ckpt does not exist"):  # not resuming: the file is needed
        Trainer(**trainer_kwargs(tmp_path / "fresh", max_steps=1)).fit(fresh, DGSegDataModule(**tiny_data_kwargs))


def test_daft_converts_then_trains_with_bn_in_train_mode(tmp_path, tiny_data_kwargs):
    task = DAFT(**TINY_NET, bn_conversion_batches=1)
    modes = RecordBNModes()
    trainer = fit(task, tiny_data_kwargs, tmp_path, 2, [modes])
    conversion = [c for c in trainer.callbacks if isinstance(c, BNConversion)]
    assert len(conversion) == 1 and conversion[0].converted
    assert all(all(step.values()) for step in modes.modes)
    assert DAFT(**TINY_NET, bn_conversion=False).configure_callbacks() == []


class RecordImages(Callback):
    def __init__(self):
        self.images = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.images.append(batch["image"].clone())


def test_conversion_pass_leaves_the_training_batches_unchanged(tmp_path, tiny_data_kwargs):
    """The calibration pass over the train loader (augmentation and shuffle on, into a second
    epoch) must not shift what training sees: same batches as a run without conversion."""
    data = dict(tiny_data_kwargs, augment=True, shuffle=True)
    runs = []
    for conversion in (False, True):
        torch.manual_seed(0)
        images = RecordImages()
        fit(DAFT(**TINY_NET, bn_conversion=conversion, bn_conversion_batches=1), data,
            tmp_path / str(conversion), 3, [images])
        runs.append(images.images)
    assert len(runs[1]) == 3 and all(torch.equal(a, b) for a, b in zip(*runs))


def test_invalid_switches_fail_early():
    with pytest.raises(ValueError, match="bn_conversion_parts"):
        DAFT(**TINY_NET, bn_conversion_parts=["head"])
    with pytest.raises(ValueError, match="bn_mode"):
        DAFT(**TINY_NET, bn_mode="frozen")


TABLE_1 = {  # config -> switches that make it that row of DAFT's Table 1 (same_lr: η_θ == η_w)
    "configs/lp.yaml": {"freeze_encoder": True, "head_init": "random", "bn_conversion": False},
    "configs/ft.yaml": {"freeze_encoder": False, "head_init": "random", "bn_mode": "train",
                        "bn_conversion": False, "same_lr": True},
    "configs/lpft.yaml": {"bn_mode": "eval", "bn_conversion": False, "same_lr": True},
    "configs/daft.yaml": {"head_init": "zero", "bn_mode": "train", "bn_conversion": True, "same_lr": False},
}
TABLE_5 = {  # overlay on its base config -> BN conversion on/off
    ("configs/ft.yaml", "configs/ablations/daft/ft_bn_conversion.yaml"): True,
    ("configs/lpft.yaml", "configs/ablations/daft/lpft_bn_conversion.yaml"): True,
    ("configs/daft.yaml", "configs/ablations/daft/integrated_lpft.yaml"): False,
}


def parse(*configs, extra=()):
    from deft_lightning.cli import lightning_cli

    args = [arg for config in configs for arg in ("--config", str(ROOT / config))]
    return lightning_cli([*args, "--trainer.logger=false", *extra], run=False)


@pytest.mark.parametrize("config", sorted(TABLE_1))
def test_method_configs_are_their_table_1_rows(config):
    hparams = parse(config).model.hparams
    expected = dict(TABLE_1[config])
    if "same_lr" in expected:
        assert (hparams.lr == hparams.decoder_lr) == expected.pop("same_lr")
    for key, value in expected.items():
        assert hparams[key] == value, key


def test_table_5_overlays_parse_and_only_switch_bn_conversion():
    assert sorted(p.name for p in (ROOT / "configs/ablations/daft").glob("*.yaml")) == sorted(
        Path(overlay).name for _, overlay in TABLE_5)
    for (base, overlay), conversion in TABLE_5.items():
        with_overlay, without = dict(parse(base, overlay).model.hparams), dict(parse(base).model.hparams)
        assert with_overlay.pop("bn_conversion") == conversion != without.pop("bn_conversion")
        assert with_overlay == without
