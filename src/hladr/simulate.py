"""Physically modelled bead and blood tubes with known ground truth.

The model, per event: true molecules of each fluorochrome (specific binding plus
autofluorescence) -> photoelectrons (Poisson, a detection efficiency per detector)
-> ``gain x photoelectrons`` -> spillover between detectors (the ``$SPILLOVER``
written to the file) -> electronic noise -> clipping at ``$PnR``. On average the
PE channel is therefore linear in PE molecules: ``E[PE] = gain * efficiency *
molecules``, and a correct log-log bead curve has slope 1.

Ground truth of a blood tube is the median, over the true monocytes, of HLA-DR PE
molecules plus the monocytes' PE autofluorescence equivalent: what a perfect gate
and a perfect calibration would report. Per-event population labels are written
beside each FCS file as ``<stem>.labels.npy`` (codes in :data:`POPULATIONS`).

This module never imports gating or calibration: truth must not come from the
code it judges. See ``docs/simulator.md``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .errors import SimulationError
from .fcs import Spillover, write_fcs

#: BD Quantibrite PE lot 96597: PE molecules per bead, levels 1-4.
QUANTIBRITE_96597 = (638.0, 6930.0, 31008.0, 67601.0)

#: Population codes of the per-event labels.
POPULATIONS = {
    0: "debris",
    1: "neutrophil",
    2: "immature_granulocyte",
    3: "eosinophil",
    4: "t_cell",
    5: "b_cell",
    6: "nk_cell",
    7: "dendritic_cell",
    8: "monocyte_classical",
    9: "monocyte_intermediate",
    10: "monocyte_nonclassical",
    11: "monocyte_platelet_complex",
    12: "doublet_monocyte_neutrophil",
    13: "doublet_other",
    14: "dead_cell",
    20: "bead_blank",
    21: "bead_level",
    22: "bead_doublet",
}
#: Codes counted as monocytes by the ground truth.
MONOCYTE_CODES = (8, 9, 10)

FLUOR_AF = {"FITC": 1.0, "PE": 0.5, "PerCP-Cy5.5": 0.2, "V500": 0.6, "APC": 0.05, "KO": 0.6, "PE-Cy7": 0.1}
# Fraction of a fluorochrome's signal seen by another fluorochrome's detector.
SPILL = {
    ("FITC", "PE"): 0.14,
    ("PE", "FITC"): 0.012,
    ("PE", "PerCP-Cy5.5"): 0.11,
    ("PerCP-Cy5.5", "PE"): 0.008,
    ("V500", "FITC"): 0.05,
    ("V500", "PE"): 0.004,
    ("KO", "FITC"): 0.07,
    ("KO", "PE"): 0.01,
    ("APC", "PerCP-Cy5.5"): 0.03,
    ("PE", "APC"): 0.002,
    ("PE", "PE-Cy7"): 0.02,
    ("PE-Cy7", "PE"): 0.003,
    ("PE-Cy7", "APC"): 0.01,
}


@dataclass(frozen=True)
class Detector:
    """One fluorescence detector: its channel, dye, and photon statistics."""

    channel: str
    fluor: str
    efficiency: float  # photoelectrons per molecule
    gain: float  # channel units per photoelectron
    noise: float  # electronic noise SD, channel units
    voltage: float


@dataclass(frozen=True)
class Instrument:
    """A cytometer preset: naming, file format and detector physics."""

    name: str
    cytometer: str
    serial: str
    fsc_a: str
    fsc_h: str
    ssc_a: str
    time: str
    detectors: tuple[Detector, ...]
    markers: dict[str, str]  # marker -> fluor, the lab's panel on this instrument
    range: float
    version: str = "3.1"
    datatype: str = "F"
    bits: int = 32
    byteorder: str = "<"
    scatter_scale: float = 1.0
    scatter_voltages: tuple[float, float] = (400.0, 450.0)
    with_markers: bool = True
    log_decades: float = 0.0  # > 0: fluorescence through a log amplifier of this many decades ($PnE)
    log_resolution: int = 1024  # channels of a log-amplified parameter ($PnR)

    def detector(self, fluor: str) -> Detector:
        for d in self.detectors:
            if d.fluor == fluor:
                return d
        raise SimulationError(f"instrument {self.name!r} has no {fluor} detector")

    def scaled(self, fluor: str, factor: float) -> Instrument:
        """The same instrument with one detector's gain (and voltage) scaled."""
        dets = tuple(
            replace(d, gain=d.gain * factor, voltage=round(d.voltage * factor ** (1 / 7), 1))
            if d.fluor == fluor
            else d
            for d in self.detectors
        )
        return replace(self, detectors=dets)

    @property
    def channels(self) -> list[str]:
        return [self.fsc_a, self.fsc_h, self.ssc_a, *(d.channel for d in self.detectors), self.time]


def _canto(name: str, cyt: str, version: str, cd14: str = "PerCP-Cy5.5") -> Instrument:
    return Instrument(
        name=name,
        cytometer=cyt,
        serial={"canto": "V96300042", "lyric": "R65911001"}[name],
        fsc_a="FSC-A",
        fsc_h="FSC-H",
        ssc_a="SSC-A",
        time="Time",
        detectors=(
            Detector("FITC-A", "FITC", 0.06, 18.0, 15.0, 478),
            Detector("PE-A", "PE", 0.08, 14.0, 18.0, 470),
            Detector("PerCP-Cy5-5-A", "PerCP-Cy5.5", 0.05, 20.0, 20.0, 583),
            Detector("V500-C-A", "V500", 0.05, 16.0, 12.0, 490),
            Detector("APC-A", "APC", 0.07, 15.0, 15.0, 600),
        ),
        markers={"HLA-DR": "PE", "CD14": cd14, "CD45": "V500"},
        range=262144.0,
        version=version,
    )


INSTRUMENTS: dict[str, Instrument] = {
    "canto": _canto("canto", "FACSCanto II", "3.0"),
    "lyric": _canto("lyric", "FACSLyric", "3.1", cd14="APC"),
    "cytoflex": Instrument(
        name="cytoflex",
        cytometer="CytoFLEX",
        serial="AX31115",
        fsc_a="FSC-A",
        fsc_h="FSC-H",
        ssc_a="SSC-A",
        time="Time",
        detectors=(
            Detector("FITC-A", "FITC", 0.07, 70.0, 60.0, 35),
            Detector("PE-A", "PE", 0.09, 55.0, 80.0, 65),
            Detector("PC5.5-A", "PerCP-Cy5.5", 0.06, 80.0, 70.0, 90),
            Detector("KO525-A", "KO", 0.05, 60.0, 50.0, 70),
        ),
        markers={"HLA-DR": "PE", "CD14": "PerCP-Cy5.5", "CD45": "KO"},
        range=4194304.0,
        version="3.0",
        scatter_scale=8.0,
        scatter_voltages=(100.0, 200.0),
        with_markers=False,
    ),
    "navios": Instrument(
        name="navios",
        cytometer="Navios",
        serial="AW40120",
        fsc_a="FS INT",
        fsc_h="FS PEAK",
        ssc_a="SS INT",
        time="TIME",
        detectors=(
            Detector("FL1 INT", "FITC", 0.06, 6.0, 8.0, 520),
            Detector("FL2 INT", "PE", 0.08, 5.0, 9.0, 480),
            Detector("FL4 INT", "PerCP-Cy5.5", 0.05, 6.5, 9.0, 610),
            Detector("FL9 INT", "KO", 0.05, 5.5, 8.0, 500),
        ),
        markers={"HLA-DR": "PE", "CD14": "PerCP-Cy5.5", "CD45": "KO"},
        range=1048576.0,
        version="3.0",
        datatype="I",
        bits=32,
        byteorder=">",
        scatter_scale=2.0,
        scatter_voltages=(300.0, 350.0),
    ),
}


