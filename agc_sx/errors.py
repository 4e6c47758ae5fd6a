"""Every error agc-sx reports to a user as one line, in one module (uproot's habit).

All derive from :class:`AgcSxError`, which the command line turns into ``agc-sx: error: <message>`` and a
non-zero exit; each also derives from the builtin a caller would expect (``ValueError`` for bad input, ...).
The modules that raise them re-export them, so ``from agc_sx.catalogue import CatalogError`` keeps working.
"""

from __future__ import annotations


class AgcSxError(Exception):
    """Anything the user can act on: the message names what is wrong, and the CLI exits non-zero with it."""


class Interrupted(AgcSxError):
    """Ctrl-C, after what was finished has been recorded; the message says how to resume."""


# --- inputs ----------------------------------------------------------------------------------------------------


class CatalogError(AgcSxError, ValueError):
    """A catalogue that cannot be used; the message names the offending entry."""


class QueryError(AgcSxError, ValueError):
    """A query that cannot be built, or an input it cannot be run on; the message is one line."""


class RemoteReadError(AgcSxError, OSError):
    """A remote input that could not be read; the message is one line naming the file and the reason."""


class ManifestError(AgcSxError, ValueError):
    """A delivery folder whose manifest is missing, unreadable or inconsistent."""


class SchemaError(AgcSxError, ValueError):
    """A parquet file that lacks a needed column or stores one with the wrong type."""


# --- stages ----------------------------------------------------------------------------------------------------


class DeliveryError(AgcSxError, RuntimeError):
    """A delivery that cannot start or an output that fails its checks; the message is one line."""


class ConfigError(DeliveryError):
    """A databinder config that cannot be used; the message names the file and the entry."""


class ServiceXError(DeliveryError):
    """A delivery problem that stops every sample (config, endpoint, authentication); one line."""


class ServerLost(ServiceXError):
    """The server stopped answering while transforms were running."""


class ProcessError(AgcSxError, ValueError):
    """Input the processor refuses (incomplete sample, bad column, checksum mismatch, bad option)."""


class StreamError(AgcSxError, RuntimeError):
    """A streaming run that could not produce complete histograms; the message is one line per problem."""


class ModelError(AgcSxError, ValueError):
    """BDT model files that are missing or unusable."""


class TrainingError(AgcSxError, ValueError):
    """Inputs that cannot give a training set; the message says what is missing."""


class FitError(AgcSxError, ValueError):
    """Bad input for the fit (a missing histogram, an unexpected binning); the message is one line."""


class PlotError(AgcSxError, ValueError):
    """Bad input for the plots (a missing histogram); the message is one line."""


class HistogramError(FitError, PlotError):
    """A histograms file without a needed histogram, or binned unexpectedly: an error of the fit or the plots,
    whichever stage reads it.
    """


class DemoError(AgcSxError, RuntimeError):
    """A demo stage failed; the message names the stage."""
