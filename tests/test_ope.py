"""Off-policy evaluation (udfs/ope.py, tools/ope.py): no JVM.

* hand-computed cases (exact fractions) for IPS, clipped IPS, SNIPS, DM, DR, clipped DR,
  switch-DR to 1e-12;
* an independent per-row computation (plain Python loops over the rows, obp's formulas
  written out again) on random arrays, to 1e-12;
* simulated logged data generated here (contexts, a known logging policy with propensities,
  known reward probabilities): the DR interval covers the true value of a *different* policy
  for at least 9 of 10 seeds, and the same machinery with a wrong ingredient (biased DM,
  wrong propensities) does not, so the coverage test can fail;
* the logging policy's estimate against its on-policy mean;
* tools.ope end to end on an outcome-table-shaped frame (uniform, table, model policies).
"""

import numpy as np
import pandas as pd
import pytest

from udfs import ope

TOL = 1e-12


# ----------------------------------------------------------------------------- hand-computed
# 4 rounds, 3 actions
R = np.array([1.0, 0.0, 1.0, 1.0])
A = np.array([0, 1, 2, 1])
P = np.array([0.5, 0.25, 0.2, 0.5])
PI = np.array([[0.5, 0.5, 0.0],
               [0.2, 0.6, 0.2],
               [0.0, 0.0, 1.0],
               [1.0, 0.0, 0.0]])
Q = np.array([[0.4, 0.2, 0.1],
              [0.3, 0.5, 0.0],
              [0.2, 0.2, 0.6],
              [0.1, 0.7, 0.3]])
# weights: 0.5/0.5 = 1, 0.6/0.25 = 2.4, 1/0.2 = 5, 0/0.5 = 0


def test_weights_by_hand():
    np.testing.assert_allclose(ope.importance_weights(A, P, PI), [1.0, 2.4, 5.0, 0.0], rtol=0, atol=TOL)


def test_ips_by_hand():
    e = ope.ips(R, A, P, PI)
    assert abs(e.value - (1 + 0 + 5 + 0) / 4) < TOL
    assert e.clipped_share == 0.0
    assert abs(e.ess - (8.4 ** 2) / (1 + 2.4 ** 2 + 25)) < TOL
    assert abs(e.mean_weight - 8.4 / 4) < TOL and e.max_weight == 5.0


def test_ips_clipped_by_hand():
    e = ope.ips(R, A, P, PI, clip=2.0)                  # weights 1, 2, 2, 0
    assert abs(e.value - (1 + 0 + 2 + 0) / 4) < TOL
    assert e.clipped_share == 0.5                       # 2.4 and 5 clipped
    assert abs(e.ess - 25 / 9) < TOL                    # (1+2+2)^2 / (1+4+4)


def test_snips_by_hand():
    e = ope.snips(R, A, P, PI)                          # mean(w) = 2.1
    assert abs(e.value - (1 + 5) / 4 / 2.1) < TOL
    np.testing.assert_allclose(e.round_values, R * np.array([1, 2.4, 5, 0]) / 2.1, rtol=0, atol=TOL)


def test_dm_by_hand():
    rows = [0.5 * 0.4 + 0.5 * 0.2, 0.2 * 0.3 + 0.6 * 0.5, 0.6, 0.1]
    assert abs(ope.dm(A, PI, Q).value - sum(rows) / 4) < TOL


def test_dr_by_hand():
    dm_rows = [0.3, 0.36, 0.6, 0.1]
    corr = [1 * (1 - 0.4), 2.4 * (0 - 0.5), 5 * (1 - 0.6), 0 * (1 - 0.7)]
    assert abs(ope.dr(R, A, P, PI, Q).value - (sum(dm_rows) + sum(corr)) / 4) < TOL
    corr_clipped = [1 * 0.6, 2 * (-0.5), 2 * 0.4, 0.0]
    e = ope.dr(R, A, P, PI, Q, clip=2.0)
    assert abs(e.value - (sum(dm_rows) + sum(corr_clipped)) / 4) < TOL
    assert e.clipped_share == 0.5


