"""A crash and a restart from the last retained checkpoint give the outputs of an
uninterrupted run: every slice exactly once, the same enriched decisions."""

import json

import pandas as pd
import pytest

from conftest import announce, crash_and_restart, hold_manifests, read_slices
from test_job import cfg_for

pytestmark = pytest.mark.slow


def slice_stats(data):
    return sorted((data / "stats").glob("slice-*.json")) if (data / "stats").exists() else []


def test_crash_and_restart_from_checkpoint(tmp_path):
    from tools.simulate import simulate
    from udfs.features import FeatureEngine

    sim = tmp_path / "sim"
    simulate(sim, events=16_000, users=1_000, campaigns=4, days=1.0, slice_lines=2_000,
             manifest_every=1, seed=8)
    files = hold_manifests(sim, tmp_path / "held")
    half = len(files) // 2
    data = tmp_path / "run"

    crash_and_restart(["jobs.features", "--input", str(sim), "--data-dir", str(data)], data, "checkpoints",
                      files[:half], files[half:], sim / "manifest",
                      ready=lambda: len(slice_stats(data)) >= half,
                      done=lambda: len(slice_stats(data)) >= len(files),
                      env={"STREAMLIFT_FEATURES__SNAPSHOT_EVERY": "2"}, settle=3)    # nothing more may come

    # the uninterrupted reference: the engine over every slice, no end of input
    cfg = cfg_for(data)
    eng = FeatureEngine(**{**cfg.engine_params(), "snapshot_every": 2})
    expected = []
    for s in read_slices(sim):
        expected += [o.enriched for o in eng.offer(s.seq, s.batches, s.lines, s.quarantined)
                     if o.enriched is not None]
    expected = pd.concat(expected, ignore_index=True).sort_values("decision_id", ignore_index=True)
    from jobs.sinks import read_enriched, summarize

    got = read_enriched(cfg).sort_values("decision_id", ignore_index=True)
    assert got["decision_id"].is_unique
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-9)
    s = summarize(cfg)
    assert s["slices"] == len(files)
    # the second run did restore the engine from the checkpoint's state (a fresh engine
    # starts from empty state and records nothing here)
    restored = [json.loads(f.read_text())["timing"].get("restored_from_seq") for f in slice_stats(data)]
    assert any(r is not None for r in restored), restored
    assert s["events_in"] == s["processed"] + s["quarantined"] + s["pending"]


def test_a_gap_in_slice_numbers_alerts_on_an_idle_stream(tmp_path):
    """A --follow run is handed slices 0 and 2 and then nothing: slice 2 waits for 1, and once the
    gap is ``limits.gap_alert_after`` (2 s here) old the alert is written by a processing-time
    timer, with no later slice to trigger it; slice 2 is held, not processed."""
    import os
    import subprocess
    import sys
    import time

    from tools.simulate import simulate

    sim = tmp_path / "sim"
    simulate(sim, events=3_000, users=300, campaigns=2, days=0.2, slice_lines=1_000, manifest_every=1, seed=4)
    files = hold_manifests(sim, tmp_path / "held")
    lines = [l for f in files for l in f.read_text().splitlines() if l]
    gap = tmp_path / "slices-gap.jsonl"
    gap.write_text(lines[0] + "\n" + lines[2] + "\n")
    data = tmp_path / "run"
    env = {**os.environ, "STREAMLIFT_LIMITS__GAP_ALERT_AFTER": "2s"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.features", "--input", str(sim), "--data-dir", str(data),
                             "--follow"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        announce(sim / "manifest", gap)
        alert = data / "alerts" / "seq-gap-1.json"
        deadline = time.time() + 120
        while not alert.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert alert.exists(), proc.stderr.read()[-3000:] if proc.poll() is not None else "no alert"
        body = json.loads(alert.read_text())
        assert body["seq"] == 1 and body["waiting"] == [2] and body["seconds"] >= 2
        assert [json.loads(f.read_text())["seq"] for f in slice_stats(data)] == [0]
    finally:
        proc.kill()
        proc.wait()
