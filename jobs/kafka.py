"""Kafka as the source of the event streams: one topic per contract and version, read by
Flink's Kafka connector, batched in Java, validated and sliced in Python.

::

    topics streamlift.decision.v1, .click.v1, .conversion.v1  (keyed by decision_id; record
      │                                   timestamp = event time; format raw: the bytes as sent)
      ▼ KafkaSource (Flink SQL table, offsets in Flink's checkpoints; bounded with --until latest)
      │   watermark per partition: its max record timestamp - features.out_of_orderness
      │   (partitions idle for kafka.idle_timeout do not hold it back)
      ▼ mark   [Java]  hw = MAX(timestamp) per (topic, partition) in offset order (OVER … ORDER BY
      │                proctime: each partition is read in offset order by one reader)
      │        late  ⇔  timestamp <= hw - out_of_orderness   (the partition's own high-water mark:
      │                 the same on every run, at any parallelism, whatever other partitions do)
      │               or timestamp <= the current watermark (only after an idle partition woke up)
      ├── on time ─► TUMBLE(timestamp, kafka.batch_interval) GROUP BY topic, partition  [Java]
      │              one row per window and partition: ARRAY_AGG of the raw values
      │                ▼ kafka-read   [Python × P]  udfs.kafka_batch.decode_batch: validate -> quarantine
      ├── late/future ►┤ (one row per record: rare; it joins the window holding its partition's
      │                │  watermark when it was read, a window not yet fired: the same slice every run)
      │                ▼ kafka-gather [Python × 1]  on the watermark passing a window's end: the
      │                                             window's batches -> one slice (seq = windows so
      │                                             far), split by hash(decision_id) into shard parts
      ▼                                             with clock = window end - 1 ms
    the features pipeline (attribution, accumulate, merge-write, feast-online) as for files

Why it is exact: a record that is on time by its partition's rule has a timestamp above every
watermark emitted before it (each is at most that partition's high-water mark minus the
bound), so the window it falls in has not fired: windows never drop it, and every window's
content is a function of the topics' contents alone. The slices are the non-empty windows in
order, so the outputs are the same on replay and at any parallelism (tested).

Python is entered once per window and partition (``kafka.batch_interval`` of event time), never
once per record, except for late records. Per-record work in Java: the running max and the
array aggregation (``LISTAGG`` would be quadratic in the window's size: it copies the string
at every append; measured 4x slower on 10-minute windows of 10k records).
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import pickle
import time
from pathlib import Path

from schemas import CONTRACTS, Contract
from udfs.spec import parse_duration

__all__ = ["TOPIC_PREFIX", "CONTRACT_HEADER", "topic_name", "topics", "connector_jar", "client_config", "check_topics",
           "source_ddl", "kafka_parts", "sql_interval", "TopicMissing", "librdkafka_config", "offsets",
           "handoff_topic", "handoff_sink_ddl", "handoff_source_ddl", "attach_handoff_sink", "handoff_stream"]

TOPIC_PREFIX = "streamlift."
#: the record header that names a record's contract and version (``decision.v1``); a record
#: without it is read as its topic's contract, one naming another is quarantined as ``version:<it>``
CONTRACT_HEADER = "streamlift-contract"
TABLE = "streamlift_kafka_in"


class TopicMissing(RuntimeError):
    """A topic the job reads does not exist on the broker."""


def topic_name(contract: Contract, prefix: str = TOPIC_PREFIX) -> str:
    """``streamlift.decision.v1``: one topic per contract and version.

    >>> topic_name(CONTRACTS["click"])
    'streamlift.click.v1'
    """
    return f"{prefix}{contract.name}.v{contract.version}"


def topics(cfg) -> dict[str, str]:
    """topic -> stream (contract name) of every event contract, with ``kafka.topic_prefix``."""
    prefix = cfg.kafka.get("topic_prefix", TOPIC_PREFIX)
    return {topic_name(c, prefix): name for name, c in CONTRACTS.items()}


def sql_interval(duration) -> str:
    """A Flink SQL interval literal for a duration, ``DAY TO SECOND(3)`` (a plain ``SECOND``
    interval allows two digits only).

    >>> sql_interval("5m"), sql_interval("1500ms")
    ("INTERVAL '0 00:05:00.000' DAY TO SECOND(3)", "INTERVAL '0 00:00:01.500' DAY TO SECOND(3)")
    """
    ms = parse_duration(duration)
    if ms < 0:
        raise ValueError(f"negative duration: {duration!r}")
    days, rest = divmod(ms, 86_400_000)
    if days > 99:
        raise ValueError(f"duration over 99 days: {duration!r}")
    h, rest = divmod(rest, 3_600_000)
    m, rest = divmod(rest, 60_000)
    sec, milli = divmod(rest, 1000)
    return f"INTERVAL '{days} {h:02d}:{m:02d}:{sec:02d}.{milli:03d}' DAY TO SECOND(3)"


def connector_jar(cfg) -> str:
    """The Flink Kafka connector jar (``kafka.connector_jar``, else the one ``make kafka-jars``
    fetched), as a ``file://`` URI for ``pipeline.jars``."""
    from jobs.config import ROOT

    jar = cfg.kafka.get("connector_jar") or ""
    if not jar:
        found = sorted(glob.glob(str(ROOT / ".jvm" / "connectors" / "flink-sql-connector-kafka-*.jar")))
        if not found:
            raise FileNotFoundError("the Flink Kafka connector jar is missing: run `make kafka-jars` (fetches "
                                    "org.apache.flink:flink-sql-connector-kafka from Maven Central) or set "
                                    "kafka.connector_jar")
        jar = found[-1]
    return jar if "://" in jar else Path(jar).resolve().as_uri()


