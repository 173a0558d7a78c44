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

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file by `flink run -py jobs/learner.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.config import Config, load_for_cli  # noqa: E402

__all__ = ["build", "run", "summarize", "metrics_row", "publish"]

END_OF_INPUT_TIMER = 2 ** 62


def stats_dir(cfg: Config) -> Path:
    return cfg.data_dir / "learner"


def metrics_row(snap, uri: str):
    """The ``learner_metrics_v1`` row of a snapshot (pyarrow, from the table contract)."""
    import pyarrow as pa

    from schemas import table_contract

    m = snap.metrics
    ctr, conv, up = m.get("ctr", {}), m.get("conversion", {}), m.get("uplift", {})

    def ts(ms):
        return None if ms is None else pa.scalar(int(ms) * 1000, pa.timestamp("us", "UTC")).as_py()

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


def publish(cfg: Config, table, snap, timing: dict | None = None) -> dict:
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
    from jobs.sinks import _atomic_parquet

    if scores is not None and len(scores):
        _atomic_parquet(cfg.data_dir / "scores" / f"slice-{seq:08d}.parquet", scores)


def _learner_function(cfg: Config):
    from pyflink.common import Types
    from pyflink.datastream import KeyedProcessFunction
    from pyflink.datastream.state import MapStateDescriptor

    from udfs.learners import OnlineLearner

    params = cfg.learner_params()

    class LearnerFunction(KeyedProcessFunction):
        """One OnlineLearner; MapState holds ``core`` (its state at the last snapshot) and
        ``log:<seq>`` (the hand-off lines taken since)."""

        def open(self, ctx):
            from jobs.iceberg_store import open_tables

            self.state = ctx.get_map_state(MapStateDescriptor(
                "learner", Types.STRING(), Types.PICKLED_BYTE_ARRAY()))
            self.table = open_tables(cfg)["learner_metrics"]
            self.learner = None

        def _offer(self, line: str, timing: dict):
            from udfs.ingest import read_handoff

            s = read_handoff(line)
            t0 = time.perf_counter()
            results = self.learner.offer(s.seq, s.decisions, s.outcomes, s.clock, s.final)
            timing["learner_s"] = round(time.perf_counter() - t0, 3)
            timing["decisions"] = 0 if s.decisions is None else s.decisions.num_rows
            snaps = []
            for seq, scores, cut in results:
                write_scores(cfg, seq, scores)
                snaps += cut
            return snaps

        def _learner(self):
            if self.learner is None:
                entries = dict(self.state.items())
                self.learner = OnlineLearner.restore(entries["core"]) if "core" in entries \
                    else OnlineLearner(**params)
                logged = sorted((int(k[4:]), v) for k, v in entries.items() if k.startswith("log:"))
                for _, line in logged:            # slices after the snapshot: train on them again
                    self._publish_all(self._offer(line, {"replayed": True}), {"replayed": True})
            return self.learner

        def _publish_all(self, snaps, timing):
            for i, snap in enumerate(snaps):
                self._out.append(json.dumps(publish(cfg, self.table, snap, timing if i == 0 else {})))
            if snaps:                             # checkpointable state, then drop the log it covers
                self.state.put("core", self.learner.snapshot())
                for k in [k for k in self.state.keys() if k.startswith("log:")]:
                    if int(k[4:]) < self.learner.next_seq:
                        self.state.remove(k)

        def process_element(self, value, ctx):
            self._out = []
            lrn = self._learner()
            seq = json.loads(value)["seq"]
            if seq >= lrn.next_seq:
                self.state.put(f"log:{seq}", value)
            timing = {}
            self._publish_all(self._offer(value, timing), timing)
            ctx.timer_service().register_event_time_timer(END_OF_INPUT_TIMER)
            yield from self._out

        def on_timer(self, timestamp, ctx):
            self._out = []
            self._publish_all(self._learner().flush(), {"end_of_input": True})
            yield from self._out

    return LearnerFunction()


def build(env, cfg: Config, input_dir: Path, follow: bool = False):
    """Wire the job into ``env``; returns the stream of per-snapshot stats (JSON strings)."""
    from pyflink.common import Types

    from jobs.flink_env import line_source

    lines = line_source(env, Path(input_dir) / "handoff", follow, "handoff")
    return (lines.key_by(lambda _: 0, key_type=Types.INT())
            .process(_learner_function(cfg), output_type=Types.STRING())
            .name("learner").uid("learner").set_parallelism(1))


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
    from jobs.flink_env import job_env, terminate
    from jobs.iceberg_store import open_tables

    input_dir = Path(input_dir or cfg.data_dir)
    open_tables(cfg)
    t0 = time.time()
    env = job_env(cfg, checkpoint_dir=cfg.data_dir / "checkpoints-learner", overrides=overrides)
    terminate(build(env, cfg, input_dir, follow))
    env.execute("streamlift-learner")
    summary = summarize(cfg)
    summary["wall_seconds"] = round(time.time() - t0, 2)
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="streamlift learner job")
    p.add_argument("--input", help="the features job's data dir (with handoff/); default paths.data_dir")
    p.add_argument("--data-dir", help="override paths.data_dir")
    p.add_argument("--follow", action="store_true", help="keep taking slices as they are handed off")
    p.add_argument("--from-checkpoint", help="restore from a retained checkpoint (…/chk-N) or savepoint")
    args = p.parse_args(argv)
    cfg = load_for_cli(args.data_dir)
    input_dir = Path(args.input) if args.input else cfg.data_dir
    overrides = {"execution.state-recovery.path": args.from_checkpoint} if args.from_checkpoint else None
    print(json.dumps(run(cfg, input_dir, args.follow, overrides=overrides), indent=2))


if __name__ == "__main__":
    main()
