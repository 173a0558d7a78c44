"""make bench: the features and outcomes jobs against naive per-event-state variants (and the
features job against the Flink SQL ceiling).

All variants read the same simulated input in the same run, on the local
mini-cluster with checkpointing on:

* ``features_p1`` / ``features_p2``  the job at parallelism 1 and 2 writing the offline store, the
                          enriched decisions and the hand-off (no Feast online writes);
* ``features_sqlite``     the job at parallelism 2 with Feast online writes to SQLite (``features``);
* ``features_redis``      the same with Feast online writes to a real Redis server (started here);
* ``freshness``           the job with --follow on Redis, fed at half of ``features_redis``'s rate:
                          fold -> online write latency p50/p99;
* ``sharding``            the engine in process at 1 and 4 shards: CPU ratio, busiest shard's share;
* ``projection``          a projection (labelled so) of events/s against cores from CPU per event;
* ``naive``               a Python KeyedProcessFunction reading and writing a ValueState per event
                          (process mode, default bundles), on the first ``--naive-events`` lines;
* ``flink_sql``           Flink SQL, JSON files -> blackhole (all Java), columns from schemas/;
* ``engine_only_python``  read/validate and the engine as a plain Python loop, no Flink;
* ``outcomes``            the outcomes job on the hand-off of ``features_no_online`` (the same
                          input), committing to Iceberg (SQL catalog on SQLite);
* ``outcomes_naive``      the per-event design of that join: a Python KeyedProcessFunction keyed
                          by decision id, one ValueState read+write per decision/click/conversion,
                          on the first ``--naive-events`` events;
* ``outcomes_engine_only`` reading the hand-off and the outcomes engine, no Flink, no commits;
* ``learner``             the learner job on the same hand-off (six models, calibration, delay
                          models, snapshots to the model store and Iceberg), decisions/s;
* ``learner_engine_only`` udfs.learners.OnlineLearner in process over the same slices: decisions/s
                          and its prequential CTR quality against the simulator's truth;
* ``vowpal_wabbit``       Vowpal Wabbit (pyvw, logistic loss) on the same slices, features and
                          protocol as the CTR model (udfs.baselines.VowpalCTR), in process;
* ``kafka_backfill``      the same input replayed into Kafka topics (a broker started here), the job
                          reading them with --until latest (parallelism 2, no online writes);
* ``kafka_live``          a paced producer at stepped rates, the job unbounded on Kafka with Feast on
                          Redis: freshness (send -> readable through Feast), lag, CPU per process
                          (tools/bench_kafka.py).

Each job is reported as events/s end to end and *net* of the start-up time of an
empty job measured in the same run; ratios are net/net. The learners are reported in
examples/s (an example: one decision scored first, then trained on its labels) and
their CTR quality (AUC, log loss, ECE on the treatment arm after the first day). Results go to
``<out>/features.json``, and the headline numbers to ``<out>/summary.json``.

    python -m tools.bench --events 1000000 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from jobs.config import load as load_config

def _timed(fn):
    t0 = time.time()
    fn()
    return time.time() - t0


def startup_seconds(cfg) -> float:
    from pyflink.common import Types

    from jobs.flink_env import stream_env

    env = stream_env(cfg)
    env.from_collection([1], type_info=Types.INT()).map(lambda x: x, output_type=Types.INT()) \
        .print()
    return _timed(lambda: env.execute("startup"))


def run_features(sim: Path, data: Path, write_online: bool, parallelism: int = 2, env: dict | None = None) -> dict:
    """The features job on the mini-cluster at ``parallelism``; its summary plus the seconds each
    stage spent (summed over slices and shards, from the per-slice stats)."""
    from jobs.features import run

    if data.exists():
        shutil.rmtree(data)
    cfg = load_config(env={**os.environ, "STREAMLIFT_PATHS__DATA_DIR": str(data),
                           "STREAMLIFT_FEAST__WRITE_ONLINE": str(write_online).lower(),
                           "STREAMLIFT_FLINK__PARALLELISM": str(parallelism), **(env or {})})
    s = run(cfg, sim)
    s["stage_seconds"] = stage_seconds(data)
    return s


def stage_seconds(data: Path) -> dict:
    """Seconds per stage of a features run, summed over slices and shards: read-validate,
    attribution, accumulate, merge, file writes (sink), Feast online writes."""
    out = {"read": 0.0, "attribution": 0.0, "accumulate": 0.0, "merge": 0.0, "sink": 0.0, "online": 0.0}
    for f in (data / "stats").glob("slice-*.json"):
        for k, v in json.loads(f.read_text())["timing"].items():
            stage = k.split(":")[0].removesuffix("_s")
            if stage in out and isinstance(v, (int, float)):
                out[stage] += v
    for f in (data / "stats").glob("online-*.json"):
        out["online"] += json.loads(f.read_text())["online_s"]
    return {k: round(v, 2) for k, v in out.items()}


def freshness(data: Path, skip_slices: int = 0) -> dict:
    """p50/p99 of fold -> written over every online row of a run (from the writers' quantiles),
    leaving out the first ``skip_slices`` slices when asked (the writers' cold start)."""
    import numpy as np

    samples, weights = [], []
    for f in (data / "stats").glob("online-*.json"):
        st = json.loads(f.read_text())
        fr = st.get("freshness_s")
        if fr and st["seq"] >= skip_slices:
            samples.append(np.array(fr["quantiles"]))
            weights.append(np.full(101, fr["n"] / 101.0))
    if not samples:
        return {}
    x, w = np.concatenate(samples), np.concatenate(weights)
    order = np.argsort(x)
    cum = np.cumsum(w[order]) / w.sum()
    q = lambda p: float(x[order][min(np.searchsorted(cum, p), len(x) - 1)])  # noqa: E731
    return {"rows": int(round(w.sum())), "p50_s": round(q(0.50), 3), "p99_s": round(q(0.99), 3),
            "max_s": round(float(x.max()), 3)}


def run_freshness(sim: Path, data: Path, redis: str, events_per_second: float, parallelism: int = 2) -> dict:
    """The features job with --follow, Feast online on Redis, fed by a paced producer: one
    manifest line announced every slice_lines / events_per_second seconds. Freshness: the time
    from an accumulator folding a key's newest event to the Feast write holding it returning
    (Redis answers reads from then on; a sample is read back through Feast at the end)."""
    import signal
    import subprocess
    import sys

    from udfs.ingest import manifest_lines

    if data.exists():
        shutil.rmtree(data)
    feed = data / "feed"
    (feed / "manifest").mkdir(parents=True)
    lines = manifest_lines(sim)
    per_slice = max(sum(json.loads(m)["lines"].values()) for m in lines)
    interval = per_slice / events_per_second
    env = {**os.environ, "STREAMLIFT_PATHS__DATA_DIR": str(data), "STREAMLIFT_FEAST__ONLINE_STORE": "redis",
           "STREAMLIFT_FEAST__REDIS_CONNECTION": redis, "STREAMLIFT_FEATURES__ONLINE_EVERY": "1",
           "STREAMLIFT_FLINK__PARALLELISM": str(parallelism), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.features", "--input", str(feed), "--data-dir", str(data),
                             "--follow"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        time.sleep(10)                                   # start-up
        for i, m in enumerate(lines):
            tmp = feed / "manifest" / f".slices-{i:05d}.jsonl"
            tmp.write_text(m + "\n")
            tmp.rename(feed / "manifest" / f"slices-{i:05d}.jsonl")
            time.sleep(interval)
        deadline = time.time() + 120
        while time.time() < deadline and len(list((data / "stats").glob("slice-*.json"))) < len(lines):
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    steady = {f"after_warmup_{k}": v for k, v in freshness(data, skip_slices=max(1, len(lines) // 10)).items()}
    return {"interval_s": round(interval, 3), "paced_events_per_second": round(events_per_second),
            "slices": len(list((data / "stats").glob("slice-*.json"))), **freshness(data), **steady,
            "warmup_slices": max(1, len(lines) // 10)}


def shard_balance(cfg, sim: Path, shards: int = 4) -> dict:
    """The engine in process at 1 and ``shards`` shards: total engine CPU (the sharding overhead)
    and the share of the busiest shard's input (attribution: events; accumulate: key rows)."""
    from udfs.features import FeatureEngine
    from udfs.ingest import manifest_lines, read_slice

    slices = [read_slice(line, as_frames=True) for line in manifest_lines(sim)]
    cpu = {}
    for n in (1, shards):
        eng = FeatureEngine(**cfg.engine_params(), shards=n)
        t0 = time.process_time()
        for s in slices:
            eng.offer(s.seq, s.batches, s.lines, s.quarantined)
            eng.state_delta()
        eng.flush()
        cpu[n] = time.process_time() - t0
    att = [r.events_in for r in eng.routers]
    acc = [a.rows_in for a in eng.accs]
    return {"shards": shards, "engine_cpu_1_shard_s": round(cpu[1], 2),
            f"engine_cpu_{shards}_shards_s": round(cpu[shards], 2),
            "cpu_ratio": round(cpu[shards] / cpu[1], 3),
            "busiest_attribution_share": round(max(att) / sum(att), 3),
            "busiest_accumulate_share": round(max(acc) / sum(acc), 3)}


def projection(events: int, stages: dict, wall_net_p2: float, cores_used: int = 2,
               cores=(1, 2, 4, 8, 16)) -> dict:
    """A projection (not a measurement) of the features job's events/s against cores: every stage
    is sharded, so at c cores the job would process c / (CPU seconds per event) events/s, where
    the CPU per event is the Python stages' measured seconds plus what the rest of the p=2 run's
    two cores spent (Flink: transfers, state, checkpoints), assumed to scale the same way."""
    python = sum(stages.values()) / events
    other = max(0.0, cores_used * wall_net_p2 / events - python)
    per_event = python + other
    return {"cpu_us_per_event_python_stages": round(python * 1e6, 2), "cpu_us_per_event_other": round(other * 1e6, 2),
            "events_per_second": {str(c): round(c / per_event) for c in cores}}


def run_naive(cfg, sim: Path, max_lines: int, mode: str = "process") -> tuple[int, float]:
    """Per event: one ValueState read and write of the key's 9 decayed sums."""
    import math

    from pyflink.common import Types
    from pyflink.datastream import KeyedProcessFunction
    from pyflink.datastream.state import ValueStateDescriptor

    from jobs.flink_env import stream_env
    from udfs.features import parse_duration
    from udfs.ingest import manifest_lines, read_slice

    lines, chosen = 0, []
    for m in manifest_lines(sim):
        if lines >= max_lines:
            break
        chosen.append(m)
        lines += sum(json.loads(m)["lines"].values())
    rates = [math.log(2) / parse_duration(h) for h in cfg.features["half_lives"]]

    def explode(manifest_line):
        s = read_slice(manifest_line)
        for kind, recs in s.batches.items():
            for r in recs:
                # decisions by user, outcomes by decision id: t is field 1 or 2
                if kind == "decision":
                    yield r[2], r[1], 0
                else:
                    yield r[1], r[2], 1 if kind == "click" else 2

    class Naive(KeyedProcessFunction):
        def open(self, ctx):
            self.state = ctx.get_state(ValueStateDescriptor("acc", Types.PICKLED_BYTE_ARRAY()))

        def process_element(self, value, ctx):
            key, t, metric = value
            acc = self.state.value()
            if acc is None:
                acc = [t, [0.0] * 9]
            dt = t - acc[0]
            vals = acc[1]
            for h, r in enumerate(rates):
                f = math.exp(-r * max(dt, 0))
                for m in range(3):
                    vals[m * 3 + h] *= f
                vals[metric * 3 + h] += 1.0
            acc[0] = max(acc[0], t)
            self.state.update(acc)

    # default bundles (1000 elements / 1 s). Process mode: in thread mode this job did not
    # finish 30k events in 100 s on this machine (see README)
    env = stream_env(cfg, overrides={"python.execution-mode": mode, "python.fn-execution.bundle.size": "1000",
                                     "python.fn-execution.bundle.time": "1000"})
    (env.from_collection(chosen, type_info=Types.STRING())
     .flat_map(explode, output_type=Types.TUPLE([Types.STRING(), Types.LONG(), Types.INT()]))
     .key_by(lambda v: v[0], key_type=Types.STRING())
     .process(Naive()).name("naive-per-event-state"))
    return lines, _timed(lambda: env.execute("naive"))


def run_engine_only(cfg, sim: Path) -> dict:
    """The read/validate and engine steps as plain Python in this process, no Flink:
    the ceiling of the Python part of the job."""
    from udfs.features import FeatureEngine
    from udfs.ingest import manifest_lines, read_slice

    t0 = time.time()
    slices = [read_slice(line) for line in manifest_lines(sim)]
    t1 = time.time()
    eng = FeatureEngine(**cfg.engine_params())
    for s in slices:
        eng.offer(s.seq, s.batches, s.lines, s.quarantined)
        eng.state_delta()
    eng.flush()
    t2 = time.time()
    n = sum(sum(s.lines.values()) for s in slices)
    return {"events": n, "read_validate_events_per_second": round(n / (t1 - t0)),
            "engine_events_per_second": round(n / (t2 - t1))}


def handoff_events(line: str) -> list:
    """(decision id, event time, kind) of every decision and outcome of one hand-off slice."""
    from udfs.ingest import read_handoff

    h = read_handoff(line)
    out = []
    if h.decisions is not None:
        out += list(zip(h.decisions.column("decision_id").to_pylist(),
                        h.decisions.column("event_time").to_pylist(), [0] * h.decisions.num_rows))
    if h.outcomes is not None:
        out += list(zip(h.outcomes.decision_id, h.outcomes.event_time.astype(int),
                        (h.outcomes.kind == "conversion").astype(int) + 1))
    return out


def run_outcomes(features_dir: Path, data: Path) -> dict:
    from jobs.outcomes import run

    if data.exists():
        shutil.rmtree(data)
    cfg = load_config(env={**os.environ, "STREAMLIFT_PATHS__DATA_DIR": str(data)})
    s = run(cfg, features_dir)
    s["events"] = sum(s["totals"]["in"].values())
    return s


def run_outcomes_naive(cfg, features_dir: Path, max_events: int) -> tuple[int, float]:
    """Per event: one ValueState read and write of the decision's outcome row."""
    from pyflink.common import Types
    from pyflink.datastream import KeyedProcessFunction
    from pyflink.datastream.state import ValueStateDescriptor

    from jobs.flink_env import stream_env
    from udfs.features import parse_duration
    from udfs.ingest import handoff_lines

    events = []
    for line in handoff_lines(features_dir):
        if len(events) >= max_events:
            break
        events += handoff_events(line)
    events = [(d, int(t), int(k)) for d, t, k in events[:max_events]]
    window = parse_duration(cfg.features["conversion_window"])

    class Naive(KeyedProcessFunction):
        def open(self, ctx):
            self.state = ctx.get_state(ValueStateDescriptor("row", Types.PICKLED_BYTE_ARRAY()))

        def process_element(self, value, ctx):
            did, t, kind = value
            row = self.state.value() or {"t": None, "clicks": 0, "conversions": 0, "first_conv": -1}
            if kind == 0:
                row["t"] = t
            elif row["t"] is not None and t - row["t"] <= window:
                row["clicks" if kind == 1 else "conversions"] += 1
                if kind == 2 and row["first_conv"] < 0:
                    row["first_conv"] = t
            self.state.update(row)

    env = stream_env(cfg, overrides={"python.fn-execution.bundle.size": "1000",
                                     "python.fn-execution.bundle.time": "1000"})
    (env.from_collection(events, type_info=Types.TUPLE([Types.STRING(), Types.LONG(), Types.INT()]))
     .key_by(lambda v: v[0], key_type=Types.STRING())
     .process(Naive()).name("naive-outcomes-per-event-state"))
    return len(events), _timed(lambda: env.execute("naive-outcomes"))


def run_outcomes_engine_only(cfg, features_dir: Path) -> dict:
    from udfs.ingest import handoff_lines, read_handoff
    from udfs.outcomes import OutcomeEngine

    t0 = time.time()
    slices = [read_handoff(line) for line in handoff_lines(features_dir)]
    t1 = time.time()
    eng = OutcomeEngine(**cfg.outcome_params())
    for h in slices:
        eng.offer(h.seq, h.decisions, h.outcomes, h.clock, h.final, h.quarantined)
    t2 = time.time()
    n = sum(eng.totals["in"].values())
    return {"events": n, "read_events_per_second": round(n / (t1 - t0)),
            "engine_events_per_second": round(n / (t2 - t1))}


def handoff_decisions(features_dir: Path) -> int:
    """Enriched decisions in a hand-off (from the Parquet footers)."""
    import orjson
    import pyarrow.parquet as pq

    from udfs.ingest import handoff_lines

    n = 0
    for line in handoff_lines(features_dir):
        m = orjson.loads(line)
        if "enriched" in m["files"]:
            n += pq.ParquetFile(Path(m["root"]) / m["files"]["enriched"]).metadata.num_rows
    return n


def run_learner(features_dir: Path, data: Path) -> dict:
    from jobs.learner import run

    if data.exists():
        shutil.rmtree(data)
    cfg = load_config(env={**os.environ, "STREAMLIFT_PATHS__DATA_DIR": str(data)})
    return run(cfg, features_dir)


def run_learner_engine_only(cfg, features_dir: Path, truth, t0: int) -> dict:
    """OnlineLearner in process over the hand-off (reading the slices left out of the time)."""
    from tools.evaluate import ctr_quality, learn_all
    from udfs.ingest import handoff_lines, read_handoff
    from udfs.learners import OnlineLearner

    slices = [read_handoff(line) for line in handoff_lines(features_dir)]
    lrn = OnlineLearner(**cfg.learner_params())
    start = time.perf_counter()
    scores = learn_all(lrn, slices)
    seconds = time.perf_counter() - start
    n = lrn.totals["decisions"]
    return {"examples": n, "seconds": round(seconds, 2), "examples_per_second": round(n / seconds),
            "trained": lrn.totals["trained"], "ctr": ctr_quality(scores, truth, t0)}


def run_vowpal(cfg, features_dir: Path, truth, t0: int) -> dict:
    from tools.evaluate import ctr_quality, vw_scores

    scores, timing = vw_scores(cfg, features_dir)
    return {"examples": timing["scored"], "seconds": timing["seconds"],
            "examples_per_second": round(timing["scored"] / timing["seconds"]), "trained": timing["trained"],
            "args": timing["args"], "ctr": ctr_quality(scores, truth, t0)}


def run_flink_sql(sim: Path) -> tuple[int, float]:
    from pyflink.table import EnvironmentSettings, TableEnvironment

    from schemas import CONTRACTS

    t_env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    t_env.get_config().set("execution.checkpointing.interval", "5s")
    t_env.get_config().set("parallelism.default", "2")
    selects = []
    for name, c in CONTRACTS.items():
        t_env.execute_sql(f"""CREATE TABLE src_{name} (
  {c.flink_sql_columns()}
) WITH ('connector' = 'filesystem', 'path' = '{(sim / name).resolve()}', 'format' = 'json',
        'json.ignore-parse-errors' = 'true')""")
        selects.append(f"SELECT `{c.id_field}` AS id, event_time FROM src_{name}")
    t_env.execute_sql("CREATE TABLE sink (id STRING, event_time BIGINT) WITH ('connector' = 'blackhole')")
    lines = sum(json.loads((sim / "truth" / "summary.json").read_text())["lines"].values())
    stmt = "INSERT INTO sink " + " UNION ALL ".join(selects)
    return lines, _timed(lambda: t_env.execute_sql(stmt).wait())


RATIOS = {   # name: (numerator, denominator, field of each); a ratio of the variants this run measured
    "features_p2_vs_p1": ("features_p2", "features_p1", "events_per_second"),
    "features_p2_vs_p1_net": ("features_p2", "features_p1", "net_events_per_second"),
    "features_vs_naive": ("features", "naive", "net_events_per_second"),
    "features_no_online_vs_naive": ("features_no_online", "naive", "net_events_per_second"),
    # against Flink SQL end to end: the SQL job is over within about a second of its start-up
    "features_vs_flink_sql_end_to_end": ("features", "flink_sql", "events_per_second"),
    "features_no_online_vs_flink_sql_end_to_end": ("features_no_online", "flink_sql", "events_per_second"),
    "outcomes_vs_outcomes_naive": ("outcomes", "outcomes_naive", "net_events_per_second"),
    "outcomes_vs_outcomes_naive_end_to_end": ("outcomes", "outcomes_naive", "events_per_second"),
    "learner_engine_vs_vowpal_wabbit": ("learner_engine_only", "vowpal_wabbit", "examples_per_second"),
}


def projection_all(results: dict, startup: float, cores=(1, 2, 4, 8, 16)) -> dict:
    """A projection (not a measurement) for the three jobs by Amdahl's law: the sharded stages'
    seconds per event divide by the cores, the serial ones (the outcomes committer, the one
    learner) do not. Features: see :func:`projection`; outcomes: shards + labellers parallel,
    commits serial, the rest of the run's two cores (Flink) parallel; learner: the learner's
    own seconds serial, the rest of the run parallel."""
    out = {}
    if "projection" in results:
        out["features"] = results["projection"]["events_per_second"]
    o = results.get("outcomes")
    if o and o.get("events"):
        n = o["events"]
        serial = (o.get("commit_seconds") or 0) / n
        parallel = max(2 * (o["wall_seconds"] - startup) / n - serial, (o.get("engine_seconds") or 0) / n)
        out["outcomes"] = {str(c): round(1 / (parallel / c + serial)) for c in cores}
    lj = results.get("learner")
    if lj and lj.get("examples"):
        n = lj["examples"]
        serial = (lj.get("learner_seconds") or 0) / n
        parallel = max(2 * (lj["wall_seconds"] - startup) / n - serial, 0.0)
        out["learner"] = {str(c): round(1 / (parallel / c + serial)) for c in cores}
    return out


def redis_server():
    """A redis-server on a free port in a temporary folder (None if it is not installed)."""
    import contextlib
    import socket
    import subprocess
    import tempfile

    @contextlib.contextmanager
    def ctx():
        if not shutil.which("redis-server"):
            yield None
            return
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory() as d:
            proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no", "--dir", d], stdout=subprocess.DEVNULL)
            try:
                import redis

                deadline = time.time() + 10
                while True:
                    try:
                        redis.Redis(port=port).ping()
                        break
                    except redis.ConnectionError:
                        if time.time() > deadline:
                            raise
                        time.sleep(0.1)
                yield f"127.0.0.1:{port}"
            finally:
                proc.terminate()
                proc.wait(timeout=10)

    return ctx()


SUMMARY_KEYS = {   # summary.json key: (results entry, field)
    "features_p1_eps": ("features_p1", "events_per_second"),
    "features_p2_eps": ("features_p2", "events_per_second"),
    "features_redis_eps": ("features_redis", "events_per_second"),
    "features_sqlite_eps": ("features_sqlite", "events_per_second"),
    "freshness_p50_s": ("freshness", "p50_s"),
    "freshness_p99_s": ("freshness", "p99_s"),
    "naive_features_eps": ("naive", "events_per_second"),
    "sql_ceiling_eps": ("flink_sql", "events_per_second"),
    "outcomes_eps": ("outcomes", "events_per_second"),
    "learner_eps": ("learner", "examples_per_second"),
    "kafka_backfill_eps": ("kafka_backfill", "events_per_second"),
    "kafka_sustained_eps": ("kafka_live", "sustained_events_per_second"),
    "kafka_keeps_up_eps": ("kafka_live", "keeps_up_events_per_second"),
    "kafka_freshness_p50_s": ("kafka_live", "freshness_p50_s"),
    "kafka_freshness_p99_s": ("kafka_live", "freshness_p99_s"),
    "kafka_cpu_us_per_event": ("kafka_live", "cpu_us_per_event"),
}


def write_summary(out: Path, results: dict) -> dict:
    """``<out>/summary.json``: a flat object of numbers (events/s end to end, start-up included;
    freshness in seconds) that other tools read."""
    summary = {"cores": os.cpu_count(), "events": results.get("input_lines")}
    for key, (entry, field) in SUMMARY_KEYS.items():
        v = results.get(entry, {}).get(field)
        if isinstance(v, (int, float)):
            summary[key] = v
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def ratios(results: dict) -> dict:
    out = {}
    for name, (a, b, f) in RATIOS.items():
        if a in results and b in results and results[a].get(f) and results[b].get(f):
            out[name] = round(results[a][f] / results[b][f], 3 if "sql" in name else 2)
    if "learner" in results and "vowpal_wabbit" in results:
        out["learner_job_net_vs_vowpal_wabbit"] = round(results["learner"]["net_examples_per_second"]
                                                        / results["vowpal_wabbit"]["examples_per_second"], 2)
        out["learner_ctr_auc_minus_vowpal_wabbit"] = round(results["learner_engine_only"]["ctr"]["auc"]
                                                           - results["vowpal_wabbit"]["ctr"]["auc"], 4)
    return out


def run_kafka_section(sim: Path, out: Path, results: dict, save, rates, seconds, entry) -> None:
    """The streaming section (tools/bench_kafka.py) on a broker and a Redis server started here."""
    import subprocess

    from tools import broker as broker_ctl
    from tools.bench_kafka import run_kafka_backfill, run_kafka_steps

    if not broker_ctl.jars_present():
        results["kafka_backfill"] = results["kafka_live"] = {"skipped": "no Kafka jars (make kafka-jars)"}
        return
    folder = out / "kafka-broker"
    if folder.exists():
        shutil.rmtree(folder)
    if "features_p2" not in results:           # the file path on the same input, in the same run
        s = run_features(sim, out / "run-features-no-online", write_online=False, parallelism=2)
        results["input_lines"] = s["events_in"]
        results["features_p2"] = {**entry(s["events_in"], s["wall_seconds"]), "reconciles": s["reconciles"],
                                  "stage_seconds": s["stage_seconds"]}
        save()
    b = broker_ctl.start(folder)
    try:
        k = run_kafka_backfill(sim, out / "run-kafka-backfill", b.bootstrap)
        results["kafka_backfill"] = {**entry(k["events"], k["wall_seconds"]), **k}
        save()
        with redis_server() as conn:
            if conn is None:
                results["kafka_live"] = {"skipped": "redis-server not installed (make redis)"}
                return
            port = conn.rsplit(":", 1)[1]
            rpid = int(subprocess.check_output(["pgrep", "-f", f"redis-server .*:{port}"]).split()[0])
            results["kafka_live"] = run_kafka_steps(sim, out, b.bootstrap, b.pid, conn, rpid, rates=rates,
                                                    seconds=seconds, log=lambda m: print(m, file=sys.stderr, flush=True))
            save()
    finally:
        broker_ctl.stop(b)


def main(argv=None) -> None:
    from jobs.config import quiet_third_party_warnings

    quiet_third_party_warnings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--naive-events", type=int, default=50_000)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--kafka-rates", default="2000,5000,10000,20000,30000",
                   help="the paced producer's rates (events/s), stepped up while the job keeps up")
    p.add_argument("--kafka-seconds", type=float, default=180, help="seconds per rate")
    p.add_argument("--only", choices=("all", "features", "outcomes", "learner", "kafka"), default="all",
                   help="features: only the features entries; outcomes: the outcomes and learner entries; "
                        "learner: only the learner entries (the last two on the hand-off of an earlier run "
                        "if there is one)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sim = out / f"sim-{args.events}"
    if not (sim / "truth" / "summary.json").exists():
        from tools.simulate import simulate

        simulate(sim, events=args.events, users=100_000, days=7.0, slice_lines=50_000, seed=7)
    from udfs.ingest import manifest_lines

    if not manifest_lines(sim):
        raise SystemExit(f"{sim} was made by an older simulator; delete it and run again")
    cfg = load_config()
    os.environ["STREAMLIFT_PATHS__DATA_DIR"] = str(out / "startup")

    results = {"machine": f"{os.cpu_count()} cores", "input_lines": None}
    if args.only in ("outcomes", "learner") and (out / "features.json").exists():
        results = json.loads((out / "features.json").read_text())
    startup = startup_seconds(cfg)
    results["startup_seconds"] = round(startup, 2)

    def entry(n, wall):
        net = wall - startup
        # a job that ends within a second of an empty job's start-up has no meaningful net rate
        return {"events": n, "wall_seconds": round(wall, 2), "events_per_second": round(n / wall),
                "net_events_per_second": round(n / net) if net > 1.0 else None}

    reported = set(results)

    def save():
        """Write the results so far, and say on stderr which runs just finished (a long bench is
        never silent; each job also prints progress lines on a terminal: jobs/progress.py)."""
        (out / "features.json").write_text(json.dumps(results, indent=2))
        for k in [k for k in results if k not in reported]:
            reported.add(k)
            v = results[k]
            rate = v.get("events_per_second") or v.get("examples_per_second") if isinstance(v, dict) else None
            wall = v.get("wall_seconds") if isinstance(v, dict) else None
            print(f"bench: {k} done" + (f", {rate:,}/s" if rate else "") + (f" in {wall} s" if wall else ""),
                  file=sys.stderr, flush=True)

    print(f"bench: {args.events:,} events in {sim}; start-up of an empty job {startup:.1f} s", file=sys.stderr,
          flush=True)

    if args.only in ("all", "features", "kafka"):
        run_kafka_section(sim, out, results, save, [float(r) for r in args.kafka_rates.split(",")],
                          args.kafka_seconds, entry)
    if args.only == "kafka":
        write_summary(out, results)
        print(json.dumps({k: results[k] for k in ("kafka_backfill", "kafka_live") if k in results}, indent=2))
        return
    handoff = out / "run-features-no-online"
    if args.only in ("all", "features") or not (handoff / "handoff").exists():
        # parallelism 1 and 2 without online writes, same input, same run
        for p_ in (1, 2):
            s = run_features(sim, out / f"run-features-p{p_}" if p_ == 1 else handoff, write_online=False,
                             parallelism=p_)
            results["input_lines"] = s["events_in"]
            results[f"features_p{p_}"] = {**entry(s["events_in"], s["wall_seconds"]), "reconciles": s["reconciles"],
                                          "stage_seconds": s["stage_seconds"]}
            save()
        results["features_no_online"] = results["features_p2"]
        s = run_features(sim, out / "run-features", write_online=True, parallelism=2)
        results["features_sqlite"] = {**entry(s["events_in"], s["wall_seconds"]),
                                      "online_rows": sum(s["feature_rows_online"].values()),
                                      "reconciles": s["reconciles"], "stage_seconds": s["stage_seconds"]}
        results["features"] = results["features_sqlite"]
        save()
        with redis_server() as conn:
            if conn is None:
                results["features_redis"] = {"skipped": "redis-server not installed (make redis)"}
            else:
                s = run_features(sim, out / "run-features-redis", write_online=True, parallelism=2,
                                 env={"STREAMLIFT_FEAST__ONLINE_STORE": "redis",
                                      "STREAMLIFT_FEAST__REDIS_CONNECTION": conn})
                results["features_redis"] = {**entry(s["events_in"], s["wall_seconds"]),
                                             "online_rows": sum(s["feature_rows_online"].values()),
                                             "reconciles": s["reconciles"], "stage_seconds": s["stage_seconds"]}
                save()
                rate = results["features_redis"]["net_events_per_second"] or results["features_redis"]["events_per_second"]
                results["freshness"] = run_freshness(sim, out / "run-freshness", conn, rate / 2)
            save()
        n, wall = run_naive(cfg, sim, args.naive_events)
        results["naive"] = entry(n, wall)
        save()
        results["engine_only_python"] = run_engine_only(cfg, sim)
        results["sharding"] = shard_balance(cfg, sim, shards=4)
        save()
        n, wall = run_flink_sql(sim)
        results["flink_sql"] = entry(n, wall)
        p2 = results["features_p2"]
        results["projection"] = projection(p2["events"], p2["stage_seconds"], p2["wall_seconds"] - startup)
        save()
    if args.only == "features":
        write_summary(out, results)
        print(json.dumps(json.loads((out / "summary.json").read_text()), indent=2))
        return
    if args.only in ("all", "outcomes"):
        o = run_outcomes(out / "run-features-no-online", out / "run-outcomes")
        results["outcomes"] = {**entry(o["events"], o["wall_seconds"]), "epochs": o["epochs"],
                               "commit_seconds": o["commit_seconds"], "engine_seconds": o["engine_seconds"],
                               "write_seconds": o.get("write_seconds"), "rows_last_epoch": o["rows_last_epoch"]}
        save()
        n, wall = run_outcomes_naive(cfg, out / "run-features-no-online", args.naive_events)
        results["outcomes_naive"] = entry(n, wall)
        save()
        results["outcomes_engine_only"] = run_outcomes_engine_only(cfg, out / "run-features-no-online")
        save()
    lj = run_learner(out / "run-features-no-online", out / "run-learner")
    n = handoff_decisions(out / "run-features-no-online")
    results["learner"] = {"examples": n, "wall_seconds": lj["wall_seconds"],
                          "examples_per_second": round(n / lj["wall_seconds"]),
                          "net_examples_per_second": round(n / (lj["wall_seconds"] - startup)),
                          "learner_seconds": lj["learner_seconds"], "snapshots": lj["snapshots"]}
    save()
    from tools.evaluate import truth_labels
    from udfs.features import parse_duration

    truth = truth_labels(cfg, sim)
    t0 = int(truth.event_time.min()) + parse_duration("1d")
    results["learner_engine_only"] = run_learner_engine_only(cfg, out / "run-features-no-online", truth, t0)
    save()
    results["vowpal_wabbit"] = run_vowpal(cfg, out / "run-features-no-online", truth, t0)
    save()
    results["ratios"] = ratios(results)
    results["projection_all"] = projection_all(results, startup)
    save()
    write_summary(out, results)
    print("\n== make bench: features job (events/s, net of start-up %.1f s) ==" % startup)
    for k in ("features_p1", "features_p2", "features_sqlite", "features_redis", "naive", "flink_sql",
              "outcomes", "outcomes_naive"):
        if k not in results or "events" not in results[k]:
            continue
        r = results[k]
        print(f"{k:<20} {r['events']:>10,} events  {r['wall_seconds']:>7.1f} s  "
              f"{r['events_per_second']:>9,}/s end to end  {r['net_events_per_second'] or '-':>9}/s net")
    for k, v in results["ratios"].items():
        print(f"{k:<34} {v}")
    if "freshness" in results:
        f = results["freshness"]
        print(f"freshness (Redis, paced at {f['paced_events_per_second']:,}/s): p50 {f.get('p50_s')} s, "
              f"p99 {f.get('p99_s')} s over {f.get('rows', 0):,} online rows")
    if "sharding" in results:
        sh = results["sharding"]
        print(f"sharding: engine CPU at {sh['shards']} shards / 1 shard = {sh['cpu_ratio']}; busiest shard "
              f"{sh['busiest_accumulate_share']:.0%} of the accumulator rows, {sh['busiest_attribution_share']:.0%} "
              f"of the attribution events")
    for job, by_cores in results.get("projection_all", {}).items():
        print(f"PROJECTION (not measured) {job}: " + ", ".join(f"{c} cores {v:,}/s" for c, v in by_cores.items()))
    if "engine_only_python" in results:
        e = results["engine_only_python"]
        print(f"without Flink, one core: read+validate {e['read_validate_events_per_second']:,}/s, "
              f"engine {e['engine_events_per_second']:,}/s")
    if "outcomes_engine_only" in results:
        e = results["outcomes_engine_only"]
        o = results["outcomes"]
        print(f"outcomes: {o['epochs']} epochs, Iceberg commits {o['commit_seconds']} s, engine {o['engine_seconds']} s; "
              f"without Flink: read {e['read_events_per_second']:,}/s, engine {e['engine_events_per_second']:,}/s")
    lj = results["learner"]
    print("\n== learner (examples/s; an example is a decision scored, then trained) ==")
    print(f"learner job          {lj['examples']:>10,} examples {lj['wall_seconds']:>7.1f} s  "
          f"{lj['examples_per_second']:>9,}/s end to end  {lj['net_examples_per_second']:>9,}/s net  "
          f"(learner itself {lj['learner_seconds']} s)")
    for k in ("learner_engine_only", "vowpal_wabbit"):
        r, c = results[k], results[k]["ctr"]
        print(f"{k:<20} {r['examples']:>10,} examples {r['seconds']:>7.1f} s  {r['examples_per_second']:>9,}/s  "
              f"CTR AUC {c['auc']:.4f}  log loss {c['log_loss']:.4f}  ECE {c['ece']:.4f}  (n={c['n']:,})")
    print(f"written to {out / 'features.json'}")


if __name__ == "__main__":
    main()
