"""features: decayed per-key accumulators into Feast, and decisions enriched point-in-time.

::

    FileSource(<input>/manifest)          one JSON line per slice (bounded, or --follow)
      │ str
      ▼ read-validate        [Python, parallel]  read the slice's files, validate against schemas/
      │ pickled Slice                            (bad records -> quarantine with a reason)
      ▼ key_by(shard)
      ▼ features-engine      [Python, keyed]     udfs.features.FeatureEngine: dedupe, watermark,
      │                                          join, decayed accumulators, enrichment;
      │                                          MapState holds the engine (snapshot + input log);
      │                                          writes enriched decisions + offline features
      │ pickled online rows                      (Parquet), quarantine (JSONL), stats
      ▼ feast-online         [Python]            Feast online store, every online_every slices

Python is entered once per slice (tens of thousands of events), never once per
event. All sink files are named by slice sequence number, and Feast writes never
replace a newer row, so a replay or a restart from a checkpoint leaves the
outputs as a clean run would.

    python -m jobs.features --input data/sim            # bounded backfill, then exit
    python -m jobs.features --input data/sim --follow   # keep watching for new slices
    python -m jobs.features --input data/sim --follow --from-checkpoint data/checkpoints/<job>/chk-N
    flink run -py jobs/features.py --pyFiles schemas,udfs,jobs -- --input ...   (see Makefile)
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file by `flink run -py jobs/features.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.config import Config, load_for_cli  # noqa: E402
from jobs.flink_env import END_OF_INPUT_TIMER  # noqa: E402

__all__ = ["build", "run", "read_validate"]

def read_validate(manifest_line: str) -> bytes:
    from udfs.ingest import read_slice

    return pickle.dumps(read_slice(manifest_line), protocol=5)


def _engine_function(cfg: Config):
    from pyflink.common import Types
    from pyflink.datastream import KeyedProcessFunction
    from pyflink.datastream.state import MapStateDescriptor

    from udfs.features import FeatureEngine

    params = cfg.engine_params()

    class EngineFunction(KeyedProcessFunction):
        """Runs one FeatureEngine per key (shard); its state lives in a MapState.

        The slice's files (enriched decisions, offline features, quarantine, stats)
        are written here, where the output is, rather than shipped to another
        operator; only the conflated online rows go on to the Feast writer.
        """

        def open(self, ctx):
            self.state = ctx.get_map_state(MapStateDescriptor(
                "engine", Types.STRING(), Types.PICKLED_BYTE_ARRAY()))
            self.engine = None
            self.restored_from = None

        def _engine(self):
            if self.engine is None:
                entries = dict(self.state.items())
                self.engine = (FeatureEngine.restore(entries, **params) if entries
                               else FeatureEngine(**params))
                self.restored_from = self.engine.next_seq if entries else None
            return self.engine

        def _persist(self):
            for key, blob in self.engine.state_delta().items():
                if blob is None:
                    self.state.remove(key)
                else:
                    self.state.put(key, blob)

        def _emit(self, outs, timing):
            from jobs.sinks import write_slice_files

            for o in outs:
                o.counts["timing"] = timing
                write_slice_files(cfg, o)
                if o.online and cfg.feast["write_online"]:
                    yield pickle.dumps((o.seq, o.online), protocol=5)

        def process_element(self, value, ctx):
            t0 = time.perf_counter()
            s = pickle.loads(value)
            eng = self._engine()
            t1 = time.perf_counter()
            outs = eng.offer(s.seq, s.batches, s.lines, s.quarantined)
            t2 = time.perf_counter()
            ctx.timer_service().register_event_time_timer(END_OF_INPUT_TIMER)
            timing = {"engine_load_s": round(t1 - t0, 3), "engine_s": round(t2 - t1, 3)}
            if self.restored_from is not None and outs:   # first output after a restore from state
                timing["restored_from_seq"], self.restored_from = self.restored_from, None
            yield from self._emit(outs, timing)
            self._persist()     # after the outputs: a crash in between replays them, idempotently

        def on_timer(self, timestamp, ctx):
            outs = self._engine().flush()
            yield from self._emit(outs, {})
            self._persist()

    return EngineFunction()


def _online_function(cfg: Config):
    from pyflink.datastream import MapFunction

    class OnlineWriter(MapFunction):
        """Feast online writes (the store keeps the newest row per key)."""

        def open(self, ctx):
            from jobs.feast_store import open_store

            self.store = open_store(cfg, apply=False)

        def map(self, value):
            from jobs.sinks import write_online_frames

            seq, online = pickle.loads(value)
            return json.dumps(write_online_frames(cfg, self.store, seq, online))

    return OnlineWriter()


def build(env, cfg: Config, input_dir: Path, follow: bool = False):
    """Wire the job into ``env``; returns the stream of per-slice stats (JSON strings)."""
    from pyflink.common import Types

    from jobs.flink_env import line_source

    manifests = line_source(env, Path(input_dir) / "manifest", follow, "slice-manifests") \
        .slot_sharing_group("read")
    shards = int(cfg.flink["engine_shards"])
    # each step in its own slot sharing group: its own task slot, so its own Python
    # worker process (Python operators sharing a slot share one interpreter and its GIL)
    slices = (manifests
              .map(read_validate, output_type=Types.PICKLED_BYTE_ARRAY())
              .name("read-validate").uid("read-validate").slot_sharing_group("read"))
    outputs = (slices
               .key_by(lambda b: 0 if shards == 1 else pickle.loads(b).seq % shards, key_type=Types.INT())
               .process(_engine_function(cfg), output_type=Types.PICKLED_BYTE_ARRAY())
               .name("features-engine").uid("features-engine").set_parallelism(shards)
               .slot_sharing_group("engine"))
    stats = (outputs
             .map(_online_function(cfg), output_type=Types.STRING())
             .name("feast-online").uid("feast-online").set_parallelism(1).slot_sharing_group("sinks"))
    return stats


def run(cfg: Config, input_dir: Path, follow: bool = False, overrides: dict | None = None) -> dict:
    """Run the job (local mini-cluster, or the cluster under ``flink run``), bounded unless
    ``follow``; returns a summary."""
    from jobs.feast_store import open_store
    from jobs.flink_env import job_env, terminate
    from jobs.sinks import summarize

    data = cfg.data_dir
    data.mkdir(parents=True, exist_ok=True)
    open_store(cfg, apply=True)            # register entities and views before writing
    t0 = time.time()
    env = job_env(cfg, checkpoint_dir=data / "checkpoints", overrides=overrides)
    terminate(build(env, cfg, input_dir, follow))
    env.execute("streamlift-features")
    wall = time.time() - t0
    summary = summarize(cfg)
    summary["wall_seconds"] = round(wall, 2)
    summary["events_per_second"] = round(summary["events_in"] / wall, 1) if wall else None
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="streamlift features job")
    p.add_argument("--input", required=True, help="simulator/producer output folder (with manifest/)")
    p.add_argument("--data-dir", help="override paths.data_dir")
    p.add_argument("--follow", action="store_true", help="keep monitoring for new slices")
    p.add_argument("--from-checkpoint", help="restore from a retained checkpoint (…/chk-N) or savepoint")
    args = p.parse_args(argv)
    cfg = load_for_cli(args.data_dir)
    overrides = {"execution.state-recovery.path": args.from_checkpoint} if args.from_checkpoint else None
    summary = run(cfg, Path(args.input), args.follow, overrides=overrides)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
