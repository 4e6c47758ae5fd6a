"""The one base class of the errors agc-sx reports to a user as a single line (bad input, failed stage)."""

from __future__ import annotations


class AgcSxError(Exception):
    """Anything the user can act on: the message names what is wrong, and the CLI exits non-zero with it."""


class Interrupted(AgcSxError):
    """Ctrl-C, after what was finished has been recorded; the message says how to resume."""
