"""The batch report: one self-contained HTML page a lab reads in the morning.

It consumes what a batch produced (Result dicts, error rows, calibration
records) and never measures anything itself. Figures are drawn with
matplotlib's object API (no pyplot state) and, like each sample's QC figure,
embedded as base64 PNG: the page loads nothing else. Each patient has a
printable sign-out sheet (id, acquisition time, AB/C with its interval,
reportable or not and why, the class, bead lot with kit and expiry, bead tube,
QC figure); a result that is not reportable shows no class.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import html
import math
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .atomic import atomic_write
from .classify import NORMAL_MIN, SEVERE_MAX, THRESHOLD
from .preanalytics import describe_handling
from .reagent import describe_reagent

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px;margin-bottom:1.5em}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0}
tr.immuno td.abc{background:#f8d0d0;font-weight:bold}
tr.not-reportable td{color:#666}
tr.not-reportable td.verdict{background:#fff0b0;color:#222;font-weight:bold}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#176117}.bad{color:#a11}
figure{display:inline-block;margin:0 1em 1em 0}
section.signout{border-top:2px solid #333;margin-top:2em;padding-top:.5em}
section.signout table{font-size:14px}
section.signout img{max-width:100%}
.sign{margin-top:1em;font-size:14px}
@media print{.no-print{display:none}section.signout{page-break-before:always;border:none}}
"""


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


Part = str | Callable[[], str]  # a piece of the HTML, or one whose figure is still being drawn


class _Drawer:
    """Draws the report's figures as base64 PNG. With an ``executor`` (the batch's worker processes)
    every figure is submitted when the HTML asks for it and drawn in parallel while the rest is
    assembled; without one (or should the pool break) it is drawn here when the HTML is joined."""

    def __init__(self, executor: cf.Executor | None = None):
        self.executor = executor

    def __call__(self, draw: Callable[..., bytes], *args: Any) -> Callable[[], str]:
        future = None
        if self.executor is not None:
            try:
                future = self.executor.submit(draw, *args)
            except (cf.process.BrokenProcessPool, RuntimeError):  # broken or shut down: drawn here
                future = None

        def png() -> str:
            data = None
            if future is not None:
                try:
                    data = future.result()
                except cf.process.BrokenProcessPool:
                    data = None
            return base64.b64encode(draw(*args) if data is None else data).decode("ascii")

        return png


def _join(parts: Sequence[Part]) -> str:
    """The HTML of ``parts``, waiting for the figures still being drawn."""
    return "\n".join(part() if callable(part) else part for part in parts)


def _img(alt: str, png: Callable[[], str], figure: bool = False) -> Callable[[], str]:
    """An ``<img>`` (in a ``<figure>`` when asked) of a figure being drawn."""

    def html_of() -> str:
        img = f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{png()}'>"
        return f"<figure>{img}</figure>" if figure else img

    return html_of


def abc_png(results: Sequence[Mapping[str, Any]]) -> bytes:
    """:func:`abc_figure` as PNG (a task the batch's workers can run)."""
    from .plots import png_bytes

    return png_bytes(abc_figure(results), dpi=90)


def bead_png(record: Mapping[str, Any]) -> bytes:
    """:func:`bead_figure` as PNG (a task the batch's workers can run)."""
    from .plots import png_bytes

    return png_bytes(bead_figure(record), dpi=90)


def levey_jennings_png(series: Sequence[Any]) -> bytes:
    """The Levey-Jennings chart of one cytometer's series as PNG (a task the batch's workers can run)."""
    from .plots import _pyplot, plot_levey_jennings, png_bytes

    figure = plot_levey_jennings(list(series))
    try:
        return png_bytes(figure, dpi=90)
    finally:
        _pyplot().close(figure)


