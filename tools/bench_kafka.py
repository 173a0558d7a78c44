"""make bench, streaming section: the features job reading a real Kafka broker.

* ``kafka_backfill``  the bounded input of the file runs, replayed into topics, then the job with
                      ``--until latest`` (parallelism 2, no online writes): beside ``features_p2``;
* ``kafka_steps``     a paced producer writes to Kafka at rate R with event time = send time; the
                      job (parallelism 2, Feast online on Redis) runs unbounded. Freshness: from a
                      decision's send to its user's value being readable through Feast's
                      ``get_online_features`` (a sample of decisions, polled every 50 ms); lag:
                      records sent minus records the job has accounted for. Measured in the
                      steady state: after the job's first slice and WARM_S seconds at R. The job
                      keeps up at R when the lag stays bounded; it meets the objective when
                      freshness p99 <= 2 s too; R is stepped up. kafka.idle_timeout is 1 s here:
                      the watermark is the minimum over every partition, and the sparse ones
                      (conversions) would otherwise hold it back for the whole timeout;
* ``kafka_cpu``       CPU per event of each process at each R (from /proc: the Flink JVM, each
                      Python worker, the broker, Redis, the producer), and the CPU of a nearly
                      empty batch (a trickle of 100 events/s: about 100 events per window).

Broker, Redis, producer and job all run on this machine. ``python -m tools.bench --only kafka``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import orjson

from jobs.config import ROOT
from jobs.config import load as load_config
from udfs.spec import parse_duration

__all__ = ["run_kafka_backfill", "run_kafka_steps", "proc_cpu", "descendants"]

TICK = os.sysconf("SC_CLK_TCK")
#: seconds of trickle after the job's first slice before a step is measured
WARM_S = 30


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def proc_cpu(pid: int) -> tuple[str, float]:
    """(name, CPU seconds so far) of a process from /proc (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone", 0.0
    fields = stat.rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK
    exe = Path(cmd[0].decode(errors="replace")).name if cmd and cmd[0] else "?"
    if exe == "java":
        name = "broker (java)" if any(b"kafka.Kafka" in c for c in cmd) else "flink (java)"
    elif exe.startswith("python"):
        name = "python worker" if any(b"pyflink" in c or b"beam" in c for c in cmd) else "job driver (python)"
    else:
        name = exe
    return name, cpu


def cpu_by_process(pids: dict) -> dict:
    """{label: CPU seconds} for {label: pid} (a label ending in '*' takes the whole tree)."""
    out = {}
    for label, pid in pids.items():
        if label.endswith("*"):
            for p in descendants(pid):
                name, cpu = proc_cpu(p)
                key = f"{name} {p}"
                out[key] = out.get(key, 0.0) + cpu
        else:
            out[label] = proc_cpu(pid)[1]
    return out


def _cpu_delta(before: dict, after: dict) -> dict:
    return {k: round(after[k] - before.get(k, 0.0), 2) for k in after if after[k] - before.get(k, 0.0) > 0.005}


def run_kafka_backfill(sim: Path, data: Path, bootstrap: str, parallelism: int = 2,
                       batch_interval: str = "6h") -> dict:
    """The bounded input of the file runs through Kafka: replay (timed separately), then the job."""
    from jobs.features import run
    from tools.produce import create_topics, replay

    if data.exists():
        shutil.rmtree(data)
    env = {**os.environ, "STREAMLIFT_PATHS__DATA_DIR": str(data), "STREAMLIFT_FEAST__WRITE_ONLINE": "false",
           "STREAMLIFT_FLINK__PARALLELISM": str(parallelism), "STREAMLIFT_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
           "STREAMLIFT_KAFKA__TOPIC_PREFIX": "bench-backfill.", "STREAMLIFT_KAFKA__BATCH_INTERVAL": batch_interval}
    cfg = load_config(env=env)
    create_topics(cfg)
    produced = replay(cfg, sim)
    s = run(cfg, None, kafka={"bootstrap": bootstrap, "until": "latest"})
    return {"events": s["events_in"], "wall_seconds": s["wall_seconds"], "events_per_second": s["events_per_second"],
            "slices": s["slices"], "reconciles": s["reconciles"], "batch_interval": batch_interval,
            "replay_records_per_second": produced["records_per_second"]}


class _Templates:
    """Decisions and clicks from the simulator's files, replayed forever with fresh ids per loop
    and event time = send time."""

    def __init__(self, sim: Path, limit: int = 400_000):
        from schemas import CONTRACTS
        from tools.produce import slice_lines
        from udfs.ingest import VALIDATORS

        self.items = []
        seen = set()
        for stream, line in slice_lines(sim):
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("event_time"), int) and obj.get("decision_id"):
                # the simulator's duplicates and malformed records go out too (they are traffic),
                # but only a valid first copy can be a freshness sample: the others never show up
                key = (stream, obj.get(CONTRACTS[stream].id_field))
                ok = key not in seen and not VALIDATORS[stream].parse_lines([line])[1]
                seen.add(key)
                self.items.append((stream, obj, ok))
            if len(self.items) >= limit:
                break

    def __iter__(self):
        loop = 0
        while True:
            for stream, obj, ok in self.items:
                rec = dict(obj)
                if loop:
                    rec["decision_id"] = f"{rec['decision_id']}_{loop}"
                    if "event_id" in rec:
                        rec["event_id"] = f"{rec['event_id']}_{loop}"
                yield stream, rec, ok
            loop += 1


