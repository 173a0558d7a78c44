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
def test_em_equals_lifelines_mixture_cure_fit(p, lam, seed):
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
