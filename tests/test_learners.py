"""The learners without a JVM: metrics and calibration against scikit-learn, each river model
against a batch fit on generated data with known parameters, delayed-feedback and uplift
learning, determinism, pickling and restore."""

import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from udfs.learners import FeatureEncoder, ModelBundle, OnlineGLM, OnlineLearner, OnlinePlatt, _sigmoid
from udfs.metrics import FeatureSummary, auc, drift, ece, log_loss, qini_coefficient

H = 3_600_000
DAY = 24 * H


# ----------------------------------------------------------------------------- metrics
def test_auc_and_log_loss_equal_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.random(5000) < 0.2
    s = np.round(rng.normal(y * 0.7, 1.0), 2)          # rounded: ties
    assert auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    p = _sigmoid(s)
    assert log_loss(p, y) == pytest.approx(sk_log_loss(y, p), abs=1e-9)


def test_ece_is_zero_for_calibrated_bins_and_the_gap_otherwise():
    p = np.repeat([0.1, 0.5], 1000)
    y = np.concatenate([np.arange(1000) < 100, np.arange(1000) < 500])
    assert ece(p, y, bins=2) == pytest.approx(0.0, abs=1e-12)
    assert ece(p + 0.05, y, bins=2) == pytest.approx(0.05)


def test_qini_is_largest_for_the_true_ranking_and_about_zero_for_random():
    rng = np.random.default_rng(2)
    n = 40_000
    tau = rng.uniform(-0.05, 0.15, n)
    base = rng.uniform(0.05, 0.2, n)
    t = rng.random(n) < 0.5
    y = rng.random(n) < base + t * tau
    best = qini_coefficient(tau, true_uplift=tau)
    assert best > qini_coefficient(tau + rng.normal(0, 0.05, n), true_uplift=tau) > 0
    assert abs(qini_coefficient(rng.random(n), true_uplift=tau)) < 0.1 * best
    # the observed (Radcliffe) version agrees in order
    assert qini_coefficient(tau, y, t) > 5 * abs(qini_coefficient(rng.random(n), y, t))


def test_drift_distance_is_the_rms_shift_in_reference_deviations():
    rng = np.random.default_rng(3)
    ref, same, moved = FeatureSummary(4), FeatureSummary(4), FeatureSummary(4)
    ref.update(rng.normal(0, 2, (20_000, 4)))
    same.update(rng.normal(0, 2, (20_000, 4)))
    moved.update(rng.normal(0, 2, (20_000, 4)) + np.array([2.0, 2.0, 2.0, 2.0]))
    assert drift(same, ref) < 0.05
    assert drift(moved, ref) == pytest.approx(1.0, abs=0.05)
    whole = FeatureSummary(4)
    x = rng.normal(size=(1000, 4))
    whole.update(x[:300]); whole.update(x[300:])
    np.testing.assert_allclose(whole.std, x.std(axis=0, ddof=1))


# ----------------------------------------------------------------------------- calibration
def test_online_platt_equals_the_maximum_likelihood_fit_on_its_window():
    rng = np.random.default_rng(4)
    s = rng.normal(-1.5, 1.2, 30_000)
    y = rng.random(30_000) < _sigmoid(0.6 * s - 0.4)
    cal = OnlinePlatt(window=10_000, newton_steps=25)
    for i in range(0, 30_000, 2_500):
        cal.update(s[i:i + 2500], y[i:i + 2500])
    ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(s[-10_000:, None], y[-10_000:])
    # equal up to the calibrator's weak prior (one pseudo-observation towards a=1, b=0)
    assert cal.a == pytest.approx(ref.coef_[0, 0], abs=2e-3)
    assert cal.b == pytest.approx(ref.intercept_[0], abs=2e-3)
    assert OnlinePlatt.fit(s[-10_000:], y[-10_000:], ridge=0.0) == pytest.approx(
        (ref.coef_[0, 0], ref.intercept_[0]), abs=1e-5)
    assert abs(cal.a - 0.6) < 0.08 and abs(cal.b + 0.4) < 0.1          # the generating values


# ----------------------------------------------------------------------------- river models
def _logistic_data(n, d, seed):
    rng = np.random.default_rng(seed)
    beta = rng.normal(0, 0.8, d)
    x = rng.normal(size=(n, d))
    p = _sigmoid(x @ beta - 1.5)
    return x, p, rng.random(n) < p, beta


