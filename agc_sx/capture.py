"""Quiet by default: third-party chatter goes to a log file and is condensed into one line.

Minuit writes its warnings from C++ straight to file descriptors 1 and 2, so redirecting ``sys.stdout`` does
not catch them: :func:`captured` points the descriptors themselves at the log file for the duration of a
stage (after flushing Python's streams). Python logging of the libraries (cabinetry, pyhf, matplotlib's
font manager, ...) and Python warnings go to the same file. With ``verbose`` nothing is captured: everything
reaches the terminal as the libraries write it, and the log file is not written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Library loggers whose records a captured stage keeps out of the terminal.
LIBRARY_LOGGERS = ("cabinetry", "pyhf", "matplotlib", "coffea", "numba", "distributed", "fsspec")

#: How a captured line is counted in the one-line summary: (label, pattern), first match wins.
_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("Minuit warning", re.compile(r"^(W |I |E )?\s*(Mn|Simplex|Migrad|FCN|VariableMetric|MnPosDef|Minuit)"
                                  r"|^W [A-Z]")),
    ("font notice", re.compile(r"findfont|[Ff]ont family")),
)


@dataclass
class Capture:
    """What a captured stage wrote: the log file and counts of lines per kind, for the summary line."""

    path: Path | None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Captured lines of every kind."""
        return sum(self.counts.values())

    def summary(self, relative_to: Path | None = None) -> str:
        """E.g. ``12 Minuit warnings, 3 cabinetry messages, see fit/fit.log``; empty if nothing was captured."""
        if not self.total or self.path is None:
            return ""
        ranked = sorted(self.counts.items(), key=lambda item: -item[1])  # the most frequent first
        parts = [f"{n} {kind}{'' if n == 1 else 's'}" for kind, n in ranked if n]
        where = self.path
        if relative_to is not None:
            with contextlib.suppress(ValueError):
                where = self.path.relative_to(relative_to)
        return f"{', '.join(parts)}, see {where}"


def _kind(line: str) -> str:
    for label, pattern in _KINDS:
        if pattern.search(line):
            return label
    return "other message"


class _Handler(logging.Handler):
    def __init__(self, stream: object, capture: Capture) -> None:
        super().__init__(logging.DEBUG)
        self.stream = stream
        self.capture = capture
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record).replace("\n", "\n  | ")  # continuation lines are not counted again
            self.stream.write(text + "\n")  # type: ignore[attr-defined]
            self.stream.flush()  # type: ignore[attr-defined]
        except Exception:  # pragma: no cover - logging must never break a run
            return
        if record.levelno < logging.WARNING:
            return  # kept in the log, not worth a count: libraries narrate their work at INFO
        root = record.name.split(".")[0]
        kind = "font notice" if _kind(record.getMessage()) == "font notice" else f"{root} warning"
        self.capture.counts[kind] = self.capture.counts.get(kind, 0) + 1


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()


@contextlib.contextmanager
def captured(log_path: Path, *, verbose: bool = False, loggers: Sequence[str] = LIBRARY_LOGGERS,
             append: bool = False) -> Iterator[Capture]:
    """Send everything libraries print during the block (fd 1/2, logging, warnings) to ``log_path``.

    The log is written atomically when the block ends (appending to an existing one with ``append``);
    the yielded :class:`Capture` then holds the counts for a one-line summary.
    """
    if verbose:
        yield Capture(None)
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    capture = Capture(log_path)
    raw = tempfile.TemporaryFile(mode="w+b", dir=log_path.parent, prefix=f".{log_path.name}.")  # noqa: SIM115
    text = open(raw.fileno(), "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    handler = _Handler(text, capture)
    saved_loggers = []
    for name in loggers:
        lg = logging.getLogger(name)
        saved_loggers.append((lg, lg.propagate, lg.level, list(lg.handlers)))
        lg.handlers = [handler]
        lg.propagate = False
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
    _flush()
    saved_fds = [os.dup(1), os.dup(2)]
    try:
        os.dup2(raw.fileno(), 1)
        os.dup2(raw.fileno(), 2)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            showwarning = warnings.showwarning

            def to_log(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                       file: object = None, line: str | None = None) -> None:
                text.write(warnings.formatwarning(message, category, filename, lineno, line))
                text.flush()
                capture.counts["Python warning"] = capture.counts.get("Python warning", 0) + 1

            warnings.showwarning = to_log
            try:
                yield capture
            finally:
                warnings.showwarning = showwarning
    finally:
        _flush()
        text.flush()
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        for lg, propagate, level, handlers in saved_loggers:
            lg.handlers = handlers
            lg.propagate = propagate
            lg.setLevel(level)
        raw.seek(0)
        content = raw.read().decode("utf-8", errors="replace")
        text.close()
        raw.close()
        _count_raw_lines(content, capture)
        _write_log(log_path, content, append)


def _count_raw_lines(content: str, capture: Capture) -> None:
    """Count the lines that did not come through logging or warnings (C++ streams, plain prints)."""
    for line in content.splitlines():
        if not line.strip() or re.match(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ", line):
            continue
        if re.search(r"Warning: |warnings.warn\(", line) or line.startswith("  "):
            continue  # the body of a Python warning, already counted
        kind = _kind(line)
        capture.counts[kind] = capture.counts.get(kind, 0) + 1


def _write_log(path: Path, content: str, append: bool) -> None:
    from .utils import atomic_write_text

    if append and path.exists():
        content = path.read_text(encoding="utf-8", errors="replace") + content
    atomic_write_text(path, content)


__all__ = ["LIBRARY_LOGGERS", "Capture", "captured"]
