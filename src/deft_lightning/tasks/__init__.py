"""One LightningModule per finetuning method, all on :class:`SegmentationTask`."""

from .base import SegmentationTask
from .deft import DeFT
from .joint import JointFinetune

__all__ = ["DeFT", "JointFinetune", "SegmentationTask"]
