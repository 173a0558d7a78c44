"""make bench: the features and outcomes jobs against naive per-event-state variants (and the
features job against the Flink SQL ceiling).

All variants read the same simulated input in the same run, on the local
mini-cluster with checkpointing on:

* ``features``            the job as shipped, Feast online store on SQLite;
* ``features_no_online``  the same job writing only the offline store and the enriched decisions;
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
                          protocol as the CTR model (udfs.baselines.VowpalCTR), in process.

Each job is reported as events/s end to end and *net* of the start-up time of an
empty job measured in the same run; ratios are net/net. The learners are reported in
examples/s (an example: one decision scored first, then trained on its labels) and
their CTR quality (AUC, log loss, ECE on the treatment arm after the first day). Results go to
``<out>/features.json``.

    python -m jobs.bench --events 1000000 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def run_features(sim: Path, data: Path, write_online: bool) -> dict:
    from jobs.features import run

    if data.exists():
        shutil.rmtree(data)
    cfg = load_config(env={**os.environ, "STREAMLIFT_PATHS__DATA_DIR": str(data),
                           "STREAMLIFT_FEAST__WRITE_ONLINE": str(write_online).lower()})
    return run(cfg, sim)


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
    from jobs.evaluate import ctr_quality, learn_all
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
    from jobs.evaluate import ctr_quality, vw_scores

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
    "features_vs_naive": ("features", "naive", "net_events_per_second"),
    "features_no_online_vs_naive": ("features_no_online", "naive", "net_events_per_second"),
    # against Flink SQL end to end: the SQL job is over within about a second of its start-up
    "features_vs_flink_sql_end_to_end": ("features", "flink_sql", "events_per_second"),
    "features_no_online_vs_flink_sql_end_to_end": ("features_no_online", "flink_sql", "events_per_second"),
    "outcomes_vs_outcomes_naive": ("outcomes", "outcomes_naive", "net_events_per_second"),
    "outcomes_vs_outcomes_naive_end_to_end": ("outcomes", "outcomes_naive", "events_per_second"),
    "learner_engine_vs_vowpal_wabbit": ("learner_engine_only", "vowpal_wabbit", "examples_per_second"),
}


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--naive-events", type=int, default=50_000)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--only", choices=("all", "learner"), default="all",
                   help="learner: only the learner entries (on the hand-off of an earlier run if there is one)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sim = out / f"sim-{args.events}"
    if not (sim / "truth" / "summary.json").exists():
        from jobs.simulate import simulate

        simulate(sim, events=args.events, users=100_000, days=7.0, slice_lines=50_000, seed=7)
    from udfs.ingest import manifest_lines

    if not manifest_lines(sim):
        raise SystemExit(f"{sim} was made by an older simulator; delete it and run again")
    cfg = load_config()
    os.environ["STREAMLIFT_PATHS__DATA_DIR"] = str(out / "startup")

    results = {"machine": f"{os.cpu_count()} cores", "input_lines": None}
    if args.only == "learner" and (out / "features.json").exists():
        results = json.loads((out / "features.json").read_text())
    startup = startup_seconds(cfg)
    results["startup_seconds"] = round(startup, 2)

    def entry(n, wall):
        net = wall - startup
        # a job that ends within a second of an empty job's start-up has no meaningful net rate
        return {"events": n, "wall_seconds": round(wall, 2), "events_per_second": round(n / wall),
                "net_events_per_second": round(n / net) if net > 1.0 else None}

    def save():
        (out / "features.json").write_text(json.dumps(results, indent=2))

    handoff = out / "run-features-no-online"
    if args.only == "all" or not (handoff / "handoff").exists():
        s = run_features(sim, out / "run-features", write_online=True)
        results["input_lines"] = s["events_in"]
        results["features"] = {**entry(s["events_in"], s["wall_seconds"]),
                               "online_rows": sum(s["feature_rows_online"].values()), "reconciles": s["reconciles"]}
        save()
        s2 = run_features(sim, out / "run-features-no-online", write_online=False)
        results["features_no_online"] = {**entry(s2["events_in"], s2["wall_seconds"]),
                                         "reconciles": s2["reconciles"]}
        save()
        n, wall = run_naive(cfg, sim, args.naive_events)
        results["naive"] = entry(n, wall)
        save()
        results["engine_only_python"] = run_engine_only(cfg, sim)
        save()
        n, wall = run_flink_sql(sim)
        results["flink_sql"] = entry(n, wall)
        save()
        o = run_outcomes(out / "run-features-no-online", out / "run-outcomes")
        results["outcomes"] = {**entry(o["events"], o["wall_seconds"]), "epochs": o["epochs"],
                               "commit_seconds": o["commit_seconds"], "engine_seconds": o["engine_seconds"],
                               "rows_last_epoch": o["rows_last_epoch"]}
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
    from jobs.evaluate import truth_labels
    from udfs.features import parse_duration

    truth = truth_labels(cfg, sim)
    t0 = int(truth.event_time.min()) + parse_duration("1d")
    results["learner_engine_only"] = run_learner_engine_only(cfg, out / "run-features-no-online", truth, t0)
    save()
    results["vowpal_wabbit"] = run_vowpal(cfg, out / "run-features-no-online", truth, t0)
    save()
    results["ratios"] = ratios(results)
    save()
    print("\n== make bench: features job (events/s, net of start-up %.1f s) ==" % startup)
    for k in ("features", "features_no_online", "naive", "flink_sql", "outcomes", "outcomes_naive"):
        if k not in results:
            continue
        r = results[k]
        print(f"{k:<20} {r['events']:>10,} events  {r['wall_seconds']:>7.1f} s  "
              f"{r['events_per_second']:>9,}/s end to end  {r['net_events_per_second'] or '-':>9}/s net")
    for k, v in results["ratios"].items():
        print(f"{k:<34} {v}")
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
