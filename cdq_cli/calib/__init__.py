"""Calibration and evaluation data: named data sets or local files, tokenized into windows."""

from .text import (
    C4_EVAL_WINDOWS,
    EVAL_SPLITS,
    NAMED_SOURCES,
    DataSourceError,
    c4_validation_windows,
    calibration_windows,
    evaluation_ids,
    load_texts,
    text_fingerprint,
)

__all__ = [
    "C4_EVAL_WINDOWS",
    "EVAL_SPLITS",
    "NAMED_SOURCES",
    "DataSourceError",
    "c4_validation_windows",
    "calibration_windows",
    "evaluation_ids",
    "load_texts",
    "text_fingerprint",
]
