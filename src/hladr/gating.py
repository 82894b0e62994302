"""Gating a patient tube down to CD14+ monocytes (keeping HLA-DR-low monocytes).

Sequence (each gate records its events in and out): margins -> time (clogs) -> singlets
(FSC-A vs FSC-H) -> debris (low FSC-A) -> CD45+ leukocytes (3-colour panels) -> CD14+ monocytes
with low-to-intermediate SSC. HLA-DR is never used to find monocytes.

The default gates are automatic and density based (valleys of smoothed histograms, robust
spreads). When they fail their own QC (no CD14 valley, too few monocytes, an implausible
fraction) a Gaussian-mixture fallback over CD14/SSC/CD45 (scikit-learn) takes over. User gates
from a GatingML 2.0 file or a FlowJo workspace replace the automatic monocyte gate. See
``docs/gating.md``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import kernels
from .errors import GatingError, PanelError
from .fcs import Sample
from .panel import Panel

MIN_MONOCYTES_DENSITY = 100
MONOCYTE_PERCENT_RANGE = (0.1, 50.0)


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


# --- helpers ----------------------------------------------------------------------------------
def spillover_matrix(sample: Sample) -> tuple[list[str], np.ndarray] | None:
    """(channels, matrix) from the Sample, or parsed from ``$SPILLOVER``/``SPILL``/``$SPILL``."""
    if sample.spillover is not None:
        return list(sample.spillover.channels), np.asarray(sample.spillover.matrix, dtype=float)
    from flowutils.compensate import get_spill

    for key in ("$SPILLOVER", "SPILL", "$SPILL"):
        text = sample.keywords.get(key)
        if text:
            try:
                matrix, names = get_spill(text)
            except (ValueError, IndexError):
                continue
            return list(names), np.asarray(matrix, dtype=float)
    return None


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


def _log(x: np.ndarray) -> np.ndarray:
    """log10 of ``max(x, 1)`` for gating, in float32 (plenty for gates; half the memory traffic)."""
    return kernels.log10_at_least_1(x)


def _valley(
    values: np.ndarray, lo: float, hi: float, bins: int = 200, sigma: float = 3.0
) -> tuple[float, float]:
    """Deepest point of the smoothed histogram of ``values`` between ``lo`` and ``hi``.

    Returns (position, depth) where depth = valley density / the lower of the two
    highest densities on either side (0 = empty valley, 1 = no valley).
    """
    if not hi > lo:
        return float("nan"), 1.0
    counts = kernels.histogram(values, lo, hi, bins)
    if counts.sum() < 50:
        return float("nan"), 1.0
    smooth = kernels.gaussian_smooth(counts, sigma)
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
    """Every k-th value, at most ``limit`` of them: enough for a median, deterministic."""
    return x[:: max(1, x.size // limit)]


def _robust(x: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based SD (of at most 200,000 values)."""
    x = _thin(x)
    med = float(np.median(x))
    return med, float(1.4826 * np.median(np.abs(x - med))) or 1e-3


def _record(
    gates: list[dict[str, Any]], name: str, before: np.ndarray, after: np.ndarray, **info: Any
) -> None:
    gates.append({"gate": name, "in": int(before.sum()), "out": int(after.sum()), **info})


# --- the gates ----------------------------------------------------------------------------------
def margin_gate(sample: Sample, panel: Panel) -> np.ndarray:
    """Finite events whose scatter (where the tube has scatter) is inside (0, range)."""
    ev = sample.events
    if ev.dtype.kind == "f":
        keep = kernels.finite_rows(np.ascontiguousarray(ev))
    else:
        keep = np.ones(ev.shape[0], dtype=bool)
    for role in ("FSC-A", "SSC-A"):
        if not panel[role]:
            continue
        idx = sample.index(panel[role])
        top = sample.ranges.get(panel[role]) or np.inf
        keep &= (ev[:, idx] > 0) & (ev[:, idx] < 0.999 * top)
    return keep


