"""Random-kill fault injection (issue 13, point 4): each job runs on the standalone cluster (one
TaskManager of four slots, parallelism 2: every kill hits the job) while the TaskManager is
SIGKILLed at 5 random moments and a new one started (tests/faults.py); Flink recovers from its latest checkpoint; then every output is compared with an
uninterrupted run of the same job on the same cluster: the features job's enriched decisions,
attributed outcomes, offline features, quarantine and hand-off file for file and Feast's online
values key for key; the outcomes job's Iceberg tables row for row and its epochs' commits; the
learner's every model snapshot (digest) and its metrics rows. Seeds in KILL_SEEDS: a failure names
its seed and the kills' delays, and replays with the same seed."""

import pandas as pd
import pytest

from faults import FAULT_CONF, run_with_kills
from outputs import all_keys, assert_same_feature_outputs, online_values
from test_job import cfg_for

pytestmark = pytest.mark.slow

KILL_SEEDS = {"features": 101, "outcomes": 202, "learner": 303, "features-kafka": 404}
#: the most seconds between a job running again and the next kill: the outcomes and learner jobs
#: process this stream in a few seconds, so their kills come sooner
MAX_DELAY = {"features": 4.0, "outcomes": 1.5, "learner": 1.5}
KILLS = 5
#: the learner job gets through this stream's hand-off in about two seconds: a snapshot every two
#: hours of event time (~100 model versions, each written to the store and to Iceberg) gives its
#: kills a run to land in, and more outputs to compare
LEARNER_ENV = {"STREAMLIFT_LEARNER__SNAPSHOT_EVERY": "2h"}
#: likewise an Iceberg commit every two hours of event time for the outcomes job (~110 epochs)
OUTCOMES_ENV = {"STREAMLIFT_OUTCOMES__COMMIT_EVERY": "2h"}
JOB_ENV = {"features": {}, "outcomes": OUTCOMES_ENV, "learner": LEARNER_ENV}


@pytest.fixture(scope="module")
def fault_cluster():
    from tools import cluster as c

    if c.rest_ready():
        pytest.fail("a Flink cluster is already running on localhost:8081; stop it first (make cluster-down)")
    c.up(taskmanagers=1, slots=4, conf=FAULT_CONF)
    yield c
    c.down()


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """Long enough (~50 slices) for five kills and recoveries inside each job's run."""
    from tools.simulate import simulate

    out = tmp_path_factory.mktemp("fault-sim")
    simulate(out, events=60_000, users=2_000, campaigns=4, days=9.0, slice_lines=1_200, seed=17)
    return out


@pytest.fixture(scope="module")
def clean(fault_cluster, stream, tmp_path_factory):
    """Uninterrupted runs of the three jobs, chained: features -> outcomes, features -> learner."""
    root = tmp_path_factory.mktemp("clean")
    for job, inp in (("features", stream), ("outcomes", root / "features"), ("learner", root / "features")):
        with pytest.MonkeyPatch.context() as mp:
            for k, v in JOB_ENV[job].items():
                mp.setenv(k, v)
            r = fault_cluster.submit(job, str(inp), str(root / job), parallelism=2)
        assert r.returncode == 0, r.stderr[-3000:]
    return root


def _killed(fault_cluster, job, inp, root, compare, extra=None, seed_job=None):
    """Runs of ``job`` with kills until KILLS kills made it restart (a short job on a loaded machine
    may finish first: the next run, with the next seed, takes the remaining kills); every run's
    outputs are compared with the uninterrupted run by ``compare(out_dir, result)``."""
    kills, runs = [], 0
    while sum(k["restarted"] for k in kills) < KILLS and runs < 3:
        out = root / f"{job}-{runs}"
        need = KILLS - sum(k["restarted"] for k in kills)
        res = run_with_kills(fault_cluster, job, inp, out, kills=need, seed=KILL_SEEDS[seed_job or job] + runs,
                             max_delay=MAX_DELAY[job], extra=extra)
        assert res["returncode"] == 0 and res["state"] == "FINISHED", res
        compare(out, res)
        kills += [{**k, "run": runs} for k in res["kills"]]
        runs += 1
    assert sum(k["restarted"] for k in kills) >= KILLS, kills
    # a kill right after a checkpoint completed since the last restore: a mid-run checkpoint restored
    assert any(k["after_checkpoint"] and k["restarted"] for k in kills), kills
    return kills


def test_features_job_killed_five_times_writes_what_an_uninterrupted_run_writes(fault_cluster, stream, clean,
                                                                              tmp_path):
    from udfs.spec import FeatureSpec

    spec = FeatureSpec.from_config(cfg_for(clean / "features"))
    keys = all_keys(clean / "features", spec)
    want = online_values(cfg_for(clean / "features"), spec, keys)

    def compare(out, res):
        assert assert_same_feature_outputs(out, clean / "features") > 100, res
        got = online_values(cfg_for(out), spec, keys)
        for kt in keys:
            pd.testing.assert_frame_equal(got[kt], want[kt], check_exact=True, obj=kt)

    _killed(fault_cluster, "features", stream, tmp_path, compare)


