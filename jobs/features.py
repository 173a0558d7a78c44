"""features: decayed per-key accumulators into Feast, and decisions enriched point-in-time,
sharded by key at the configured parallelism P (``parallelism.default``, ``flink run -p``,
or ``STREAMLIFT_FLINK__PARALLELISM``).

::

    Kafka topics, batched per event-time window (jobs/kafka.py), or
    FileSource(<input>/manifest)          one JSON line per slice (bounded, or --follow)
      │ str
      ▼ read-validate       [Python × P]   read the slice's files, validate against schemas/ (bad records
      │                                    -> quarantine), split into one column batch per attribution
      │ (shard, ReaderPart)                shard by hash(decision_id), each with the slice's max event time
      ▼ key_by(shard)
      ▼ attribution         [Python × P]   udfs.attribution: dedupe, lateness, release at the shared clock,
      │                                    clicks/conversions ⋈ decision; state: MapState (log + snapshot)
      ├── (shard, AccPart) ─► key_by(shard)
      │   ▼ accumulate      [Python × P]   udfs.accumulate: decayed sums per key, point-in-time enrichment
      │   ├── side output (shard, online rows) ─► key_by(shard) ─► feast-online [Python × P]
      │   ▼ (seq, AccOut)                                         Feast online store, conflated per key
      ├── side output (seq, RouterOut)
      ▼ union ─► key_by(seq) ─► merge-write [Python × P]  udfs.features.merge_slice: per slice, once every
                                                         shard's part is in: enriched decisions, attributed
                                                         outcomes, offline features, quarantine, stats, hand-off

Python is entered once per slice and shard, never once per event. Every shard gets a part
of every slice, so the shards advance together on one clock, and the outputs do not depend
on P (tested at 1 and 2, on the mini-cluster and on a standalone cluster with two
TaskManagers). State is per shard: change P with a new run.

    python -m jobs.features --bootstrap-servers localhost:9092               # Kafka, unbounded
    python -m jobs.features --bootstrap-servers localhost:9092 --until latest  # Kafka backfill, then exit
    python -m jobs.features --input data/sim            # bounded backfill, then exit
    python -m jobs.features --input data/sim --follow   # keep watching for new slices
    python -m jobs.features --input data/sim --follow --from-checkpoint data/checkpoints/<job>/chk-N
    flink run -p 2 -py jobs/features.py --pyFiles schemas,udfs,jobs,stores,serving -- --input ...   (see Makefile)
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
from jobs.flink_env import shard_keys, stage_function  # noqa: E402

__all__ = ["build", "run", "read_validate"]


def read_validate(manifest_line: str, shards: int, limits: dict | None = None, forget=None) -> list:
    """One manifest line -> ``[(shard, pickled ReaderPart)]``, one per attribution shard;
    ``forget``: the run's :class:`udfs.privacy.ForgetList` (listed users lose their ``user_id``)."""
    from udfs.features import split_slice
    from udfs.ingest import read_slice
    from udfs.spec import parse_duration

    limits = limits or {}
    t0 = time.thread_time()            # CPU seconds of this thread (stage timings: CPU, not wall)
    s = read_slice(manifest_line, as_frames=True, limits=limits)
    future = limits.get("max_future")
    parts = split_slice(s.seq, s.batches, s.lines, s.quarantined, shards,
                        None if future is None else parse_duration(future), forget=forget)
    parts[0].timing = {"read_s": round(time.thread_time() - t0, 3)}
    return [(i, pickle.dumps(p, protocol=5)) for i, p in enumerate(parts)]


