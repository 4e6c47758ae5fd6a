"""Physics on one chunk: select, reconstruct and histogram the events of one sample into a :class:`ChunkResult`.

:func:`analyse_events` takes any events array with ``run``, ``luminosityBlock``, ``event`` and ``Jet`` /
``Electron`` / ``Muon`` collections, so the delivery-folder pipeline, direct NanoAOD processing and streaming
call it unchanged. With the exact (integer) histogram sums of :mod:`agc_sx.histograms`, results of chunks add
up bit-identically whatever the executor, worker count, chunking or completion order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..constants import HIST_BINS, HIST_RANGE, JET_VARIATIONS, REGIONS
from ..histograms import ExactHist, bin_index
from ..schema import COLLECTIONS, collection_fields
from ..selection import (
    Collection,
    btag_mask,
    flat_column,
    jet_mask,
    jet_mask_fixed,
    select_leptons,
    select_variations,
    selected_jets,
    single_lepton,
    skim_mask,
)
from ..systematics import btag_weight_factors, jet_pt_variations, scale_var_factors

HistKey = tuple[str, str, str]  # (region or ML feature, process, variation)


@dataclass
class ChunkResult:
    """Exact histograms and counters of one chunk (or of a merge of chunks)."""

    hists: dict[HistKey, ExactHist] = field(default_factory=dict)
    ml_hists: dict[HistKey, ExactHist] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)  # per sample: events read
    skimmed: dict[str, int] = field(default_factory=dict)  # per sample: events after the skim (= read for parquet)
    bytes_read: int = 0  # bytes materialised (filled by --io-only)
    region_events: dict[str, dict[str, int]] = field(default_factory=dict)  # sample -> region -> events
    cpu_seconds: float = 0.0
    chunks: int = 0

    def __iadd__(self, other: ChunkResult) -> ChunkResult:
        for mine, theirs in ((self.hists, other.hists), (self.ml_hists, other.ml_hists)):
            for key, h in theirs.items():
                if key in mine:
                    mine[key] += h
                else:
                    mine[key] = h + ExactHist(h.bins, h.lo, h.hi)
        for mine_n, theirs_n in ((self.events, other.events), (self.skimmed, other.skimmed)):
            for sample, n in theirs_n.items():
                mine_n[sample] = mine_n.get(sample, 0) + n
        self.bytes_read += other.bytes_read
        for sample, regions in other.region_events.items():
            mine_r = self.region_events.setdefault(sample, {})
            for region, n in regions.items():
                mine_r[region] = mine_r.get(region, 0) + n
        self.cpu_seconds += other.cpu_seconds
        self.chunks += other.chunks
        return self

    def __add__(self, other: ChunkResult) -> ChunkResult:
        out = ChunkResult()
        out += self
        out += other
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain data for the streaming checkpoint (JSON: nothing in the user's folder is ever unpickled)."""
        return {
            "hists": [[list(k), h.to_json()] for k, h in sorted(self.hists.items())],
            "ml_hists": [[list(k), h.to_json()] for k, h in sorted(self.ml_hists.items())],
            "events": self.events, "skimmed": self.skimmed, "bytes_read": self.bytes_read,
            "region_events": self.region_events, "cpu_seconds": self.cpu_seconds, "chunks": self.chunks,
        }

    @classmethod
    def from_json(cls, doc: Any) -> ChunkResult:
        """The inverse of :meth:`to_json`, validated field by field; ValueError on anything else."""
        if not isinstance(doc, dict) or set(doc) != set(cls().to_json()):
            raise ValueError("not a result record")

        def hists(items: Any) -> dict[HistKey, ExactHist]:
            if not isinstance(items, list):
                raise ValueError("bad histogram list")
            out: dict[HistKey, ExactHist] = {}
            for item in items:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], list)
                        and len(item[0]) == 3 and all(isinstance(x, str) for x in item[0])):
                    raise ValueError("bad histogram key")
                out[(item[0][0], item[0][1], item[0][2])] = ExactHist.from_json(item[1])
            return out

        def counts(d: Any) -> dict[str, int]:
            if not (isinstance(d, dict) and all(type(v) is int and v >= 0 for v in d.values())):
                raise ValueError("bad event counts")
            return dict(d)

        regions = doc["region_events"]
        if not isinstance(regions, dict):
            raise ValueError("bad region counts")
        numbers = (doc["bytes_read"], doc["chunks"])
        if not all(type(n) is int and n >= 0 for n in numbers) or not isinstance(doc["cpu_seconds"], (int, float)):
            raise ValueError("bad counters")
        return cls(hists(doc["hists"]), hists(doc["ml_hists"]), counts(doc["events"]), counts(doc["skimmed"]),
                   doc["bytes_read"], {s: counts(r) for s, r in regions.items()}, float(doc["cpu_seconds"]),
                   doc["chunks"])