def test_features_job_on_kafka_killed_five_times_writes_what_an_uninterrupted_run_writes(
        fault_cluster, stream, kafka_broker, tmp_path, monkeypatch):
    """The same with the Kafka source: the stream replayed into topics, the job reading them up to
    the offsets at its start; offsets resume from the restored checkpoint, so the killed runs
    must take every record once, like the uninterrupted one (slices: 4 h windows); and the
    hand-off topic, written in transactions, holds each slice of each run once for a
    read_committed reader, byte for byte as the uninterrupted run wrote it."""
    from conftest import kafka_env
    from jobs.config import load
    from jobs.sinks import summarize
    from tools.produce import create_topics, replay
    from udfs.spec import FeatureSpec

    env = kafka_env(kafka_broker, "t-faults.", tmp_path / "unused", kafka__batch_interval="4h")
    for k, v in env.items():
        if k != "STREAMLIFT_PATHS__DATA_DIR":
            monkeypatch.setenv(k, v)
    cfg = load()
    create_topics(cfg)
    sent = replay(cfg, stream)["records"]
    extra = ["--bootstrap-servers", kafka_broker, "--until", "latest"]
    r = fault_cluster.submit("features", None, str(tmp_path / "clean"), extra=extra, parallelism=2)
    assert r.returncode == 0, r.stderr[-3000:]
    base = cfg_for(tmp_path / "clean")
    assert summarize(base)["events_in"] == sent
    spec = FeatureSpec.from_config(base)
    keys = all_keys(tmp_path / "clean", spec)
    want = online_values(base, spec, keys)
    # the hand-off topic (kafka.handoff, the default on Kafka): each slice once per run, committed
    from collections import Counter

    from jobs.kafka import committed_handoff
    from udfs.handoff import decode_handoff

    handed = {decode_handoff(v).seq: bytes(v) for v in committed_handoff(cfg)}
    assert sorted(handed) == list(range(summarize(base)["slices"]))
    runs = [1]

    def compare(out, res):
        assert assert_same_feature_outputs(out, tmp_path / "clean", handoff_lines=False) > 100, res
        s = summarize(cfg_for(out))
        assert s["events_in"] == sent and s["reconciles"] and s["partitions"] == summarize(base)["partitions"]
        got = online_values(cfg_for(out), spec, keys)
        for kt in keys:
            pd.testing.assert_frame_equal(got[kt], want[kt], check_exact=True, obj=kt)
        # a read_committed reader sees each slice of the killed run once, as the clean run wrote it
        runs[0] += 1
        recs = committed_handoff(cfg)
        assert set(Counter(decode_handoff(v).seq for v in recs).items()) == {(q, runs[0]) for q in handed}, res
        assert all(bytes(v) == handed[decode_handoff(v).seq] for v in recs)

    _killed(fault_cluster, "features", None, tmp_path, compare, extra=extra, seed_job="features-kafka")


def test_outcomes_job_killed_five_times_commits_the_tables_of_an_uninterrupted_run(fault_cluster, clean, tmp_path,
                                                                                   monkeypatch):
    from test_outcomes_job import epoch_history, table_snapshot

    for k, v in OUTCOMES_ENV.items():
        monkeypatch.setenv(k, v)
    want, history = table_snapshot(cfg_for(clean / "outcomes")), epoch_history(cfg_for(clean / "outcomes"))

    def compare(out, res):
        got = table_snapshot(cfg_for(out))
        for k in want:
            pd.testing.assert_frame_equal(got[k], want[k], check_exact=True, obj=f"{k} {res['kills']}")
        # every epoch committed once, with the same rows: the commits' stamps and counts are equal
        assert epoch_history(cfg_for(out)) == history

    _killed(fault_cluster, "outcomes", clean / "features", tmp_path, compare)


def test_learner_job_killed_five_times_publishes_the_models_of_an_uninterrupted_run(fault_cluster, clean, tmp_path,
                                                                                  monkeypatch):
    from tools.analyst import read_table
    from serving.serve import list_versions, load_model

    for k, v in LEARNER_ENV.items():
        monkeypatch.setenv(k, v)
    b = cfg_for(clean / "learner")
    vb = list_versions(b.model_store, b.learner["model_id"])
    cols = ["version", "examples", "ctr_auc", "ctr_log_loss", "ctr_ece", "conversion_auc", "drift"]
    mb = read_table(b, "learner_metrics")[cols].sort_values("version", ignore_index=True)

    def compare(out, res):
        a = cfg_for(out)
        va = list_versions(a.model_store, a.learner["model_id"])
        assert [v["version"] for v in va] == [v["version"] for v in vb] and len(va) >= 50, res
        for v in va:
            ma = load_model(a.model_store, a.learner["model_id"], v["version"])
            mv = load_model(b.model_store, b.learner["model_id"], v["version"])
            assert ma.bundle.digest() == mv.bundle.digest(), (v["version"], res["kills"])
        ma = read_table(a, "learner_metrics")[cols].sort_values("version", ignore_index=True)
        pd.testing.assert_frame_equal(ma, mb, check_exact=True)

    _killed(fault_cluster, "learner", clean / "features", tmp_path, compare)