def abc_figure(results: Sequence[Mapping[str, Any]]) -> Any:
    """AB/C of every sample on a log axis, with the 5,000 threshold and the published bands."""
    from matplotlib.figure import Figure

    values = [r["abc"] for r in results if isinstance(r.get("abc"), (int, float)) and r["abc"] > 0]
    figure = Figure(figsize=(7, 3.2))
    ax = figure.add_subplot()
    if values:
        import numpy as np

        lo = min(min(values), THRESHOLD) / 1.5
        hi = max(max(values), NORMAL_MIN) * 1.5
        ax.axvspan(lo, THRESHOLD, color="#f4c7c7", label="immunoparalysis")
        ax.axvspan(THRESHOLD, SEVERE_MAX, color="#fbe3c4", label="severe")
        ax.axvspan(SEVERE_MAX, NORMAL_MIN, color="#fdf5cc", label="reduced")
        ax.axvspan(NORMAL_MIN, hi, color="#dcefdc", label="normal")
        bins = np.logspace(math.log10(lo), math.log10(hi), 30)
        ax.hist(values, bins=bins, color="#333", alpha=0.85)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.legend(fontsize=7, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no result", ha="center", va="center", transform=ax.transAxes)
    ax.axvline(THRESHOLD, color="#a11", lw=2)
    ax.text(THRESHOLD, ax.get_ylim()[1] * 0.95, " 5,000 AB/C", color="#a11", va="top", fontsize=8)
    ax.set_xlabel("mHLA-DR (antibodies bound per monocyte)")
    ax.set_ylabel("samples")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    return figure


def bead_figure(record: Mapping[str, Any]) -> Any:
    """One bead tube's standard curve: log10 molecules vs log10 MFI, the fit and the points used."""
    from matplotlib.figure import Figure

    cal = record.get("calibration") or {}
    figure = Figure(figsize=(3.4, 3))
    ax = figure.add_subplot()
    values = cal.get("values") or []
    mfi = cal.get("mfi") or []
    used = set(cal.get("peaks_used") or [])
    points = [(i, m, v) for i, (m, v) in enumerate(zip(mfi, values)) if m and v and m > 0 and v > 0]
    for i, m, v in points:
        ax.plot(m, v, "o", color="#176117" if i in used else "#bbb", ms=6)
    slope, intercept = cal.get("slope"), cal.get("intercept")
    if points and slope is not None and intercept is not None:
        import numpy as np

        xs = np.array([p[1] for p in points])
        grid = np.logspace(math.log10(xs.min()) - 0.3, math.log10(xs.max()) + 0.3, 20)
        ax.plot(grid, 10 ** (slope * np.log10(grid) + intercept), "-", color="#245", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("MFI", fontsize=8)
    ax.set_ylabel("PE molecules per bead", fontsize=8)
    passed = (cal.get("qc") or {}).get("passed")
    r2 = cal.get("r2")
    status = "ok" if passed else "FAILED"
    title = f"{record.get('file', '')}\nslope {_fmt(slope, 3)}  r² {_fmt(r2, 4)}  QC {status}"
    ax.set_title(title, fontsize=7)
    ax.tick_params(labelsize=7)
    figure.tight_layout()
    return figure


def _class(r: Mapping[str, Any]) -> str:
    """The class a lab may report, or why there is none."""
    if not r.get("reportable", False):
        return "NOT REPORTABLE"
    text = str(r.get("band") or "")
    if r.get("immunoparalysis"):
        text = "IMMUNOPARALYSIS (< 5,000)"
    return text + (" – borderline (interval straddles 5,000)" if r.get("borderline") else "")


def _interval(r: Mapping[str, Any]) -> str:
    ci = r.get("abc_ci95") or []
    total = (r.get("uncertainty") or {}).get("total_pct")
    text = f"{_fmt(ci[0])} – {_fmt(ci[1])}" if len(ci) == 2 else "–"
    return text + (f" (±{total:.1f} %)" if isinstance(total, (int, float)) else "")


def _embedded_png(report_dir: Path, relative: str | None) -> str | None:
    """A QC PNG of the run as a data URI (the report is one self-contained file)."""
    if not relative:
        return None
    try:
        data = (report_dir / relative).read_bytes()
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _lot_text(cal: Mapping[str, Any]) -> str:
    details = cal.get("lot_details") or {}
    if details:
        expiry = details.get("expiry")
        expires = f"expires {expiry}" if expiry else "expiry not given in the lot file"
        return f"{details.get('kit')}, lot {details.get('lot')}, {expires}"
    return str(cal.get("lot") or "bead values given on the command line (no lot file)")


def _results_table(results: Sequence[Mapping[str, Any]]) -> str:
    head = (
        "patient",
        "sample",
        "acquired",
        "AB/C",
        "95 % CI",
        "class",
        "< 5,000",
        "borderline",
        "stratification",
        "monocytes",
        "reagent",
        "handling",
        "not reportable because",
        "warnings",
        "file",
        "sign-out",
    )
    rows = []
    for i, r in enumerate(results):
        reportable = bool(r.get("reportable", False))
        qc = r.get("qc") or {}
        css = ("immuno" if r.get("immunoparalysis") else "") if reportable else "not-reportable"
        strat = r.get("stratification") or {}
        yes_no = {True: "yes", False: "no", None: "–"}
        cells = [
            html.escape(str(r.get("patient_id") or "–")),
            html.escape(str(r.get("sample_id") or "–")),
            html.escape(str(r.get("acquired") or "–")),
            f'<td class="num abc">{_fmt(r.get("abc"))}',
            html.escape(_interval(r)),
            f'<td class="verdict">{html.escape(_class(r))}',
            yes_no[r.get("immunoparalysis")],
            yes_no[r.get("borderline")],
            html.escape(f"{strat.get('category', '')}: {strat.get('reason', '')}" if strat else ""),
            f'<td class="num">{_fmt(r.get("monocytes"))}',
            html.escape(describe_reagent(r.get("reagent"))),
            html.escape(describe_handling(r.get("preanalytics"))),
            html.escape("; ".join(map(str, r.get("reasons") or qc.get("flags") or []))),
            html.escape("; ".join(map(str, qc.get("warnings") or []))),
            html.escape(str(r.get("file", ""))),
            f'<a href="#signout-{i + 1}">sheet</a>',
        ]
        tds = "".join(c if c.startswith("<td") else f"<td>{c}" for c in cells)
        rows.append(f'<tr class="{css}">{tds}</tr>')
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table id='results'><tr>{header}</tr>{''.join(rows)}</table>"


def _signout(index: int, r: Mapping[str, Any], report_dir: Path) -> str:
    """One patient's printable sign-out sheet."""
    cal = r.get("calibration") or {}
    inst = r.get("instrument") or {}
    reportable = bool(r.get("reportable", False))
    why = "; ".join(map(str, r.get("reasons") or (r.get("qc") or {}).get("flags") or [])) or "QC failed"
    parts = r.get("uncertainty") or {}
    names = (
        ("sampling", "sampling_pct"),
        ("bead curve", "calibration_pct"),
        ("gate", "gating_pct"),
        ("reagent F/P", "reagent_pct"),
    )
    spread = ", ".join(
        f"{name} ±{parts[key]:.1f} %"
        for name, key in names
        if isinstance(parts.get(key), (int, float)) and (parts[key] or key != "reagent_pct")
    )
    source = r.get("identity_source") or {}
    rows = [
        (
            "Patient",
            f"{r.get('patient_id') or '–'}"
            + (f" (from {source['patient_id']})" if source.get("patient_id") else ""),
        ),
        (
            "Sample",
            f"{r.get('sample_id') or '–'}"
            + (f" (from {source['sample_id']})" if source.get("sample_id") else ""),
        ),
        ("Acquired", str(r.get("acquired") or "–")),
        ("mHLA-DR", f"{_fmt(r.get('abc'))} AB/C"),
        ("95 % interval", _interval(r) + (f"; {spread}" if spread else "")),
        ("Reportable", "yes" if reportable else f"NO: {why}"),
        ("Class", _class(r) if reportable else "– (not reportable: no class is given)"),
        ("Warnings", "; ".join(map(str, (r.get("qc") or {}).get("warnings") or [])) or "none"),
        (
            "Monocytes",
            f"{_fmt(r.get('monocytes'))} ({_fmt(r.get('monocyte_percent'), 1)} % of leukocytes), "
            f"gating {r.get('gate_method', '')}",
        ),
        ("Reagent", describe_reagent(r.get("reagent"))),
        ("Handling", describe_handling(r.get("preanalytics"))),
        ("Bead lot", _lot_text(cal)),
        (
            "Bead tube",
            f"{r.get('bead_file') or cal.get('bead_file') or '–'} "
            f"(slope {_fmt(cal.get('slope'), 3)}, r² {_fmt(cal.get('r2'), 5)})",
        ),
        ("Cytometer", f"{inst.get('cytometer') or '–'} serial {inst.get('serial') or '–'}"),
        ("File", f"{r.get('file') or r.get('sample', '')} (SHA-256 {str(r.get('sha256', ''))[:16]}…)"),
    ]
    body = "".join(
        f"<tr><th>{html.escape(k)}</th><td class='field-{html.escape(k.split()[0].lower())}'>"
        f"{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    image = _embedded_png(report_dir, r.get("qc_png"))
    figure = (
        f"<img alt='QC figure of {html.escape(str(r.get('file', '')))}' src='{image}'>"
        if image
        else "<p>No QC figure (run without --no-plots to draw it).</p>"
    )
    return (
        f"<section class='signout' id='signout-{index}'><h2>Sign-out {index}: "
        f"{html.escape(str(r.get('patient_id') or r.get('file') or ''))}</h2>"
        f"<table>{body}</table>{figure}"
        "<p class='sign'>Reviewed by: ______________________ &nbsp; Date: ____________</p></section>"
    )


def _plain_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], digits: Mapping[str, int] | None = None
) -> str:
    digits = digits or {}
    header = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(_fmt(row.get(c), digits.get(c, 0)))}</td>" for c in columns)
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{header}</tr>{body}</table>"