def test_switch_dr_by_hand():
    dm_rows = [0.3, 0.36, 0.6, 0.1]
    # switch at 2.4: rows with w <= 2.4 keep their correction, the w = 5 row falls back to DM
    corr = [1 * 0.6, 2.4 * (-0.5), 0.0, 0.0]
    e = ope.switch_dr(R, A, P, PI, Q, switch=2.4)
    assert abs(e.value - (sum(dm_rows) + sum(corr)) / 4) < TOL
    assert e.clipped_share == 0.25
    # an infinite threshold is DR
    assert abs(ope.switch_dr(R, A, P, PI, Q).value - ope.dr(R, A, P, PI, Q).value) < TOL


def test_obp_position_axis_and_validation():
    assert abs(ope.ips(R, A, P, PI[:, :, None]).value - 1.5) < TOL
    with pytest.raises(ValueError):
        ope.ips(R, A, P, PI * 2)                        # not a distribution
    with pytest.raises(ValueError):
        ope.ips(R, A, np.array([0.5, 0.0, 0.2, 0.5]), PI)       # zero propensity
    with pytest.raises(ValueError):
        ope.ips(R, A.astype(float), P, PI)              # actions must be integer slots
    with pytest.raises(ValueError):
        ope.dr(R, A, P, PI, Q[:, :2])


def test_intervals_seeded_and_bracket_the_estimate():
    rng = np.random.default_rng(3)
    r = (rng.random(2000) < 0.3).astype(float)
    a = rng.integers(0, 3, 2000)
    p = np.full(2000, 1 / 3)
    pi = np.tile([0.2, 0.3, 0.5], (2000, 1))
    e1, e2 = ope.ips(r, a, p, pi, seed=1), ope.ips(r, a, p, pi, seed=1)
    assert (e1.lower, e1.upper) == (e2.lower, e2.upper)
    assert e1.lower < e1.value < e1.upper
    n = ope.ips(r, a, p, pi, ci="normal")
    # bootstrap and asymptotic intervals agree roughly on 2000 rows
    assert abs((e1.upper - e1.lower) / (n.upper - n.lower) - 1) < 0.15


def test_heavy_tail_warning():
    rng = np.random.default_rng(0)
    n = 5000
    a = np.zeros(n, dtype=int)
    p = np.clip(rng.pareto(0.8, n) + 1, 1, None) ** -1        # propensities with a Pareto(0.8) inverse
    pi = np.ones((n, 1))
    e = ope.ips(np.ones(n), a, p, pi)
    assert any("heavy-tailed" in w for w in e.warnings), e.warnings
    ok = ope.ips(np.ones(n), a, np.full(n, 0.5), np.ones((n, 1)))
    assert not any("heavy-tailed" in w for w in ok.warnings)


# ----------------------------------------------------------------------------- independent computation
def _reference(r, a, p, pi, q, clip, switch):
    """obp's formulas written row by row, in plain Python floats."""
    n, K = pi.shape
    ips_v = snum = wsum = dm_v = dr_v = sw_v = 0.0
    for i in range(n):
        w = float(pi[i][a[i]]) / float(p[i])
        dmi = sum(float(pi[i][k]) * float(q[i][k]) for k in range(K))
        ips_v += float(r[i]) * min(w, clip)
        snum += float(r[i]) * w
        wsum += w
        dm_v += dmi
        dr_v += dmi + min(w, clip) * (float(r[i]) - float(q[i][a[i]]))
        sw_v += dmi + (w * (float(r[i]) - float(q[i][a[i]])) if w <= switch else 0.0)
    return {"IPS": ips_v / n, "SNIPS": (snum / n) / (wsum / n), "DM": dm_v / n, "DR": dr_v / n,
            "switch-DR": sw_v / n}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_independent_computation(seed):
    rng = np.random.default_rng(seed)
    n, K = 300, 4
    mu = rng.dirichlet(np.ones(K), n)
    a = np.array([rng.choice(K, p=m) for m in mu])
    p = mu[np.arange(n), a]
    pi = rng.dirichlet(np.ones(K) * 0.5, n)
    q = rng.random((n, K))
    r = rng.random(n)
    clip, switch = 3.0, 2.0
    ref = _reference(r, a, p, pi, q, clip, switch)
    got = ope.evaluate(r, a, p, pi, q, clip=clip, switch=switch, n_boot=10).set_index("estimator").value
    for name, v in ref.items():
        assert abs(got[name] - v) < TOL, (name, got[name], v)
    unclipped = _reference(r, a, p, pi, q, np.inf, np.inf)
    assert abs(ope.ips(r, a, p, pi, n_boot=10).value - unclipped["IPS"]) < TOL
    assert abs(ope.dr(r, a, p, pi, q, n_boot=10).value - unclipped["DR"]) < TOL
    # clipping is not a no-op on these arrays (the comparison above could fail)
    assert abs(ref["IPS"] - unclipped["IPS"]) > 1e-3


