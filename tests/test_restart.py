"""A crash and a restart from the last retained checkpoint give the outputs of an
uninterrupted run: every slice exactly once, the same enriched decisions."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import announce, completed_checkpoints, hold_manifests, read_slices, wait_for, \
    wait_for_newer_checkpoint
from test_job import cfg_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def start(sim, data, *extra):
    return subprocess.Popen([sys.executable, "-m", "jobs.features", "--input", str(sim), "--data-dir",
                             str(data), "--follow", *extra], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "STREAMLIFT_FEATURES__SNAPSHOT_EVERY": "2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def slice_stats(data):
    return sorted((data / "stats").glob("slice-*.json")) if (data / "stats").exists() else []


def test_crash_and_restart_from_checkpoint(tmp_path):
    from jobs.simulate import simulate
    from udfs.features import FeatureEngine

    sim = tmp_path / "sim"
    simulate(sim, events=16_000, users=1_000, campaigns=4, days=1.0, slice_lines=2_000,
             manifest_every=1, seed=8)
    files = hold_manifests(sim, tmp_path / "held")
    half = len(files) // 2
    data = tmp_path / "run"

    for f in files[:half]:
        announce(sim, f)
    proc = start(sim, data)
    try:
        wait_for(lambda: len(slice_stats(data)) >= half)
        wait_for_newer_checkpoint(data)                                           # one after the first half
    finally:
        os.killpg(proc.pid, signal.SIGKILL)                                       # crash
        proc.wait(timeout=30)
    checkpoint = completed_checkpoints(data)[-1]

    for f in files[half:]:
        announce(sim, f)
    proc = start(sim, data, "--from-checkpoint", str(checkpoint))
    try:
        wait_for(lambda: len(slice_stats(data)) >= len(files))
        time.sleep(3)          # nothing more may come
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

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
    import json

    restored = [json.loads(f.read_text())["timing"].get("restored_from_seq") for f in slice_stats(data)]
    assert any(r is not None for r in restored), restored
    assert s["events_in"] == s["processed"] + s["quarantined"] + s["pending"]
