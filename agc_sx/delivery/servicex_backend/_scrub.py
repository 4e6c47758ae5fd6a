"""Token hygiene: the refresh token, bearer tokens and JWTs never reach a message, a log or a file."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import TextIO

from ...utils import first_line

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


_BEARER = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)


class _Scrubber:
    """Removes secrets (the refresh token, any bearer or JWT) from text before it is shown or stored."""

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        self.secrets = [s for s in secrets if s]

    def __call__(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return _JWT.sub("***", _BEARER.sub(r"\1***", text))


def _one_line(err: BaseException, scrub: _Scrubber) -> str:
    inner = getattr(err, "_exc", None)  # servicex's ReturnValueException wraps the real error
    if isinstance(inner, BaseException):
        err = inner
    return scrub(first_line(err))


class _ScrubbedStream(io.TextIOBase):
    """Forwards to a terminal stream with secrets removed: the client prints server messages verbatim."""

    def __init__(self, inner: TextIO, scrub: _Scrubber) -> None:
        self._inner, self._scrub = inner, scrub

    def write(self, text: str) -> int:
        self._inner.write(self._scrub(text))
        return len(text)

    def flush(self) -> None:
        self._inner.flush()

    def isatty(self) -> bool:
        return self._inner.isatty()

    def fileno(self) -> int:
        return self._inner.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._inner, "encoding", "utf-8")