def build(env, cfg: Config, input_dir: Path | None, follow: bool = False, kafka: dict | None = None):
    """Wire the job into ``env``; returns the stream of per-slice stats (JSON strings). The
    source: the slice files under ``input_dir``, or with ``kafka`` (``{"bootstrap": ...,
    "until": "latest" | None, "startup": ...}``) the contracts' topics (``jobs/kafka.py``)."""
    from pyflink.common import Types
    from pyflink.datastream import FlatMapFunction, MapFunction, OutputTag

    from jobs.flink_env import line_source, on_cluster, parallelism
    from udfs.accumulate import AccPart, AccumulatorStage
    from udfs.attribution import AttributionStage
    from udfs.features import FeatureEngine
    from udfs.spec import FeatureSpec, parse_duration

    p = parallelism(cfg, env)
    env.set_parallelism(p)      # PyFlink's key_by adds a Python map at the default parallelism
    spec = FeatureSpec.from_config(cfg)
    params = {**cfg.engine_params(), "shards": p}
    template = FeatureEngine(**params, spec=spec)            # the stages' constructor arguments

    def keyed_type():        # a fresh one per use: an OutputTag pickles its type, not a Java object
        return Types.TUPLE([Types.INT(), Types.PICKLED_BYTE_ARRAY()])

    keyed = keyed_type()
    keys = shard_keys(p, env)                                 # shard -> a key Flink sends to subtask shard
    shard_of_key = {k: s for s, k in enumerate(keys)}
    to_merge = OutputTag("to-merge", keyed_type())
    to_online = OutputTag("to-online", keyed_type())
    # on Kafka the slices are handed off on the hand-off topic (kafka.handoff), not as hand-off lines
    handoff = kafka is not None and bool(cfg.kafka["handoff"])
    to_handoff = OutputTag("to-handoff", Types.PRIMITIVE_ARRAY(Types.BYTE()))

    def group(stream, name):
        # locally, each step in its own slot sharing group: its own Python worker process, so
        # reading, the engine and the writers use both cores; on a cluster, the platform's slots
        return stream if on_cluster() or not cfg.flink.get("split_local", True) else stream.slot_sharing_group(name)

    class ReadValidate(FlatMapFunction):
        def open(self, runtime_context):
            from udfs.privacy import FORGET_FILE, ForgetList

            from jobs.flink_env import JobMetrics

            self.forget = ForgetList(cfg.data_dir / FORGET_FILE, str(cfg.privacy["quarantine_key"]))
            self.metrics = JobMetrics(runtime_context, "read-validate")

        def flat_map(self, value):
            from jobs.sinks import record_source_fault

            try:
                parts = read_validate(value, p, {**cfg.limits, "quarantine_key": str(cfg.privacy["quarantine_key"])},
                                      self.forget)
            except (ValueError, KeyError, TypeError) as e:    # a manifest line that cannot be read: data
                record_source_fault(cfg, f"source:bad_manifest:{type(e).__name__}", str(value))
                self.metrics.inc("events_in")
                self.metrics.inc("quarantined", reason="source")
                return
            self.metrics.inc("slices_read")
            for shard, blob in parts:
                yield keys[shard], blob

    gap_after = parse_duration(cfg.limits.get("gap_alert_after", "5m")) / 1000.0
    gap_seen = {}                                  # first missing seq -> when the gap was first seen
    gap_alerted = set()

    def attribution_watch(stage, now):
        """Slices waiting for a missing one: alert once the gap is ``gap_alert_after`` old; called
        after each slice and by a processing-time timer, so an idle stream alerts too."""
        from jobs.sinks import record_alert

        if not (stage.waiting and stage.shard == 0) or stage.next_seq in gap_alerted:
            return None
        first = gap_seen.setdefault(stage.next_seq, now)
        if now - first < gap_after:
            return first + gap_after - now
        gap_alerted.add(stage.next_seq)
        record_alert(cfg, "seq-gap", {"seq": stage.next_seq, "waiting": sorted(stage.waiting),
                                      "seconds": round(now - first, 1)})
        return None

    def attribution_take(stage, blob, timing):
        from jobs.sinks import record_source_fault

        part = pickle.loads(blob)
        if part.seq < stage.next_seq or part.seq in stage.waiting:
            if stage.shard == 0:                   # counted once: shard 0 carries the slice's counts
                record_source_fault(cfg, "source:repeated_seq", json.dumps({"seq": part.seq}))
            return []
        t0 = time.thread_time()
        outs = stage.offer(part.seq, 0, part)
        timing[f"attribution_s:{stage.shard}"] = round(time.thread_time() - t0, 3)
        timing.update(getattr(part, "timing", {}) or {})
        return outs

    def attribution_emit(out, timing):
        for j, tables in enumerate(out.to_acc):
            yield None, (keys[j], pickle.dumps(AccPart(out.seq, out.clock, out.final, tables, out.shard),
                                                 protocol=5))
        out.to_acc = []
        out.timing.update(timing)
        yield to_merge, (out.seq, pickle.dumps(("r", out.shard, out), protocol=5))

    def accumulate_take(stage, blob, timing):
        part = pickle.loads(blob)
        t0 = time.thread_time()
        outs = stage.offer(part.seq, part.source, part)
        timing[f"accumulate_s:{stage.shard}"] = round(time.thread_time() - t0, 3)
        return outs

    def accumulate_emit(out, timing):
        if out.online and cfg.feast["write_online"]:
            yield to_online, (keys[out.shard], pickle.dumps((out.seq, out.shard, out.online), protocol=5))
        out.online = {}
        out.timing.update(timing)
        yield None, (out.seq, pickle.dumps(("a", out.shard, out), protocol=5))

    from pyflink.datastream import KeyedProcessFunction
    from pyflink.datastream.state import MapStateDescriptor

    class Merge(KeyedProcessFunction):
        def open(self, ctx):
            from jobs.flink_env import JobMetrics

            self.state = ctx.get_map_state(MapStateDescriptor("parts", Types.STRING(), Types.PICKLED_BYTE_ARRAY()))
            self.metrics = JobMetrics(ctx, "merge-write")

        def _observe(self, stats):
            m = self.metrics
            m.inc("slices")
            m.inc("events_in", sum(stats["in"].values()))
            m.inc("events_processed", sum(stats["processed"].values()))
            m.inc("enriched_out", stats["enriched"])
            m.inc("offline_rows", sum(stats["offline_rows"].values()))
            for reason, n in stats["quarantined"].items():
                m.inc("quarantined", n)
                m.inc("quarantined", n, reason=reason)
            m.set("last_slice_seq", stats["seq"])
            m.set("pending", stats["pending"])

        def process_element(self, value, ctx):
            from jobs.sinks import write_slice_files
            from udfs.features import merge_slice

            seq, blob = value
            kind, shard, _ = pickle.loads(blob)
            name = f"{seq}:{kind}:{shard}"
            if self.state.contains(name):
                return
            self.state.put(name, blob)
            names = [f"{seq}:{k}:{s}" for k in "ra" for s in range(p)]
            if not all(self.state.contains(n) for n in names):
                return
            parts = [pickle.loads(self.state.get(n))[2] for n in names]
            t0 = time.thread_time()
            out = merge_slice(spec, parts[:p], parts[p:])
            out.counts["timing"]["merge_s"] = round(time.thread_time() - t0, 3)
            stats = write_slice_files(cfg, out, handoff_line=not handoff)
            self._observe(stats)
            for n in names:
                self.state.remove(n)
            if handoff:
                from udfs.handoff import encode_handoff

                yield to_handoff, encode_handoff(out.seq, out.clock, out.final, out.enriched, out.attributed,
                                                 out.quarantine)
            yield json.dumps(stats)

    class OnlineWriter(MapFunction):
        """Feast online writes of one accumulator shard (the store keeps the newest row per key)."""

        def open(self, ctx):
            from stores.feast_store import open_store
            from jobs.flink_env import JobMetrics

            self.store = open_store(cfg, apply=False)
            self.metrics = JobMetrics(ctx, "feast-online")

        def map(self, value):
            from jobs.sinks import write_online_frames

            seq, shard, online = pickle.loads(value[1])
            stats = write_online_frames(cfg, self.store, seq, online, shard=shard)
            self.metrics.inc("online_rows", sum(stats["online_rows"].values()))
            fresh = stats.get("freshness_s")
            if fresh:                        # fold -> readable online, of this write
                self.metrics.set("freshness_p50_ms", fresh["p50"] * 1000)
                self.metrics.set("freshness_p99_ms", fresh["p99"] * 1000)
            return json.dumps(stats)

    if kafka is not None:
        from jobs.kafka import kafka_parts

        parts = kafka_parts(env, cfg, p, keys, kafka.get("bootstrap"), kafka.get("until"), kafka.get("startup"),
                            group=group)
    else:
        manifests = group(line_source(env, Path(input_dir) / "manifest", follow, "slice-manifests"), "read")
        parts = group(manifests.flat_map(ReadValidate(), output_type=keyed)
                      .name("read-validate").uid("read-validate").set_parallelism(p), "read")
    attributed = group(parts.key_by(lambda t: t[0], key_type=Types.INT())
                       .process(stage_function("attribution", AttributionStage,
                                               lambda key: template.router_params(shard_of_key[key]),
                                               attribution_take, attribution_emit, flush_at_end=True,
                                               errors_dir=cfg.data_dir, watch=attribution_watch),
                                output_type=keyed_type())
                       .name("attribution").uid("attribution").set_parallelism(p), "engine")
    accumulated = group(attributed.key_by(lambda t: t[0], key_type=Types.INT())
                        .process(stage_function("accumulate", AccumulatorStage,
                                                lambda key: template.acc_params(shard_of_key[key]),
                                                accumulate_take, accumulate_emit, errors_dir=cfg.data_dir),
                                 output_type=keyed_type())
                        .name("accumulate").uid("accumulate").set_parallelism(p), "engine")
    merged = group(attributed.get_side_output(to_merge).union(accumulated)
                   .key_by(lambda t: keys[t[0] % p], key_type=Types.INT())
                   .process(Merge(), output_type=Types.STRING())
                   .name("merge-write").uid("merge-write").set_parallelism(p), "sinks")
    if handoff:
        from jobs.kafka import attach_handoff_sink

        attach_handoff_sink(env, cfg, group(merged.get_side_output(to_handoff), "sinks"), kafka.get("bootstrap"))
    online = group(accumulated.get_side_output(to_online)
                   .key_by(lambda t: t[0], key_type=Types.INT())
                   .map(OnlineWriter(), output_type=Types.STRING())
                   .name("feast-online").uid("feast-online").set_parallelism(p), "sinks")
    return merged.union(online)