def client_config(cfg, bootstrap: str | None = None) -> dict:
    """Kafka client settings (Java/librdkafka names: ``security.protocol``, ``sasl.mechanism``,
    ``sasl.username``, ...) from ``kafka.properties``, with ``bootstrap.servers``."""
    conf = {str(k): str(v) for k, v in dict(cfg.kafka.get("properties") or {}).items()}
    conf["bootstrap.servers"] = bootstrap or cfg.kafka["bootstrap_servers"]
    return conf


def check_topics(cfg, bootstrap: str | None = None, timeout: float = 15.0) -> dict[str, int]:
    """topic -> partition count of every topic the job reads; fails naming the missing ones."""
    from confluent_kafka.admin import AdminClient

    conf = client_config(cfg, bootstrap)
    md = AdminClient({**librdkafka_config(conf), "log_level": 0}).list_topics(timeout=timeout)
    missing = [t for t in topics(cfg) if t not in md.topics or md.topics[t].error is not None]
    if missing:
        raise TopicMissing(f"Kafka topic(s) {', '.join(missing)} do not exist on {conf['bootstrap.servers']}: "
                           "create them with `python -m tools.produce create-topics` (or your platform's tooling)")
    return {t: len(md.topics[t].partitions) for t in topics(cfg)}


def offsets(cfg, bootstrap: str | None = None, timeout: float = 15.0) -> dict[str, tuple[int, int]]:
    """``topic:partition`` -> (low, high) offsets on the broker of every topic the job reads:
    a partition's records so far are ``high - low``; the job's lag is ``high`` minus its position."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    conf = librdkafka_config(client_config(cfg, bootstrap))
    c = Consumer({**conf, "group.id": "streamlift-offsets", "enable.auto.commit": False, "log_level": 0})
    deadline = time.time() + timeout
    try:
        md = c.list_topics(timeout=timeout)
        out = {}
        for t in topics(cfg):
            if t not in md.topics:
                continue
            for part in sorted(md.topics[t].partitions):
                while True:
                    try:
                        out[f"{t}:{part}"] = c.get_watermark_offsets(TopicPartition(t, part), timeout=timeout)
                        break
                    except KafkaException as e:
                        # a topic just created: its leader may not answer yet (NOT_LEADER_FOR_PARTITION,
                        # LEADER_NOT_AVAILABLE); retried until the timeout
                        leaderless = e.args[0].retriable() or "leader" in str(e).lower()
                        if not leaderless or time.time() > deadline:
                            raise
                        time.sleep(0.2)
        return out
    finally:
        c.close()


def librdkafka_config(conf: dict) -> dict:
    """Java client names -> librdkafka's where they differ (SASL/PLAIN credentials)."""
    out = dict(conf)
    jaas = out.pop("sasl.jaas.config", None)
    if jaas and "sasl.username" not in out:
        import re

        m = dict(re.findall(r'(username|password)="([^"]*)"', jaas))
        if m:
            out["sasl.username"], out["sasl.password"] = m.get("username", ""), m.get("password", "")
    return out


