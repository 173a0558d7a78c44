"""The Kafka source's Python side without a JVM: decoding and validating a window's records,
joining a window's batches into one slice, the source DDL."""

import orjson
import pandas as pd
import pytest

from udfs.kafka_batch import TOMBSTONE, decode_batch, gather_slice


def _blob(values):
    return [TOMBSTONE if v is None else v for v in values]


def _click(i, t=1767225600000):
    return orjson.dumps({"event_id": f"c{i}", "decision_id": f"d{i}", "event_time": t + i})


def test_every_record_is_a_row_or_quarantined_with_its_reason():
    values = [_click(1), None, b"", b"  \n", b"\xc3\x28", b"{nope", _click(2), b"x" * 70_000,
              orjson.dumps({"event_id": "c3", "decision_id": "d3"})]
    b = decode_batch("click", _blob(values), {"max_line_bytes": 65536})
    assert b.lines == len(values)
    assert list(b.frame["event_id"]) == ["c1", "c2"]
    reasons = sorted(r for _, _, r in b.quarantined)
    assert reasons == ["bad_json", "empty", "empty", "empty:tombstone", "encoding", "missing:event_time", "size:line"]
    assert len(b.frame) + len(b.quarantined) == b.lines


def test_a_null_value_is_a_tombstone_too():
    b = decode_batch("click", [None, _click(1)])
    assert b.lines == 2 and len(b.frame) == 1 and b.quarantined[0][2] == "empty:tombstone"


def test_identifiers_in_rejected_records_are_stored_as_keyed_hashes():
    rec = orjson.dumps({"decision_id": "d1", "event_time": 1, "user_id": "alice@example.com"})
    b = decode_batch("decision", _blob([rec]), {"quarantine_key": "k"})
    assert "alice" not in b.quarantined[0][1] and "hmac:" in b.quarantined[0][1]


def test_an_empty_window_row():
    b = decode_batch("click", [])
    assert b.lines == 0 and len(b.frame) == 0 and b.quarantined == []


def test_a_slice_does_not_depend_on_the_order_its_batches_arrive_in():
    parts = [decode_batch("click", _blob([_click(i), _click(i + 100)]), {}, 10, "t", p, first_offset=i)
             for p, i in ((0, 0), (1, 5), (0, 9))]
    parts.append(decode_batch("conversion", _blob([b"{bad"]), {}, 10, "v", 0, first_offset=0))
    a, b = gather_slice(parts), gather_slice(parts[::-1])
    assert a[1] == b[1] == {"click": 6, "conversion": 1}
    assert a[2] == b[2]
    pd.testing.assert_frame_equal(a[0]["click"], b[0]["click"])
    assert list(a[0]["click"]["event_id"]) == ["c0", "c100", "c9", "c109", "c5", "c105"]


def test_source_ddl_reads_every_contract_topic_raw_with_per_partition_watermarks():
    from jobs.config import load
    from jobs.kafka import source_ddl, topics

    cfg = load(env={"STREAMLIFT_KAFKA__PROPERTIES": "{security.protocol: SASL_PLAINTEXT, sasl.mechanism: PLAIN}"})
    ddl = source_ddl(cfg, "k:9092", until="latest")
    assert f"'topic' = '{';'.join(topics(cfg))}'" in ddl
    assert "'format' = 'raw'" in ddl and "'scan.bounded.mode' = 'latest-offset'" in ddl
    assert "'properties.bootstrap.servers' = 'k:9092'" in ddl
    assert "'properties.security.protocol' = 'SASL_PLAINTEXT'" in ddl
    assert "WATERMARK FOR `rowtime` AS `rowtime` - INTERVAL '0 00:05:00.000' DAY TO SECOND(3)" in ddl
    assert "'scan.bounded.mode'" not in source_ddl(cfg, "k:9092")
    with pytest.raises(ValueError):
        source_ddl(cfg, "k:9092", until="tomorrow")
    assert sorted(topics(cfg).values()) == ["click", "conversion", "decision"]


def test_sasl_credentials_reach_the_python_clients():
    from jobs.kafka import librdkafka_config

    got = librdkafka_config({"sasl.jaas.config": 'org.apache.kafka.common.security.plain.PlainLoginModule required '
                                           'username="app" password="s3cret";', "bootstrap.servers": "b:1"})
    assert got == {"bootstrap.servers": "b:1", "sasl.username": "app", "sasl.password": "s3cret"}