def render(summary: Any, report_dir: Path, figures: bool = True, executor: cf.Executor | None = None) -> str:
    """The report as one self-contained HTML string (see :func:`write_report`)."""
    from . import __version__

    draw = _Drawer(executor)
    results, errors, calibrations = summary.results, summary.errors, summary.calibrations
    reportable = sum(bool(r.get("reportable")) for r in results)
    parts: list[Part] = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>hladr batch report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<div class='no-print'>",
        "<h1>mHLA-DR batch report</h1>",
        f"<p>{html.escape(summary.line())}<br>hladr {html.escape(__version__)} · "
        f"{datetime.now().astimezone():%Y-%m-%d %H:%M %Z} · immunoparalysis threshold "
        f"{THRESHOLD:,.0f} AB/C · run time to this report {summary.seconds:.1f} s</p>",
        f"<p id='verdict' class='{'ok' if summary.all_reportable else 'bad'}'>"
        f"{summary.ok} result(s): {reportable} reportable, {summary.ok - reportable} not reportable "
        f"(no class given); {summary.failed} failed file(s).</p>",
    ]
    if figures:
        parts.append("<h2>AB/C distribution (reportable results)</h2>")
        shown = [r for r in results if r.get("reportable")]
        parts.append(_img("AB/C distribution", draw(abc_png, shown)))
    parts.append("<h2>Samples</h2>")
    parts.append(_results_table(results) if results else "<p>No sample was analysed.</p>")
    parts.append("<h2>Failed files</h2>")
    parts.append(
        _plain_table(errors, ("file", "role", "stage", "error_type", "reason", "bead_file"))
        if errors
        else "<p>None.</p>"
    )
    parts.append("<h2>Bead curves per run</h2>")
    if figures:
        for record in calibrations:
            if record.get("status") == "ok":
                parts.append(_img("bead curve", draw(bead_png, record), figure=True))
    rows = []
    for record in calibrations:
        cal = record.get("calibration") or {}
        qc = cal.get("qc") or {}
        rows.append(
            {
                "file": record.get("file"),
                "lot": _lot_text(cal) if cal else record.get("lot"),
                "status": record.get("status"),
                "slope": cal.get("slope"),
                "r²": cal.get("r2"),
                "QC flags": "; ".join(map(str, qc.get("flags") or [])) or record.get("reason"),
            }
        )
    parts.append(
        _plain_table(rows, ("file", "lot", "status", "slope", "r²", "QC flags"), {"slope": 4, "r²": 5})
        if rows
        else "<p>No bead tube.</p>"
    )
    parts.extend(_course_and_bead_parts(summary, figures, draw))
    parts.append("</div>")
    parts.append("<h2 class='no-print'>Sign-out sheets (one printed page per patient)</h2>")
    parts.extend(_signout(i + 1, r, report_dir) for i, r in enumerate(results))
    parts.append("</body></html>")
    return _join(parts)


