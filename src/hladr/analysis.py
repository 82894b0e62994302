"""``hladr.analyze``: the Python API's convenience form of :func:`hladr.pipeline.run_analysis`.

The pipeline resolves the panel, gates the monocytes (``gating``), takes the monocytes'
compensated linear HLA-DR PE statistic (the calibration's statistic: median by default),
sends it through the bead curve (PE molecules = AB/C for a 1:1 conjugate), gives a 95 %
interval combining sampling, bead curve and gate (``uncertainty``) and sorts the QC flags
with the QC policy (``qc``): a Result that fails it is not reportable and carries no class.
"""

from __future__ import annotations

import os

from .calibration import Calibration
from .fcs import Sample
from .gating import GatingResult
from .panel import Panel
from .pipeline import AnalysisOptions, run_analysis
from .preanalytics import PreAnalytics
from .qc import DEFAULT_POLICY, QCPolicy
from .reagent import Reagent
from .result import Result


def analyze(
    sample: Sample,
    calibration: Calibration,
    *,
    hladr: str | None = None,
    cd14: str | None = None,
    cd45: str | None = None,
    statistic: str | None = None,
    gates: str | os.PathLike | None = None,
    gate_name: str | None = None,
    seed: int | None = None,
    panel: Panel | None = None,
    gating: GatingResult | None = None,
    policy: QCPolicy = DEFAULT_POLICY,
    reagent: Reagent | None = None,
    preanalytics: PreAnalytics | None = None,
) -> Result:
    """mHLA-DR of one patient tube: :func:`hladr.pipeline.run_analysis` with its options as keywords.

    Parameters
    ----------
    sample
        The patient tube (lysed whole blood stained with HLA-DR-PE, CD14 and usually CD45).
    calibration
        The bead curve of the same run (:func:`hladr.calibrate`).
    hladr, cd14, cd45, panel, statistic, gates, gate_name, seed, policy, reagent, preanalytics
        See :class:`hladr.pipeline.AnalysisOptions`.
    gating
        An already computed gating of this tube (not with ``gates``, ``gate_name`` or ``seed``).

    Raises
    ------
    OptionsError
        When options contradict each other (``panel`` with channel names, ``gating`` with
        ``gates``/``gate_name``/``seed``, ``seed`` with ``gates``, ``gate_name`` without ``gates``).
    """
    options = AnalysisOptions(
        hladr=hladr,
        cd14=cd14,
        cd45=cd45,
        panel=panel,
        statistic=statistic,
        gates=gates,
        gate_name=gate_name,
        seed=seed,
        policy=policy,
        reagent=reagent,
        preanalytics=preanalytics,
    )
    return run_analysis(sample, calibration, options, gating=gating).result
