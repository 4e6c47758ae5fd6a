"""Quiet by default: what libraries print on fds 1/2, through logging and as warnings lands in one log file."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from agc_sx.capture import captured


def test_fd_logging_and_warnings_are_captured_counted_and_kept(tmp_path: Path) -> None:
    log_path = tmp_path / "fit" / "fit.log"
    with captured(log_path) as capture:
        for _ in range(3):  # as Minuit's C++ stream writes them: straight to the descriptor
            os.write(2, b"W MnPosDef non-positive diagonal element in covariance matrix\n")
        os.write(1, b"W FCN result is NaN for [ 0.1 0.2 ]\n")
        logging.getLogger("cabinetry.histo").warning("4j1b_ttbar has empty bins: [0]")
        logging.getLogger("cabinetry.fit").info("Migrad status: ...")  # kept, not counted
        logging.getLogger("matplotlib.font_manager").warning("findfont: Font family ['cursive'] not found.")
        warnings.warn("jsonschema.RefResolver is deprecated", DeprecationWarning, stacklevel=1)
    assert capture.counts == {"Minuit warning": 4, "cabinetry warning": 1, "font notice": 1, "Python warning": 1}
    assert capture.summary(tmp_path) == (
        "4 Minuit warnings, 1 cabinetry warning, 1 font notice, 1 Python warning, see fit/fit.log")
    text = log_path.read_text()
    for line in ("W FCN result is NaN", "MnPosDef", "has empty bins", "Migrad status", "findfont", "RefResolver"):
        assert line in text


def test_descriptors_and_loggers_are_restored_after_the_block(tmp_path: Path, capfd: object) -> None:
    logger = logging.getLogger("pyhf")
    handlers, level = list(logger.handlers), logger.level
    with captured(tmp_path / "a.log"):
        os.write(1, b"inside\n")
    os.write(1, b"outside\n")
    out, _ = capfd.readouterr()  # type: ignore[attr-defined]
    assert "outside" in out and "inside" not in out
    assert logger.handlers == handlers and logger.level == level
    assert "inside" in (tmp_path / "a.log").read_text()


def test_verbose_captures_nothing(tmp_path: Path, capfd: object) -> None:
    with captured(tmp_path / "v.log", verbose=True) as capture:
        os.write(1, b"W FCN result is NaN\n")
    out, _ = capfd.readouterr()  # type: ignore[attr-defined]
    assert "FCN result is NaN" in out
    assert capture.summary() == "" and not (tmp_path / "v.log").exists()


def test_nothing_said_gives_no_summary_line(tmp_path: Path) -> None:
    with captured(tmp_path / "q.log") as capture:
        pass
    assert capture.total == 0 and capture.summary() == ""
