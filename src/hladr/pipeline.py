"""The analysis of one patient tube, written once: read -> panel -> gating -> statistic -> bead curve ->
QC -> :class:`~hladr.result.Result`.

Every face runs it: :func:`hladr.analyze` (the Python API), ``hladr analyze`` (the CLI), the batch's
tasks and warm-up, and the service's workers. Options are one typed, validated object
(:class:`AnalysisOptions`): options that contradict each other raise instead of one silently winning.

>>> options = AnalysisOptions(hladr="PE-A", statistic="median")
>>> analysis = run_analysis("patient.fcs", calibration, options)      # raises a HladrError
>>> outcome = try_analysis("patient.fcs", calibration, options)       # Analysis or Failure
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import sys
import threading
from dataclasses import dataclass

import numpy as np

from . import uncertainty
from .calibration import Calibration
from .errors import AnalysisError, Failure, OptionsError
from .fcs import Sample, instrument_key, read_fcs
from .gating import GatingResult, gate_monocytes
from .panel import Panel, resolve_panel
from .preanalytics import PreAnalytics
from .qc import DEFAULT_POLICY, QCPolicy
from .reagent import DEFAULT_REAGENT, Reagent, load_reagent
from .result import Result

STATISTICS = ("median", "geomean")
#: seed of the automatic gate's subsampling when none is given
DEFAULT_SEED = 0


@dataclass(frozen=True)
class AnalysisOptions:
    """How to analyse a patient tube; validated on construction (:class:`~hladr.errors.OptionsError`).

    Parameters
    ----------
    hladr, cd14, cd45
        Channel names, when markers and instrument naming do not tell.
    panel
        An already resolved :class:`~hladr.panel.Panel` instead (not with ``hladr``/``cd14``/``cd45``).
    statistic
        ``"median"`` or ``"geomean"``; None: the calibration's (beads and cells must use the same).
    gates, gate_name
        A GatingML 2.0 file or FlowJo workspace whose monocyte gate (``gate_name``, or its only
        candidate) replaces the automatic one.
    seed
        Seed of the automatic gate's subsampling (None: :data:`DEFAULT_SEED`); not with ``gates``,
        whose gate uses none.
    policy
        The QC policy (thresholds and severities), recorded in ``provenance.qc_policy``.
    reagent
        The anti-HLA-DR conjugate; AB/C = PE molecules / its F/P ratio. None: BD Quantibrite (1:1).
    preanalytics
        The sample's handling; its ages are recorded and checked. None: not recorded, not checked.
    """

    hladr: str | None = None
    cd14: str | None = None
    cd45: str | None = None
    panel: Panel | None = None
    statistic: str | None = None
    gates: str | os.PathLike | None = None
    gate_name: str | None = None
    seed: int | None = None
    policy: QCPolicy = DEFAULT_POLICY
    reagent: Reagent | None = None
    preanalytics: PreAnalytics | None = None

    def __post_init__(self) -> None:
        named = [f"{key}={value!r}" for key, value in self.channels.items() if value is not None]
        if self.panel is not None and named:
            raise OptionsError(f"give either a panel or channel names ({', '.join(named)}), not both")
        if self.statistic is not None and self.statistic not in STATISTICS:
            raise OptionsError(f"statistic must be 'median' or 'geomean', not {self.statistic!r}")
        if self.gate_name is not None and self.gates is None:
            raise OptionsError(f"gate_name={self.gate_name!r} needs a gates file to look in")
        if self.seed is not None and self.gates is not None:
            raise OptionsError(
                f"seed={self.seed!r} only applies to the automatic gate; the gate from {self.gates} uses none"
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise OptionsError(f"seed must be an integer, not {self.seed!r}")

    @property
    def channels(self) -> dict[str, str | None]:
        """The channel names given, by role."""
        return {"hladr": self.hladr, "cd14": self.cd14, "cd45": self.cd45}

    def check_gating(self, gating: GatingResult | None) -> None:
        """Raise :class:`~hladr.errors.OptionsError` when an already computed gating comes with gate
        options it would silently override."""
        given = [
            f"{key}={value!r}"
            for key, value in (("gates", self.gates), ("gate_name", self.gate_name), ("seed", self.seed))
            if value is not None
        ]
        if gating is not None and given:
            raise OptionsError(
                f"an already computed gating ignores {', '.join(given)}: give one or the other"
            )


@dataclass
class Analysis:
    """A tube's :class:`~hladr.result.Result` with what it was computed from (for figures and exports)."""

    result: Result
    sample: Sample
    panel: Panel
    gating: GatingResult


