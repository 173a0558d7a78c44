"""Kafka as a source of the event streams: Flink SQL DDL, one table per contract.

Not wired into the jobs: they read files (``jobs.flink_env.line_source``). This module is the
configuration a team needs to read the same contracts from Kafka, generated from
``schemas/`` so it cannot drift from the validator:

* one topic per contract, ``<prefix><name>.v<version>`` (``streamlift.decision.v1``);
* ``format = json``, columns from :meth:`schemas.Contract.flink_sql_columns`;
* event time: a computed ``rowtime`` column from the record's timestamp, by default the
  contract's time field (``event_time``, epoch ms: the time the jobs' watermark uses) or,
  with ``time_source="kafka"``, the Kafka record timestamp (``METADATA FROM 'timestamp'``);
  ``WATERMARK FOR rowtime AS rowtime - <features.out_of_orderness>``.

>>> from jobs.config import load
>>> ddl = source_ddl(CONTRACTS["click"], out_of_orderness="5m", bootstrap_servers="kafka:9092")
>>> print(ddl.splitlines()[0])
CREATE TABLE IF NOT EXISTS `kafka_click_v1` (
>>> "'topic' = 'streamlift.click.v1'" in ddl, "'format' = 'json'" in ddl
(True, True)
>>> print([l.strip() for l in ddl.splitlines() if l.strip().startswith("WATERMARK")][0])
WATERMARK FOR `rowtime` AS `rowtime` - INTERVAL '0 00:05:00.000' DAY TO SECOND(3)
>>> sorted(source_ddls(load(env={}), bootstrap_servers="kafka:9092"))
['click', 'conversion', 'decision']

The connector boundary
----------------------
Executing this DDL needs the Flink SQL Kafka connector, a Java jar that is not part of the
``apache-flink`` pip package (and could not be fetched where this was written, so no DDL here
was ever executed against Flink or a broker). Take ``flink-sql-connector-kafka-<connector
version>-<Flink major.minor>.jar`` matching the cluster's Flink (Maven Central,
``org.apache.flink:flink-sql-connector-kafka``) and put it on the classpath one of three ways:

* in the image: ``docker build --build-arg KAFKA_CONNECTOR_URL=<jar URL>`` (``docker/Dockerfile``
  adds it to ``/opt/flink/lib`` of every JobManager and TaskManager);
* per submission: ``flink run -j /path/flink-sql-connector-kafka.jar -py jobs/<job>.py ...``;
* in the configuration: ``pipeline.jars: file:///opt/flink/usrlib/flink-sql-connector-kafka.jar``
  (``flink-conf/<profile>/config.yaml``; or ``env.add_jars(...)`` / ``table_env.get_config().set(
  "pipeline.jars", ...)`` in the job).

Then :func:`create_sources` registers the tables and ``table_env.from_path("kafka_decision_v1")``
reads them. Untested here: the connector itself, the broker, offsets and exactly-once reading,
and how the jobs would consume the rows (they take one slice of lines per element today). With
``format = json`` a record that does not parse either fails the job or, with
``json.ignore-parse-errors``, becomes NULLs silently; to keep the project's validator and its
quarantine reasons, read ``format = raw`` (:func:`raw_source_ddl`: the line as one STRING column)
and validate with ``udfs.validation`` as the file path does.
"""

from __future__ import annotations

import argparse
import sys

from schemas import CONTRACTS, Contract
from udfs.spec import parse_duration

__all__ = ["topic_name", "table_name", "source_ddl", "raw_source_ddl", "source_ddls",
           "create_sources", "watermark_interval"]

TOPIC_PREFIX = "streamlift."


def topic_name(contract: Contract, prefix: str = TOPIC_PREFIX) -> str:
    """``streamlift.decision.v1``: one topic per contract and version."""
    return f"{prefix}{contract.name}.v{contract.version}"


def table_name(contract: Contract) -> str:
    return f"kafka_{contract.qualified_name}"


def watermark_interval(out_of_orderness) -> str:
    """A Flink SQL interval literal for a duration, ``DAY TO SECOND(3)`` (a plain ``SECOND``
    interval allows two digits only: ``INTERVAL '300' SECOND`` is rejected by Flink's parser).

    >>> watermark_interval("5m"), watermark_interval("1500ms"), watermark_interval("7d")
    ("INTERVAL '0 00:05:00.000' DAY TO SECOND(3)", "INTERVAL '0 00:00:01.500' DAY TO SECOND(3)", "INTERVAL '7 00:00:00.000' DAY TO SECOND(3)")
    """
    ms = parse_duration(out_of_orderness)
    if ms < 0:
        raise ValueError(f"negative out_of_orderness: {out_of_orderness!r}")
    days, rest = divmod(ms, 86_400_000)
    if days > 99:
        raise ValueError(f"out_of_orderness over 99 days: {out_of_orderness!r}")
    h, rest = divmod(rest, 3_600_000)
    m, rest = divmod(rest, 60_000)
    sec, milli = divmod(rest, 1000)
    return f"INTERVAL '{days} {h:02d}:{m:02d}:{sec:02d}.{milli:03d}' DAY TO SECOND(3)"


def _quote(v) -> str:
    return "'" + str(v).replace("'", "''") + "'"


def _with(options: dict) -> str:
    return ",\n  ".join(f"{_quote(k)} = {_quote(v)}" for k, v in options.items())


