"""report.html in a real browser: headless Chromium (Debian package ``chromium``, installed by .ci/run).

The page is loaded from disk with a probe script added in front of it (the report itself is not
changed): the probe records every resource that fails to load, every image that did not decode and
every resource fetched at all (the report must fetch nothing), then writes them into the DOM that
``--dump-dom`` prints. The rendered DOM, a screenshot and a PDF print are checked too. Skipped where
Chromium is absent, except in CI, where it must be present.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.conftest import IN_CI

PROBE = """<script>
window.__failed = [];
window.addEventListener("error", e => {
  const t = e.target;
  if (t && t !== window) window.__failed.push(t.currentSrc || t.src || t.href || t.tagName);
}, true);
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const fetched = performance.getEntriesByType("resource").map(r => r.name)
    .filter(n => !n.startsWith("data:"));
  const sheets = Array.from(document.querySelectorAll("section.signout")).map(s => ({
    id: s.id,
    text: s.innerText,
    klass: s.querySelector("td.field-class").innerText,
    image: s.querySelector("img") ? s.querySelector("img").naturalWidth : 0,
  }));
  document.documentElement.setAttribute("data-probe", JSON.stringify({
    failed: window.__failed,
    broken: images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
    fetched: fetched,
    images: images.length,
    sheets: sheets,
    rows: document.querySelectorAll("#results tr").length - 1,
    verdict: document.getElementById("verdict").innerText,
  }));
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    if IN_CI:
        pytest.fail("CI must have Chromium (.ci/run installs the Debian package 'chromium')")
    pytest.skip("Chromium not installed (apt-get install chromium)")


def _run(browser: str, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


def test_report_renders_in_chromium_with_every_resource_loaded(real_batch, tmp_path):  # noqa: F811
    browser = _chromium()
    _, out, _, _, _ = real_batch
    report = out / "report.html"
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("<head>", "<head>" + PROBE, 1))

    dom = _run(browser, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()).stdout
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, "the page's load event did not run"
    state = json.loads(
        found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    )
    assert state["failed"] == [] and state["broken"] == [] and state["fetched"] == []
    assert state["images"] >= 4 + 1 + 1  # four QC figures, the AB/C distribution, one bead curve
    assert state["rows"] == 4 and len(state["sheets"]) == 4
    assert "3 reportable, 1 not reportable" in state["verdict"]
    by_file = {re.search(r"(patient_\w+)\.fcs", s["text"]).group(1): s for s in state["sheets"]}
    scarce = by_file["patient_scarce"]
    assert scarce["klass"].startswith("– (not reportable")
    assert "NO: too_few_monocytes" in scarce["text"] and scarce["image"] > 100
    for name in ("patient_01", "patient_02", "patient_03"):
        sheet = by_file[name]
        assert re.match(r"(IMMUNOPARALYSIS|severe|reduced|normal)", sheet["klass"]), sheet["klass"]
        assert "Reportable\tyes" in sheet["text"] and "expires 2027-01-31" in sheet["text"]
        assert re.search(r"mHLA-DR\t[\d,]+ AB/C", sheet["text"]) and sheet["image"] > 100

    shot = tmp_path / "report.png"
    _run(browser, "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri())
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2400, 1280)
    assert pixels[..., :3].std() > 0.05  # text, tables and figures, not a blank page

    pdf = tmp_path / "report.pdf"
    _run(browser, "--no-pdf-header-footer", f"--print-to-pdf={pdf}", report.as_uri())
    pages = len(re.findall(rb"/Type\s*/Page[^s]", pdf.read_bytes()))
    assert pages >= 4  # each sign-out sheet starts its own printed page (the overview is not printed)
