"""Histogram accumulation, naming and writing (``histograms.root``, ``histograms_ml.root``).

Per-chunk histograms are accumulated as *exact* sums: every float64 weight (and squared weight) is split into
integer mantissa pieces and summed per bin as Python integers scaled by a fixed power of two, and converted to
float64 (correctly rounded) only at the end. Addition of these sums is associative, so the result is
bit-identical whatever the chunking, the executor, the worker count or the order chunks complete in --
something float accumulation (as in ``hist.fill``) cannot guarantee. Bin indices follow boost-histogram's
regular axis exactly (same float64 formula, NaN to overflow), so the histograms equal a ``hist`` fill up to the
last-bit rounding of the sums.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import hist
import numpy as np

from .constants import FIT_RANGE, FIT_REBIN, HIST_BINS, HIST_RANGE, PROCESSES
from .errors import HistogramError
from .manifest import safe_component
from .utils import atomic_path

log = logging.getLogger(__name__)

#: Power of two the integer sums are scaled by: below the smallest subnormal's last mantissa bit.
_SHIFT = 1126
#: Weights per ``np.bincount`` call, so that float64 sums of 26/27-bit integer pieces stay exact.
_BATCH = 1 << 25


def bin_index(values: np.ndarray, bins: int, lo: float, hi: float) -> np.ndarray:
    """Bin index with flow (0 = underflow, bins + 1 = overflow), boost-histogram's regular-axis rule."""
    z = (np.asarray(values, dtype=np.float64) - lo) / (hi - lo)
    with np.errstate(invalid="ignore"):
        inner = np.floor(z * bins).astype(np.int64) + 1
    return np.where(z < 1, np.where(z >= 0, inner, 0), bins + 1)


def _exact_bin_sums(index: np.ndarray, values: np.ndarray, nbins: int) -> list[int]:
    """Per-bin sums of ``values`` as integers in units of 2**-_SHIFT (exact)."""
    out = [0] * nbins
    if len(values) == 0:
        return out
    mant, expo = np.frexp(values)
    ints = (mant * 2.0**53).astype(np.int64)  # exact: value = ints * 2**(expo - 53)
    hi = ints >> 26  # floor division, so negative weights work too
    lo = ints & ((1 << 26) - 1)
    for e in np.unique(expo):
        sel = expo == e
        idx, h, l_ = index[sel], hi[sel], lo[sel]
        shift = int(e) - 53 + _SHIFT
        for start in range(0, len(idx), _BATCH):
            part = slice(start, start + _BATCH)
            sh = np.bincount(idx[part], weights=h[part], minlength=nbins)
            sl = np.bincount(idx[part], weights=l_[part], minlength=nbins)
            for b in np.flatnonzero((sh != 0) | (sl != 0)):
                out[b] += ((int(sh[b]) << 26) + int(sl[b])) << shift
    return out


def _exact_int(value: float) -> int:
    """``value`` as an integer in units of 2**-_SHIFT (exact, as in :func:`_exact_bin_sums`)."""
    mant, expo = np.frexp(np.float64(value))
    return int(np.int64(mant * 2.0**53)) << (int(expo) - 53 + _SHIFT)


def _to_float(value: int) -> float:
    return float(Fraction(value, 1 << _SHIFT))


