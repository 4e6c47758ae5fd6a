"""Locate the files agc-sx ships: the query source, the sample catalogue and the BDT models.

From a checkout they live at the top of the repository; a wheel carries them as package data under
``agc_sx/_data`` (hatch ``force-include``). Looking in both places makes ``agc-sx`` work from any folder.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for base in (_PACKAGE_DIR / "_data", _PACKAGE_DIR.parent):
        candidate = base / name
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"agc-sx installation is missing its bundled '{name}' (looked in {_PACKAGE_DIR})")


def queries_dir() -> Path:
    """Folder holding the func_adl query source (``queries/``)."""
    return _find("queries")


def default_catalog() -> Path:
    """The bundled AGC 2015 NanoAOD sample catalogue (``ntuples.json``)."""
    return _find("ntuples.json")


def default_models_dir() -> Path:
    """Folder with the bundled BDT models (``model_even.json``, ``model_odd.json``)."""
    return _find("models")