def run_analysis(
    tube: Sample | str | os.PathLike,
    calibration: Calibration,
    options: AnalysisOptions | None = None,
    *,
    gating: GatingResult | None = None,
    sha256: str | None = None,
) -> Analysis:
    """mHLA-DR of one patient tube: the one place the analysis sequence is written.

    Parameters
    ----------
    tube
        The patient tube: a :class:`~hladr.fcs.Sample`, or the path of its FCS file (read leniently).
    calibration
        The bead curve of the same run (:func:`hladr.calibrate`).
    options
        :class:`AnalysisOptions` (None: the defaults).
    gating
        This tube's gating when already computed (not with ``options.gates``/``gate_name``/``seed``).
    sha256
        The file's SHA-256 when the caller already knows it (not hashed again).

    Raises
    ------
    HladrError
        A subclass naming the file and the problem (unreadable file, panel, gating, too few
        monocytes, a statistic that differs from the calibration's, conflicting options).
    """
    options = options or AnalysisOptions()
    options.check_gating(gating)
    sample = tube if isinstance(tube, Sample) else read_fcs(tube, lenient=True)
    if sha256:
        sample.sha256 = sha256
    policy = options.policy
    reagent = options.reagent or load_reagent(DEFAULT_REAGENT)
    seed = DEFAULT_SEED if options.seed is None else options.seed
    statistic = options.statistic or calibration.statistic
    if statistic != calibration.statistic:
        raise AnalysisError(
            f"statistic {statistic!r} differs from the bead calibration's {calibration.statistic!r}: "
            "beads and cells must use the same statistic",
            sample.path,
        )
    panel = options.panel or resolve_panel(sample, **options.channels)
    hashing = None if sha256 else _BackgroundHash(sample)  # the file's SHA-256, while the gating runs
    gating = gating or gate_monocytes(
        sample, panel, gates=options.gates, gate_name=options.gate_name, seed=seed, policy=policy
    )
    flags: list[str] = list(panel.warnings and ["panel_from_naming"]) + list(gating.flags)
    flags += compatibility_flags(sample, calibration, panel, policy)
    if not calibration.passed:
        flags.append("calibration_failed")

    n_mono = int(np.count_nonzero(gating.monocytes))
    if n_mono < 20:
        raise AnalysisError(f"only {n_mono} monocytes found: no HLA-DR value can be given", sample.path)
    pe_all = gating.compensated[panel["HLA-DR"]]
    monocyte_rows = np.flatnonzero(gating.monocytes)  # gathered by index: faster than by mask twice
    pe = pe_all[monocyte_rows]
    mfi = monocyte_statistic(pe, statistic)
    if not np.isfinite(mfi) or mfi <= 0:
        raise AnalysisError(f"monocyte HLA-DR statistic is {mfi:g}: not measurable", sample.path)
    molecules = float(calibration.molecules(mfi))
    abc = reagent.abc(molecules)

    top = sample.saturation(panel["HLA-DR"])
    saturated = None
    if np.isfinite(top):
        values = sample.events[monocyte_rows, sample.index(panel["HLA-DR"])]
        saturated = float(np.mean(values >= 0.999 * top))
    flags += policy.monocyte_flags(n_mono, saturated)
    flags += policy.bead_range_flags(mfi, calibration.mfi_range)

    spread = interval_parts(sample, calibration, panel, gating, pe_all, pe, statistic, mfi, reagent)
    ci = spread.interval(abc)
    half_mfi = 10 ** (spread.total / calibration.slope) if calibration.slope > 0 else np.inf  # in MFI units
    flags += gates_disagree(gating, panel["HLA-DR"], statistic, mfi, (mfi / half_mfi, mfi * half_mfi))
    if 100 * (10**spread.total - 1) > policy.wide_interval_pct:
        flags.append(f"wide_interval:+-{100 * (10**spread.total - 1):.0f}%")
    preanalytics = options.preanalytics
    if preanalytics is not None:
        flags += policy.preanalytic_flags(preanalytics, sample.acquired)
    outcome = policy.evaluate(flags)

    leuk = int(np.count_nonzero(gating.leukocytes))
    from . import __version__

    if hashing is not None:
        hashing.finish()
    identity = sample.identity
    acquired = sample.acquired
    result = Result(
        sample=os.fspath(sample.path),
        sha256=sample.sha256,
        abc=abc,
        pe_molecules=molecules,
        abc_ci95=ci,
        statistic=statistic,
        monocytes=n_mono,
        monocyte_percent=100.0 * n_mono / leuk if leuk else float("nan"),
        gate_method=gating.method,
        calibration=calibration.summary(),
        channels={k: v for k, v in panel.channels.items()},
        qc=outcome.to_dict(),
        instrument=sample.instrument,
        hladr_version=__version__,
        mfi=mfi,
        reasons=[_reason(flag, policy) for flag in outcome.flags],
        uncertainty=spread.to_dict(),
        patient_id=identity["patient_id"][0] if identity["patient_id"] else None,
        sample_id=identity["sample_id"][0] if identity["sample_id"] else None,
        identity_source={k: v[1] if v else None for k, v in identity.items()},
        acquired=acquired.isoformat() if acquired else None,
        gates=gating.gates,
        threshold=policy.threshold,
        reagent=reagent.to_dict(),
        preanalytics=preanalytics.to_dict(acquired) if preanalytics is not None else None,
        provenance={
            "repairs": list(sample.repairs),
            "fcs_version": sample.version,
            "dataset": sample.dataset,
            "seed": seed,
            "versions": dict(_versions()),
            "panel_sources": panel.sources,
            "panel_notes": list(panel.warnings),
            "thresholds": gating.thresholds,
            "gating_sequence": gating.sequence,
            "qc_policy": policy.to_dict(),
        },
    )
    return Analysis(result, sample, panel, gating)


