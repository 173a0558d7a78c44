"""Evaluation metrics for the learners: log loss, AUC, expected calibration error,
Qini coefficient, uplift calibration by decile (doubly robust), and a drift distance over feature summaries. Plain numpy.

>>> import numpy as np
>>> auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
0.75
>>> round(log_loss(np.array([0.5, 0.5]), np.array([0, 1])), 6)
0.693147
>>> ece(np.array([0.2] * 10), np.array([1, 1] + [0] * 8), bins=1)
0.0
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

__all__ = ["log_loss", "auc", "ece", "qini_curve", "qini_coefficient", "uplift_calibration", "aipw",
           "FeatureSummary", "drift"]

_EPS = 1e-12


def log_loss(p, y, weight=None) -> float:
    """Mean negative log-likelihood of labels ``y`` (0/1, or soft in [0, 1]) under ``p``."""
    p = np.clip(np.asarray(p, float), _EPS, 1 - _EPS)
    y = np.asarray(y, float)
    ll = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(np.average(ll, weights=weight)) if len(ll) else float("nan")


def auc(score, y) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN if one class is absent."""
    score, y = np.asarray(score, float), np.asarray(y).astype(bool)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s))
    # average ranks over ties
    _, start, counts = np.unique(s, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def ece(p, y, bins: int = 20) -> float:
    """Expected calibration error over ``bins`` equal-mass bins of ``p``:
    Σ_b (n_b/n)·|mean(p_b) − mean(y_b)|. Equal-mass bins, so a rare-event model
    is not judged on one crowded bin."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    n = len(p)
    if n == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    err = 0.0
    for chunk in np.array_split(order, min(bins, n)):
        if len(chunk):
            err += len(chunk) * abs(p[chunk].mean() - y[chunk].mean())
    return float(err / n)


def qini_curve(score, y=None, treated=None, true_uplift=None):
    """Qini curve of a ranking by ``score`` (highest first), at every prefix.

    With ``true_uplift`` (a simulator's ground truth) the curve is the cumulative
    true uplift of the prefix: Q(k) = Σ_{i≤k} τ_i. Otherwise it is Radcliffe's
    observed version: Q(k) = Y_t(k) − Y_c(k)·N_t(k)/N_c(k) (treated and control
    outcome sums and counts in the prefix). Returns (fraction targeted, Q)."""
    order = np.argsort(-np.asarray(score, float), kind="mergesort")
    n = len(order)
    frac = np.arange(1, n + 1) / n
    if true_uplift is not None:
        return frac, np.cumsum(np.asarray(true_uplift, float)[order])
    y = np.asarray(y, float)[order]
    t = np.asarray(treated).astype(bool)[order]
    nt, nc = np.cumsum(t), np.cumsum(~t)
    yt, yc = np.cumsum(y * t), np.cumsum(y * ~t)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = yt - np.where(nc > 0, yc * nt / nc, 0.0)
    return frac, q


def qini_coefficient(score, y=None, treated=None, true_uplift=None) -> float:
    """Area between the Qini curve and the straight line of random targeting, per
    decision (so runs of different sizes compare). Ranking by the true uplift gives
    the largest value; random scores give about 0."""
    frac, q = qini_curve(score, y, treated, true_uplift)
    if len(q) == 0:
        return float("nan")
    random_line = frac * q[-1]
    return float(np.mean(q - random_line) / len(q))


def aipw(y, treated, mu1, mu0, z: float = 1.96) -> tuple[float, float, float, float]:
    """Average treatment effect of a group of decisions, augmented IPW with self-normalized
    weights (the arm's share constant within the group): mean(μ1 − μ0) + mean_T(y − μ1) −
    mean_C(y − μ0), with a ``z`` interval from the three terms' variances. Returns
    (estimate, standard error, low, high); NaN without two rows in each arm."""
    y, t = np.asarray(y, float), np.asarray(treated, bool)
    mu1, mu0 = np.asarray(mu1, float), np.asarray(mu0, float)
    if t.sum() < 2 or (~t).sum() < 2:
        return (float("nan"),) * 4
    d = mu1 - mu0
    r1, r0 = (y - mu1)[t], (y - mu0)[~t]
    est = d.mean() + r1.mean() - r0.mean()
    se = math.sqrt(d.var() / len(d) + r1.var() / len(r1) + r0.var() / len(r0))
    return float(est), se, float(est - z * se), float(est + z * se)


def uplift_calibration(pred, y, treated, mu1, mu0, bins: int = 10, z: float = 1.96) -> pd.DataFrame:
    """Uplift calibration by quantile bin (decile) of the predicted uplift ``pred``: per bin the
    mean prediction against the doubly robust (:func:`aipw`) estimate of the uplift of the
    bin's decisions from their final labels ``y``, arms and outcome-model predictions, with its
    interval; ``covered``: the mean prediction lies in it."""
    pred = np.asarray(pred, float)
    ok = ~np.isnan(pred)
    order = np.argsort(pred[ok], kind="stable")
    rows = []
    for k, part in enumerate(np.array_split(np.flatnonzero(ok)[order], bins)):
        est, se, lo, hi = aipw(np.asarray(y)[part], np.asarray(treated)[part],
                               np.asarray(mu1)[part], np.asarray(mu0)[part], z)
        m = float(pred[part].mean())
        rows.append({"bin": k, "n": len(part), "pred": m, "dr": est, "se": se, "lo": lo, "hi": hi,
                     "covered": bool(lo <= m <= hi)})
    return pd.DataFrame(rows)


class FeatureSummary:
    """Running mean and variance of each feature column (Welford, merged per batch)."""

    def __init__(self, n_features: int):
        self.n = 0
        self.mean = np.zeros(n_features)
        self.m2 = np.zeros(n_features)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, float)
        if len(x) == 0:
            return
        nb, mb = len(x), x.mean(axis=0)
        m2b = ((x - mb) ** 2).sum(axis=0)
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * nb / n
        self.m2 = self.m2 + m2b + delta ** 2 * self.n * nb / n
        self.n = n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n - 1, 1))


def drift(live: FeatureSummary, ref: FeatureSummary) -> float:
    """d = ‖m_live − m_ref‖ / √F over means standardized by the reference's spread:
    a root-mean-square shift in reference standard deviations (0 for the same
    distribution; 1 when every feature moved by one standard deviation)."""
    if live.n == 0 or ref.n == 0:
        return 0.0
    scale = np.where(ref.std > 1e-9, ref.std, 1.0)
    z = (live.mean - ref.mean) / scale
    return float(np.linalg.norm(z) / np.sqrt(len(z)))
