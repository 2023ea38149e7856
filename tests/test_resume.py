"""Exact resume: a `deft-lightning fit` killed with SIGKILL mid-epoch and resumed with
`--ckpt_path last` ends bit-identical to the uninterrupted run (weights, EMA/retentive copies,
BN statistics, optimizer and scheduler state), with augmentation, shuffling and class-uniform
sampling on. DeFT is killed in stage 2 with style augmentation; joint with EMA; DAFT after its
BN conversion. The run is 10 steps of 4 batches per epoch, killed when step 6 starts (epoch 1,
batch 2). Each case runs three processes (uninterrupted, killed, resumed)."""

import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_DATA, TINY_NET
from deft_lightning.safe_load import load_checkpoint
from test_cli import ROOT, deft_lightning

SCRIPTS = Path(__file__).parent / "scripts"
KILL_STEP, MAX_STEPS = 6, 10

CASES = {
    "deft_stage2_style": ("configs/deft.yaml", {"warmup_steps": 2, "style_augmentation": True, "beta_encoder": 0.9,
                                                "beta_decoder": 0.9, "beta_reference_steps": None}),
    "joint_ema": ("configs/joint.yaml", {"ema_beta": 0.9}),
    "daft_converted": ("configs/daft.yaml", {"bn_conversion_batches": 2}),
}


def run_config(root: Path, kill: bool) -> Path:
    # Every argument given: a method config's ModelCheckpoint (same list position) would merge in.
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"every_n_train_steps": 1, "save_last": True, "save_top_k": 0, "monitor": None,
                                "mode": "min", "filename": None, "dirpath": None}}]
    if kill:
        callbacks.append({"class_path": "kill_at_step.KillAtStep", "init_args": {"step": KILL_STEP}})
    path = root / ("killed.yaml" if kill else "run.yaml")
    path.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "data": {"init_args": {**TINY_DATA, "synthetic_train_size": 16, "augment": True, "shuffle": True,
                               "class_uniform_pct": 0.5, "scale_range": [0.75, 1.25],
                               "synthetic_image_size": [64, 128], "crop_size": [64, 96]}},
        "trainer": {"max_steps": MAX_STEPS, "limit_val_batches": 0, "logger": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0, "default_root_dir": str(root), "callbacks": callbacks,
                    "accelerator": "cpu", "devices": 1, "precision": "32-true"},
    }))
    return path


def fit(root: Path, config: str, model: dict, kill: bool, *extra: str):
    model_config = root / "model.yaml"
    model_config.write_text(yaml.safe_dump({"model": {"init_args": {**TINY_NET, **model}}}))
    env = {"PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    return deft_lightning("fit", "--config", str(ROOT / config), "--config", str(run_config(root, kill)),
                          "--config", str(model_config), *extra, cwd=root, env=env)


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: max diff {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("case", [
    "deft_stage2_style",
    pytest.param("joint_ema", marks=pytest.mark.slow),
    pytest.param("daft_converted", marks=pytest.mark.slow),
])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, case):
    config, model = CASES[case]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    reference.mkdir()
    interrupted.mkdir()
    result = fit(reference, config, model, kill=False)
    assert result.returncode == 0, result.stderr[-4000:]
    killed = fit(interrupted, config, model, kill=True)
    assert killed.returncode == -9, killed.stderr[-4000:]  # SIGKILL
    mid = load_checkpoint(interrupted / "checkpoints/last.ckpt")
    assert mid["global_step"] == KILL_STEP and mid["epoch"] == 1  # mid-epoch: batch 2 of 4
    resumed = fit(interrupted, config, model, False, "--ckpt_path", "last", "--trainer.enable_progress_bar=true")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    want = load_checkpoint(reference / "checkpoints/last.ckpt")
    got = load_checkpoint(interrupted / "checkpoints/last.ckpt")
    assert got["global_step"] == want["global_step"] == MAX_STEPS
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert_same_tensors(got[key], want[key], key)
    assert_same_tensors({k: v for k, v in got["callbacks"].items() if not k.startswith("ModelCheckpoint")},
                        {k: v for k, v in want["callbacks"].items() if not k.startswith("ModelCheckpoint")}, "callbacks")
    # The progress bar resumes at the true position: epoch 1, batch 2 of 4 done.
    bars = [line for line in resumed.stdout.replace("\r", "\n").splitlines() if line.startswith("Epoch 1:")]
    counts = [line.split("|")[2].split()[0] for line in bars]
    assert [count for count in counts if not count.startswith("0/")][0] == "2/4", counts
    assert "1/4" not in counts, counts
