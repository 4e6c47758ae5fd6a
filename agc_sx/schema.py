"""Column contract of the delivered skim and the coffea schema that reads it.

The delivered parquet is flat NanoAOD branches (``Jet_pt``, ``Muon_sip3d``, ...). The processor needs them as
collections with Lorentz-vector behaviour, so :class:`AGCSkimSchema` zips ``Jet_*``, ``Electron_*`` and
``Muon_*`` the way coffea's NanoAOD schema does, without requiring NanoAOD's counter/index branches.

:data:`COLUMNS` is the single list of what the processor reads and in which precision. The types matter for
physics: cuts are evaluated in the column's precision (float32), so a float64 ``Jet_eta`` would silently
change which events pass; such a file is refused up front instead (:func:`check_parquet_schema`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from coffea.nanoevents.schemas.base import BaseSchema, zip_forms

from .errors import SchemaError

#: Collections zipped by the schema, in output order.
COLLECTIONS: tuple[str, ...] = ("Jet", "Electron", "Muon")

#: The skim's columns, in order: name, awkward type as read from real 2015 NanoAOD, and who reads them
#: (``"all"``: every run; ``"ml"``: only the BDT reconstruction; ``""``: delivered, read by no stage of agc-sx,
#: e.g. the counters coffea's NanoAOD schema needs and the charges). The one column contract: the query's
#: output (:data:`agc_sx.query.OUTPUT_COLUMNS`), the processor's reads and the BDT training's are taken from it.
SKIM_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("run", "uint32", "all"),
    ("luminosityBlock", "uint32", "all"),
    ("event", "uint64", "all"),
    ("nJet", "uint32", ""),
    ("nElectron", "uint32", ""),
    ("nMuon", "uint32", ""),
    ("Jet_pt", "var * float32", "all"),
    ("Jet_eta", "var * float32", "all"),
    ("Jet_phi", "var * float32", "all"),
    ("Jet_mass", "var * float32", "all"),
    ("Jet_btagCSVV2", "var * float32", "all"),
    ("Jet_qgl", "var * float32", "ml"),
    ("Jet_jetId", "var * int32", "all"),
    ("Electron_pt", "var * float32", "all"),
    ("Electron_eta", "var * float32", "all"),
    ("Electron_phi", "var * float32", "ml"),
    ("Electron_mass", "var * float32", "ml"),
    ("Electron_charge", "var * int32", ""),
    ("Electron_cutBased", "var * int32", "all"),
    ("Electron_sip3d", "var * float32", "all"),
    ("Muon_pt", "var * float32", "all"),
    ("Muon_eta", "var * float32", "all"),
    ("Muon_phi", "var * float32", "ml"),
    ("Muon_mass", "var * float32", "ml"),
    ("Muon_charge", "var * int32", ""),
    ("Muon_tightId", "var * bool", "all"),
    ("Muon_sip3d", "var * float32", "all"),
    ("Muon_pfRelIso04_all", "var * float32", "all"),
)

#: Every column the processor may read: name -> (jagged?, numpy dtype).
COLUMNS: dict[str, tuple[bool, str]] = {
    name: (typ.startswith("var * "), typ.removeprefix("var * ")) for name, typ, use in SKIM_COLUMNS if use
}

#: Columns only the BDT reconstruction reads (``--no-ml`` does not need them).
ML_ONLY_COLUMNS: frozenset[str] = frozenset(name for name, _, use in SKIM_COLUMNS if use == "ml")


def needed_columns(ml: bool) -> list[str]:
    """The columns a run reads: everything in :data:`COLUMNS`, minus the BDT inputs when ``ml`` is off."""
    return [c for c in COLUMNS if ml or c not in ML_ONLY_COLUMNS]


def collection_fields(collection: str, ml: bool) -> tuple[str, ...]:
    """Fields of ``collection`` (``"Jet"``) a run reads, e.g. ``("pt", "eta", ...)``, in contract order."""
    prefix = f"{collection}_"
    return tuple(c.removeprefix(prefix) for c in needed_columns(ml) if c.startswith(prefix))



def arrow_type_string(arrow_type: Any) -> str:
    """The awkward-style physical type of an arrow field type: ``"uint32"``, ``"var * float32"``.

    Producers disagree on everything but the physics: the ServiceX uproot transformer writes awkward
    extension types (``ak:uint32``), ``ak.to_parquet`` plain types with awkward metadata, plain pyarrow
    nullable fields. What decides an event is the stored number type and the nesting, so extension wrappers
    and nullability are looked through (missing values are refused where the data are read, see
    :func:`agc_sx.delivery.common.verify_parquet`).
    """
    import pyarrow as pa

    while isinstance(arrow_type, pa.ExtensionType):
        arrow_type = arrow_type.storage_type
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return "var * " + arrow_type_string(arrow_type.value_type)
    try:
        return str(np.dtype(arrow_type.to_pandas_dtype()).name)
    except (NotImplementedError, TypeError):
        return str(arrow_type)


def parquet_column_types(path: Path) -> dict[str, str]:
    """``{column: physical type}`` of a parquet file from its footer (see :func:`arrow_type_string`)."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow raises several unrelated types for unreadable files
        raise SchemaError(f"{path}: not a readable parquet file ({err})") from None
    return {name: arrow_type_string(schema.field(name).type) for name in schema.names}