def test_online_logistic_regression_reaches_the_batch_fit():
    x, p, y, beta = _logistic_data(120_000, 12, 5)
    m = OnlineGLM("logistic", 12, lr=0.05, l2=0.0, batch_size=256, intercept_lr=0.2)
    m.learn(x[:100_000], y[:100_000].astype(float))
    ref = LogisticRegression(C=np.inf, max_iter=1000).fit(x[:100_000], y[:100_000])
    online = x[100_000:] @ m.weights() + m.intercept
    assert auc(online, y[100_000:]) > roc_auc_score(y[100_000:], ref.decision_function(x[100_000:])) - 0.005
    assert np.corrcoef(m.weights(), ref.coef_[0])[0, 1] > 0.98
    # one pass of AdaGrad (decaying steps) stops a little short of the optimum: within 20%
    assert 0.8 < np.linalg.norm(m.weights()) / np.linalg.norm(ref.coef_[0]) < 1.05
    assert m.intercept == pytest.approx(-1.5, abs=0.25)


def test_soft_labels_learn_what_hard_labels_would():
    """Training on P(y=1) (the interim labels' role) reaches the same model as training on draws."""
    x, p, y, beta = _logistic_data(100_000, 8, 6)
    soft = OnlineGLM("logistic", 8, 0.05, 0.0, 256, 0.2)
    soft.learn(x, p)
    hard = OnlineGLM("logistic", 8, 0.05, 0.0, 256, 0.2)
    hard.learn(x, y.astype(float))
    assert np.corrcoef(soft.weights(), beta)[0, 1] > 0.995
    np.testing.assert_allclose(soft.weights(), hard.weights(), atol=0.1)
    assert soft.intercept == pytest.approx(hard.intercept, abs=0.1)


def test_online_linear_regression_reaches_least_squares():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(80_000, 6))
    beta = np.array([0.5, -0.2, 0.0, 0.3, 0.1, -0.4])
    y = x @ beta + 0.2 + rng.normal(0, 1.0, len(x))
    m = OnlineGLM("linear", 6, 0.05, 0.0, 256, 0.01)
    m.learn(x, y)
    ref = LinearRegression().fit(x, y)
    np.testing.assert_allclose(m.weights(), ref.coef_, atol=0.05)
    assert m.intercept == pytest.approx(ref.intercept_, abs=0.05)