def source_ddl(cfg, bootstrap: str | None = None, until: str | None = None, startup: str | None = None) -> str:
    """The ``CREATE TABLE`` of the raw records of every contract's topic (bytes as sent, topic,
    partition, offset, record timestamp as event time, watermark per partition)."""
    kc = cfg.kafka
    opts = {"connector": "kafka",
            "topic": ";".join(topics(cfg)),
            "properties.group.id": kc.get("group_id", "streamlift-features"),
            "scan.startup.mode": startup or kc.get("startup_mode", "earliest-offset"),
            "format": "raw",
            "scan.watermark.idle-timeout": f"{parse_duration(kc.get('idle_timeout', '5m'))} ms"}
    if until == "latest":
        opts["scan.bounded.mode"] = "latest-offset"
    elif until not in (None, "", "never"):
        raise ValueError(f"--until must be 'latest' or 'never', not {until!r}")
    for k, v in client_config(cfg, bootstrap).items():
        opts[f"properties.{k}"] = v

    def q(v):
        return "'" + str(v).replace("'", "''") + "'"

    # a record dated beyond the wall clock + limits.max_future never moves the event-time clock
    future = sql_interval(cfg.limits.get("max_future") or "99d")

    with_ = ",\n  ".join(f"{q(k)} = {q(v)}" for k, v in opts.items())
    return (f"CREATE TEMPORARY TABLE `{TABLE}` (\n"
            "  `payload` BYTES,\n"
            "  `topic` STRING METADATA VIRTUAL,\n"
            "  `partition` INT METADATA VIRTUAL,\n"
            "  `offset` BIGINT METADATA VIRTUAL,\n"
            "  `kafka_ts` TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL,\n"
            "  `headers` MAP<STRING, BYTES> METADATA VIRTUAL,\n"
            f"  `future` AS `kafka_ts` > NOW() + {future},\n"
            "  `rowtime` AS CASE WHEN `kafka_ts` > NOW() + " + future + " THEN TO_TIMESTAMP_LTZ(0, 3) ELSE `kafka_ts` END,\n"
            "  `pt` AS PROCTIME(),\n"
            f"  WATERMARK FOR `rowtime` AS `rowtime` - {sql_interval(cfg.features['out_of_orderness'])}\n"
            f") WITH (\n  {with_}\n)")


