"""Hostile input (no JVM): exact patterns, size limits, finite numbers, future-dated events that
cannot move the clock, and composite keys that no separator can merge."""

import json

import pytest

from schemas import CONTRACTS
from udfs.validation import Validator

T0 = 1_767_225_600_000
DEC = {"decision_id": "d1", "event_time": T0, "user_id": "u_0000000000000001", "placement": "feed",
       "device": "ios", "region": "eu", "hour": 0, "campaign_id": "c1", "creative_id": "k1", "arm": "treatment",
       "propensity": 0.5, "policy_id": "p", "model_version": "m1", "feature_schema_version": 1, "consent": True}


def check(kind, rec, **limits):
    return Validator(CONTRACTS[kind], **limits).parse_line(json.dumps(rec).encode())[1]


def test_patterns_match_the_whole_value():
    assert check("decision", DEC) is None
    assert check("decision", {**DEC, "user_id": "u_0000000000000001\n"}) == "pattern:user_id"
    assert check("decision", {**DEC, "user_id": "alice@example.com"}) == "pattern:user_id"


def test_size_limits_have_their_own_reasons_and_huge_lines_are_not_stored_whole(tmp_path):
    from udfs.ingest import read_slice

    assert check("decision", {**DEC, "decision_id": "d" * 300}) == "size:decision_id"
    assert check("decision", {**DEC, "decision_id": "d" * 300}, max_field_chars=1000) is None
    huge = json.dumps({**DEC, "decision_id": "x" * 200_000}).encode()
    (tmp_path / "d.jsonl").write_bytes(json.dumps(DEC).encode() + b"\n" + huge + b"\n")
    s = read_slice(json.dumps({"seq": 0, "root": str(tmp_path), "files": {"decision": "d.jsonl"}}))
    assert s.lines == {"decision": 2} and len(s.batches["decision"]) == 1
    (stream, stored, reason), = s.quarantined
    assert reason == "size:line" and len(stored) < 700 and "sha256" in stored


def test_numbers_must_be_finite_and_bounded():
    assert check("conversion", {"event_id": "v", "decision_id": "d1", "event_time": T0, "value": 1e308}) == "range:value"
    assert check("conversion", {"event_id": "v", "decision_id": "d1", "event_time": T0, "value": 1e16}) == "range:value"
    assert check("conversion", {"event_id": "v", "decision_id": "d1", "event_time": T0, "value": 12.5}) is None


def test_a_future_dated_record_is_quarantined_and_does_not_move_the_clock():
    from udfs.features import FeatureEngine

    hour = 3_600_000
    slices = [[{**DEC, "decision_id": f"a{i}", "event_time": T0 + i * 60_000} for i in range(50)],
              [{**DEC, "decision_id": "bad", "event_time": 3_786_000_000_000}]            # 2089
              + [{**DEC, "decision_id": f"b{i}", "event_time": T0 + hour + i * 60_000} for i in range(50)],
              [{**DEC, "decision_id": f"c{i}", "event_time": T0 + 2 * hour + i * 60_000} for i in range(50)]]
    for guard, expect_late in ((None, True), ("1d", False)):
        eng = FeatureEngine(half_lives=("1h",), max_future=guard)
        outs = []
        for seq, recs in enumerate(slices):
            outs += eng.offer(seq, {"decision": recs})
        outs += eng.flush()
        reasons = [r for o in outs for _, _, r in o.quarantine]
        if expect_late:            # without the guard the one record makes everything after it late
            assert reasons.count("late") >= 50
        else:
            assert reasons == ["future"]
            assert sum(o.counts["processed"].get("decision", 0) for o in outs) == 150


