"""outcomes: decisions joined to their clicks and conversions, with survival-based
delayed labels, committed exactly once to Iceberg.

::

    FileSource(<features data>/handoff)   one JSON line per slice of the features job (bounded, or --follow)
      │ str
      ▼ key_by(0)
      ▼ outcomes-engine   [Python, keyed]  reads the slice's enriched decisions and attributed
      │                                    outcomes (Parquet); udfs.outcomes.OutcomeEngine joins them,
      │                                    refits the delay model and labels rows at each epoch
      │                                    (every outcomes.commit_every of event time, and at end of input);
      │                                    commits each epoch to Iceberg: outcomes_v1 (day partitions
      │                                    replaced), delay_models_v1, quarantine_v1
      │                                    MapState: engine snapshot at each epoch + log of the slices since
      ▼ per-epoch stats (JSON)

Exactly once without checkpoint hooks: every commit is stamped with its epoch (the
event-time clock of the cut) and skipped if the table already has it; after a
restart the engine is restored from its last snapshot and the logged slices are
processed again, which cuts the same epochs with the same contents.

    python -m jobs.outcomes --input data/run               # bounded: every slice handed off so far
    python -m jobs.outcomes --input data/run --follow      # keep taking slices as they are handed off
    flink run -py jobs/outcomes.py -pyfs schemas,udfs,jobs -- --input ...   (see Makefile)
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
    """Commit one epoch to the three tables (each skips an epoch it already has)."""
    from jobs.iceberg_store import commit_append, commit_partitions
    from jobs.sinks import atomic_write

    t0 = time.perf_counter()
    done = {"quarantine": commit_append(tables["quarantine"], epoch.quarantine, epoch.epoch),
            "delay_model": commit_append(tables["delay_model"], epoch.delay_models, epoch.epoch),
            "outcome": commit_partitions(tables["outcome"], epoch.outcomes, epoch.epoch, "decision_time")}
    stats = {"epoch": epoch.epoch, "seq": epoch.seq, "committed": done, **epoch.counts,
             "timing": {**(timing or {}), "commit_s": round(time.perf_counter() - t0, 3)}}
    atomic_write(stats_dir(cfg) / f"epoch-{epoch.epoch}.json", json.dumps(stats).encode())
    return stats


def _engine_function(cfg: Config):
    """One OutcomeEngine, replayed from its last epoch after a restore (jobs.flink_env)."""
    from jobs.flink_env import replayed_engine
    from udfs.outcomes import OutcomeEngine

    params = cfg.outcome_params()

    def setup():
        from jobs.iceberg_store import open_tables
        return open_tables(cfg)

    def take(engine, s, timing):
        t0 = time.perf_counter()
        epochs = engine.offer(s.seq, s.decisions, s.outcomes, s.clock, s.final, s.quarantined)
        timing["engine_s"] = round(time.perf_counter() - t0, 3)
        return epochs

    def publish(tables, epoch, timing):
        return json.dumps(commit(cfg, tables, epoch, timing))

    return replayed_engine("outcomes", lambda: OutcomeEngine(**params), OutcomeEngine.restore,
                           take, publish, setup)


def summarize(cfg: Config) -> dict:
    """The newest epoch's counts and the engine's totals (which must reconcile)."""
    files = sorted(stats_dir(cfg).glob("epoch-*.json"), key=lambda p: int(p.stem[6:]))
    epochs = [json.loads(f.read_text()) for f in files]
    if not epochs:
        return {"epochs": 0}
    last = epochs[-1]
    return {"epochs": len(epochs), "last_epoch": last["epoch"], "totals": last.get("totals"),
            "rows_last_epoch": last["rows"], "interim": last["interim"], "final": last["final"],
            "commit_seconds": round(sum(e["timing"]["commit_s"] for e in epochs), 2),
            "engine_seconds": round(sum(e["timing"].get("engine_s", 0) for e in epochs), 2)}


def run(cfg: Config, input_dir: Path | None = None, follow: bool = False,
        overrides: dict | None = None) -> dict:
    """Run the job (local mini-cluster, or the cluster under ``flink run``), bounded unless
    ``follow``; returns a summary."""
    from jobs.flink_env import run_handoff_job

    return run_handoff_job(cfg, "outcomes", _engine_function(cfg), summarize, input_dir, follow, overrides)


def main(argv=None) -> None:
    from jobs.flink_env import handoff_cli

    handoff_cli("outcomes", run, argv)


if __name__ == "__main__":
    main()