def time_gate(sample: Sample, panel: Panel, keep: np.ndarray, bins: int = 100) -> tuple[np.ndarray, dict]:
    """Drop time windows with a flow-rate drop or an unstable signal (a clog).

    The signal is FSC-A, or the DNA channel in mass cytometry; without either, only the rate.
    """
    if panel.time is None or keep.sum() < 2000:
        return keep, {"note": "no time channel" if panel.time is None else "too few events"}
    t = sample.events[:, sample.index(panel.time)]
    n_bins = int(min(bins, max(10, keep.sum() // 400)))
    kept_t = t[keep]
    signal_channel = panel["FSC-A"] or panel["DNA"]
    signal = sample.events[:, sample.index(signal_channel)] if signal_channel else np.ones_like(t)
    which, rate, sums = kernels.time_bins(
        t, signal, keep, float(kept_t.min()), float(kept_t.max()) + 1e-9, n_bins
    )
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
    return keep & ~bad[which], {"bins_removed": int(bad.sum()), "bins": n_bins}


def singlet_gate(sample: Sample, panel: Panel, keep: np.ndarray) -> np.ndarray:
    """Singlets: FSC-H/FSC-A near the population's ratio (doublets have a low ratio)."""
    if not panel["FSC-H"]:
        return keep
    a = sample.events[:, sample.index(panel["FSC-A"])]
    h = sample.events[:, sample.index(panel["FSC-H"])]
    ratio = np.divide(h, a, out=np.zeros(a.shape, dtype=np.result_type(h, a, np.float32)), where=a > 0)
    med, sd = _robust(ratio[keep])
    return keep & (ratio > med - 4 * sd) & (ratio < med + 6 * sd)


def debris_gate(sample: Sample, panel: Panel, keep: np.ndarray) -> tuple[np.ndarray, float]:
    """Cells: FSC-A above the valley below the lymphocytes (or 35 % of the median FSC-A).

    In mass cytometry the DNA channel plays FSC-A's part (nucleated cells vs debris); a tube with
    neither keeps every event (threshold NaN).
    """
    size_channel = panel["FSC-A"] or panel["DNA"]
    if not size_channel:
        return keep, float("nan")
    fsc = _log(sample.events[:, sample.index(size_channel)])
    kept = fsc[keep]
    med = float(np.median(_thin(kept)))
    pos, depth = _valley(kept, med - 1.5, med - 0.15)
    cut = pos if depth < 0.6 else med + np.log10(0.35)
    cut = max(cut, med + np.log10(0.2))
    return keep & (fsc > cut), float(10**cut)


def leukocyte_gate(
    comp: Mapping[str, np.ndarray], sample: Sample, panel: Panel, keep: np.ndarray
) -> tuple[np.ndarray, float]:
    """CD45+ events: above the valley between CD45-negative debris/RBC and leukocytes."""
    if not panel["CD45"]:
        return keep, float("nan")
    cd45 = _log(comp[panel["CD45"]])
    kept = cd45[keep]
    lo, med = np.percentile(_thin(kept), [0.5, 50])
    pos, depth = _valley(kept, lo, med)
    cut = pos if depth < 0.5 else med - 1.0
    return keep & (cd45 > cut), float(10**cut)


def monocyte_gate_density(
    comp: Mapping[str, np.ndarray], sample: Sample, panel: Panel, leuk: np.ndarray
) -> tuple[np.ndarray, dict]:
    """CD14+ (above the CD14 valley) with low-to-intermediate SSC and bright CD45.

    Without SSC (mass cytometry) the SSC criteria are left out: CD14+ and CD45-bright.
    """
    cd14 = _log(comp[panel["CD14"]])
    cd14_leuk = cd14[leuk]
    bulk, top = (float(v) for v in np.percentile(_thin(cd14_leuk), [50, 99.99]))
    pos, depth = _valley(cd14_leuk, bulk + 0.2, top)
    info: dict[str, Any] = {
        "cd14_valley": float(10**pos) if np.isfinite(pos) else None,
        "valley_depth": depth,
    }
    if not np.isfinite(pos) or depth > 0.5:
        info["failed"] = "no CD14 valley"
        return np.zeros_like(leuk), info
    cd14_pos = leuk & (cd14 > pos)
    if cd14_pos.sum() < 20:
        info["failed"] = "almost no CD14+ events"
        return cd14_pos, info
    mono = cd14_pos
    if panel["SSC-A"]:  # low-to-intermediate SSC: drop CD14+ events in the granulocytes' SSC range
        ssc = _log(sample.events[:, sample.index(panel["SSC-A"])])
        m_ssc, s_ssc = _robust(ssc[cd14_pos])
        mono = cd14_pos & (ssc < m_ssc + 3 * s_ssc) & (ssc > m_ssc - 4 * s_ssc)
        info["ssc_max"] = float(10 ** (m_ssc + 3 * s_ssc))
    if panel["CD45"]:
        cd45 = _log(comp[panel["CD45"]])
        m45, s45 = _robust(cd45[mono])
        mono &= cd45 > m45 - 4 * s45
    if panel["SSC-A"] and mono.sum() and np.median(ssc[mono]) > granulocyte_ssc_limit(ssc, leuk):
        if no_granulocytes(ssc, leuk, mono):
            info["no_granulocytes"] = True  # e.g. PBMC: the monocytes are the top-SSC population
        else:
            info["failed"] = "the CD14+ events have granulocyte-like SSC"
    return mono, info


def no_granulocytes(log_ssc: np.ndarray, leuk: np.ndarray, gated: np.ndarray) -> bool:
    """True when no granulocyte population shares the gated events' SSC.

    Granulocytes are 40-70 % of the leukocytes of whole blood: when fewer than 10 % of the other
    leukocytes reach half the gated events' median SSC and the gated events are under 20 % of the
    leukocytes (so they are not the granulocytes themselves), the tube has no granulocytes.
    """
    n_leuk = max(int(leuk.sum()), 1)
    floor = float(np.median(log_ssc[gated])) - np.log10(2)
    others_high = int((leuk & ~gated & (log_ssc >= floor)).sum())
    return others_high < 0.1 * n_leuk and gated.sum() < 0.2 * n_leuk


def granulocyte_ssc_limit(log_ssc: np.ndarray, leuk: np.ndarray) -> float:
    """log10 SSC above which a population is granulocyte-like (80 % of the 90th percentile)."""
    return float(np.percentile(_thin(log_ssc[leuk]), 90) + np.log10(0.8))


def monocyte_gate_gmm(
    comp: Mapping[str, np.ndarray], sample: Sample, panel: Panel, leuk: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Gaussian-mixture fallback over log CD14, log SSC (and log CD45): the CD14-bright components
    (without SSC in mass cytometry)."""
    from sklearn.mixture import GaussianMixture

    cols = [_log(comp[panel["CD14"]])]
    if panel["SSC-A"]:
        cols.append(_log(sample.events[:, sample.index(panel["SSC-A"])]))
    if panel["CD45"]:
        cols.append(_log(comp[panel["CD45"]]))
    x = np.column_stack(cols)
    idx = np.flatnonzero(leuk)
    if idx.size < 200:
        raise GatingError(f"only {idx.size} leukocytes: cannot find monocytes", sample.path)
    rng = np.random.default_rng(seed)
    fit_idx = rng.choice(idx, size=min(idx.size, 30_000), replace=False)
    gmm = GaussianMixture(n_components=6, covariance_type="full", random_state=seed, n_init=2).fit(x[fit_idx])
    labels = gmm.predict(x[idx])
    bulk = float(np.median(x[idx, 0]))
    ssc_limit = granulocyte_ssc_limit(x[:, 1], leuk) if panel["SSC-A"] else np.inf
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
    return mono


def gate_monocytes(
    sample: Sample, panel: Panel, *, gates: str | os.PathLike | None = None, seed: int = 0,
    gate_name: str | None = None,
) -> GatingResult:
    """Run the whole gating sequence on a patient tube (``gates``/``gate_name``: see :func:`user_gate`)."""
    comp, notes = compensated_columns(sample, [panel["CD14"], panel["CD45"], panel["HLA-DR"]])
    flags: list[str] = []
    gate_log: list[dict[str, Any]] = []
    all_events = np.ones(sample.n_events, dtype=bool)
    margin = margin_gate(sample, panel)
    _record(gate_log, "margins", all_events, margin)
    timed, time_info = time_gate(sample, panel, margin)
    _record(gate_log, "time", margin, timed, **time_info)
    if margin.sum() and (margin.sum() - timed.sum()) / margin.sum() > 0.1:
        flags.append(f"time_gate_removed:{(margin.sum() - timed.sum()) / margin.sum():.0%}")
    singlets = singlet_gate(sample, panel, timed)
    _record(gate_log, "singlets", timed, singlets)
    cells, debris_cut = debris_gate(sample, panel, singlets)
    size_key = "fsc_min" if panel["FSC-A"] or not panel["DNA"] else "dna_min"
    _record(gate_log, "debris", singlets, cells, **{size_key: debris_cut})
    if not panel["SSC-A"]:
        flags.append("no_scatter")  # mass cytometry: gated on DNA, CD45 and CD14 only
    leuk, cd45_cut = leukocyte_gate(comp, sample, panel, cells)
    _record(
        gate_log,
        "CD45+ leukocytes" if panel["CD45"] else "leukocytes (no CD45)",
        cells,
        leuk,
        cd45_min=cd45_cut,
    )
    thresholds = {size_key: debris_cut, "cd45_min": cd45_cut}

    if gates is not None:
        mono = user_gate(sample, gates, gate_name) & singlets
        method = f"user:{Path(gates).name}"
        _record(gate_log, "monocytes (user gate)", singlets, mono)
    else:
        mono, info = monocyte_gate_density(comp, sample, panel, leuk)
        percent = 100.0 * mono.sum() / max(leuk.sum(), 1)
        problem = info.get("failed")
        if not problem and mono.sum() < MIN_MONOCYTES_DENSITY:
            problem = f"only {int(mono.sum())} monocytes"
        if not problem and not MONOCYTE_PERCENT_RANGE[0] <= percent <= MONOCYTE_PERCENT_RANGE[1]:
            problem = f"implausible monocyte fraction {percent:.2f} %"
        method = "density"
        if problem:
            try:
                mono = monocyte_gate_gmm(comp, sample, panel, leuk, seed)
            except GatingError as exc:
                if panel.sources.get("CD14") == "naming":
                    raise PanelError(
                        f"{exc.message}; CD14 was taken as {panel['CD14']} from instrument naming only "
                        f"(no $PnS markers): give the CD14 channel with --cd14",
                        sample.path,
                    ) from None
                raise
            method = "gmm-fallback"
            flags.append("fallback_gating")
            info["fallback_reason"] = problem
        _record(
            gate_log,
            "CD14+ monocytes",
            leuk,
            mono,
            method=method,
            **{k: v for k, v in info.items() if k != "failed"},
        )
        if info.get("no_granulocytes") and method == "density":
            flags.append("no_granulocytes")
        if info.get("cd14_valley"):
            thresholds["cd14_min"] = info["cd14_valley"]
        if info.get("ssc_max"):
            thresholds["ssc_max"] = info["ssc_max"]
    gr = GatingResult(mono, leuk, singlets, timed, comp, method, gate_log, flags, thresholds)
    gr.gates.insert(0, {"gate": "compensation", "notes": notes})
    return gr


def user_gate(sample: Sample, gates: str | os.PathLike, gate_name: str | None = None) -> np.ndarray:
    """Membership of the monocyte gate in a GatingML 2.0 file or FlowJo workspace (via flowkit).

    The gate is ``gate_name`` (its name, or its path as ``parent/.../name``); without it, the
    gate whose name contains ``mono`` (case-insensitive), the outermost when several do. A FlowJo
    workspace must name the tube (its file name, as FlowJo records it).
    """
    import flowkit as fk

    path = Path(gates)
    if not path.is_file():
        raise GatingError(f"gates file {path} not found", sample.path)
    fk_sample = fk.Sample(
        np.asarray(sample.events, dtype=np.float64),
        sample_id=sample.path.name,
        channel_labels=list(sample.channels),
    )
    if sample.spillover is not None:  # for GatingML dimensions compensated with the file's own matrix ('FCS')
        fk_sample.metadata["spill"] = sample.spillover.to_keyword()
    is_workspace = path.suffix.lower() == ".wsp" or "flowjo" in path.read_text(errors="ignore")[:4000].lower()
    try:
        if is_workspace:
            ids = workspace_samples(path)
            sample_id = workspace_sample_id(ids, sample.path)
            if sample_id is None:
                listed = ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")
                raise GatingError(f"the workspace {path.name} does not mention this tube "
                                  f"(its samples: {listed or 'none'})", sample.path)
            fk_sample = fk.Sample(np.asarray(sample.events, dtype=np.float64), sample_id=sample_id,
                                  channel_labels=list(sample.channels))
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
    return np.asarray(results.get_gate_membership(name, gate_path=gate_path), dtype=bool)


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


def choose_gate(gate_ids: list[tuple[str, tuple]], gate_name: str | None, source: str,
                tube: str | os.PathLike | None = None) -> tuple[str, tuple]:
    """The (name, parent path) of the monocyte gate among flowkit's gate ids (see :func:`user_gate`)."""
    def full(name: str, parents: tuple) -> str:
        return "/".join([*(p for p in parents if p != "root"), name])

    if gate_name:
        wanted = [(n, p) for n, p in gate_ids if n == gate_name or full(n, p) == gate_name.strip("/")]
    else:
        wanted = sorted(((n, p) for n, p in gate_ids if "mono" in n.lower()), key=lambda g: len(g[1]))
    names = ", ".join(full(n, p) for n, p in gate_ids) or "none"
    if not wanted:
        what = f"no gate named {gate_name!r} in {source}" if gate_name else (
            f"no monocyte gate in {source} (none named like 'mono': choose one with --gate-name)")
        raise GatingError(f"{what}; gates: {names}", tube)
    if gate_name and len(wanted) > 1:
        raise GatingError(f"{len(wanted)} gates named {gate_name!r} in {source}: give the full path "
                          f"({', '.join(full(n, p) for n, p in wanted)})", tube)
    return wanted[0]
