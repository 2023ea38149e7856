"""Callbacks: what happens around the training steps, reusable by every task."""

from .bn_conversion import BNConversion, convert_bn
from .ema import EMACallback, EMAPair, ema_update
from .prediction_writer import PredictionWriter
from .warmup import DecoderWarmup

__all__ = ["BNConversion", "DecoderWarmup", "EMACallback", "EMAPair", "PredictionWriter", "convert_bn", "ema_update"]
