"""Training of our own crossed jet–parton assignment BDTs on generated ttbar events (``agc-sx train``).

Truth: the selected jets are matched (ΔR < 0.4, nearest jet) to the generator quarks of the semileptonic ttbar
decay -- the b from the hadronically decaying top, the two quarks from its W, the b from the other top. Events of
the 4j2b selection (exactly one tight lepton, >= 4 jets, >= 2 b-tags) whose four quarks match four different
jets among the leading six give one positive permutation (the true one) and 11 / 59 / 179 negatives.

Two models are trained, one on even and one on odd event numbers. Scoring every event with the model that did
*not* see it (as the processor does) makes the whole sample a held-out set for the quoted accuracy.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import awkward as ak
import numba
import numpy as np
import uproot
import xgboost as xgb
from numpy.typing import NDArray

from ..catalogue import Catalog
from ..constants import BTAG_WP
from ..errors import TrainingError
from ..schema import COLLECTIONS, collection_fields
from ..selection import (
    Collection,
    jet_mask,
    jet_mask_fixed,
    select_leptons,
    select_variations,
    selected_jets,
    single_lepton,
)
from ..utils import atomic_write_bytes, atomic_write_text
from ._features import FEATURE_NAMES, FEATURES, MAX_JETS, MIN_JETS, FlatEvents, _table
from ._models import MODEL_EVEN, MODEL_ODD, BDTModels, segment_argmax

#: ΔR (with Δφ wrapped: this is geometry, not a model input) within which a jet matches a quark.
MATCH_DR: Final = 0.4
TRAINING_SAMPLE: Final = "ttbar__nominal"

#: XGBoost settings of ``agc-sx train``; written into the model card.
HYPERPARAMETERS: Final[dict[str, Any]] = {
    "objective": "binary:logistic",
    "eval_metric": "logloss",
    "tree_method": "hist",
    "max_depth": 6,
    "learning_rate": 0.15,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "min_child_weight": 5.0,
    "num_boost_round": 200,
}

#: What training reads of NanoAOD: the processor's columns with the BDT inputs, and the generator truth.
#: Where ``train`` writes by default: a folder of its own, never the bundled models that ``process`` reads.
DEFAULT_OUTPUT: Final = Path("trained_models")

_BRANCHES: Final = {
    **{c: collection_fields(c, ml=True) for c in COLLECTIONS},
    "GenPart": ("eta", "phi", "pdgId", "genPartIdxMother"),
}



@dataclass
class TrainingReport:
    """What ``train`` did: inputs, selection counts, held-out accuracies and where the models went."""

    output: str
    files: list[str]
    seed: int
    events_read: int
    events_4j2b: int
    events_matched: int
    events_even: int
    events_odd: int
    permutations: int
    accuracy_bdt: float
    accuracy_trijet: float
    train_seconds: float
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


# --- truth ------------------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _truth_partons(  # pragma: no cover - compiled
    offsets: np.ndarray, pdg: np.ndarray, mother: np.ndarray, eta: np.ndarray, phi: np.ndarray,
    out_eta: np.ndarray, out_phi: np.ndarray, ok: np.ndarray,
) -> None:
    # Per event: (W quark 1, W quark 2, b from the hadronic top, b from the leptonic top). Needs exactly one W
    # decaying to two quarks, that W from a top, and one b from each top.
    for e in range(len(offsets) - 1):
        s = offsets[e]
        ok[e] = False
        n_wq = 0
        w_of_q = -1
        same_w = True
        wq0 = -1
        wq1 = -1
        n_b = 0
        b0 = -1
        b1 = -1
        for k in range(s, offsets[e + 1]):
            m = mother[k]
            if m < 0:
                continue
            a = abs(pdg[k])
            am = abs(pdg[s + m])
            if a <= 4 and am == 24:
                if n_wq == 0:
                    wq0 = k
                    w_of_q = s + m
                elif n_wq == 1:
                    wq1 = k
                    same_w = w_of_q == s + m
                n_wq += 1
            elif a == 5 and am == 6:
                if n_b == 0:
                    b0 = k
                elif n_b == 1:
                    b1 = k
                n_b += 1
        if n_wq != 2 or not same_w or n_b != 2:
            continue
        top = mother[w_of_q]
        if top < 0 or abs(pdg[s + top]) != 6:
            continue
        had_top = s + top
        if s + mother[b0] == had_top:
            bh, bl = b0, b1
        elif s + mother[b1] == had_top:
            bh, bl = b1, b0
        else:
            continue
        for slot, k in enumerate((wq0, wq1, bh, bl)):
            out_eta[e, slot] = eta[k]
            out_phi[e, slot] = phi[k]
        ok[e] = True


@numba.njit(cache=True, nogil=True)
def _match_jets(  # pragma: no cover - compiled
    offsets: np.ndarray, jeta: np.ndarray, jphi: np.ndarray, p_eta: np.ndarray, p_phi: np.ndarray,
    ok: np.ndarray, max_dr: float, max_index: int, out: np.ndarray,
) -> None:
    # Nearest selected jet to each quark; the event counts only if all four are matched to four different jets
    # among the leading ``max_index`` (the ones the permutations use).
    for e in range(len(offsets) - 1):
        out[e, :] = -1
        if not ok[e]:
            continue
        s = offsets[e]
        n = offsets[e + 1] - s
        good = True
        for q in range(4):
            best = -1
            best_dr2 = max_dr * max_dr
            for j in range(n):
                de = np.float64(jeta[s + j]) - p_eta[e, q]
                dp = np.float64(jphi[s + j]) - p_phi[e, q]
                dp = (dp + np.pi) % (2 * np.pi) - np.pi
                dr2 = de * de + dp * dp
                if dr2 < best_dr2:
                    best_dr2 = dr2
                    best = j
            if best < 0 or best >= max_index:
                good = False
            out[e, q] = best
        if good:
            for a in range(4):
                for b in range(a + 1, 4):
                    if out[e, a] == out[e, b]:
                        good = False
        if not good:
            out[e, :] = -1


@numba.njit(cache=True, nogil=True)
def _trijet_choice(  # pragma: no cover - compiled
    offsets: np.ndarray, pt: np.ndarray, eta: np.ndarray, phi: np.ndarray, tagged: np.ndarray, out: np.ndarray,
) -> None:
    # The AGC m_bjj choice: among ak.combinations(jets, 3) with at least one tagged jet, the first with the
    # largest vector-sum pT. Returns the three jet indices per event.
    for e in range(len(offsets) - 1):
        s = offsets[e]
        n = offsets[e + 1] - s
        best = -1.0
        out[e, :] = -1
        for a in range(n - 2):
            for b in range(a + 1, n - 1):
                for c in range(b + 1, n):
                    if not (tagged[s + a] or tagged[s + b] or tagged[s + c]):
                        continue
                    sx = 0.0
                    sy = 0.0
                    for j in (a, b, c):
                        sx += np.float64(pt[s + j]) * np.cos(np.float64(phi[s + j]))
                        sy += np.float64(pt[s + j]) * np.sin(np.float64(phi[s + j]))
                    spt = np.sqrt(sx * sx + sy * sy)
                    if spt > best:
                        best = spt
                        out[e, 0] = a
                        out[e, 1] = b
                        out[e, 2] = c


def _row_lookup() -> NDArray[np.int64]:
    """``lookup[n, w_hi, w_lo, b_had, b_lep]`` = row of that assignment in the n-jet permutation table."""
    lut = np.full((MAX_JETS + 1,) + (MAX_JETS,) * 4, -1, dtype=np.int64)
    for n in range(MIN_JETS, MAX_JETS + 1):
        t = _table(n)
        lut[n, t[:, 0], t[:, 1], t[:, 2], t[:, 3]] = np.arange(len(t))
    return lut


# --- reading ------------------------------------------------------------------------------------------------------


@dataclass
class _Block:
    features: NDArray[np.float32]
    counts: NDArray[np.int64]
    labels: NDArray[np.float32]
    even: NDArray[np.bool_]  # per event
    truth_rows: NDArray[np.int64]  # local row of the true permutation, per event
    had_truth: NDArray[np.int64]  # (events, 3) jet indices of the hadronic top (W, W, b)
    trijet: NDArray[np.int64]  # (events, 3) jet indices of the trijet-max-pT choice
    n_jets: NDArray[np.int64]
    n_read: int
    n_4j2b: int


def _counts(array: Any) -> NDArray[np.int64]:
    return np.asarray(ak.num(array, axis=1), dtype=np.int64)


def _offsets(counts: NDArray[np.int64]) -> NDArray[np.int64]:
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def _flat(array: Any) -> NDArray[Any]:
    return np.asarray(ak.to_numpy(ak.flatten(array, axis=1)))


def _collection(arrays: Any, name: str) -> Collection:
    fields = _BRANCHES[name]
    offsets = _offsets(_counts(arrays[f"{name}_{fields[0]}"]))
    return Collection(offsets, {f: _flat(arrays[f"{name}_{f}"]) for f in fields})


@dataclass
class Events4j2b:
    """The 4j2b events of one file as the processor hands them to the BDT, plus the generator quarks."""

    jets: ak.Array  # selected jets, pT-ordered
    lepton: ak.Array  # the one tight lepton
    event: NDArray[np.uint64]
    parton_eta: NDArray[np.float64]  # (events, 4): W quark, W quark, b from hadronic top, b from leptonic top
    parton_phi: NDArray[np.float64]
    truth_ok: NDArray[np.bool_]  # semileptonic ttbar with all four quarks found in GenPart
    n_read: int


def read_4j2b(path: str, entry_stop: int | None = None) -> Events4j2b:
    """Read a NanoAOD file with GenPart and apply the AGC v2 selection (nominal jets), keeping 4j2b events."""
    branches = ["event"] + [f"{c}_{f}" for c, fs in _BRANCHES.items() for f in fs]
    try:
        with uproot.open(path) as f:
            tree = f["Events"]
            missing = [b for b in branches if b not in tree]
            if missing:
                raise TrainingError(f"{path}: missing branch(es) {', '.join(missing[:5])} (training needs GenPart)")
            arrays = tree.arrays(branches, entry_stop=entry_stop)
    except (OSError, KeyError, ValueError) as err:
        if isinstance(err, TrainingError):
            raise
        raise TrainingError(f"cannot read {path}: {err}") from None
    jets = _collection(arrays, "Jet")
    electrons, muons = _collection(arrays, "Electron"), _collection(arrays, "Muon")
    leptons = select_leptons(electrons, muons)
    fixed = jet_mask_fixed(jets)
    in_4j2b = select_variations(jets, leptons.one_lepton, variations=False, fixed_mask=fixed).in_region(0, "4j2b")
    gen = _collection(arrays, "GenPart")
    n = len(in_4j2b)
    p_eta = np.zeros((n, 4))
    p_phi = np.zeros((n, 4))
    truth_ok = np.zeros(n, dtype=np.bool_)
    _truth_partons(gen.offsets, gen["pdgId"], gen["genPartIdxMother"], gen["eta"], gen["phi"],
                   p_eta, p_phi, truth_ok)
    return Events4j2b(
        selected_jets(jets, jets["pt"], jet_mask(jets["pt"], fixed), in_4j2b),
        single_lepton(electrons, muons, leptons, in_4j2b),
        np.asarray(arrays["event"])[in_4j2b],
        p_eta[in_4j2b], p_phi[in_4j2b], truth_ok[in_4j2b], n,
    )


def _read_block(path: str, entry_stop: int | None, lookup: NDArray[np.int64]) -> _Block:
    ev = read_4j2b(path, entry_stop)
    sel_jets, lepton = ev.jets, ev.lepton
    counts = _counts(sel_jets.pt)
    matched_idx = np.empty((len(counts), 4), dtype=np.int64)
    _match_jets(_offsets(counts), _flat(sel_jets.eta), _flat(sel_jets.phi), ev.parton_eta, ev.parton_phi,
                ev.truth_ok, MATCH_DR, MAX_JETS, matched_idx)
    matched = matched_idx[:, 0] >= 0
    m_idx = matched_idx[matched]
    m_jets = sel_jets[matched]
    n_jets = np.minimum(counts[matched], MAX_JETS)
    w_hi, w_lo = np.maximum(m_idx[:, 0], m_idx[:, 1]), np.minimum(m_idx[:, 0], m_idx[:, 1])
    truth_rows = lookup[n_jets, w_hi, w_lo, m_idx[:, 2], m_idx[:, 3]]

    flat = FlatEvents(m_jets, lepton[matched])
    features, perm_counts = flat.features()
    labels = np.zeros(len(features), dtype=np.float32)
    labels[np.cumsum(perm_counts) - perm_counts + truth_rows] = 1.0

    trijet = np.empty((len(m_jets), 3), dtype=np.int64)
    _trijet_choice(_offsets(_counts(m_jets.pt)), _flat(m_jets.pt), _flat(m_jets.eta), _flat(m_jets.phi),
                   _flat(m_jets.btagCSVV2) > BTAG_WP, trijet)
    return _Block(features, perm_counts, labels, ev.event[matched] % 2 == 0, truth_rows, m_idx[:, :3], trijet,
                  n_jets, ev.n_read, len(counts))


def _input_files(catalog_or_files: Catalog | Sequence[str | os.PathLike[str]]) -> list[str]:
    if isinstance(catalog_or_files, Catalog):
        try:
            sample = catalog_or_files[TRAINING_SAMPLE]
        except KeyError:
            raise TrainingError(
                f"the catalogue {catalog_or_files.source} has no {TRAINING_SAMPLE} sample to train on"
            ) from None
        files = [f.path for f in sample.files]
    else:
        files = [os.fspath(p) for p in catalog_or_files]
    if not files:
        raise TrainingError("no input files to train on")
    return files


def _cat(blocks: list[_Block], name: str) -> NDArray[Any]:
    return np.concatenate([getattr(b, name) for b in blocks])


# --- training -----------------------------------------------------------------------------------------------------


def train(
    catalog_or_files: Catalog | Sequence[str | os.PathLike[str]],
    *,
    events: int | None = None,
    output: Path = DEFAULT_OUTPUT,
    seed: int = 1,
    nthread: int | None = None,
    num_boost_round: int | None = None,
) -> TrainingReport:
    """Train ``model_even`` / ``model_odd`` on ttbar events and write them plus ``README.md`` into ``output``.

    Args:
        catalog_or_files: a catalogue (its ``ttbar__nominal`` files are used) or NanoAOD files with GenPart.
        events: read at most this many events in total (default: all).
        output: the folder for the models (default :data:`DEFAULT_OUTPUT`, never the bundled models).
        seed: xgboost's seed (its row and column subsampling); the halves are split by event parity.
        nthread: xgboost threads; default every core.
        num_boost_round: boosting rounds; default :data:`HYPERPARAMETERS`'s.
    """
    if events is not None and events < 1:
        raise TrainingError(f"--events must be positive, got {events}")
    t0 = time.perf_counter()
    files = _input_files(catalog_or_files)
    lookup = _row_lookup()
    blocks: list[_Block] = []
    remaining = events
    used: list[str] = []
    for path in files:
        if remaining is not None and remaining <= 0:
            break
        block = _read_block(path, remaining, lookup)
        blocks.append(block)
        used.append(path)
        if remaining is not None:
            remaining -= block.n_read
    features = _cat(blocks, "features")
    counts = _cat(blocks, "counts")
    labels = _cat(blocks, "labels")
    even = _cat(blocks, "even")
    n_matched = len(counts)
    if even.sum() < 10 or (~even).sum() < 10:
        raise TrainingError(
            f"only {n_matched} truth-matched 4j2b events ({int(even.sum())} even, {int((~even).sum())} odd); "
            "need at least 10 of each parity -- use more events"
        )
    even_rows = np.repeat(even, counts)
    params = {k: v for k, v in HYPERPARAMETERS.items() if k != "num_boost_round"}
    params.update(seed=seed, nthread=nthread or os.cpu_count() or 1)
    rounds = num_boost_round or int(HYPERPARAMETERS["num_boost_round"])
    boosters = {}
    for name, parity in ((MODEL_EVEN, True), (MODEL_ODD, False)):
        rows = even_rows == parity
        dtrain = xgb.DMatrix(features[rows], label=labels[rows], feature_names=list(FEATURE_NAMES))
        boosters[name] = xgb.train(params, dtrain, num_boost_round=rounds)
    models = BDTModels(boosters[MODEL_EVEN], boosters[MODEL_ODD])

    # Held-out accuracy: every event scored by the model that did not train on it.
    scores = models.score(features, even_rows, nthread=int(params["nthread"]))
    first = np.cumsum(counts) - counts
    chosen_local = segment_argmax(scores, counts) - first
    n_jets = _cat(blocks, "n_jets")
    had_truth = np.sort(_cat(blocks, "had_truth"), axis=1)
    chosen = np.empty((n_matched, 3), dtype=np.int64)
    for n in range(MIN_JETS, MAX_JETS + 1):
        sel = n_jets == n
        chosen[sel] = _table(n)[chosen_local[sel], :3]
    acc_bdt = float(np.mean(np.all(np.sort(chosen, axis=1) == had_truth, axis=1)))
    acc_trijet = float(np.mean(np.all(np.sort(_cat(blocks, "trijet"), axis=1) == had_truth, axis=1)))

    output = Path(output)
    for name, booster in boosters.items():
        # Feature names are kept out of the saved model so it loads like the official ones (plain arrays).
        booster.feature_names = None
        atomic_write_bytes(output / name, bytes(booster.save_raw("json")))
    report = TrainingReport(
        output=str(output),
        files=used,
        seed=seed,
        events_read=sum(b.n_read for b in blocks),
        events_4j2b=sum(b.n_4j2b for b in blocks),
        events_matched=n_matched,
        events_even=int(even.sum()),
        events_odd=int((~even).sum()),
        permutations=len(features),
        accuracy_bdt=acc_bdt,
        accuracy_trijet=acc_trijet,
        train_seconds=time.perf_counter() - t0,
        hyperparameters={**params, "num_boost_round": rounds},
    )
    atomic_write_text(output / "README.md", model_card(report))
    return report


def model_card(report: TrainingReport) -> str:
    """The ``models/README.md`` text: what the models take, what they were trained on, how well they do."""
    feats = "\n".join(f"| {i} | `{name}` | {lo:g} – {hi:g} |" for i, (name, _, lo, hi) in enumerate(FEATURES))
    hp = "\n".join(f"| `{k}` | {v} |" for k, v in report.hyperparameters.items() if k != "nthread")
    files = "\n".join(f"- `{Path(f).name}`" for f in report.files)
    return f"""# Jet–parton assignment BDTs (agc-sx)

