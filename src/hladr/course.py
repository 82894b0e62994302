"""A patient's mHLA-DR course over days, and the named rules read on it.

mHLA-DR is read clinically as a course: immunoparalysis below 5,000 AB/C (ImmunoSep), < 8,000 on
two consecutive days (GM-CSF trial inclusion), recovery above 15,000, and a rise or fall larger than
the combined uncertainty of two results. The rules are data (:data:`COURSE_RULES`) with a version
(:data:`COURSE_RULES_VERSION`), like :func:`hladr.stratify`'s rule; only reportable results take part.

A result's uncertainty is its 95 % interval (``abc_ci95``: the sampling of its monocytes) combined,
on the log scale, with the between-run reproducibility of the assay (:data:`RUN_CV`: a new bead tube,
a new stain each day). Two results differ when ``|ln a2 - ln a1| > 1.96 * sqrt(u1^2 + u2^2)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import Any

from .classify import NORMAL_MIN, SEVERE_MAX, THRESHOLD

COURSE_RULES_VERSION = "course/1"
#: Between-run coefficient of variation of one laboratory's AB/C (same instrument, new tubes each day).
RUN_CV = 0.05
Z95 = 1.959964


@dataclass(frozen=True)
class CourseRule:
    """One named rule on a course.

    ``kind`` is ``"below"`` (value < ``limit`` on ``days`` consecutive calendar days, firing on the
    last of them), ``"recovery"`` (value > ``limit`` after an earlier value at or below it) or
    ``"change"`` (the difference from the previous reportable value exceeds the combined uncertainty).
    """

    name: str
    kind: str
    description: str
    limit: float | None = None
    days: int = 1


COURSE_RULES: tuple[CourseRule, ...] = (
    CourseRule("immunoparalysis", "below", f"AB/C < {THRESHOLD:,.0f} (ImmunoSep)", THRESHOLD),
    CourseRule(
        "low_two_days",
        "below",
        f"AB/C < {SEVERE_MAX:,.0f} on two consecutive days (GM-CSF trial inclusion)",
        SEVERE_MAX,
        days=2,
    ),
    CourseRule("recovery", "recovery", f"AB/C > {NORMAL_MIN:,.0f} after a value at or below it", NORMAL_MIN),
    CourseRule(
        "significant_change",
        "change",
        "change larger than the combined uncertainty of the two "
        f"results (95 % intervals and a {RUN_CV:.0%} between-run CV)",
    ),
)


@dataclass
class CoursePoint:
    """One result of the course."""

    collected_at: str | None
    day: date | None
    abc: float | None
    abc_ci95: list[float | None]
    reportable: bool
    file: str | None
    result_id: int | None = None
    bead_flags: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    change: float | None = None  # relative change from the previous reportable value, when significant

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["day"] = self.day.isoformat() if self.day else None
        return out


@dataclass
class Course:
    """A patient's results in time order with the rules that fired on each."""

    patient_id: str
    points: list[CoursePoint]
    rules_version: str = COURSE_RULES_VERSION

    def fired(self, rule: str) -> list[date]:
        """Days on which ``rule`` fired."""
        return [p.day for p in self.points if rule in p.rules and p.day is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "hladr.course/1",
            "patient_id": self.patient_id,
            "rules_version": self.rules_version,
            "rules": [asdict(r) for r in COURSE_RULES],
            "points": [p.to_dict() for p in self.points],
        }


def _day(stamp: str | None) -> date | None:
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp).date()
    except ValueError:
        return None


def log_uncertainty(abc: float, ci95: Sequence[float | None]) -> float:
    """Standard uncertainty of ln(AB/C): the 95 % interval's half-width with the between-run CV."""
    lo, hi = (ci95 or [None, None])[:2] if len(ci95 or []) >= 2 else (None, None)
    sampling = (math.log(hi) - math.log(lo)) / (2 * Z95) if lo and hi and lo > 0 and hi > 0 else 0.0
    return math.hypot(sampling, math.log1p(RUN_CV))


def differs(a: CoursePoint, b: CoursePoint) -> bool:
    """True when two results differ by more than their combined 95 % uncertainty."""
    if not (a.abc and b.abc and a.abc > 0 and b.abc > 0):
        return False
    combined = math.hypot(log_uncertainty(a.abc, a.abc_ci95), log_uncertainty(b.abc, b.abc_ci95))
    return abs(math.log(b.abc) - math.log(a.abc)) > Z95 * combined


def evaluate(points: list[CoursePoint], rules: Sequence[CourseRule] = COURSE_RULES) -> None:
    """Set each point's ``rules`` (names of the rules that fired on it), in place."""
    usable = [p for p in points if p.reportable and p.abc is not None and math.isfinite(p.abc)]
    for rule in rules:
        for i, point in enumerate(usable):
            if _fires(rule, usable, i):
                point.rules.append(rule.name)
                if rule.kind == "change":
                    point.change = point.abc / usable[i - 1].abc - 1.0


def _fires(rule: CourseRule, usable: list[CoursePoint], i: int) -> bool:
    point = usable[i]
    if rule.kind == "below":
        if not point.abc < rule.limit:
            return False
        # the last `days` reportable values are all below, on consecutive calendar days
        window = usable[max(0, i - rule.days + 1) : i + 1]
        if len(window) < rule.days or any(not p.abc < rule.limit for p in window):
            return False
        days = [p.day for p in window]
        return rule.days == 1 or (
            None not in days and all((later - earlier).days == 1 for earlier, later in zip(days, days[1:]))
        )
    if rule.kind == "recovery":
        return point.abc > rule.limit and i > 0 and usable[i - 1].abc <= rule.limit
    if rule.kind == "change":
        return i > 0 and differs(usable[i - 1], point)
    raise ValueError(f"unknown course rule kind {rule.kind!r}")


def build_course(patient_id: str, results: Sequence[Mapping[str, Any]]) -> Course:
    """A :class:`Course` from stored results (:meth:`hladr.Store.results`), rules evaluated."""
    points = []
    for res in results:
        meta = res.get("store") or {}
        bead_flags = list(meta.get("bead_flags") or [])
        points.append(
            CoursePoint(
                collected_at=meta.get("collected_at"),
                day=_day(meta.get("collected_at")),
                abc=res.get("abc"),
                abc_ci95=list(res.get("abc_ci95") or [None, None]),
                reportable=bool(meta.get("reportable")) and not bead_flags,
                file=meta.get("file") or res.get("file") or res.get("sample"),
                result_id=meta.get("id"),
                bead_flags=bead_flags,
            )
        )
    points.sort(key=lambda p: (p.collected_at or "", p.result_id or 0))
    evaluate(points)
    return Course(patient_id, points)
