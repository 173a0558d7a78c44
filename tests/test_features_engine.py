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


def _apply(state, delta):
    for k, v in delta.items():
        if v is None:
            state.pop(k, None)
        else:
            state[k] = v


def test_restore_from_state_midway_equals_uninterrupted(small_sim):
    slices = read_slices(small_sim)
    full, full_outs = run_engine(slices, snapshot_every=3)
    half = len(slices) // 2
    half += half % 3 == 0                # not on a snapshot boundary
    eng = FeatureEngine(**PARAMS, snapshot_every=3)
    state = {}
    for s in slices[:half]:
        eng.offer(s.seq, s.batches, s.lines, s.quarantined)
        _apply(state, eng.state_delta())
    # a snapshot plus the slices logged since (the write-ahead log), in both stages
    assert {"attr0/core", "acc0/core"} <= set(state)
    assert any(k.startswith("attr0/log:") for k in state) and any(k.startswith("acc0/log:") for k in state)
    restored = FeatureEngine.restore(state, **PARAMS, snapshot_every=3)
    assert restored.next_seq == half     # the logged slices were taken again, their outputs not repeated
    _, rest = run_engine(slices[half:], engine=restored)
    assert rest[0].seq == half
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


def test_restore_under_another_spec_is_refused(small_sim):
    from udfs.spec import SpecMismatch

    slices = read_slices(small_sim)
    eng = FeatureEngine(**PARAMS, snapshot_every=1)
    state = {}
    for s in slices[:2]:
        eng.offer(s.seq, s.batches, s.lines, s.quarantined)
        _apply(state, eng.state_delta())
    with pytest.raises(SpecMismatch, match=r"half_lives: state \['1h', '1d', '7d'\], now \['1h', '2d'\]"):
        FeatureEngine.restore(state, **{**PARAMS, "half_lives": ("1h", "2d")}, snapshot_every=1)
    with pytest.raises(SpecMismatch, match="version: state v1, now v2"):
        FeatureEngine.restore(state, **PARAMS, snapshot_every=1, spec_version="v2")
    FeatureEngine.restore(state, **PARAMS, snapshot_every=1)      # the same spec restores


def _outputs_table(outs):
    """Every output of a run, as comparable frames (enriched, attributed, offline, quarantine)."""
    import pandas as pd

    def cat(frames, by):
        frames = [f for f in frames if f is not None and len(f)]
        return pd.concat(frames, ignore_index=True).sort_values(by, ignore_index=True) if frames else None

    tables = {"enriched": cat([o.enriched for o in outs], ["decision_id"]),
              "attributed": cat([o.attributed for o in outs], ["event_id"])}
    for kt in KEY_TYPES:
        ents = list(ENTITY_COLUMNS[kt])
        tables[f"offline:{kt}"] = cat([o.features.get(kt) for o in outs], ents + ["event_timestamp"])
        tables[f"online:{kt}"] = cat([o.online.get(kt) for o in outs], ents + ["event_timestamp"])
    tables["quarantine"] = [(o.seq, q[0], q[2], repr(q[1])) for o in outs for q in o.quarantine]
    tables["counts"] = [(o.seq, o.counts["in"], o.counts["processed"], o.counts["pending"], o.clock) for o in outs]
    return tables


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_engine_equals_one_shard(small_sim, shards):
    """Any number of attribution and accumulator shards gives the same outputs, slice by
    slice, bit for bit (the landmark and the clock are shared)."""
    import pandas as pd

    slices = read_slices(small_sim)
    one, outs1 = run_engine(slices, online_every=2)
    many, outs_n = run_engine(slices, online_every=2, shards=shards)
    assert [o.seq for o in outs1] == [o.seq for o in outs_n]
    a, b = _outputs_table(outs1), _outputs_table(outs_n)
    for name in a:
        if isinstance(a[name], pd.DataFrame):
            pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)
        else:
            assert a[name] == b[name], name
    for x, y in zip(outs1, outs_n):        # per slice too (the hand-off is per slice)
        if x.enriched is not None:
            pd.testing.assert_frame_equal(x.enriched, y.enriched, check_exact=True)
    for kt in KEY_TYPES:
        pd.testing.assert_frame_equal(one.feature_values(kt), many.feature_values(kt), check_exact=True)
    # every shard did part of the work
    for stage in (many.routers, many.accs):
        assert all(s.next_seq == one.next_seq for s in stage)
    assert all(len(acc.tables["user"]) > 0 for acc in many.accs)


def test_sharded_restore_midway(small_sim):
    slices = read_slices(small_sim)
    _, full_outs = run_engine(slices, shards=2, snapshot_every=3)
    eng = FeatureEngine(**PARAMS, shards=2, snapshot_every=3)
    state = {}
    for s in slices[:4]:
        eng.offer(s.seq, s.batches, s.lines, s.quarantined)
        _apply(state, eng.state_delta())
    restored = FeatureEngine.restore(state, **PARAMS, shards=2, snapshot_every=3)
    _, rest = run_engine(slices[4:], engine=restored)
    for x, y in zip(full_outs[4:], rest):
        assert x.seq == y.seq
        if x.enriched is not None:
            assert x.enriched.equals(y.enriched)
    with pytest.raises(ValueError, match="parallelism"):
        FeatureEngine.restore(state, **PARAMS, shards=3, snapshot_every=3)


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
    assert sorted(k for k in state if k.startswith("attr0/log:")) == ["attr0/log:1:0", "attr0/log:2:0"]
    eng = FeatureEngine.restore(state, **PARAMS, snapshot_every=1)   # crash while they wait
    outs = offer(slices[0])
    assert [o.seq for o in outs] == [0, 1, 2] and not any("/log:" in k for k in state)
    _, _ = run_engine(slices[3:], engine=eng)
    for kt in KEY_TYPES:
        assert eng.feature_values(kt).equals(in_order.feature_values(kt))


def test_a_shard_with_only_outcome_rows_for_a_key_type(small_sim):
    """A slice in which one attribution shard releases clicks but no decision: its rows for the
    accumulators carry no entity columns, the other shard's do; the merge of the two works and
    equals one shard."""
    from udfs.ingest import Slice
    from udfs.keys import id_hash, shard_of

    slices = read_slices(small_sim)

    def shard0_decisions(recs):        # decisions of attribution shard 0 only (of 2)
        return [r for r, s in zip(recs, shard_of(id_hash([r[0] for r in recs]), 2)) if s == 0]

    late = [Slice(seq=s.seq, batches=({k: (shard0_decisions(v) if k == "decision" else v)
                                       for k, v in s.batches.items()} if s.seq >= 3 else s.batches),
                  lines={}, quarantined=[]) for s in slices]
    _, one = run_engine(late)
    _, two = run_engine(late, shards=2)
    a, b = _outputs_table(one), _outputs_table(two)
    for name in ("enriched", "attributed"):
        assert a[name].equals(b[name]), name