@dataclass
class ExactHist:
    """A 1D regular histogram with flow bins whose sums of weights and squared weights are exact."""

    bins: int = HIST_BINS
    lo: float = HIST_RANGE[0]
    hi: float = HIST_RANGE[1]
    sumw: list[int] = field(default_factory=list)
    sumw2: list[int] = field(default_factory=list)
    entries: int = 0

    def __post_init__(self) -> None:
        if not self.sumw:
            self.sumw = [0] * (self.bins + 2)
            self.sumw2 = [0] * (self.bins + 2)

    def fill(self, values: np.ndarray, weights: np.ndarray | float) -> None:
        """Add ``values`` with ``weights`` (one per value, or one for all) exactly."""
        values = np.asarray(values, dtype=np.float64)
        if len(values) == 0:
            return
        self.fill_binned(bin_index(values, self.bins, self.lo, self.hi), weights)

    def fill_binned(self, index: np.ndarray, weights: np.ndarray | float) -> None:
        """Fill with precomputed :func:`bin_index` values (shared by all weight variations of a region).

        A scalar weight adds ``count * w`` per bin as an exact integer, which is the same number the
        element-wise sum gives (the sums are exact), without touching every entry.
        """
        if len(index) == 0:
            return
        nbins = self.bins + 2
        if np.ndim(weights) == 0:
            scalar = float(weights)
            counts = np.bincount(index, minlength=nbins)
            for acc, value in ((self.sumw, scalar), (self.sumw2, scalar * scalar)):
                unit = _exact_int(value)
                for b in np.flatnonzero(counts):
                    acc[b] += int(counts[b]) * unit
        else:
            array = np.asarray(weights, dtype=np.float64)
            for acc, part in ((self.sumw, array), (self.sumw2, array * array)):
                for i, s in enumerate(_exact_bin_sums(index, part, nbins)):
                    acc[i] += s
        self.entries += len(index)

    def __iadd__(self, other: ExactHist) -> ExactHist:
        if (self.bins, self.lo, self.hi) != (other.bins, other.lo, other.hi):
            raise ValueError("cannot add histograms with different binning")
        self.sumw = [a + b for a, b in zip(self.sumw, other.sumw, strict=True)]
        self.sumw2 = [a + b for a, b in zip(self.sumw2, other.sumw2, strict=True)]
        self.entries += other.entries
        return self

    def __add__(self, other: ExactHist) -> ExactHist:
        out = ExactHist(self.bins, self.lo, self.hi, list(self.sumw), list(self.sumw2), self.entries)
        out += other
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain data (the exact sums as integers) for the streaming checkpoint: nothing to unpickle."""
        return {"bins": self.bins, "lo": self.lo, "hi": self.hi, "sumw": self.sumw, "sumw2": self.sumw2,
                "entries": self.entries}

    @classmethod
    def from_json(cls, doc: Any) -> ExactHist:
        """The inverse of :meth:`to_json`; ValueError for anything that is not exactly such a record."""
        if not isinstance(doc, dict) or set(doc) != {"bins", "lo", "hi", "sumw", "sumw2", "entries"}:
            raise ValueError("not a histogram record")
        bins, lo, hi, entries = doc["bins"], doc["lo"], doc["hi"], doc["entries"]
        if not (isinstance(bins, int) and 0 < bins <= 10_000 and isinstance(entries, int) and entries >= 0
                and all(isinstance(x, (int, float)) and np.isfinite(x) for x in (lo, hi)) and lo < hi):
            raise ValueError("bad histogram binning")
        sums = []
        for name in ("sumw", "sumw2"):
            values = doc[name]
            if not (isinstance(values, list) and len(values) == bins + 2
                    and all(type(v) is int for v in values)):
                raise ValueError(f"bad histogram {name}")
            sums.append(list(values))
        if any(v < 0 for v in sums[1]):
            raise ValueError("negative sum of squared weights")
        return cls(bins, float(lo), float(hi), sums[0], sums[1], entries)

    def to_hist(self, label: str = "observable") -> hist.Hist:
        """A ``hist.Hist`` (Weight storage, flow bins) holding the correctly rounded sums."""
        h = hist.Hist(hist.axis.Regular(self.bins, self.lo, self.hi, name="observable", label=label),
                      storage=hist.storage.Weight())
        view = h.view(flow=True)
        view["value"] = [_to_float(v) for v in self.sumw]
        view["variance"] = [_to_float(v) for v in self.sumw2]
        return h


#: The BDT observables file, written beside ``histograms.root``.
ML_OUTPUT_NAME = "histograms_ml.root"


def hist_key(region: str, process: str, variation: str | None = "nominal") -> str:
    """AGC / cabinetry naming: ``{region}_{process}`` for nominal, ``{region}_{process}_{variation}`` else.

    The names are sanitised as the sample folders are: a ``/`` in a catalogue's process name would otherwise
    become nested directories in ``histograms.root``.
    """
    process, variation = safe_component(process), safe_component(variation or "nominal")
    return f"{region}_{process}" if variation == "nominal" else f"{region}_{process}_{variation}"


def pseudodata(me_var: hist.Hist, ps_var: hist.Hist, wjets: hist.Hist) -> hist.Hist:
    """The AGC pseudodata: (ttbar ME_var + ttbar PS_var) / 2 + wjets nominal (hist arithmetic)."""
    out: hist.Hist = (me_var + ps_var) / 2 + wjets
    return out


def is_empty(h: hist.Hist) -> bool:
    """AGC rule: a histogram whose sum of weights without flow bins is zero is not written."""
    return bool(h.values(flow=False).sum() == 0)


def build_output(
    hists: Mapping[tuple[str, str, str], hist.Hist], groups: Iterable[str],
) -> dict[str, hist.Hist]:
    """Name the (group, process, variation) histograms, add ``{group}_pseudodata``, drop empty ones.

    ``groups`` are the regions (``histograms.root``) or the ML feature names (``histograms_ml.root``).
    An input of the pseudodata that was never filled (no W+jets event in 4j2b of a small sample) counts as
    empty; the pseudodata is built when at least one of its inputs exists.
    """
    out: dict[str, hist.Hist] = {}
    for (group, process, variation), h in sorted(hists.items()):
        if not is_empty(h):
            out[hist_key(group, process, variation)] = h
    for group in groups:
        parts = [hists.get(k) for k in ((group, "ttbar", "ME_var"), (group, "ttbar", "PS_var"),
                                         (group, "wjets", "nominal"))]
        template = next((h for h in parts if h is not None), None)
        if template is not None:
            me_var, ps_var, wjets = (h if h is not None else template * 0 for h in parts)
            pd = pseudodata(me_var, ps_var, wjets)
            if not is_empty(pd):
                out[hist_key(group, DATA_SAMPLE, "nominal")] = pd
    return out


def to_th1d(name: str, h: hist.Hist) -> object:
    """A ROOT TH1D (with sumw2) of a 1D regular ``Weight`` histogram, built directly (uproot's generic
    conversion of a ``hist.Hist`` costs several times more, which matters for the ~1300 ML histograms).
    """
    from uproot.writing.identify import to_TAxis, to_TH1x

    axis = h.axes[0]
    view: Any = h.view(flow=True)
    values = np.ascontiguousarray(view["value"], dtype=np.float64)
    variances = np.ascontiguousarray(view["variance"], dtype=np.float64)
    centers = np.asarray(axis.centers, dtype=np.float64)
    inner = values[1:-1]
    return to_TH1x(
        fName=name, fTitle=name, data=values, fEntries=float(values.sum()), fTsumw=float(inner.sum()),
        fTsumw2=float(variances[1:-1].sum()), fTsumwx=float((inner * centers).sum()),
        fTsumwx2=float((inner * centers**2).sum()), fSumw2=variances,
        fXaxis=to_TAxis("xaxis", str(axis.label or ""), len(axis), float(axis.edges[0]), float(axis.edges[-1])),
    )


def write_root(path: Path, hists: Mapping[str, hist.Hist]) -> None:
    """Write histograms as TH1D (with sumw2) atomically: a failed write leaves no (partial) file behind."""
    import uproot

    with atomic_path(path) as tmp, uproot.recreate(tmp) as f:
        # one update() writes the directory once, instead of once per key (quadratic for ~1300 keys)
        f.update({key: to_th1d(key, hists[key]) for key in sorted(hists)})


# --- reading histograms.root (the fit and the plots) -----------------------------------------------------------

#: Name of the pseudodata histograms (``{region}_pseudodata``): the data the fit sees.
DATA_SAMPLE = "pseudodata"
#: Axis labels of the region observables.
OBSERVABLE_LABELS = {"HT": r"$H_T$ [GeV]", "m_bjj": r"$m_{bjj}$ [GeV]"}


@dataclass(frozen=True)
class Histogram1D:
    """Bin contents, sum of squared weights and edges of a 1D histogram (no flow bins)."""

    values: np.ndarray
    variances: np.ndarray
    edges: np.ndarray


def zero_histogram(edges: np.ndarray) -> Histogram1D:
    """An empty histogram: what a zero-sum histogram (not written by the processor) stands for."""
    zeros = np.zeros(len(edges) - 1)
    return Histogram1D(values=zeros, variances=zeros.copy(), edges=np.array(edges, dtype=np.float64))


def read_histogram(file: Any, key: str, source: Path | str = "histograms file") -> Histogram1D:
    """Read one histogram from an open uproot file, raising :class:`HistogramError` naming the key if absent."""
    if key not in file:
        raise HistogramError(f"{source}: histogram '{key}' is missing")
    h = file[key]
    variances = h.variances(flow=False)
    values = np.asarray(h.values(flow=False), dtype=np.float64)
    return Histogram1D(
        values=values,
        variances=np.asarray(variances if variances is not None else values, dtype=np.float64),
        edges=np.asarray(h.axis().edges(), dtype=np.float64),
    )


def rebin_for_fit(h: Histogram1D) -> Histogram1D:
    """Drop bins below ``FIT_RANGE[0]``, merge ``FIT_REBIN`` neighbours (AGC: ``h[110j::hist.rebin(2)]``)."""
    lo, hi = FIT_RANGE
    start = np.flatnonzero(np.isclose(h.edges, lo))
    if start.size != 1 or not math.isclose(h.edges[-1], hi):
        raise HistogramError(f"binning {h.edges[0]:g}-{h.edges[-1]:g} GeV has no bin edge at {lo:g} "
                       f"or does not end at {hi:g}")
    first = int(start[0])
    n_kept = len(h.values) - first
    if n_kept % FIT_REBIN:
        raise HistogramError(f"{n_kept} bins from {lo:g} GeV cannot be merged in groups of {FIT_REBIN}")
    values = h.values[first:].reshape(-1, FIT_REBIN).sum(axis=1)
    variances = h.variances[first:].reshape(-1, FIT_REBIN).sum(axis=1)
    return Histogram1D(values=values, variances=variances, edges=h.edges[first::FIT_REBIN].copy())


#: Processes whose nominal histogram must exist in every region: the signal (and the pseudodata, as data).
ALWAYS_PRESENT = ("ttbar", DATA_SAMPLE)


def read_nominals(file: Any, prefixes: Sequence[str], source: Path | str) -> dict[str, dict[str, Histogram1D]]:
    """Nominal histograms ``{prefix}_{process}`` and ``{prefix}_pseudodata`` for each prefix (region, feature).

    The processor does not write histograms with a zero sum, so a background without events under a prefix
    (W+jets in 4j2b of a small sample, or anywhere in a tiny one) reads as zeros there. The pseudodata and
    ttbar must be present everywhere: without them the file is not a result of ``agc-sx process``.
    """
    present = set(file.keys(cycle=False))
    out: dict[str, dict[str, Histogram1D]] = {}
    for prefix in prefixes:
        out[prefix] = {p: read_histogram(file, f"{prefix}_{p}", source) for p in ALWAYS_PRESENT}
    for process in PROCESSES:
        if process in ALWAYS_PRESENT:
            continue
        keys = [f"{prefix}_{process}" for prefix in prefixes]
        if not any(k in present for k in keys):
            log.warning("%s: no %s histogram at all (no events selected): counted as zero", source, process)
        for prefix, key in zip(prefixes, keys, strict=True):
            if key in present:
                out[prefix][process] = read_histogram(file, key, source)
            else:
                out[prefix][process] = zero_histogram(out[prefix]["ttbar"].edges)
    return out


