"""Precision by hardware (configs/trainer/auto.yaml): the choice for patched hardware facts, and
one real run through the command line."""

import pytest
import torch
import yaml

from deft_lightning import precision
from test_cli import ROOT, deft_lightning


@pytest.mark.parametrize("flags, expected", [
    ({"fpu", "avx2", "amx_bf16", "amx_tile"}, "bf16-mixed"),
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16-mixed"),
    ({"avx2", "avx512f", "avx512_vnni"}, "32-true"),
    ({"avx2"}, "32-true"),
])
def test_cpu_choice_follows_the_bf16_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for accelerator in ("cpu", "auto"):
        assert precision.precision_for_hardware(accelerator)[0] == expected


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_gpu_choice_follows_native_bf16_not_the_cpu(monkeypatch, native_bf16, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16"} if not native_bf16 else {"avx2"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(precision, "cuda_bf16_native", lambda: native_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a test GPU")
    for accelerator in ("gpu", "cuda", "auto"):
        assert precision.precision_for_hardware(accelerator)[0] == expected


def test_other_accelerators_stay_fp32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16"})
    assert precision.precision_for_hardware("mps")[0] == "32-true"


def test_auto_preset_sets_the_run_precision_from_this_machine(tmp_path):
    result = deft_lightning("fit", "--config", str(ROOT / "configs/joint.yaml"),
                            "--config", str(ROOT / "configs/trainer/auto.yaml"),
                            "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
                            "--data.init_args.synthetic_train_size=8", "--data.init_args.batch_size=2",
                            "--data.init_args.crop_size=[64,64]", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-4000:]
    expected, reason = precision.precision_for_hardware("cpu")
    assert f"--precision_by_hardware: trainer.precision={expected} ({reason})" in result.stderr + result.stdout
    saved = yaml.safe_load(next(tmp_path.glob("**/config.yaml")).read_text())
    assert saved["trainer"]["precision"] == expected
