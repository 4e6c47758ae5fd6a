"""The files agc-sx ships, found one way: package data under ``agc_sx/_data`` (:mod:`importlib.resources`).

``_data/queries/skim.py`` is the func_adl query (a real module: func_adl reads its lambdas from source),
``_data/ntuples.json`` the AGC 2015 catalogue and ``_data/models/`` the crossed BDT pair.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: The package that holds the data (importable, so the query module is imported like any other).
DATA_PACKAGE = "agc_sx._data"


def _find(name: str) -> Path:
    path = Path(str(files(DATA_PACKAGE) / name))
    if not path.exists():
        raise FileNotFoundError(f"agc-sx installation is missing its bundled '{name}' (looked in {path.parent})")
    return path


def queries_dir() -> Path:
    """Folder holding the func_adl query source (``skim.py``)."""
    return _find("queries")


def default_catalog() -> Path:
    """The bundled AGC 2015 NanoAOD sample catalogue (``ntuples.json``)."""
    return _find("ntuples.json")


def default_models_dir() -> Path:
    """Folder with the bundled BDT models (``model_even.json``, ``model_odd.json``)."""
    return _find("models")
