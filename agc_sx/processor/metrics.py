"""The end of every pipeline: histograms.root, histograms_ml.root and metrics.json, written as one set.

:class:`RunInfo` is what a pipeline knows about its run besides the summed :class:`~.chunk.ChunkResult`
(where the input came from, how it was read, the time per stage); :func:`write_outputs` turns both into the
files and the metrics every pipeline writes alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import awkward as ak
import hist
import numpy as np

from .. import __version__
from ..constants import REGIONS, TTBAR_ALTERNATIVES
from ..histograms import ML_OUTPUT_NAME, ExactHist, build_output, write_root
from ..utils import OutputSet
from .chunk import ChunkResult, HistKey

METRICS_NAME = "metrics.json"


@dataclass
class RunResult:
    """What a pipeline produced: the written histograms, the metrics and the output paths."""

    histograms: dict[str, hist.Hist]
    ml_histograms: dict[str, hist.Hist]
    metrics: dict[str, Any]
    output: Path
    ml_output: Path | None
    metrics_path: Path


class Stages:
    """Wall and driver CPU time per stage of a run (``metrics.json`` ``stages``)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as stage ``name``."""
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.stages[name] = {"wall_seconds": time.perf_counter() - w0,
                                 "cpu_seconds_driver": time.process_time() - c0}


@dataclass
class RunInfo:
    """What metrics.json says about a run besides its results.

    Args:
        pipeline: ``"deliver+process"``, ``"direct"`` or ``"streaming (<backend>)"``.
        input: the delivery folder or catalogue that was processed.
        samples: fileset name -> (process, variation, per-event weight).
        rows: fileset name -> events processed after the skim.
        files: number of input files.
        bytes_read: compressed bytes of the columns read.
        columns: the columns the run reads.
        executor: how chunks were run (``--executor``, or ``"streaming"``).
        workers: worker count.
        started: ``time.perf_counter()`` at the start of the run (wall time and event rate).
        ml: whether the BDT observables were filled (histograms_ml.root is written).
        io_only: only the columns were read (only metrics.json is written).
        stages: wall and CPU time per stage (:class:`Stages`).
        extra: pipeline-specific keys; they override any other.
    """

    pipeline: str
    input: str
    samples: Mapping[str, tuple[str, str, float]]
    rows: Mapping[str, int]
    files: int
    bytes_read: int
    columns: list[str]
    executor: str
    workers: int
    started: float
    ml: bool = True
    io_only: bool = False
    stages: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    import coffea
    import numba
    import uproot

    return {"agc-sx": __version__, "python": platform.python_version(), "coffea": coffea.__version__,
            "awkward": ak.__version__, "uproot": uproot.__version__, "numpy": np.__version__,
            "numba": numba.__version__, "hist": hist.__version__}


def _finalise(store: Mapping[HistKey, ExactHist], groups: Any, label: str) -> dict[str, hist.Hist]:
    return build_output({k: h.to_hist(label) for k, h in store.items()}, groups)


def _bdt_argmax(run: RunInfo) -> str | None:
    if not run.ml or run.io_only:
        return None
    from ..ml import bdt_argmax_summary

    return bdt_argmax_summary()


def write_outputs(total: ChunkResult, output: Path, run: RunInfo) -> RunResult:
    """Turn the summed exact histograms into histograms.root, histograms_ml.root and metrics.json.

    The three are one result, replaced together or not at all (an ``io_only`` run replaces only metrics.json;
    a run without the BDT removes an older histograms_ml.root).
    """
    output = Path(output)
    w0, c0 = time.perf_counter(), time.process_time()
    histograms: dict[str, hist.Hist] = {}
    ml_histograms: dict[str, hist.Hist] = {}
    if not run.io_only:
        histograms = _finalise(total.hists, REGIONS, "observable [GeV]")
        if run.ml:
            from ..ml import FEATURE_NAMES

            ml_histograms = _finalise(total.ml_hists, FEATURE_NAMES, "feature")
    metrics_path = output.parent / METRICS_NAME
    ml_output = output.parent / ML_OUTPUT_NAME if run.ml and not run.io_only else None
    members = [METRICS_NAME] if run.io_only else [output.name, ML_OUTPUT_NAME, METRICS_NAME]
    outputs = OutputSet(output.parent, members)
    if not run.io_only:
        write_root(outputs.path(output.name), histograms)
        if ml_output is not None:
            write_root(outputs.path(ML_OUTPUT_NAME), ml_histograms)
    all_stages = {k: dict(v) for k, v in run.stages.items()}
    all_stages.setdefault("process", {})["cpu_seconds_chunks"] = total.cpu_seconds
    all_stages["write"] = {"wall_seconds": time.perf_counter() - w0, "cpu_seconds_driver": time.process_time() - c0}
    wall = time.perf_counter() - run.started
    n_events = sum(total.events.values())
    skimmed = total.skimmed or total.events
    metrics: dict[str, Any] = {
        "pipeline": run.pipeline,
        "mode": "io-only" if run.io_only else "analysis",
        "input": run.input,
        "output": None if run.io_only else str(output),
        "ml_output": str(ml_output) if ml_output else None,
        "executor": run.executor,
        "workers": run.workers,
        "chunks": total.chunks,
        "files": run.files,
        "events_read": n_events,
        "events_per_sample": dict(sorted(total.events.items())),
        "events_after_skim": sum(skimmed.values()),
        "events_after_skim_per_sample": dict(sorted(skimmed.items())),
        "rows_per_sample": dict(sorted(run.rows.items())),
        "events_per_region": {
            region: sum(r.get(region, 0) for r in total.region_events.values()) for region in REGIONS
        },
        "events_per_sample_region": dict(sorted(total.region_events.items())),
        "bytes_read": run.bytes_read,
        "bytes_materialised": total.bytes_read if run.io_only else None,
        "columns": run.columns,
        "bdt_argmax": _bdt_argmax(run),
        "wall_seconds": wall,
        "cpu_seconds_processing": total.cpu_seconds,
        "cpu_seconds_driver": time.process_time(),
        "event_rate_hz": n_events / wall if wall > 0 else None,
        "stages": all_stages,
        "peak_rss_mb_driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "histograms": len(histograms),
        "ml_histograms": len(ml_histograms),
        "ttbar_alternatives": [v for v in TTBAR_ALTERNATIVES if any(s[1] == v for s in run.samples.values())],
        "versions": _versions(),
        "host": {"cpus": os.cpu_count(), "platform": sys.platform},
        **dict(run.extra),
    }
    try:
        outputs.path(METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
        outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    return RunResult(histograms, ml_histograms, metrics, output, ml_output, metrics_path)
