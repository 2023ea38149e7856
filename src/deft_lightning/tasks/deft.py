"""DeFT: Decoupled Finetuning for domain-generalizable segmentation (Pahk et al., ICLR 2025).

Four components (docs/methods.md §2): the adaptive encoder ``e1`` and adaptive decoder ``d2``
(ACs, stepped by the optimizer) and the retentive decoder ``d~1`` and retentive encoder
``e~2`` (RCs, ``requires_grad=False`` from construction, moved only by an EMA of the
*opposite* pathway's AC).

**Stage 1, decoder warm-up** (``warmup_steps``, the :class:`DecoderWarmup` callback): the
encoder stays at its pretrained parameters and the decoder ``d2`` learns ``CE(d2(e~2(x)), y)``.
The frozen encoder runs in BN train mode by default (the authors' code), so its running
statistics move; ``warmup_frozen_bn="eval"`` keeps them. The decoder's lr and weight decay
may differ in warm-up (``warmup_lr``, ``warmup_weight_decay``; the authors use 10x weight decay).

**Stage 2 start:** ``e1 = e~2 =`` pretrained encoder parameters and ``d~1 = d2 =`` the warmed-up
decoder (parameters and buffers). BN buffers, ``stage2_encoder_bn``: ``"split"`` (authors)
``e~2`` keeps the statistics that moved during warm-up, ``e1`` the pretrained ones.
The optimizer state is reset (the authors build fresh stage-2 optimizers).

**Stage 2 step:** one backward of the sum of the two pathways' losses, one optimizer over
``{e1, d2}`` (disjoint parameter sets, so the gradients equal the authors' two backward
passes; no clipping)::

    L = CE(d~1(e1(x)), y) + CE(d2(sg(e~2(x))), y)

Gradients flow through ``d~1`` into ``e1``; ``d~1`` itself has no gradient. ``sg`` is
structural: neither ``e~2``'s parameters nor the images require gradients, so ``e~2(x)``
records no graph. After every optimizer step (:class:`EMACallback`, one fused foreach lerp,
no bias correction)::

    d~1 ← β_d d~1 + (1 − β_d) d2,        e~2 ← β_e e~2 + (1 − β_e) e1

**β by horizon** (our extension): with ``beta_reference_steps = R`` (the paper's 80000) a run
whose stage 2 has ``T`` steps uses ``β^(R/T)``, so the start point keeps the same weight
``β^R`` at the end of stage 2 as in the paper. The β actually used is logged.

**Poly schedule:** both stages run ``lr (1 − t/T)^power`` over the stage-2 horizon ``T``
(``schedule_steps`` or, when unset, the run's steps after warm-up); stage 2 restarts it at
``t = 0``, as the authors' separate warm-up and stage-2 schedulers do.

**Final model** (``final_model``): I ``e1+d2``, II ``e1+d~1``, III ``e~2+d2``, IV ``e~2+d~1``
(the paper's, default). During warm-up evaluation uses the frozen encoder with the decoder
being warmed up (``e~2+d2``), the only pair with a trained decoder then.

**Distance regularisation** (our reading, off by default), stage 2 only, toward the ACs'
stage-2 start ``θ_0``: ``"l2sp"`` adds ``λ Σ ||θ_AC − θ_AC,0||²`` to the loss;
``"projection"`` projects every AC parameter tensor back into the Frobenius ball of radius
``r`` around ``θ_0`` after every optimizer step (Gouk et al. 2021), before the EMA update.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ..callbacks import DecoderWarmup, EMACallback, EMAPair
from ..net import SegmentationNet
from .base import SegmentationTask

#: Final-model pairs of the paper's ablation: (encoder, decoder) attribute names.
FINAL_MODELS: dict[str, tuple[str, str]] = {
    "I": ("adaptive_encoder", "adaptive_decoder"),
    "II": ("adaptive_encoder", "retentive_decoder"),
    "III": ("retentive_encoder", "adaptive_decoder"),
    "IV": ("retentive_encoder", "retentive_decoder"),
}
#: Evaluated during warm-up: the frozen encoder and the decoder being warmed up.
WARMUP_MODEL = ("retentive_encoder", "adaptive_decoder")
#: The paper's stage-2 length (GTAV, batch 16), the reference of ``beta_reference_steps``.
PAPER_STAGE2_STEPS = 80_000


class DeFT(SegmentationTask):
    """Decoupled finetuning: two pathways with opposite adaptive/retentive roles.

    Args:
        warmup_steps: stage-1 steps (decoder warm-up, encoder frozen); the paper's GTAV run
            warms up for 10 epochs, about 7,740 steps at batch 16.
        warmup_frozen_bn: BN mode of the frozen encoder during warm-up.
        warmup_lr, warmup_weight_decay: the decoder's lr and weight decay during warm-up
            (``None``: its stage-2 values; default weight decay 5e-3, the authors' GTAV value).
        stage2_encoder_bn: BN buffers of the encoders at stage-2 start: ``"split"`` (authors:
            ``e~2`` warmed, ``e1`` pretrained), ``"pretrained"`` or ``"warmed"`` for both.
        beta_encoder, beta_decoder: EMA decays β_e (``e~2`` follows ``e1``) and β_d (``d~1``
            follows ``d2``).
        beta_reference_steps: when set, use ``β^(R/T)`` for a stage 2 of ``T`` steps (β by
            horizon; default the paper's R, :data:`PAPER_STAGE2_STEPS`, the identity for a
            paper-length run); ``None`` uses β as given.
        ema_buffers: RC buffers: ``"none"`` (authors: from the RCs' own forward passes),
            ``"average"`` or ``"copy"`` (see :mod:`deft_lightning.callbacks.ema`).
        final_model: ``"I"``, ``"II"``, ``"III"`` or ``"IV"`` (see :data:`FINAL_MODELS`).
        distance_regularization: ``None``, ``"l2sp"`` or ``"projection"``.
        l2sp_weight: λ of the L2-SP penalty.
        projection_radius: r of the projection (per parameter tensor, Frobenius norm).
        style_augmentation: LAB style-augmented copy of every batch (the DeFT recipe; on by default).
        **kwargs: see :class:`SegmentationTask` (``schedule_steps`` is the stage-2 horizon).

    The defaults are the method of configs/deft.yaml; that config differs only in
    ``warmup_steps`` (200 of a 2,000-step synthetic run instead of the paper's 7,740).
    """

    #: ``distance_regularization`` adds the ACs' start copies to the weights.
    weight_shape_hparams = (*SegmentationTask.weight_shape_hparams, "distance_regularization")

    def __init__(
        self,
        *args: Any,
        warmup_steps: int = 7740,
        warmup_frozen_bn: Literal["train", "eval"] = "train",
        warmup_lr: float | None = None,
        warmup_weight_decay: float | None = 5e-3,
        stage2_encoder_bn: Literal["split", "pretrained", "warmed"] = "split",
        beta_encoder: float = 0.9999,
        beta_decoder: float = 0.9999,
        beta_reference_steps: int | None = PAPER_STAGE2_STEPS,
        ema_buffers: Literal["none", "average", "copy"] = "none",
        final_model: Literal["I", "II", "III", "IV"] = "IV",
        distance_regularization: Literal["l2sp", "projection"] | None = None,
        l2sp_weight: float = 0.01,
        projection_radius: float = 1.0,
        style_augmentation: bool = True,
        **kwargs: Any,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        for name, beta in (("beta_encoder", beta_encoder), ("beta_decoder", beta_decoder)):
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {beta}")
        if beta_reference_steps is not None and beta_reference_steps <= 0:
            raise ValueError(f"beta_reference_steps must be positive or None, got {beta_reference_steps}")
        if final_model not in FINAL_MODELS:
            raise ValueError(f"final_model must be one of {list(FINAL_MODELS)}, got {final_model!r}")
        if stage2_encoder_bn not in ("split", "pretrained", "warmed"):
            raise ValueError(f"stage2_encoder_bn must be 'split', 'pretrained' or 'warmed', got {stage2_encoder_bn!r}")
        if distance_regularization not in (None, "l2sp", "projection"):
            raise ValueError(f"distance_regularization must be None, 'l2sp' or 'projection', "
                             f"got {distance_regularization!r}")
        super().__init__(*args, style_augmentation=style_augmentation, **kwargs)

    # ---- the four components -----------------------------------------------------------
    def configure_models(self) -> None:
        hp = self.hparams
        net = SegmentationNet(hp.arch, hp.encoder_name, hp.encoder_weights, hp.num_classes, hp.arch_kwargs)
        self.adaptive_encoder = net.encoder
        self.retentive_decoder = copy.deepcopy(net.decoder).requires_grad_(False)
        self.retentive_encoder = copy.deepcopy(net.encoder).requires_grad_(False)
        self.adaptive_decoder = net.decoder
        # Input normalisation and smp config, no weights: `frame.with_parts(e, d)` assembles a pair.
        self.frame = net.with_parts(None, None)
        self.adaptive_start: nn.ModuleDict | None = None
        if hp.distance_regularization is not None:
            self.adaptive_start = nn.ModuleDict(
                {"encoder": copy.deepcopy(net.encoder), "decoder": copy.deepcopy(net.decoder)}
            ).requires_grad_(False)
        self.stage = 1 if hp.warmup_steps else 2
        self.ema_betas = (hp.beta_encoder, hp.beta_decoder)

    def pair(self, encoder: str, decoder: str) -> SegmentationNet:
        """The net made of two of the components, by attribute name (no copy)."""
        return self.frame.with_parts(getattr(self, encoder), getattr(self, decoder))

    def inference_net(self) -> SegmentationNet:
        return self.pair(*(FINAL_MODELS[self.hparams.final_model] if self.stage == 2 else WARMUP_MODEL))

    def trainable_modules(self) -> tuple[nn.Module, nn.Module]:
        return self.adaptive_encoder, self.adaptive_decoder

    def compile_regions(self) -> list[nn.Module]:
        return [self.adaptive_encoder, self.retentive_decoder, self.retentive_encoder, self.adaptive_decoder]

    # The stage lives in the checkpoint's state dict, so export and evaluation know it too.
    def get_extra_state(self) -> dict[str, int]:
        return {"stage": self.stage}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.stage = state["stage"]

    # ---- training ------------------------------------------------------------------------
    def training_loss(self, images: Tensor, masks: Tensor) -> Tensor:
        if self.stage == 1:
            return self.criterion(self.pair(*WARMUP_MODEL)(images), masks)
        loss_encoder = self.criterion(self.pair("adaptive_encoder", "retentive_decoder")(images), masks)
        loss_decoder = self.criterion(self.pair("retentive_encoder", "adaptive_decoder")(images), masks)
        beta_encoder, beta_decoder = self.ema_betas
        logged = {"train/loss_pathway1": loss_encoder, "train/loss_pathway2": loss_decoder,
                  "train/beta_encoder": beta_encoder, "train/beta_decoder": beta_decoder}
        loss = loss_encoder + loss_decoder
        if self.hparams.distance_regularization == "l2sp":
            penalty = self.distance_to_start()
            logged["train/l2sp"] = penalty
            loss = loss + self.hparams.l2sp_weight * penalty
        self.log_dict(logged, batch_size=images.shape[0])
        return loss

    def _adaptive_and_start(self) -> tuple[list[Tensor], list[Tensor]]:
        adaptive = [*self.adaptive_encoder.parameters(), *self.adaptive_decoder.parameters()]
        start = [*self.adaptive_start["encoder"].parameters(), *self.adaptive_start["decoder"].parameters()]
        return adaptive, start

    def distance_to_start(self) -> Tensor:
        """``Σ ||θ_AC − θ_AC,0||²`` over both adaptive components (differentiable)."""
        adaptive, start = self._adaptive_and_start()
        return torch.stack([(p - p0).pow(2).sum() for p, p0 in zip(adaptive, start)]).sum()

    @torch.no_grad()
    def project_to_start(self) -> None:
        """``θ ← θ_0 + (θ − θ_0) · min(1, r / ||θ − θ_0||)`` for every AC parameter tensor."""
        adaptive, start = self._adaptive_and_start()
        deltas = torch._foreach_sub(adaptive, start)
        norms = torch.stack(torch._foreach_norm(deltas))
        scales = (self.hparams.projection_radius / norms.clamp(min=1e-12)).clamp(max=1.0)
        torch._foreach_mul_(deltas, list(scales.unbind()))
        torch._foreach_add_(deltas, start)
        torch._foreach_copy_(adaptive, deltas)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.hparams.distance_regularization == "projection" and self.stage == 2:
            self.project_to_start()

    # ---- stages --------------------------------------------------------------------------
    @property
    def stage_two_steps(self) -> int:
        """Stage-2 length T: ``schedule_steps`` or the run's optimizer steps after warm-up."""
        hp = self.hparams
        steps = hp.schedule_steps or self.trainer.estimated_stepping_batches - hp.warmup_steps
        if not math.isfinite(steps) or steps <= 0:
            raise ValueError(f"DeFT needs a finite stage 2 after {hp.warmup_steps} warm-up steps: "
                             "set trainer.max_steps (or model.schedule_steps)")
        return int(steps)

    def betas_for(self, stage_two_steps: int) -> tuple[float, float]:
        """(β_e, β_d) for a stage 2 of that many steps (β by horizon when enabled)."""
        hp = self.hparams
        exponent = 1.0 if hp.beta_reference_steps is None else hp.beta_reference_steps / stage_two_steps
        return hp.beta_encoder ** exponent, hp.beta_decoder ** exponent

    def on_train_start(self) -> None:
        self.ema_betas = self.betas_for(self.stage_two_steps)
        rank_zero_info(f"DeFT: stage 2 of {self.stage_two_steps} steps, β_e = {self.ema_betas[0]:.6g}, "
                       f"β_d = {self.ema_betas[1]:.6g}")

    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups()
        if self.stage == 1 and self.hparams.warmup_weight_decay is not None:
            next(g for g in groups if g["name"] == "decoder")["weight_decay"] = self.hparams.warmup_weight_decay
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        config = super().configure_optimizers()
        optimizer = config["optimizer"]
        factors = [self._poly_factor(group["name"], group["initial_lr"]) for group in optimizer.param_groups]
        config["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        return config

    def _poly_factor(self, group_name: str, lr: float):
        hp = self.hparams
        warmup, horizon, power = hp.warmup_steps, self.stage_two_steps, hp.poly_power
        warmup_scale = hp.warmup_lr / lr if group_name == "decoder" and hp.warmup_lr is not None else 1.0

        def factor(step: int) -> float:
            if step < warmup:
                return warmup_scale * max(0.0, 1.0 - step / horizon) ** power
            return max(0.0, 1.0 - (step - warmup) / horizon) ** power

        return factor

    def warmup_frozen(self) -> list[nn.Module]:
        return [self.adaptive_encoder, self.retentive_encoder]

    @torch.no_grad()
    def on_warmup_end(self) -> None:
        """Stage-2 start: ``d~1 = d2``, encoder BN buffers by ``stage2_encoder_bn``, fresh optimizer."""
        # The warm-up callback released both encoders; e~2 only ever follows e1 by EMA.
        self.retentive_encoder.requires_grad_(False)
        self.retentive_decoder.load_state_dict(self.adaptive_decoder.state_dict())
        mode = self.hparams.stage2_encoder_bn
        if mode == "pretrained":
            _copy_buffers(self.retentive_encoder, self.adaptive_encoder)
        elif mode == "warmed":
            _copy_buffers(self.adaptive_encoder, self.retentive_encoder)
        if self.adaptive_start is not None:
            self.adaptive_start["encoder"].load_state_dict(self.adaptive_encoder.state_dict())
            self.adaptive_start["decoder"].load_state_dict(self.adaptive_decoder.state_dict())
        self.stage = 2
        optimizer = self.trainer.optimizers[0]
        optimizer.state.clear()
        weight_decay = {group["name"]: group["weight_decay"] for group in self.param_groups()}
        for group in optimizer.param_groups:
            group["weight_decay"] = weight_decay[group["name"]]

    def ema_pairs(self) -> list[EMAPair]:
        if self.stage == 1:
            return []
        beta_encoder, beta_decoder = self.ema_betas
        buffers = self.hparams.ema_buffers
        return [EMAPair("decoder", self.retentive_decoder, self.adaptive_decoder, beta_decoder, buffers),
                EMAPair("encoder", self.retentive_encoder, self.adaptive_encoder, beta_encoder, buffers)]

    def configure_callbacks(self) -> list[Callback]:
        callbacks: list[Callback] = [EMACallback()]
        if self.hparams.warmup_steps:
            callbacks.insert(0, DecoderWarmup(self.hparams.warmup_steps, self.hparams.warmup_frozen_bn))
        return callbacks


def _copy_buffers(target: nn.Module, source: nn.Module) -> None:
    sources = dict(source.named_buffers())
    for name, buffer in target.named_buffers():
        buffer.copy_(sources[name])
