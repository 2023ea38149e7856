"""One LightningModule per finetuning method, all on :class:`SegmentationTask`."""

from .base import SegmentationTask
from .daft import DAFT
from .deft import DeFT
from .fishertune import FisherTune
from .joint import JointFinetune

__all__ = ["DAFT", "DeFT", "FisherTune", "JointFinetune", "SegmentationTask"]
