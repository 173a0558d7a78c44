"""learner: online CTR, conversion and uplift models trained on the labelled stream.

::

    FileSource(<features data>/handoff)   one JSON line per slice of the features job (bounded, or --follow)
      │ str
      ▼ read        [Python × P]      reads the slice's enriched decisions (point-in-time features) and
      │                               attributed clicks/conversions (Parquet -> Arrow)
      ▼ key_by(0)
      ▼ learner     [Python × 1]      udfs.learners.OnlineLearner scores each decision first
      │                               (prequential), trains it on its interim labels once it is
      │                               learner.label_wait old, corrects it to its final label when the
      │                               conversion window closes; a model snapshot every
      │                               learner.snapshot_every of event time or snapshot_examples decisions.
      │                               udfs.learner_stage.LearnerStage (the engine contract): MapState
      │                               holds the learner every learner.state_every slices (core + one
      │                               part per block of held rows) and the hand-off lines since
      ├─► key_by(slice) ─► scores   [Python × P]  each slice's scores -> <data>/scores/ (model version)
      ▼ key_by(0) ─► publish        [Python × 1]  each snapshot -> the model store (fsspec) + a row in
                                                  learner_metrics_v1 (skipped when the table has it)
      ▼ per-snapshot stats (JSON)

One model is one stream of updates, so the learner is one instance; everything around it
(reading, the score files, publishing) runs beside it, so its process does only the
learning. Its snapshots do not depend on the parallelism of the stages around it (tested).

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
           "drift": snap.drift, "safe": snap.safe, "model_uri": uri, "epoch": snap.version,
           "warnings": "; ".join(snap.warnings) if snap.warnings else None,
           "ate_json": json.dumps(_plain_json(m.get("ate"))) if m.get("ate") else None}
    schema = table_contract("learner_metrics").arrow_schema()
    return pa.Table.from_pylist([row], schema=schema)


def _plain_json(x):
    """JSON-safe (NaN -> None)."""
    import math

    if isinstance(x, dict):
        return {str(k): _plain_json(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def publish_snapshot(cfg: Config, table, snap, timing: dict | None = None) -> dict:
    """Write a snapshot to the model store and its metrics row to Iceberg (skipped if present)."""
    from stores.iceberg_store import commit_append
    from serving.serve import write_snapshot
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


def build(env, cfg: Config, input_dir: Path, follow: bool = False, kafka: dict | None = None):
    """Wire the job into ``env``; returns the per-snapshot stats (JSON strings)."""
    import pickle

    from pyflink.common import Types
    from pyflink.datastream import FlatMapFunction, MapFunction, OutputTag

    from jobs.flink_env import handoff_input, handoff_value, parallelism, shard_keys, stage_function
    from udfs.learner_stage import HandoffRef, LearnerStage
    from udfs.spec import FeatureSpec

    p = parallelism(cfg, env)
    env.set_parallelism(p)
    keys = shard_keys(p, env)
    stage_params = {"learner_params": {**cfg.learner_params(), "spec": FeatureSpec.from_config(cfg)},
                    "snapshot_every": int(cfg.learner.get("state_every", 1))}
    scores_tag = OutputTag("scores", Types.TUPLE([Types.INT(), Types.PICKLED_BYTE_ARRAY()]))
    carry = {"learner_s": 0.0, "decisions": 0}       # the learner's own time since the last snapshot

    class Read(FlatMapFunction):
        def flat_map(self, line):
            from udfs.ingest import read_handoff

            line = handoff_value(line)
            yield 0, pickle.dumps((line, read_handoff(line)), protocol=5)

    def take(stage, blob, timing):
        line, s = pickle.loads(blob)
        t0 = time.perf_counter()
        items = stage.offer(s.seq, 0, HandoffRef(line, s))     # the log keeps the line only
        carry["learner_s"] += time.perf_counter() - t0
        carry["decisions"] += 0 if s.decisions is None else s.decisions.num_rows
        return items

    def emit(item, timing):
        if item[0] == "scores":                   # a slice's scores: to the score writers
            _, seq, scores = item
            yield scores_tag, (keys[seq % p], pickle.dumps((seq, scores), protocol=5))
            return
        own = {"learner_s": round(carry["learner_s"], 3), "decisions": carry["decisions"]}
        carry.update(learner_s=0.0, decisions=0)
        yield None, pickle.dumps((item[1], own), protocol=5)

    class WriteScores(MapFunction):
        def map(self, value):
            seq, scores = pickle.loads(value[1])
            write_scores(cfg, seq, scores)
            return seq

    class Publish(MapFunction):
        def open(self, ctx):
            from jobs.flink_env import JobMetrics
            from stores.iceberg_store import open_tables

            self.table = open_tables(cfg)["learner_metrics"]
            self.metrics = JobMetrics(ctx, "publish")

        def map(self, value):
            snap, timing = pickle.loads(value)
            stats = publish_snapshot(cfg, self.table, snap, timing)
            m = self.metrics
            m.inc("snapshots")
            m.inc("decisions_learned", timing.get("decisions", 0))
            m.inc("unsafe_snapshots", 0 if snap.safe else 1)
            m.set("model_version", snap.version)
            m.set("model_clock_ms", snap.clock)
            return json.dumps(stats)

    lines = handoff_input(env, cfg, input_dir, follow, kafka, "learner")
    read = (lines.flat_map(Read(), output_type=Types.TUPLE([Types.INT(), Types.PICKLED_BYTE_ARRAY()]))
            .name("read").uid("read").set_parallelism(p))
    learned = (read.key_by(lambda t: t[0], key_type=Types.INT())
               .process(stage_function("learner", LearnerStage, lambda _: stage_params, take, emit,
                                       flush_at_end=True, errors_dir=cfg.data_dir), output_type=Types.PICKLED_BYTE_ARRAY())
               .name("learner").uid("learner").set_parallelism(1))
    (learned.get_side_output(scores_tag).key_by(lambda t: t[0], key_type=Types.INT())
     .map(WriteScores(), output_type=Types.INT()).name("scores").uid("scores").set_parallelism(p))
    return (learned.key_by(lambda _: 0, key_type=Types.INT())
            .map(Publish(), output_type=Types.STRING()).name("publish").uid("publish").set_parallelism(1))


def summarize(cfg: Config) -> dict:
    files = sorted(stats_dir(cfg).glob("snapshot-*.json"))
    snaps = [json.loads(f.read_text()) for f in files]
    if not snaps:
        return {"snapshots": 0}
    last = snaps[-1]
    return {"snapshots": len(snaps), "last_version": last["version"], "examples": last["examples"],
            "corrections": last["corrections"], "last_uri": last["uri"],
            "unsafe_snapshots": sum(1 for s in snaps if not s["safe"]),
            "warnings": last.get("metrics", {}).get("warnings", []),
            "learner_seconds": round(sum(s["timing"].get("learner_s", 0) for s in snaps), 2)}


def run(cfg: Config, input_dir: Path | None = None, follow: bool = False,
        overrides: dict | None = None, kafka: dict | None = None) -> dict:
    """Run the job (local mini-cluster, or the cluster under ``flink run``) on the hand-off files
    under ``input_dir`` (bounded unless ``follow``) or with ``kafka`` (``{"bootstrap", "until",
    "startup"}``) on the hand-off topic; returns a summary."""
    from jobs.flink_env import run_handoff_job

    return run_handoff_job(cfg, "learner", build, summarize, input_dir, follow, overrides, kafka=kafka)


def main(argv=None) -> None:
    from jobs.config import quiet_third_party_warnings

    quiet_third_party_warnings()
    from jobs.flink_env import handoff_cli

    handoff_cli("learner", run, argv)


if __name__ == "__main__":
    main()
