"""The features engine against the batch reference (tests/reference.py)."""

import math
import pickle
import random

import numpy as np
import pytest

from conftest import read_slices
from reference import reference
from schemas import CONTRACTS
from udfs.features import KEY_SEP, KEY_TYPES, ENTITY_COLUMNS, FeatureEngine

PARAMS = dict(half_lives=("1h", "1d", "7d"), out_of_orderness="5m")


def as_dicts(slice_):
    return {k: [dict(zip(CONTRACTS[k].field_names, r)) for r in recs] for k, recs in slice_.batches.items()}


def run_engine(slices, engine=None, **params):
    eng = engine or FeatureEngine(**{**PARAMS, **params})
    outs = []
    for s in slices:
        outs += eng.offer(s.seq, s.batches, s.lines, s.quarantined)
    outs += eng.flush()
    return eng, outs


def engine_features(eng):
    got = {}
    for kt in KEY_TYPES:
        df = eng.feature_values(kt)
        ents = list(ENTITY_COLUMNS[kt])
        keys = df[ents].astype(str).agg(KEY_SEP.join, axis=1) if len(ents) > 1 else df[ents[0]]
        got[kt] = dict(zip(keys, df.drop(columns=ents).to_dict("records")))
    return got


def assert_features_equal(got, ref):
    for kt in KEY_TYPES:
        assert set(got[kt]) == set(ref[kt]), kt
        for key, vals in ref[kt].items():
            g = got[kt][key]
            assert g["event_timestamp"].value // 1_000_000 == vals["as_of"]
            for name, v in vals.items():
                if name != "as_of":
                    assert g[name] == pytest.approx(v, rel=1e-9, abs=1e-12), (kt, key, name)


def test_matches_batch_reference(small_sim):
    slices = read_slices(small_sim)
    eng, outs = run_engine(slices)
    ref_features, ref_enriched, ref_reasons = reference([as_dicts(s) for s in slices], **PARAMS)
    assert_features_equal(engine_features(eng), ref_features)
    # enrichment: every processed decision, with the values just before it
    enriched = {r["decision_id"]: r for o in outs if o.enriched is not None
                for r in o.enriched.to_dict("records")}
    assert set(enriched) == set(ref_enriched)
    for did, row in random.Random(0).sample(sorted(ref_enriched.items()), 2000):
        for col, v in row.items():
            g = enriched[did][col]
            if v is None:
                assert math.isnan(g)
            else:
                assert g == pytest.approx(v, rel=1e-9, abs=1e-12), (did, col)
    reasons = {}
    for o in outs:
        for _, _, r in o.quarantine:
            if ":" not in r and r not in ("bad_json", "not_object"):
                reasons[r] = reasons.get(r, 0) + 1
    assert reasons == ref_reasons
    assert ref_reasons.get("duplicate", 0) > 0 and ref_reasons.get("late", 0) > 0


def test_counts_reconcile(small_sim):
    slices = read_slices(small_sim)
    _, outs = run_engine(slices)
    n_in = sum(sum(s.lines.values()) for s in slices)
    processed = sum(sum(o.counts.get("processed", {}).values()) for o in outs)
    quarantined = sum(len(o.quarantine) for o in outs)
    assert outs[-1].counts["pending"] == 0
    assert n_in == processed + quarantined


def _valid_unique_events(slices):
    seen, events = set(), []
    for s in slices:
        for kind, recs in s.batches.items():
            for r in recs:
                key = (kind, r[0])
                if key not in seen:
                    seen.add(key)
                    events.append((kind, r))
    return events


