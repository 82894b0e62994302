"""Gating a patient tube down to CD14+ monocytes (keeping HLA-DR-low monocytes).

The gating is a sequence of steps (:data:`DEFAULT_SEQUENCE`), each a gate with one shape: it reads
the tube (:class:`Tube`: the sample, its panel, the compensated channels and their logs) and the
events its parent step kept, and returns a :class:`GateOutcome` (the events it keeps, what it found,
the QC flags it raises). The default sequence: non-finite events -> scatter margins -> time (clogs)
-> singlets (FSC-A vs FSC-H) -> debris (low FSC-A) -> CD45+ leukocytes (3-colour panels) -> CD14+
monocytes with low-to-intermediate SSC. HLA-DR is never used to find monocytes. A step can be
inspected, replaced or added (:class:`GatingSequence`); :func:`gate_monocytes` runs a sequence and
records each step's events in and out, and which steps were replaced.

The default gates are automatic and density based (valleys of smoothed histograms, robust
spreads). When the joint monocyte gate fails its own QC (no CD14 valley, too few monocytes, an
implausible fraction: thresholds of the :class:`~hladr.qc.QCPolicy`) the density gate, then a
Gaussian-mixture clustering over CD14/SSC/CD45 (scikit-learn) take over. User gates from a GatingML
2.0 file or a FlowJo workspace replace the automatic monocyte gate. See ``docs/gating.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, stats

from . import kernels
from .errors import GatingError, PanelError
from .fcs import Sample
from .panel import Panel, time_channel
from .qc import DEFAULT_POLICY, QCPolicy

__all__ = [
    "DEFAULT_SEQUENCE",
    "GateOutcome",
    "GateStep",
    "GatingResult",
    "GatingSequence",
    "JointGate",
    "RoleLogs",
    "Tube",
    "automatic_monocyte_gate",
    "cd14_valley",
    "choose_gate",
    "scale_values",
    "compensate",
    "compensated_columns",
    "debris_gate",
    "gate_monocytes",
    "granulocyte_ssc_limit",
    "leukocyte_gate",
    "margin_gate",
    "monocyte_gate_density",
    "monocyte_gate_gmm",
    "monocyte_gate_joint",
    "no_granulocytes",
    "nonfinite_gate",
    "singlet_gate",
    "spillover_matrix",
    "time_gate",
    "user_gate",
    "user_monocyte_step",
    "workspace_sample_id",
    "workspace_samples",
]


# --- the gate protocol ----------------------------------------------------------------------------
@dataclass(frozen=True)
class GateOutcome:
    """What every gate returns.

    Attributes
    ----------
    mask
        The events the gate keeps, over all events of the tube (the runner keeps only those that
        were also in the parent population).
    info
        JSON-ready details recorded in the gate log (thresholds, counts, the method); a ``"gate"``
        entry renames the population there.
    flags
        QC flags the gate raises (their severity is the policy's).
    alternatives
        Other gates' answers for the same population, kept to compare (``GatingResult.alternatives``).
    """

    mask: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    alternatives: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class JointGate:
    """Boundaries of the joint monocyte gate (:func:`monocyte_gate_joint`).

    Perturbing them (e.g. to measure how much a result depends on its gate) re-gates the tube
    with everything else unchanged.

    Attributes
    ----------
    core_sd
        CD14-bright monocytes: within this many robust SD of their median on every shape channel.
    dim_reach
        Decades below the core's median CD14 that CD14-dim monocytes may reach.
    ellipse
        CD14-dim candidates lie within this probability mass of the monocytes' Gaussian (scatter
        and CD45): the Mahalanobis radius is its chi-square quantile.
    posterior
        Least posterior probability of "monocyte" (against the tube's other leukocytes).
    background_events, background_components
        The other leukocytes near the monocytes' CD14 are modelled by a Gaussian mixture of this
        many components fitted to at most this many of them.
    background_margin
        Decades below the lowest monocyte CD14 from which that background is drawn.
    slice_width
        The monocytes' share of the candidates is estimated per CD14 slice of this many decades.
    hladr_window
        CD14-dim candidates must have an HLA-DR within this many robust SD of the CD14-bright
        monocytes' median (a window symmetric in log HLA-DR).
    valley_depth
        Deepest acceptable CD14 valley (density at the valley / the lower neighbouring peak).
    """

    core_sd: float = 3.0
    dim_reach: float = 1.2
    ellipse: float = 0.999
    posterior: float = 0.9999
    background_events: int = 1000
    background_components: int = 5
    background_margin: float = 0.5
    slice_width: float = 0.1
    hladr_window: float = 2.0
    valley_depth: float = 0.8


class Tube:
    """What every gate reads: one patient tube prepared for gating.

    Attributes
    ----------
    sample, panel
        The tube and its resolved channel roles.
    compensated
        ``{channel: compensated float32 values}`` for the fluorescence roles (CD14, CD45, HLA-DR).
    notes
        What the compensation could not do (no spillover matrix...).
    logs
        ``logs[role]``: log10 of a role's channel, computed once and shared by the gates.
    policy
        The QC policy whose thresholds the gates apply (too many non-finite events, too few
        monocytes...).
    seed, bounds
        The joint monocyte gate's subsampling seed and boundaries.
    """

    def __init__(
        self,
        sample: Sample,
        panel: Panel,
        *,
        policy: QCPolicy = DEFAULT_POLICY,
        seed: int = 0,
        bounds: JointGate = JointGate(),
    ) -> None:
        self.sample, self.panel, self.policy, self.seed, self.bounds = sample, panel, policy, seed, bounds
        fluorescence = [panel["CD14"], panel["CD45"], panel["HLA-DR"]]
        self.compensated, self.notes = compensated_columns(sample, fluorescence)
        self.logs = RoleLogs(self.compensated, sample, panel)

    def column(self, role: str) -> np.ndarray:
        """The raw (uncompensated) values of a role's channel, as stored."""
        return self.sample.events[:, self.sample.index(self.panel[role])]

    @functools.cached_property
    def has_nonfinite(self) -> bool:
        """True when any event holds a NaN or infinite value (a fast count, no row scan; kept)."""
        events = np.ascontiguousarray(self.sample.events)
        return events.dtype.kind == "f" and kernels.count_nonfinite(events.reshape(-1)) > 0

    @property
    def finite(self) -> np.ndarray:
        """True for each event without a NaN or infinite value in any channel (a fast count of the
        non-finite values first: rows are only checked when there is one). Computed on each use,
        not kept: one gate reads it."""
        if not self.has_nonfinite:
            return np.ones(self.sample.n_events, dtype=bool)
        return np.isfinite(self.sample.events).all(axis=1)

    @property
    def inside_margins(self) -> np.ndarray:
        """True for each event whose FSC-A and SSC-A (those the tube has) are inside (0, 0.999 x the
        channel's saturation); the saturation of a log-amplified channel is its top channel decoded.
        Computed on each use, not kept: one gate reads it."""
        events, panel = self.sample.events, self.panel
        roles = [role for role in ("FSC-A", "SSC-A") if panel[role]]
        columns = np.array([self.sample.index(panel[role]) for role in roles], dtype=np.int64)
        tops = [0.999 * self.sample.saturation(panel[role]) for role in roles]
        # compared in the events' own float type, as numpy compares a float32 column with a number
        tops_typed = np.array(tops, dtype=events.dtype if events.dtype.kind == "f" else np.float64)
        return kernels.inside_ranges(events, columns, tops_typed)


#: A gate: (the tube, the events its parent step kept) -> its outcome.
Gate = Callable[[Tube, np.ndarray], GateOutcome]


@dataclass(frozen=True)
class GateStep:
    """One step of a gating sequence.

    Attributes
    ----------
    name
        The step's name in the sequence (``"singlets"``); the population it gates is known by it.
    gate
        The gate (:data:`Gate`).
    parent
        The step whose population this step gates (default: the step before it).
    label
        The population's name in the gate log (default: ``name``).
    """

    name: str
    gate: Gate
    parent: str | None = None
    label: str | None = None

    @property
    def source(self) -> str:
        """The gate's qualified name (``hladr.gating.singlet_gate``; a callable object: its repr), as
        recorded in provenance."""
        if hasattr(self.gate, "__qualname__"):
            return f"{self.gate.__module__}.{self.gate.__qualname__}"
        return repr(self.gate)


@dataclass(frozen=True)
class GatingSequence:
    """An ordered sequence of gating steps: inspect it, replace a step, add one.

    ``sequence.names`` lists the steps; ``sequence["singlets"]`` is one; ``sequence.replace("singlets",
    stricter)`` and ``sequence.insert_after("debris", GateStep(...))`` return new sequences (this
    one is never changed). The monocytes are the last step's population.
    """

    steps: tuple[GateStep, ...]

    def __post_init__(self) -> None:
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"gating step names must be unique, got {names}")
        for i, step in enumerate(self.steps):
            if step.parent is not None and step.parent not in names[:i]:
                raise ValueError(f"step {step.name!r}: its parent {step.parent!r} is not an earlier step")

    def __iter__(self) -> Iterator[GateStep]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, name: str) -> GateStep:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(f"no gating step {name!r} (steps: {', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        return [step.name for step in self.steps]

    def replace(self, name: str, gate: Gate | GateStep) -> GatingSequence:
        """A copy whose step ``name`` runs ``gate`` (a gate function keeps the step's name, parent
        and label; a :class:`GateStep` replaces the step whole)."""
        old = self[name]
        new = gate if isinstance(gate, GateStep) else dataclasses.replace(old, gate=gate)
        return GatingSequence(tuple(new if step is old else step for step in self.steps))

    def insert_after(self, name: str, step: GateStep) -> GatingSequence:
        """A copy with ``step`` added after the step ``name``."""
        at = self.names.index(self[name].name) + 1
        return GatingSequence((*self.steps[:at], step, *self.steps[at:]))

    def describe(self, default: GatingSequence | None = None) -> list[dict[str, Any]]:
        """Each step's name and gate; the steps that differ from ``default``'s are marked replaced
        or added (this is what a Result's provenance records)."""
        reference = {step.name: step for step in (default or DEFAULT_SEQUENCE)}
        out = []
        for step in self.steps:
            entry: dict[str, Any] = {"step": step.name, "gate": step.source}
            if step.name not in reference:
                entry["added"] = True
            elif step != reference[step.name]:
                entry["replaced"] = True
            out.append(entry)
        return out


@dataclass
class GatingResult:
    """Masks over all events of the tube, the compensated data used, and each gate's counts."""

    monocytes: np.ndarray
    leukocytes: np.ndarray
    singlets: np.ndarray
    clean: np.ndarray
    compensated: dict[str, np.ndarray]  # channel -> compensated float32 values, for the role channels
    method: str
    gates: list[dict[str, Any]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    alternatives: dict[str, np.ndarray] = field(default_factory=dict)  # other gates' monocytes, to compare
    sequence: list[dict[str, Any]] = field(default_factory=list)  # GatingSequence.describe()


# --- helpers ----------------------------------------------------------------------------------
def spillover_matrix(sample: Sample) -> tuple[list[str], np.ndarray] | None:
    """(channels, matrix) of the Sample's spillover (parsed once, by :func:`hladr.fcs.read_fcs`), or None."""
    if sample.spillover is None:
        return None
    return list(sample.spillover.channels), np.asarray(sample.spillover.matrix, dtype=float)


def compensate(sample: Sample) -> tuple[np.ndarray, list[str]]:
    """Events with the file's spillover removed (an n x p float32 copy), and notes.

    ``compensated = observed @ inverse(spillover)`` on the spillover's channels: the same
    arithmetic as flowutils' ``compensate`` (a test checks they agree), as a numba kernel with
    the matrix inverted once.
    """
    columns, notes = compensated_columns(sample, sample.channels)
    return np.column_stack([columns[name] for name in sample.channels]), notes


def compensated_columns(sample: Sample, channels: Iterable[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """``{channel: compensated float32 values}`` for ``channels`` only, and notes.

    The gates need three fluorescence channels of the tube's p: computing only those (each a
    contiguous array) is what keeps the analysis of a 1M-event tube fast and small. Channels
    outside the spillover matrix are returned as stored, in float32.
    """
    wanted = list(dict.fromkeys(c for c in channels if c))
    events = np.ascontiguousarray(sample.events)
    spill = spillover_matrix(sample)
    notes: list[str] = []
    names: list[str] = []
    if spill is None:
        notes.append("no spillover matrix in the file: data not compensated")
    elif not all(n in sample.channels for n in spill[0]):
        notes.append(f"spillover channels {spill[0]} not all in the file: data not compensated")
    else:
        names = spill[0]
    inside = [c for c in wanted if c in names]
    out: dict[str, np.ndarray] = {}
    if inside:
        columns = np.array([sample.channels.index(n) for n in names], dtype=np.int64)
        outputs = np.array([names.index(c) for c in inside], dtype=np.int64)
        rows = kernels.compensate_columns(events, columns, np.linalg.inv(spill[1]), outputs)
        out.update(zip(inside, rows))
    for c in wanted:
        if c not in out:
            out[c] = np.ascontiguousarray(events[:, sample.index(c)], dtype=np.float32)
    return out, notes


class RoleLogs(dict):
    """``logs[role]``: log10 of a role's channel over all events (compensated for fluorescence),
    computed on first use and kept: the gates of one tube (one leukocyte mask) share them.

    :meth:`at` and :meth:`kept_sample` give the same values for some events only, without computing
    (and holding) the whole column's log when no gate has needed it yet.
    """

    def __init__(self, comp: Mapping[str, np.ndarray], sample: Sample, panel: Panel) -> None:
        super().__init__()
        self.comp, self.sample, self.panel = comp, sample, panel

    def linear(self, role: str) -> np.ndarray:
        """A role's channel over all events, compensated for fluorescence, before the log."""
        channel = self.panel[role]
        if channel in self.comp and role not in ("FSC-A", "FSC-H", "SSC-A", "DNA"):
            return self.comp[channel]
        return self.sample.events[:, self.sample.index(channel)]

    def __missing__(self, role: str) -> np.ndarray:
        self[role] = kernels.log10_float32(self.linear(role))
        return self[role]

    def per_mask(self, name: str, mask: np.ndarray, compute: Callable[[], Any]) -> Any:
        """``compute()``, computed once per mask (the CD14 valley of one leukocyte population...).

        Kept with the mask itself: an entry keyed by ``id(mask)`` alone could be found again by
        another mask allocated where a freed one was (a custom sequence's populations are freed
        once no later step reads them).
        """
        key = (name, id(mask))
        entry = self.get(key)
        if entry is None or entry[0] is not mask:
            entry = self[key] = (mask, compute())
        return entry[1]

    def at(self, role: str, rows: np.ndarray) -> np.ndarray:
        """``logs[role][rows]``."""
        return self[role][rows] if role in self else kernels.log10_float32(self.linear(role)[rows])

    def kept_sample(self, role: str, keep: np.ndarray, limit: int = 200_000) -> np.ndarray:
        """``_kept_sample(logs[role], keep, limit)``."""
        if role in self:
            return _kept_sample(self[role], keep, limit)
        return kernels.log10_float32(_kept_sample(self.linear(role), keep, limit))


def _valley(
    values: np.ndarray,
    lo: float,
    hi: float,
    bins: int = 200,
    sigma: float = 3.0,
    keep: np.ndarray | None = None,
) -> tuple[float, float]:
    """Deepest point of the smoothed histogram of ``values`` (those where ``keep``, when given)
    between ``lo`` and ``hi``.

    Returns (position, depth) where depth = valley density / the lower of the two
    highest densities on either side (0 = empty valley, 1 = no valley).
    """
    if not hi > lo:
        return float("nan"), 1.0
    counts = kernels.histogram(values, lo, hi, bins, keep)
    if counts.sum() < 50:
        return float("nan"), 1.0
    smooth = ndimage.gaussian_filter1d(counts, sigma, mode="constant", radius=int(4 * sigma) + 1)
    highest_before = np.maximum.accumulate(smooth)  # [k]: max of smooth[: k + 1]
    highest_after = np.maximum.accumulate(smooth[::-1])[::-1]  # [k]: max of smooth[k:]
    k = np.arange(2, bins - 2)
    left, right = highest_before[k - 1], highest_after[k + 1]
    usable = (left > 0) & (right > 0)
    if not usable.any():
        return float("nan"), 1.0
    depth = np.where(usable, smooth[k] / np.where(usable, np.minimum(left, right), 1.0), np.inf)
    best = int(np.argmin(depth))
    if not depth[best] < 1.0:
        return float("nan"), 1.0
    return float(lo + (k[best] + 0.5) * (hi - lo) / bins), float(depth[best])


def _thin(x: np.ndarray, limit: int = 200_000) -> np.ndarray:
    """Every k-th value (row, of a 2-D array), k = ``max(1, x.size // limit)``: about ``limit`` numbers
    in all, so a 2-D array keeps about ``limit / columns`` rows; enough for a median, deterministic."""
    return x[:: max(1, x.size // limit)]


def _thinning(n: int, limit: int = 200_000) -> tuple[int, int]:
    """(k, how many values) of :func:`_thin` on ``n`` values."""
    k = max(1, n // limit)
    return k, len(range(0, n, k))


def _kept_sample(values: np.ndarray, keep: np.ndarray, limit: int = 200_000) -> np.ndarray:
    """``_thin(values[keep], limit)``, without copying the kept values first."""
    return kernels.every_kth_kept(values, keep, *_thinning(int(np.count_nonzero(keep)), limit))


def _robust(x: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based SD (the MAD scaled to a normal SD; of at most 200,000 values)."""
    x = _thin(x)
    med = np.median(x)
    sd = stats.median_abs_deviation(x, scale="normal", center=lambda values, axis: med)  # median taken once
    return float(med), float(sd) or 1e-3


# --- the gates (each a Gate: (tube, parent population) -> GateOutcome) ----------------------------
def nonfinite_gate(tube: Tube, keep: np.ndarray) -> GateOutcome:
    """Events without a NaN or infinite value in any channel.

    More than the policy's ``max_nonfinite_fraction`` of the tube's events refuse the file
    (:class:`GatingError`); fewer are dropped with the ``nonfinite_events:<count>`` flag.
    """
    n = tube.sample.n_events
    finite = tube.finite
    bad = n - int(np.count_nonzero(finite))
    limit = tube.policy.max_nonfinite_fraction
    if bad > limit * n:
        raise GatingError(
            f"{bad:,} of {n:,} events hold NaN or infinite values "
            f"(more than {limit:.0%}): the file is refused",
            tube.sample.path,
        )
    return GateOutcome(keep & finite, {"nonfinite": bad}, (f"nonfinite_events:{bad}",) if bad else ())


def margin_gate(tube: Tube, keep: np.ndarray) -> GateOutcome:
    """Events whose scatter (where the tube has scatter) is inside (0, 0.999 x range)."""
    mask = keep & tube.inside_margins
    if not mask.any():
        raise GatingError("no event is inside the scatter margins", tube.sample.path)
    return GateOutcome(mask)


def time_gate(tube: Tube, keep: np.ndarray, bins: int = 100) -> GateOutcome:
    """Drop time windows with a flow-rate drop or an unstable signal (a clog).

    The signal is FSC-A, or the DNA channel in mass cytometry; without either, only the rate.
    Removing more than the policy's ``time_gate_warn`` of the events flags ``time_gate_removed``.
    """
    sample, panel = tube.sample, tube.panel
    n_in = int(np.count_nonzero(keep))
    if panel.time is None or n_in < 2000:
        return GateOutcome(keep, {"note": "no time channel" if panel.time is None else "too few events"})
    t = sample.events[:, sample.index(panel.time)]
    n_bins = int(min(bins, max(10, n_in // 400)))
    first, last = kernels.kept_range(t, keep)
    lo, hi = float(first), float(last) + 1e-9
    signal_role = "FSC-A" if panel["FSC-A"] else "DNA" if panel["DNA"] else None
    if signal_role:
        signal = kernels.log10_float32(tube.column(signal_role))
    else:
        signal = np.zeros(t.size, dtype=np.float32)
    rate, sums = kernels.time_bins(t, signal, keep, lo, hi, n_bins)
    level = np.where(rate > 5, 10 ** (sums / np.maximum(rate, 1)), np.nan)  # geometric mean signal per bin
    med_rate, med_level = np.median(rate), np.nanmedian(level)
    bad = (rate < 0.5 * med_rate) | (np.abs(level / med_level - 1) > 0.15)
    bad[np.isnan(level)] = True
    # an isolated bad bin between good ones is noise, not a clog; widen real clogs by a bin each side
    if bad.sum() and bad.sum() < n_bins // 2:
        runs = np.convolve(bad.astype(int), [1, 1, 1], mode="same") >= 2
        bad = np.convolve(runs.astype(int), [1, 1, 1], mode="same") > 0
    else:
        bad[:] = False  # no stable baseline: do not gate on time
    timed = kernels.outside_bins(t, keep, lo, hi, bad) if bad.any() else keep
    removed = (n_in - int(np.count_nonzero(timed))) / n_in
    flags = (f"time_gate_removed:{removed:.0%}",) if removed > tube.policy.time_gate_warn else ()
    return GateOutcome(timed, {"bins_removed": int(bad.sum()), "bins": n_bins}, flags)


def singlet_gate(tube: Tube, keep: np.ndarray) -> GateOutcome:
    """Singlets: FSC-H/FSC-A near the population's ratio (doublets have a low ratio)."""
    if not tube.panel["FSC-H"]:
        return GateOutcome(keep)
    a, h = tube.column("FSC-A"), tube.column("FSC-H")
    # the ratio FSC-H/FSC-A (0 where FSC-A <= 0) in numpy's dtype for it, never held for every event
    dtype = np.result_type(h, a, np.float32)
    single = bool(dtype == np.float32)
    thinning = _thinning(int(np.count_nonzero(keep)))
    med, sd = _robust(kernels.kept_ratios(h, a, keep, *thinning, single).astype(dtype))
    # compared in the ratio's dtype, as numpy compares an array with a number
    lo, hi = np.array([med - 4 * sd, med + 6 * sd], dtype=dtype)
    return GateOutcome(kernels.ratio_between(h, a, keep, lo, hi, single))


def debris_gate(tube: Tube, keep: np.ndarray) -> GateOutcome:
    """Cells: FSC-A above the valley below the lymphocytes (or 35 % of the median FSC-A).

    In mass cytometry the DNA channel plays FSC-A's part (nucleated cells vs debris; flag
    ``no_scatter``); a tube with neither keeps every event (threshold NaN).
    """
    panel = tube.panel
    size_role = "FSC-A" if panel["FSC-A"] else "DNA"
    key = "fsc_min" if panel["FSC-A"] or not panel["DNA"] else "dna_min"
    flags = () if panel["SSC-A"] else ("no_scatter",)  # mass cytometry: gated on DNA, CD45 and CD14 only
    if not panel[size_role]:
        return GateOutcome(keep, {key: float("nan")}, flags)
    size = kernels.log10_float32(tube.column(size_role))  # not kept in tube.logs: no later gate reads it
    med = float(np.median(_kept_sample(size, keep)))
    pos, depth = _valley(size, med - 1.5, med - 0.15, keep=keep)
    cut = pos if depth < 0.6 else med + np.log10(0.35)
    cut = max(cut, med + np.log10(0.2))
    return GateOutcome(keep & (size > cut), {key: float(10**cut)}, flags)


def leukocyte_gate(tube: Tube, keep: np.ndarray) -> GateOutcome:
    """CD45+ events: above the valley between CD45-negative debris/RBC and leukocytes."""
    if not tube.panel["CD45"]:
        return GateOutcome(keep, {"gate": "leukocytes (no CD45)", "cd45_min": float("nan")})
    cd45 = tube.logs["CD45"]
    lo, med = np.percentile(_kept_sample(cd45, keep), [0.5, 50])
    pos, depth = _valley(cd45, lo, med, keep=keep)
    cut = pos if depth < 0.5 else med - 1.0
    return GateOutcome(keep & (cd45 > cut), {"cd45_min": float(10**cut)})


def cd14_valley(logs: RoleLogs, leuk: np.ndarray) -> tuple[float, float]:
    """(log10 position, depth) of the CD14 valley of the leukocytes, searched from their median
    + 0.2 decade to the 99.99th percentile (so a few hundred monocytes suffice); kept in ``logs``."""

    def valley() -> tuple[float, float]:
        cd14 = logs["CD14"]
        bulk, top = (float(v) for v in np.percentile(_kept_sample(cd14, leuk), [50, 99.99]))
        return _valley(cd14, bulk + 0.2, top, keep=leuk)

    return logs.per_mask("cd14_valley", leuk, valley)


def monocyte_gate_density(tube: Tube, leuk: np.ndarray) -> GateOutcome:
    """CD14+ (above the CD14 valley) with low-to-intermediate SSC and bright CD45.

    Without SSC (mass cytometry) the SSC criteria are left out: CD14+ and CD45-bright.
    """
    logs, panel = tube.logs, tube.panel
    cd14 = logs["CD14"]
    pos, depth = cd14_valley(logs, leuk)
    info: dict[str, Any] = {
        "cd14_valley": float(10**pos) if np.isfinite(pos) else None,
        "valley_depth": depth,
    }
    if not np.isfinite(pos) or depth > 0.5:
        info["failed"] = "no CD14 valley"
        return GateOutcome(np.zeros_like(leuk), info)
    cd14_pos = leuk & (cd14 > pos)
    if np.count_nonzero(cd14_pos) < 20:
        info["failed"] = "almost no CD14+ events"
        return GateOutcome(cd14_pos, info)
    mono = cd14_pos
    if panel["SSC-A"]:  # low-to-intermediate SSC: drop CD14+ events in the granulocytes' SSC range
        rows = np.flatnonzero(cd14_pos)
        ssc = logs.at("SSC-A", rows)
        m_ssc, s_ssc = _robust(ssc)
        mono = np.zeros_like(cd14_pos)
        mono[rows[(ssc < m_ssc + 3 * s_ssc) & (ssc > m_ssc - 4 * s_ssc)]] = True
        info["ssc_max"] = float(10 ** (m_ssc + 3 * s_ssc))
    if panel["CD45"]:
        cd45 = logs["CD45"]
        m45, s45 = _robust(_kept_sample(cd45, mono))
        mono &= cd45 > m45 - 4 * s45
    return GateOutcome(mono, info)


def no_granulocytes(log_ssc: np.ndarray, leuk: np.ndarray, gated: np.ndarray) -> bool:
    """True when no granulocyte population shares the gated events' SSC.

    Granulocytes are 40-70 % of the leukocytes of whole blood: when fewer than 10 % of the other
    leukocytes reach half the gated events' median SSC and the gated events are under 20 % of the
    leukocytes (so they are not the granulocytes themselves), the tube has no granulocytes.
    """
    n_leuk = max(int(np.count_nonzero(leuk)), 1)
    floor = float(np.median(log_ssc[gated])) - np.log10(2)
    others_high = int(np.count_nonzero(leuk & ~gated & (log_ssc >= floor)))
    return others_high < 0.1 * n_leuk and np.count_nonzero(gated) < 0.2 * n_leuk


def granulocyte_ssc_limit(log_ssc_sample: np.ndarray) -> float:
    """log10 SSC above which a population is granulocyte-like: 80 % of the 90th percentile of the
    leukocytes' log SSC (given as an evenly thinned sample of them, :func:`_kept_sample`)."""
    return float(np.percentile(log_ssc_sample, 90) + np.log10(0.8))


def _granulocyte_like(logs: RoleLogs, leuk: np.ndarray, rows: np.ndarray) -> bool:
    """True when the median SSC of the events ``rows`` is granulocyte-like (the limit for these
    leukocytes is kept in ``logs``)."""
    limit = logs.per_mask("ssc_limit", leuk, lambda: granulocyte_ssc_limit(logs.kept_sample("SSC-A", leuk)))
    return bool(np.median(logs.at("SSC-A", _thin(rows, 50_000))) > limit)


def monocyte_gate_gmm(tube: Tube, leuk: np.ndarray) -> GateOutcome:
    """Gaussian-mixture fallback over log CD14, log SSC (and log CD45): the CD14-bright components
    (without SSC in mass cytometry); seeded with ``tube.seed``."""
    from sklearn.mixture import GaussianMixture

    from .beads import quiet_mixture_fits

    logs, panel, sample, seed = tube.logs, tube.panel, tube.sample, tube.seed
    cols = [logs["CD14"]]
    if panel["SSC-A"]:
        cols.append(logs["SSC-A"])
    if panel["CD45"]:
        cols.append(logs["CD45"])
    x = np.column_stack(cols)
    idx = np.flatnonzero(leuk)
    if idx.size < 200:
        raise GatingError(f"only {idx.size} leukocytes: cannot find monocytes", sample.path)
    rng = np.random.default_rng(seed)
    fit_idx = rng.choice(idx, size=min(idx.size, 30_000), replace=False)
    with quiet_mixture_fits():  # the gate is judged by its QC (_problem), not by convergence
        gmm = GaussianMixture(n_components=6, covariance_type="full", random_state=seed, n_init=2)
        gmm.fit(x[fit_idx])
    labels = gmm.predict(x[idx])
    bulk = float(np.median(x[idx, 0]))
    ssc_limit = granulocyte_ssc_limit(_kept_sample(x[:, 1], leuk)) if panel["SSC-A"] else np.inf
    mono_components = [
        k
        for k in range(gmm.n_components)
        if gmm.means_[k, 0] > bulk + 0.8 and (not panel["SSC-A"] or gmm.means_[k, 1] < ssc_limit)
    ]
    if not mono_components:
        raise GatingError(
            "no CD14-bright population found (density gate and clustering fallback)", sample.path
        )
    mono = np.zeros(leuk.shape, dtype=bool)
    mono[idx] = np.isin(labels, mono_components)
    return GateOutcome(mono)


def _asinh_decades(x: np.ndarray, cofactor: float) -> np.ndarray:
    """``asinh(x / cofactor)`` in decades: log-like above the cofactor, linear through zero (so an
    unstained channel's noise around 0 stays one smooth population)."""
    quotient = np.divide(x, np.float32(cofactor))
    # float64 and rounded once (no float64 copy held): numpy's float32 arcsinh takes another path on
    # AVX-512 machines (405,769 of 4M values 1 ulp apart in review); this is the same on every CPU
    np.arcsinh(quotient, out=quotient, dtype=np.float64, casting="same_kind")
    return (quotient / np.float32(np.log(10))).astype(np.float32, copy=False)


def _cofactor(values: np.ndarray) -> float:
    """Noise scale of a compensated channel: the depth of its most negative values (at least 1)."""
    return max(1.0, -float(np.percentile(values, 1)))


def _mahalanobis2(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    z = (x - mean) @ np.linalg.inv(np.linalg.cholesky(cov)).T
    return np.einsum("ij,ij->i", z, z)


def _gaussian_logpdf(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    chol = np.linalg.cholesky(cov)
    z = (x - mean) @ np.linalg.inv(chol).T
    log_det = 2 * np.log(np.diag(chol)).sum()
    return -0.5 * (np.einsum("ij,ij->i", z, z) + log_det + x.shape[1] * np.log(2 * np.pi))


def _mixture_logpdf(x: np.ndarray, weights: np.ndarray, means: np.ndarray, covs: np.ndarray) -> np.ndarray:
    parts = np.stack([np.log(w) + _gaussian_logpdf(x, m, c) for w, m, c in zip(weights, means, covs)])
    top = parts.max(axis=0)
    return top + np.log(np.exp(parts - top).sum(axis=0))


def _robust_gaussian(x: np.ndarray, mass: float = 0.975, rounds: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the bulk of ``x`` (n x d), by trimming to the ``mass`` ellipse.

    The covariance of a Gaussian cut to its ``q`` ellipse shrinks by ``P(chi2_{d+2} < q) /
    P(chi2_d < q)``; dividing by it gives back the whole Gaussian's covariance.
    """
    from scipy.special import chdtri, gammainc

    d = x.shape[1]
    q = float(chdtri(d, 1 - mass))
    shrink = float(gammainc(d / 2 + 1, q / 2) / gammainc(d / 2, q / 2))
    mean, cov = np.median(x, axis=0), np.cov(x, rowvar=False).reshape(d, d) + 1e-6 * np.eye(d)
    for _ in range(rounds):
        keep = _mahalanobis2(x, mean, cov) <= q
        if keep.sum() <= 2 * d:
            break
        mean = x[keep].mean(axis=0)
        cov = np.cov(x[keep], rowvar=False).reshape(d, d) / shrink + 1e-6 * np.eye(d)
    return mean, cov


def monocyte_gate_joint(tube: Tube, leuk: np.ndarray, bounds: JointGate | None = None) -> GateOutcome:
    """Monocytes from every channel jointly: CD14, FSC-A, FSC-H, SSC-A, CD45 (those present), HLA-DR.

    1. CD14-bright monocytes: the leukocytes above the CD14 valley within ``core_sd`` robust SD
       of their median on every shape channel (FSC-A, FSC-H, SSC-A, CD45). A Gaussian fitted
       (trimmed) to them is the monocytes' shape.
    2. CD14-dim events (down to ``dim_reach`` decades below their CD14) inside the shape's
       ``ellipse`` are CD14-dim monocytes or CD14-dim granulocytes. They must have an HLA-DR within
       ``hladr_window`` robust SD of the bright monocytes' median (HLA-DR-negative granulocytes
       out; the window is symmetric in log HLA-DR, so it does not pull the median), then a
       two-class mixture decides: the monocytes (their shape, uniform in CD14) against the other
       leukocytes around them (a Gaussian mixture over shape and CD14, fitted by EM jointly with
       the monocytes' share of each CD14 slice, so it never has to explain the monocytes). Those
       with a posterior of at least ``posterior`` are kept. A tube without granulocytes (PBMC)
       skips this step: the model is built for, and verified on, CD14-dim granulocytes.

    ``bounds``: default ``tube.bounds``. Deterministic for a given ``tube.seed`` (the subsamples
    the mixture is fitted to).
    """
    panel, comp, logs, seed = tube.panel, tube.compensated, tube.logs, tube.seed
    bounds = bounds or tube.bounds
    shape = [tube.column(role) for role in ("FSC-A", "FSC-H", "SSC-A") if panel[role]]
    fluor = [comp[panel["CD45"]]] if panel["CD45"] else []
    if not shape and not fluor:
        return monocyte_gate_density(tube, leuk)
    info: dict[str, Any] = {}
    cd14 = logs["CD14"]
    valley, depth = cd14_valley(logs, leuk)
    info["valley_depth"] = depth
    if not np.isfinite(valley) or depth > bounds.valley_depth:
        info["failed"] = "no CD14 valley"
        return GateOutcome(np.zeros_like(leuk), info)
    spread_events = _spread_sample(leuk.size, 60_000, seed)
    leuk_sample = spread_events[leuk[spread_events]]  # for noise scales and the background
    cofactors = [_cofactor(column[leuk_sample]) for column in fluor]

    def features(rows: np.ndarray) -> np.ndarray:
        columns = [kernels.log10_float32(column[rows]) for column in shape]
        columns += [_asinh_decades(column[rows], c) for column, c in zip(fluor, cofactors)]
        return np.column_stack(columns)

    bright = np.flatnonzero(leuk & (cd14 > valley))
    x_bright = features(bright)
    thinned = _thin(x_bright, 20_000)
    med = np.median(thinned, axis=0)
    in_box = np.all(np.abs(x_bright - med) <= bounds.core_sd * _mad_sd(thinned, med), axis=1)
    core = bright[in_box]
    if core.size < 20:
        info["failed"] = f"only {core.size} events in the CD14-bright core"
        return GateOutcome(np.zeros_like(leuk), info)
    mean, cov = _robust_gaussian(_thin(x_bright[in_box], 5_000))
    low = min(float(np.median(cd14[core])) - bounds.dim_reach, valley)
    high = max(float(np.percentile(cd14[core], 99.9)), low + 0.5)
    from scipy.special import chdtri

    mono = np.zeros_like(leuk)
    mono[core] = True
    in_range = np.flatnonzero(leuk & (cd14 >= low) & (cd14 <= valley))
    x_range = features(in_range)
    dim_in = _mahalanobis2(x_range, mean, cov) <= float(chdtri(mean.size, 1 - bounds.ellipse))
    info.update(cd14_valley=float(10**valley), cd14_low=float(10**low), core=int(core.size))
    info.update(dim_candidates=int(dim_in.sum()), dim_kept=0)
    if not dim_in.any():
        return GateOutcome(mono, info)
    if panel["SSC-A"] and _granulocyte_like(logs, leuk, core) and no_granulocytes(logs["SSC-A"], leuk, mono):
        # the monocytes are the top-SSC population (PBMC): no CD14-dim granulocytes to tell
        # CD14-dim monocytes from, the CD14-bright ones only
        info["dim_skipped"] = "no granulocytes"
        return GateOutcome(mono, info)

    # CD14-dim candidates whose HLA-DR is within `hladr_window` robust SD of the bright monocytes'
    # median: HLA-DR-negative granulocytes out, and no pull on the monocytes' median (symmetric)
    hladr = comp[panel["HLA-DR"]]
    hladr_cofactor = _cofactor(hladr[leuk_sample])
    centre, spread = _robust(_asinh_decades(hladr[core], hladr_cofactor))
    dim_hladr = _asinh_decades(hladr[in_range[dim_in]], hladr_cofactor)
    within = np.abs(dim_hladr - centre) <= bounds.hladr_window * spread
    dim, x_dim_shape = in_range[dim_in][within], x_range[dim_in][within]
    info["dim_in_hladr_window"] = int(dim.size)
    if not dim.size:
        return GateOutcome(mono, info)
    # the other leukocytes around the candidates, from the evenly spread sample of leukocytes
    taken = np.zeros(leuk.size, dtype=bool)
    taken[core] = True
    taken[in_range[dim_in]] = True
    pool = leuk_sample[(cd14[leuk_sample] >= low - bounds.background_margin) & ~taken[leuk_sample]]
    rest = pool[_spread_sample(pool.size, bounds.background_events, seed)]
    x_rest = features(rest)
    # nothing to tell apart when none of the leukocytes just below the CD14 range has a monocyte's
    # shape and HLA-DR: the candidates are then all kept (e.g. blood without activated granulocytes)
    below = cd14[rest] < low
    radius2 = float(chdtri(mean.size, 1 - bounds.ellipse))
    lookalike = below & (_mahalanobis2(x_rest, mean, cov) <= radius2)
    lookalike &= np.abs(_asinh_decades(hladr[rest], hladr_cofactor) - centre) <= bounds.hladr_window * spread
    info["background_lookalikes"] = int(lookalike.sum())
    if not lookalike.any() and below.sum() >= 100:
        mono[dim] = True
        info["dim_kept"] = int(dim.size)
        return GateOutcome(mono, info)
    x_dim = np.column_stack([x_dim_shape, cd14[dim]])
    fit = _spread_sample(dim.size, bounds.background_events, seed)
    pool_size = pool.size * leuk.size / max(spread_events.size, 1)
    posterior = _monocyte_posterior(
        x_dim,
        _gaussian_logpdf(x_dim_shape, mean, cov) - np.log(high - low),
        np.minimum(((cd14[dim] - low) / bounds.slice_width).astype(np.int64), 1000),
        fit,
        np.column_stack([x_rest, cd14[rest]]),
        dim.size / max(fit.size, 1),
        pool_size / max(rest.size, 1),
        bounds.background_components,
        seed,
    )
    mono[dim[posterior >= bounds.posterior]] = True
    info["dim_kept"] = int((posterior >= bounds.posterior).sum())
    return GateOutcome(mono, info)


def _spread_sample(n: int, size: int, seed: int) -> np.ndarray:
    """At most ``size`` indices of ``range(n)``, evenly spread from a seeded offset (O(size))."""
    step = max(1, n // size)
    return np.arange(int(np.random.default_rng(seed).integers(step)), n, step)[:size]


def _mad_sd(x: np.ndarray, med: np.ndarray) -> np.ndarray:
    """Per-column MAD-based SD of ``x`` around the columns' medians ``med`` (at least 1e-3)."""
    return stats.median_abs_deviation(x, axis=0, scale="normal", center=lambda values, axis: med) + 1e-3


def _increasing(y: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit of ``y`` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, length]
    for v, wt in zip(y, weight):
        blocks.append([float(v), float(wt), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.concatenate([np.full(int(n), m) for m, _, n in blocks])


def _monocyte_posterior(
    x_dim: np.ndarray,
    log_mono: np.ndarray,
    slices: np.ndarray,
    fit: np.ndarray,
    x_rest: np.ndarray,
    weight_dim: float,
    weight_rest: float,
    components: int,
    seed: int,
    iterations: int = 20,
) -> np.ndarray:
    """P(monocyte) of each CD14-dim candidate, by EM over a two-class mixture.

    The monocytes' density is given (``log_mono``); the other leukocytes are a mixture of
    ``components`` full Gaussians fitted jointly (candidates ``x_dim[fit]`` and events outside the
    monocytes' range ``x_rest``, each weighted by its subsampling), so the background never has to
    explain the monocytes; the monocytes' share of the candidates is estimated per CD14 slice.
    """
    from sklearn.cluster import kmeans_plusplus

    x = np.vstack([x_dim[fit], x_rest]).astype(np.float64)
    w = np.concatenate([np.full(fit.size, weight_dim), np.full(len(x_rest), weight_rest)])
    n_fit = fit.size
    slice_fit = slices[fit]
    n_slices = int(slices.max()) + 1
    per_slice = np.bincount(slice_fit, minlength=n_slices) * weight_dim + 1e-9
    means = kmeans_plusplus(x_rest if len(x_rest) >= components else x, components, random_state=seed)[0]
    covs = np.repeat(np.cov(x, rowvar=False, aweights=w)[None], components, axis=0)
    weights = np.full(components, 1.0 / components)
    share = np.full(n_slices, 0.5)
    ridge = 1e-4 * np.eye(x.shape[1])

    def background(points: np.ndarray) -> np.ndarray:  # n x k log(weight * density)
        parts = [np.log(wk) + _gaussian_logpdf(points, m, c) for wk, m, c in zip(weights, means, covs)]
        return np.stack(parts, axis=1)

    def p_mono(log_b: np.ndarray, log_m: np.ndarray, sl: np.ndarray) -> np.ndarray:
        top = log_b.max(axis=1)
        log_other = top + np.log(np.exp(log_b - top[:, None]).sum(axis=1))
        log_odds = log_other + np.log1p(-share[sl]) - log_m - np.log(share[sl])
        return 1 / (1 + np.exp(np.clip(log_odds, -50, 50)))

    for _ in range(iterations):
        before = share
        log_b = background(x)
        r_mono = np.zeros(x.shape[0])
        r_mono[:n_fit] = p_mono(log_b[:n_fit], log_mono[fit], slice_fit)
        resp = np.exp(log_b - log_b.max(axis=1, keepdims=True))
        resp *= ((1 - r_mono) * w / resp.sum(axis=1))[:, None]
        nk = resp.sum(axis=0) + 1e-9
        weights = nk / nk.sum()
        means = resp.T @ x / nk[:, None]
        for j in range(components):
            d = x - means[j]
            covs[j] = (resp[:, j, None] * d).T @ d / nk[j] + ridge
        share = np.bincount(slice_fit, r_mono[:n_fit] * w[:n_fit], n_slices) / per_slice
        share = _increasing(share, per_slice)  # the monocytes' share does not grow as CD14 falls
        share = np.clip(share, 1e-4, 1 - 1e-4)
        if np.abs(share - before).max() < 1e-3:
            break
    return p_mono(background(x_dim.astype(np.float64)), log_mono, slices)


def _problem(tube: Tube, outcome: GateOutcome, leuk: np.ndarray) -> str | None:
    """Why an automatic monocyte gate's answer cannot be used (None when it can).

    Its own failure; fewer than the policy's ``min_monocytes_gate``; a fraction of the leukocytes
    outside its ``monocyte_percent_range``; a granulocyte-like SSC, unless the tube has no
    granulocytes (then ``info["no_granulocytes"]`` is set).
    """
    mono, info, policy = outcome.mask, outcome.info, tube.policy
    if info.get("failed"):
        return str(info["failed"])
    n = int(np.count_nonzero(mono))
    if n < policy.min_monocytes_gate:
        return f"only {n} monocytes (at least {policy.min_monocytes_gate} are needed to measure their HLA-DR)"
    percent = 100.0 * n / max(int(np.count_nonzero(leuk)), 1)
    low, high = policy.monocyte_percent_range
    if not low <= percent <= high:
        return f"implausible monocyte fraction {percent:.2f} %"
    if tube.panel["SSC-A"] and _granulocyte_like(tube.logs, leuk, np.flatnonzero(mono)):
        if not no_granulocytes(tube.logs["SSC-A"], leuk, mono):
            return "the CD14+ events have granulocyte-like SSC"
        info["no_granulocytes"] = True  # e.g. PBMC: the monocytes are the top-SSC population
    return None


def automatic_monocyte_gate(tube: Tube, leuk: np.ndarray) -> GateOutcome:
    """The joint gate, checked against the density gate (``info["method"]`` says which answered).

    The joint gate answers when it passes :func:`_problem`; the density gate is then its
    alternative (``alternatives["density"]``: the analysis flags a disagreement larger than the
    result's uncertainty). When the joint gate fails, the density gate answers, then the
    Gaussian-mixture clustering (flag ``fallback_gating``); when none has a usable answer the tube
    is refused (:class:`GatingError` with the count and the reasons).
    """
    joint = monocyte_gate_joint(tube, leuk)
    density = monocyte_gate_density(tube, leuk)
    joint_problem = _problem(tube, joint, leuk)
    density_problem = _problem(tube, density, leuk)
    if not joint_problem:
        method, answer, info = "joint", joint, joint.info
        alternatives = {} if density_problem else {"density": density.mask}
    elif not density_problem:
        method, answer, alternatives = "density", density, {}
        info = {**density.info, "fallback_reason": joint_problem}
    else:
        reasons = f"joint gate: {joint_problem}; density gate: {density_problem}"
        try:
            answer = monocyte_gate_gmm(tube, leuk)
            clustered_problem = _problem(tube, answer, leuk)
        except GatingError as exc:
            clustered_problem = exc.message
        if clustered_problem:
            message = f"no measurable monocyte population ({reasons}; clustering: {clustered_problem})"
            if tube.panel.sources.get("CD14") == "naming":
                raise PanelError(
                    f"{message}; CD14 was taken as {tube.panel['CD14']} from instrument naming only "
                    f"(no $PnS markers): give the CD14 channel with --cd14",
                    tube.sample.path,
                )
            raise GatingError(message, tube.sample.path)
        method, info, alternatives = "gmm-fallback", {"fallback_reason": reasons}, {}
    flags = [] if method == "joint" else ["fallback_gating"]
    if info.get("no_granulocytes"):
        flags.append("no_granulocytes")
    recorded = {"method": method, **{k: v for k, v in info.items() if k != "failed"}}
    return GateOutcome(answer.mask, recorded, tuple(flags), alternatives)


# --- the sequence ----------------------------------------------------------------------------------
#: The default gating, in order (see the module docstring and ``docs/gating.md``).
DEFAULT_SEQUENCE = GatingSequence(
    (
        GateStep("finite", nonfinite_gate),
        GateStep("margins", margin_gate),
        GateStep("time", time_gate),
        GateStep("singlets", singlet_gate),
        GateStep("debris", debris_gate),
        GateStep("leukocytes", leukocyte_gate, label="CD45+ leukocytes"),
        GateStep("monocytes", automatic_monocyte_gate, label="CD14+ monocytes"),
    )
)
#: GatingResult.thresholds: the gates' info entries that are thresholds, by their recorded name.
THRESHOLDS = {
    "fsc_min": "fsc_min",
    "dna_min": "dna_min",
    "cd45_min": "cd45_min",
    "cd14_valley": "cd14_min",
    "cd14_low": "cd14_dim_min",
    "ssc_max": "ssc_max",
}


@dataclass(frozen=True)
class UserGateFile:
    """The monocyte gate of a GatingML 2.0 file or FlowJo workspace, as a :data:`Gate`
    (see :func:`user_gate`)."""

    path: Path
    gate_name: str | None = None

    def __call__(self, tube: Tube, keep: np.ndarray) -> GateOutcome:
        outcome = user_gate(tube.sample, self.path, self.gate_name)
        return GateOutcome(outcome.mask, {"method": f"user:{self.path.name}", **outcome.info})


def user_monocyte_step(gates: str | os.PathLike, gate_name: str | None = None) -> GateStep:
    """The monocytes step of a user gate file: its gate applied to the singlets."""
    return GateStep(
        "monocytes", UserGateFile(Path(gates), gate_name), parent="singlets", label="monocytes (user gate)"
    )


def gate_monocytes(
    sample: Sample,
    panel: Panel,
    *,
    gates: str | os.PathLike | None = None,
    seed: int = 0,
    gate_name: str | None = None,
    bounds: JointGate = JointGate(),
    sequence: GatingSequence = DEFAULT_SEQUENCE,
    policy: QCPolicy = DEFAULT_POLICY,
) -> GatingResult:
    """Run a gating sequence (default: :data:`DEFAULT_SEQUENCE`) on a patient tube.

    ``gates``/``gate_name``: a user gate file whose monocyte gate replaces the sequence's monocytes
    step (:func:`user_monocyte_step`); ``bounds``: the automatic joint gate's boundaries
    (:class:`JointGate`); ``seed``: its subsampling (results are deterministic); ``policy``: the QC
    thresholds the gates apply. Each step gates its parent's population; the monocytes are the last
    step's. ``GatingResult.sequence`` records each step's gate, and which were replaced or added.
    """
    if gates is not None:
        sequence = sequence.replace("monocytes", user_monocyte_step(gates, gate_name))
    missing = {"time", "singlets", "leukocytes"} - set(sequence.names)
    if missing:
        raise ValueError(f"a gating sequence needs the steps {sorted(missing)} (replace one, do not drop it)")
    tube = Tube(sample, panel, policy=policy, seed=seed, bounds=bounds)
    # the gates' numerics assume finite values: a step (after the 'finite' one) given non-finite
    # events is refused by name, whatever the sequence (a custom one may drop or replace 'finite')
    finite = tube.finite if tube.has_nonfinite else None
    gate_log: list[dict[str, Any]] = [{"gate": "compensation", "notes": tube.notes}]
    flags: list[str] = []
    thresholds: dict[str, float] = {}
    alternatives: dict[str, np.ndarray] = {}
    populations: dict[str, np.ndarray] = {}  # those a later step or the result reads
    needed = {"time", "singlets", "leukocytes"} | {step.parent for step in sequence if step.parent}
    method = None
    parent = np.ones(sample.n_events, dtype=bool)
    for step in sequence:
        if step.parent is not None:
            parent = populations[step.parent]
        if finite is not None and step.name != "finite":
            bad = int(np.count_nonzero(parent & ~finite))
            if bad:
                raise GatingError(
                    f"{bad:,} events holding NaN or infinite values reach the {step.name!r} gate "
                    "(the gating sequence's 'finite' step drops them)",
                    sample.path,
                )
        outcome = step.gate(tube, parent)
        mask = outcome.mask & parent
        gate_log.append(
            {
                "gate": step.label or step.name,
                "in": int(np.count_nonzero(parent)),
                "out": int(np.count_nonzero(mask)),
                **outcome.info,
            }
        )
        flags += outcome.flags
        alternatives.update(outcome.alternatives)
        thresholds.update((name, outcome.info[k]) for k, name in THRESHOLDS.items() if outcome.info.get(k))
        method = outcome.info.get("method", method)
        parent = mask
        if step.name in needed:
            populations[step.name] = mask
    last = sequence.steps[-1]
    return GatingResult(
        monocytes=parent,
        leukocytes=populations["leukocytes"],
        singlets=populations["singlets"],
        clean=populations["time"],
        compensated=tube.compensated,
        method=method or f"user:{last.source}",
        gates=gate_log,
        flags=flags,
        thresholds=thresholds,
        alternatives=alternatives,
        sequence=sequence.describe(),
    )


def scale_values(sample: Sample) -> np.ndarray:
    """The events as gating software reads the file (FCS 3.1 scale values, as FlowKit through flowio,
    and FlowJo, read it): each linear channel divided by its ``$PnG`` gain, the time channel in
    ``$TIMESTEP`` units and without gain (BD writes Time ``$PnG`` 0.01: no amplifier, flowio ignores
    it); log-amplified channels are already decoded by :func:`~hladr.fcs.read_fcs` and take no gain.
    GatingML coordinates (a user's gates, :mod:`hladr.gatingml`'s export) live on this scale."""
    events = np.array(sample.events, dtype=np.float64)
    gains, time = sample.gains, time_channel(sample.channels)
    for i, channel in enumerate(sample.channels):
        gain = gains.get(channel)
        if channel == time:
            events[:, i] *= sample.timestep
        elif gain and gain > 0 and gain != 1.0 and not sample.is_log(channel):
            events[:, i] /= gain
    return events


def user_gate(sample: Sample, gates: str | os.PathLike, gate_name: str | None = None) -> GateOutcome:
    """Membership of the monocyte gate in a GatingML 2.0 file or FlowJo workspace (via flowkit):
    the mask, with the file and the gate's path as info.

    The gate is ``gate_name`` (its name, or its path as ``parent/.../name``); without it, the
    gate whose name contains ``mono`` (case-insensitive), the outermost when several do. A FlowJo
    workspace must name the tube (its file name, as FlowJo records it).
    """
    import flowkit as fk

    path = Path(gates)
    if not path.is_file():
        raise GatingError(f"gates file {path} not found", sample.path)
    events = scale_values(sample)
    fk_sample = fk.Sample(events, sample_id=sample.path.name, channel_labels=list(sample.channels))
    if sample.spillover is not None:  # for GatingML dimensions compensated with the file's own matrix ('FCS')
        fk_sample.metadata["spill"] = sample.spillover.to_keyword()
    is_workspace = path.suffix.lower() == ".wsp" or "flowjo" in path.read_text(errors="ignore")[:4000].lower()
    try:
        if is_workspace:
            ids = workspace_samples(path)
            sample_id = workspace_sample_id(ids, sample.path)
            if sample_id is None:
                listed = ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")
                raise GatingError(
                    f"the workspace {path.name} does not mention this tube (its samples: {listed or 'none'})",
                    sample.path,
                )
            fk_sample = fk.Sample(events, sample_id=sample_id, channel_labels=list(sample.channels))
            ws = fk.Workspace(str(path), fcs_samples=[fk_sample])
            ws.analyze_samples(sample_id=sample_id)
            results = ws.get_gating_results(sample_id)
            gate_ids = ws.get_gate_ids(sample_id)
        else:
            strategy = fk.parse_gating_xml(str(path))
            results = strategy.gate_sample(fk_sample)
            gate_ids = strategy.get_gate_ids()
    except GatingError:
        raise
    except Exception as exc:  # noqa: BLE001 - flowkit raises many kinds; report one clear error
        raise GatingError(f"cannot apply gates from {path.name}: {exc}", sample.path) from exc
    name, gate_path = choose_gate(gate_ids, gate_name, path.name, sample.path)
    mask = np.asarray(results.get_gate_membership(name, gate_path=gate_path), dtype=bool)
    return GateOutcome(mask, {"file": path.name, "gate_path": _full_gate_name(name, gate_path)})


def workspace_samples(path: str | os.PathLike) -> list[str]:
    """Names of the samples a FlowJo workspace gates (its ``SampleNode`` names)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise GatingError(f"cannot read the workspace {Path(path).name}: {exc}") from exc
    return [node.get("name", "") for node in root.iter() if node.tag.rsplit("}", 1)[-1] == "SampleNode"]


def workspace_sample_id(sample_ids: list[str], tube: str | os.PathLike) -> str | None:
    """The workspace sample that is this tube: same file name, else same name without extension."""
    name = Path(tube).name
    for candidate in (name, Path(name).stem):
        for sid in sample_ids:
            if sid == candidate or Path(sid).stem == candidate:
                return sid
    return None


def choose_gate(
    gate_ids: list[tuple[str, tuple]],
    gate_name: str | None,
    source: str,
    tube: str | os.PathLike | None = None,
) -> tuple[str, tuple]:
    """The (name, parent path) of the monocyte gate among flowkit's gate ids (see :func:`user_gate`)."""
    full = _full_gate_name
    if gate_name:
        wanted = [(n, p) for n, p in gate_ids if n == gate_name or full(n, p) == gate_name.strip("/")]
    else:
        wanted = sorted(((n, p) for n, p in gate_ids if "mono" in n.lower()), key=lambda g: len(g[1]))
    names = ", ".join(full(n, p) for n, p in gate_ids) or "none"
    if not wanted:
        what = (
            f"no gate named {gate_name!r} in {source}"
            if gate_name
            else (f"no monocyte gate in {source} (none named like 'mono': choose one with --gate-name)")
        )
        raise GatingError(f"{what}; gates: {names}", tube)
    if gate_name and len(wanted) > 1:
        raise GatingError(
            f"{len(wanted)} gates named {gate_name!r} in {source}: give the full path "
            f"({', '.join(full(n, p) for n, p in wanted)})",
            tube,
        )
    return wanted[0]


def _full_gate_name(name: str, parents: tuple) -> str:
    """``parent/.../name`` of a flowkit gate id (without its root)."""
    return "/".join([*(p for p in parents if p != "root"), name])