def _queries(cfg) -> tuple[str, str, str]:
    from udfs.kafka_batch import TOMBSTONE_SQL

    ooo = sql_interval(cfg.features["out_of_orderness"])
    # a record whose CONTRACT_HEADER names another contract or version than its topic's
    header = f"CAST(`headers`['{CONTRACT_HEADER}'] AS STRING)"
    own = f"SUBSTR(`topic`, {len(cfg.kafka.get('topic_prefix', TOPIC_PREFIX)) + 1})"
    marked = (f"SELECT `topic`, `partition`, `offset`, `rowtime`, `payload`, `future`, `hw`, `contract`, "
              f"NOT `future` AND `contract` IS NULL AND `rowtime` > `hw` - {ooo} "
              f"AND (CURRENT_WATERMARK(`rowtime`) IS NULL OR `rowtime` > CURRENT_WATERMARK(`rowtime`)) AS on_time "
              f"FROM (SELECT *, MAX(`rowtime`) OVER (PARTITION BY `topic`, `partition` ORDER BY `pt` "
              f"ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS `hw`, "
              f"CASE WHEN {header} IS NULL OR {header} = {own} THEN CAST(NULL AS STRING) ELSE {header} END AS `contract` "
              f"FROM `{TABLE}`)")
    windows = (f"SELECT `topic`, `partition`, CAST(window_end AS TIMESTAMP(3)) AS window_end, "
               f"MIN(`offset`) AS first_offset, MAX(`offset`) AS last_offset, "
               f"ARRAY_AGG(COALESCE(`payload`, {TOMBSTONE_SQL})) AS `items` "
               f"FROM TABLE(TUMBLE(TABLE streamlift_kafka_marked, DESCRIPTOR(`rowtime`), "
               f"{sql_interval(cfg.kafka.get('batch_interval', '1s'))})) WHERE on_time "
               f"GROUP BY window_start, window_end, `topic`, `partition`")
    late = (f"SELECT `topic`, `partition`, `offset`, COALESCE(`payload`, {TOMBSTONE_SQL}) AS `item`, `future`, "
            "CAST(`hw` AS TIMESTAMP(3)) AS `hw`, `contract` "
            "FROM streamlift_kafka_marked WHERE NOT on_time")
    return marked, windows, late


def _ms(ts) -> int:
    """A Flink TIMESTAMP(3) (a naive datetime, UTC: the job's ``table.local-time-zone``) -> epoch ms."""
    if isinstance(ts, _dt.datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=_dt.timezone.utc)
        return int(round(ts.timestamp() * 1000))
    return int(ts)


