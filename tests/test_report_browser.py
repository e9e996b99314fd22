"""The study report in a real browser: headless Chromium renders report.html offline, and the rendered
page must hold the tables and figures (images decoded, SVG laid out) with no console message.

Chromium is Debian's ``chromium`` package (``make setup`` installs it where apt-get exists); without
it these tests are skipped, saying so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gatelab.study import load_study, sweep, write_report

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="headless Chromium is not installed (apt-get install chromium; "
                                                          "make setup does it where apt-get exists)")

# Appended to a copy of the page: once everything has loaded, it writes what rendered into <body>'s
# attributes, which --dump-dom then shows. The report itself has no script.
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const svgs = [...document.querySelectorAll("figure svg")];
  const b = document.body;
  b.setAttribute("data-images", imgs.length);
  b.setAttribute("data-broken-images", imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length);
  b.setAttribute("data-svgs", svgs.length);
  b.setAttribute("data-empty-svgs", svgs.filter(s => !(s.getBBox().width > 0 && s.getBBox().height > 0)).length);
  b.setAttribute("data-table-rows", [...document.querySelectorAll("table tbody tr")].length);
  b.setAttribute("data-probe", "done");
});
</script>"""


def render(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """The DOM after load and the console messages of ``page`` (with the probe appended)."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    profile = tmp_path / "chromium-profile"
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
           "--dump-dom", probed.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def attributes(dom: str) -> dict[str, str]:
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))


def test_the_harness_sees_console_errors_and_broken_images(tmp_path):
    page = tmp_path / "control.html"
    page.write_text('<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA">'
                    '<script>console.error("control message")</script></body></html>')
    dom, console = render(page, tmp_path)
    assert any("control message" in line for line in console)
    assert attributes(dom)["broken-images"] == "1"


def test_the_report_renders_its_tables_and_figures_offline(tmp_path):
    (tmp_path / "tiny.toml").write_text("""
name = "tiny"
[task]
name = "adding"
length = 6
n_train = 64
n_val = 32
n_test = 32
[model]
hidden_sizes = [6]
[train]
steps = 12
batch_size = 16
eval_every = 4
lr = 1e-2
threads = 1
""")
    study = tmp_path / "study.toml"
    study.write_text('name = "browser"\nbase = "tiny.toml"\nseeds = [0, 1]\n[axes]\n"model.cell" = ["gru", "lstm"]\n')
    out = tmp_path / "out"
    sweep(load_study(study), out, workers=1, quiet=True)
    page = write_report(out)["html"]
    dom, console = render(page, tmp_path)
    assert console == [], console  # the page has no script: any console message is an error or a failed load
    seen = attributes(dom)
    assert seen["probe"] == "done"
    assert seen["images"] == "1" and seen["broken-images"] == "0"  # the gradient-flow PNG decoded
    assert seen["svgs"] == "1" and seen["empty-svgs"] == "0"  # the learning curves laid out
    assert int(seen["table-rows"]) == 2 + 1  # two configurations, and one paired comparison
    assert "lstm" in dom and "gru" in dom and "± " in dom and "Learning curves" in dom and "Gradient flow" in dom
