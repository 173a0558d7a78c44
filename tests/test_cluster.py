"""Submission to a real standalone Flink cluster (bin/start-cluster.sh, bin/flink run -py) with
two TaskManagers of one task slot each: the features job at -p 2 runs one shard per TaskManager."""

import json
import urllib.request

import pandas as pd
import pytest

from outputs import assert_same_feature_outputs
from test_job import assert_online_equals_reference, cfg_for, reference_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    from tools import cluster as c

    if c.rest_ready():
        pytest.fail("a Flink cluster is already running on localhost:8081; stop it first (make cluster-down)")
    ov = c.up(taskmanagers=2, slots=1)
    assert ov["taskmanagers"] == 2 and ov["slots-total"] == 2, ov
    yield c
    c.down()


def test_submitted_job_writes_the_same_features(cluster, small_sim, tmp_path):
    from jobs.sinks import summarize

    result = cluster.submit("features", str(small_sim), str(tmp_path), parallelism=2)
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


@pytest.fixture(scope="module")
def submitted_features(cluster, small_sim, tmp_path_factory):
    """The features job's output (hand-off included), submitted with `flink run -p 2 -py`."""
    feats = tmp_path_factory.mktemp("cluster-features")
    result = cluster.submit("features", str(small_sim), str(feats), parallelism=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return feats


def test_parallelism_1_and_2_on_two_taskmanagers_give_identical_outputs(cluster, small_sim, submitted_features,
                                                                         tmp_path):
    """The same job at -p 1 (one TaskManager's slot) and -p 2 (a shard on each TaskManager):
    the same files, and the same as the local mini-cluster's run."""
    import json as _json

    one = tmp_path / "p1"
    result = cluster.submit("features", str(small_sim), str(one), parallelism=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert assert_same_feature_outputs(one, submitted_features) > 50
    # at -p 2 each shard ran on its own subtask, i.e. its own TaskManager here
    subtasks = {}
    for f in (submitted_features / "stats").glob("slice-*.json"):
        for k, v in _json.loads(f.read_text())["timing"].items():
            if "_subtask:" in k:
                subtasks.setdefault(k, set()).add(v)
    assert subtasks["attribution_subtask:1"] == {1} and subtasks["accumulate_subtask:0"] == {0}


def test_submitted_outcomes_job_commits_every_decision_once(cluster, submitted_features, tmp_path):
    """The outcomes job on the features job's hand-off, both with `flink run -py`."""
    from tools.analyst import read_table
    from jobs.sinks import summarize

    from test_outcomes_job import epoch_history, table_snapshot

    feats = submitted_features
    result = cluster.submit("outcomes", str(feats), str(tmp_path / "outcomes"), parallelism=2)
    assert result.returncode == 0, result.stderr[-3000:]
    out = read_table(cfg_for(tmp_path / "outcomes"), "outcome")
    s = summarize(cfg_for(feats))
    assert out.decision_id.is_unique and len(out) == s["processed_by_stream"]["decision"]
    assert int(out.conversions.sum()) == s["processed_by_stream"]["conversion"]
    # at -p 1 (one TaskManager's slot) the same tables, row for row, and the same commits
    result = cluster.submit("outcomes", str(feats), str(tmp_path / "outcomes-p1"), parallelism=1)
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = cfg_for(tmp_path / "outcomes"), cfg_for(tmp_path / "outcomes-p1")
    a, b = table_snapshot(two), table_snapshot(one)
    for k in a:
        pd.testing.assert_frame_equal(a[k], b[k], check_exact=True, obj=k)
    assert epoch_history(two) == epoch_history(one)


def test_submitted_learner_job_trains_the_model_of_the_learner_in_process(cluster, submitted_features, tmp_path):
    """The learner job on the same hand-off with `flink run -py`: its snapshots are in the model
    store and Iceberg, and its last model is, digest for digest, the OnlineLearner run here in
    process over the same slices (training is deterministic)."""
    from tools.analyst import read_table
    from tools.evaluate import learn_all
    from serving.serve import list_versions, load_model
    from udfs.ingest import handoff_lines, read_handoff
    from udfs.learners import OnlineLearner

    run_dir = tmp_path / "learner"
    result = cluster.submit("learner", str(submitted_features), str(run_dir), parallelism=2)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = cfg_for(run_dir)
    versions = list_versions(cfg.model_store, cfg.learner["model_id"])
    assert len(versions) >= 2
    assert sorted(read_table(cfg, "learner_metrics").version) == [m["version"] for m in versions]
    lrn = OnlineLearner(**cfg.learner_params())
    learn_all(lrn, (read_handoff(line) for line in handoff_lines(submitted_features)))
    last = load_model(cfg.model_store, cfg.learner["model_id"], versions[-1]["version"])
    assert lrn.version == versions[-1]["version"]
    assert last.bundle.digest() == lrn.state_digest()


def test_job_metrics_in_the_rest_api(cluster, small_sim, tmp_path):
    """The jobs' own metrics (PyFlink metric groups, jobs.flink_env.JobMetrics) as the web UI
    and REST API show them, while the jobs run (--follow): the features job's counters equal
    its per-slice statistics, quarantine per reason included; the outcomes job's epochs, rows and
    epoch lag; freshness gauges."""
    from conftest import wait_for
    from jobs.sinks import summarize
    from udfs.ingest import manifest_lines

    feats = tmp_path / "features"
    proc = cluster.submit("features", str(small_sim), str(feats), parallelism=2, extra=["--follow"], wait=False)
    try:
        n_slices = len(manifest_lines(small_sim))
        wait_for(lambda: len(list((feats / "stats").glob("slice-*.json"))) == n_slices, timeout=300,
                 what="the features job did not write every slice")
        online_every = int(cfg_for(feats).features["online_every"])      # each writer writes every 4th slice
        writes = 2 * (n_slices // online_every)

        def settled():
            # Flink's metric fetcher refreshes every few seconds, and the Feast writers finish a
            # slice's online rows after its stats: read both until they agree
            s = summarize(cfg_for(feats))
            m = cluster.job_metrics("streamlift-features")
            merge, online = m.get("merge-write", {}), m.get("feast-online", {})
            done = merge.get("events_in") == s["events_in"] and merge.get("slices") == n_slices and \
                len(list((feats / "stats").glob("online-*.json"))) == writes and \
                online.get("online_rows") == sum(s["feature_rows_online"].values())
            return (m, s) if done else None

        m, s = wait_for(settled, timeout=120, every=2, what="metrics did not reach the slices' totals")
        merge = m["merge-write"]
        assert merge["events_processed"] == s["processed"]
        assert merge["quarantined"] == s["quarantined"] > 0
        by_reason = {k.split(".")[1]: v for k, v in merge.items() if k.startswith("reason.")}
        assert by_reason == {k: float(v) for k, v in s["quarantined_by_reason"].items()}, (by_reason, s)
        gauges = cluster.job_metrics("streamlift-features", agg="max")
        assert gauges["merge-write"]["last_slice_seq"] == n_slices - 1
        assert m["feast-online"]["online_rows"] == sum(s["feature_rows_online"].values()) > 0
        assert 0 < gauges["feast-online"]["freshness_p50_ms"] <= gauges["feast-online"]["freshness_p99_ms"]
    finally:
        cluster.cancel("streamlift-features")
        proc.communicate(timeout=60)

    outs = tmp_path / "outcomes"
    proc = cluster.submit("outcomes", str(feats), str(outs), parallelism=2, extra=["--follow"], wait=False)
    try:
        wait_for(lambda: len(list((outs / "outcomes").glob("epoch-*.json"))) >= 2, timeout=300,
                 what="the outcomes job committed no epochs")
        epochs = lambda: len(list((outs / "outcomes").glob("epoch-*.json")))     # noqa: E731
        m = wait_for(lambda: (lambda m: m if m.get("epoch-quality", {}).get("epochs_committed") == epochs()
                              and "epoch_lag_ms" in m.get("outcome-shard", {}) else None)(
            cluster.job_metrics("streamlift-outcomes")), timeout=90, every=2, what="no outcomes metrics")
        assert m["epoch-quality"]["rows_committed"] > 0
        # each shard's event time ahead of its last cut epoch: under a commit interval (1 day)
        lag = cluster.job_metrics("streamlift-outcomes", agg="list")["outcome-shard"]["epoch_lag_ms"]
        assert len(lag) == 2 and all(0 <= x < 86_400_000 for x in lag), lag
    finally:
        cluster.cancel("streamlift-outcomes")
        proc.communicate(timeout=60)


def test_kafka_consumer_lag_per_partition_in_the_cluster_metrics(cluster, small_sim, kafka_broker, tmp_path,
                                                                  monkeypatch):
    """The features job submitted on Kafka (unbounded): `streamlift cluster metrics` gives each
    partition's lag from the connector's offset gauges and the broker's end offsets; once the
    job has taken every record the lag is 0 and its positions are the end offsets."""
    from conftest import kafka_env, wait_for
    from jobs.config import load
    from jobs.sinks import summarize
    from tools.produce import create_topics, replay

    env = kafka_env(kafka_broker, "t-lag.", tmp_path / "unused", kafka__batch_interval="1h")
    for k, v in env.items():
        if k != "STREAMLIFT_PATHS__DATA_DIR":
            monkeypatch.setenv(k, v)
    cfg = load()
    create_topics(cfg)
    before = cluster.kafka_lag("streamlift-features-none", kafka_broker)
    sent = replay(cfg, small_sim)["records"]
    data = tmp_path / "features"
    proc = cluster.submit("features", None, str(data), parallelism=2, wait=False,
                          extra=["--bootstrap-servers", kafka_broker, "--until", "never"])
    try:
        def caught_up():
            lag = cluster.kafka_lag("streamlift-features", kafka_broker)
            return lag if lag["position"] and lag["lag_total"] == 0 else None

        lag = wait_for(caught_up, timeout=300, every=2, what="the job's lag did not reach 0")
        assert before["lag_total"] == 0 and set(before["lag"]) == set(lag["lag"]) and len(lag["lag"]) == 6
        assert sum(lag["end_offsets"].values()) == sent
        assert lag["position"] == {tp: e for tp, e in lag["end_offsets"].items() if e > 0}
        # every window but the newest has closed (the stream's last hour waits for newer records)
        wait_for(lambda: summarize(cfg_for(data))["events_in"] > 0.9 * sent, timeout=120, every=2,
                 what="the job accounted for too few records")
    finally:
        cluster.cancel("streamlift-features")
        proc.communicate(timeout=60)