def kafka_parts(env, cfg, p: int, keys: list, bootstrap: str | None = None, until: str | None = None,
                startup: str | None = None, group=lambda s, name: s):
    """The features job's Kafka source: a stream of ``(shard key, pickled ReaderPart)``, one
    per shard and slice, as ``jobs.features.read_validate`` gives for files."""
    from pyflink.common import Row, Types
    from pyflink.datastream import FlatMapFunction, KeyedProcessFunction
    from pyflink.datastream.state import MapStateDescriptor, ValueStateDescriptor
    from pyflink.table import StreamTableEnvironment

    from jobs.flink_env import JobMetrics

    check_topics(cfg, bootstrap)
    env.add_jars(connector_jar(cfg))
    t_env = StreamTableEnvironment.create(env)
    t_env.get_config().set("table.local-time-zone", "UTC")
    t_env.execute_sql(source_ddl(cfg, bootstrap, until, startup))
    marked, windows, late = _queries(cfg)
    t_env.create_temporary_view("streamlift_kafka_marked", t_env.sql_query(marked))
    ooo = parse_duration(cfg.features["out_of_orderness"])
    interval = parse_duration(cfg.kafka.get("batch_interval", "1s"))
    streams = topics(cfg)
    limits = {**cfg.limits, "quarantine_key": str(cfg.privacy["quarantine_key"])}
    future = cfg.limits.get("max_future")
    max_future = None if future is None else parse_duration(future)
    tagged = Types.TUPLE([Types.INT(), Types.PICKLED_BYTE_ARRAY()])

    class Read(FlatMapFunction):
        """One window row (or late record) -> a validated :class:`udfs.kafka_batch.Batch`."""

        def __init__(self, is_late: bool):
            self.is_late = is_late

        def open(self, ctx):
            from udfs.privacy import FORGET_FILE, ForgetList

            self.metrics = JobMetrics(ctx, "kafka-read")
            self.forget = ForgetList(cfg.data_dir / FORGET_FILE, str(cfg.privacy["quarantine_key"]))

        def flat_map(self, row: Row):
            from udfs.features import withhold_user_ids
            from udfs.kafka_batch import decode_batch

            topic = row[0]
            stream = streams.get(topic)
            if self.is_late:
                # it goes with the window holding its partition's watermark when it was read: a
                # window that cannot have fired yet, so the slice it lands in is the same on every run
                mark = _ms(row[5]) - ooo
                end = (mark // interval + 1) * interval
                if row[6] is not None:        # another contract or version: kept whole, with its name
                    from udfs.ingest import _quarantined_text

                    b = decode_batch(stream, [], limits, end, topic, row[1], row[2], row[2], late=True)
                    b.lines, b.frame = 1, None
                    b.quarantined = [(stream, _quarantined_text(bytes(row[3]), limits["quarantine_key"]),
                                      f"version:{row[6]}")]
                else:
                    b = decode_batch(stream, [row[3]], limits, end, topic, row[1], row[2], row[2], late=True)
                    reason = "future" if row[4] else "late"
                    df = withhold_user_ids(b.frame, self.forget) if stream == "decision" else b.frame
                    b.quarantined += [(stream, r, reason) for r in (df.to_dict("records") if len(df) else [])]
                    b.frame = None
            else:
                b = decode_batch(stream, row[5], limits, _ms(row[2]), topic, row[1], row[3], row[4])
            self.metrics.inc("records_in", b.lines)
            self.metrics.inc("quarantined", len(b.quarantined))
            yield 0, pickle.dumps(b, protocol=5)

    class Gather(KeyedProcessFunction):
        """Every window's batches -> one slice when the watermark passes the window's end."""

        def open(self, ctx):
            from udfs.privacy import FORGET_FILE, ForgetList

            self.pending = ctx.get_map_state(MapStateDescriptor("batches", Types.STRING(), Types.PICKLED_BYTE_ARRAY()))
            self.seq = ctx.get_state(ValueStateDescriptor("next_seq", Types.LONG()))
            self.fired = ctx.get_state(ValueStateDescriptor("fired_end", Types.LONG()))
            self.forget = ForgetList(cfg.data_dir / FORGET_FILE, str(cfg.privacy["quarantine_key"]))
            self.metrics = JobMetrics(ctx, "kafka-gather")

        def process_element(self, value, ctx):
            blob = value[1]
            b = pickle.loads(blob)
            kind = "l" if b.late else "b"
            if not b.late and b.window_end <= (self.fired.value() or 0):
                # a window reaching the gather after later ones were sliced (a partition that was
                # idle, see kafka.idle_timeout): it becomes the next slice, its records late there
                self.metrics.inc("windows_behind")
            self.pending.put(f"{b.window_end:015d}:{kind}:{b.topic}:{b.partition}:{b.first_offset:020d}", blob)
            ctx.timer_service().register_event_time_timer(b.window_end - 1)
            return iter(())

        def on_timer(self, timestamp, ctx):
            from jobs.sinks import atomic_write
            from udfs.features import split_slice
            from udfs.kafka_batch import gather_slice, partition_counts

            t0 = time.thread_time()
            end = timestamp + 1
            mine = [(k, pickle.loads(v)) for k, v in list(self.pending.items()) if int(k.split(":", 1)[0]) == end]
            if not mine:
                return
            frames, lines, quarantined = gather_slice([b for _, b in mine])
            seq = self.seq.value() or 0
            # what the slice took from each partition (rewritten with the same content on a replay)
            atomic_write(cfg.data_dir / "stats" / f"partitions-{seq:08d}.json",
                         json.dumps({"seq": seq, "window_end_ms": end,
                                     "partitions": partition_counts([b for _, b in mine])}).encode())
            clock_t = timestamp + ooo
            parts = split_slice(seq, frames, lines, quarantined, p, max_future, forget=self.forget, clock_t=clock_t)
            parts[0].timing = {"read_s": round(time.thread_time() - t0, 3)}
            for k, _ in mine:
                self.pending.remove(k)
            self.seq.update(seq + 1)
            self.fired.update(max(end, self.fired.value() or 0))
            self.metrics.inc("slices")
            self.metrics.set("last_window_end_ms", end)
            for i, part in enumerate(parts):
                yield keys[i], pickle.dumps(part, protocol=5)

    win_rows = t_env.to_data_stream(t_env.sql_query(windows))
    late_rows = t_env.to_data_stream(t_env.sql_query(late))
    read = group(win_rows.flat_map(Read(False), output_type=tagged).name("kafka-read").uid("kafka-read")
                 .set_parallelism(p), "read")
    read_late = group(late_rows.flat_map(Read(True), output_type=tagged).name("kafka-read-late")
                      .uid("kafka-read-late").set_parallelism(p), "read")
    return group(read.union(read_late).key_by(lambda t: t[0], key_type=Types.INT())
                 .process(Gather(), output_type=tagged).name("kafka-gather").uid("kafka-gather")
                 .set_parallelism(1), "read")


# ----------------------------------------------------------------------------- the hand-off topic
HANDOFF_SINK = "streamlift_handoff_out"
HANDOFF_SOURCE = "streamlift_handoff_in"
#: the largest hand-off record (a slice of a backfill can hold tens of thousands of rows): the
#: topic's max.message.bytes and the producer's max.request.size
HANDOFF_MAX_BYTES = 64 * 1024 * 1024


def handoff_topic(cfg) -> str:
    """``streamlift.handoff.v1``: the features job's slices for the outcomes and learner jobs,
    one record per slice (``udfs/handoff.py``), written in Kafka transactions."""
    from udfs.handoff import HANDOFF_VERSION

    return f"{cfg.kafka.get('topic_prefix', TOPIC_PREFIX)}handoff.v{HANDOFF_VERSION}"


def _with(opts: dict) -> str:
    def q(v):
        return "'" + str(v).replace("'", "''") + "'"

    return ",\n  ".join(f"{q(k)} = {q(v)}" for k, v in opts.items())


def handoff_sink_ddl(cfg, bootstrap: str | None = None) -> str:
    """The hand-off topic as an exactly-once sink: records are written in a Kafka transaction
    that commits with the Flink checkpoint holding them (a reader with ``read_committed``
    sees each once, after that checkpoint); the transaction timeout stays under the broker's
    ``transaction.max.timeout.ms`` (15 min by default)."""
    kc = cfg.kafka
    opts = {"connector": "kafka", "topic": handoff_topic(cfg), "format": "raw",
            "sink.delivery-guarantee": "exactly-once",
            "sink.transactional-id-prefix": kc.get("transactional_id_prefix")
            or f"{kc.get('topic_prefix', TOPIC_PREFIX)}features-handoff",
            "properties.transaction.timeout.ms": str(parse_duration(kc.get("transaction_timeout", "10m"))),
            "properties.max.request.size": str(HANDOFF_MAX_BYTES)}
    for k, v in client_config(cfg, bootstrap).items():
        opts[f"properties.{k}"] = v
    return f"CREATE TEMPORARY TABLE `{HANDOFF_SINK}` (`payload` BYTES) WITH (\n  {_with(opts)}\n)"


def handoff_source_ddl(cfg, group_id: str, bootstrap: str | None = None, until: str | None = None,
                       startup: str | None = None) -> str:
    """The hand-off topic as a reader's source: committed records only (``read_committed``),
    offsets in the reader's checkpoints, bounded at the offsets current at start with
    ``until="latest"``."""
    opts = {"connector": "kafka", "topic": handoff_topic(cfg), "format": "raw",
            "properties.group.id": group_id,
            "properties.isolation.level": "read_committed",
            "properties.max.partition.fetch.bytes": str(HANDOFF_MAX_BYTES),
            "scan.startup.mode": startup or cfg.kafka.get("startup_mode", "earliest-offset")}
    if until == "latest":
        opts["scan.bounded.mode"] = "latest-offset"
    elif until not in (None, "", "never"):
        raise ValueError(f"--until must be 'latest' or 'never', not {until!r}")
    for k, v in client_config(cfg, bootstrap).items():
        opts[f"properties.{k}"] = v
    return (f"CREATE TEMPORARY TABLE `{HANDOFF_SOURCE}` (`payload` BYTES, "
            f"`offset` BIGINT METADATA VIRTUAL) WITH (\n  {_with(opts)}\n)")


def _add_connector(env, cfg) -> None:
    jar = connector_jar(cfg)
    have = env._j_stream_execution_environment.getConfiguration().toMap().get("pipeline.jars") or ""
    if jar not in have:
        env.add_jars(jar)


def attach_handoff_sink(env, cfg, stream, bootstrap: str | None = None) -> None:
    """Write ``stream`` (the hand-off records, bytes) to the hand-off topic within the job of ``env``."""
    from pyflink.table import StreamTableEnvironment

    check_handoff_topic(cfg, bootstrap)
    _add_connector(env, cfg)
    t_env = StreamTableEnvironment.create(env)
    t_env.execute_sql(handoff_sink_ddl(cfg, bootstrap))
    ss = t_env.create_statement_set()
    ss.add_insert(HANDOFF_SINK, t_env.from_data_stream(stream).alias("payload"))
    ss.attach_as_datastream()


def check_handoff_topic(cfg, bootstrap: str | None = None, timeout: float = 15.0) -> None:
    from confluent_kafka.admin import AdminClient

    conf = client_config(cfg, bootstrap)
    md = AdminClient({**librdkafka_config(conf), "log_level": 0}).list_topics(timeout=timeout)
    t = handoff_topic(cfg)
    if t not in md.topics or md.topics[t].error is not None:
        raise TopicMissing(f"Kafka topic {t} does not exist on {conf['bootstrap.servers']}: create it with "
                           "`python -m tools.produce create-topics` (or your platform's tooling, with "
                           f"max.message.bytes={HANDOFF_MAX_BYTES})")


def handoff_stream(env, cfg, group_id: str, bootstrap: str | None = None, until: str | None = None,
                   startup: str | None = None):
    """The hand-off records (committed ones only) as a stream of the job of ``env``: rows of one
    field, the record's bytes."""
    from pyflink.table import StreamTableEnvironment

    check_handoff_topic(cfg, bootstrap)
    _add_connector(env, cfg)
    t_env = StreamTableEnvironment.create(env)
    t_env.execute_sql(handoff_source_ddl(cfg, group_id, bootstrap, until, startup))
    return t_env.to_data_stream(t_env.sql_query(f"SELECT `payload` FROM `{HANDOFF_SOURCE}`"))


def committed_handoff(cfg, bootstrap: str | None = None, timeout: float = 30.0) -> list[bytes]:
    """Every committed record of the hand-off topic, in offset order (a read_committed consumer
    from the earliest offsets to the end): what the outcomes and learner jobs read, for tools
    that evaluate a run (``tools.evaluate``) and for tests."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    conf = librdkafka_config(client_config(cfg, bootstrap))
    topic = handoff_topic(cfg)
    c = Consumer({**conf, "group.id": "streamlift-handoff-reader", "isolation.level": "read_committed",
                  "enable.auto.commit": False, "enable.partition.eof": True, "auto.offset.reset": "earliest",
                  "fetch.max.bytes": HANDOFF_MAX_BYTES, "max.partition.fetch.bytes": HANDOFF_MAX_BYTES,
                  "log_level": 0})
    try:
        md = c.list_topics(topic, timeout=timeout)
        if topic not in md.topics or md.topics[topic].error is not None:
            raise TopicMissing(f"Kafka topic {topic} does not exist on {conf['bootstrap.servers']}")
        parts = sorted(md.topics[topic].partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out, open_parts, deadline = [], set(parts), time.time() + timeout
        while open_parts:
            m = c.poll(1.0)
            if m is None:
                if time.time() > deadline:
                    raise TimeoutError(f"no end of {topic} within {timeout} s")
                continue
            if m.error():
                if m.error().code() != KafkaError._PARTITION_EOF:
                    raise RuntimeError(f"reading {topic}: {m.error()}")
                open_parts.discard(m.partition())
                continue
            out.append(m.value())
        return out
    finally:
        c.close()