def _producer_loop(cfg, bootstrap, templates, rate, seconds, on_decision, stop, sent):
    from jobs.kafka import topics
    from tools.produce import producer

    names = {s: t for t, s in topics(cfg).items()}
    p = producer(cfg, bootstrap, **{"linger.ms": 5})
    t0, n = time.time(), 0
    it = iter(templates)
    while not stop.is_set() and time.time() - t0 < seconds:
        due = int((time.time() - t0) * rate) - n
        if due <= 0:
            time.sleep(0.002)
            continue
        now = int(time.time() * 1000)
        for _ in range(min(due, 5000)):
            stream, rec, ok = next(it)
            rec["event_time"] = now
            while True:
                try:
                    p.produce(names[stream], value=orjson.dumps(rec), key=rec["decision_id"].encode(), timestamp=now)
                    break
                except BufferError:
                    p.poll(0.01)
            if stream == "decision" and ok:
                on_decision(rec, now)
            n += 1
        sent[0] = n
        p.poll(0)
    p.flush(30)
    sent[0] = n


def _ms(ts):
    """An event timestamp as Feast returns it (Timestamp, datetime or epoch seconds) -> ms, or None."""
    if ts is None or (isinstance(ts, float) and np.isnan(ts)):
        return None
    if hasattr(ts, "timestamp"):
        return int(ts.timestamp() * 1000)
    return int(ts) * 1000 if int(ts) < 10 ** 11 else int(ts)


def _processed(stats_dir: Path, seen: dict) -> int:
    """Records the job has accounted for so far (the per-slice stats it wrote)."""
    for f in stats_dir.glob("slice-*.json"):
        if f.name not in seen:
            try:
                seen[f.name] = sum(json.loads(f.read_text())["in"].values())
            except (OSError, ValueError, KeyError):
                continue
    return sum(seen.values())


