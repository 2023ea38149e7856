"""Joint finetuning: the baseline, with the two switches the DeFT ablation needs.

Pretrained encoder + randomly initialised decoder trained together with one CE loss on the
source domain (docs/methods.md §1). Switches:

- ``ema_beta``: keep an EMA copy of the whole net, ``θ_ema ← β θ_ema + (1 − β) θ`` after
  every optimizer step (float buffers averaged too), and evaluate/predict/export with it
  (the "joint + EMA" row of the DeFT ablation; β is not given in the seeds, 0.9999 like
  DeFT is our reading). With a warm-up the copy equals the net until warm-up ends (it is
  evaluated like DeFT's warm-up model), so averaging starts where DeFT's retentive copies
  start: from the net as warm-up leaves it, over the steps after warm-up;
- ``ema_beta_reference_steps``: β by horizon, as DeFT's ``beta_reference_steps``: a run of
  ``T`` steps after warm-up uses ``β^(R/T)``, so the start point keeps the weight ``β^R`` it has
  after ``R`` steps (joint + EMA and DeFT compared at equal horizon); the β used is logged;
- ``warmup_steps``: train the decoder alone for that many steps first, encoder frozen
  (the "+ warm-up" row); ``warmup_frozen_bn`` chooses the frozen encoder's BN mode.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..callbacks import DecoderWarmup, EMACallback, EMAPair
from ..net import SegmentationNet
from .base import SegmentationTask


class JointFinetune(SegmentationTask):
    """Joint finetuning, optionally with an EMA model for evaluation and a decoder warm-up.

    Args:
        ema_beta: β of the EMA copy used for evaluation; ``None`` (default) evaluates the net.
        ema_beta_reference_steps: when set, use ``ema_beta^(R/T)`` for a run of ``T`` steps
            after warm-up (β by horizon, as :class:`~deft_lightning.DeFT`'s
            ``beta_reference_steps``; the paper's R is 80000); ``None`` uses ``ema_beta`` as given.
        warmup_steps: decoder warm-up steps with the encoder frozen (0: none).
        warmup_frozen_bn: BN mode of the frozen encoder during warm-up.
        **kwargs: see :class:`SegmentationTask`.
    """

    def __init__(
        self,
        *args: Any,
        ema_beta: float | None = None,
        ema_beta_reference_steps: int | None = None,
        warmup_steps: int = 0,
        warmup_frozen_bn: Literal["train", "eval"] = "train",
        **kwargs: Any,
    ) -> None:
        if ema_beta is not None and not 0.0 <= ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1), got {ema_beta}")
        if ema_beta_reference_steps is not None and ema_beta_reference_steps <= 0:
            raise ValueError(f"ema_beta_reference_steps must be positive, got {ema_beta_reference_steps}")
        super().__init__(*args, **kwargs)
        self.ema_beta_used = ema_beta

    def configure_models(self) -> None:
        super().configure_models()
        self.ema_net: SegmentationNet | None = None
        if self.hparams.ema_beta is not None:
            self.ema_net = copy.deepcopy(self.net).requires_grad_(False)

    def inference_net(self) -> SegmentationNet:
        return self.net if self.ema_net is None else self.ema_net

    def ema_beta_for(self, steps: int) -> float | None:
        """The EMA β for a run of ``steps`` steps after warm-up (β by horizon when enabled)."""
        hp = self.hparams
        if hp.ema_beta is None or hp.ema_beta_reference_steps is None:
            return hp.ema_beta
        return hp.ema_beta ** (hp.ema_beta_reference_steps / steps)

    def on_train_start(self) -> None:
        hp = self.hparams
        if hp.ema_beta is None or hp.ema_beta_reference_steps is None:
            return
        # schedule_steps is the poly horizon of the whole run (SegmentationTask), warm-up included.
        steps = (hp.schedule_steps or self.trainer.estimated_stepping_batches) - hp.warmup_steps
        if not math.isfinite(steps) or steps <= 0:
            raise ValueError("ema_beta_reference_steps needs a finite run after warm-up: set trainer.max_steps "
                             "(or model.schedule_steps)")
        self.ema_beta_used = self.ema_beta_for(int(steps))
        rank_zero_info(f"joint + EMA: {int(steps)} steps after warm-up, β = {self.ema_beta_used:.6g}")

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        loss = super().training_step(batch, batch_idx)
        if self.ema_net is not None:
            self.log("train/ema_beta", self.ema_beta_used, batch_size=batch["image"].shape[0])
        return loss

    def compile_regions(self) -> list[nn.Module]:
        regions = super().compile_regions()
        return regions if self.ema_net is None else [*regions, self.ema_net.encoder, self.ema_net.decoder]

    def ema_pairs(self) -> list[EMAPair]:
        if self.ema_net is None:
            return []
        if self.hparams.warmup_steps and self.global_step <= self.hparams.warmup_steps:
            # Warm-up, the step that ends it included: the copy follows the net exactly (β = 0).
            return [EMAPair("net", self.ema_net, self.net, 0.0, buffers="copy")]
        return [EMAPair("net", self.ema_net, self.net, self.ema_beta_used, buffers="average")]

    def configure_callbacks(self) -> list[Callback]:
        callbacks: list[Callback] = []
        if self.hparams.warmup_steps:
            callbacks.append(DecoderWarmup(self.hparams.warmup_steps, self.hparams.warmup_frozen_bn))
        if self.ema_net is not None:
            callbacks.append(EMACallback())
        return callbacks
