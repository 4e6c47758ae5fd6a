"""Shared pieces of the ServiceX backend: its errors, limits and one request of a run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ...catalogue import InputFile
from ...utils import sha256_text
from ..common import Job, Plan

log = logging.getLogger(__name__)


BACKEND = "servicex"



def _valid(guard: Any) -> bool:
    return guard is not None and (not hasattr(guard, "valid") or guard.valid())


def _state(status: Any) -> str:
    return str(getattr(status.status, "value", status.status))


@dataclass
class _Request:
    """One ServiceX sample of this run: the missing files of a catalogue sample, or one of its dataset ids."""

    title: str
    job: Job
    plan: Plan
    inputs: list[InputFile]  # file list: the files to fetch; rucio / cernopendata: the one dataset id

    @property
    def did(self) -> str | None:
        """The dataset id (catalogue path) when the server expands it into files, else None."""
        return None if self.job.dataset_type == "filelist" else self.inputs[0].path

    @property
    def qhash(self) -> str:
        return sha256_text(self.job.qastle)

    def dataset(self) -> Any:
        from servicex.dataset import CERNOpenData, FileList, Rucio

        if self.did is None:
            return FileList(list(dict.fromkeys(f.path for f in self.inputs)))
        if self.job.dataset_type == "rucio":
            return Rucio(self.did)
        return CERNOpenData(int(self.did))