def _step(sim_templates, cfg_env: dict, bootstrap: str, redis: str, broker_pid: int, redis_pid: int,
          rate: float, seconds: float, data: Path, prefix: str) -> dict:
    """One rate: a fresh data dir and topics, the job started unbounded, the producer paced."""
    from jobs.config import load
    from stores.feast_store import open_store
    from tools.produce import create_topics

    if data.exists():
        shutil.rmtree(data)
    env = {**os.environ, **cfg_env, "STREAMLIFT_PATHS__DATA_DIR": str(data), "STREAMLIFT_KAFKA__TOPIC_PREFIX": prefix,
           "PYTHONPATH": str(ROOT)}
    cfg = load(env=env)
    create_topics(cfg)
    log = open(data.parent / f"{data.name}.log", "wb") if data.parent.exists() else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "jobs.features", "--until", "never", "--data-dir", str(data)],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stats_dir = data / "stats"
    samples, fresh, when, never = deque(), [], [], [0]
    lock = threading.Lock()
    k = max(1, int(rate // 40))                 # ~40 sampled decisions per second
    count = [0]

    def on_decision(rec, now):
        count[0] += 1
        # a treatment decision of a consenting user: it moves the user's impressions (the feature read)
        if count[0] % k == 0 and rec.get("consent") and rec.get("user_id") and rec.get("arm") == "treatment":
            with lock:
                samples.append((rec["user_id"], now))

    stop, sent = threading.Event(), [0]
    # one pass over the templates for every phase: a phase starting them over would send the
    # warm-up's ids again (duplicates, never readable as fresh)
    sim_templates = iter(sim_templates)
    try:
        # warm-up: a trickle until the job has written its first slice (start-up is not measured)
        wt = threading.Thread(target=_producer_loop, args=(cfg, bootstrap, sim_templates, 50, 120, lambda r, n: None,
                                                           stop, [0]), daemon=True)
        wt.start()
        deadline = time.time() + 120
        while time.time() < deadline and not list(stats_dir.glob("slice-*.json")):
            if proc.poll() is not None:
                raise RuntimeError(f"the features job exited ({proc.returncode}) during start-up")
            time.sleep(0.5)
        stop.set()
        wt.join()
        # then WARM_S at the step's rate: the JVM's JIT compiles the hot paths in the first tens of
        # seconds (its compiler threads alone took ~35 s of CPU in the first 3 minutes of a
        # profiled run), and the job settles at the rate; measured from there (the steady state)
        stop = threading.Event()
        wt = threading.Thread(target=_producer_loop, args=(cfg, bootstrap, sim_templates, rate, WARM_S,
                                                           lambda r, n: None, stop, [0]), daemon=True)
        wt.start()
        wt.join()
        store = open_store(cfg, apply=False)
        feat = [f"user_features_v1:impressions_1h"]
        seen = {}
        warm = _processed(stats_dir, seen)
        pids = {"broker": broker_pid, "redis": redis_pid, "producer + probe (this process)": os.getpid(),
                "job*": proc.pid}
        cpu0 = cpu_by_process(pids)
        t0 = time.time()
        prod = threading.Thread(target=_producer_loop, args=(cfg, bootstrap, sim_templates, rate, seconds, on_decision,
                                                             stop, sent), daemon=True)
        prod.start()
        lags = []
        while prod.is_alive():
            with lock:
                batch = [samples.popleft() for _ in range(min(len(samples), 64))]
            if batch:
                got = store.get_online_features(features=feat, entity_rows=[{"user_id": u} for u, _ in batch]) \
                    .to_df(include_event_timestamps=True)
                now = time.time() * 1000
                ts_col = f"{feat[0].split(':')[1]}__ts"
                for (u, sent_ms), ts in zip(batch, got[ts_col]):
                    ts_ms = _ms(ts)
                    if ts_ms is not None and ts_ms >= sent_ms - 1000:   # Feast keeps whole seconds
                        fresh.append((now - sent_ms) / 1000.0)
                        when.append((sent_ms / 1000.0 - t0, (now - sent_ms) / 1000.0))
                    elif now - sent_ms < 60_000:
                        with lock:
                            samples.append((u, sent_ms))
                    else:
                        fresh.append(60.0)             # not readable within a minute: counted as such
                        never[0] += 1
            if time.time() - t0 > len(lags):
                lags.append(sent[0] - (_processed(stats_dir, seen) - warm))
            time.sleep(0.05)
        wall = time.time() - t0
        cpu1 = cpu_by_process(pids)
        # what was sent is accounted for within 30 s, if the job kept up; a trickle goes on
        # meanwhile, so that event time moves and the last windows close (as in production)
        trickle = threading.Thread(target=_producer_loop, args=(cfg, bootstrap, sim_templates, 20, 30,
                                                                lambda r, n: None, stop, [0]), daemon=True)
        trickle.start()
        settle = time.time() + 30
        while time.time() < settle and _processed(stats_dir, seen) - warm < sent[0]:
            time.sleep(0.5)
        behind = sent[0] - (_processed(stats_dir, seen) - warm)
    finally:
        stop.set()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    n = sent[0]
    cpu = _cpu_delta(cpu0, cpu1)
    tail = lags[len(lags) // 3:] or [0]
    f = np.array(fresh) if fresh else np.array([np.nan])
    res = {"rate": rate, "seconds": round(wall, 1), "sent": n, "events_per_second": round(n / wall),
           "freshness_samples": int(len(fresh)), "freshness_p50_s": round(float(np.nanpercentile(f, 50)), 3),
           "freshness_p99_s": round(float(np.nanpercentile(f, 99)), 3),
           "lag_records_max": int(max(tail)), "lag_records_last": int(tail[-1]),
           "behind_after_30s": int(behind), "never_readable_in_60s": never[0],
           # freshness over the run: p50 / p99 / max of the decisions sent in each 30 s
           "freshness_by_30s": [[int(b * 30)] + [round(float(np.percentile(v, q)), 2) for q in (50, 99, 100)]
                                for b in sorted({int(t // 30) for t, _ in when})
                                for v in [[f for t, f in when if int(t // 30) == b]]],
           "cpu_seconds": cpu, "cpu_us_per_event": round(sum(cpu.values()) / max(n, 1) * 1e6, 1)}
    # keeping up: the lag never exceeds 10 s of input after the first third and everything is
    # accounted for within 30 s of the end; the objective adds freshness p99 <= 2 s
    res["keeps_up"] = bool(res["lag_records_max"] <= 10 * rate and behind <= 0)
    res["meets_freshness_objective"] = bool(res["keeps_up"] and res["freshness_p99_s"] <= 2.0)
    return res


def run_kafka_steps(sim: Path, out: Path, bootstrap: str, broker_pid: int, redis: str, redis_pid: int,
                    rates=(5_000, 10_000, 20_000, 30_000), seconds: float = 180, log=print) -> dict:
    """Step the producer's rate up while the job keeps up (see the module docstring); then the
    CPU of an empty batch."""
    cfg_env = {"STREAMLIFT_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "STREAMLIFT_FEAST__ONLINE_STORE": "redis",
               "STREAMLIFT_FEAST__REDIS_CONNECTION": redis, "STREAMLIFT_FLINK__PARALLELISM": "2",
               "STREAMLIFT_FEATURES__OUT_OF_ORDERNESS": "200ms", "STREAMLIFT_KAFKA__BATCH_INTERVAL": "1s",
               "STREAMLIFT_KAFKA__IDLE_TIMEOUT": "1s", "STREAMLIFT_FEATURES__ONLINE_EVERY": "1",
               "STREAMLIFT_KAFKA__STARTUP_MODE": "earliest-offset",
               # small slices: the engines' full state snapshot every 120 slices (1 min), not every 8,
               # and a Flink checkpoint every 30 s (each copies the whole heap state)
               "STREAMLIFT_FEATURES__SNAPSHOT_EVERY": "120", "STREAMLIFT_FLINK__SETTINGS": "{execution.checkpointing.interval: 30s}"}
    # a setting given in the environment wins (e.g. STREAMLIFT_KAFKA__IDLE_TIMEOUT=1s): the output says which
    cfg_env = {k: os.environ.get(k, v) for k, v in cfg_env.items()}
    templates = _Templates(sim)
    steps, best, kept = [], None, None
    for i, r in enumerate(rates):
        res = _step(templates, cfg_env, bootstrap, redis, broker_pid, redis_pid, r, seconds,
                    out / f"run-kafka-live-{r}", f"bench-live-{i}-{int(time.time())}.")
        steps.append(res)
        log(f"bench: kafka live at {r:,}/s: freshness p50 {res['freshness_p50_s']} s, p99 {res['freshness_p99_s']} s, "
            f"max lag {res['lag_records_max']:,} records, keeps up: {res['keeps_up']}, "
            f"freshness objective: {res['meets_freshness_objective']}")
        if res["keeps_up"]:
            kept = res
            if res["meets_freshness_objective"]:
                best = res
        else:
            break
    idle = _step(templates, cfg_env, bootstrap, redis, broker_pid, redis_pid, 100, min(seconds, 60),
                 out / "run-kafka-trickle", f"bench-trickle-{int(time.time())}.")
    interval_s = parse_duration(cfg_env["STREAMLIFT_KAFKA__BATCH_INTERVAL"]) / 1000
    job_cpu = sum(v for k, v in idle["cpu_seconds"].items() if not k.startswith(("broker", "redis", "producer")))
    empty = {"rate": 100, "job_cpu_seconds": round(job_cpu, 2), "seconds": idle["seconds"],
             "cpu_ms_per_batch_interval": round(job_cpu / (idle["seconds"] / interval_s) * 1000, 1),
             "batch_interval_s": interval_s}
    # the figures at the highest rate that met the objective, else at the highest that kept up
    at = best or kept
    return {"steps": steps, "sustained_events_per_second": best["events_per_second"] if best else None,
            "keeps_up_events_per_second": kept["events_per_second"] if kept else None,
            "freshness_p50_s": at["freshness_p50_s"] if at else None,
            "freshness_p99_s": at["freshness_p99_s"] if at else None,
            "cpu_us_per_event": at["cpu_us_per_event"] if at else None, "empty_batch": empty,
            "settings": {k.replace("STREAMLIFT_", "").lower(): v for k, v in cfg_env.items()
                         if "BOOTSTRAP" not in k and "REDIS_CONNECTION" not in k}}
