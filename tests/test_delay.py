"""Delay model (udfs/delay.py) against lifelines and against brute-force simulation."""

import pickle

import numpy as np
import pytest

from udfs.delay import CampaignDelayModels, ExponentialCureModel, interim_label


def censored(n, p, lam, horizon, seed):
    rng = np.random.default_rng(seed)
    conv = rng.random(n) < p
    delay = rng.exponential(1 / lam, n)
    elapsed = rng.uniform(0, horizon, n)
    seen = conv & (delay <= elapsed)
    return seen, np.where(seen, delay, 0.0), elapsed


@pytest.mark.parametrize("p,lam,seed", [(0.25, 1 / 30, 1), (0.05, 1 / 6, 2), (0.6, 1 / 80, 3)])
def test_exponential_equals_lifelines_mixture_cure_fit(p, lam, seed):
    from lifelines import ExponentialFitter, MixtureCureFitter

    seen, delay, elapsed = censored(20_000, p, lam, 150, seed)
    m = ExponentialCureModel().fit(seen, delay, elapsed)
    f = MixtureCureFitter(base_fitter=ExponentialFitter()).fit(
        np.where(seen, delay, elapsed), event_observed=seen)
    coef = f.summary["coef"]
    assert m.p_ == pytest.approx(1 - coef["cured_fraction_"], rel=1e-3)
    assert 1 / m.lam_ == pytest.approx(coef["lambda_"], rel=1e-3)


def test_rate_within_10_percent_once_2000_conversions_matured():
    seen, delay, elapsed = censored(40_000, 0.2, 1 / 20, 400, 4)
    assert seen.sum() >= 2000
    m = ExponentialCureModel().fit(seen, delay, elapsed)
    assert m.lam_ == pytest.approx(1 / 20, rel=0.10)


@pytest.mark.parametrize("elapsed", [0.0, 5.0, 20.0, 60.0])
def test_interim_label_matches_brute_force(elapsed):
    p, lam, n = 0.3, 1 / 15, 400_000
    rng = np.random.default_rng(5)
    conv = rng.random(n) < p
    delay = rng.exponential(1 / lam, n)
    still_open = ~(conv & (delay <= elapsed))
    frac = conv[still_open].mean()
    se = np.sqrt(frac * (1 - frac) / still_open.sum())
    assert abs(frac - interim_label(p, lam, elapsed)) < 4 * se


def test_thin_campaigns_are_shrunk_towards_the_global_estimate():
    rng = np.random.default_rng(6)
    parts = []
    for c, (n, lam) in {"big": (50_000, 1 / 10), "thin": (300, 1 / 40)}.items():
        seen, delay, elapsed = censored(n, 0.3, lam, 200, int(rng.integers(1 << 30)))
        parts.append((np.full(n, c), seen, delay, elapsed))
    campaign, seen, delay, elapsed = (np.concatenate(x) for x in zip(*parts))
    models = CampaignDelayModels(prior_strength=50).fit(campaign, seen, delay, elapsed)
    thin_alone = ExponentialCureModel().fit(*(a[campaign == "thin"] for a in (seen, delay, elapsed)))
    g, t = models.global_.lam_, models.models_["thin"].lam_
    assert min(g, thin_alone.lam_) < t < max(g, thin_alone.lam_)
    assert models.models_["big"].lam_ == pytest.approx(1 / 10, rel=0.05)


def test_pickle_round_trip():
    m = ExponentialCureModel().fit(*censored(2000, 0.3, 0.1, 50, 7))
    m2 = pickle.loads(pickle.dumps(m))
    assert (m2.p_, m2.lam_) == (m.p_, m.lam_)
    assert m2.interim_label(3.0) == m.interim_label(3.0)


# ------------------------------------------------------------------ the interface, both families
from udfs.delay import (AIC_MARGIN, DelayModel, WeibullCureModel, between_precision, make_model,  # noqa: E402
                        select_family)


def censored_weibull(n, p, k, scale, horizon, seed):
    rng = np.random.default_rng(seed)
    conv = rng.random(n) < p
    delay = scale * rng.weibull(k, n)
    elapsed = rng.uniform(0, horizon, n)
    seen = conv & (delay <= elapsed)
    return seen, np.where(seen, delay, 0.0), elapsed


@pytest.mark.parametrize("p,k,scale,seed", [(0.3, 0.6, 20.0, 11), (0.1, 1.8, 30.0, 12), (0.5, 1.0, 50.0, 13)])
def test_weibull_equals_lifelines_mixture_cure_fit(p, k, scale, seed):
    from lifelines import MixtureCureFitter, WeibullFitter

    seen, delay, elapsed = censored_weibull(20_000, p, k, scale, 150, seed)
    m = WeibullCureModel().fit(seen, delay, elapsed)
    f = MixtureCureFitter(base_fitter=WeibullFitter()).fit(np.where(seen, delay, elapsed), event_observed=seen)
    coef = f.summary["coef"]
    assert m.converged_
    assert m.p_ == pytest.approx(1 - coef["cured_fraction_"], rel=1e-4)
    assert 1 / m.lam_ == pytest.approx(coef["lambda_"], rel=1e-4)
    assert m.k_ == pytest.approx(coef["rho_"], rel=1e-4)
    assert m.loglik() == pytest.approx(f.log_likelihood_, rel=1e-8)