def log_amplified(instrument: str | Instrument, decades: float = 4.0, resolution: int = 1024) -> Instrument:
    """The instrument with its fluorescence recorded through a log amplifier (FACSCalibur style).

    Each detector's signal ``v`` is written as channel ``floor(resolution * log10(v) / decades)``
    (``$PnE = decades,1``, ``$PnR = resolution``), so values below 1 pile up in channel 0 and the
    dim end is coarse. Gains are scaled so that the linear instrument's full range maps onto the
    ``decades`` (PMT voltages set for a log scale), noise with them.
    """
    inst = get_instrument(instrument)
    factor = 10**decades / inst.range * 2.0
    dets = tuple(replace(d, gain=d.gain * factor, noise=d.noise * factor) for d in inst.detectors)
    name = f"{inst.name}-log{decades:g}"
    return replace(
        inst, name=name, detectors=dets, log_decades=decades, log_resolution=resolution, datatype="I", bits=32
    )


def with_noise(instrument: str | Instrument, factor: float) -> Instrument:
    """The instrument with every detector's electronic noise multiplied by ``factor``."""
    inst = get_instrument(instrument)
    dets = tuple(replace(d, noise=d.noise * factor) for d in inst.detectors)
    return replace(inst, name=f"{inst.name}-noise{factor:g}x", detectors=dets)


def with_detector(instrument: str | Instrument, detector: Detector) -> Instrument:
    """The instrument with one more fluorescence detector, unstained in patient tubes (it records
    autofluorescence and spillover): a wider tube, e.g. a FACSCanto II with PE-Cy7 (10 channels)."""
    inst = get_instrument(instrument)
    return replace(inst, name=f"{inst.name}+{detector.fluor}", detectors=(*inst.detectors, detector))


def get_instrument(instrument: str | Instrument) -> Instrument:
    if isinstance(instrument, Instrument):
        return instrument
    try:
        return INSTRUMENTS[instrument]
    except KeyError:
        raise SimulationError(
            f"unknown instrument {instrument!r}; presets: {', '.join(INSTRUMENTS)}"
        ) from None


# --- the detector model --------------------------------------------------------------
@dataclass
class _Events:
    """True per-event quantities before acquisition."""

    fsc: np.ndarray
    fsc_ratio: np.ndarray  # FSC-H / FSC-A
    ssc: np.ndarray
    molecules: dict[str, np.ndarray]  # fluor -> molecules (specific + autofluorescence)
    labels: np.ndarray
    sag: np.ndarray = field(default=None)  # type: ignore[assignment]
    time: np.ndarray = field(default=None)  # type: ignore[assignment]


def spillover_matrix(instrument: Instrument) -> Spillover:
    """The instrument's spillover between its fluorescence detectors."""
    fluors = [d.fluor for d in instrument.detectors]
    m = np.eye(len(fluors))
    for i, src in enumerate(fluors):
        for j, dst in enumerate(fluors):
            if i != j:
                # coefficients are in signal units of each detector's primary dye
                m[i, j] = SPILL.get((src, dst), 0.0)
    return Spillover(tuple(d.channel for d in instrument.detectors), m)


def _acquire(ev: _Events, instrument: Instrument, rng: np.random.Generator) -> np.ndarray:
    """Turn true quantities into channel values (n x p), in ``instrument.channels`` order."""
    n = ev.labels.size
    sag = ev.sag if ev.sag is not None else np.ones(n)
    signal = np.empty((n, len(instrument.detectors)))
    for k, det in enumerate(instrument.detectors):
        molecules = ev.molecules.get(det.fluor, np.zeros(n)) * sag
        signal[:, k] = det.gain * rng.poisson(det.efficiency * np.maximum(molecules, 0.0))
    fluor = signal @ spillover_matrix(instrument).matrix
    fluor += rng.normal(0.0, [d.noise for d in instrument.detectors], size=fluor.shape)
    if instrument.log_decades > 0:
        res = instrument.log_resolution
        level = res * np.log10(np.maximum(fluor, 1.0)) / instrument.log_decades
        fluor = np.clip(np.floor(level), 0, res - 1)
    s = instrument.scatter_scale
    fsc_a = ev.fsc * s * sag
    fsc_h = fsc_a * ev.fsc_ratio
    ssc_a = ev.ssc * s * sag
    scatter = np.column_stack([fsc_a, fsc_h, ssc_a]) + rng.normal(0.0, 60.0 * s, size=(n, 3))
    out = np.column_stack([scatter, fluor, ev.time])
    top = instrument.range - 1
    out[:, :-1] = np.minimum(out[:, :-1], top)
    if instrument.datatype == "I":
        out = np.clip(np.rint(out), 0, top)
    return out


def _keywords(
    instrument: Instrument, seed: int, kind: str, tube: str, duration: float, acquired_at: datetime | None
) -> dict:
    if acquired_at is None:  # a stand-alone tube: a start time derived from its seed
        minute = (seed * 7 + (0 if kind == "beads" else 5 + hash_int(tube) % 50)) % 600
        acquired_at = datetime(2026, 3, 1 + seed % 28, 8) + timedelta(minutes=minute)
    ended_at = acquired_at + timedelta(seconds=int(duration))
    kw = {
        "$CYT": instrument.cytometer,
        "$CYTSN": instrument.serial,
        "$DATE": acquired_at.strftime("%d-%b-%Y").upper(),
        "$BTIM": acquired_at.strftime("%H:%M:%S"),
        "$ETIM": ended_at.strftime("%H:%M:%S"),
        "$TIMESTEP": "0.01",
        "$SRC": "hladr.simulate",
        "$FIL": f"{tube}.fcs",
        "TUBE NAME": tube,
        "$SMNO": f"{tube}-{seed}",
        "HLADR_SIM_KIND": kind,
        "HLADR_SIM_SEED": str(seed),
    }
    if kind != "beads":
        kw["PATIENT ID"] = f"SIM-{seed:06d}"
    for i in range(1, len(instrument.channels) + 1):
        kw[f"$P{i}R"] = str(int(instrument.range))
        kw[f"$P{i}G"] = "1"
    volts = [*instrument.scatter_voltages[:1], instrument.scatter_voltages[0], instrument.scatter_voltages[1]]
    volts += [d.voltage for d in instrument.detectors]
    for i, v in enumerate(volts, start=1):
        kw[f"$P{i}V"] = f"{v:g}"
    kw[f"$P{len(instrument.channels)}R"] = str(int(max(instrument.range, 10 * duration / 0.01)))
    if instrument.log_decades > 0:
        for det in instrument.detectors:
            i = instrument.channels.index(det.channel) + 1
            kw[f"$P{i}E"] = f"{instrument.log_decades:g},1"
            kw[f"$P{i}R"] = str(instrument.log_resolution)
    return kw


