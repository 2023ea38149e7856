"""2-process DDP on CPU, run as a subprocess script (see scripts/ddp_joint.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch import Trainer

from conftest import trainer_kwargs
from deft_lightning import DGSegDataModule, JointFinetune

SCRIPTS = Path(__file__).parent / "scripts"


def run_script(name: str, out: Path, timeout: int = 300) -> None:
    result = subprocess.run([sys.executable, str(SCRIPTS / name), str(out)], capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_process_ddp_miou_equals_single_process(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    from ddp_joint import DDP_DATA

    run_script("ddp_joint.py", tmp_path)
    ddp_metrics = json.loads((tmp_path / "metrics.json").read_text())
    task = JointFinetune.load_from_checkpoint(tmp_path / "ddp.ckpt")
    trainer = Trainer(**trainer_kwargs(tmp_path, limit_val_batches=1.0))
    single = trainer.validate(task, DGSegDataModule(**DDP_DATA), verbose=False)[0]
    keys = [k for k in single if k.endswith("/mIoU")]
    assert len(keys) == 3  # source held-out split + two targets
    for key in keys:
        assert ddp_metrics[key] == pytest.approx(single[key], abs=1e-6), key