def test_exponential_loglik_equals_lifelines():
    from lifelines import ExponentialFitter, MixtureCureFitter

    seen, delay, elapsed = censored(20_000, 0.25, 1 / 30, 150, 1)
    m = ExponentialCureModel().fit(seen, delay, elapsed)
    f = MixtureCureFitter(base_fitter=ExponentialFitter()).fit(np.where(seen, delay, elapsed), event_observed=seen)
    assert m.loglik() == pytest.approx(f.log_likelihood_, rel=1e-8)
    assert m.loglik(seen, delay, elapsed) == pytest.approx(m.loglik_, rel=1e-12)


@pytest.mark.parametrize("family", ["exponential", "weibull"])
def test_one_interface_for_both_families(family):
    seen, delay, elapsed = censored_weibull(5_000, 0.3, 0.8, 20.0, 100, 14)
    m = make_model(family).fit(seen, delay, elapsed)
    assert isinstance(m, DelayModel) and m.family == family and m.converged_
    assert m.survival(0.0) == 1.0 and 0 < m.survival(20.0) < 1
    # the interim label is the cure-model formula with the family's survival
    e, W = np.array([0.0, 5.0, 50.0]), 72.0
    s, sw = m.survival(e), m.survival(W)
    np.testing.assert_allclose(m.interim_label(e, W), m.p_ * (s - sw) / (1 - m.p_ + m.p_ * s), rtol=1e-12)
    assert set(m.params()) >= {"family", "p", "lam", "shape", "mean_delay_h", "loglik", "converged"}
    m2 = pickle.loads(pickle.dumps(m))
    assert m2.params() == m.params()


def test_the_family_is_chosen_by_aic_with_the_exponential_as_default():
    for seed in range(21, 26):                   # exponential delays: the exponential
        data = censored(20_000, 0.3, 1 / 20, 150, seed)
        fits = {f: make_model(f).fit(*data) for f in ("exponential", "weibull")}
        assert select_family(fits) == "exponential", seed
    for k in (0.6, 1.5):                         # Weibull delays: the Weibull, and its shape
        data = censored_weibull(20_000, 0.3, k, 20.0, 150, 27)
        fits = {f: make_model(f).fit(*data) for f in ("exponential", "weibull")}
        assert fits["exponential"].aic - fits["weibull"].aic > AIC_MARGIN
        assert select_family(fits) == "weibull" and fits["weibull"].k_ == pytest.approx(k, rel=0.05)


def test_p_per_stratum_with_one_delay_distribution():
    rng = np.random.default_rng(15)
    n = 60_000
    arm = (rng.random(n) < 0.5).astype(int)
    p = np.where(arm == 1, 0.08, 0.04)
    conv = rng.random(n) < p
    delay = rng.exponential(24.0, n)
    elapsed = rng.uniform(0, 200, n)
    seen = conv & (delay <= elapsed)
    m = ExponentialCureModel().fit(seen, np.where(seen, delay, 0.0), elapsed, strata=arm)
    assert m.p_by_[0] == pytest.approx(0.04, rel=0.08) and m.p_by_[1] == pytest.approx(0.08, rel=0.08)
    assert 1 / m.lam_ == pytest.approx(24.0, rel=0.05)
    pooled = ExponentialCureModel().fit(seen, np.where(seen, delay, 0.0), elapsed)
    e = 10.0
    assert m.interim_label(e, stratum=0) < pooled.interim_label(e) < m.interim_label(e, stratum=1)


def test_fit_converges_from_a_degenerate_warm_start():
    """An early fit with little data can sit on a boundary (p -> 1, λ -> 0); Newton started there
    does not move (the gradient in logit p vanishes), so the refit starts afresh."""
    data = censored_weibull(20_000, 0.1, 0.7, 20.0, 150, 16)
    for family in ("exponential", "weibull"):
        cold = make_model(family).fit(*data)
        stuck = cold.theta_.copy()
        stuck[0], stuck[1] = 30.0, -9.0
        warm = make_model(family).fit(*data, init=stuck)
        assert warm.converged_ and cold.converged_
        np.testing.assert_allclose(warm.theta_, cold.theta_, rtol=1e-7, atol=1e-9)
        again = make_model(family).fit(*data, init=cold.theta_)        # a warm start at the optimum
        assert again.n_iter_ <= 2
        np.testing.assert_allclose(again.theta_, cold.theta_, rtol=1e-9, atol=1e-11)