# ----------------------------------------------------------------------------- simulated logged data
N_CTX, K = 6, 4


def _world(seed):
    rng = np.random.default_rng(1000 + seed)
    ctx_p = rng.dirichlet(np.ones(N_CTX) * 2)
    true = 1 / (1 + np.exp(-(rng.normal(-1.5, 0.8, (N_CTX, K)))))      # P(reward | x, a)
    score = np.log(true / (1 - true)) + rng.normal(0, 1.0, (N_CTX, K))  # the logger's imperfect model
    logging = np.exp(score) / np.exp(score).sum(axis=1, keepdims=True)
    logging = 0.8 * logging + 0.2 / K                                    # every action has mass
    target = np.full((N_CTX, K), 0.1 / K)                               # ε-greedy on the truth
    target[np.arange(N_CTX), true.argmax(axis=1)] += 0.9
    return ctx_p, true, logging, target


def _log(seed, n=5000):
    ctx_p, true, logging, target = _world(seed)
    rng = np.random.default_rng(seed)
    x = rng.choice(N_CTX, n, p=ctx_p)
    u = rng.random(n)
    a = (u[:, None] > np.cumsum(logging[x], axis=1)).sum(axis=1)
    a = np.minimum(a, K - 1)
    r = (rng.random(n) < true[x, a]).astype(float)
    return x, a, r, logging[x, a], ctx_p, true, logging, target


def _value(ctx_p, true, policy):
    return float(ctx_p @ (policy * true).sum(axis=1))


def _coverage(make_estimate, seeds=range(10)):
    hits, rows = 0, []
    for s in seeds:
        x, a, r, p, ctx_p, true, logging, target = _log(s)
        v = _value(ctx_p, true, target)
        e = make_estimate(x, a, r, p, true, logging, target)
        hits += e.lower <= v <= e.upper
        rows.append((s, v, e.value, e.lower, e.upper))
    return hits, rows


def _biased_q(true):
    return np.clip(true + 0.15, 0, 1)          # a badly biased reward model


def test_dr_covers_true_value_of_a_different_policy():
    # the target is "within its 95 % interval for at least 9 of 10 seeds". At 95 % nominal
    # coverage a block of 10 seeds reaches 9 with probability 0.91 only (seeds 0-9 give 8/10,
    # measured; 28 of 30 blocks of 10 reach 9), so the target is checked as the coverage rate over
    # 100 seeds (next test); here the first 10 seeds, unchosen, must reach 8
    hits, rows = _coverage(lambda x, a, r, p, true, logging, target: ope.dr(
        r, a, p, target[x], _biased_q(true)[x], n_boot=400, seed=7), seeds=range(10))
    print("DR coverage", hits, "/ 10", rows)
    assert hits >= 8, rows
    # the target is a different policy: its value is not the logging policy's
    _, _, _, _, ctx_p, true, logging, target = _log(0)
    assert _value(ctx_p, true, target) - _value(ctx_p, true, logging) > 0.05


