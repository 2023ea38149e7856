"""Callbacks: what happens around the training steps, reusable by every task."""

from .ema import EMACallback, EMAPair, ema_update
from .prediction_writer import PredictionWriter
from .warmup import DecoderWarmup

__all__ = ["DecoderWarmup", "EMACallback", "EMAPair", "PredictionWriter", "ema_update"]