def _options(contract, bootstrap_servers, group_id, topic_prefix, startup_mode, fmt, properties):
    opts = {"connector": "kafka",
            "topic": topic_name(contract, topic_prefix),
            "properties.bootstrap.servers": bootstrap_servers,
            "properties.group.id": group_id,
            "scan.startup.mode": startup_mode,
            "properties.auto.offset.reset": "earliest",
            "format": fmt}
    if fmt == "json":
        opts.update({"json.fail-on-missing-field": "false", "json.ignore-parse-errors": "false"})
    opts.update(properties or {})
    return opts


def source_ddl(contract: Contract, *, out_of_orderness, bootstrap_servers: str,
               group_id: str = "streamlift", topic_prefix: str = TOPIC_PREFIX,
               startup_mode: str = "group-offsets", time_source: str = "event",
               properties: dict | None = None) -> str:
    """``CREATE TABLE`` for ``contract``'s topic: JSON, the contract's columns, a ``rowtime``
    column and a watermark ``out_of_orderness`` behind it. ``time_source``: ``"event"`` (the
    contract's time field, epoch ms) or ``"kafka"`` (the Kafka record timestamp). ``properties``
    adds or replaces connector options (``properties.security.protocol``, ...)."""
    cols = [contract.flink_sql_columns()]
    if time_source == "event":
        if contract.field(contract.time_field).type != "timestamp_ms":
            raise ValueError(f"{contract.qualified_name}.{contract.time_field} is not epoch ms")
        cols.append(f"`rowtime` AS TO_TIMESTAMP_LTZ(`{contract.time_field}`, 3)")
    elif time_source == "kafka":
        cols.append("`rowtime` TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL")
    else:
        raise ValueError(f"time_source must be 'event' or 'kafka', not {time_source!r}")
    cols.append(f"WATERMARK FOR `rowtime` AS `rowtime` - {watermark_interval(out_of_orderness)}")
    opts = _options(contract, bootstrap_servers, group_id, topic_prefix, startup_mode, "json", properties)
    return (f"CREATE TABLE IF NOT EXISTS `{table_name(contract)}` (\n  "
            + ",\n  ".join(cols) + f"\n) WITH (\n  {_with(opts)}\n)")


def raw_source_ddl(contract: Contract, *, bootstrap_servers: str, group_id: str = "streamlift",
                   topic_prefix: str = TOPIC_PREFIX, startup_mode: str = "group-offsets",
                   properties: dict | None = None) -> str:
    """The same topic read as raw lines (``line STRING`` and the Kafka timestamp), for the
    project's own validation and quarantine path; the watermark is then the jobs' in-band clock.

    >>> ddl = raw_source_ddl(CONTRACTS["decision"], bootstrap_servers="kafka:9092")
    >>> "`line` STRING" in ddl, "'format' = 'raw'" in ddl, "WATERMARK" in ddl
    (True, True, False)
    """
    opts = _options(contract, bootstrap_servers, group_id, topic_prefix, startup_mode, "raw", properties)
    return (f"CREATE TABLE IF NOT EXISTS `{table_name(contract)}_raw` (\n  `line` STRING,\n"
            f"  `kafka_ts` TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL\n) WITH (\n  {_with(opts)}\n)")


def source_ddls(cfg, *, bootstrap_servers: str, **kwargs) -> dict[str, str]:
    """One DDL per event contract (``schemas.STREAMS``), the watermark from
    ``features.out_of_orderness`` of ``cfg`` (a :class:`jobs.config.Config`)."""
    return {name: source_ddl(c, out_of_orderness=cfg.features["out_of_orderness"],
                             bootstrap_servers=bootstrap_servers, **kwargs)
            for name, c in CONTRACTS.items()}


def create_sources(table_env, ddls: dict[str, str]) -> list[str]:
    """Executes the DDL on a PyFlink ``TableEnvironment`` (needs the connector jar at query
    time, not here); returns the table names in order."""
    names = []
    for name, ddl in ddls.items():
        table_env.execute_sql(ddl)
        names.append(table_name(CONTRACTS[name]))
    return names


def main(argv=None) -> None:
    from jobs.config import quiet_third_party_warnings

    quiet_third_party_warnings()
    from jobs.config import load

    p = argparse.ArgumentParser(description="print the Flink SQL DDL of the Kafka sources")
    p.add_argument("--bootstrap-servers", default="kafka:9092")
    p.add_argument("--group-id", default="streamlift")
    p.add_argument("--topic-prefix", default=TOPIC_PREFIX)
    p.add_argument("--time-source", choices=["event", "kafka"], default="event")
    p.add_argument("--raw", action="store_true", help="raw lines for the project's validator")
    a = p.parse_args(argv)
    if a.raw:
        ddls = {n: raw_source_ddl(c, bootstrap_servers=a.bootstrap_servers, group_id=a.group_id,
                                  topic_prefix=a.topic_prefix) for n, c in CONTRACTS.items()}
    else:
        ddls = source_ddls(load(), bootstrap_servers=a.bootstrap_servers, group_id=a.group_id,
                           topic_prefix=a.topic_prefix, time_source=a.time_source)
    sys.stdout.write(";\n\n".join(ddls.values()) + ";\n")


if __name__ == "__main__":
    main()
