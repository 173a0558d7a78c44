"""A crash and a restart from the last retained checkpoint give the outputs of an
uninterrupted run: every slice exactly once, the same enriched decisions."""

import json

import pandas as pd
import pytest

from conftest import crash_and_restart, hold_manifests, read_slices
from test_job import cfg_for

pytestmark = pytest.mark.slow


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
