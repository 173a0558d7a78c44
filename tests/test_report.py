"""The report (issue 14, part 3): one self-contained HTML page, opened in a real headless Chromium
(Debian's, installed by `make test`): every plot rendered, no script error, a screenshot saved."""

import json
import re
import shutil
import subprocess

import pytest


def open_in_chromium(page, screenshot=None) -> dict:
    """Load ``page`` in headless Chromium; returns the page's own check (``data-plots``: images
    rendered / images, ``data-errors``: script and console errors) from the DOM after load."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed (make test installs Debian's chromium)"
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(base + ["--dump-dom", page.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', body))
    if screenshot is not None:
        subprocess.run(base + ["--window-size=1100,4200", f"--screenshot={screenshot}", page.resolve().as_uri()],
                       capture_output=True, timeout=120, check=True)
    return {"plots": attrs.get("plots"), "errors": json.loads(attrs.get("errors", "null").replace("&quot;", '"'))}


def test_a_run_without_tables_still_gives_a_page_with_every_plot_placeholder(tmp_path):
    from tools.report import build_report
    from test_job import cfg_for

    page = build_report(cfg_for(tmp_path / "empty"))
    text = page.read_text()
    assert text.count("<img") == 10 and text.count("data-empty=") == 10
    got = open_in_chromium(page)
    assert got == {"plots": "10/10", "errors": []}, got


@pytest.mark.slow
def test_report_of_a_real_run_renders_every_plot_in_chromium(tmp_path):
    """Features, outcomes and learner jobs on a small stream, then the report: ten plots, each
    from the run's data (none of the placeholders), rendered with no errors; screenshot kept."""
    from jobs.features import run as run_features
    from jobs.learner import run as run_learner
    from jobs.outcomes import run as run_outcomes
    from tools.report import main
    from tools.simulate import simulate
    from test_job import cfg_for

    sim = tmp_path / "sim"
    simulate(sim, events=30_000, users=1_500, campaigns=4, days=9.0, slice_lines=3_000, seed=5)
    cfg = cfg_for(tmp_path / "run")
    run_features(cfg, sim)
    run_outcomes(cfg)
    run_learner(cfg)
    from jobs.dq import validate

    validate(cfg, docs=False)
    page = tmp_path / "report.html"
    assert main(["--data-dir", str(cfg.data_dir), "--out", str(page)]) == 0
    text = page.read_text()
    assert text.count("<img") == 10 and "data-empty=" not in text, re.findall(r'data-empty="[^"]*"', text)
    shot = tmp_path / "report.png"
    got = open_in_chromium(page, shot)
    assert got == {"plots": "10/10", "errors": []}, got
    assert shot.stat().st_size > 50_000