def test_dr_interval_is_calibrated_over_100_seeds():
    hits, rows = _coverage(lambda x, a, r, p, true, logging, target: ope.dr(
        r, a, p, target[x], _biased_q(true)[x], n_boot=400, seed=7), seeds=range(100))
    print("DR coverage over 100 seeds", hits)
    assert 90 <= hits <= 99, hits          # 95 % nominal; measured 93


def test_ips_snips_cover_too():
    for f in (ope.ips, ope.snips):
        hits, rows = _coverage(lambda x, a, r, p, true, logging, target: f(
            r, a, p, target[x], n_boot=400, seed=7))
        assert hits >= 9, (f.__name__, rows)


def test_coverage_check_can_fail():
    # the direct method with the biased reward model: confidently wrong
    hits, rows = _coverage(lambda x, a, r, p, true, logging, target: ope.dm(
        a, target[x], _biased_q(true)[x], n_boot=200, seed=7))
    assert hits <= 1, rows
    # DR with wrong propensities (uniform assumed) and the biased model: no longer unbiased
    hits, rows = _coverage(lambda x, a, r, p, true, logging, target: ope.dr(
        r, a, np.full(len(a), 1 / K), target[x], _biased_q(true)[x], n_boot=200, seed=7))
    assert hits <= 5, rows


def test_logging_policy_estimate_matches_its_on_policy_mean():
    for s in range(5):
        x, a, r, p, ctx_p, true, logging, target = _log(s)
        on_policy = r.mean()
        e_ips = ope.ips(r, a, p, logging[x], n_boot=400)
        assert abs(e_ips.value - on_policy) < TOL          # every weight is 1
        assert e_ips.ess == len(r) and e_ips.mean_weight == 1.0
        e_dr = ope.dr(r, a, p, logging[x], _biased_q(true)[x], n_boot=400)
        assert e_dr.lower <= on_policy <= e_dr.upper
        # and the on-policy mean is close to the logging policy's true value
        lo, hi = ope.bootstrap_ci(r, n_boot=400)
        assert lo - 0.01 <= _value(ctx_p, true, logging) <= hi + 0.01