def check_parquet_schema(path: Path, columns: Iterable[str]) -> None:
    """Refuse (``SchemaError``) a parquet file missing one of ``columns`` or storing one with the wrong type."""
    types = parquet_column_types(path)
    for name in columns:
        want_jagged, want_dtype = COLUMNS[name]
        want = f"var * {want_dtype}" if want_jagged else want_dtype
        if name not in types:
            raise SchemaError(f"{path}: missing column {name}")
        if types[name] != want:
            raise SchemaError(f"{path}: column {name} is {types[name]}, expected {want}")


class AGCSkimSchema(BaseSchema):
    """coffea schema for the delivered skim: ``Jet``, ``Electron``, ``Muon`` as PtEtaPhiM collections.

    Branches that belong to no collection (``run``, ``event``, ``nJet`` ...) stay top-level fields. Columns
    are zipped only when all of a collection's branches share one offsets layout, as coffea requires.
    """

    def __init__(self, base_form: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(base_form)
        self._form["fields"], self._form["contents"] = self._build(
            self._form["fields"], self._form["contents"]
        )

    @staticmethod
    def _build(fields: list[str], contents: list[Any]) -> tuple[list[str], list[Any]]:
        branches = dict(zip(fields, contents, strict=True))
        out: dict[str, Any] = {}
        grouped: dict[str, dict[str, Any]] = {c: {} for c in COLLECTIONS}
        for name, form in branches.items():
            coll, _, var = name.partition("_")
            if coll in grouped and var and form["class"].startswith("ListOffsetArray"):
                grouped[coll][var] = form
            else:
                out[name] = form
        for coll, forms in grouped.items():
            # zip_forms takes the list offsets from the first field: make it pt, which every run reads anyway,
            # so that no other branch (e.g. NanoAOD's Electron_deltaEtaSC) is read just for its offsets
            forms = dict(sorted(forms.items(), key=lambda item: item[0] != "pt"))
            if forms:
                has_p4 = {"pt", "eta", "phi", "mass"} <= forms.keys()
                out[coll] = zip_forms(forms, coll, "PtEtaPhiMLorentzVector" if has_p4 else None)
        return list(out), list(out.values())

    @classmethod
    def behavior(cls) -> dict[Any, Any]:
        """Base NanoEvents behaviour plus coffea's Lorentz vectors."""
        from coffea.nanoevents.methods import base, vector

        behavior: dict[Any, Any] = {}
        behavior.update(base.behavior)
        behavior.update(vector.behavior)
        return behavior
