"""outcomes: decisions joined to their clicks and conversions, with survival-based
delayed labels, committed exactly once to Iceberg; sharded by decision id at the configured
parallelism P (``parallelism.default``, ``flink run -p``, or ``STREAMLIFT_FLINK__PARALLELISM``).

::

    FileSource(<features data>/handoff)   one JSON line per slice of the features job (bounded, or --follow)
      │ str
      ▼ read-split      [Python × P]   read the slice's enriched decisions and attributed outcomes
      │                                (Parquet), split them by hash(decision_id)
      ▼ key_by(shard)
      ▼ outcome-shard   [Python × P]   udfs.outcomes.OutcomeShard: join, dedupe, windows; at each epoch
      │                                (every outcomes.commit_every of event time, and at end of input)
      │                                its held rows and the delay model's sufficient statistics
      ▼ key_by(labeller)               statistics to every labeller, rows to the shard's own
      ▼ label-write     [Python × P]   udfs.outcomes.EpochLabeller: the same delay fit in every labeller
      │                                from the summed statistics; labels its rows and writes their data
      │                                files (one per day partition) into the table's folder, uncommitted
      ▼ key_by(0)
      ▼ commit          [Python × 1]   udfs.outcomes.EpochCommitter: once every labeller's files of the
                                       epoch are in, one Iceberg commit per table stamped with the epoch:
                                       outcomes_v1 (open day partitions replaced by the new files),
                                       delay_models_v1, quarantine_v1

Exactly once without checkpoint hooks: every commit is stamped with its epoch (the
event-time clock of the cut) and skipped if the table already has it; data files have
deterministic names (epoch, shard), so a retried epoch rewrites the same files; a crash
between the writers' files and the commit (tested with SIGKILL there) restarts from the
last checkpoint, the epoch is cut and written again, and committed once.

    python -m jobs.outcomes --input data/run               # bounded: every slice handed off so far
    python -m jobs.outcomes --input data/run --follow      # keep taking slices as they are handed off
    flink run -p 2 -py jobs/outcomes.py -pyfs schemas,udfs,jobs,stores,serving -- --input ...   (see Makefile)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file by `flink run -py jobs/outcomes.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.config import Config  # noqa: E402

__all__ = ["run", "commit", "summarize"]


def stats_dir(cfg: Config) -> Path:
    return cfg.data_dir / "outcomes"


def commit(cfg: Config, tables: dict, epoch, timing: dict | None = None) -> dict:
    """Commit one epoch to the three tables (each skips an epoch it already has). The outcome
    rows come as the data files the labellers wrote (``epoch.files``) or as a table."""
    from stores.iceberg_store import commit_append, commit_day_files, commit_partitions
    from jobs.sinks import atomic_write

    t0 = time.perf_counter()
    _crash_point("before_commit", epoch)
    if epoch.outcomes is None:
        out = commit_day_files(tables["outcome"], epoch.days, epoch.files, epoch.epoch, "decision_time")
    else:
        out = commit_partitions(tables["outcome"], epoch.outcomes, epoch.epoch, "decision_time")
    done = {"quarantine": commit_append(tables["quarantine"], epoch.quarantine, epoch.epoch),
            "delay_model": commit_append(tables["delay_model"], epoch.delay_models, epoch.epoch),
            "outcome": out}
    stats = {"epoch": epoch.epoch, "seq": epoch.seq, "committed": done, **epoch.counts,
             "timing": {**(timing or {}), "commit_s": round(time.perf_counter() - t0, 3)}}
    atomic_write(stats_dir(cfg) / f"epoch-{epoch.epoch}.json", json.dumps(stats).encode())
    return stats


def _crash_point(name: str, epoch) -> None:
    """Fault injection for tests: with STREAMLIFT_CRASH_AT=<name>:<epoch> the Python worker
    kills itself (SIGKILL) at that point, once (STREAMLIFT_CRASH_MARKER: a file made first); with
    STREAMLIFT_CRASH_MODE=raise it raises there every time (a job that cannot succeed)."""
    import os

    want = os.environ.get("STREAMLIFT_CRASH_AT")
    if not want or want != f"{name}:{epoch.epoch}":
        return
    if os.environ.get("STREAMLIFT_CRASH_MODE") == "raise":
        raise RuntimeError(f"injected failure at {name} of epoch {epoch.epoch}")
    marker = os.environ.get("STREAMLIFT_CRASH_MARKER")
    if not marker or os.path.exists(marker):
        return
    Path(marker).write_text(f"{name} {epoch.epoch} {len(epoch.files)} files written\n")
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


_TABLES = {}


def _tables(cfg: Config) -> dict:
    from stores.iceberg_store import open_tables

    key = str(cfg.data_dir)
    if key not in _TABLES:
        _TABLES[key] = open_tables(cfg)
    return _TABLES[key]


def build(env, cfg: Config, input_dir: Path, follow: bool = False, kafka: dict | None = None):
    """Wire the job into ``env``; returns the per-epoch stats (JSON strings)."""
    import pickle

    from pyflink.common import Types
    from pyflink.datastream import FlatMapFunction, MapFunction

    from jobs.flink_env import handoff_input, handoff_value, parallelism, shard_keys, stage_function
    from stores.iceberg_store import last_epoch, write_day_files
    from udfs.outcomes import (DECISION_COLUMNS, EpochCommitter, EpochLabeller, EpochPart, OutcomeEngine,
                               OutcomeShard, split_handoff)

    p = parallelism(cfg, env)
    env.set_parallelism(p)
    template = OutcomeEngine(**cfg.outcome_params(), shards=p)
    keys = shard_keys(p, env)
    shard_of_key = {k: s for s, k in enumerate(keys)}

    def keyed():
        return Types.TUPLE([Types.INT(), Types.PICKLED_BYTE_ARRAY()])

    class ReadSplit(FlatMapFunction):
        def flat_map(self, line):
            from udfs.ingest import read_handoff

            t0 = time.perf_counter()
            h = read_handoff(handoff_value(line))
            decisions = h.decisions
            if decisions is not None:        # the outcome rows carry these; not the 27 features
                decisions = decisions.select([c for c in DECISION_COLUMNS if c in decisions.column_names])
            parts = split_handoff(h.seq, decisions, h.outcomes, h.clock, h.final, h.quarantined, p)
            parts[0].read_s = round(time.perf_counter() - t0, 3)
            for i, part in enumerate(parts):
                yield keys[i], pickle.dumps(part, protocol=5)

    def shard_take(stage, blob, timing):
        part = pickle.loads(blob)
        t0 = time.perf_counter()
        outs = stage.offer(part.seq, 0, part)
        for o in outs:
            o.counts["engine_s"] = round(time.perf_counter() - t0, 3)
        return outs

    def shard_emit(ep, timing):
        for j in range(p):           # statistics to every labeller, the rows to the shard's own
            part = ep if j == ep.shard else EpochPart(ep.index, ep.epoch, ep.seq, ep.shard, ep.active,
                                                      ep.stats, None, [], ep.counts)
            yield None, (keys[j], pickle.dumps(part, protocol=5))

    from udfs.privacy import FORGET_FILE, ForgetList, blank_forgotten_arrow

    # a user forgotten after their decisions entered this job's state: their user id is blanked
    # in the rows written (as for a user without consent; tools.privacy forget)
    forget = ForgetList(cfg.data_dir / FORGET_FILE, str(cfg.privacy["quarantine_key"]))

    def label_take(stage, blob, timing):
        part = pickle.loads(blob)
        return stage.offer(part.index, part.shard, part)

    def label_emit(lp, timing):
        table = _tables(cfg)["outcome"]
        if not lp.skip:             # the data files of this shard's rows, written, not committed
            lp.outcomes = blank_forgotten_arrow(lp.outcomes, forget)
            t0 = time.perf_counter()
            table.refresh()
            done = last_epoch(table)
            # an epoch already committed (a replay) keeps its files untouched; the committer skips it
            lp.files = [] if done is not None and lp.epoch <= done else \
                write_day_files(table, lp.outcomes, lp.epoch, "decision_time", tag=f"shard{lp.shard}")
            lp.outcomes = None
            lp.counts = {**lp.counts, "write_s": round(time.perf_counter() - t0, 3)}
        yield None, (0, pickle.dumps(lp, protocol=5))

    def shard_observe(stage, outs, metrics):
        if stage.clock is not None:
            metrics.set("event_clock_ms", stage.clock)
            if stage.last_epoch is not None:       # event time the input is ahead of the last cut epoch
                metrics.set("epoch_lag_ms", stage.clock - stage.last_epoch)

    class EpochQuality(MapFunction):
        """After each committed epoch: the job's counters, and (outcomes.data_quality) the epoch
        suites on the rows it committed. A broken expectation is counted, alerted and written to
        dq_results_v1; the data stays, and the job goes on."""

        def open(self, ctx):
            from jobs.flink_env import JobMetrics

            self.metrics = JobMetrics(ctx, "epoch-quality")

        def map(self, line):
            stats = json.loads(line)
            m = self.metrics
            committed = stats.get("committed", {}).get("outcome")
            if committed:
                m.inc("epochs_committed")
                m.inc("rows_committed", stats.get("rows", 0))
                m.inc("quarantined", stats.get("quarantined", 0))
                m.set("last_epoch_ms", stats["epoch"])
                m.set("interim_rows", stats.get("interim", 0))
            if committed and cfg.outcomes.get("data_quality", True):
                from jobs.dq import validate_epoch
                from jobs.sinks import atomic_write, record_alert

                dq = validate_epoch(cfg, stats["epoch"])
                m.inc("dq_runs")
                m.inc("dq_broken", dq["failed"])
                stats["data_quality"] = {"success": dq["success"], "failed": dq["failed"], "run_id": dq["run_id"]}
                atomic_write(stats_dir(cfg) / f"dq-{stats['epoch']}.json", json.dumps(dq, default=str).encode())
                if not dq["success"]:
                    broken = [f"{n}: {f['expectation']} {f['column']}" for n, r in dq["suites"].items()
                              for f in r["failed"]]
                    record_alert(cfg, "data-quality", {"seq": stats["epoch"], "run_id": dq["run_id"],
                                                       "broken": broken})
            return json.dumps(stats)

    def commit_take(stage, blob, timing):
        lp = pickle.loads(blob)
        return stage.offer(lp.index, lp.shard, lp)

    def commit_emit(epoch, timing):
        yield None, json.dumps(commit(cfg, _tables(cfg), epoch, timing))

    lines = handoff_input(env, cfg, input_dir, follow, kafka, "outcomes")
    parts = (lines.flat_map(ReadSplit(), output_type=keyed()).name("read-split").uid("read-split")
             .set_parallelism(p))
    cut = (parts.key_by(lambda t: t[0], key_type=Types.INT())
           .process(stage_function("outcomes", OutcomeShard, lambda k: template.shard_params(shard_of_key[k]),
                                   shard_take, shard_emit, flush_at_end=True, errors_dir=cfg.data_dir,
                                   observe=shard_observe, operator="outcome-shard"),
                    output_type=keyed())
           .name("outcome-shard").uid("outcome-shard").set_parallelism(p))
    labelled = (cut.key_by(lambda t: t[0], key_type=Types.INT())
                .process(stage_function("labeller", EpochLabeller,
                                        lambda k: template.labeller_params(shard_of_key[k]),
                                        label_take, label_emit, errors_dir=cfg.data_dir), output_type=keyed())
                .name("label-write").uid("label-write").set_parallelism(p))
    committed = (labelled.key_by(lambda t: t[0], key_type=Types.INT())
                 .process(stage_function("committer", EpochCommitter, lambda k: {"shards": p},
                                         commit_take, commit_emit, errors_dir=cfg.data_dir),
                          output_type=Types.STRING())
                 .name("commit").uid("commit").set_parallelism(1))
    return committed.map(EpochQuality(), output_type=Types.STRING()).name("epoch-quality") \
        .uid("epoch-quality").set_parallelism(1)


def summarize(cfg: Config) -> dict:
    """The newest epoch's counts and the engine's totals (which must reconcile)."""
    files = sorted(stats_dir(cfg).glob("epoch-*.json"), key=lambda p: int(p.stem[6:]))
    epochs = [json.loads(f.read_text()) for f in files]
    if not epochs:
        return {"epochs": 0}
    last = epochs[-1]
    from udfs.outcomes import stream_warnings

    table = _tables(cfg)["outcome"]
    table.refresh()
    cols = ("arm", "label_status", "campaign_id", "creative_id", "propensity")
    warnings = stream_warnings(table.scan(selected_fields=cols).to_arrow(), last.get("totals"))
    for w in warnings:
        print(f"outcomes: warning: {w}", file=sys.stderr)
    epoch_dq = [json.loads(f.read_text()) for f in stats_dir(cfg).glob("dq-*.json")]
    return {"epochs": len(epochs), "last_epoch": last["epoch"], "totals": last.get("totals"),
            "warnings": warnings,
            "epoch_data_quality": {"epochs_checked": len(epoch_dq), "failed": sum(d["failed"] for d in epoch_dq)},
            "rows_last_epoch": last["rows"], "interim": last["interim"], "final": last["final"],
            "commit_seconds": round(sum(e["timing"]["commit_s"] for e in epochs), 2),
            "engine_seconds": round(sum(e.get("engine_s", 0) for e in epochs), 2),
            "write_seconds": round(sum(e.get("write_s", 0) for e in epochs), 2)}


def run(cfg: Config, input_dir: Path | None = None, follow: bool = False,
        overrides: dict | None = None, kafka: dict | None = None) -> dict:
    """Run the job (local mini-cluster, or the cluster under ``flink run``) on the hand-off files
    under ``input_dir`` (bounded unless ``follow``) or with ``kafka`` (``{"bootstrap", "until",
    "startup"}``) on the hand-off topic; returns a summary."""
    from jobs.flink_env import run_handoff_job

    res = run_handoff_job(cfg, "outcomes", build, summarize, input_dir, follow, overrides, kafka=kafka)
    if cfg.outcomes.get("data_quality", True) and not follow:
        # the last step: the Great Expectations suites on the committed tables (jobs/dq.py); a
        # broken expectation is reported (summary, stderr, exit 1 from the CLI), the data stays
        from jobs.dq import validate

        dq = validate(cfg)
        res["data_quality"] = {k: dq[k] for k in ("success", "failed", "run_id", "docs")}
        for name, r in dq["suites"].items():
            for f in r["failed"]:
                print(f"outcomes: data quality: {name}: {f['expectation']} {f['column']} broken "
                      f"({f['unexpected_count']} rows)", file=sys.stderr)
    return res


def main(argv=None) -> None:
    from jobs.config import quiet_third_party_warnings

    quiet_third_party_warnings()
    from jobs.flink_env import handoff_cli

    handoff_cli("outcomes", run, argv)


if __name__ == "__main__":
    main()