def hash_int(text: str) -> int:
    """A stable small hash (Python's ``hash`` is salted per process)."""
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little") % 1_000_003


def _write(
    path: Path,
    ev: _Events,
    instrument: Instrument,
    seed: int,
    kind: str,
    rng: np.random.Generator,
    markers: dict[str, str] | None,
    with_markers: bool | None,
    acquired_at: datetime | None,
) -> Path:
    data = _acquire(ev, instrument, rng)
    use_markers = instrument.with_markers if with_markers is None else with_markers
    names = []
    fluor_marker = {f: m for m, f in (markers or {}).items()}
    for ch in instrument.channels:
        det = next((d for d in instrument.detectors if d.channel == ch), None)
        names.append(fluor_marker.get(det.fluor, "") if (det and use_markers) else "")
    duration = float(ev.time.max()) * 0.01 if ev.time.size else 0.0
    kw = _keywords(instrument, seed, kind, path.stem, duration, acquired_at)
    write_fcs(
        path,
        data,
        instrument.channels,
        names,
        kw,
        version=instrument.version,
        datatype=instrument.datatype,
        bits=instrument.bits if instrument.datatype == "I" else None,
        byteorder=instrument.byteorder,
        spillover=spillover_matrix(instrument),
    )
    np.save(path.with_suffix(".labels.npy"), ev.labels.astype(np.int8))
    return path


def _lognormal(rng: np.random.Generator, median: float, sigma: float, n: int) -> np.ndarray:
    return median * np.exp(rng.normal(0.0, sigma, n))


def _times(n: int, rng: np.random.Generator, rate: float, clog: tuple[float, float] | None) -> np.ndarray:
    """Acquisition times (in $TIMESTEP units of 0.01 s), with a flow-rate drop during a clog."""
    gaps = rng.exponential(1.0 / rate, n)
    if clog is not None:
        lo, hi = int(clog[0] * n), int(clog[1] * n)
        gaps[lo:hi] /= 0.15  # the flow rate falls to 15 %
    return np.cumsum(gaps) * 100.0


# --- beads ---------------------------------------------------------------------------
def simulate_beads(
    path: str | os.PathLike,
    instrument: str | Instrument = "canto",
    lot_values: tuple[float, ...] | list[float] = QUANTIBRITE_96597,
    *,
    seed: int = 0,
    n_events: int = 15_000,
    level_cvs: list[float] | None = None,
    missing_level: int | None = None,
    blank_molecules: float = 40.0,
    doublet_fraction: float = 0.04,
    debris_fraction: float = 0.02,
    with_markers: bool | None = None,
    acquired_at: datetime | None = None,
) -> dict:
    """Write a PE bead tube: a blank bead plus one population per lot level.

    Parameters
    ----------
    lot_values
        PE molecules per bead of each level (the lot's assigned values).
    level_cvs
        CV of PE molecules within each level (default: drawn in 3-8 %).
    missing_level
        Index of a level left out of the tube.
    blank_molecules
        PE-equivalent autofluorescence of the blank bead.
    acquired_at
        Acquisition start written as ``$DATE``/``$BTIM`` (default: a time derived from the seed).

    Returns
    -------
    dict
        Truth: assigned values, true median molecules per level, the expected
        MFI per level (``gain * efficiency * molecules``), counts, settings.
    """
    inst = get_instrument(instrument)
    rng = np.random.default_rng(seed)
    values = np.asarray(lot_values, dtype=float)
    cvs = np.asarray(level_cvs if level_cvs is not None else rng.uniform(0.03, 0.08, values.size))
    n_debris = int(n_events * debris_fraction)
    n_doublet = int(n_events * doublet_fraction)
    n_single = n_events - n_debris - n_doublet
    weights = rng.uniform(0.7, 1.3, values.size + 1)
    if missing_level is not None:
        weights[missing_level + 1] = 0.0
    level = rng.choice(values.size + 1, size=n_single, p=weights / weights.sum()) - 1  # -1 = blank

    def bead_pe(lv: np.ndarray) -> np.ndarray:
        # a lit bead's assigned value is its whole PE-equivalent signal (autofluorescence included)
        pe = _lognormal(rng, blank_molecules, 0.3, lv.size)
        lit = lv >= 0
        pe[lit] = values[lv[lit]] * np.exp(rng.normal(0, np.log1p(cvs[lv[lit]] ** 2) ** 0.5))
        return pe

    pe_single = bead_pe(level)
    pair = rng.choice(values.size + 1, size=(n_doublet, 2), p=weights / weights.sum()) - 1
    pe_doublet = bead_pe(pair[:, 0]) + bead_pe(pair[:, 1])
    fsc = np.concatenate(
        [
            _lognormal(rng, 60_000, 0.04, n_single),
            _lognormal(rng, 118_000, 0.05, n_doublet),
            _lognormal(rng, 8_000, 0.6, n_debris),
        ]
    )
    ssc = np.concatenate(
        [
            _lognormal(rng, 25_000, 0.06, n_single),
            _lognormal(rng, 50_000, 0.07, n_doublet),
            _lognormal(rng, 5_000, 0.8, n_debris),
        ]
    )
    ratio = np.concatenate(
        [rng.normal(0.9, 0.02, n_single), rng.normal(0.55, 0.04, n_doublet), rng.normal(0.9, 0.05, n_debris)]
    )
    pe = np.concatenate([pe_single, pe_doublet, _lognormal(rng, 20.0, 0.8, n_debris)])
    labels = np.concatenate([np.where(level < 0, 20, 21), np.full(n_doublet, 22), np.zeros(n_debris, int)])
    order = rng.permutation(n_events)
    n = n_events
    molecules = {"PE": pe[order]}
    for det in inst.detectors:
        if det.fluor != "PE":
            molecules[det.fluor] = _lognormal(rng, 30.0 * FLUOR_AF[det.fluor], 0.3, n)
    ev = _Events(fsc[order], ratio[order], ssc[order], molecules, labels[order])
    ev.time = _times(n, rng, 1500.0, None)
    level_of = np.concatenate([level, np.full(n_doublet, -2), np.full(n_debris, -3)])[order]
    out = _write(Path(path), ev, inst, seed, "beads", rng, {"PE beads": "PE"}, with_markers, acquired_at)
    det = inst.detector("PE")
    true_medians = [
        float(np.median(ev.molecules["PE"][level_of == k])) if np.any(level_of == k) else None
        for k in range(values.size)
    ]
    return {
        "file": out.name,
        "kind": "beads",
        "instrument": inst.name,
        "seed": seed,
        "n_events": n,
        "lot_values": values.tolist(),
        "level_cvs": cvs.tolist(),
        "missing_level": missing_level,
        "blank_molecules": blank_molecules,
        "true_level_medians": true_medians,
        "channel_per_molecule": det.gain * det.efficiency,
        "expected_mfi": (det.gain * det.efficiency * values).tolist(),
        "counts": [int(np.sum(level_of == k)) for k in range(-1, values.size)],
        "pe_channel": det.channel,
    }


