"""The QC policy: every threshold of a patient tube's QC and every flag's severity, in one place.

A flag is a code, optionally followed by ``:detail`` (``few_monocytes:1201``). Its severity says
what it does to the Result:

``fail``
    the value is not reportable: ``qc.flags`` lists it, ``reportable`` is false and the Result
    carries no class (``band``, ``immunoparalysis``, ``borderline`` are null);
``warn``
    the value is reportable but the reader should know: ``qc.warnings``;
``info``
    recorded for the record only: ``qc.info``.

:data:`DEFAULT_POLICY` is recorded in every Result's ``provenance.qc_policy``; ``docs/result.md``
prints its table (:func:`markdown_table`). A new rule is one :class:`Rule` line in :data:`RULES`
(or ``DEFAULT_POLICY.with_rules(Rule(...))`` for a local policy); a code the policy does not know
warns. Exit codes follow ``reportable`` only (see :mod:`hladr.cli`): warnings never change them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from .classify import THRESHOLD
from .fcs import SETTINGS_REL_TOL, ChannelSettings, settings_differences
from .preanalytics import STABILITY_WINDOWS, STORAGE_WORDS, PreAnalytics, StabilityWindow, preanalytic_flags

Severity = Literal["fail", "warn", "info"]
SEVERITIES: tuple[Severity, ...] = ("fail", "warn", "info")


@dataclass(frozen=True)
class Rule:
    """One QC flag: its code, severity and the rule that raises it, in words."""

    code: str
    severity: Severity
    rule: str


#: Every flag a patient tube's Result can carry (gating, calibration and analysis flags).
RULES: tuple[Rule, ...] = tuple(
    Rule(code, severity, rule)
    for code, severity, rule in (
        ("too_few_monocytes", "fail", "fewer than `min_monocytes_fail` monocytes"),
        ("few_monocytes", "warn", "fewer than `min_monocytes` monocytes (the interval widens)"),
        ("hladr_saturated", "fail", "more than `saturated_fail` of the monocytes at the HLA-DR maximum"),
        ("hladr_some_saturated", "warn", "more than `saturated_warn` of the monocytes at the maximum"),
        ("voltage_mismatch", "fail", "HLA-DR detector voltage ($PnV) differs from the bead tube's"),
        ("gain_mismatch", "fail", "HLA-DR detector gain ($PnG) differs from the bead tube's"),
        (
            "gating_settings_differ",
            "warn",
            "a gating channel's (CD14, CD45, FSC, SSC) voltage or gain differs",
        ),
        ("channel_missing", "fail", "the bead curve's channel is not in the patient tube"),
        ("channel_mismatch", "fail", "HLA-DR read on another detector than the beads"),
        ("cytometer_mismatch", "warn", "the bead tube's `$CYT` differs"),
        ("serial_mismatch", "warn", "the bead tube's cytometer serial differs"),
        ("calibration_failed", "fail", "the bead calibration failed its own QC (docs/calibration.md)"),
        ("outside_bead_range", "warn", "monocyte MFI outside the fitted bead range (extrapolated)"),
        (
            "outside_bead_range_far",
            "fail",
            "monocyte MFI over `bead_range_far_factor` x the brightest level's",
        ),
        ("wide_interval", "warn", "the 95 % interval is wider than `wide_interval_pct` % either side"),
        (
            "fallback_gating",
            "warn",
            "the joint gate failed its checks: the density gate or clustering answered",
        ),
        ("gates_disagree", "warn", "an alternative gate's monocytes give a value outside the 95 % interval"),
        (
            "nonfinite_events",
            "warn",
            "events with NaN or infinite values dropped (over `max_nonfinite_fraction` refuse the file)",
        ),
        (
            "time_gate_removed",
            "warn",
            "more than `time_gate_warn` of events dropped by the time gate (a clog)",
        ),
        ("no_granulocytes", "warn", "no granulocyte population (PBMC rather than lysed whole blood?)"),
        ("panel_from_naming", "warn", "a channel role came from instrument naming, not `$PnS` markers"),
        ("no_scatter", "info", "mass cytometry: gated on DNA, CD45 and CD14 only"),
        (
            "stained_beyond_stability",
            "fail",
            "stained later after collection than its tube type's stability "
            "window (`stability_windows`; docs/reagents.md)",
        ),
        (
            "stability_unverified",
            "warn",
            "no staining time, and acquired later after collection than the stability window",
        ),
        (
            "no_stability_window",
            "warn",
            "no stability window for the tube type and storage (docs/reagents.md)",
        ),
        (
            "protocol_differs",
            "warn",
            "staining protocol differs from the lab's reference (`reference_protocol`): "
            "lyse-no-wash reads ~18 % higher",
        ),
        ("no_collection_time", "warn", "no collection time: the sample's age cannot be checked"),
        ("preanalytic_times_inconsistent", "fail", "collection, staining and acquisition times out of order"),
        (
            "bead_run_flagged",
            "fail",
            "the bead run broke a Westgard rule of its lot's Levey-Jennings series "
            "(batch with a results store; docs/beadqc.md)",
        ),
    )
)


#: Every flag a bead calibration can carry (``Calibration.qc``; thresholds in :mod:`hladr.calibration`,
#: docs/calibration.md): a failing one fails the calibration, and a failed calibration fails every
#: patient tube measured with it (``calibration_failed``).
CALIBRATION_RULES: tuple[Rule, ...] = tuple(
    Rule(code, severity, rule)
    for code, severity, rule in (
        ("too_few_peaks", "fail", "fewer than MIN_PEAKS levels fitted"),
        ("low_r2", "fail", "r² of the log-log fit below MIN_R2"),
        ("slope_out_of_range", "fail", "slope outside SLOPE_RANGE on a linear channel (log-log model)"),
        ("too_few_bead_events", "fail", "fewer than MIN_BEAD_EVENTS singlet beads"),
        ("missing_level", "fail", "a lit level without a population, neither saturated nor below the noise"),
        ("unassigned_population", "fail", "a population of a level's size left without a level"),
        ("ambiguous_assignment", "fail", "another assignment scores within AMBIGUITY_MARGIN of the best"),
        ("lot_expired", "fail", "the lot's expiry is before the bead tube's acquisition date"),
        ("level_saturated", "warn", "a level the curve puts above the channel's maximum"),
        ("level_below_noise", "warn", "a level the curve puts below the noise floor"),
        ("level_not_fitted", "warn", "a level found but not fitted (noise floor, or close to the blank)"),
        ("wide_peak_cv", "warn", "a fitted level (not the dimmest) with a CV over MAX_PEAK_CV"),
    )
)


def _severity(rules: Iterable[Rule], flag: str) -> Severity:
    """Severity of a flag (``code`` or ``code:detail``) under ``rules``; an unknown code warns."""
    code = flag.split(":", 1)[0]
    return next((rule.severity for rule in rules if rule.code == code), "warn")


def _evaluate(rules: Iterable[Rule], flags: Iterable[str]) -> QCOutcome:
    """Flags sorted by severity under ``rules`` (each kept once, in order)."""
    rules = tuple(rules)
    by: dict[str, list[str]] = {s: [] for s in SEVERITIES}
    for flag in dict.fromkeys(flags):
        by[_severity(rules, flag)].append(flag)
    return QCOutcome(tuple(by["fail"]), tuple(by["warn"]), tuple(by["info"]))


def evaluate_calibration(flags: Iterable[str]) -> QCOutcome:
    """A bead calibration's flags sorted by :data:`CALIBRATION_RULES` (``reportable``: it passed)."""
    return _evaluate(CALIBRATION_RULES, flags)


