"""The features job reading a real Kafka broker (started by the tests from the jars ``make
kafka-jars`` fetched, with Flink's Kafka connector from Maven Central): the same events give the
same outputs as the file source; parallelism 1 and 2 and a replay into a fresh data dir give
identical outputs; hostile records get a reason each and the counts reconcile; a missing topic
fails at start naming it."""

import base64
import json
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from conftest import kafka_env

pytestmark = pytest.mark.slow

BATCH = "3h"          # event time per Kafka slice (the stream spans 2 days: 16 windows)


def _cfg(env):
    from jobs.config import load

    return load(env=env)


def _produce(cfg, sim_dir, partitions=2):
    from tools.produce import create_topics, replay

    create_topics(cfg, partitions=partitions)
    return replay(cfg, Path(sim_dir))


def _run_kafka(cfg):
    from jobs.features import run

    return run(cfg, None, kafka={"bootstrap": cfg.kafka["bootstrap_servers"], "until": "latest"})


def _frame(data: Path, sub: str, by: list) -> pd.DataFrame:
    files = sorted((data / sub).glob("*.parquet"))
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()
    return df.sort_values(by, kind="stable").reset_index(drop=True) if len(df) else df


def _quarantine(data: Path) -> list:
    out = []
    for f in sorted((data / "quarantine").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            q = json.loads(line)
            rec = q["record"]
            out.append((q["stream"], q["reason"], rec if isinstance(rec, str) else json.dumps(rec, sort_keys=True)))
    return sorted(out)


def _newest_offline(data: Path, spec) -> dict:
    out = {}
    for kt in spec.key_type_names:
        ents = list(spec.entities(kt))
        df = _frame(data, f"offline/{spec.view_name(kt)}", ents + ["event_timestamp"])
        out[kt] = df.groupby(ents, sort=True).tail(1).sort_values(ents).reset_index(drop=True)
    return out


def _assert_same_content(a: Path, b: Path, spec, exact: bool):
    """Outputs of two runs equal as sets of rows (their slices may be cut differently)."""
    enr_a, enr_b = _frame(a, "enriched", ["decision_id"]), _frame(b, "enriched", ["decision_id"])
    assert len(enr_a) > 1000
    pd.testing.assert_frame_equal(enr_a, enr_b, check_exact=exact, rtol=1e-9)
    pd.testing.assert_frame_equal(_frame(a, "attributed", ["event_id", "kind"]),
                                  _frame(b, "attributed", ["event_id", "kind"]), check_exact=True)
    assert _quarantine(a) == _quarantine(b)
    oa, ob = _newest_offline(a, spec), _newest_offline(b, spec)
    for kt in oa:
        assert len(oa[kt]) > 10
        pd.testing.assert_frame_equal(oa[kt], ob[kt], check_exact=exact, rtol=1e-9, obj=kt)


@pytest.fixture(scope="module")
def clean_sim(tmp_path_factory):
    """About 30k lines over 2 days with duplicates and malformed lines, no borderline-late
    events, and a few clearly late ones (a day behind) announced at the end."""
    from tools.simulate import simulate

    out = tmp_path_factory.mktemp("ksim")
    simulate(out, events=30_000, users=2_000, campaigns=6, days=2.0, slice_lines=3_000, seed=12, late_rate=0.0)
    last = sorted((out / "manifest").glob("slices-*.jsonl"))[-1]
    m = json.loads(last.read_text().splitlines()[-1])
    dec = [json.loads(l) for l in (out / m["files"]["decision"]).read_text().splitlines()[:40] if l.startswith("{")]
    late = []
    for d in dec[:20]:
        try:
            late.append({**d, "decision_id": "dl" + d["decision_id"][1:], "event_time": d["event_time"] - 86_400_000})
        except (KeyError, TypeError):
            continue
    path = out / m["files"]["decision"]
    path.write_bytes(path.read_bytes() + b"".join(orjson.dumps(r) + b"\n" for r in late))
    return out, len(late)


@pytest.fixture(scope="module")
def kafka_runs(kafka_broker, clean_sim, tmp_path_factory):
    from jobs.features import run

    sim, n_late = clean_sim
    runs = {}
    # the parallelism-1 run is also the replay: the same topics from the earliest offsets into a fresh data dir
    for name, p in (("kafka_p2", 2), ("kafka_p1", 1)):
        data = tmp_path_factory.mktemp(name)
        cfg = _cfg(kafka_env(kafka_broker, "t-equal.", data, flink__parallelism=p, kafka__batch_interval=BATCH,
                             kafka__handoff=str(name == "kafka_p2").lower()))   # p1 on lines
        if name == "kafka_p2":
            sent = _produce(cfg, sim)
        runs[name] = (cfg, _run_kafka(cfg))
    data = tmp_path_factory.mktemp("files")
    cfg = _cfg({"STREAMLIFT_PATHS__DATA_DIR": str(data), "STREAMLIFT_FLINK__PARALLELISM": "2"})
    runs["files"] = (cfg, run(cfg, sim))
    return runs, sent, n_late


def test_kafka_source_equals_the_file_source_on_the_same_events(kafka_runs):
    from udfs.spec import FeatureSpec

    runs, sent, n_late = kafka_runs
    (ck, sk), (cf, sf) = runs["kafka_p2"], runs["files"]
    assert sk["events_in"] == sf["events_in"] == sent["records"]
    assert sk["reconciles"] and sf["reconciles"] and sk["pending"] == 0
    assert sk["quarantined_by_reason"] == sf["quarantined_by_reason"]
    assert sk["quarantined_by_reason"]["late"] == n_late and sk["quarantined_by_reason"]["duplicate"] > 100
    assert sk["processed_by_stream"] == sf["processed_by_stream"]
    assert sk["slices"] > sf["slices"]              # windows of 3 h, not the files' slices
    # per partition: the slices took every offset the broker holds, each once
    from jobs.kafka import offsets

    held = offsets(ck)
    assert len(held) == 6 and set(sk["partitions"]) == set(held)
    for tp, (low, high) in held.items():
        got = sk["partitions"][tp]
        assert got["records"] == high - low > 0 and (got["first_offset"], got["last_offset"]) == (low, high - 1), tp
    _assert_same_content(ck.data_dir, cf.data_dir, FeatureSpec.from_config(ck), exact=False)


def test_kafka_parallelism_1_and_2_and_a_replay_give_identical_outputs(kafka_runs):
    """The second run replays the topics from the earliest offsets into a fresh data dir, at
    parallelism 1: every output file equals the first run's (parallelism 2)."""
    from outputs import assert_same_feature_outputs
    from udfs.spec import FeatureSpec

    runs = kafka_runs[0]
    (c2, s2), (c1, s1) = runs["kafka_p2"], runs["kafka_p1"]
    for k in ("events_in", "slices", "processed_by_stream", "quarantined_by_reason", "feature_rows_offline",
              "partitions"):
        assert s1[k] == s2[k], k
    assert assert_same_feature_outputs(c2.data_dir, c1.data_dir, handoff_lines=False) > 40
    # the parallelism-2 run handed off on the topic (no hand-off lines); the replay on files:
    # the same slices either way
    from jobs.kafka import committed_handoff
    from udfs.ingest import handoff_lines, read_handoff

    assert not (c2.data_dir / "handoff").exists()
    by_topic = {h.seq: h for h in map(read_handoff, committed_handoff(c2))}
    by_lines = {h.seq: h for h in map(read_handoff, handoff_lines(c1.data_dir))}
    assert sorted(by_topic) == sorted(by_lines) == list(range(s2["slices"]))
    for q, a in by_topic.items():
        b = by_lines[q]
        assert (a.clock, a.final, a.quarantined) == (b.clock, b.final, b.quarantined), q
        assert (a.decisions is None) == (b.decisions is None) and (a.outcomes is None) == (b.outcomes is None), q
        if a.decisions is not None:
            assert a.decisions.equals(b.decisions), q
        if a.outcomes is not None:
            pd.testing.assert_frame_equal(a.outcomes, b.outcomes, check_exact=True)
    spec = FeatureSpec.from_config(c2)
    from outputs import all_keys, online_values

    keys = all_keys(c2.data_dir, spec)
    o2, o1 = online_values(c2, spec, keys), online_values(c1, spec, keys)
    for kt in keys:
        pd.testing.assert_frame_equal(o2[kt], o1[kt], check_exact=True)


def test_the_handoff_topic_holds_each_slice_once_and_the_chain_on_kafka_equals_the_chain_on_files(
        kafka_runs, kafka_broker, tmp_path):
    """The features job (on Kafka, kafka.handoff on) writes each slice to the hand-off topic in
    transactions: a read_committed consumer sees every slice once. The outcomes and learner jobs
    reading the topic commit the tables and publish the model snapshots they do from the same
    slices handed off as lines (the replay run): row for row, digest for digest."""
    from jobs.kafka import committed_handoff
    from jobs.learner import run as run_learner
    from jobs.outcomes import run as run_outcomes
    from serving.serve import list_versions, load_model
    from test_outcomes_job import table_snapshot
    from udfs.handoff import decode_handoff

    runs = kafka_runs[0]
    c2, s2 = runs["kafka_p2"]
    c1, _ = runs["kafka_p1"]                        # the same slices, handed off as lines
    seqs = [decode_handoff(v).seq for v in committed_handoff(c2)]
    assert sorted(seqs) == list(range(s2["slices"])), seqs
    via_files = _cfg({"STREAMLIFT_PATHS__DATA_DIR": str(tmp_path / "files"), "STREAMLIFT_FLINK__PARALLELISM": "2"})
    via_kafka = _cfg(kafka_env(kafka_broker, "t-equal.", tmp_path / "kafka", flink__parallelism=2))
    for job in (run_outcomes, run_learner):
        job(via_files, c1.data_dir)
        job(via_kafka, None, kafka={"bootstrap": kafka_broker, "until": "latest"})
    want, got = table_snapshot(via_files), table_snapshot(via_kafka)
    assert len(got["outcome"]) == s2["processed_by_stream"]["decision"]
    for k in want:
        assert len(want[k]) > 0 or k == "quarantine"
        pd.testing.assert_frame_equal(got[k], want[k], check_exact=True, obj=k)
    mf, mk = (list_versions(c.model_store, c.learner["model_id"]) for c in (via_files, via_kafka))
    assert len(mf) >= 3 and [m["version"] for m in mf] == [m["version"] for m in mk]
    for m in mf:
        a = load_model(via_files.model_store, via_files.learner["model_id"], m["version"])
        b = load_model(via_kafka.model_store, via_kafka.learner["model_id"], m["version"])
        assert a.bundle.digest() == b.bundle.digest(), m["version"]


def test_hostile_kafka_records_get_a_reason_and_the_counts_reconcile(kafka_broker, tmp_path):
    """Non-UTF-8 bytes, an empty value, a tombstone, an oversized record, a record dated far in
    the future, one late by its partition's clock, bad JSON, one whose header names another
    contract version; beside valid decisions (one with its own version's header)."""
    from confluent_kafka import Producer

    from jobs.kafka import topics
    from tools.produce import create_topics

    cfg = _cfg(kafka_env(kafka_broker, "t-hostile.", tmp_path, flink__parallelism=1, kafka__batch_interval="1m"))
    create_topics(cfg, partitions=1)
    topic = next(t for t, s in topics(cfg).items() if s == "decision")
    t0 = 1767225600000
    good = [{"decision_id": f"d_{i:016x}", "event_time": t0 + i * 10_000, "user_id": f"u_{i:016x}",
             "placement": "feed", "device": "mobile", "region": "eu", "hour": 0, "campaign_id": "cmp_000",
             "creative_id": "cre_000_0", "arm": "treatment", "propensity": 0.5, "policy_id": "p",
             "model_version": "m", "feature_schema_version": 1, "consent": True} for i in range(60)]
    p = Producer({"bootstrap.servers": kafka_broker})
    sends = [(orjson.dumps(r), r["event_time"]) for r in good[:30]]
    t_now = good[29]["event_time"]
    sends += [(b"\xff\xfe\x00bytes", t_now), (b"", t_now), (None, t_now), (b"   ", t_now),
              (orjson.dumps({**good[0], "decision_id": "d_big", "policy_id": "x" * 70_000}), t_now),
              # the broker refuses record timestamps over an hour ahead (log.message.timestamp.after.max.ms):
              # a record dated far ahead carries a sane Kafka timestamp; the reader's max_future catches it
              (orjson.dumps({**good[0], "decision_id": "d_future", "event_time": 4102444800000}), t_now),
              (orjson.dumps({**good[0], "decision_id": "d_late", "event_time": t0 - 3_600_000}), t0 - 3_600_000),
              (b'{"decision_id": "d_x", "event_ti', t_now)]
    sends += [(orjson.dumps(r), r["event_time"]) for r in good[30:]]
    errors = []
    for value, ts in sends:
        p.produce(topic, value=value, key=b"k", timestamp=ts, on_delivery=lambda e, m: e and errors.append(e))
    # a record of another contract version on this topic, by its header (tools.produce sets it)
    from jobs.kafka import CONTRACT_HEADER

    t_end = good[-1]["event_time"]
    p.produce(topic, value=orjson.dumps({**good[0], "decision_id": "d_v2", "event_time": t_end + 1}), key=b"k",
              timestamp=t_end + 1, headers=[(CONTRACT_HEADER, b"decision.v2")],
              on_delivery=lambda e, m: e and errors.append(e))
    p.produce(topic, value=orjson.dumps({**good[0], "decision_id": "d_v1", "event_time": t_end + 2}), key=b"k",
              timestamp=t_end + 2, headers=[(CONTRACT_HEADER, b"decision.v1")],
              on_delivery=lambda e, m: e and errors.append(e))
    p.flush(30)
    del p
    assert not errors
    s = _run_kafka(cfg)
    assert s["events_in"] == len(sends) + 2 == 70
    assert s["reconciles"] and s["pending"] == 0
    q = s["quarantined_by_reason"]
    assert q == {"encoding": 1, "empty": 3, "size": 1, "future": 1, "late": 1, "bad_json": 1, "version": 1}, q
    assert s["processed_by_stream"]["decision"] == 61
    assert s["partitions"] == {f"{topic}:0": {"records": 70, "quarantined_on_read": 8, "first_offset": 0,
                                               "last_offset": 69}}, s["partitions"]
    stored = _quarantine(tmp_path)
    assert sorted(r for _, r, _ in stored) == ["bad_json", "empty", "empty", "empty:tombstone", "encoding",
                                               "future", "late", "size:line", "version:decision.v2"]
    big = [r for _, reason, r in stored if reason == "size:line"][0]
    assert len(big) < 1000 and "sha256" in big          # stored as its head and a digest


def test_a_missing_topic_fails_at_start_naming_it(kafka_broker, tmp_path):
    from jobs.kafka import TopicMissing

    cfg = _cfg(kafka_env(kafka_broker, "t-missing.", tmp_path))
    with pytest.raises(TopicMissing, match=r"t-missing\.decision\.v1.*tools.produce create-topics"):
        _run_kafka(cfg)


def _send(cfg, bootstrap, lines):
    """Produce ``(stream, line)`` pairs as tools.produce does (key decision_id, timestamp event time)."""
    from jobs.kafka import topics
    from tools.produce import _event_time, _key, _parse, producer

    names = {s: t for t, s in topics(cfg).items()}
    p = producer(cfg, bootstrap)
    last = {}
    for stream, line in lines:
        obj = _parse(line)
        t = _event_time(obj)
        last[stream] = t if t is not None else last.get(stream, 1767225600000)
        p.produce(names[stream], value=line, key=_key(obj), timestamp=last[stream])
    assert p.flush(60) == 0
    return max(last.values())


def _sentinels(cfg, bootstrap, t):
    """An unattributed click in every partition of every topic, a day after ``t``: every window
    before it closes on an unbounded run."""
    from confluent_kafka.admin import AdminClient

    from jobs.kafka import topics
    from tools.produce import producer

    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    p = producer(cfg, bootstrap)
    n = 0
    for topic in topics(cfg):
        for part in md.topics[topic].partitions:
            rec = {"event_id": f"s-{topic}-{part}", "decision_id": f"sentinel-{part}", "event_time": t + 86_400_000}
            p.produce(topic, value=orjson.dumps(rec), partition=part, timestamp=rec["event_time"])
            n += 1
    assert p.flush(30) == 0
    return n


def test_a_broker_stop_and_a_job_crash_mid_stream_lose_nothing(clean_sim, tmp_path_factory):
    """An unbounded run on its own broker: the broker is stopped for 10 s while the job reads,
    then the job is killed (SIGKILL) after a checkpoint and restarted from it; the outputs
    equal a bounded run's on the same topics, decision for decision."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, completed_checkpoints, wait_for, wait_for_newer_checkpoint
    from tools.broker import start, stop
    from tools.produce import create_topics, slice_lines

    sim, _ = clean_sim
    broker = start(tmp_path_factory.mktemp("own-broker"))
    data = tmp_path_factory.mktemp("streaming")
    env = kafka_env(broker.bootstrap, "t-crash.", data, flink__parallelism=2, kafka__batch_interval=BATCH)
    cfg = _cfg(env)
    create_topics(cfg)
    lines = list(slice_lines(sim))
    half = len(lines) // 2
    _send(cfg, broker.bootstrap, lines[:half])

    def job(*extra):
        return subprocess.Popen([sys.executable, "-m", "jobs.features", "--until", "never", "--data-dir", str(data),
                                 *extra], cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def slices():
        return len(list((data / "stats").glob("slice-*.json")))

    proc = job()
    try:
        wait_for(lambda: slices() >= 3, timeout=180, what="no slices from the unbounded run")
        stop(broker)                                           # the broker goes away for 10 s
        time.sleep(10)
        broker = start(broker.folder)
        t_last = _send(cfg, broker.bootstrap, lines[half:])
        n_before = slices()
        wait_for(lambda: slices() > n_before, timeout=180, what="no progress after the broker came back")
        wait_for_newer_checkpoint(data)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)                    # crash
        proc.wait(timeout=30)
    n_sent = len(lines) + _sentinels(cfg, broker.bootstrap, t_last)
    proc = job("--from-checkpoint", str(completed_checkpoints(data)[-1]))
    try:
        def accounted():
            from jobs.sinks import summarize

            s = summarize(cfg)
            return s if s["events_in"] >= len(lines) else None
        streamed = wait_for(accounted, timeout=240, what="the restarted job did not take every record")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    bounded_dir = tmp_path_factory.mktemp("bounded")
    bounded = _run_kafka(_cfg({**env, "STREAMLIFT_PATHS__DATA_DIR": str(bounded_dir)}))
    stop(broker)
    assert bounded["events_in"] == n_sent and bounded["reconciles"]
    # everything but the sentinels' window (still open on the unbounded run) is in both
    assert streamed["events_in"] == len(lines)
    for sub, by in (("enriched", ["decision_id"]), ("attributed", ["event_id", "kind"])):
        pd.testing.assert_frame_equal(_frame(data, sub, by), _frame(bounded_dir, sub, by), check_exact=True)
    assert _quarantine(data) == [q for q in _quarantine(bounded_dir) if "sentinel-" not in q[2]]
