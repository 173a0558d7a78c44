"""Property-based fuzzing (hypothesis) of the contracts, the slice reader and the features
engine: arbitrary bytes, arbitrary JSON, arbitrary orders and duplicates. No crash, every record
accounted for, the engine (at 1-3 shards) equal to the batch reference. Slow. ``make test``:
2,500 inputs per contract target, 2,500 reader slices, 75 engine streams; ``make fuzz``
(STREAMLIFT_FUZZ_EXAMPLES=10000): 10,000 each and 300 engine streams (README)."""

import json
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import CONTRACTS
from udfs.validation import Validator

pytestmark = pytest.mark.slow
T0 = 1_767_225_600_000
EXAMPLES = int(os.environ.get("STREAMLIFT_FUZZ_EXAMPLES", "2500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=8)


def _record_like(kind):
    """Dicts with the contract's fields (each maybe missing or of any JSON type) and extra keys."""
    names = CONTRACTS[kind].field_names
    return st.fixed_dictionaries({}, optional={n: json_values for n in names}) | \
        st.dictionaries(st.sampled_from(list(names) + ["extra"]), json_values, max_size=len(names) + 1)


def _assert_outcome(kind, rec, reason):
    if reason is None:
        assert set(rec) == set(CONTRACTS[kind].field_names)
    else:
        assert rec is None and isinstance(reason, str) and reason


@pytest.mark.parametrize("kind", sorted(CONTRACTS.keys() & {"decision", "click", "conversion"}))
def test_arbitrary_bytes_never_crash_the_validator(kind):
    v = Validator(CONTRACTS[kind])

    @FUZZ
    @given(st.binary(max_size=400))
    def run(raw):
        _assert_outcome(kind, *v.parse_line(raw))

    run()


@pytest.mark.parametrize("kind", ["decision", "click", "conversion"])
def test_arbitrary_json_records_pass_or_fail_with_a_reason(kind):
    v = Validator(CONTRACTS[kind])

    @FUZZ
    @given(_record_like(kind))
    def run(obj):
        rec, reason = v.parse_line(json.dumps(obj).encode())
        _assert_outcome(kind, rec, reason)
        if rec is not None:
            for f in CONTRACTS[kind].fields:
                if f.type == "double":
                    assert math.isfinite(rec[f.name])

    run()


def test_arbitrary_slice_files_are_read_and_every_line_accounted_for(tmp_path_factory):
    from udfs.ingest import read_slice

    root = tmp_path_factory.mktemp("fuzz-slices")
    valid = json.dumps({"event_id": "c1", "decision_id": "d1", "event_time": T0}).encode()

    @FUZZ
    @given(st.lists(st.binary(max_size=120) | st.just(valid), max_size=30))
    def run(lines):
        body = b"\n".join(l.replace(b"\n", b" ") for l in lines)
        (root / "c.jsonl").write_bytes(body)
        s = read_slice(json.dumps({"seq": 0, "root": str(root), "files": {"click": "c.jsonl"}}))
        non_empty = sum(1 for l in body.split(b"\n") if l.strip())
        assert s.lines["click"] == non_empty == len(s.batches["click"]) + len(s.quarantined)

    run()


@st.composite
def streams(draw):
    """Decisions, clicks and conversions (with duplicates) over two hours, cut into slices in an
    arbitrary arrival order within the out-of-orderness bound."""
    n = draw(st.integers(1, 40))
    users = [f"u_{i:016x}" for i in range(draw(st.integers(1, 5)))]
    decs = []
    for i in range(n):
        decs.append({"decision_id": f"d{i}", "event_time": T0 + draw(st.integers(0, 7_200_000)),
                     "user_id": draw(st.sampled_from(users)), "placement": "feed", "device": "ios", "region": "eu",
                     "hour": 0, "campaign_id": draw(st.sampled_from(["c1", "c2"])),
                     "creative_id": draw(st.sampled_from(["k1", "k2"])),
                     "arm": draw(st.sampled_from(["treatment", "control"])), "propensity": 0.5, "policy_id": "p",
                     "model_version": "m", "feature_schema_version": 1, "consent": draw(st.booleans())})
    events = [("decision", d) for d in decs]
    for j in range(draw(st.integers(0, 30))):
        d = draw(st.sampled_from(decs))
        kind = draw(st.sampled_from(["click", "conversion"]))
        rec = {"event_id": f"e{j}", "decision_id": d["decision_id"],
               "event_time": d["event_time"] + draw(st.integers(-60_000, 5_400_000))}
        if kind == "conversion":
            rec["value"] = 1.0
        events.append((kind, rec))
    events += [draw(st.sampled_from(events)) for _ in range(draw(st.integers(0, 5)))]     # redeliveries
    jitter = [draw(st.integers(0, 120_000)) for _ in events]
    order = sorted(range(len(events)), key=lambda i: events[i][1]["event_time"] + jitter[i])
    size = draw(st.integers(1, 15))
    slices = []
    for s in range(0, len(order), size):
        batch = {}
        for i in order[s:s + size]:
            batch.setdefault(events[i][0], []).append(events[i][1])
        slices.append(batch)
    return slices, draw(st.integers(1, 3))


@settings(max_examples=max(30, EXAMPLES * 3 // 100), deadline=None, suppress_health_check=list(HealthCheck))
@given(streams())
def test_the_sharded_engine_equals_the_batch_reference_on_arbitrary_streams(case):
    from reference import reference
    from udfs.features import KEY_SEP, ENTITY_COLUMNS, FeatureEngine

    slices, shards = case
    eng = FeatureEngine(half_lives=("1h",), out_of_orderness="5m", shards=shards)
    outs = []
    for seq, batch in enumerate(slices):
        outs += eng.offer(seq, batch, {k: len(v) for k, v in batch.items()})
    outs += eng.flush()
    ref_features, ref_enriched, ref_reasons = reference(slices, half_lives=("1h",))
    n_in = sum(len(v) for b in slices for v in b.values())
    assert n_in == sum(sum(o.counts["processed"].values()) for o in outs) + sum(len(o.quarantine) for o in outs)
    reasons = {}
    for o in outs:
        for _, _, r in o.quarantine:
            reasons[r] = reasons.get(r, 0) + 1
    assert reasons == ref_reasons
    enriched = {r["decision_id"]: r for o in outs if o.enriched is not None for r in o.enriched.to_dict("records")}
    assert set(enriched) == set(ref_enriched)
    for did, row in ref_enriched.items():
        for col, v in row.items():
            g = enriched[did][col]
            assert (math.isnan(g) if v is None else g == pytest.approx(v, rel=1e-9, abs=1e-12)), (did, col)
    for kt, keys in ref_features.items():
        df = eng.feature_values(kt)
        ents = list(ENTITY_COLUMNS[kt])
        got = {KEY_SEP.join(r[e] for e in ents): r for r in df.to_dict("records")}
        assert set(got) == set(keys), kt
        for key, vals in keys.items():
            for name, v in vals.items():
                if name != "as_of":
                    assert got[key][name] == pytest.approx(v, rel=1e-9, abs=1e-12)
