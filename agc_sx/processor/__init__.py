"""The AGC v2 ttbar analysis on events: the coffea processor and the pipelines of ``agc-sx process``.

- :mod:`.chunk`: physics on one chunk (:func:`analyse_events`, :class:`ChunkResult`);
- :mod:`.coffea_processor`: :class:`AGCProcessor`, coffea's executors, the BDT models per worker;
- :mod:`.pipelines`: :func:`run_processor` (a delivery folder) and :func:`run_direct` (NanoAOD), one skeleton;
- :mod:`.metrics`: histograms.root, histograms_ml.root and metrics.json, written as one set.
"""

from __future__ import annotations

from ..errors import ProcessError
from .chunk import ChunkResult, HistKey, MLConfig, analyse_events, read_columns
from .coffea_processor import (
    EXECUTORS,
    AGCProcessor,
    analyse_file,
    check_models,
    columns_touched,
    resolve_models_dir,
)
from .metrics import METRICS_NAME, RunInfo, RunResult, Stages, write_outputs
from .pipelines import (
    DIRECT_CHUNKSIZE,
    parquet_column_bytes,
    plan_inputs,
    run_direct,
    run_processor,
    sample_weight,
)

__all__ = [
    "DIRECT_CHUNKSIZE",
    "EXECUTORS",
    "METRICS_NAME",
    "AGCProcessor",
    "ChunkResult",
    "HistKey",
    "MLConfig",
    "ProcessError",
    "RunInfo",
    "RunResult",
    "Stages",
    "analyse_events",
    "analyse_file",
    "check_models",
    "columns_touched",
    "parquet_column_bytes",
    "plan_inputs",
    "read_columns",
    "resolve_models_dir",
    "run_direct",
    "run_processor",
    "sample_weight",
    "write_outputs",
]