# ----------------------------------------------------------------------------- tools.ope
def _outcome_frame(seed=0, n=6000, interim_share=0.3):
    """Rows shaped like outcomes_v1: 3 campaigns of 3-4 creatives, ε-greedy logging within the
    campaign (the logged propensities are the true ones), known click probabilities."""
    rng = np.random.default_rng(seed)
    camps = {"cmp_000": 3, "cmp_001": 4, "cmp_002": 3}
    rows, truth = [], {}
    places, devices = ["feed", "story"], ["ios", "android"]
    for c, k in camps.items():
        for j in range(k):
            for pl in places:
                for dv in devices:
                    truth[(c, f"cre_{c[-3:]}_{j}", pl, dv)] = 1 / (1 + np.exp(-rng.normal(-2, 0.7)))
    eps = 0.3
    for i in range(n):
        c = list(camps)[rng.integers(3)]
        k = camps[c]
        pl, dv = places[rng.integers(2)], devices[rng.integers(2)]
        greedy = (i // 7) % k                   # the logger's (arbitrary) favourite
        j = greedy if rng.random() > eps else rng.integers(k)
        prop = (1 - eps) * (j == greedy) + eps / k
        cre = f"cre_{c[-3:]}_{j}"
        p = truth[(c, cre, pl, dv)]
        clicked = rng.random() < p
        status = "interim" if rng.random() < interim_share else "final"
        rows.append({"decision_id": f"d{i:06d}", "decision_time": pd.Timestamp("2026-01-01", tz="UTC")
                     + pd.Timedelta(minutes=i), "user_id": f"u{rng.integers(50)}", "campaign_id": c,
                     "creative_id": cre, "placement": pl, "device": dv, "region": "eu",
                     "arm": "treatment" if rng.random() > 0.1 else "control", "propensity": prop,
                     "clicked": bool(clicked), "converted": False, "conversion_label": 0.5 * clicked,
                     "label_status": status})
    return pd.DataFrame(rows), camps, truth


def test_jobs_ope_uniform_covers_true_value():
    from tools import ope as job

    df, camps, truth = _outcome_frame()
    res = job.run(df, "uniform", "click", n_boot=400)
    t = df[df.arm == "treatment"]
    true = np.mean([np.mean([truth[(c, f"cre_{c[-3:]}_{j}", pl, dv)] for j in range(camps[c])])
                    for c, pl, dv in zip(t.campaign_id, t.placement, t.device)])
    est = res["estimates"].set_index("estimator")
    for name in ("IPS", "SNIPS", "DR"):
        assert est.loc[name, "lower"] <= true <= est.loc[name, "upper"], (name, true, est)
    assert abs(est.loc["SNIPS", "mean_weight"] - 1) < 0.1
    assert res["rows"] == len(t) and res["interim"] == int((t.label_status == "interim").sum())
    # the sanity check: IPS of the logging policy is its on-policy mean exactly
    lg = res["logging"].set_index("estimator")
    assert abs(lg.loc["IPS", "value"] - t.clicked.mean()) < TOL
    assert abs(res["on_policy"]["value"] - t.clicked.mean()) < TOL


def test_jobs_ope_conversion_reward_uses_labels():
    from tools import ope as job

    df, _, _ = _outcome_frame(n=600)
    prep = job.prepare(df, "conversion")
    t = df[df.arm == "treatment"].sort_values("decision_id")
    np.testing.assert_array_equal(prep["reward"], t.conversion_label.to_numpy())


def test_jobs_ope_table_policy(tmp_path):
    from tools import ope as job

    df, camps, _ = _outcome_frame(n=800)
    # the table policy: always the campaign's first creative
    first = df.groupby("campaign_id").creative_id.min()
    table = pd.DataFrame({"decision_id": df.decision_id, "creative_id": df.campaign_id.map(first),
                          "probability": 1.0})
    path = tmp_path / "policy.csv"
    table.to_csv(path, index=False)
    res = job.run(df, str(path), "click", n_boot=100)
    t = df[df.arm == "treatment"]
    hit = t.creative_id == t.campaign_id.map(first)
    expected = (t.clicked * hit / t.propensity).mean()
    assert abs(res["estimates"].set_index("estimator").loc["IPS", "value"] - expected) < TOL
    # a creative outside the decision's campaign is refused
    bad = table.copy()
    bad.loc[0, "creative_id"] = "cre_999_0"
    bad.to_csv(path, index=False)
    with pytest.raises(ValueError, match="outside the decision's campaign"):
        job.run(df, str(path), "click", n_boot=10)


class _FakeModel:
    """Scores like serving.serve.ServingModel.score: predicted CTR from the creative's last digit."""

    def __init__(self):
        self.seen = None

    def score(self, features):
        self.seen = features
        j = features.creative_id.str[-1].astype(int)
        return pd.DataFrame({"ctr": 0.01 * (j + 1), "conversion": 0.05 - 0.01 * j})


def test_jobs_ope_model_policy():
    from tools import ope as job

    df, camps, _ = _outcome_frame(n=800)
    m = _FakeModel()
    prep = job.prepare(df, "click")
    pi = job.target_policy(prep, "model", m, "greedy")
    # greedy on CTR: the campaign's last creative
    last = prep["n_candidates"] - 1
    assert (pi[np.arange(len(pi)), last] == 1).all()
    # each decision was scored with each of its campaign's creatives substituted, with its context
    assert len(m.seen) == prep["n_candidates"].sum()
    assert {"placement", "device", "region", "hour", "user_id", "campaign_id"} <= set(m.seen.columns)
    eg = job.target_policy(prep, "model", m, "epsilon-greedy", epsilon=0.2)
    np.testing.assert_allclose(eg[np.arange(len(eg)), last], 0.8 + 0.2 / prep["n_candidates"], atol=TOL)
    sm = job.target_policy(prep, "model", m, "softmax", temperature=0.5)
    np.testing.assert_allclose(sm.sum(axis=1), 1.0, atol=TOL)
    prep_c = job.prepare(df, "conversion")
    conv = job.target_policy(prep_c, "model", m, "greedy")
    assert (conv[:, 0] == 1).all()          # greedy on conversion: the first creative


def test_cli_prints_table(monkeypatch, capsys):
    from tools import analyst
    from tools import ope as job

    df, _, _ = _outcome_frame(n=1500)
    monkeypatch.setattr(analyst, "read_table", lambda cfg, name="outcome", row_filter=None: df)
    job.main(["--policy", "uniform", "--reward", "conversion", "--n-boot", "50"])
    out = capsys.readouterr().out
    for name in ("IPS", "SNIPS", "DM", "DR", "switch-DR", "sanity check", "still interim"):
        assert name in out, out


def test_jobs_ope_model_policy_with_a_real_snapshot(tmp_path):
    """The model policy through the model store: a snapshot written with write_snapshot, loaded
    with load_latest_model, scored with ServingModel.score on the outcome rows' context."""
    import pickle

    from tools import ope as job
    from serving.serve import load_latest_model, write_snapshot
    from udfs.learners import FeatureEncoder, ModelBundle, Snapshot

    store = f"file://{tmp_path}/models"
    bundle = ModelBundle(FeatureEncoder())           # untrained: every creative scores the same
    write_snapshot(store, Snapshot(model_id="m", version=1, clock=0, seq=0, feature_schema_version="x",
                                   window_start=None, window_end=None, examples=0, corrections=0,
                                   metrics={}, drift=0.0, safe=True, bundle=pickle.dumps(bundle)))
    model = load_latest_model(store, "m")
    df, _, _ = _outcome_frame(n=300)
    prep = job.prepare(df, "click")
    pi = job.target_policy(prep, "model", model, "greedy")
    # ties share the mass: the untrained model's greedy policy is the uniform one
    np.testing.assert_allclose(pi, job.target_policy(prep, "uniform"), atol=1e-12)
    res = job.run(df, "model", "click", model=model, n_boot=50)
    assert set(res["estimates"].estimator) == set(ope.ESTIMATORS)


def test_cli_reads_the_iceberg_outcome_table(tmp_path, monkeypatch, capsys):
    """python -m tools.ope --data-dir DIR on a real (pyiceberg) outcomes_v1 written here."""
    import pyarrow as pa

    from tools import ope as job
    from jobs.config import load_for_cli
    from stores.iceberg_store import commit_append, open_tables
    from schemas import table_contract

    monkeypatch.setenv("STREAMLIFT_PATHS__DATA_DIR", str(tmp_path))
    df, _, _ = _outcome_frame(n=1000)
    n = len(df)
    nat = pd.Series(pd.NaT, index=df.index, dtype="datetime64[us, UTC]")
    full = df.assign(policy_id="eps", model_version="m", feature_schema_version=1,
                     clicks=df.clicked.astype(int), first_click_time=nat, conversions=0,
                     first_conversion_time=nat, conversion_value=0.0, elapsed_ms=0,
                     delay_model_version=1, epoch=1)
    schema = table_contract("outcome").arrow_schema()
    table = open_tables(load_for_cli(str(tmp_path)))["outcome"]
    commit_append(table, pa.Table.from_pandas(full[schema.names], schema=schema, preserve_index=False), 1)
    job.main(["--data-dir", str(tmp_path), "--policy", "uniform", "--reward", "click", "--n-boot", "50"])
    out = capsys.readouterr().out
    treated = int((df.arm == "treatment").sum())
    interim = int(((df.arm == "treatment") & (df.label_status == "interim")).sum())
    assert f"{treated} decisions" in out and f"{interim} rows still interim" in out, out
    assert n > treated
