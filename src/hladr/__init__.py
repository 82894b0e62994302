"""hladr: monocytic HLA-DR in antibodies bound per cell (AB/C) from flow-cytometry files.

>>> import hladr
>>> sample = hladr.read_fcs("patient.fcs")
>>> cal = hladr.calibrate(hladr.read_fcs("beads.fcs"), lot="96597")
>>> res = hladr.analyze(sample, cal)
>>> hladr.stratify(res, ferritin=3200.0)

Heavy modules are imported on first use so that ``import hladr`` and the CLI start fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import HladrError
from .fcs import Sample, read_fcs
from .immunosep import Decision, stratify
from .result import Result

__version__ = "0.1.0"

_LAZY = {
    "calibrate": "calibration",
    "Calibration": "calibration",
    "load_lot": "lot",
    "analyze": "analysis",
    "AnalysisOptions": "pipeline",
    "run_analysis": "pipeline",
    "simulate": "simulate",
    "Store": "store",
    "calibrated_events": "events",
}

__all__ = ["Decision", "HladrError", "Result", "Sample", "read_fcs", "stratify", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = import_module(f".{_LAZY[name]}", __name__)
        return module if name == "simulate" else getattr(module, name)
    raise AttributeError(f"module 'hladr' has no attribute {name!r}")
