"""The same method from Python and from YAML: the task classes' defaults are the shipped method
configs, except where a config says why it differs; joint + EMA has DeFT's β by horizon."""

from __future__ import annotations

import pytest
import yaml
from lightning.pytorch import Trainer

from conftest import TINY_DATA, TINY_NET, trainer_kwargs
from deft_lightning import DAFT, DeFT, DGSegDataModule, JointFinetune
from test_cli import ROOT

#: config -> (class, the init args the config sets differently on purpose: the config says why)
METHODS = {
    "configs/deft.yaml": (DeFT, {"warmup_steps"}),  # 200 of a 2,000-step synthetic run, not 7,740
    "configs/daft.yaml": (DAFT, set()),
    "configs/joint.yaml": (JointFinetune, set()),
}


def plain(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("config", sorted(METHODS))
def test_class_defaults_are_the_method_config(config):
    task_class, differs = METHODS[config]
    init_args = yaml.safe_load((ROOT / config).read_text())["model"]["init_args"]
    hparams = task_class(encoder_weights=None).hparams
    mismatched = {key: (value, plain(hparams[key])) for key, value in init_args.items()
                  if key != "encoder_weights" and plain(hparams[key]) != value}
    assert set(mismatched) == differs, mismatched


def test_joint_ema_beta_by_horizon_matches_deft_at_equal_horizon(tmp_path):
    joint = JointFinetune(**TINY_NET, ema_beta=0.9999, ema_beta_reference_steps=80_000)
    deft = DeFT(**TINY_NET, beta_encoder=0.9999, beta_decoder=0.9999, beta_reference_steps=80_000)
    for steps in (1000, 80_000):
        assert joint.ema_beta_for(steps) == pytest.approx(deft.betas_for(steps)[0], rel=1e-12)
    assert joint.ema_beta_for(1000) == pytest.approx(0.9999 ** 80, rel=1e-12)
    # In a run: the β the EMA copy follows is the one for the run's steps after warm-up.
    task = JointFinetune(**TINY_NET, ema_beta=0.9, ema_beta_reference_steps=8, warmup_steps=1)
    Trainer(**trainer_kwargs(tmp_path, max_steps=3)).fit(task, DGSegDataModule(**TINY_DATA))
    assert task.ema_beta_used == pytest.approx(0.9 ** 4)
    assert task.ema_pairs()[0].beta == pytest.approx(0.9 ** 4)