def test_composite_keys_cannot_be_merged_by_a_separator():
    from udfs.features import FeatureEngine

    eng = FeatureEngine(half_lives=("1h",), out_of_orderness="0ms")
    recs = [{**DEC, "decision_id": "x1", "campaign_id": "a|b", "creative_id": "c"},
            {**DEC, "decision_id": "x2", "campaign_id": "a", "creative_id": "b|c", "event_time": T0 + 1}]
    eng.offer(0, {"decision": recs})
    eng.flush()
    cc = eng.feature_values("campaign_creative")
    assert sorted(zip(cc.campaign_id, cc.creative_id)) == [("a", "b|c"), ("a|b", "c")]
    assert cc.impressions_1h.tolist() == pytest.approx([1.0, 1.0])


def test_source_faults_are_quarantined_and_counted(tmp_path):
    """A manifest naming a missing file or an unknown stream: recorded with a reason, counted as
    input, and the slice's other files are read; in = processed + quarantined + pending."""
    from udfs.features import FeatureEngine
    from udfs.ingest import read_slice

    (tmp_path / "d.jsonl").write_text(json.dumps(DEC) + "\n")
    s = read_slice(json.dumps({"seq": 0, "root": str(tmp_path),
                               "files": {"decision": "d.jsonl", "click": "missing.jsonl", "bogus": "x.jsonl"}}))
    assert sorted(r for _, _, r in s.quarantined) == ["source:missing_file", "source:unknown_stream"]
    assert s.lines == {"decision": 1, "click": 1, "bogus": 1}
    eng = FeatureEngine(half_lives=("1h",))
    outs = eng.offer(0, s.batches, s.lines, s.quarantined) + eng.flush()
    n_in = sum(sum(o.counts["in"].values()) for o in outs)
    assert n_in == sum(sum(o.counts["processed"].values()) for o in outs) + sum(len(o.quarantine) for o in outs)


def test_without_consent_no_user_id_goes_downstream_and_rejected_ids_are_hashed(tmp_path):
    from udfs.features import FeatureEngine
    from udfs.ingest import read_slice

    recs = [{**DEC, "decision_id": "y1", "consent": False, "user_id": "u_00000000000000aa"},
            {**DEC, "decision_id": "y2", "user_id": "alice@example.com"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = read_slice(json.dumps({"seq": 0, "root": str(tmp_path), "files": {"decision": "d.jsonl"}}),
                   limits={"quarantine_key": "k"})
    (_, stored, reason), = s.quarantined
    assert reason == "pattern:user_id" and "alice" not in stored and '"user_id":"hmac:' in stored
    eng = FeatureEngine(half_lives=("1h",), out_of_orderness="0ms")
    outs = eng.offer(0, s.batches, s.lines, s.quarantined) + eng.flush()
    enriched = [o.enriched for o in outs if o.enriched is not None][0]
    assert enriched.user_id.tolist() == [""] and "u_00000000000000aa" not in enriched.to_json()
    assert len(eng.feature_values("user")) == 0


def test_a_snapshot_that_is_not_the_one_written_is_refused_before_unpickling(tmp_path, monkeypatch):
    import pickle

    from serving.serve import load_model, write_snapshot
    from udfs.learners import Snapshot

    store = f"file://{tmp_path}/models"
    snap = Snapshot(model_id="m", version=1, clock=0, seq=0, feature_schema_version="x", window_start=None,
                    window_end=None, examples=0, corrections=0, metrics={}, drift=0.0, safe=True,
                    bundle=pickle.dumps({"weights": [1.0, 2.0]}))
    write_snapshot(store, snap)
    assert load_model(store, "m", 1).bundle == {"weights": [1.0, 2.0]}
    path = tmp_path / "models" / "m" / "v000001" / "model.pkl"
    path.write_bytes(pickle.dumps({"weights": [6.0, 6.0]}))                  # swapped behind its back
    with pytest.raises(ValueError, match="SHA-256"):
        load_model(store, "m", 1)
    monkeypatch.setenv("STREAMLIFT_SNAPSHOT_KEY", "secret")
    write_snapshot(store, snap)
    assert load_model(store, "m", 1).bundle == {"weights": [1.0, 2.0]}
    monkeypatch.setenv("STREAMLIFT_SNAPSHOT_KEY", "another")
    with pytest.raises(ValueError, match="HMAC"):
        load_model(store, "m", 1)