def try_analysis(
    tube: Sample | str | os.PathLike,
    calibration: Calibration,
    options: AnalysisOptions | None = None,
    *,
    sha256: str | None = None,
) -> Analysis | Failure:
    """:func:`run_analysis`, with any failure returned as a :class:`~hladr.errors.Failure` instead of
    raised: a batch or a service records it and goes on."""
    try:
        return run_analysis(tube, calibration, options, sha256=sha256)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, none stops the caller
        return Failure.of(exc)


# --- the steps ---------------------------------------------------------------------------------------
def monocyte_statistic(values: np.ndarray, statistic: str) -> float:
    """The median, or the geometric mean of the positive values (NaN when there are none)."""
    if statistic == "median":
        return float(np.median(values))
    positive = values[values > 0]  # float64 logs: numpy's float32 log10 differs between CPUs
    return float(10 ** np.mean(np.log10(positive, dtype=np.float64))) if positive.size else float("nan")


def statistic_ci95(values: np.ndarray, statistic: str) -> tuple[float, float]:
    """95 % bootstrap interval of the statistic, computed exactly rather than by resampling.

    For the median, the bootstrap distribution is known in closed form: the resampled median is
    at most the j-th smallest value when at least half of the n draws fall at or below it, i.e.
    ``P = P(Binomial(n, j/n) >= n//2 + 1)``; the interval is read off that distribution (the limit
    of infinitely many resamples, deterministic, O(n)). For the geometric mean the bootstrap
    distribution of the mean of logs is normal to a very good approximation at these n.
    """
    from scipy.special import bdtrc  # P(Binomial(n, p) > k); scipy.stats costs 0.5 s more to import

    if statistic == "median":
        n = values.size
        # P rises from ~0 to ~1 within a few sqrt(n) ranks of the middle: evaluate it only there
        # (the whole range when the window does not hold both crossings, e.g. tiny n)
        reach = int(6 * np.sqrt(n)) + 10
        first, last = max(1, n // 2 - reach), min(n, n // 2 + reach)
        cdf = bdtrc(n // 2, n, np.arange(first, last + 1) / n)
        if cdf[0] >= 0.025 or cdf[-1] < 0.975:
            first, cdf = 1, bdtrc(n // 2, n, np.arange(1, n + 1) / n)
        lo = min(first - 1 + int(np.searchsorted(cdf, 0.025)), n - 1)
        hi = min(first - 1 + int(np.searchsorted(cdf, 0.975)), n - 1)
        x = np.partition(values, [lo, hi])
        return float(x[lo]), float(x[hi])
    logs = np.log10(values[values > 0], dtype=np.float64)
    half = 1.96 * logs.std(ddof=1) / np.sqrt(logs.size)
    return float(10 ** (logs.mean() - half)), float(10 ** (logs.mean() + half))


def gates_disagree(
    gating: GatingResult, channel: str, statistic: str, mfi: float, mfi_ci: tuple[float, float]
) -> list[str]:
    """``gates_disagree:<gate> <difference>`` for each alternative gate whose monocytes' statistic
    falls outside the result's 95 % interval: two gates that disagree by more than the result's
    uncertainty are reported, not silently chosen between."""
    out = []
    for name, mask in gating.alternatives.items():
        other = monocyte_statistic(gating.compensated[channel][mask], statistic)
        if not mfi_ci[0] <= other <= mfi_ci[1]:
            out.append(f"gates_disagree:{name} {other / mfi - 1:+.1%}")
    return out


def compatibility_flags(
    sample: Sample, calibration: Calibration, panel: Panel, policy: QCPolicy
) -> list[str]:
    """What differs between the bead tube and the patient tube, for the channels the measurement uses."""
    flags = []
    if calibration.channel not in sample.channels:
        flags.append(f"channel_missing:{calibration.channel}")
    if panel["HLA-DR"] != calibration.channel:
        flags.append(f"channel_mismatch:HLA-DR on {panel['HLA-DR']}, beads on {calibration.channel}")
    gating_channels = [panel[role] for role in ("CD14", "CD45", "FSC-A", "FSC-H", "SSC-A") if panel[role]]
    flags += policy.settings_flags(
        calibration.settings, sample.settings, calibration.channel, gating_channels
    )
    for key in ("cytometer", "serial"):
        a, b = calibration.instrument.get(key), sample.instrument.get(key)
        if a and b and instrument_key(a) != instrument_key(b):
            flags.append(f"{key}_mismatch:{a} beads vs {b} sample")
    return flags


def interval_parts(
    sample: Sample,
    calibration: Calibration,
    panel: Panel,
    gating: GatingResult,
    pe_all: np.ndarray,
    pe: np.ndarray,
    statistic: str,
    mfi: float,
    reagent: Reagent,
) -> uncertainty.Uncertainty:
    """Sampling, bead-curve, gate and reagent parts of the 95 % interval (``hladr.uncertainty``)."""
    abc = float(calibration.molecules(mfi))
    lo, hi = (float(calibration.molecules(v)) for v in statistic_ci95(pe, statistic))
    sampling = max(np.log10(abc / lo), np.log10(hi / abc)) if lo > 0 and hi > 0 else np.nan
    columns = [gating.compensated[panel["CD14"]]]
    for role in ("SSC-A", "CD45"):
        if panel[role]:
            column = gating.compensated.get(panel[role])
            columns.append(column if column is not None else sample.events[:, sample.index(panel[role])])
    gate = uncertainty.gate_halfwidth(
        columns,
        pe_all,
        gating.monocytes,
        gating.leukocytes | gating.monocytes,
        lambda values: float(calibration.molecules(monocyte_statistic(values, statistic))),
    )
    return uncertainty.Uncertainty(
        sampling=float(sampling),
        calibration=uncertainty.calibration_halfwidth(calibration, mfi),
        gating=gate,
        reagent=reagent.halfwidth,
    )


def _reason(flag: str, policy: QCPolicy) -> str:
    """A failing flag with its rule in words, for the reader of a non-reportable result."""
    rule = policy.explain(flag)
    return f"{flag} ({rule})" if rule else flag


class _BackgroundHash:
    """A tube file's SHA-256, computed on a thread while the gating runs (hashlib releases the GIL).

    The thread lowers its own priority (Linux), so that it hashes on the time the gating leaves a
    core idle instead of slowing the gating's parallel kernels, whose threads would all wait for the
    one sharing a core with it (about 40 ms of a 1M-event analysis). :meth:`finish` hands the digest
    to the Sample; when the thread has not finished by then (a busy machine gives it almost no time),
    it is stopped after its current 64 KB and the calling thread hashes the file itself, at its own
    priority, so that the analysis never waits for a starved thread.
    """

    def __init__(self, sample: Sample) -> None:
        self.sample, self.digest = sample, None
        self.caller = threading.get_native_id()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        # only a thread of its own: under green threads (gevent) this would be the caller's thread
        if sys.platform.startswith("linux") and threading.get_native_id() != self.caller:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        digest = hashlib.sha256()
        try:
            with open(self.sample.path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 16), b""):
                    if self.stop.is_set():
                        return
                    digest.update(chunk)
        except OSError:
            return  # the calling thread meets the error again when it hashes the file itself
        self.digest = digest.hexdigest()

    def finish(self) -> None:
        """Give the Sample its SHA-256: the thread's, or (stopped) the calling thread's own."""
        if self.thread.is_alive():
            self.stop.set()
        self.thread.join()
        if self.digest is not None:
            self.sample.sha256 = self.digest
        _ = self.sample.sha256  # hashed here when the thread did not finish (an error is raised here)


@functools.cache
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("hladr", "numpy", "numba", "scikit-learn", "flowkit", "flowutils"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
