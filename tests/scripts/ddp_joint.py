"""Fit JointFinetune for 2 steps with 2-process DDP on CPU (gloo), then validate.

Run as a script (never inside pytest: Lightning's DDP launcher re-executes sys.argv).
Writes the checkpoint and, from rank 0, the validation metrics as JSON.
    python ddp_joint.py OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY_DATA, TINY_NET  # noqa: E402
from deft_lightning import DGSegDataModule, JointFinetune  # noqa: E402

# Odd-sized evaluation sets split unevenly across the two ranks.
DDP_DATA = dict(TINY_DATA, synthetic_val_size=5, eval_batch_size=2)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    task = JointFinetune(**TINY_NET, ema_beta=0.9)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out)
    datamodule = DGSegDataModule(**DDP_DATA)
    trainer.fit(task, datamodule)
    trainer.save_checkpoint(out / "ddp.ckpt")
    trainer.limit_val_batches = 1.0
    metrics = trainer.validate(task, datamodule, verbose=False)
    if trainer.is_global_zero:
        (out / "metrics.json").write_text(json.dumps(metrics[0]))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
