"""--follow: the job keeps monitoring manifest/ and takes slices as they are announced."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import announce, hold_manifests
from test_job import cfg_for

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_follow_takes_slices_as_they_arrive(tmp_path):
    from tools.simulate import simulate
    from jobs.sinks import summarize

    sim = tmp_path / "sim"
    truth = simulate(sim, events=12_000, users=1_000, campaigns=4, days=1.0, slice_lines=2_000,
                     manifest_every=2, seed=5)
    files = hold_manifests(sim, tmp_path / "held")
    data = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.features", "--input", str(sim),
                             "--data-dir", str(data), "--follow"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        cfg = cfg_for(data)
        for f in files:                      # announce a manifest file every 2 s
            announce(sim / "manifest", f)
            time.sleep(2)
        deadline = time.time() + 120
        s = None
        while time.time() < deadline:
            if (data / "stats").exists():
                s = summarize(cfg)
                if s["slices"] == truth["slices"]:
                    break
            time.sleep(1)
        assert s is not None and s["slices"] == truth["slices"], s
        assert s["events_in"] == truth["lines_total"]
        # the stream has not ended: the newest events wait behind the watermark
        assert s["pending"] > 0
        assert s["events_in"] == s["processed"] + s["quarantined"] + s["pending"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
