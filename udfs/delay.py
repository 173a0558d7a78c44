"""Delayed-feedback model (Chapelle, KDD 2014): a decision converts with probability
``p``; if it does, the delay is exponential, ``P(D > t) = exp(-λt)``.

For a decision with no conversion after elapsed time ``e`` the probability that
it will still convert is ``p·S(e) / (1 - p + p·S(e))`` (:func:`interim_label`).
``p`` and ``λ`` are fitted on censored data by EM (a mixture cure model with an
exponential latency); :class:`CampaignDelayModels` shrinks each campaign's
estimates towards the global one with conjugate pseudo-counts (Beta for ``p``,
Gamma for ``λ``), so thin campaigns borrow strength.

With an attribution window ``W`` the label is "converts within W", and the
interim label is ``p·(S(e) - S(W)) / (1 - p + p·S(e))`` (``window=W``); with no
window it is the formula above. :class:`udfs.outcomes.OutcomeEngine` refits
these models as cohorts mature and labels open decisions with them.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> n, p, lam = 20000, 0.3, 1 / 24.0
>>> conv = rng.random(n) < p
>>> delay = rng.exponential(1 / lam, n)
>>> elapsed = rng.uniform(0, 200, n)                 # hours since each decision
>>> seen = conv & (delay <= elapsed)
>>> m = ExponentialCureModel().fit(seen, np.where(seen, delay, 0.0), elapsed)
>>> abs(m.p_ - p) < 0.02, abs(1 / m.lam_ - 24) < 1.5
(True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["interim_label", "ExponentialCureModel", "CampaignDelayModels", "HOUR_MS"]

HOUR_MS = 3_600_000     # the models' time unit: delays, elapsed times and λ are per hour


def interim_label(p, lam, elapsed, window=None):
    """P(convert | no conversion after ``elapsed``) = p·S(e) / (1 - p + p·S(e)), S(e) = exp(-λe).

    With ``window`` W, the probability of a conversion *within W*:
    p·(S(e) - S(W)) / (1 - p + p·S(e)), which is 0 once e >= W.

    >>> interim_label(0.5, 1.0, 0.0), round(float(interim_label(0.5, 1.0, 50.0)), 12)
    (0.5, 0.0)
    >>> float(interim_label(0.5, 1.0, 2.0, window=2.0)), round(float(interim_label(0.5, 1.0, 0.0, window=1e9)), 12)
    (0.0, 0.5)
    """
    lam, elapsed = np.asarray(lam, dtype=float), np.asarray(elapsed, dtype=float)
    s = np.exp(-lam * elapsed)
    tail = 0.0 if window is None else np.exp(-lam * np.maximum(np.asarray(window, dtype=float), elapsed))
    out = p * (s - tail) / (1.0 - p + p * s)
    return float(out) if np.ndim(out) == 0 else out


class ExponentialCureModel:
    """EM fit of (p, λ) from converted flags, delays of the converted, and elapsed times.

    ``prior_p``/``prior_lam`` with ``prior_strength`` (in conversions) add
    conjugate pseudo-observations: a MAP estimate shrunk towards the prior.
    """

    def __init__(self, prior_p: float | None = None, prior_lam: float | None = None,
                 prior_strength: float = 0.0, max_iter: int = 500, tol: float = 1e-10):
        self.prior_p = prior_p
        self.prior_lam = prior_lam
        self.prior_strength = prior_strength
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, converted, delay, elapsed, weight=None, init=None) -> "ExponentialCureModel":
        """``converted``: a conversion was observed; ``delay``: its delay (any value when not
        converted); ``elapsed``: time observed (the censoring time of the others).
        ``weight``: frequency weights (a row standing for that many identical decisions);
        ``init``: (p, λ) to start EM from (a previous fit), else counting the open as negatives.
        """
        converted = np.asarray(converted, dtype=bool)
        delay = np.asarray(delay, dtype=float)
        elapsed = np.asarray(elapsed, dtype=float)
        wt = np.ones(len(converted)) if weight is None else np.asarray(weight, dtype=float)
        n = float(wt.sum())
        n_conv = float(wt[converted].sum())
        sum_delay = float((wt * delay)[converted].sum())
        e_open, w_open = elapsed[~converted], wt[~converted]
        k = float(self.prior_strength) if self.prior_p is not None else 0.0
        if init is not None and n_conv > 0 and all(np.isfinite(init)) and 0 < init[0] < 1 and init[1] > 0:
            p, lam = float(init[0]), float(init[1])
        else:   # start: every open decision counted as a non-converter
            p = max(n_conv / max(n, 1), 1e-6)
            lam = n_conv / sum_delay if sum_delay > 0 else 1.0
        for self.n_iter_ in range(1, self.max_iter + 1):
            w = w_open * interim_label(p, lam, e_open) if len(e_open) else np.zeros(0)
            # Beta(k·p0, k·(1-p0)) and Gamma(k, k/λ0) pseudo-counts
            p_new = (n_conv + w.sum() + k * (self.prior_p or 0.0)) / (n + k)
            events = n_conv + (k if self.prior_lam is not None else 0.0)
            exposure = sum_delay + float((w * e_open).sum()) + \
                (k / self.prior_lam if self.prior_lam is not None else 0.0)
            lam_new = events / exposure if exposure > 0 else lam
            done = abs(p_new - p) < self.tol and abs(lam_new - lam) < self.tol * max(lam, 1e-12)
            p, lam = p_new, lam_new
            if done:
                break
        self.p_, self.lam_ = float(p), float(lam)
        self.n_, self.n_converted_ = int(round(n)), int(round(n_conv))
        return self

    def survival(self, t):
        return np.exp(-self.lam_ * np.asarray(t, dtype=float))

    def interim_label(self, elapsed):
        return interim_label(self.p_, self.lam_, elapsed)


@dataclass
class CampaignDelayModels:
    """Per-campaign (p, λ), each shrunk towards the global fit by ``prior_strength`` conversions."""

    prior_strength: float = 50.0

    def fit(self, campaign, converted, delay, elapsed) -> "CampaignDelayModels":
        campaign = np.asarray(campaign)
        self.global_ = ExponentialCureModel().fit(converted, delay, elapsed)
        self.models_ = {}
        converted, delay, elapsed = (np.asarray(a) for a in (converted, delay, elapsed))
        for c in np.unique(campaign):
            m = campaign == c
            self.models_[c] = ExponentialCureModel(
                prior_p=self.global_.p_, prior_lam=self.global_.lam_,
                prior_strength=self.prior_strength).fit(converted[m], delay[m], elapsed[m])
        return self

    def params(self) -> dict:
        return {c: (m.p_, m.lam_, m.n_converted_) for c, m in self.models_.items()}
