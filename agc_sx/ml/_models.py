"""The crossed pair of jet–parton assignment BDTs and the choice of the best permutation per event.

The choice is exact branch and bound over the trees (:mod:`._argmax`) for models it can reproduce and where it
pays, else the full evaluation through ``inplace_predict``; both give the same row (the first of the largest
float32 probabilities). Whether pruning pays is a property of the model: with a few dominant trees (the
official AGC pair: 251 trees, 192 of them single leaves) it needs ~6 % of xgboost's (permutation, tree) walks
(14 of the 59 trees that split) and is ~2.8x faster; with many evenly weighted shallow trees (our own pair) its
bounds stay loose, it walks ~70 % and is slower than xgboost. ``"auto"`` measures that fraction once per model
file on a fixed synthetic event set (:func:`_pruned_fraction`; kept in the user's cache) and prunes below
:data:`PRUNE_MAX_FRACTION`. ``BDTModels.argmax_path`` says which path a pair of models takes and why.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import xgboost as xgb
from numpy.typing import NDArray

from ..errors import ModelError
from ..utils import atomic_write_text, first_line, sha256_file, sha256_text, user_cache_dir
from . import _features
from ._argmax import Trees, parse_booster, pruned_argmax
from ._features import N_FEATURES, FlatEvents

MODEL_EVEN: Final = "model_even.json"
MODEL_ODD: Final = "model_odd.json"
#: Events per feature block: bounds memory (at most 180 rows x 20 float32 per event) whatever the chunk size.
BLOCK_EVENTS: Final = 16384
#: ``BDTModels.argmax``: "auto" prunes where the models allow it and it pays, "pruned" wherever the models
#: allow it, "full" always evaluates every tree.
ARGMAX_MODES: Final = ("auto", "pruned", "full")
#: "auto" prunes a model when its calibration needs at most this fraction of the (row, tree) walks: a walk of
#: the kernel costs about 2.5-6 of xgboost's (measured: 7 % -> 2.9x faster, 70 % -> 0.7x).
PRUNE_MAX_FRACTION: Final = 0.25
#: Events of the calibration set (seeded: the decision is the same in every process).
CALIBRATION_EVENTS: Final = 300
PRUNED: Final = "pruned"

# argmax path of every model directory loaded in this process (see bdt_argmax_summary)
_PATHS: dict[str, str] = {}
_PATHS_LOCK = threading.Lock()



@dataclass
class BDTModels:
    """``even`` was trained on even event numbers and scores odd events; ``odd`` the other way round."""

    even: xgb.Booster
    odd: xgb.Booster
    source: str = "<memory>"
    argmax: str = "auto"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _nthread: dict[int, int] = field(default_factory=dict, repr=False, compare=False)
    _trees: dict[int, Trees | str] = field(default_factory=dict, repr=False, compare=False)
    _fraction: dict[int, float] = field(default_factory=dict, repr=False, compare=False)
    _digest: dict[int, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.argmax not in ARGMAX_MODES:
            raise ValueError(f"argmax must be one of {', '.join(ARGMAX_MODES)}, got {self.argmax!r}")

    @classmethod
    def load(cls, directory: Path, argmax: str = "auto") -> BDTModels:
        """Read ``directory/model_even.json`` and ``directory/model_odd.json`` (XGBoost JSON)."""
        directory = Path(directory)
        boosters, digests = [], []
        for name in (MODEL_EVEN, MODEL_ODD):
            path = directory / name
            if not path.is_file():
                raise ModelError(f"BDT model {path} not found (need {MODEL_EVEN} and {MODEL_ODD} in {directory})")
            try:
                booster = xgb.Booster(model_file=str(path))
            except xgb.core.XGBoostError as err:
                raise ModelError(f"cannot load BDT model {path}: {first_line(err)}") from None
            if booster.num_features() != N_FEATURES:
                raise ModelError(f"BDT model {path} takes {booster.num_features()} features, not {N_FEATURES}")
            boosters.append(booster)
            digests.append(sha256_file(path))
        models = cls(boosters[0], boosters[1], str(directory), argmax)
        models._digest = {id(b): d for b, d in zip(boosters, digests, strict=True)}
        with _PATHS_LOCK:
            _PATHS[models.source] = models.argmax_path
        return models

    def __getstate__(self) -> dict[str, Any]:
        # Boosters pickle through xgboost's own raw format; locks do not pickle at all, and the parsed trees
        # are rebuilt where they are used.
        return {"even": self.even, "odd": self.odd, "source": self.source, "argmax": self.argmax,
                "digests": [self._digest.get(id(self.even)), self._digest.get(id(self.odd))]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["even"], state["odd"], state["source"], state.get("argmax", "auto"))  # type: ignore[misc]
        for booster, digest in zip((self.even, self.odd), state.get("digests") or (None, None), strict=True):
            if digest:
                self._digest[id(booster)] = digest

    def trees_for(self, booster: xgb.Booster) -> Trees | str:
        """The parsed trees of ``booster`` for the pruned argmax, or why it must be evaluated in full."""
        key = id(booster)
        with self._lock:
            if key not in self._trees:
                try:
                    self._trees[key] = parse_booster(booster)
                except Exception as err:  # the full evaluation is always there to fall back on
                    self._trees[key] = f"cannot parse the model: {type(err).__name__}: {err}"[:200]
            return self._trees[key]

    def path_for(self, booster: xgb.Booster) -> Trees | str:
        """The trees to prune over for ``booster`` in this mode, or why it is evaluated in full."""
        if self.argmax == "full":
            return "requested"
        trees = self.trees_for(booster)
        if isinstance(trees, str) or self.argmax == "pruned":
            return trees
        fraction = self._known_fraction(booster)
        if fraction is None:  # outside the lock: the calibration predicts, which takes it
            fraction = _pruned_fraction(self, booster, trees)
            with self._lock:
                self._fraction[id(booster)] = fraction
            digest = self._digest.get(id(booster))
            if digest is not None:
                _store_fraction(digest, fraction)
        return _too_costly(fraction) or trees

    def _known_fraction(self, booster: xgb.Booster) -> float | None:
        """The calibration of ``booster`` measured in this process or, for a model file, in an earlier one."""
        key = id(booster)
        with self._lock:
            if key in self._fraction:
                return self._fraction[key]
        digest = self._digest.get(key)
        fraction = _stored_fraction(digest) if digest is not None else None
        if fraction is not None:
            with self._lock:
                self._fraction[key] = fraction
        return fraction

    def _full_reason(self, booster: xgb.Booster) -> str | None:
        """Why ``booster`` is evaluated in full, or None when it is pruned; without parsing it where a stored
        calibration decides (the driver only reports the path: parsing and calibrating cost ~1 s).
        """
        if self.argmax == "auto":
            fraction = self._known_fraction(booster)
            if fraction is not None:  # only models whose trees parsed were ever calibrated
                return _too_costly(fraction)
        trees = self.path_for(booster)
        return trees if isinstance(trees, str) else None

    @property
    def argmax_path(self) -> str:
        """``"pruned"`` when both models take the exact branch and bound, else ``"full (<why>)"``."""
        if self.argmax == "full":
            return "full (requested)"
        reasons = []
        for name, booster in ((MODEL_EVEN, self.even), (MODEL_ODD, self.odd)):
            reason = self._full_reason(booster)
            if reason is not None:
                reasons.append(f"{name}: {reason}")
        return f"full ({'; '.join(reasons)})" if reasons else PRUNED

    def choose(self, booster: xgb.Booster, features: NDArray[Any], counts: NDArray[np.int64],
               nthread: int = 1) -> NDArray[np.int64]:
        """Row of the best permutation of each event (consecutive ``counts`` rows), first on ties.

        Exactly the row of the largest ``inplace_predict`` probability; pruned when the model allows it.
        """
        trees = self.path_for(booster)
        if isinstance(trees, str) or len(features) == 0:
            return segment_argmax(self.predict(booster, features, nthread), counts)
        return pruned_argmax(trees, features, counts,
                             lambda rows: self.predict(booster, features[rows], nthread)).rows

    def booster_for(self, even_events: bool) -> xgb.Booster:
        """The model that scores events of the given parity (crossed: even events -> model_odd)."""
        return self.odd if even_events else self.even

    def predict(self, booster: xgb.Booster, features: NDArray[Any], nthread: int = 1) -> NDArray[np.float32]:
        """Probabilities of ``booster`` for the rows of ``features`` via ``inplace_predict``."""
        if len(features) == 0:
            return np.zeros(0, dtype=np.float32)
        key = id(booster)
        if self._nthread.get(key) != nthread:
            with self._lock:
                booster.set_param({"nthread": int(nthread)})
                self._nthread[key] = nthread
        return np.asarray(booster.inplace_predict(features, validate_features=False), dtype=np.float32)

    def score(self, features: NDArray[Any], even: NDArray[np.bool_], nthread: int = 1) -> NDArray[np.float32]:
        """Crossed scores of permutation rows; ``even[i]`` says whether row i belongs to an even event."""
        even = np.asarray(even, dtype=bool)
        if even.shape != (len(features),):
            raise ValueError(f"need one parity per feature row: {even.shape} vs {len(features)} rows")
        out = np.empty(len(features), dtype=np.float32)
        for parity in (True, False):
            sel = even == parity
            if sel.any():
                out[sel] = self.predict(self.booster_for(parity), features[sel], nthread)
        return out


def segment_argmax(values: NDArray[Any], counts: NDArray[np.int64]) -> NDArray[np.int64]:
    """Row index of the maximum of each consecutive segment; the first one on exact ties (``ak.argmax``)."""
    first = np.cumsum(counts) - counts
    if len(counts) == 0:
        return first
    if np.any(counts <= 0):
        raise ValueError("every segment needs at least one row")
    seg_max = np.maximum.reduceat(values, first)
    hits = np.flatnonzero(values == np.repeat(seg_max, counts))
    return hits[np.searchsorted(hits, first)]


def best_permutation_features(
    jets: Any, lepton: Any, event: NDArray[Any], models: BDTModels, nthread: int = 1
) -> NDArray[np.float32]:
    """The 20 features of the highest-scoring permutation of each event (n_events x 20).

    Even ``event`` numbers are scored with ``model_odd``, odd ones with ``model_even``; events of one parity are
    built and scored together so each model sees one contiguous block.
    """
    flat = FlatEvents(jets, lepton)
    event = np.asarray(event)
    if event.shape != (flat.n_events,):
        raise ValueError(f"need one event number per event: got {event.shape} for {flat.n_events} events")
    out = np.empty((flat.n_events, N_FEATURES), dtype=np.float32)
    even = event % 2 == 0
    for parity in (True, False):
        booster = models.booster_for(bool(parity))
        selected = np.flatnonzero(even == parity)
        for lo in range(0, len(selected), BLOCK_EVENTS):
            block = selected[lo : lo + BLOCK_EVENTS]
            features, counts = flat.features(block)
            out[block] = features[models.choose(booster, features, counts, nthread)]
    return out


@functools.cache
def _calibration_features() -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Permutation features of :data:`CALIBRATION_EVENTS` seeded synthetic 4-6 jet events (pT-ordered jets,
    falling pT spectrum, uniform angles, b-tag and q/g scores): not physics, a fixed load for the kernel.
    """
    import awkward as ak

    rng = np.random.default_rng(20150)
    n = CALIBRATION_EVENTS
    n_jets = rng.choice([4, 4, 4, 5, 5, 6], n)
    total = int(n_jets.sum())

    def uniform(lo: float, hi: float, size: int) -> NDArray[np.float32]:
        return rng.uniform(lo, hi, size).astype(np.float32)

    jets = ak.unflatten(ak.zip({
        "pt": (30 + rng.exponential(45, total)).astype(np.float32), "eta": uniform(-2.4, 2.4, total),
        "phi": uniform(-np.pi, np.pi, total), "mass": uniform(4, 20, total),
        "btagCSVV2": uniform(0, 1, total), "qgl": uniform(0, 1, total),
    }), n_jets)
    jets = jets[ak.argsort(jets.pt, axis=1, ascending=False)]
    lepton = ak.zip({"pt": (30 + rng.exponential(40, n)).astype(np.float32), "eta": uniform(-2.1, 2.1, n),
                     "phi": uniform(-np.pi, np.pi, n), "mass": np.full(n, 0.1, np.float32)})
    return FlatEvents(jets, lepton).features()


