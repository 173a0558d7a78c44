"""The outcomes engine (udfs/outcomes.py) without Flink: against a plain batch reference,
in any slice order, across a restore, with bad outcomes, and on the simulator's truth."""

import pickle

import numpy as np
import pandas as pd
import pytest

from udfs.delay import interim_label
from udfs.outcomes import DAY_MS, OutcomeEngine

H = 3_600_000
W = 2 * DAY_MS


def stream(seed=0, n=3000, days=6, camps=3):
    """Slices of (decisions, outcomes, clock) as the features job hands them off: events
    released in event-time order, each slice up to its clock."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, days * DAY_MS, n))
    dec = pd.DataFrame({"decision_id": [f"d{i:05d}" for i in range(n)], "event_time": t,
                        "campaign_id": [f"c{k}" for k in rng.integers(0, camps, n)],
                        "arm": np.where(rng.random(n) < 0.9, "treatment", "control")})
    conv = rng.random(n) < 0.3
    delay = rng.exponential(12 * H, n).astype(np.int64) + 1
    click = rng.random(n) < 0.2
    outs = pd.concat([
        pd.DataFrame({"event_id": "v" + dec.decision_id[conv], "decision_id": dec.decision_id[conv],
                      "kind": "conversion", "event_time": t[conv] + delay[conv], "value": 2.0}),
        pd.DataFrame({"event_id": "k" + dec.decision_id[click], "decision_id": dec.decision_id[click],
                      "kind": "click", "event_time": t[click] + 60_000, "value": 0.0})], ignore_index=True)
    outs = outs[outs.event_time <= days * DAY_MS]
    clocks = list(range(6 * H, days * DAY_MS + 1, 6 * H))
    slices, lo = [], -1
    for seq, c in enumerate(clocks):
        d = dec[(dec.event_time > lo) & (dec.event_time <= c)]
        o = outs[(outs.event_time > lo) & (outs.event_time <= c)]
        slices.append((seq, d.reset_index(drop=True), o.reset_index(drop=True), c))
        lo = c
    return slices, dec, outs


def run(slices, order=None, **kw):
    eng = OutcomeEngine(conversion_window="2d", commit_every="1d", **kw)
    epochs = []
    for i in (order if order is not None else range(len(slices))):
        seq, d, o, c = slices[i]
        epochs += eng.offer(seq, d, o, c, final=(seq == len(slices) - 1))
    return eng, epochs


def latest_rows(epochs):
    rows = pd.concat([e.outcomes.to_pandas() for e in epochs], ignore_index=True)
    return rows.drop_duplicates("decision_id", keep="last").set_index("decision_id").sort_index()


def reference(dec, outs, clock, click_window=H, window=W):
    """One decision at a time: its outcomes within the windows, its status at ``clock``."""
    by_dec = {}
    for r in outs.itertuples():
        by_dec.setdefault(r.decision_id, []).append(r)
    ref = {}
    for d in dec.itertuples():
        if d.event_time > clock:
            continue
        clicks = [o for o in by_dec.get(d.decision_id, []) if o.kind == "click"
                  and 0 <= o.event_time - d.event_time <= click_window and o.event_time <= clock]
        convs = [o for o in by_dec.get(d.decision_id, []) if o.kind == "conversion"
                 and 0 <= o.event_time - d.event_time <= window and o.event_time <= clock]
        ref[d.decision_id] = {"clicks": len(clicks), "conversions": len(convs),
                              "status": "final" if clock - d.event_time >= window else "interim",
                              "elapsed": min(clock - d.event_time, window)}
    return ref


def test_rows_equal_the_batch_reference_with_labels_from_the_epochs_model():
    slices, dec, outs = stream()
    eng, epochs = run(slices)
    assert [e.epoch for e in epochs] == sorted(e.epoch for e in epochs)          # increasing ids
    clock = slices[-1][3]
    got = latest_rows(epochs)
    ref = reference(dec, outs, clock)
    assert set(got.index) == set(ref)
    for did, r in ref.items():
        g = got.loc[did]
        assert (g.clicks, g.conversions, g.label_status, g.elapsed_ms) == \
            (r["clicks"], r["conversions"], r["status"], r["elapsed"]), did
    # interim labels: the formula with the last fit of each row's campaign
    last = epochs[-1]
    dm = last.delay_models.to_pandas().set_index("campaign_id")
    open_ = got[(got.label_status == "interim") & ~got.converted]
    p = dm.loc[open_.campaign_id, "conversion_prob"].to_numpy()
    lam = dm.loc[open_.campaign_id, "delay_rate_per_hour"].to_numpy()
    expect = interim_label(p, lam, open_.elapsed_ms.to_numpy() / H, window=W / H)
    np.testing.assert_allclose(open_.conversion_label.to_numpy(), expect, rtol=1e-12)
    assert (got[got.converted].conversion_label == 1.0).all()
    assert (got[(got.label_status == "final") & ~got.converted].conversion_label == 0.0).all()
    # every epoch replaces whole days: its rows are every held decision of those days
    for e in epochs:
        days = (e.outcomes.column("decision_time").cast("int64").to_numpy() // 1000 // DAY_MS)
        assert sorted(set(days.tolist())) == e.days
        assert e.outcomes.column("decision_id").to_pandas().is_unique


def test_closed_days_leave_the_held_set_and_counts_reconcile():
    slices, dec, outs = stream()
    eng, epochs = run(slices)
    clock = slices[-1][3]
    # held: exactly the decisions of days not yet closed
    open_days = (dec.event_time // DAY_MS + 1) * DAY_MS + W > clock
    assert eng.held_rows() == int(open_days.sum())
    tot = eng.totals
    n_in = sum(tot["in"].values())
    assert n_in == len(dec) + len(outs)
    assert n_in == sum(tot["processed"].values()) + sum(tot["quarantined"].values()) + eng.pending()


@pytest.mark.parametrize("seed", [1, 2])
def test_slice_order_and_row_order_do_not_change_the_epochs(seed):
    slices, _, _ = stream()
    _, expected = run(slices)
    rng = np.random.default_rng(seed)
    shuffled = [(s, d.sample(frac=1, random_state=seed), o.sample(frac=1, random_state=seed), c)
                for s, d, o, c in slices]
    _, got = run(shuffled, order=rng.permutation(len(slices)))
    assert [e.epoch for e in got] == [e.epoch for e in expected]
    for a, b in zip(got, expected):
        assert a.outcomes.sort_by("decision_id").equals(b.outcomes.sort_by("decision_id"))
        assert a.delay_models.equals(b.delay_models)


def test_restore_from_a_snapshot_then_the_rest_equals_an_uninterrupted_run():
    slices, _, _ = stream()
    _, expected = run(slices)
    eng = OutcomeEngine(conversion_window="2d", commit_every="1d")
    got, blob, at = [], None, None
    for seq, d, o, c in slices:
        got += eng.offer(seq, d, o, c, final=(seq == len(slices) - 1))
        if blob is None and len(got) == 3:
            blob, at, n_before = eng.snapshot(), seq, len(got)
    eng2 = OutcomeEngine.restore(blob)
    again = []
    for seq, d, o, c in slices[at - 2:]:          # replayed slices before the snapshot are ignored
        again += eng2.offer(seq, d, o, c, final=(seq == len(slices) - 1))
    resumed = got[:n_before] + again
    assert [e.epoch for e in resumed] == [e.epoch for e in expected]
    for a, b in zip(resumed, expected):
        assert a.outcomes.equals(b.outcomes) and a.delay_models.equals(b.delay_models)


def test_bad_outcomes_are_quarantined_with_a_reason_and_late_decisions_still_join():
    eng = OutcomeEngine(conversion_window="2d", commit_every="1d")
    dec = pd.DataFrame({"decision_id": ["d1", "d2"], "event_time": [0, H], "campaign_id": ["c", "c"]})
    outs = pd.DataFrame({"event_id": ["v1", "v1", "v2", "v3", "k1", "v9"],
                         "decision_id": ["d1", "d1", "d2", "nope", "d1", "d9"],
                         "kind": ["conversion", "conversion", "conversion", "conversion", "click", "conversion"],
                         "event_time": [2 * H, 2 * H, H + 3 * DAY_MS, 5 * H, H // 2, 20 * H],
                         "value": [1.0, 1.0, 1.0, 1.0, 0.0, 3.0]})
    # v9 comes before its decision d9 (later slice, and later than this slice's clock): it waits
    epochs = eng.offer(0, dec, outs, clock=10 * H)
    assert eng.pending() == 1
    epochs += eng.offer(1, pd.DataFrame({"decision_id": ["d9", "d1"], "event_time": [19 * H, 0],
                                        "campaign_id": ["c", "c"]}), None, clock=4 * DAY_MS, final=True)
    q = pd.concat([e.quarantine.to_pandas() for e in epochs])
    assert sorted(q.reason) == ["duplicate", "duplicate", "outside_window", "unattributed"]
    assert set(q[q.reason == "duplicate"].stream) == {"conversion", "decision"}
    rows = latest_rows(epochs)
    assert rows.loc["d1", ["conversions", "clicks"]].tolist() == [1, 1]
    assert rows.loc["d9", "conversions"] == 1 and rows.loc["d9", "conversion_value"] == 3.0
    assert rows.loc["d2", "conversions"] == 0 and eng.pending() == 0
    tot = eng.totals
    assert sum(tot["in"].values()) == sum(tot["processed"].values()) + sum(tot["quarantined"].values())


def test_pickle_round_trip_and_determinism():
    slices, _, _ = stream(seed=4)
    eng, a = run(slices[:10])
    eng2 = pickle.loads(pickle.dumps(eng))
    _, b = run(slices[:10])
    assert [x.outcomes.equals(y.outcomes) for x, y in zip(a, b)] == [True] * len(a)
    assert eng2.totals == eng.totals and eng2.held_rows() == eng.held_rows()


@pytest.fixture(scope="module")
def simulated_pipeline(tmp_path_factory):
    """Simulator -> features engine -> outcomes engine, in process (no Flink): 10 days,
    4 campaigns with mean delays of hours to days."""
    from jobs.config import load
    from jobs.simulate import simulate
    from udfs.features import FeatureEngine
    from udfs.ingest import manifest_lines, read_slice

    sim = tmp_path_factory.mktemp("delayed")
    simulate(sim, events=250_000, users=20_000, campaigns=4, days=10.0, slice_lines=25_000, seed=5)
    cfg = load()
    fe = FeatureEngine(**cfg.engine_params())
    oe = OutcomeEngine(**cfg.outcome_params())
    epochs = []
    for line in manifest_lines(sim):
        s = read_slice(line)
        for o in fe.offer(s.seq, s.batches, s.lines, s.quarantined):
            epochs += oe.offer(o.seq, o.enriched, o.attributed, o.clock, o.final)
    for o in fe.flush():
        epochs += oe.offer(o.seq, o.enriched, o.attributed, o.clock, o.final)
    return sim, oe, epochs


def test_delay_rates_within_10_percent_of_the_truth_and_equal_to_lifelines(simulated_pipeline):
    from lifelines import ExponentialFitter, MixtureCureFitter

    sim, oe, epochs = simulated_pipeline
    dm = epochs[-1].delay_models.to_pandas().set_index("campaign_id")
    truth = pd.read_parquet(sim / "truth" / "campaigns.parquet").set_index("campaign_id")
    true_rate = truth.delay_rate_per_ms * H
    checked = 0
    for c, r in dm.drop(index="*").iterrows():
        if r.conversions >= 2000:
            assert r.delay_rate_per_hour == pytest.approx(true_rate[c], rel=0.10), c
            checked += 1
    assert checked >= 2
    # the global fit (no shrinkage) equals lifelines' mixture cure fit on the same censored data
    rows = latest_rows(epochs)
    W_h = 7 * 24
    t = rows.decision_time.astype("int64") // 1000
    conv = rows.converted.to_numpy()
    delay_h = np.where(conv, (rows.first_conversion_time.astype("int64") // 1000 - t) / H, 0.0)
    dur = np.where(conv, delay_h, rows.elapsed_ms / H)
    f = MixtureCureFitter(base_fitter=ExponentialFitter()).fit(np.maximum(dur, 1e-6), event_observed=conv)
    assert 1 / f.summary["coef"]["lambda_"] == pytest.approx(dm.loc["*", "delay_rate_per_hour"], rel=2e-3)
    assert 1 - f.summary["coef"]["cured_fraction_"] == pytest.approx(dm.loc["*", "conversion_prob"], rel=2e-3)
    assert W_h * H == 7 * DAY_MS


def test_interim_labels_estimate_the_open_cohorts_rate_within_3_percent(simulated_pipeline):
    sim, oe, epochs = simulated_pipeline
    rows = latest_rows(epochs)
    open_ = rows[rows.label_status == "interim"]
    truth = pd.read_parquet(sim / "truth" / "decisions.parquet").set_index("decision_id").loc[open_.index]
    p_arm = np.where(truth.arm == "treatment", truth.p_conv_treatment, truth.p_conv_control)
    true = (p_arm * (1 - np.exp(-truth.delay_rate_per_ms.to_numpy() * 7 * DAY_MS))).mean()
    est, naive = open_.conversion_label.mean(), open_.converted.mean()
    assert est == pytest.approx(true, rel=0.03)
    assert naive < 0.9 * true          # the naive observed rate is biased low


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_outcomes_equal_one_shard(shards):
    """Shards by decision id, one delay fit from their summed statistics, one committer: every
    epoch's rows, fit and quarantine equal the single shard's, exactly."""
    slices, _, outs = stream(seed=3)
    bad = outs.iloc[:5].assign(event_id=lambda d: d.event_id)          # redelivered: duplicates
    slices[5] = (slices[5][0], slices[5][1], pd.concat([slices[5][2], bad], ignore_index=True), slices[5][3])
    _, one = run(slices)
    eng = OutcomeEngine(conversion_window="2d", commit_every="1d", shards=shards)
    many = []
    for seq, d, o, c in slices:
        many += eng.offer(seq, d, o, c, final=(seq == len(slices) - 1))
    assert [e.epoch for e in one] == [e.epoch for e in many] and len(one) >= 5
    for a, b in zip(one, many):
        ra = a.outcomes.sort_by("decision_id")
        rb = b.outcomes.sort_by("decision_id")
        assert ra.equals(rb), a.epoch
        assert a.delay_models.equals(b.delay_models)
        assert a.quarantine.equals(b.quarantine)
        assert a.days == b.days and a.counts == b.counts
    assert sum(len(e.quarantine) for e in many) > 0
    assert all(p.held_rows() > 0 or p.totals["processed"] for p in eng.parts)   # every shard did work
