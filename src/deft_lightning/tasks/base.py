"""SegmentationTask: the small base every finetuning method extends.

It owns what all methods share: the net, pixel cross-entropy (ignore 255), one confusion-
matrix mIoU per named evaluation domain, encoder/decoder parameter groups with their own
learning rate and weight decay, SGD or AdamW, and a poly schedule stepped every iteration.
A method overrides the hooks, not the loops:

- ``configure_models()`` builds its modules (``self.net`` here);
- ``configure_losses()``, ``configure_metrics(domains)``;
- ``training_loss(images, masks)`` the loss of one batch;
- ``param_groups()`` what the optimizer steps;
- ``inference_net()`` the plain ``SegmentationNet`` used by validate/test/predict/export;
- ``ema_pairs()``, ``warmup_frozen()``, ``on_warmup_end()`` for the callbacks;
- ``configure_callbacks()`` the callbacks the method needs (added to the trainer's).

Evaluation dataloaders come one per domain (names from the datamodule's ``eval_domains``);
the first one may be the source domain's held-out split (``source_val_domain``). Logged:
``val/<domain>/mIoU``, ``val/mIoU_mean`` (mean over the *target* domains) and
``val/mIoU_source``; at test time the same under ``test/`` plus, in the log folder, the per-class
IoU table ``test_iou.md``, ``test_results.json`` and a confusion-matrix PNG per domain.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ..callbacks.ema import EMAPair
from ..data.labels import IGNORE_INDEX, NUM_CLASSES, class_names
from ..data.transforms import lab_style_augmentation
from ..metrics import DomainIoU
from ..net import SegmentationNet
from ..sliding_window import check_windows, sliding_window_logits
from ..results import write_test_results
from ..speedups import RegionsCompiler, images_channels_last, to_channels_last, use_channels_last


class SegmentationTask(LightningModule):
    """Base task: one net trained with CE on the source domain, evaluated per domain.

    Args:
        arch, encoder_name, encoder_weights, num_classes, arch_kwargs: the net
            (see :class:`~deft_lightning.net.SegmentationNet`).
        optimizer: ``"sgd"`` (momentum, Nesterov off) or ``"adamw"``.
        lr, weight_decay: encoder group; ``decoder_lr``/``decoder_weight_decay`` default to them.
        momentum: SGD momentum.
        poly_power: ``lr_t = lr · (1 − t/T)^power`` stepped every iteration over ``T`` =
            ``schedule_steps`` or, when unset, the trainer's total optimizer steps.
        domains: evaluation domain names, only needed without a datamodule that has
            ``eval_domains``.
        style_augmentation: append a LAB-restyled copy of every training batch, labels
            duplicated (DeFT's recipe; :func:`~deft_lightning.data.transforms.lab_style_augmentation`).
        sliding_window, sliding_stride: evaluate (validate/test/predict) with sliding-window
            inference, windows of (height, width) every (height, width) pixels with logits
            averaged over overlaps (mmsegmentation's ``slide``;
            :mod:`~deft_lightning.sliding_window`); ``None`` (default): whole-image inference,
            the DG protocol. The stride defaults to two thirds of the window.
        channels_last: nets and images in the channels_last memory format; ``None`` (default):
            on for CUDA and CPU devices, where it is faster (:mod:`~deft_lightning.speedups`).
        compile: ``torch.compile`` every encoder and decoder of the task one by one
            (``compile_regions()``), falling back to eager with one warning on failure.
        compile_options: keyword arguments of ``torch.compile`` (``mode``, ``backend``, ...).
    """

    #: Hyperparameters that fix the weights' shapes: taken from a checkpoint even where the
    #: command line or a config gives another value (``deft_lightning.checkpoint_args``).
    weight_shape_hparams: tuple[str, ...] = ("arch", "encoder_name", "encoder_weights", "num_classes", "arch_kwargs")

    def __init__(
        self,
        arch: str = "Unet",
        encoder_name: str = "mobilenet_v2",
        encoder_weights: str | None = "imagenet-offline",
        num_classes: int = NUM_CLASSES,
        arch_kwargs: dict[str, Any] | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 1e-2,
        decoder_lr: float | None = None,
        weight_decay: float = 5e-4,
        decoder_weight_decay: float | None = None,
        momentum: float = 0.9,
        poly_power: float = 0.9,
        schedule_steps: int | None = None,
        domains: list[str] | None = None,
        style_augmentation: bool = False,
        sliding_window: tuple[int, int] | None = None,
        sliding_stride: tuple[int, int] | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if sliding_window is not None:  # refused now, not at the first validation
            check_windows(*self.sliding_windows())
        self.configure_models()
        self.configure_losses()
        self.metrics: DomainIoU | None = None
        self.source_val_domain: str | None = None
        self.uses_channels_last = False
        self.compiler: RegionsCompiler | None = None
        self.test_ious: dict[str, Tensor] = {}
        if domains:
            self.configure_metrics(domains)

    # ---- hooks a method overrides -------------------------------------------------
    def configure_models(self) -> None:
        hp = self.hparams
        self.net = SegmentationNet(
            hp.arch, hp.encoder_name, hp.encoder_weights, hp.num_classes, hp.arch_kwargs
        )

    def configure_losses(self) -> None:
        self.criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def configure_metrics(self, domains: list[str]) -> None:
        self.metrics = DomainIoU(domains, self.hparams.num_classes)

    def training_loss(self, images: Tensor, masks: Tensor) -> Tensor:
        return self.criterion(self.net(images), masks)

    def inference_net(self) -> SegmentationNet:
        return self.net

    def trainable_modules(self) -> tuple[nn.Module, nn.Module]:
        """The (encoder, decoder) the optimizer steps."""
        return self.net.encoder, self.net.decoder

    def param_groups(self) -> list[dict[str, Any]]:
        hp = self.hparams
        encoder, decoder = self.trainable_modules()
        return [
            {"name": "encoder", "params": list(encoder.parameters()), "lr": hp.lr,
             "weight_decay": hp.weight_decay},
            {"name": "decoder", "params": list(decoder.parameters()),
             "lr": hp.lr if hp.decoder_lr is None else hp.decoder_lr,
             "weight_decay": hp.weight_decay if hp.decoder_weight_decay is None else hp.decoder_weight_decay},
        ]

    def compile_regions(self) -> list[nn.Module]:
        """The modules ``compile=True`` compiles, each on its own: the trained encoder and decoder."""
        return list(self.trainable_modules())

    def ema_pairs(self) -> list[EMAPair]:
        return []

    def warmup_frozen(self) -> list[nn.Module]:
        return [self.net.encoder]

    def on_warmup_end(self) -> None:
        """Called once by the warm-up callback when the frozen modules are released."""

    # ---- set-up --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        domains = getattr(datamodule, "eval_domains", None) or self.hparams.domains
        self.source_val_domain = getattr(datamodule, "source_val_domain", None)
        data_classes = getattr(datamodule, "num_classes", None)
        if stage != "predict" and data_classes is not None and self.hparams.num_classes < data_classes:
            raise ValueError(f"model num_classes={self.hparams.num_classes}, but the data's labels are train ids "
                             f"0..{data_classes - 1}: set --model.init_args.num_classes={data_classes}")
        if domains and (self.metrics is None or self.metrics.domains != list(domains)):
            self.configure_metrics(list(domains))
        self.configure_speedups(self.trainer.strategy.root_device)

    def configure_speedups(self, device: torch.device) -> None:
        """channels_last and regional ``torch.compile`` as configured, for nets on ``device``
        (``setup`` calls it; a training loop without a Trainer calls it itself)."""
        if use_channels_last(self.hparams.channels_last, device):
            to_channels_last(self)
            self.uses_channels_last = True
        if self.hparams.compile:
            self.compiler = self.compiler or RegionsCompiler(self.hparams.compile_options)
            self.compiler.compile(self.compile_regions())

    def input_images(self, images: Tensor) -> Tensor:
        """Images in the memory format the nets use."""
        return images_channels_last(images) if self.uses_channels_last else images

    def forward(self, images: Tensor) -> Tensor:
        """Logits of the inference net: whole-image, or sliding-window when ``sliding_window`` is set."""
        if self.hparams.get("sliding_window") is None:
            return self.inference_net()(images)
        return sliding_window_logits(self.inference_net(), images, *self.sliding_windows())

    def sliding_windows(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(window, stride) of sliding-window inference, the stride defaulting to two thirds of the window."""
        window = tuple(self.hparams.sliding_window)
        stride = self.hparams.get("sliding_stride") or tuple(max(1, 2 * side // 3) for side in window)
        return window, tuple(stride)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # `deft-lightning export` rebuilds the task from its class and hyperparameters.
        checkpoint["task_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    # ---- training ------------------------------------------------------------------
    def training_inputs(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Images and masks a training step trains on: the batch, with its LAB-restyled copy
        appended when ``style_augmentation`` is on, images in the nets' memory format."""
        images, masks = batch["image"], batch["mask"]
        if self.hparams.style_augmentation:
            images, masks = lab_style_augmentation(images, masks)
        return self.input_images(images), masks

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.training_loss(*self.training_inputs(batch))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.compiler is not None and self.global_step == 1:
            self.compiler.report()

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = [group for group in self.param_groups() if group["params"]]
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        else:
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {hp.optimizer!r}")
        total = hp.schedule_steps or self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ValueError("the poly schedule needs a finite run: set trainer.max_steps or model.schedule_steps")
        power = hp.poly_power
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1.0 - step / total) ** power
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- evaluation ------------------------------------------------------------------
    def _domain_of(self, dataloader_idx: int) -> str:
        if self.metrics is None:
            raise RuntimeError(
                "no evaluation domains: use a datamodule with `eval_domains` or pass `domains=[...]`"
            )
        if dataloader_idx >= len(self.metrics.domains):
            raise IndexError(
                f"evaluation dataloader {dataloader_idx} has no domain name; "
                f"known domains: {self.metrics.domains}"
            )
        return self.metrics.domains[dataloader_idx]

    def _evaluate_step(self, batch: dict[str, Any], dataloader_idx: int) -> None:
        preds = self(self.input_images(batch["image"])).argmax(1)
        self.metrics.update(self._domain_of(dataloader_idx), preds, batch["mask"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate_step(batch, dataloader_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate_step(batch, dataloader_idx)

    def _log_domain_miou(self, stage: str) -> dict[str, Tensor]:
        ious = self.metrics.compute()
        self.metrics.reset()
        mious = {domain: iou.nanmean() for domain, iou in ious.items()}
        for domain, miou in mious.items():
            self.log(f"{stage}/{domain}/mIoU", miou.float())
        targets = [miou for domain, miou in mious.items() if domain != self.source_val_domain]
        if targets:
            self.log(f"{stage}/mIoU_mean", torch.stack(targets).mean().float(), prog_bar=True)
        if self.source_val_domain in mious:
            self.log(f"{stage}/mIoU_source", mious[self.source_val_domain].float())
        return ious

    def on_validation_epoch_end(self) -> None:
        ious = self._log_domain_miou("val")
        if self.trainer.state.fn == "validate":  # `validate` alone: one table, domains as columns
            rank_zero_info("\n" + format_iou_table(ious, self.source_val_domain))

    def on_test_epoch_end(self) -> None:
        confusions = self.metrics.confusion_matrices()  # before _log_domain_miou resets them
        ious = self._log_domain_miou("test")
        self.test_ious = ious  # read by callbacks in on_test_end (e.g. LogPredictions' table)
        table = format_iou_table(ious, self.source_val_domain)
        rank_zero_info("\n" + table)
        log_dir = self.trainer.log_dir  # a broadcast under DDP: asked on every rank
        if self.trainer.is_global_zero and log_dir:
            path = Path(log_dir) / "test_iou.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(table + "\n")
            # Beside it: test_results.json (confusion matrices, per-class IoU) and confusion_<domain>.png.
            write_test_results(path.parent, confusions, self.source_val_domain)

    # ---- predict ---------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return {"pred": self(self.input_images(batch["image"])).argmax(1), "image": batch["image"], "name": batch["name"],
                "domain": batch["domain"]}


def format_iou_table(ious: dict[str, Tensor], source_domain: str | None = None) -> str:
    """A Markdown table: one row per class, one column per domain, then mIoU rows."""
    domains = list(ious)
    header = "| class | " + " | ".join(
        f"{d} (source)" if d == source_domain else d for d in domains
    ) + " |"
    lines = [header, "|" + "---|" * (len(domains) + 1)]

    def cell(value: float) -> str:
        return "-" if math.isnan(value) else f"{100 * value:.1f}"

    for index, name in enumerate(class_names(len(next(iter(ious.values()))))):
        values = [float(ious[d][index]) for d in domains]
        if all(math.isnan(v) for v in values):
            continue
        lines.append(f"| {name} | " + " | ".join(cell(v) for v in values) + " |")
    lines.append("| **mIoU** | " + " | ".join(cell(float(ious[d].nanmean())) for d in domains) + " |")
    targets = [float(ious[d].nanmean()) for d in domains if d != source_domain]
    if targets:
        lines.append(f"\nmean mIoU over the {len(targets)} target domains: {100 * sum(targets) / len(targets):.1f}")
    return "\n".join(lines)