def test_shrinkage_does_not_bias_well_measured_campaigns_and_vanishes_with_data():
    """The issue's case: mean delays 6-60 h, 1,200-2,600 conversions each. A Gamma(k, k/λ0) prior of
    k = 50 pseudo-conversions adds k/λ0 hours of exposure, i.e. k *global* mean delays: relative to a
    6 h campaign that is k·λ/λ0 of its own conversions (pull ≈ (k/n)(λ/λ0 - 1), 5-7% here).
    The Normal prior on log λ, of precision estimated from the campaigns' spread, leaves them
    within 1% of their unpooled MLE."""
    rng = np.random.default_rng(17)
    parts = []
    for c, (n, mean_h) in {"fast": (30_000, 6), "quick": (25_000, 9), "slow": (40_000, 48),
                           "slowest": (45_000, 60)}.items():
        seen, delay, elapsed = censored(n, 0.06, 1 / mean_h, 168, int(rng.integers(1 << 30)))
        parts.append((np.full(n, c), seen, delay, elapsed))
    campaign, seen, delay, elapsed = (np.concatenate(x) for x in zip(*parts))
    models = CampaignDelayModels(prior_strength=50).fit(campaign, seen, delay, elapsed)
    for c in ("fast", "quick", "slow", "slowest"):
        m = campaign == c
        alone = ExponentialCureModel().fit(seen[m], delay[m], elapsed[m])
        assert 1_000 <= alone.n_converted_ <= 3_000
        assert models.models_[c].lam_ == pytest.approx(alone.lam_, rel=0.01), c
    # with the campaigns indistinguishable the prior has its full strength, and its pull still
    # shrinks as a campaign's data grow
    pull = []
    for n in (500, 5_000, 50_000):
        seen, delay, elapsed = censored(n, 0.2, 1 / 10, 100, 18)
        alone = ExponentialCureModel().fit(seen, delay, elapsed)
        shrunk = ExponentialCureModel(prior=(np.log(0.2 / 0.8), np.log(1 / 20)), prior_precision=50).fit(
            seen, delay, elapsed)
        pull.append(abs(np.log(shrunk.lam_ / alone.lam_)))
    assert pull[0] > pull[1] > pull[2] and pull[2] < 0.006


def test_between_group_precision():
    assert between_precision([0.0, 1.0], [0.01, 0.01], cap=50) == 50       # too few groups: the cap
    assert between_precision([0.0, 0.01, -0.01], [0.01] * 3, cap=50) == 50  # no more spread than noise
    x = np.log([1 / 6, 1 / 9, 1 / 48, 1 / 60])
    prec = between_precision(x, [1 / 1500] * 4, cap=50)
    assert prec == pytest.approx(1 / (np.var(x, ddof=1) - 1 / 1500))
    assert prec < 2


@pytest.mark.parametrize("family", ["exponential", "weibull"])
@pytest.mark.parametrize("prior", [None, (-2.0, float(np.log(1 / 30)))])
def test_the_analytic_hessian_equals_the_finite_difference_of_the_gradient(family, prior):
    """Newton's Hessian comes from the same pass as the gradient: it must be the derivative of
    the gradient (central differences), with strata, a prior, censored rows at t = 0 and rows so
    late that S(t) underflows to 0."""
    from udfs.delay import make_model

    rng = np.random.default_rng(5)
    n = 20_000
    st = rng.integers(0, 3, n)
    conv = rng.random(n) < np.array([0.08, 0.12, 0.2])[st]
    delay = rng.weibull(0.7, n) * 30
    elapsed = rng.uniform(0, 300, n)
    elapsed[:40] = 0.0
    elapsed[40:60] = 1e7
    seen = conv & (delay <= elapsed)
    m = make_model(family, prior=prior, prior_precision=(4.0, 6.0))
    m.fit(seen, np.where(seen, delay, 0.0), elapsed, strata=st)
    m._data = (np.maximum(delay[seen], 1e-9), np.ones(seen.sum()), st[seen], elapsed[~seen],
               rng.uniform(0.5, 2, (~seen).sum()), st[~seen])
    for theta in (m.theta_, m.theta_ + rng.normal(0, 0.3, len(m.theta_))):
        H = m._objective(theta, hess=True)[2]
        num = np.zeros_like(H)
        for i in range(len(theta)):
            h = 1e-5 * max(1.0, abs(theta[i]))
            up, dn = theta.copy(), theta.copy()
            up[i] += h
            dn[i] -= h
            num[:, i] = (m._objective(up)[1] - m._objective(dn)[1]) / (2 * h)
        assert np.all(np.isfinite(H))
        np.testing.assert_allclose(H, num, rtol=1e-5, atol=1e-6 * np.abs(num).max())
