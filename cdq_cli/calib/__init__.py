"""Calibration and evaluation data: named data sets or local files, tokenized into windows."""

from .text import (
    C4_EVAL_WINDOWS,
    NAMED_SOURCES,
    DataSourceError,
    NamedSource,
    c4_validation_windows,
    calibration_windows,
    eval_split,
    evaluation_ids,
    load_texts,
    text_fingerprint,
)

__all__ = [
    "C4_EVAL_WINDOWS",
    "NAMED_SOURCES",
    "DataSourceError",
    "NamedSource",
    "c4_validation_windows",
    "calibration_windows",
    "eval_split",
    "evaluation_ids",
    "load_texts",
    "text_fingerprint",
]
