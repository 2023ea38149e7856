"""mIoU per named domain from one confusion matrix accumulated over the whole split.

The DG-segmentation protocol: for each domain, one ``C x C`` confusion matrix summed over
every pixel of every image (ignore 255), ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``, and the
mean over the classes that occur in the prediction or the ground truth (a class absent
from both has no IoU and is left out). Not averaged per image or per batch. The matrices
are torchmetrics states with a sum reduction, so DDP ranks add up before the division.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

from .data.labels import IGNORE_INDEX, NUM_CLASSES


def iou_per_class(confusion: Tensor) -> Tensor:
    """IoU of every class from a confusion matrix (rows = truth, columns = prediction);
    NaN for a class absent from both."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp_min(1), torch.full_like(union, float("nan")))


def mean_iou(confusion: Tensor) -> Tensor:
    """Mean IoU over the classes present in the prediction or the ground truth."""
    return iou_per_class(confusion).nanmean()


class DomainIoU(nn.Module):
    """One confusion matrix per named domain; ``compute()`` returns per-class IoU per domain."""

    def __init__(
        self,
        domains: Sequence[str],
        num_classes: int = NUM_CLASSES,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        for domain in domains:
            if not domain:
                raise ValueError(f"domain names must be non-empty, got {list(domains)}")
        if len(set(domains)) != len(domains):
            raise ValueError(f"domain names must be unique, got {list(domains)}")
        self.domains = list(domains)
        self._index = {domain: i for i, domain in enumerate(self.domains)}
        # A list, not a ModuleDict: domain names such as "train" or "half" clash with nn.Module attributes.
        self.confusion = nn.ModuleList(
            MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False)
            for _ in self.domains
        )

    def update(self, domain: str, preds: Tensor, target: Tensor) -> None:
        """Add a batch of predicted class maps and label maps (both ``N x H x W``)."""
        self.confusion[self._index[domain]].update(preds, target)

    def confusion_matrices(self) -> dict[str, Tensor]:
        """The confusion matrix per domain (rows: truth), summed over DDP ranks (a collective)."""
        return {domain: metric.compute() for domain, metric in zip(self.domains, self.confusion)}

    def compute(self) -> dict[str, Tensor]:
        """Per-class IoU per domain, synced across DDP ranks (a collective: call on every rank)."""
        return {domain: iou_per_class(confusion) for domain, confusion in self.confusion_matrices().items()}

    def reset(self) -> None:
        for metric in self.confusion:
            metric.reset()