# ----------------------------------------------------------------------------- the learner
def synthetic_stream(n=60_000, days=6, seed=9, delay_mean_h=24.0):
    """Decisions with known click and conversion probabilities, heterogeneous uplift by creative,
    exponential conversion delays; cut into 6-hour hand-off slices. Returns the slices, the truth."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.integers(0, days * DAY, n))
    cre = rng.integers(0, 8, n)
    place = rng.integers(0, 3, n)
    treated = rng.random(n) < 0.7
    prop = rng.choice([0.2, 0.5, 1.0], n)
    p_click = _sigmoid(-2.0 + 0.4 * cre / 7 + np.array([0.5, 0.0, -0.5])[place]) * treated
    tau_logit = np.linspace(-0.3, 1.2, 8)[cre]
    p0 = _sigmoid(-2.5 + 0.3 * (place == 0))
    p1 = _sigmoid(-2.5 + 0.3 * (place == 0) + tau_logit)
    conv = rng.random(n) < np.where(treated, p1, p0)
    conv_t = t + rng.exponential(delay_mean_h * H, n).astype(np.int64) + 1
    click = rng.random(n) < p_click
    ids = np.array([f"d{i:07d}" for i in range(n)])
    dec = pd.DataFrame({"decision_id": ids, "event_time": t, "placement": np.array(["feed", "story", "side"])[place],
                        "device": "ios", "region": "eu", "hour": (t // H) % 24, "campaign_id": "c1",
                        "creative_id": np.array([f"k{c}" for c in cre]),
                        "arm": np.where(treated, "treatment", "control"), "propensity": prop,
                        "true_click": click, "true_conversion": conv & (conv_t - t <= 7 * DAY)})
    truth = pd.DataFrame({"decision_id": ids, "p_click": p_click, "true_uplift": p1 - p0, "treated": treated,
                          "final": conv & (conv_t - t <= 7 * DAY), "click": click})
    slices, step = [], 6 * H
    for k, start in enumerate(range(0, days * DAY, step)):
        end = start + step
        d = dec[(dec.event_time >= start) & (dec.event_time < end)]
        ci = np.flatnonzero(click & (t + 60_000 >= start) & (t + 60_000 < end))
        vi = np.flatnonzero(conv & (conv_t >= start) & (conv_t < end) & (conv_t <= days * DAY))
        out = pd.DataFrame({"decision_id": np.concatenate([ids[ci], ids[vi]]),
                            "kind": ["click"] * len(ci) + ["conversion"] * len(vi),
                            "event_time": np.concatenate([t[ci] + 60_000, conv_t[vi]])})
        slices.append((k, d.reset_index(drop=True), out, end, k == days * 4 - 1))
    return slices, truth


# the synthetic stream's uplift varies with the creative and the placement: its effect modifiers
SYNTHETIC = dict(snapshot_every="1d", refit_every="1d", effect_modifiers=("creative_id", "placement"))


def run_learner(slices, **kw):
    lrn = OnlineLearner(**SYNTHETIC, **kw)
    scores, snaps = [], []
    for seq, d, o, clock, final in slices:
        for _, sc, sn in lrn.offer(seq, d, o, clock, final):
            if sc is not None:
                scores.append(sc)
            snaps += sn
    snaps += lrn.flush()
    return lrn, pd.concat(scores, ignore_index=True), snaps


@pytest.fixture(scope="module")
def synthetic():
    slices, truth = synthetic_stream()
    delayed = run_learner(slices)
    oracle = run_learner(slices, labels="oracle")
    return slices, truth, delayed, oracle


def test_every_decision_is_scored_once_and_counts_reconcile(synthetic):
    slices, truth, (lrn, scores, snaps), _ = synthetic
    assert scores.decision_id.is_unique and len(scores) == len(truth)
    tot, pend = lrn.totals, lrn.pending()
    assert tot["decisions"] == tot["trained"] + pend["untrained"]
    assert tot["unmatched_outcomes"] == 0
    assert tot["finalized"] == tot["decisions"] - pend["open"]
    assert [s.version for s in snaps] == list(range(1, len(snaps) + 1))
    assert snaps[-1].examples == tot["trained"]


def test_ctr_is_as_good_as_the_oracle_and_calibrated(synthetic):
    _, truth, (_, scores, _), (_, oscores, _) = synthetic
    sc = scores.merge(truth, on="decision_id")
    osc = oscores.merge(truth, on="decision_id")
    warm = sc.index >= len(sc) // 6                     # after the first day
    tr = sc.treated & warm
    a, a_oracle = auc(sc.ctr[tr], sc.click[tr]), auc(osc.ctr[tr], osc.click[tr])
    assert a > a_oracle - 0.01
    assert a > auc(sc.p_click[tr], sc.click[tr]) - 0.02      # near the true probabilities
    assert ece(sc.ctr[tr], sc.click[tr]) < ece(sc.p_click[tr], sc.click[tr]) + 0.006   # true p: 0.005


def test_vowpal_wabbit_baseline_learns_the_same_stream_and_the_ctr_model_is_not_worse(synthetic):
    """VW under the CTR model's protocol: scores every treated decision once before learning it,
    learns each once its wait has passed, and ranks clicks well; the CTR model is not worse."""
    from udfs.baselines import VowpalCTR

    slices, truth, (_, scores, _), _ = synthetic
    vw = VowpalCTR()
    out = [vw.offer(d, o, clock) for _, d, o, clock, _ in slices]
    v = pd.concat([x for x in out if x is not None], ignore_index=True).merge(truth, on="decision_id")
    assert v.decision_id.is_unique and len(v) == truth.treated.sum() == vw.scored
    assert vw.trained == len(v) - len(vw.pending) and len(vw.pending) > 0     # the last hour waits
    warm = v.index >= len(v) // 6
    a_vw, a_true = auc(v.ctr[warm], v.click[warm]), auc(v.p_click[warm], v.click[warm])
    assert a_vw > a_true - 0.03
    sc = scores.merge(truth, on="decision_id").set_index("decision_id").loc[v.decision_id[warm]]
    assert auc(sc.ctr, sc.click) > a_vw - 0.005


def test_delayed_feedback_conversion_model_predicts_the_final_rate_where_naive_labels_do_not(synthetic):
    _, truth, (_, scores, _), (_, oscores, _) = synthetic
    sc = scores.merge(truth, on="decision_id")
    osc = oscores.merge(truth, on="decision_id")
    m = sc.treated & (sc.index >= len(sc) // 3)
    df_auc, naive = auc(sc.conversion[m], sc.final[m]), auc(sc.conversion_naive[m], sc.final[m])
    oracle = auc(osc.conversion[m], osc.final[m])
    # ranking: both baselines start at their base rate; the naive labels, biased low by a roughly
    # constant factor, rank about as well (measured: delayed 0.6146, naive 0.6235, oracle above),
    # so the delayed-feedback model is held to ranking within 0.02 AUC of them, not above
    assert df_auc > naive - 0.02 and oracle > max(df_auc, naive)
    # calibration, what delayed feedback is for: it predicts the final rate, the naive one far less
    assert sc.conversion[m].mean() == pytest.approx(sc.final[m].mean(), rel=0.25)
    assert sc.conversion_naive[m].mean() < 0.7 * sc.final[m].mean()


def test_uplift_t_learner_and_dr_rank_creatives_by_their_true_uplift(synthetic):
    _, truth, (_, scores, _), (_, oscores, _) = synthetic
    # final labels at once; delayed labels (measured: T 0.92 / 0.47, DR 0.94 / 0.48, Qini T 0.93 / 0.45)
    for sc, min_corr, min_dr, min_qini in ((oscores, 0.85, 0.85, 0.8), (scores, 0.4, 0.4, 0.4)):
        sc = sc.merge(truth, on="decision_id")
        late = sc.index >= len(sc) // 2
        t, dr, true = sc.uplift[late], sc.uplift_dr[late], sc.true_uplift[late]
        assert np.corrcoef(t, true)[0, 1] > min_corr
        assert np.corrcoef(dr, true)[0, 1] > min_dr                   # DR: on the effect modifiers
        assert qini_coefficient(t, true_uplift=true) > min_qini * qini_coefficient(true, true_uplift=true)
        assert abs(dr.mean() - true.mean()) < 0.03                      # DR: the average effect


def test_restore_midway_then_the_rest_equals_an_uninterrupted_run(synthetic):
    slices, _, (lrn, _, snaps), _ = synthetic
    a = OnlineLearner(**SYNTHETIC)
    for s in slices[:9]:
        a.offer(*s)
    b = OnlineLearner.restore(a.snapshot())
    assert b.state_digest() == a.state_digest()
    for s in slices[9:]:
        b.offer(*s)
    b.flush()
    assert b.state_digest() == lrn.state_digest()
    assert b.totals == lrn.totals
    # and the snapshot's bundle pickles and scores like the live one
    bundle = pickle.loads(snaps[-1].bundle)
    d = slices[-1][1]
    pd.testing.assert_frame_equal(bundle.score(d), lrn.bundle.score(d))


def test_incremental_state_parts_restore_the_learner_at_each_cut(synthetic):
    """state_parts as the job keeps them (a dict of parts: new ones put, gone ones removed):
    the held rows' fixed fields are not in the core, each block's fixed fields are handed out once, and a restore from the
    core and the kept parts at any cut continues exactly like the uninterrupted learner."""
    slices, _, (lrn, _, _), _ = synthetic
    a = OnlineLearner(**SYNTHETIC)
    kept, handed = {}, []
    for i, s in enumerate(slices):
        a.offer(*s)
        core, new, gone = a.state_parts()
        assert not set(new) & set(kept) and set(gone) <= set(kept)
        handed += list(new)
        kept.update(new)
        for k in gone:
            del kept[k]
        assert set(kept) == {b.key for b in a.blocks}
        if i in (5, 13):
            # the fixed fields are in the parts only (the core keeps the labels and flags)
            assert len(core) < len(a.snapshot()) - 0.9 * sum(map(len, kept.values()))
            b = OnlineLearner.restore(core, dict(kept))
            assert b.state_digest() == a.state_digest() and b.totals == a.totals
            for t in slices[i + 1:]:
                b.offer(*t)
            b.flush()
            assert b.state_digest() == lrn.state_digest()
    assert len(handed) == len(set(handed)) == len(slices)
    # the learner handing out parts is unchanged by it
    a.flush()
    assert a.state_digest() == lrn.state_digest()


def test_same_input_same_model_and_slices_may_arrive_out_of_order(synthetic):
    slices, _, (lrn, _, _), _ = synthetic
    c = OnlineLearner(**SYNTHETIC)
    order = list(range(len(slices)))
    order[3], order[4] = order[4], order[3]                            # slice 4 before slice 3
    for i in order:
        c.offer(*slices[i])
    c.flush()
    assert c.state_digest() == lrn.state_digest()


def test_drift_sets_the_safety_flag():
    slices, _ = synthetic_stream(n=20_000, days=3, seed=10)
    lrn = OnlineLearner(snapshot_every="1d", refit_every="1d", drift_threshold=0.5)
    snaps = []
    for seq, d, o, clock, final in slices:
        if clock > 2 * DAY:                        # day 3: every request from a new placement
            d = d.assign(placement="new")
            d["campaign_creative__impressions_7d"] = 5000.0
        for _, _, sn in lrn.offer(seq, d, o, clock, final):
            snaps += sn
    assert snaps[0].safe and snaps[1].safe
    assert any(not s.safe for s in snaps[2:])
    assert max(s.drift for s in snaps[2:]) > 0.5


def test_encoder_is_deterministic_and_versioned():
    df = pd.DataFrame({"placement": ["feed", "story"], "device": ["ios", "web"], "region": ["eu", "na"],
                       "hour": [1, 2], "campaign_id": ["c1", "c2"], "creative_id": ["k1", "k2"],
                       "user__clicks_1h": [1.0, np.nan]})
    a, b = FeatureEncoder(), pickle.loads(pickle.dumps(FeatureEncoder()))
    for x, y in zip(a.encode(df), b.encode(df)):
        np.testing.assert_array_equal(x, y)
    assert a.version == b.version and a.version != FeatureEncoder(buckets=64).version
    bundle = ModelBundle(a)
    assert set(bundle.score(df.iloc[0].to_dict()).columns) == {"ctr", "conversion", "uplift", "uplift_dr"}
    # a request without its context is refused with the columns it lacks (features may be absent)
    with pytest.raises(ValueError, match=r"missing: \['device', 'hour'\]"):
        bundle.score(df.drop(columns=["device", "hour"]))


def test_control_model_ignores_the_unshown_creative_and_tau_sees_only_the_effect_modifiers(synthetic):
    """μ0 does not depend on the creative (a holdout decision is not shown its creative), μ1
    does; τ_dr depends on its effect modifiers (creative, placement here) and on nothing else;
    an unknown effect modifier is refused."""
    _, _, (lrn, _, _), _ = synthetic
    b = lrn.bundle
    base = {"placement": "feed", "device": "ios", "region": "eu", "hour": 3, "campaign_id": "c1", "creative_id": "k0"}
    rows = pd.DataFrame([base, {**base, "creative_id": "k7"}, {**base, "placement": "side"},
                         {**base, "device": "android", "region": "us", "hour": 20}])
    num, cat = b.encoder.encode(rows)
    mu0, mu1, tau = (b.raw_score(m, num, cat) for m in ("mu0", "mu1", "tau_dr"))
    assert mu0[0] == mu0[1] and mu1[0] != mu1[1]               # creative: not in μ0, in μ1
    assert mu0[0] != mu0[2]                                    # placement: in μ0
    assert tau[0] != tau[1] and tau[0] != tau[2]               # the effect modifiers move τ
    assert tau[0] == tau[3]                                    # device, region, hour do not
    # training uses each model's rows (dense numeric block, one-hot columns): those its scores are made of
    z = b.standardize(num)
    for m in ("mu1", "mu0", "tau_dr"):
        w = b.models[m]
        zz, idx = b.rows(m, z, cat)
        dense = np.zeros((len(zz), w.n_features))
        dense[:, :zz.shape[1]] = zz
        np.add.at(dense, (np.repeat(np.arange(len(zz)), idx.shape[1]), idx.ravel()), 1.0)
        np.testing.assert_allclose(dense @ w.weights() + w.intercept, b.raw_score(m, num, cat),
                                   rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="effect modifiers"):
        OnlineLearner(effect_modifiers=("creative", "placement"))
