"""Callbacks: what happens around the training steps, reusable by every task."""

from .bn_conversion import BNConversion, convert_bn
from .ema import EMACallback, EMAPair, ema_update
from .log_predictions import LogPredictions
from .prediction_writer import PredictionWriter
from .run_summary import RunSummary
from .warmup import DecoderWarmup

__all__ = ["BNConversion", "DecoderWarmup", "EMACallback", "EMAPair", "LogPredictions", "PredictionWriter", "RunSummary", "convert_bn", "ema_update"]
