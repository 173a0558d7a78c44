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
