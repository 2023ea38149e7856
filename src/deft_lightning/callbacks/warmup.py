"""Decoder warm-up: the task's ``warmup_frozen()`` modules are frozen for the first N steps.

During warm-up the frozen modules get ``requires_grad=False`` (no gradient, so SGD/AdamW
leave them exactly as they are, weight decay and momentum included, and no backward pass
runs through them). Their BatchNorm layers stay in train mode by default, as in the DeFT
authors' code, so running statistics still move; ``frozen_bn="eval"`` keeps them fixed.
When warm-up ends the modules are released and the task's ``on_warmup_end()`` runs once
(DeFT copies the warmed-up decoder into both of its decoders there).

Under DDP, parameters that start frozen and are released later need
``strategy: ddp_find_unused_parameters_true`` (the GPU preset sets it).
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn


def _set_bn_eval(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


class DecoderWarmup(Callback):
    """Freeze ``pl_module.warmup_frozen()`` for the first ``steps`` optimizer steps."""

    def __init__(self, steps: int, frozen_bn: Literal["train", "eval"] = "train") -> None:
        if steps < 0:
            raise ValueError(f"warm-up steps must be >= 0, got {steps}")
        self.steps = steps
        self.frozen_bn = frozen_bn
        self.finished = steps == 0

    def in_warmup(self, trainer: Trainer) -> bool:
        return trainer.global_step < self.steps

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        frozen = pl_module.warmup_frozen()
        if self.in_warmup(trainer):
            for module in frozen:
                module.requires_grad_(False)
                if self.frozen_bn == "eval":
                    _set_bn_eval(module)
            return
        if not self.finished:
            for module in frozen:
                module.requires_grad_(True)
                module.train()
            pl_module.on_warmup_end()
            self.finished = True

    def state_dict(self) -> dict[str, Any]:
        return {"finished": self.finished}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.finished = state_dict["finished"]
