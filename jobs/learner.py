"""learner: online CTR, conversion and uplift models trained on the labelled stream.

::

    FileSource(<features data>/handoff)   one JSON line per slice of the features job (bounded, or --follow)
      │ str
      ▼ key_by(0)
      ▼ learner   [Python, keyed]  reads the slice's enriched decisions (point-in-time features) and
      │                            attributed clicks/conversions; udfs.learners.OnlineLearner scores
      │                            each decision first (prequential), trains it on its interim labels
      │                            once it is learner.label_wait old, corrects it to its final label
      │                            when the conversion window closes; writes the scores of each slice
      │                            to <data>/scores/ (with the model version), and a model snapshot
      │                            every learner.snapshot_every of event time or snapshot_examples
      │                            decisions: the model store (fsspec) + a row in learner_metrics_v1
      │                            MapState: learner state at the last snapshot + log of the slices since
      ▼ per-snapshot stats (JSON)

A restart from a checkpoint restores the learner's state at its last snapshot and
processes the logged slices again: training is deterministic given the slice
order, so the model equals that of an uninterrupted run, and rewritten
snapshots and metrics rows are the same (the Iceberg commit is skipped when the
table already has the snapshot's epoch).

    python -m jobs.learner --input data/run               # bounded
    python -m jobs.learner --input data/run --follow      # keep taking slices as they are handed off
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a file by `flink run -py jobs/learner.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.config import Config  # noqa: E402

__all__ = ["run", "summarize", "metrics_row", "publish_snapshot"]

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def stats_dir(cfg: Config) -> Path:
    return cfg.data_dir / "learner"


def metrics_row(snap, uri: str):
    """The ``learner_metrics_v1`` row of a snapshot (pyarrow, from the table contract)."""
    import pyarrow as pa

    from schemas import table_contract

    m = snap.metrics
    ctr, conv, up = m.get("ctr", {}), m.get("conversion", {}), m.get("uplift", {})

    def ts(ms):
        return None if ms is None else EPOCH + timedelta(milliseconds=int(ms))

    row = {"snapshot_key": f"{snap.model_id}|{snap.version}", "model_id": snap.model_id,
           "version": snap.version, "clock": ts(snap.clock),
           "feature_schema_version": snap.feature_schema_version,
           "window_start": ts(snap.window_start), "window_end": ts(snap.window_end),
           "examples": snap.examples, "corrections": snap.corrections,
           "ctr_examples": int(ctr.get("n", 0)), "ctr_auc": ctr.get("auc"), "ctr_log_loss": ctr.get("log_loss"),
           "ctr_ece": ctr.get("ece"), "conversion_examples": int(conv.get("n", 0)),
           "conversion_auc": conv.get("auc"), "conversion_auc_naive": conv.get("auc_naive"),
           "conversion_log_loss": conv.get("log_loss"), "conversion_ece": conv.get("ece"),
           "uplift_qini": up.get("qini"), "uplift_qini_dr": up.get("qini_dr"),
           "drift": snap.drift, "safe": snap.safe, "model_uri": uri, "epoch": snap.version}
    schema = table_contract("learner_metrics").arrow_schema()
    return pa.Table.from_pylist([row], schema=schema)


def publish_snapshot(cfg: Config, table, snap, timing: dict | None = None) -> dict:
    """Write a snapshot to the model store and its metrics row to Iceberg (skipped if present)."""
    from jobs.iceberg_store import commit_append
    from jobs.serving import write_snapshot
    from jobs.sinks import atomic_write

    t0 = time.perf_counter()
    uri = write_snapshot(cfg.model_store, snap)
    committed = commit_append(table, metrics_row(snap, uri), snap.version)
    stats = {"version": snap.version, "clock": snap.clock, "seq": snap.seq, "uri": uri,
             "committed": committed, "examples": snap.examples, "corrections": snap.corrections,
             "drift": snap.drift, "safe": snap.safe, "metrics": snap.metrics,
             "timing": {**(timing or {}), "publish_s": round(time.perf_counter() - t0, 3)}}
    atomic_write(stats_dir(cfg) / f"snapshot-{snap.version:06d}.json", json.dumps(stats).encode())
    return stats


def write_scores(cfg: Config, seq: int, scores) -> None:
    """The first-sight scores of a slice's decisions: ``<data>/scores/slice-N.parquet``."""
    from jobs.sinks import atomic_parquet

    if scores is not None and len(scores):
        atomic_parquet(cfg.data_dir / "scores" / f"slice-{seq:08d}.parquet", scores)


def _learner_function(cfg: Config):
    """One OnlineLearner, replayed from its last snapshot after a restore (jobs.flink_env)."""
    from jobs.flink_env import replayed_engine
    from udfs.learners import OnlineLearner
    from udfs.spec import FeatureSpec

    params = {**cfg.learner_params(), "spec": FeatureSpec.from_config(cfg)}

    def setup():
        from jobs.iceberg_store import open_tables
        return open_tables(cfg)["learner_metrics"]

    def take(learner, s, timing):
        t0 = time.perf_counter()
        results = learner.offer(s.seq, s.decisions, s.outcomes, s.clock, s.final)
        timing["learner_s"] = round(time.perf_counter() - t0, 3)
        timing["decisions"] = 0 if s.decisions is None else s.decisions.num_rows
        snaps = []
        for seq, scores, cut in results:
            write_scores(cfg, seq, scores)
            snaps += cut
        return snaps

    def publish(table, snap, timing):
        return json.dumps(publish_snapshot(cfg, table, snap, timing))

    return replayed_engine("learner", lambda: OnlineLearner(**params), OnlineLearner.restore,
                           take, publish, setup)


def summarize(cfg: Config) -> dict:
    files = sorted(stats_dir(cfg).glob("snapshot-*.json"))
    snaps = [json.loads(f.read_text()) for f in files]
    if not snaps:
        return {"snapshots": 0}
    last = snaps[-1]
    return {"snapshots": len(snaps), "last_version": last["version"], "examples": last["examples"],
            "corrections": last["corrections"], "last_uri": last["uri"],
            "unsafe_snapshots": sum(1 for s in snaps if not s["safe"]),
            "learner_seconds": round(sum(s["timing"].get("learner_s", 0) for s in snaps), 2)}


def run(cfg: Config, input_dir: Path | None = None, follow: bool = False,
        overrides: dict | None = None) -> dict:
    """Run the job (local mini-cluster, or the cluster under ``flink run``); returns a summary."""
    from jobs.flink_env import run_handoff_job

    return run_handoff_job(cfg, "learner", _learner_function(cfg), summarize, input_dir, follow, overrides)


def main(argv=None) -> None:
    from jobs.flink_env import handoff_cli

    handoff_cli("learner", run, argv)


if __name__ == "__main__":
    main()
