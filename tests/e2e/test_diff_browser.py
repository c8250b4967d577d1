"""The HTML report of vsopt diff in a real headless browser (Debian's chromium): it loads without
a console message or script error, its script runs, and the sites are shown.

Skipped, with the reason, only where no chromium is installed (CI installs it in .ci/run)."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

_spec = importlib.util.spec_from_file_location("_debug_cases", Path(__file__).parents[1] / "test_debug.py")
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)


def load_in_chromium(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """(the DOM after scripts ran, the console messages) of a page loaded in headless chromium."""
    profile = tmp_path / f"profile-{page.stem}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=2000", "--dump-dom", page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


def test_report_page_loads_cleanly_and_shows_the_sites(tmp_path):
    report = cases.make_report({"blocks.1": 8.0})
    page = report.write_html(tmp_path / "diff.html")
    dom, console = load_in_chromium(page, tmp_path)
    assert console == []
    assert 'data-ready="1"' in dom  # the script ran to its end
    assert 'id="js-errors"' not in dom
    assert re.search(r'id="site-count"[^>]*>4 sites<', dom)
    listed = re.findall(r'<li class="site-[a-z]+" data-site="([^"]+)"', dom)
    assert listed == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert 'id="error-plot"' in dom and "Error enters at" in dom


def test_the_check_catches_a_broken_page(tmp_path):
    """The same check on a page whose script throws: the error is seen (so the test above can fail)."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>noSuchFunction();</script></body></html>")
    _, console = load_in_chromium(bad, tmp_path)
    assert any("noSuchFunction" in line for line in console)
