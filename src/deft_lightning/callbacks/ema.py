"""Exponential moving averages of (target, source) module pairs after every optimizer step.

    θ_target ← β θ_target + (1 − β) θ_source        (no bias correction)

The task says which pairs to average through ``ema_pairs()`` (joint + EMA: the EMA copy of
the whole net follows the net; DeFT: the retentive decoder follows the adaptive decoder and
the retentive encoder the adaptive encoder), each with its β. The callback does the update
in one fused ``torch._foreach_lerp_`` per β (``lerp(target, source, 1 − β)`` is the formula
above), counts updates, and checkpoints that count. After ``k`` updates a target started at
``θ_0`` keeps weight ``β^k`` on it: "biased toward the initialisation" in DeFT's words.

Buffers (BN running statistics) per pair: ``"none"`` leaves them to the target's own
forward passes (DeFT's default), ``"average"`` averages float buffers like the parameters
(timm's model EMA), ``"copy"`` copies them; integer buffers are copied in both last cases.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

BufferMode = Literal["none", "average", "copy"]


@dataclass
class EMAPair:
    """``target`` follows ``source`` with decay ``beta``."""

    name: str
    target: nn.Module
    source: nn.Module
    beta: float
    buffers: BufferMode = "none"


def _matched(target: nn.Module, source: nn.Module, kind: str, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    targets = dict(getattr(target, f"named_{kind}")())
    sources = dict(getattr(source, f"named_{kind}")())
    if targets.keys() != sources.keys():
        raise ValueError(f"EMA pair {name!r}: target and source {kind} differ in names")
    return [(targets[key], sources[key]) for key in targets]


@torch.no_grad()
def ema_update(pairs: list[EMAPair]) -> None:
    """One EMA step for every pair: a fused foreach lerp per (β, device, dtype) group."""
    groups: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for pair in pairs:
        tensors = _matched(pair.target, pair.source, "parameters", pair.name)
        if pair.buffers != "none":
            for target, source in _matched(pair.target, pair.source, "buffers", pair.name):
                if pair.buffers == "average" and target.is_floating_point():
                    tensors.append((target, source))
                else:
                    copies.append((target, source))
        for target, source in tensors:
            targets, sources = groups[(pair.beta, target.device, target.dtype)]
            targets.append(target)
            sources.append(source)
    for (beta, _, _), (targets, sources) in groups.items():
        torch._foreach_lerp_(targets, sources, 1.0 - beta)
    if copies:
        torch._foreach_copy_([t for t, _ in copies], [s for _, s in copies])


def check_precision(pairs: list[EMAPair]) -> None:
    """Refuse a pair whose float weights cannot hold one update: with ``1 − β`` under half the
    dtype's resolution (bf16: 2⁻⁸), ``lerp`` rounds every step back to the old value and the
    average silently never moves (e.g. β = 0.9999 with ``precision: bf16-true``)."""
    for pair in pairs:
        for tensor in pair.target.parameters():
            if tensor.is_floating_point() and 0 < 1.0 - pair.beta < torch.finfo(tensor.dtype).eps / 2:
                raise ValueError(f"EMA pair {pair.name!r}: β={pair.beta} moves {tensor.dtype} weights by less "
                                 f"than their rounding step, so the average would never change; keep the weights "
                                 f"in float32 (precision 32-true or bf16-mixed, not bf16-true/16-true)")


class EMACallback(Callback):
    """Updates the task's ``ema_pairs()`` after every optimizer step and checkpoints its count.

    Works with any LightningModule that has ``ema_pairs() -> list[EMAPair]``; an empty list
    means "no EMA now" (DeFT during decoder warm-up).
    """

    def __init__(self) -> None:
        self.num_updates = 0
        self._last_global_step: int | None = None
        self._checked_beta: float | None = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # An optimizer step happened iff global_step moved (gradient accumulation aware).
        if trainer.global_step == self._last_global_step:
            return
        self._last_global_step = trainer.global_step
        pairs = pl_module.ema_pairs()
        if pairs:
            if self.num_updates == 0 or pairs[0].beta != self._checked_beta:
                check_precision(pairs)
                self._checked_beta = pairs[0].beta
            ema_update(pairs)
            self.num_updates += 1

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_global_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = state_dict["num_updates"]
