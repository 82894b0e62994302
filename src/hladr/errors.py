"""The one exception hierarchy of hladr.

Every fault hladr detects is raised as a subclass of :class:`HladrError`. The
message names the file (when there is one) and what is wrong, so that the CLI
can print ``str(error)`` as its single line and a batch can record it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


class HladrError(Exception):
    """Base class of every error hladr raises on purpose.

    Parameters
    ----------
    message
        What is wrong, in words a lab scientist understands.
    path
        The file concerned, if any; it is prefixed to the message.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.message = message
        self.path = None if path is None else os.fspath(path)
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


# --- reading FCS files -------------------------------------------------------
class FCSError(HladrError):
    """An FCS file cannot be read as it is."""


class FCSHeaderError(FCSError):
    """The HEADER segment is missing, truncated or not an FCS header."""


class FCSTextError(FCSError):
    """The TEXT segment cannot be parsed (delimiters, encoding, truncation)."""


class FCSKeywordError(FCSError):
    """A required keyword is missing or holds an invalid value."""


class FCSOffsetError(FCSError):
    """Segment offsets are inconsistent or point outside the file."""


class FCSDataError(FCSError):
    """The DATA segment does not match what the TEXT segment describes."""


class FCSUnsupportedError(FCSError):
    """The file uses a feature hladr does not support."""


# --- analysis stages -----------------------------------------------------------
class PanelError(HladrError):
    """A channel role (HLA-DR, CD14, CD45, scatter) cannot be resolved."""


class GatingError(HladrError):
    """Gating could not find the populations it needs."""


class CalibrationError(HladrError):
    """A bead tube cannot be turned into a trustworthy standard curve."""


class LotFileError(CalibrationError):
    """A bead lot file is missing, malformed or holds invalid values."""


class AnalysisError(HladrError):
    """A patient tube cannot be analysed."""


class OptionsError(HladrError):
    """Options are missing, contradict each other or hold an invalid value (the CLI exits 2)."""


class SimulationError(HladrError):
    """The simulator was asked for something it cannot produce."""


class BatchError(HladrError):
    """A batch run cannot start (bad export folder, manifest or arguments)."""


class StoreError(HladrError):
    """The results database cannot be opened, migrated or written, or holds no such record."""


class PatientConflictError(StoreError):
    """The same file, through the same bead calibration, is already stored for another patient (a
    sample mix-up or a double export): the stored result is kept, the new one is refused."""


class ReagentFileError(HladrError):
    """A reagent (antibody conjugate) file is missing, malformed or holds an invalid F/P ratio."""


class PreAnalyticsError(HladrError):
    """A sample's pre-analytical record (times, tube, storage, protocol) cannot be read."""


# --- a failure recorded rather than raised (batch, service) ------------------------------------
@dataclass(frozen=True)
class Failure:
    """What went wrong with a task, recorded instead of raised so that a batch or a service goes on.

    ``internal`` is True for a fault hladr did not raise on purpose (a bug), not a :class:`HladrError`.
    """

    error_type: str
    reason: str
    internal: bool

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        known = isinstance(exc, HladrError)
        return cls(type(exc).__name__, exc.message if known else f"{type(exc).__name__}: {exc}", not known)

    def to_dict(self) -> dict[str, Any]:
        """``{"status": "error" | "internal", "error_type", "reason"}``."""
        return {
            "status": "internal" if self.internal else "error",
            "error_type": self.error_type,
            "reason": self.reason,
        }
