"""Submission to a real standalone Flink cluster (bin/start-cluster.sh, bin/flink run -py)."""

import json
import urllib.request

import pytest

from test_job import assert_online_equals_reference, cfg_for, reference_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    from jobs import cluster as c

    if c.rest_ready():
        pytest.fail("a Flink cluster is already running on localhost:8081; stop it first (make cluster-down)")
    c.up()
    yield c
    c.down()


def test_submitted_job_writes_the_same_features(cluster, small_sim, tmp_path):
    from jobs.sinks import summarize

    result = cluster.submit("features", str(small_sim), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Job has been submitted" in result.stdout
    with urllib.request.urlopen(cluster.REST + "/jobs/overview", timeout=5) as r:
        jobs = json.load(r)["jobs"]
    assert [j["state"] for j in jobs if j["name"] == "streamlift-features"] == ["FINISHED"]

    cfg = cfg_for(tmp_path)
    s = summarize(cfg)
    truth = json.loads((small_sim / "truth" / "summary.json").read_text())
    assert s["events_in"] == truth["lines_total"] and s["reconciles"] and s["pending"] == 0
    ref, _, _ = reference_of(small_sim)
    assert_online_equals_reference(cfg, ref)


def test_submitted_outcomes_job_commits_every_decision_once(cluster, small_sim, tmp_path):
    """The features job, then the outcomes job on its hand-off, both with `flink run -py`."""
    from jobs.analyst import read_table
    from jobs.sinks import summarize

    feats = tmp_path / "features"
    assert cluster.submit("features", str(small_sim), str(feats)).returncode == 0
    result = cluster.submit("outcomes", str(feats), str(tmp_path / "outcomes"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = read_table(cfg_for(tmp_path / "outcomes"), "outcome")
    s = summarize(cfg_for(feats))
    assert out.decision_id.is_unique and len(out) == s["processed_by_stream"]["decision"]
    assert int(out.conversions.sum()) == s["processed_by_stream"]["conversion"]
