"""The crossed pair of jet–parton assignment BDTs and the choice of the best permutation per event."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import xgboost as xgb
from numpy.typing import NDArray

from ..errors import AgcSxError
from ._features import N_FEATURES, FlatEvents

MODEL_EVEN: Final = "model_even.json"
MODEL_ODD: Final = "model_odd.json"
#: Events per feature block: bounds memory (at most 180 rows x 20 float32 per event) whatever the chunk size.
BLOCK_EVENTS: Final = 16384


class ModelError(AgcSxError, ValueError):
    """BDT model files that are missing or unusable."""


@dataclass
class BDTModels:
    """``even`` was trained on even event numbers and scores odd events; ``odd`` the other way round."""

    even: xgb.Booster
    odd: xgb.Booster
    source: str = "<memory>"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _nthread: dict[int, int] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, directory: Path) -> BDTModels:
        """Read ``directory/model_even.json`` and ``directory/model_odd.json`` (XGBoost JSON)."""
        directory = Path(directory)
        boosters = []
        for name in (MODEL_EVEN, MODEL_ODD):
            path = directory / name
            if not path.is_file():
                raise ModelError(f"BDT model {path} not found (need {MODEL_EVEN} and {MODEL_ODD} in {directory})")
            try:
                booster = xgb.Booster(model_file=str(path))
            except xgb.core.XGBoostError as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
                raise ModelError(f"cannot load BDT model {path}: {first}") from None
            if booster.num_features() != N_FEATURES:
                raise ModelError(f"BDT model {path} takes {booster.num_features()} features, not {N_FEATURES}")
            boosters.append(booster)
        return cls(boosters[0], boosters[1], str(directory))

    def __getstate__(self) -> dict[str, Any]:
        # Boosters pickle through xgboost's own raw format; locks do not pickle at all.
        return {"even": self.even, "odd": self.odd, "source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["even"], state["odd"], state["source"])  # type: ignore[misc]

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
            scores = models.predict(booster, features, nthread)
            out[block] = features[segment_argmax(scores, counts)]
    return out