def run(cfg: Config, input_dir: Path | None, follow: bool = False, overrides: dict | None = None,
        kafka: dict | None = None) -> dict:
    """Run the job (local mini-cluster, or the cluster under ``flink run``) on the files under
    ``input_dir`` (bounded unless ``follow``) or on Kafka (``kafka``: see :func:`build`); returns
    a summary."""
    from stores.feast_store import open_store
    from jobs.flink_env import job_env, terminate
    from jobs.sinks import summarize

    data = cfg.data_dir
    data.mkdir(parents=True, exist_ok=True)
    open_store(cfg, apply=True)            # register entities and views before writing
    t0 = time.time()
    env = job_env(cfg, checkpoint_dir=data / "checkpoints", overrides=overrides)
    terminate(build(env, cfg, input_dir, follow, kafka=kafka))
    from jobs.progress import Progress, count_lines

    total = None if (follow or kafka is not None) else count_lines(Path(input_dir) / "manifest")
    with Progress("features", data, total):
        env.execute("streamlift-features")
    wall = time.time() - t0
    summary = summarize(cfg)
    summary["wall_seconds"] = round(wall, 2)
    summary["events_per_second"] = round(summary["events_in"] / wall, 1) if wall else None
    return summary


def main(argv=None) -> None:
    from jobs.config import quiet_third_party_warnings

    quiet_third_party_warnings()
    p = argparse.ArgumentParser(description="streamlift features job")
    p.add_argument("--input", help="read slice files from this folder (with manifest/) instead of Kafka")
    p.add_argument("--data-dir", help="override paths.data_dir")
    p.add_argument("--follow", action="store_true", help="files: keep monitoring for new slices")
    p.add_argument("--bootstrap-servers", help="Kafka: override kafka.bootstrap_servers")
    p.add_argument("--until", choices=["latest", "never"], default="never",
                   help="Kafka: read up to the offsets current at start, then end (backfills), or never end")
    p.add_argument("--startup", choices=["earliest-offset", "latest-offset", "group-offsets"],
                   help="Kafka: where a new job starts reading (a restored one resumes at its checkpoint)")
    p.add_argument("--from-checkpoint", help="restore from a retained checkpoint (…/chk-N) or savepoint")
    args = p.parse_args(argv)
    cfg = load_for_cli(args.data_dir)
    overrides = {"execution.state-recovery.path": args.from_checkpoint} if args.from_checkpoint else None
    kafka = None if args.input else {"bootstrap": args.bootstrap_servers, "until": args.until,
                                      "startup": args.startup}
    summary = run(cfg, Path(args.input) if args.input else None, args.follow, overrides=overrides, kafka=kafka)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