def _pruned_fraction(models: BDTModels, booster: xgb.Booster, trees: Trees) -> float:
    """Fraction of the (row, tree) walks of full evaluation that the pruned argmax needs on the calibration set."""
    features, counts = _calibration_features()
    result = pruned_argmax(trees, features, counts, lambda rows: models.predict(booster, features[rows]))
    return result.tree_evaluations / (len(features) * max(booster.num_boosted_rounds(), 1))


def _too_costly(fraction: float) -> str | None:
    if fraction > PRUNE_MAX_FRACTION:
        return (f"pruning would walk {fraction:.0%} of the (permutation, tree) pairs, more than "
                f"{PRUNE_MAX_FRACTION:.0%}: full evaluation is faster")
    return None


@functools.cache
def _calibration_key() -> str:
    """Everything a model's calibration depends on besides the model file: the kernel, this module, xgboost."""
    from . import _argmax

    sources = [sha256_file(Path(file)) for file in (_argmax.__file__, _features.__file__, __file__)]
    return sha256_text(json.dumps([*sources, xgb.__version__, CALIBRATION_EVENTS]))


def _calibration_file(digest: str) -> Path:
    return user_cache_dir() / "bdt" / f"{sha256_text(digest + _calibration_key())}.json"


def _stored_fraction(digest: str) -> float | None:
    """The fraction stored for the model file with ``digest`` by an earlier process, if any (a lost or
    damaged file only costs the calibration again).
    """
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        fraction = json.loads(_calibration_file(digest).read_text())["pruned_fraction"]
        if isinstance(fraction, float) and fraction >= 0.0:
            return fraction
    return None


def _store_fraction(digest: str, fraction: float) -> None:
    with contextlib.suppress(OSError):
        target = _calibration_file(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, json.dumps({"pruned_fraction": fraction}))


def bdt_argmax_summary() -> str | None:
    """Which argmax path the BDT models loaded in this process take, for ``metrics.json``.

    The path depends only on the model files, so the driver, which checks the models before processing,
    knows what its workers do. One models directory (any CLI run): its path, e.g. ``"pruned"``; several
    with different paths: each with its directory; none loaded: None.
    """
    with _PATHS_LOCK:
        paths = dict(_PATHS)
    if not paths:
        return None
    if len(set(paths.values())) == 1:
        return next(iter(paths.values()))
    return "; ".join(f"{source}: {path}" for source, path in paths.items())