`model_even.json` was trained on events with even `event` numbers, `model_odd.json` on odd ones (XGBoost JSON,
`{report.hyperparameters.get("objective")}`). At inference even events are scored with `model_odd` and odd
events with `model_even`, exactly like the official AGC models; `agc-sx process` uses these unless `--models`
points elsewhere. Regenerate with `agc-sx train --catalog <catalogue> --seed {report.seed}`.

## Inputs
One row per permutation of the leading min(n, 6) selected jets into (W jet 1, W jet 2, b from the hadronic top,
b from the leptonic top), W jets unordered (12 / 60 / 180 rows for 4 / 5 / ≥ 6 jets); 20 float features in
this order (ΔR = sqrt(Δη² + Δφ²) without wrapping Δφ, as in the AGC):

| # | feature | histogram range |
|---|---|---|
{feats}

## Training sample
Generated (toy) CMS NanoAOD ttbar events from `agc_sx.generate`, files:
{files}

- events read: {report.events_read:,}; in 4j2b (exactly one tight lepton, ≥ 4 jets, ≥ 2 b-tags, AGC v2 cuts):
  {report.events_4j2b:,}
- truth-matched (the b quarks from both tops and the two quarks from the hadronic W each within ΔR < {MATCH_DR}
  of a different jet among the leading six): {report.events_matched:,} events ({report.events_even:,} even,
  {report.events_odd:,} odd), {report.permutations:,} permutations; label 1 for the true permutation, 0 otherwise.

## Hyper-parameters
| parameter | value |
|---|---|
{hp}
| `seed` | {report.seed} |

## Performance
Fraction of truth-matched events whose chosen permutation puts the right three jets (both W jets and the
hadronic b, in any order) into the hadronic top. Each event is scored by the model that did not see it in
training, so all {report.events_matched:,} events are held out. Trijet: the AGC `m_bjj` choice, the three-jet
combination with ≥ 1 b-tag and the largest vector-sum pT, on the same events.

| method | correct hadronic-top jets |
|---|---|
| BDT (these models, crossed) | {100 * report.accuracy_bdt:.1f} % |
| trijet max-pT | {100 * report.accuracy_trijet:.1f} % |

(AGC on 2015 CMS Open Data: 60.1 % BDT, 28.3 % trijet.) Training took {report.train_seconds:.0f} s.
"""
