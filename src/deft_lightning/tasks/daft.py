"""DAFT (Domain-Aware Fine-Tuning, Ha et al., AAAI 2024) and the baselines of its Table 1.

DAFT = BN conversion (Algorithm 1, :class:`~deft_lightning.callbacks.BNConversion`, run once
before the first step) + integrated LP-FT: one stage in which the feature extractor ``f_θ``
(the encoder) and the head ``g_w`` (the smp decoder *and* segmentation head) train together,
each with its own learning rate, ``η_θ = lr`` and ``η_w = decoder_lr``, BN in train mode.

Head initialisation **(our reading)**: the paper zero-initialises a one-layer head so that the
encoder's gradient is zero until the head has learnt something, and keeps a multi-layer head
at its random init. A segmentation decoder is a multi-layer head, so the paper's literal rule
is ``head_init="random"``; the default ``"zero"`` zeroes only the segmentation head's final
conv (weight and bias), keeping the rest of the decoder random: logits start at exactly zero,
the encoder's (and decoder's) first gradient is exactly zero and only the final conv learns
at first, which is the paper's stated aim.

Table 1 (and the Table 5 ablation) are configurations of this one task (``configs/``):

=====  ==========  =======================  =================  =================
row    head init   learning rates           BN mode            BN conversion
=====  ==========  =======================  =================  =================
LP     random      encoder frozen           encoder eval       off
FT     random      lr == decoder_lr         train              off (Table 5: on)
LP-FT  LP weights  lr == decoder_lr, small  eval               off (Table 5: on)
DAFT   zero        lr != decoder_lr         train              on (Table 5: off)
=====  ==========  =======================  =================  =================

LP-FT is two runs: LP, then FT initialised from the LP run's checkpoint
(``init_checkpoint``) with every BN layer in eval ("test") mode and a small learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Callback
from torch import nn

from ..callbacks import BNConversion
from ..callbacks.warmup import _set_bn_eval
from ..safe_load import CheckpointError, load_checkpoint
from .base import SegmentationTask

PARTS = ("encoder", "decoder")


def _net_name(hparams: Any) -> str:
    return "/".join(str(hparams.get(key)) for key in ("arch", "encoder_name", "num_classes"))


class DAFT(SegmentationTask):
    """Integrated LP-FT with BN conversion; its switches give LP, FT and LP-FT.

    Args:
        head_init: ``"zero"`` zeroes the segmentation head's final conv (our reading, see the
            module docstring); ``"random"`` keeps smp's init (the paper's rule for a
            multi-layer head).
        bn_mode: BN mode of the trained layers during finetuning: ``"train"`` (batch
            statistics, DAFT and FT) or ``"eval"`` (running statistics fixed: LP-FT's "test
            mode").
        freeze_encoder: linear probing: the encoder gets no gradient, is left out of the
            optimizer and keeps its BN layers in eval mode; only the decoder trains.
        bn_conversion: convert BN layers to the training data's statistics before the first
            step (:class:`~deft_lightning.callbacks.BNConversion`).
        bn_conversion_parts: which of ``"encoder"``/``"decoder"`` to convert. Default: the
            encoder, the pretrained part (our reading: the paper converts "the pre-trained
            model"; a random decoder's BN layers hold no source statistics).
        bn_conversion_batches: calibration batches per process; ``None`` makes one pass over
            the training data (Algorithm 1).
        init_checkpoint: a task checkpoint whose ``net`` weights initialise this run (LP-FT:
            the LP run's). Loaded when fitting starts, before a resumed checkpoint is restored,
            so ``ckpt_path`` still wins on resume.
        decoder_lr: ``η_w``, the head's (decoder's) learning rate; default 0.1, 10x the default
            ``lr`` = ``η_θ`` (configs/daft.yaml; FT/LP/LP-FT set it equal to ``lr`` or their own).
        **kwargs: see :class:`SegmentationTask`; ``lr`` is ``η_θ`` (encoder),
            ``weight_decay``/``decoder_weight_decay`` alike
            (the paper is silent on weight decay: our reading, the base default 5e-4).
    """

    def __init__(
        self,
        *args: Any,
        head_init: Literal["zero", "random"] = "zero",
        bn_mode: Literal["train", "eval"] = "train",
        freeze_encoder: bool = False,
        bn_conversion: bool = True,
        bn_conversion_parts: Sequence[str] = ("encoder",),
        bn_conversion_batches: int | None = None,
        init_checkpoint: str | None = None,
        decoder_lr: float | None = 0.1,
        **kwargs: Any,
    ) -> None:
        if head_init not in ("zero", "random"):
            raise ValueError(f"head_init must be 'zero' or 'random', got {head_init!r}")
        if bn_mode not in ("train", "eval"):
            raise ValueError(f"bn_mode must be 'train' or 'eval', got {bn_mode!r}")
        if not bn_conversion_parts or set(bn_conversion_parts) - set(PARTS):
            raise ValueError(f"bn_conversion_parts must be a non-empty subset of {PARTS}, "
                             f"got {list(bn_conversion_parts)}")
        super().__init__(*args, decoder_lr=decoder_lr, **kwargs)
        self._init_checkpoint_loaded = False
        self._missing_init_checkpoint: str | None = None

    def configure_models(self) -> None:
        super().configure_models()
        if self.hparams.head_init == "zero":
            convs = [m for m in self.net.decoder.head.modules() if isinstance(m, nn.Conv2d)]
            if not convs:
                raise ValueError("head_init='zero' needs a segmentation head with a Conv2d")
            nn.init.zeros_(convs[-1].weight)
            if convs[-1].bias is not None:
                nn.init.zeros_(convs[-1].bias)
        if self.hparams.freeze_encoder:
            self.net.encoder.requires_grad_(False)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        path = self.hparams.init_checkpoint
        if stage == "fit" and path and not self._init_checkpoint_loaded:
            if not Path(path).exists():  # an error in on_fit_start unless a resumed checkpoint holds the weights
                self._missing_init_checkpoint = path
                return
            checkpoint = load_checkpoint(path)
            state = checkpoint.get("state_dict")
            if state is None:
                raise CheckpointError(f"init_checkpoint {path} is not a task checkpoint (it has no 'state_dict')")
            net_state = {key[len("net."):]: value for key, value in state.items() if key.startswith("net.")}
            try:
                self.net.load_state_dict(net_state)
            except RuntimeError as error:  # another arch, encoder or class count
                raise CheckpointError(
                    f"init_checkpoint {path} holds a {_net_name(checkpoint.get('hyper_parameters') or {})} net "
                    f"(arch/encoder/classes), this run builds {_net_name(self.hparams)}: give a checkpoint of the same net "
                    f"({' '.join(str(error).split())[:120]}...)") from None
            self._init_checkpoint_loaded = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming: the checkpoint holds the weights, so the init checkpoint may have moved since.
        self._init_checkpoint_loaded, self._missing_init_checkpoint = True, None

    def on_fit_start(self) -> None:
        if self._missing_init_checkpoint is not None:
            load_checkpoint(self._missing_init_checkpoint)  # raises CheckpointError naming the file

    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups()
        if self.hparams.freeze_encoder:
            groups = [group for group in groups if group["name"] != "encoder"]
        return groups

    def bn_conversion_modules(self) -> list[nn.Module]:
        """The modules whose BN layers :class:`BNConversion` converts."""
        return [getattr(self.net, part) for part in PARTS if part in self.hparams.bn_conversion_parts]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning puts the whole module back in train mode (at fit start, after validation);
        # BN layers that must not use batch statistics go back to eval before every step.
        if self.hparams.bn_mode == "eval":
            _set_bn_eval(self.net)
        elif self.hparams.freeze_encoder:
            _set_bn_eval(self.net.encoder)

    def configure_callbacks(self) -> list[Callback]:
        if not self.hparams.bn_conversion:
            return []
        return [BNConversion(self.hparams.bn_conversion_batches)]
