"""deft-lightning: domain-generalizable segmentation finetuning on PyTorch Lightning + smp."""

from .callbacks import BNConversion, DecoderWarmup, EMACallback, EMAPair
from .data.datamodule import DatasetSpec, DGSegDataModule
from .merging import merge_layerwise
from .metrics import DomainIoU, iou_per_class, mean_iou
from .net import SegmentationNet
from .tasks import DAFT, DeFT, FisherTune, JointFinetune, SegmentationTask

__version__ = "0.1.0"

__all__ = [
    "BNConversion",
    "DAFT",
    "DGSegDataModule",
    "DatasetSpec",
    "DeFT",
    "DecoderWarmup",
    "DomainIoU",
    "EMACallback",
    "EMAPair",
    "FisherTune",
    "JointFinetune",
    "SegmentationNet",
    "SegmentationTask",
    "iou_per_class",
    "mean_iou",
    "merge_layerwise",
]