def _arrive(events, seed, jitter_ms, per_slice=2500):
    """Re-deliver the same events in another arrival order: event time + U(0, jitter)."""
    from udfs.ingest import Slice

    rnd = random.Random(seed)
    t_pos = {k: c.field_names.index("event_time") for k, c in CONTRACTS.items()}
    order = sorted(events, key=lambda e: e[1][t_pos[e[0]]] + rnd.uniform(0, jitter_ms))
    out = []
    for i in range(0, len(order), per_slice):
        batches = {}
        for kind, r in order[i:i + per_slice]:
            batches.setdefault(kind, []).append(r)
        out.append(Slice(seq=i // per_slice, batches=batches, lines={}, quarantined=[]))
    return out


def test_arrival_order_within_lateness_gives_identical_results(small_sim):
    events = _valid_unique_events(read_slices(small_sim))
    bound = 5 * 60_000
    results = []
    for seed in (1, 2, 3):
        eng, outs = run_engine(_arrive(events, seed, jitter_ms=bound / 2))
        assert not any(r == "late" for o in outs for _, _, r in o.quarantine)
        enriched = {}
        for o in outs:
            if o.enriched is not None:
                enriched.update(zip(o.enriched["decision_id"], o.enriched.filter(like="__").to_numpy()))
        results.append((engine_features(eng), enriched))
    base_f, base_e = results[0]
    for f, e in results[1:]:
        for kt in KEY_TYPES:
            assert set(f[kt]) == set(base_f[kt])
            for k, v in base_f[kt].items():
                assert f[kt][k]["event_timestamp"] == v["event_timestamp"]
                np.testing.assert_allclose([f[kt][k][c] for c in v if c != "event_timestamp"],
                                           [v[c] for c in v if c != "event_timestamp"], rtol=1e-9)
        assert set(e) == set(base_e)
        for did, row in base_e.items():
            np.testing.assert_allclose(e[did], row, rtol=1e-9, equal_nan=True)


def test_restore_from_state_midway_equals_uninterrupted(small_sim):
    slices = read_slices(small_sim)
    full, full_outs = run_engine(slices, snapshot_every=3)
    half = len(slices) // 2
    half += half % 3 == 0                # not on a snapshot boundary
    eng = FeatureEngine(**PARAMS, snapshot_every=3)
    state = {}
    first = []
    for s in slices[:half]:
        first += eng.offer(s.seq, s.batches, s.lines, s.quarantined)
        for k, v in eng.state_delta().items():
            if v is None:
                state.pop(k, None)
            else:
                state[k] = v
    restored = FeatureEngine.restore(state)
    assert "core" in state and any(k.startswith("wait:") for k in state)   # snapshot + logged slices
    _, rest = run_engine(slices[half:], engine=restored)
    # the logged slices since the snapshot are processed again, with the same outputs
    replayed = [o for o in rest if o.seq < half]
    assert replayed and all(o.enriched.equals(full_outs[o.seq].enriched) for o in replayed)
    rest = [o for o in rest if o.seq >= half]
    assert_features_equal(engine_features(restored),
                          {kt: {k: {**{c: v for c, v in vals.items() if c != "event_timestamp"},
                                    "as_of": vals["event_timestamp"].value // 1_000_000}
                                for k, vals in engine_features(full)[kt].items()} for kt in KEY_TYPES})
    a = [o.enriched for o in full_outs[half:] if o.enriched is not None]
    b = [o.enriched for o in rest if o.enriched is not None]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.equals(y)
    # a slice already taken is ignored when it is delivered again (replay)
    assert restored.offer(0, slices[0].batches) == []


def test_pickle_round_trip_and_determinism(small_sim):
    slices = read_slices(small_sim)
    a, outs_a = run_engine(slices[:4])
    b = pickle.loads(pickle.dumps(a))
    c, _ = run_engine(slices[:4])
    for kt in KEY_TYPES:
        assert a.feature_values(kt).equals(b.feature_values(kt))
        assert a.feature_values(kt).equals(c.feature_values(kt))


def test_slices_out_of_sequence_wait_and_survive_a_restore(small_sim):
    """Slices that arrive before their turn wait (in state) and give the same results."""
    slices = read_slices(small_sim)
    in_order, _ = run_engine(slices)
    eng = FeatureEngine(**PARAMS, snapshot_every=1)
    state = {}

    def offer(s):
        outs = eng.offer(s.seq, s.batches, s.lines, s.quarantined)
        for k, v in eng.state_delta().items():
            if v is None:
                state.pop(k, None)
            else:
                state[k] = v
        return outs

    assert offer(slices[1]) == [] and offer(slices[2]) == []      # slice 0 has not come yet
    assert sorted(k for k in state if k.startswith("wait:")) == ["wait:1", "wait:2"]
    eng = FeatureEngine.restore(state, **PARAMS, snapshot_every=1)   # crash while they wait
    outs = offer(slices[0])
    assert [o.seq for o in outs] == [0, 1, 2] and not any(k.startswith("wait:") for k in state)
    _, _ = run_engine(slices[3:], engine=eng)
    for kt in KEY_TYPES:
        assert eng.feature_values(kt).equals(in_order.feature_values(kt))