# --- blood ---------------------------------------------------------------------------
# name: (code, fsc median, fsc sigma, ssc median, ssc sigma, CD45, CD14, HLA-DR, autofluorescence)
_BLOOD = {
    "neutrophil": (1, 95_000, 0.10, 110_000, 0.20, 10_000, 700, 0, 300),
    "immature_granulocyte": (2, 105_000, 0.12, 80_000, 0.25, 7_000, 1_500, 0, 280),
    "eosinophil": (3, 95_000, 0.10, 160_000, 0.12, 14_000, 300, 0, 2_000),
    "t_cell": (4, 50_000, 0.10, 12_000, 0.25, 40_000, 100, 0, 60),
    "b_cell": (5, 52_000, 0.10, 13_000, 0.25, 35_000, 100, 30_000, 60),
    "nk_cell": (6, 55_000, 0.10, 16_000, 0.25, 30_000, 100, 0, 70),
    "dendritic_cell": (7, 70_000, 0.12, 25_000, 0.25, 20_000, 150, 60_000, 120),
    "monocyte_classical": (8, 85_000, 0.10, 40_000, 0.22, 25_000, 30_000, 1, 150),
    "monocyte_intermediate": (9, 88_000, 0.10, 42_000, 0.22, 28_000, 9_000, 1, 150),
    "monocyte_nonclassical": (10, 80_000, 0.10, 35_000, 0.22, 26_000, 2_500, 1, 150),
    "dead_cell": (14, 30_000, 0.30, 40_000, 0.50, 2_000, 300, 0, 400),
}


#: Ranges of the severe-sepsis profile (sources in docs/simulator.md): each tube draws one value
#: per parameter uniformly in its range (:func:`draw_severe_sepsis`).
SEVERE_SEPSIS_RANGES: dict[str, tuple[float, float]] = {
    "monocyte_fraction": (0.003, 0.02),  # monocytes / leukocytes
    "cd14_dim_share": (0.2, 0.6),  # share of monocytes on the CD14-loss continuum
    "cd14_max_loss": (5.0, 10.0),  # deepest loss on that continuum, fold below the subset's CD14
    "activated_neutrophils": (0.3, 0.7),  # share of neutrophils activated
    "activated_ssc": (45_000.0, 80_000.0),  # their median SSC (monocytes ~40,000, neutrophils ~110,000)
    "activated_cd14": (1_000.0, 4_000.0),  # their median CD14 (monocytes ~30,000; 5-10x loss: 3,000-6,000)
    "immature_granulocytes": (0.05, 0.20),  # fraction of leukocytes
    "ig_ssc": (50_000.0, 80_000.0),
    "ig_cd14": (1_000.0, 3_000.0),
    "lymphocytes": (0.03, 0.10),  # T + B + NK cells, fraction of leukocytes (lymphopenia)
    "doublet_fraction": (0.05, 0.10),  # of all events
    "monocyte_doublet_share": (0.02, 0.10),  # share of doublets that are monocyte + neutrophil
    "unresolved_doublets": (0.1, 0.3),  # share of doublets whose FSC-H/FSC-A is near a singlet's
    "platelet_complexes": (0.05, 0.25),  # share of monocytes carrying platelets
    "clog_probability": (0.5, 0.5),
    "two_colour_probability": (0.3, 0.3),
}


@dataclass(frozen=True)
class SevereSepsis:
    """One severe-sepsis tube's biology and panel, drawn by :func:`draw_severe_sepsis`."""

    monocyte_fraction: float
    cd14_dim_share: float
    cd14_max_loss: float
    activated_neutrophils: float
    activated_ssc: float
    activated_cd14: float
    immature_granulocytes: float
    ig_ssc: float
    ig_cd14: float
    lymphocytes: float
    doublet_fraction: float
    monocyte_doublet_share: float
    unresolved_doublets: float
    platelet_complexes: float
    clog_window: tuple[float, float] | None  # fractions of the acquisition
    panel: str  # "3colour" | "2colour"
    cd45_fluor: str | None  # None: the instrument's usual CD45 fluor
    with_markers: bool


def draw_severe_sepsis(rng: np.random.Generator, instrument: str | Instrument = "canto") -> SevereSepsis:
    """A severe-sepsis tube drawn from :data:`SEVERE_SEPSIS_RANGES`.

    CD45 goes on any free fluor of the instrument (not PE, not CD14's); a CD45 off the instrument's
    usual fluor is written with ``$PnS`` markers, as no reader could otherwise know where it is.
    """
    inst = get_instrument(instrument)
    r = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in SEVERE_SEPSIS_RANGES.items()}
    clog = bool(rng.random() < r.pop("clog_probability"))
    start, width = rng.uniform(0.1, 0.8), rng.uniform(0.04, 0.10)
    two_colour = bool(rng.random() < r.pop("two_colour_probability"))
    free = [d.fluor for d in inst.detectors if d.fluor not in ("PE", inst.markers["CD14"])]
    cd45_fluor = None if two_colour else str(rng.choice(free))
    usual = cd45_fluor in (None, inst.markers["CD45"])
    # naming finds CD14 only on PerCP-Cy5.5 and CD45 only on its usual fluor: elsewhere, markers
    needs_markers = not usual or inst.markers["CD14"] != "PerCP-Cy5.5"
    with_markers = True if needs_markers else bool(rng.random() < 0.5)
    return SevereSepsis(
        **r,
        clog_window=(float(start), float(start + width)) if clog else None,
        panel="2colour" if two_colour else "3colour",
        cd45_fluor=None if usual else cd45_fluor,
        with_markers=with_markers,
    )


