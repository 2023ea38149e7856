"""BN conversion under 2-process DDP on CPU (gloo): each rank converts from its own shard.

Run as a script (never inside pytest: Lightning's DDP launcher re-executes sys.argv).
Writes the initial net state, each rank's shard of training indices and each rank's BN
state right after the conversion (before the first optimizer step).
    python ddp_bn_conversion.py OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY_DATA, TINY_NET  # noqa: E402
from deft_lightning import DAFT, DGSegDataModule  # noqa: E402
from deft_lightning.data.resumable import ResumableSampler, SampleKey, SeededSamples  # noqa: E402

# 8 training images: 4 per rank, two batches of 2 each; a full pass (bn_conversion_batches=None).
DDP_DATA = dict(TINY_DATA, batch_size=2)
TASK_KWARGS = dict(TINY_NET, bn_conversion_parts=["encoder", "decoder"], head_init="random")


def shard_indices(rank: int) -> list[list[int]]:
    """The training samples ``(index, seed)`` the library's sampler gives ``rank`` at the
    conversion (epoch 0, the datamodule's ``shuffle`` and ``seed``), as JSON lists."""
    sampler = ResumableSampler(range(DDP_DATA["synthetic_train_size"]), num_replicas=2, rank=rank,
                               shuffle=DDP_DATA["shuffle"], seed=0)
    return [list(key) for key in sampler]


def shard_batches(dataset, rank: int) -> list[torch.Tensor]:
    """The image batches ``rank`` converts from."""
    keys, size, samples = [SampleKey(*key) for key in shard_indices(rank)], DDP_DATA["batch_size"], SeededSamples(dataset)
    return [default_collate([samples[key] for key in keys[s:s + size]])["image"]
            for s in range(0, len(keys), size)]


class SaveConvertedBN(Callback):
    """Each rank's training shard, and its BN state before the first step (after conversion)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module):
        sampler = trainer.train_dataloader.sampler
        (self.out / f"shard{trainer.global_rank}.json").write_text(json.dumps(list(sampler)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            bn_keys = {f"{name}.{key}" for name, module in pl_module.net.named_modules()
                       if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
                       for key in ("weight", "bias", "running_mean", "running_var")}
            state = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items() if k in bn_keys}
            torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = DAFT(**TASK_KWARGS)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        torch.save(task.net.state_dict(), out / "initial.pt")
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out,
                      callbacks=[SaveConvertedBN(out)])
    trainer.fit(task, DGSegDataModule(**DDP_DATA))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
