"""2-process DDP (CPU, gloo) in which one rank raises at step 2; for test_ddp_failure.py.

    python ddp_rank_fails.py OUT_DIR RANK

The failing rank writes the time it raises to OUT_DIR/raised_at; the test measures how long every
process takes to end after that. Run as a script (Lightning's DDP launcher re-executes argv).
"""

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY_DATA, TINY_NET  # noqa: E402
from deft_lightning import DGSegDataModule, JointFinetune  # noqa: E402


class RankFails(Callback):
    def __init__(self, out: Path, rank: int) -> None:
        self.out, self.rank = out, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == 2:
            (self.out / "raised_at").write_text(str(time.time()))
            raise RuntimeError(f"rank {self.rank} failed at step 2 (on purpose)")


def main(out: Path, rank: int) -> None:
    torch.set_num_threads(1)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=50, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out, callbacks=[RankFails(out, rank)])
    trainer.fit(JointFinetune(**TINY_NET), DGSegDataModule(**dict(TINY_DATA, synthetic_train_size=64)))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
