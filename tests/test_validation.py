"""Contract validation: every valid record passes; each kind of bad record fails with its reason."""

import orjson
import pytest

from schemas import CONTRACTS, load
from udfs.validation import MAX_TIMESTAMP_MS, Validator, reason_kind

T = 1_767_225_600_000
GOOD = {
    "decision": {"decision_id": "d1", "event_time": T, "user_id": "u_0123456789abcdef",
                 "placement": "feed", "device": "ios", "region": "eu", "hour": 3,
                 "campaign_id": "c1", "creative_id": "k1", "arm": "control", "propensity": 1,
                 "policy_id": "p", "model_version": "m", "feature_schema_version": 1, "consent": False},
    "click": {"event_id": "e1", "decision_id": "d1", "event_time": T},
    "conversion": {"event_id": "e2", "decision_id": "d1", "event_time": T, "value": 0},
}


@pytest.mark.parametrize("stream", sorted(GOOD))
def test_valid_records_pass_and_keep_only_contract_fields(stream):
    v = Validator(CONTRACTS[stream])
    rec, reason = v.parse_line(orjson.dumps({**GOOD[stream], "extra": 1}))
    assert reason is None
    assert list(rec) == CONTRACTS[stream].field_names


def test_every_simulated_valid_record_passes(small_sim):
    from tests.conftest import read_slices
    import json

    summary = json.loads((small_sim / "truth" / "summary.json").read_text())
    slices = read_slices(small_sim)
    n_bad = sum(len(s.quarantined) for s in slices)
    assert n_bad == sum(summary["malformed_injected"].values())
    assert sum(len(b) for s in slices for b in s.batches.values()) + n_bad == summary["lines_total"]


BAD = [
    ("decision", b'{"decision_id": "d1",', "bad_json"),
    ("decision", b"[1, 2]", "not_object"),
    ("decision", {"user_id": None}, "missing:user_id"),
    ("decision", {"user_id": "alice@example.com"}, "pattern:user_id"),
    ("decision", {"propensity": 0.0}, "range:propensity"),
    ("decision", {"propensity": 1.0001}, "range:propensity"),
    ("decision", {"propensity": "0.5"}, "type:propensity"),
    ("decision", {"arm": "both"}, "enum:arm"),
    ("decision", {"hour": 24}, "range:hour"),
    ("decision", {"hour": True}, "type:hour"),
    ("decision", {"consent": "yes"}, "type:consent"),
    ("decision", {"event_time": -5}, "timestamp:event_time"),
    ("click", {"event_time": MAX_TIMESTAMP_MS + 1}, "timestamp:event_time"),
    ("click", {"event_time": 1.5e12}, "type:event_time"),
    ("click", {"decision_id": ""}, "type:decision_id"),
    ("conversion", {"value": -1.0}, "range:value"),
    ("conversion", b'{"event_id":"e2","decision_id":"d1","event_time":1767225600000,"value":NaN}', "bad_json"),
]


@pytest.mark.parametrize("stream,change,reason", BAD)
def test_bad_records_fail_with_their_reason(stream, change, reason):
    v = Validator(CONTRACTS[stream])
    if isinstance(change, bytes):
        line = change
    else:
        rec = dict(GOOD[stream])
        for k, val in change.items():
            if val is None:
                rec.pop(k)
            else:
                rec[k] = val
        line = orjson.dumps(rec)
    rec, got = v.parse_line(line)
    assert rec is None and got == reason


def test_reason_kinds_and_derived_schemas_agree():
    assert reason_kind("missing:user_id") == "missing"
    for name, c in CONTRACTS.items():
        assert c == load(name, 1)
        assert c.arrow_schema().names == c.field_names
        assert c.flink_sql_columns().count("`") == 2 * len(c.fields)
