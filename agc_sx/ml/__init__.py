"""Jet–parton assignment with the AGC BDTs: permutations, features, crossed inference and training.

The processor calls :func:`best_permutation_features` on the 4j2b events of each jet variation; ``agc-sx train``
calls :func:`train` to build our own crossed model pair from generated ttbar events.
"""

from __future__ import annotations

from ._features import (
    FEATURE_NAMES,
    FEATURES,
    MAX_JETS,
    FlatEvents,
    permutation_features,
    permutation_table,
)
from ._models import (
    MODEL_EVEN,
    MODEL_ODD,
    BDTModels,
    ModelError,
    bdt_argmax_summary,
    best_permutation_features,
    segment_argmax,
)
from ._training import (
    DEFAULT_OUTPUT,
    HYPERPARAMETERS,
    Events4j2b,
    TrainingError,
    TrainingReport,
    model_card,
    read_4j2b,
    train,
)

__all__ = [
    "DEFAULT_OUTPUT",
    "FEATURES",
    "FEATURE_NAMES",
    "HYPERPARAMETERS",
    "MAX_JETS",
    "MODEL_EVEN",
    "MODEL_ODD",
    "BDTModels",
    "Events4j2b",
    "FlatEvents",
    "ModelError",
    "TrainingError",
    "TrainingReport",
    "bdt_argmax_summary",
    "best_permutation_features",
    "model_card",
    "permutation_features",
    "permutation_table",
    "read_4j2b",
    "segment_argmax",
    "train",
]