# --- patients over days and beads over months (from the results store) ---------------------------------
def course_and_bead_sections(summary: Any, figures: bool = True, executor: cf.Executor | None = None) -> str:
    """One section per patient of this run (the whole course in the store, rules evaluated) and the
    Levey-Jennings charts with every Westgard violation (``summary.bead_qc``)."""
    return _join(_course_and_bead_parts(summary, figures, _Drawer(executor)))


def _course_and_bead_parts(summary: Any, figures: bool, draw: _Drawer) -> list[Part]:
    from .course import COURSE_RULES_VERSION

    store_path = getattr(summary, "store", None)
    parts: list[Part] = [f"<h2>Patient courses ({html.escape(COURSE_RULES_VERSION)})</h2>"]
    courses = []
    if store_path is not None and summary.results:
        from .store import Store

        with Store(store_path) as store:  # the patients the store files this run's tubes under
            patients = store.patients(r["sha256"] for r in summary.results if r.get("sha256"))
            courses = [store.patient(pid) for pid in patients]
    if not courses:
        parts.append("<p>No patient ids in this run (give a manifest with a patient_id column).</p>")
    for course in courses:
        parts.extend(_course_section(course, figures, draw))
    series = getattr(summary, "bead_qc", None) or []
    parts.append("<h2>Bead QC over time (Levey-Jennings, westgard/1)</h2>")
    if not series:
        parts.append("<p>No bead run in the store.</p>")
        return parts
    if figures:
        for cytometer in dict.fromkeys(s.cytometer for s in series):
            chart = draw(levey_jennings_png, [s for s in series if s.cytometer == cytometer])
            parts.append(_img(f"Levey-Jennings {cytometer}", chart, figure=True))
    rows = [
        {
            "cytometer": s.cytometer,
            "lot": s.lot,
            "quantity": s.quantity,
            "acquired": r.acquired,
            "bead tube": r.file,
            "z": f"{r.z:+.2f}",
            "rules": ", ".join(r.violations),
        }
        for s in series
        for r in s.runs
        if r.violations
    ]
    notes = sorted({f"{s.cytometer} lot {s.lot}: {s.note}" for s in series if s.note})
    parts.append(
        _plain_table(rows, ("cytometer", "lot", "quantity", "acquired", "bead tube", "z", "rules"))
        if rows
        else "<p>No Westgard violation.</p>"
    )
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    return parts