@dataclass(frozen=True)
class QCOutcome:
    """A tube's flags sorted by severity."""

    flags: tuple[str, ...] = ()  # fail
    warnings: tuple[str, ...] = ()
    info: tuple[str, ...] = ()

    @property
    def reportable(self) -> bool:
        return not self.flags

    def to_dict(self) -> dict[str, Any]:
        """The Result's ``qc`` entry."""
        return {
            "passed": self.reportable,
            "flags": list(self.flags),
            "warnings": list(self.warnings),
            "info": list(self.info),
        }


@dataclass(frozen=True)
class QCPolicy:
    """Thresholds and severities of a patient tube's QC (frozen: one policy per Result).

    Attributes
    ----------
    threshold
        AB/C below which a reportable value is immunoparalysis (:data:`hladr.classify.THRESHOLD`).
    min_monocytes, min_monocytes_fail
        Monocytes below which ``few_monocytes`` warns / ``too_few_monocytes`` fails.
    saturated_warn, saturated_fail
        Fractions of monocytes at the HLA-DR channel's maximum that warn / fail.
    bead_range_far_factor
        An MFI this many times outside the fitted bead range fails (``outside_bead_range_far``).
    wide_interval_pct
        A 95 % interval wider than this, in % either side of AB/C, warns.
    settings_rel_tol
        Relative difference above which a voltage or gain counts as different.
    reference_protocol
        The lab's declared staining protocol; another one warns ``protocol_differs``.
    min_monocytes_gate
        An automatic monocyte gate finding fewer monocytes is not used; when no gate finds more, the
        tube is refused (too few to measure).
    monocyte_percent_range
        Plausible monocytes, in % of the leukocytes: an automatic gate's answer outside it is not used.
    max_nonfinite_fraction
        Events holding NaN or infinite values are dropped (``nonfinite_events`` warns) up to this
        share of the tube; more refuse the file.
    time_gate_warn
        A time gate removing more than this share of the events warns (``time_gate_removed``).
    stability_windows
        How long after collection each tube type (and storage) may be stained
        (:data:`hladr.preanalytics.STABILITY_WINDOWS`, sources in docs/reagents.md).
    rules
        Every flag code with its severity.
    """

    version: str = "qc/1"
    threshold: float = THRESHOLD
    min_monocytes: int = 3_000
    min_monocytes_fail: int = 500
    saturated_warn: float = 0.005
    saturated_fail: float = 0.05
    bead_range_far_factor: float = 2.0
    wide_interval_pct: float = 25.0
    settings_rel_tol: float = SETTINGS_REL_TOL
    reference_protocol: str = "lyse-wash"
    min_monocytes_gate: int = 50
    monocyte_percent_range: tuple[float, float] = (0.1, 50.0)
    max_nonfinite_fraction: float = 0.05
    time_gate_warn: float = 0.10
    stability_windows: tuple[StabilityWindow, ...] = STABILITY_WINDOWS
    rules: tuple[Rule, ...] = field(default=RULES)

    def severity(self, flag: str) -> Severity:
        """Severity of a flag (``code`` or ``code:detail``); an unknown code warns."""
        return _severity(self.rules, flag)

    def explain(self, flag: str) -> str:
        """The rule behind a flag in words, with this policy's thresholds filled in ("" if unknown)."""
        code = flag.split(":", 1)[0]
        text = next((rule.rule for rule in self.rules if rule.code == code), "")
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if f"`{name}`" in text:
                text = text.replace(f"`{name}`", _shown(value))
        return text

    def with_rules(self, *rules: Rule) -> QCPolicy:
        """A copy with ``rules`` added, or replacing the rules of the same code."""
        codes = {r.code for r in rules}
        return replace(self, rules=tuple(r for r in self.rules if r.code not in codes) + tuple(rules))

    def evaluate(self, flags: Iterable[str]) -> QCOutcome:
        """Sort flags by severity (each kept once, in order)."""
        return _evaluate(self.rules, flags)

    # --- the measurement's checks ------------------------------------------------------------
    def monocyte_flags(self, n_monocytes: int, saturated_fraction: float | None) -> list[str]:
        """``too_few_monocytes``/``few_monocytes`` and the HLA-DR saturation flags."""
        flags = []
        if n_monocytes < self.min_monocytes_fail:
            flags.append(f"too_few_monocytes:{n_monocytes}")
        elif n_monocytes < self.min_monocytes:
            flags.append(f"few_monocytes:{n_monocytes}")
        if saturated_fraction is not None:
            if saturated_fraction > self.saturated_fail:
                flags.append(f"hladr_saturated:{saturated_fraction:.1%}")
            elif saturated_fraction > self.saturated_warn:
                flags.append(f"hladr_some_saturated:{saturated_fraction:.1%}")
        return flags

    def bead_range_flags(self, mfi: float, bead_range: tuple[float, float]) -> list[str]:
        """``outside_bead_range[_far]`` when the monocytes' MFI is outside the fitted bead range.

        Below the dimmest level only warns: the 5,000 threshold lies inside the bead range, so the
        class is not in doubt; far above the brightest level fails."""
        lo, hi = bead_range
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= mfi <= hi:
            return []
        far = mfi > hi * self.bead_range_far_factor
        return [f"outside_bead_range{'_far' if far else ''}:MFI {mfi:,.0f} vs beads {lo:,.0f}-{hi:,.0f}"]

    def settings_flags(
        self,
        bead_settings: Mapping[str, ChannelSettings],
        sample_settings: Mapping[str, ChannelSettings],
        hladr_channel: str,
        gating_channels: Iterable[str],
    ) -> list[str]:
        """Settings the measurement uses that differ between the bead tube and the patient tube.

        ``*_settings`` are ``{channel: ChannelSettings}`` (:attr:`hladr.fcs.Sample.settings`), compared
        by :func:`hladr.fcs.settings_differences`. The HLA-DR detector's voltage or gain failing
        (``voltage_mismatch``/``gain_mismatch``: the bead curve does not apply); a gating channel's only
        warns (``gating_settings_differ``); other channels are not compared.
        """
        flags = []
        channels = [hladr_channel, *gating_channels]
        tol = self.settings_rel_tol
        for d in settings_differences(bead_settings, sample_settings, channels, rel_tol=tol):
            code = f"{d.kind}_mismatch" if d.channel == hladr_channel else "gating_settings_differ"
            flags.append(f"{code}:{d.channel} {d.kind} {d.ours:g} beads vs {d.theirs:g} sample")
        return flags

    def preanalytic_flags(self, pre: PreAnalytics, acquired_at: Any) -> list[str]:
        """The sample's handling against this policy's stability windows and reference protocol
        (:func:`hladr.preanalytics.preanalytic_flags`)."""
        return preanalytic_flags(pre, acquired_at, self.stability_windows, self.reference_protocol)

    def to_dict(self) -> dict[str, Any]:
        """The policy as recorded in ``provenance.qc_policy``: thresholds and ``{code: severity}``."""
        skip = ("rules", "stability_windows")
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in skip}
        out["monocyte_percent_range"] = list(self.monocyte_percent_range)  # its JSON form
        out["stability_windows"] = [asdict(w) for w in self.stability_windows]
        out["severities"] = {r.code: r.severity for r in self.rules}
        return out


def _shown(value: Any) -> str:
    """A threshold in a rule's words: fractions in %, windows as "tube storage: N h"."""
    if isinstance(value, tuple) and all(isinstance(w, StabilityWindow) for w in value):
        return ", ".join(
            f"{w.tube}{' ' + STORAGE_WORDS[w.storage] if w.storage else ''} {w.hours:g} h" for w in value
        )
    if isinstance(value, tuple):
        return "-".join(f"{v:,g}" for v in value)
    if isinstance(value, str):
        return value
    return f"{100 * value:g} %" if isinstance(value, float) and value < 1 else f"{value:,g}"


DEFAULT_POLICY = QCPolicy()


def markdown_table(policy: QCPolicy = DEFAULT_POLICY) -> str:
    """The policy's flags as the Markdown table of ``docs/result.md``."""
    lines = ["| flag | severity | rule |", "|---|---|---|"]
    for rule in policy.rules:
        lines.append(f"| `{rule.code}` | {rule.severity} | {policy.explain(rule.code)} |")
    return "\n".join(lines)
