"""Fit DeFT (1 warm-up step + 2 stage-2 steps) with 2-process DDP on CPU (gloo).

Run as a script (never inside pytest: Lightning's DDP launcher re-executes sys.argv). Each rank
writes ``rank{r}.json`` with a SHA-256 of every component's parameters, the stage and the EMA
update count, so the test can check that both ranks hold the same retentive components.
    python ddp_deft.py OUT_DIR
"""

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY_DATA, TINY_NET  # noqa: E402
from deft_lightning import DeFT, DGSegDataModule, EMACallback  # noqa: E402

COMPONENTS = ("adaptive_encoder", "retentive_decoder", "retentive_encoder", "adaptive_decoder")


def parameter_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    task = DeFT(**TINY_NET, warmup_steps=1, beta_encoder=0.9, beta_decoder=0.8, weight_decay=1e-3,
                beta_reference_steps=None)  # β as given: RC and AC must differ after 2 updates
    # Warm-up leaves e1 without gradients, so DDP must be told to expect unused parameters.
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_steps=3,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      default_root_dir=out)
    trainer.fit(task, DGSegDataModule(**TINY_DATA))
    ema = next(c for c in trainer.callbacks if isinstance(c, EMACallback))
    report = {"stage": task.stage, "ema_updates": ema.num_updates,
              "params": {name: parameter_hash(getattr(task, name)) for name in COMPONENTS}}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