@dataclass
class MLConfig:
    """What the BDT hook needs: the loaded models and the xgboost thread count."""

    models: Any  # agc_sx.ml.BDTModels
    nthread: int = 1


def _hist(store: dict[HistKey, ExactHist], key: HistKey,
          binning: tuple[int, float, float] | None = None) -> ExactHist:
    if key not in store:
        store[key] = ExactHist(*binning) if binning else ExactHist()
    return store[key]


def _fill(store: dict[HistKey, ExactHist], key: HistKey, values: np.ndarray, weights: np.ndarray | float,
          binning: tuple[int, float, float] | None = None) -> None:
    _hist(store, key, binning).fill(values, weights)


def analyse_events(events: Any, process: str, variation: str, weight: float, *,
                   ml: MLConfig | None = None, sample: str | None = None, skim: bool = False) -> ChunkResult:
    """Select, reconstruct and histogram one chunk of events of one sample (``process``, ``variation``).

    ``weight`` is the per-event normalisation ``xsec * lumi / nevts_total``. For ``nominal`` samples the jet
    variations (``pt_scale_up``, ``pt_res_up``) and the weight variations are filled too; other samples (the
    ttbar alternatives) are filled once, under their variation name. ``skim`` applies the delivery skim first
    (direct processing of unskimmed NanoAOD), so that the result equals deliver + process.
    """
    t0 = time.thread_time()
    sample = sample or f"{process}__{variation}"
    jets, electrons, muons = (Collection.from_awkward(getattr(events, c), collection_fields(c, ml is not None))
                              for c in COLLECTIONS)
    run = flat_column(events.run)
    lumi = flat_column(events.luminosityBlock)
    event_number = flat_column(events.event)
    n_read = len(run)

    leptons = select_leptons(electrons, muons)
    if skim:
        keep = skim_mask(jets, leptons)
        jets, electrons, muons = jets.take(keep), electrons.take(keep), muons.take(keep)
        run, lumi, event_number = run[keep], lumi[keep], event_number[keep]
        leptons = select_leptons(electrons, muons)  # recomputed on the kept events (cheap, flat cuts)
    fixed, tagged = jet_mask_fixed(jets), btag_mask(jets)
    varied = variation == "nominal"
    vsel = select_variations(jets, leptons.one_lepton, run, lumi, event_number, variations=varied,
                             fixed_mask=fixed, tagged=tagged)

    out = ChunkResult(events={sample: n_read}, skimmed={sample: len(run)}, chunks=1)
    pts: dict[str, np.ndarray] | None = None
    feature_bins = None
    if ml is not None:
        from ..ml import FEATURES

        feature_bins = FEATURES
    for v, jet_variation in enumerate(JET_VARIATIONS if varied else ("nominal",)):
        name = variation if jet_variation == "nominal" else jet_variation
        for region in REGIONS:
            in_region = vsel.in_region(v, region)
            obs = vsel.obs[v][in_region]
            index = bin_index(obs, HIST_BINS, *HIST_RANGE)
            weights: dict[str, np.ndarray | float] = {name: weight}
            if jet_variation == "nominal":
                out.region_events.setdefault(sample, {})[region] = len(obs)
                if varied:
                    for wname, factor in btag_weight_factors(vsel.lead_pt[in_region]).items():
                        weights[wname] = weight * factor
                    if process == "wjets":
                        for wname, f in scale_var_factors().items():
                            weights[wname] = weight * f
            for wname, w in weights.items():
                _hist(out.hists, (region, process, wname)).fill_binned(index, w)
            if ml is not None and feature_bins is not None and region == "4j2b" and len(obs):
                from ..ml import best_permutation_features

                if pts is None:
                    pts = (jet_pt_variations(jets["pt"], run, lumi, event_number, jets.offsets) if varied
                           else {"nominal": jets["pt"]})
                pt = pts[jet_variation]
                features = best_permutation_features(
                    selected_jets(jets, pt, jet_mask(pt, fixed), in_region),
                    single_lepton(electrons, muons, leptons, in_region),
                    event_number[in_region], ml.models, nthread=ml.nthread,
                )
                for i, (feature, bins, lo, hi) in enumerate(feature_bins):
                    for wname, w in weights.items():
                        _fill(out.ml_hists, (feature, process, wname), features[:, i], w, (bins, lo, hi))
    out.cpu_seconds = time.thread_time() - t0
    return out


def read_columns(events: Any, columns: list[str]) -> int:
    """Read (materialise) exactly ``columns`` of a chunk and nothing else: the I/O ceiling (``--io-only``).

    Returns the number of bytes materialised. Collection columns are named as in the file (``Jet_pt``).
    """
    total = 0
    for name in columns:
        coll, _, field_name = name.partition("_")
        if coll in COLLECTIONS and field_name:
            c = Collection.from_awkward(events[coll], (field_name,))
            total += c.offsets.nbytes + c.fields[field_name].nbytes
        else:
            total += flat_column(events[name]).nbytes
    return total
