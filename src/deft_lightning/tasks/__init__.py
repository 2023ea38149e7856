"""One LightningModule per finetuning method, all on :class:`SegmentationTask`."""

from .base import SegmentationTask
from .joint import JointFinetune

__all__ = ["JointFinetune", "SegmentationTask"]