def _course_section(course: Any, figures: bool, draw: _Drawer) -> list[Part]:
    parts: list[Part] = [f"<h3>Patient {html.escape(course.patient_id)}</h3>"]
    if figures and len(course.points) > 1:  # a course is drawn from two results on: one is its table row
        from .plots import course_png

        parts.append(_img(f"course of {course.patient_id}", draw(course_png, course)))
    rows = []
    for p in course.points:
        lo, hi = (list(p.abc_ci95) + [None, None])[:2]
        why = "; ".join(p.bead_flags) or "QC"
        interval = f"{_fmt(lo)} – {_fmt(hi)}"
        rows.append(
            {
                "collected": (p.collected_at or "")[:16],
                "AB/C": p.abc,
                "95 % CI": interval,
                "reportable": "yes" if p.reportable else f"NO ({why})",
                "rules": ", ".join(p.rules),
                "file": p.file,
            }
        )
    parts.append(_plain_table(rows, ("collected", "AB/C", "95 % CI", "reportable", "rules", "file")))
    return parts


def write_report(
    path: str | os.PathLike,
    summary: Any,
    figures: bool = True,
    executor: cf.Executor | None = None,
    drawn: Callable[[], None] | None = None,
) -> Path:
    """Write ``report.html`` atomically.

    Parameters
    ----------
    path
        Where to write; the run's QC PNGs (paths relative to its folder) are embedded.
    summary
        A :class:`hladr.batch.BatchSummary` (results, errors, calibrations, counts).
    figures
        Draw the AB/C distribution, the bead curves, the patients' courses and the Levey-Jennings charts.
    executor
        Worker processes that draw the figures in parallel (the batch's pool); default: drawn here.
    drawn
        Called once every figure is drawn, before the file is written (the batch's workers then exit
        while it is written).
    """
    path = Path(path)
    html = render(summary, path.parent, figures, executor)
    if drawn is not None:
        drawn()
    return atomic_write(path, html, parents=True)
