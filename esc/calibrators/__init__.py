"""Activation calibrators: Max, Percentile, Entropy (KL), MSE (ESC lives in :mod:`esc.calibrators.esc`)."""
from esc.calibrators.base import CalibrationData, CalibrationResult, Calibrator, Observer, StatisticCalibrator
from esc.calibrators.entropy import EntropyCalibrator
from esc.calibrators.histogram import HistogramObserver
from esc.calibrators.minmax import MinMaxCalibrator
from esc.calibrators.mse import MSECalibrator, mse_clip
from esc.calibrators.percentile import PercentileCalibrator

#: Statistic calibrators by name, with their defaults: the fixed calibrators a scope role may name.
BY_NAME = {"minmax": MinMaxCalibrator, "percentile": PercentileCalibrator, "entropy": EntropyCalibrator, "mse": MSECalibrator}

__all__ = ["BY_NAME", "CalibrationData", "CalibrationResult", "Calibrator", "Observer", "StatisticCalibrator", "HistogramObserver",
           "MinMaxCalibrator", "PercentileCalibrator", "EntropyCalibrator", "MSECalibrator", "mse_clip"]
