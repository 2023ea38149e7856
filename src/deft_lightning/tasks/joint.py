"""Joint finetuning: the baseline, with the two switches the DeFT ablation needs.

Pretrained encoder + randomly initialised decoder trained together with one CE loss on the
source domain (METHODS.md §1). Switches:

- ``ema_beta``: keep an EMA copy of the whole net, ``θ_ema ← β θ_ema + (1 − β) θ`` after
  every optimizer step (float buffers averaged too), and evaluate/predict/export with it
  (the "joint + EMA" row of the DeFT ablation; β is not given in the seeds, 0.9999 like
  DeFT is our reading);
- ``warmup_steps``: train the decoder alone for that many steps first, encoder frozen
  (the "+ warm-up" row); ``warmup_frozen_bn`` chooses the frozen encoder's BN mode.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from lightning.pytorch import Callback
from torch import nn

from ..callbacks import DecoderWarmup, EMACallback, EMAPair
from ..net import SegmentationNet
from .base import SegmentationTask


class JointFinetune(SegmentationTask):
    """Joint finetuning, optionally with an EMA model for evaluation and a decoder warm-up.

    Args:
        ema_beta: β of the EMA copy used for evaluation; ``None`` (default) evaluates the net.
        warmup_steps: decoder warm-up steps with the encoder frozen (0: none).
        warmup_frozen_bn: BN mode of the frozen encoder during warm-up.
        **kwargs: see :class:`SegmentationTask`.
    """

    def __init__(
        self,
        *args: Any,
        ema_beta: float | None = None,
        warmup_steps: int = 0,
        warmup_frozen_bn: Literal["train", "eval"] = "train",
        **kwargs: Any,
    ) -> None:
        if ema_beta is not None and not 0.0 <= ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1), got {ema_beta}")
        super().__init__(*args, **kwargs)

    def configure_models(self) -> None:
        super().configure_models()
        self.ema_net: SegmentationNet | None = None
        if self.hparams.ema_beta is not None:
            self.ema_net = copy.deepcopy(self.net).requires_grad_(False)

    def inference_net(self) -> SegmentationNet:
        return self.net if self.ema_net is None else self.ema_net

    def compile_regions(self) -> list[nn.Module]:
        regions = super().compile_regions()
        return regions if self.ema_net is None else [*regions, self.ema_net.encoder, self.ema_net.decoder]

    def ema_pairs(self) -> list[EMAPair]:
        if self.ema_net is None:
            return []
        return [EMAPair("net", self.ema_net, self.net, self.hparams.ema_beta, buffers="average")]

    def configure_callbacks(self) -> list[Callback]:
        callbacks: list[Callback] = []
        if self.hparams.warmup_steps:
            callbacks.append(DecoderWarmup(self.hparams.warmup_steps, self.hparams.warmup_frozen_bn))
        if self.ema_net is not None:
            callbacks.append(EMACallback())
        return callbacks