def simulate_blood(
    path: str | os.PathLike,
    instrument: str | Instrument = "canto",
    abc_median: float = 10_000.0,
    *,
    seed: int = 0,
    n_events: int = 50_000,
    monocyte_fraction: float = 0.07,
    septic: bool = False,
    clog: bool = False,
    panel: str = "3colour",
    abc_sigma: float = 0.4,
    with_markers: bool | None = None,
    acquired_at: datetime | None = None,
    severe: SevereSepsis | None = None,
    granulocyte_fraction: float | None = None,
    debris_fraction: float | None = None,
    doublet_fraction: float | None = None,
) -> dict:
    """Write a lysed-whole-blood patient tube stained with HLA-DR-PE, CD14 and (3-colour) CD45.

    Parameters
    ----------
    abc_median
        Median specific HLA-DR PE molecules (AB/C) over the monocytes.
    monocyte_fraction
        Monocytes as a fraction of leukocytes (0.005-0.12 is realistic).
    septic
        Septic realism: immature granulocytes, activated neutrophils (dim CD14,
        lower SSC overlapping monocytes), a wider CD14 continuum in monocytes.
    clog
        A clog: flow-rate drop, signal sag and a burst of debris in a time window.
    panel
        ``"3colour"`` (HLA-DR, CD14, CD45) or ``"2colour"`` (no CD45 stain).
    acquired_at
        Acquisition start written as ``$DATE``/``$BTIM`` (default: a time derived from the seed).
    severe
        A severe-sepsis tube (:func:`draw_severe_sepsis`): its monocyte fraction, clog, panel and
        markers replace ``monocyte_fraction``, ``clog``, ``panel``, ``with_markers`` and ``septic``.
    granulocyte_fraction
        Granulocytes (neutrophils, immature granulocytes, eosinophils) as a fraction of leukocytes;
        the other non-monocytes fill the rest in their usual proportions. Default: the usual ~63 %.
    debris_fraction, doublet_fraction
        Debris and doublets as fractions of all events (default 3 % (4 % with a clog) and 2 %,
        or the severe profile's doublets).

    Returns
    -------
    dict
        Truth: ``abc_true`` (median over true monocytes of HLA-DR + PE autofluorescence
        molecules), ``abc_specific``, monocyte count, every parameter.
    """
    if severe is not None:
        monocyte_fraction, panel, with_markers = severe.monocyte_fraction, severe.panel, severe.with_markers
        septic, clog = True, severe.clog_window is not None
    if panel not in ("3colour", "2colour"):
        raise SimulationError(f"panel must be '3colour' or '2colour', not {panel!r}")
    if not 0 < monocyte_fraction < 0.5:
        raise SimulationError(f"monocyte_fraction {monocyte_fraction} out of range")
    inst = get_instrument(instrument)
    rng = np.random.default_rng(seed)
    fractions = {
        "neutrophil": 0.60,
        "immature_granulocyte": 0.0,
        "eosinophil": 0.03,
        "t_cell": 0.20,
        "b_cell": 0.04,
        "nk_cell": 0.03,
        "dendritic_cell": 0.006,
        "dead_cell": 0.01,
    }
    if septic:
        fractions.update(
            neutrophil=0.62,
            immature_granulocyte=rng.uniform(0.04, 0.12),
            t_cell=0.10,
            b_cell=0.02,
            nk_cell=0.015,
            dead_cell=0.03,
        )
    if severe is not None:  # lymphopenia; the neutrophils fill what the others leave
        lymph, ig = severe.lymphocytes, severe.immature_granulocytes
        fractions.update(
            immature_granulocyte=ig,
            eosinophil=0.01,
            t_cell=0.75 * lymph,
            b_cell=0.12 * lymph,
            nk_cell=0.13 * lymph,
            dendritic_cell=0.002,
            dead_cell=0.03,
        )
        others = sum(v for k, v in fractions.items() if k != "neutrophil")
        fractions["neutrophil"] = 1 - monocyte_fraction - others
    mono_split = (0.70, 0.15, 0.15) if septic else (0.86, 0.06, 0.08)
    others = sum(fractions.values())
    fractions = {k: v * (1 - monocyte_fraction) / others for k, v in fractions.items()}
    if granulocyte_fraction is not None:
        if not 0 < granulocyte_fraction < 1 - monocyte_fraction:
            raise SimulationError(f"granulocyte_fraction {granulocyte_fraction} out of range")
        granulocytes = ("neutrophil", "immature_granulocyte", "eosinophil")
        g = sum(fractions[k] for k in granulocytes)
        rest = 1 - monocyte_fraction - g
        fractions = {
            k: v
            * (
                granulocyte_fraction / g
                if k in granulocytes
                else (1 - monocyte_fraction - granulocyte_fraction) / rest
            )
            for k, v in fractions.items()
        }
    for name, share in zip(
        ("monocyte_classical", "monocyte_intermediate", "monocyte_nonclassical"), mono_split
    ):
        fractions[name] = monocyte_fraction * share

    if debris_fraction is None:
        debris_fraction = 0.04 if clog else 0.03
    if doublet_fraction is None:
        doublet_fraction = severe.doublet_fraction if severe is not None else 0.02
    if not (0 <= debris_fraction and 0 <= doublet_fraction and debris_fraction + doublet_fraction < 0.5):
        raise SimulationError(
            f"debris_fraction {debris_fraction} and doublet_fraction {doublet_fraction} out of range"
        )
    n_debris = int(n_events * debris_fraction)
    n_doublets = int(n_events * doublet_fraction)
    n_cells = n_events - n_debris - n_doublets
    names = list(fractions)
    p = np.array([fractions[k] for k in names])
    which = rng.choice(len(names), size=n_cells, p=p / p.sum())

    fsc, ssc, cd45, cd14, hladr, af, codes = (np.empty(n_cells) for _ in range(7))
    for idx, name in enumerate(names):
        sel = which == idx
        k = int(sel.sum())
        code, fm, fs, sm, ss, c45, c14, dr, a = _BLOOD[name]
        if severe is not None and name == "neutrophil":
            activated = rng.random(k) < severe.activated_neutrophils
            sm_k = np.where(activated, severe.activated_ssc, sm)
            c14_k = np.where(activated, severe.activated_cd14, c14)
        elif severe is not None and name == "immature_granulocyte":
            sm_k, c14_k = severe.ig_ssc, severe.ig_cd14
        elif severe is not None and code in MONOCYTE_CODES:
            # a continuum of CD14 loss in a share of them, down to `cd14_max_loss` below the normal
            # (classical) level; CD14-dim non-classical monocytes already sit there
            dim = rng.random(k) < severe.cd14_dim_share
            loss = 10 ** rng.uniform(0.0, np.log10(severe.cd14_max_loss), k)
            floor = _BLOOD["monocyte_classical"][6] / severe.cd14_max_loss
            sm_k, c14_k = sm, np.where(dim, np.maximum(c14 / loss, min(floor, c14)), c14)
        elif septic and name == "neutrophil":
            activated = rng.random(k) < 0.35
            sm_k = np.where(activated, 75_000, sm)
            c14_k = np.where(activated, 1_800, c14)
        else:
            sm_k, c14_k = sm, c14
        fsc[sel] = _lognormal(rng, fm, fs, k)
        ssc[sel] = sm_k * np.exp(rng.normal(0, ss, k))
        cd45[sel] = _lognormal(rng, c45, 0.25, k)
        cd14[sel] = c14_k * np.exp(rng.normal(0, 0.35, k))
        if code in MONOCYTE_CODES:
            hladr[sel] = _lognormal(rng, abc_median, abc_sigma, k)
        else:
            hladr[sel] = _lognormal(rng, dr, 0.3, k) if dr else 0.0
        af[sel] = _lognormal(rng, a, 0.3, k)
        codes[sel] = code
    # monocyte-platelet complexes: monocytes with slightly more scatter, still singlets
    mono = np.isin(codes, MONOCYTE_CODES)
    mpc = mono & (rng.random(n_cells) < (severe.platelet_complexes if severe is not None else 0.05))
    codes[mpc] = 11
    fsc[mpc] *= 1.08
    ssc[mpc] *= 1.12
    ratio = rng.normal(0.88, 0.03, n_cells)

    # doublets: half monocyte + neutrophil, half other pairs; FSC-H ~ the larger partner
    a = rng.integers(0, n_cells, n_doublets)
    b = rng.integers(0, n_cells, n_doublets)
    mono_idx = np.flatnonzero(mono)
    neut_idx = np.flatnonzero(codes == 1)
    half = n_doublets // 2 if severe is None else int(n_doublets * severe.monocyte_doublet_share)
    if mono_idx.size and neut_idx.size:
        a[:half] = rng.choice(mono_idx, half)
        b[:half] = rng.choice(neut_idx, half)
    d_fsc = fsc[a] + fsc[b]
    d_ratio = np.maximum(fsc[a], fsc[b]) / d_fsc * rng.normal(0.95, 0.04, n_doublets)
    if severe is not None:  # partners one behind the other: FSC-H/FSC-A near a singlet's
        aligned = rng.random(n_doublets) < severe.unresolved_doublets
        d_ratio[aligned] = rng.uniform(0.70, 0.85, int(aligned.sum()))
    d_codes = np.where(np.arange(n_doublets) < half, 12, 13)

    # debris (and the burst during a clog)
    deb_fsc = _lognormal(rng, 12_000, 0.6, n_debris)
    deb_ssc = _lognormal(rng, 8_000, 0.8, n_debris)

    def cat(cells: np.ndarray, doublet: np.ndarray, debris: np.ndarray) -> np.ndarray:
        return np.concatenate([cells, doublet, debris])

    fsc_all = cat(fsc, d_fsc, deb_fsc)
    ssc_all = cat(ssc, ssc[a] + ssc[b], deb_ssc)
    ratio_all = cat(ratio, d_ratio, rng.normal(0.85, 0.06, n_debris))
    codes_all = cat(codes, d_codes, np.zeros(n_debris)).astype(int)
    hladr_all = cat(hladr, hladr[a] + hladr[b], np.zeros(n_debris))
    af_all = cat(af, af[a] + af[b], _lognormal(rng, 80, 0.8, n_debris))
    cd14_all = cat(cd14, cd14[a] + cd14[b], _lognormal(rng, 80, 0.8, n_debris))
    cd45_all = cat(cd45, cd45[a] + cd45[b], _lognormal(rng, 150, 0.8, n_debris))

    # order of acquisition; during a clog, debris bursts in and the signal sags
    n = n_events
    order = rng.permutation(n)
    clog_window = None
    if clog:
        clog_window = (0.55, 0.63) if severe is None else severe.clog_window
        lo, hi = int(clog_window[0] * n), int(clog_window[1] * n)
        is_debris = codes_all[order] == 0
        debris_pos = np.flatnonzero(is_debris)
        burst = debris_pos[: n_debris // 2]  # half the debris goes into the clog window
        window = np.arange(lo, hi)
        swap = rng.choice(window, size=min(burst.size, window.size), replace=False)
        order[burst[: swap.size]], order[swap] = order[swap], order[burst[: swap.size]]
    sag = np.ones(n)
    if clog_window is not None:
        lo, hi = int(clog_window[0] * n), int(clog_window[1] * n)
        sag[lo:hi] = 0.6 + 0.4 * np.abs(np.linspace(-1, 1, hi - lo))

    molecules = {"PE": hladr_all + af_all * FLUOR_AF["PE"]}
    cd14_fluor = inst.markers["CD14"]
    cd45_fluor = (severe.cd45_fluor if severe is not None else None) or inst.markers["CD45"]
    for det in inst.detectors:
        if det.fluor == "PE":
            continue
        background = af_all * FLUOR_AF[det.fluor]
        if det.fluor == cd14_fluor:
            molecules[det.fluor] = cd14_all + background
        elif det.fluor == cd45_fluor and panel == "3colour":
            molecules[det.fluor] = cd45_all + background
        else:
            molecules[det.fluor] = background
    ev = _Events(
        fsc_all[order],
        ratio_all[order],
        ssc_all[order],
        {k: v[order] for k, v in molecules.items()},
        codes_all[order],
        sag,
    )
    ev.time = _times(n, rng, 3000.0, clog_window)
    markers = {"HLA-DR": "PE", "CD14": cd14_fluor}
    if panel == "3colour":
        markers["CD45"] = cd45_fluor
    out = _write(Path(path), ev, inst, seed, "patient", rng, markers, with_markers, acquired_at)

    is_mono = np.isin(ev.labels, MONOCYTE_CODES)
    pe_true = ev.molecules["PE"][is_mono]
    return {
        "file": out.name,
        "labels": out.with_suffix(".labels.npy").name,
        "kind": "patient",
        "instrument": inst.name,
        "seed": seed,
        "n_events": n,
        "abc_median_specific_requested": abc_median,
        "abc_true": float(np.median(pe_true)),
        "abc_specific": float(
            np.median(ev.molecules["PE"][is_mono] - af_all[order][is_mono] * FLUOR_AF["PE"])
        ),
        "monocytes": int(is_mono.sum()),
        "monocyte_fraction": monocyte_fraction,
        "septic": septic,
        "clog": clog,
        "clog_window": clog_window,
        "panel": panel,
        "abc_sigma": abc_sigma,
        "severe": asdict(severe) if severe is not None else None,
        "channels": {m: inst.detector(f).channel for m, f in markers.items()},
        "with_markers": instrument_markers(inst, with_markers),
        "population_counts": {POPULATIONS[int(c)]: int(np.sum(ev.labels == c)) for c in np.unique(ev.labels)},
    }


def severe_sepsis_cohort(n: int = 200, seed: int = 16) -> list[dict]:
    """``n`` severe-sepsis tube specifications: ``simulate_blood(path, **case)`` writes each.

    All presets in turn; AB/C log-uniform in 1,000-40,000 except a third near 5,000 (+-19 %);
    80,000-200,000 events (about 250-4,000 monocytes), except one tube in 25 with 8,000-20,000
    events, which may hold too few monocytes to measure.
    """
    rng = np.random.default_rng(seed)
    names = sorted(INSTRUMENTS)
    cases = []
    for i in range(n):
        name = names[i % len(names)]
        near = rng.random() < 1 / 3
        abc = 5000 * rng.uniform(0.81, 1.19) if near else np.exp(rng.uniform(np.log(1000), np.log(40000)))
        small = i % 25 == 24
        events = rng.integers(8_000, 20_000) if small else rng.integers(80_000, 200_000)
        cases.append(
            {
                "instrument": name,
                "abc_median": float(abc),
                "seed": seed * 10_000 + i,
                "n_events": int(events),
                "severe": draw_severe_sepsis(rng, name),
            }
        )
    return cases


def instrument_markers(inst: Instrument, with_markers: bool | None) -> bool:
    return inst.with_markers if with_markers is None else with_markers


# --- a run ---------------------------------------------------------------------------
#: The canonical cases of sample_fcs/: normal, reduced, immunoparalysed, borderline.
DEFAULT_CASES = (
    {"abc_median": 20_000.0, "monocyte_fraction": 0.12},
    {"abc_median": 10_000.0, "monocyte_fraction": 0.12, "septic": True},
    {"abc_median": 2_500.0, "monocyte_fraction": 0.12, "septic": True},
    {"abc_median": 5_200.0, "monocyte_fraction": 0.12, "septic": True, "clog": True},
)


def simulate_run(
    out_dir: str | os.PathLike,
    n: int = 4,
    seed: int = 0,
    instrument: str | Instrument = "canto",
    cases: list[dict] | None = None,
    *,
    n_events: int = 30_000,
    bead_events: int = 10_000,
    overwrite: bool = False,
) -> list[dict]:
    """Write one run: ``beads.fcs`` and ``patient_01.fcs`` ... sharing instrument settings.

    All tubes carry the run's date; the bead tube is acquired first, patients every 10 min after.

    ``truth.csv`` and ``truth.json`` (every parameter) are written beside them.
    Cases beyond the four canonical ones draw AB/C log-uniform in 1,000-40,000.

    Raises
    ------
    SimulationError
        A file the run would write exists already (nothing is written), unless ``overwrite``.
    """
    inst = get_instrument(instrument)
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    if cases is None:
        cases = [dict(c) for c in DEFAULT_CASES[:n]]
        for _ in range(n - len(cases)):
            cases.append(
                {
                    "abc_median": float(np.exp(rng.uniform(np.log(1000), np.log(40000)))),
                    "monocyte_fraction": float(rng.uniform(0.02, 0.12)),
                    "septic": bool(rng.random() < 0.5),
                }
            )
    tubes = [out / "beads.fcs", *(out / f"patient_{i:02d}.fcs" for i in range(1, len(cases) + 1))]
    _refuse_to_overwrite(out, [*_tube_files(tubes), out / "truth.json", out / "truth.csv"], overwrite)
    out.mkdir(parents=True, exist_ok=True)
    start = datetime(2026, 3, 1 + seed % 28, 8)  # one day per run: beads first, then each patient tube
    truths = [simulate_beads(tubes[0], inst, seed=seed, n_events=bead_events, acquired_at=start)]
    for i, case in enumerate(cases, start=1):
        params = {"n_events": n_events, "acquired_at": start + timedelta(minutes=10 * i), **case}
        truth = simulate_blood(tubes[i], inst, seed=seed * 1000 + i, **params)
        truths.append(truth)
    _write_truth(out, truths, {"seed": seed, "instrument": inst.name, "instrument_settings": asdict(inst)})
    return truths


def _tube_files(tubes: list[Path]) -> list[Path]:
    """Each FCS file with the labels file :func:`_write` writes beside it."""
    return [f for tube in tubes for f in (tube, tube.with_suffix(".labels.npy"))]


def _refuse_to_overwrite(out: Path, files: list[Path], overwrite: bool) -> None:
    """Raise :class:`SimulationError` (naming the folder and the first files) when any of ``files``
    exists, unless ``overwrite``: a folder of real data must never be replaced by mistake."""
    existing = [] if overwrite else [f for f in files if f.exists()]
    if existing:
        shown = ", ".join(f.relative_to(out).as_posix() for f in existing[:3])
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise SimulationError(
            f"refusing to overwrite {len(existing)} existing file(s) ({shown}{more}): choose a new "
            f"folder, or give --overwrite (overwrite=True) to regenerate",
            out,
        )


def _write_truth(out: Path, truths: list[dict], run: dict) -> None:
    atomic_write(out / "truth.json", json.dumps({"run": run, "tubes": truths}, indent=2, default=str) + "\n")
    columns = [
        "file",
        "kind",
        "instrument",
        "seed",
        "n_events",
        "abc_true",
        "abc_specific",
        "monocytes",
        "monocyte_fraction",
        "septic",
        "clog",
        "panel",
    ]
    lines = [",".join(columns)]
    for t in truths:
        lines.append(",".join("" if t.get(c) is None else str(t.get(c)) for c in columns))
    atomic_write(out / "truth.csv", "\n".join(lines) + "\n")


# --- a multi-day cohort: patient courses and bead drift (issue 13) ------------------------------
#: Patient courses of the default cohort: (patient id, instrument, first day, AB/C per day or None for
#: no sample that day). Days count from the first day of the courses, which end together on the
#: cohort's last day; P05 starts 3 days earlier, on the drifting instrument. Values keep >= 25 % from
#: the 5,000 / 8,000 / 15,000 lines and change by >= 40 % or not at all, so that the course rules'
#: truth is unambiguous.
COHORT_COURSES: tuple[tuple[str, str, int, tuple[float | None, ...]], ...] = (
    ("P01-falls", "canto", 0, (20_000.0, 20_000.0, 11_000.0, 6_000.0, 3_000.0, 3_000.0)),
    ("P02-recovers", "canto", 1, (3_000.0, 3_000.0, 6_000.0, 11_000.0, 22_000.0, 22_000.0)),
    ("P03-stays-low", "canto", 0, (3_500.0, 3_500.0, 3_500.0, 3_500.0, 3_500.0)),
    ("P04-gap", "canto", 2, (6_000.0, None, 6_000.0, 20_000.0, 6_000.0)),
    ("P05-normal", "lyric", -3, (22_000.0,) * 10),
)
#: Reference-period variation of a bead MFI: a relative SD (2-3 % in practice), applied on the log scale.
BEAD_DAY_SD = 0.03
#: The default drift: a quarter of that SD (in log10) per day, i.e. about 5.3 % per week.
DRIFT_PER_WEEK = (1 + BEAD_DAY_SD) ** (7 / 4) - 1


def bead_gain_factors(
    reference_days: int, drift_days: int, drift_per_week: float, sd: float = BEAD_DAY_SD
) -> list[float]:
    """The PE gain factor of each daily run on a drifting instrument.

    In log10, the reference period alternates +-``b`` with ``b = log10(1 + sd) * sqrt((n - 1) / n)``, so
    that the sample SD of log10(gain) over it is exactly ``log10(1 + sd)`` and its mean exactly 0. Then
    the gain drifts by ``drift_per_week`` (compounded) per week, from half a day's step after the
    reference period on. With the default drift each day moves a quarter SD and the drift never lands
    within an eighth of an SD of a whole number of SDs (so the Westgard truth is unambiguous).
    """
    b = np.log10(1 + sd) * np.sqrt((reference_days - 1) / reference_days) if reference_days > 1 else 0.0
    logs = [b if i % 2 == 0 else -b for i in range(reference_days)]
    step = np.log10(1 + drift_per_week) / 7.0
    logs += [step * (k + 0.5) for k in range(drift_days)]
    return [float(10**v) for v in logs]


def simulate_cohort(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    reference_days: int = 20,
    drift_days: int = 14,
    drift_per_week: float = DRIFT_PER_WEEK,
    drift_instrument: str = "lyric",
    courses: tuple = COHORT_COURSES,
    n_events: int = 40_000,
    bead_events: int = 100_000,
    start: datetime = datetime(2026, 1, 5, 7, 30),
    lot_change: tuple[int, tuple[float, ...]] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a multi-day cohort: one bead tube per instrument per day, patients sampled over days.

    Two instruments (``canto`` and ``lyric``) acquire a bead tube every morning for
    ``reference_days + drift_days`` days. On ``drift_instrument`` the PE gain follows
    :func:`bead_gain_factors` (the reference period, then a drift of ``drift_per_week``); the other
    instrument alternates as in the reference period throughout. Patient courses (:data:`COHORT_COURSES`)
    are placed on the last days so that they overlap the drift. Files go to ``day_NN/<instrument>/``.

    ``lot_change=(day, values)``: from that day on the steady instrument's bead tubes are of a new lot
    (PE molecules per bead ``values``).

    Returns the truth (also written as ``cohort.json``); ``manifest.csv`` gives each patient tube its
    ``patient_id`` and ``collected_at``, and each bead tube its ``lot`` (the lot's values). The truth's
    ``expected_rules`` per patient lists, per rule of the course (course/1), the days (ISO dates) it
    must fire on, derived from the designed values: a value < 5,000; < 8,000 on two consecutive
    calendar days; > 15,000 after a value at or below it; any designed change (designs change by
    >= 40 % or not at all).

    Raises
    ------
    SimulationError
        Too few days for the courses, or a file the cohort would write exists already (nothing is
        written), unless ``overwrite``.
    """
    out = Path(out_dir)
    n_days = reference_days + drift_days
    drifting = bead_gain_factors(reference_days, drift_days, drift_per_week)
    steady = bead_gain_factors(n_days, 0, 0.0)
    first_course_day = n_days - max((d0 + len(v) for _, _, d0, v in courses), default=0)
    if courses and first_course_day + min(d0 for _, _, d0, _ in courses) < 0:
        raise SimulationError(
            f"{n_days} days are too few for the courses: they span "
            f"{n_days - first_course_day - min(d0 for _, _, d0, _ in courses)} days"
        )
    tubes = [_cohort_tube(out, day, name, "beads") for day in range(n_days) for name in ("canto", "lyric")]
    tubes += [
        _cohort_tube(out, first_course_day + day0 + i, name, pid)
        for pid, name, day0, values in courses
        for i, abc in enumerate(values)
        if abc is not None
    ]
    _refuse_to_overwrite(out, [*_tube_files(tubes), out / "manifest.csv", out / "cohort.json"], overwrite)
    out.mkdir(parents=True, exist_ok=True)
    beads: list[dict] = []
    manifest = ["file,role,patient_id,lot,collected_at"]
    for day in range(n_days):
        for k, name in enumerate(("canto", "lyric")):
            factor = (drifting if name == drift_instrument else steady)[day]
            inst = get_instrument(name).scaled("PE", factor)
            path = _cohort_tube(out, day, name, "beads")
            path.parent.mkdir(parents=True, exist_ok=True)
            new_lot = lot_change is not None and name != drift_instrument and day >= lot_change[0]
            lot = tuple(lot_change[1]) if new_lot else QUANTIBRITE_96597
            truth = simulate_beads(
                path,
                inst,
                lot,
                seed=seed * 100_000 + day * 10 + k,
                n_events=bead_events,
                acquired_at=start + timedelta(days=day, minutes=5 * k),
            )
            manifest.append(f"{path.relative_to(out).as_posix()},beads,,{';'.join(f'{v:g}' for v in lot)},")
            truth.update(
                file=path.relative_to(out).as_posix(),
                day=day,
                instrument=name,
                gain_factor=factor,
                date=(start + timedelta(days=day)).date().isoformat(),
                reference=day < reference_days,
                drifting=name == drift_instrument,
            )
            beads.append(truth)
    patients: list[dict] = []
    for p, (pid, name, day0, values) in enumerate(courses):
        samples = []
        for i, abc in enumerate(values):
            if abc is None:
                continue
            day = first_course_day + day0 + i
            factor = (drifting if name == drift_instrument else steady)[day]
            inst = get_instrument(name).scaled("PE", factor)
            path = _cohort_tube(out, day, name, pid)
            when = start + timedelta(days=day, hours=1, minutes=10 * p)
            truth = simulate_blood(
                path,
                inst,
                abc,
                seed=seed * 100_000 + 5_000 + 100 * p + i,
                n_events=n_events,
                monocyte_fraction=0.12,
                septic=abc < 8_000,
                acquired_at=when,
            )
            truth.update(
                file=path.relative_to(out).as_posix(),
                day=day,
                date=when.date().isoformat(),
                design_abc=abc,
                patient_id=pid,
            )
            samples.append(truth)
            manifest.append(f"{truth['file']},patient,{pid},,{when.isoformat()}")
        patients.append(
            {
                "patient_id": pid,
                "instrument": name,
                "samples": samples,
                "expected_rules": _designed_rules(samples),
            }
        )
    cohort = {
        "seed": seed,
        "reference_days": reference_days,
        "drift_days": drift_days,
        "drift_per_week": drift_per_week,
        "drift_instrument": drift_instrument,
        "bead_day_sd": BEAD_DAY_SD,
        "lot_values": list(QUANTIBRITE_96597),
        "beads": beads,
        "patients": patients,
    }
    atomic_write(out / "manifest.csv", "\n".join(manifest) + "\n")
    atomic_write(out / "cohort.json", json.dumps(cohort, indent=1, default=str) + "\n")
    return cohort


def _cohort_tube(out: Path, day: int, instrument: str, stem: str) -> Path:
    """Where :func:`simulate_cohort` writes a tube: ``day_NN/<instrument>/<stem>.fcs``."""
    return out / f"day_{day:02d}" / instrument / f"{stem}.fcs"


def _designed_rules(samples: list[dict]) -> dict[str, list[str]]:
    """Days each course rule must fire on, from the designed values (see :func:`simulate_cohort`)."""
    fired: dict[str, list[str]] = {
        "immunoparalysis": [],
        "low_two_days": [],
        "recovery": [],
        "significant_change": [],
    }
    for i, s in enumerate(samples):
        prev = samples[i - 1] if i else None
        if s["design_abc"] < 5_000:
            fired["immunoparalysis"].append(s["date"])
        if prev and s["design_abc"] < 8_000 and prev["design_abc"] < 8_000 and s["day"] - prev["day"] == 1:
            fired["low_two_days"].append(s["date"])
        if prev and s["design_abc"] > 15_000 >= prev["design_abc"]:
            fired["recovery"].append(s["date"])
        if prev and s["design_abc"] != prev["design_abc"]:
            fired["significant_change"].append(s["date"])
    return fired
