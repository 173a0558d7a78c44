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

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file by `flink run -py jobs/outcomes.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.config import Config, load_for_cli  # noqa: E402

__all__ = ["build", "run", "commit", "summarize"]

END_OF_INPUT_TIMER = 2 ** 62


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
    from pyflink.common import Types
    from pyflink.datastream import KeyedProcessFunction
    from pyflink.datastream.state import MapStateDescriptor

    from udfs.outcomes import OutcomeEngine

    params = cfg.outcome_params()

    class OutcomesFunction(KeyedProcessFunction):
        """One OutcomeEngine; MapState holds ``core`` (its snapshot at the last epoch) and
        ``log:<seq>`` (the hand-off lines taken since)."""

        def open(self, ctx):
            from jobs.iceberg_store import open_tables

            self.state = ctx.get_map_state(MapStateDescriptor(
                "outcomes", Types.STRING(), Types.PICKLED_BYTE_ARRAY()))
            self.tables = open_tables(cfg)
            self.engine = None

        def _offer(self, line: str, timing: dict):
            from udfs.ingest import read_handoff

            s = read_handoff(line)
            t0 = time.perf_counter()
            epochs = self.engine.offer(s.seq, s.decisions, s.outcomes, s.clock, s.final, s.quarantined)
            timing["engine_s"] = round(time.perf_counter() - t0, 3)
            return epochs

        def _engine(self):
            if self.engine is None:
                entries = dict(self.state.items())
                self.engine = OutcomeEngine.restore(entries["core"]) if "core" in entries \
                    else OutcomeEngine(**params)
                logged = sorted((int(k[4:]), v) for k, v in entries.items() if k.startswith("log:"))
                for _, line in logged:           # slices after the snapshot: cut their epochs again
                    self._commit_all(self._offer(line, {"replayed": True}), {"replayed": True})
            return self.engine

        def _commit_all(self, epochs, timing):
            for i, e in enumerate(epochs):     # the offer's timing goes with its first epoch only
                stats = commit(cfg, self.tables, e, timing if i == 0 else {"same_offer_as": epochs[0].epoch})
                self._out.append(json.dumps(stats))
            if epochs:                            # snapshot, then drop the log it covers
                self.state.put("core", self.engine.snapshot())
                for k in [k for k in self.state.keys() if k.startswith("log:")]:
                    if int(k[4:]) < self.engine.next_seq:
                        self.state.remove(k)

        def process_element(self, value, ctx):
            self._out = []
            eng = self._engine()
            seq = json.loads(value)["seq"]
            if seq >= eng.next_seq:
                self.state.put(f"log:{seq}", value)
            timing = {}
            self._commit_all(self._offer(value, timing), timing)
            ctx.timer_service().register_event_time_timer(END_OF_INPUT_TIMER)
            yield from self._out

        def on_timer(self, timestamp, ctx):
            self._out = []
            self._commit_all(self._engine().flush(), {"end_of_input": True})
            yield from self._out

    return OutcomesFunction()


def build(env, cfg: Config, input_dir: Path, follow: bool = False):
    """Wire the job into ``env``; returns the stream of per-epoch stats (JSON strings)."""
    from pyflink.common import Types

    from jobs.flink_env import line_source

    lines = line_source(env, Path(input_dir) / "handoff", follow, "handoff")
    return (lines.key_by(lambda _: 0, key_type=Types.INT())
            .process(_engine_function(cfg), output_type=Types.STRING())
            .name("outcomes-engine").uid("outcomes-engine").set_parallelism(1))


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
    from jobs.flink_env import job_env, terminate
    from jobs.iceberg_store import open_tables

    input_dir = Path(input_dir or cfg.data_dir)
    open_tables(cfg)
    t0 = time.time()
    env = job_env(cfg, checkpoint_dir=cfg.data_dir / "checkpoints-outcomes", overrides=overrides)
    terminate(build(env, cfg, input_dir, follow))
    env.execute("streamlift-outcomes")
    summary = summarize(cfg)
    summary["wall_seconds"] = round(time.time() - t0, 2)
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="streamlift outcomes job")
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
