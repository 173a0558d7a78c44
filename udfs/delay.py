"""Delayed-feedback models (Chapelle, KDD 2014): a decision converts with probability
``p``; if it does, after a delay ``D`` with survival ``S(t) = P(D > t)``.

Every model is a *mixture cure model* behind one interface, :class:`DelayModel`:
``fit(converted, delay_h, elapsed_h, weight, init, strata) -> self``, ``survival(t)``,
``interim_label(elapsed_h, window_h)``, ``loglik(...)``, ``params()``. Two latency
families:

* :class:`ExponentialCureModel` (the default): ``S(t) = exp(-λt)``;
* :class:`WeibullCureModel`: ``S(t) = exp(-(λt)^k)`` (``k = 1`` is the exponential).

For a decision with no conversion after elapsed time ``e`` the probability that
it will still convert is ``p·S(e) / (1 - p + p·S(e))``; with an attribution window
``W`` (the label is "converts within W") it is ``p·(S(e) - S(W)) / (1 - p + p·S(e))``
(:func:`cure_interim_label`; :func:`interim_label` is the exponential's closed form).

Fitting maximises the (penalised) observed-data log-likelihood on censored data by
Newton's method in ``(logit p, log λ[, log k])``, with the analytic Hessian from the
same pass over the rows as the gradient, until the step is below ``tol``
(a tolerance, not a fixed number of steps; ``converged_``/``n_iter_`` say how it
went). ``strata`` (integer codes, e.g. the arm) give each stratum its own ``p`` with
one shared latency distribution. A prior ``prior=(logit p0, log λ0)`` with
``prior_precision`` (in pseudo-observations on those scales: a Normal prior) shrinks
towards it; the pull is ``precision / (precision + information)``, so it vanishes
as the data grow. :func:`select_family` picks the family per campaign by AIC.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> n, p, lam = 20000, 0.3, 1 / 24.0
>>> conv = rng.random(n) < p
>>> delay = rng.exponential(1 / lam, n)
>>> elapsed = rng.uniform(0, 200, n)                 # hours since each decision
>>> seen = conv & (delay <= elapsed)
>>> m = ExponentialCureModel().fit(seen, np.where(seen, delay, 0.0), elapsed)
>>> abs(m.p_ - p) < 0.02, abs(1 / m.lam_ - 24) < 1.5, m.converged_
(True, True, True)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from math import lgamma

import numpy as np

__all__ = ["interim_label", "cure_interim_label", "DelayModel", "ExponentialCureModel", "WeibullCureModel",
           "FAMILIES", "AIC_MARGIN", "make_model", "select_family", "between_precision",
           "shrinkage_precisions", "logit", "CampaignDelayModels", "HOUR_MS"]

HOUR_MS = 3_600_000     # the models' time unit: delays, elapsed times and λ are per hour
_TINY = 1e-300


def cure_interim_label(p, s_e, s_w=0.0):
    """P(convert within W | none by e) = p·(S(e) - S(W)) / (1 - p + p·S(e)), any latency family."""
    p, s_e = np.asarray(p, dtype=float), np.asarray(s_e, dtype=float)
    out = p * (s_e - s_w) / (1.0 - p + p * s_e)
    return float(out) if np.ndim(out) == 0 else out


def interim_label(p, lam, elapsed, window=None):
    """Exponential latency: P(convert | no conversion after ``elapsed``) = p·S(e) / (1 - p + p·S(e)),
    S(e) = exp(-λe).

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
    return cure_interim_label(p, s, tail)


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def logit(p):
    p = min(max(float(p), 1e-12), 1 - 1e-12)
    return float(np.log(p / (1 - p)))


class DelayModel(ABC):
    """A mixture cure model: ``p`` per stratum, one latency distribution with survival ``S``.

    Parameters ``theta = (logit p_0 .. logit p_{S-1}, log λ, *shape)``; the prior (``prior``:
    ``(logit p0, log λ0)``, one ``p0`` for every stratum or one per stratum) penalises the
    ``p`` and ``λ`` coordinates with ``prior_precision`` (a number, or ``(for p, for λ)``).
    """

    family: str = ""
    n_shape: int = 0           # latency parameters besides λ
    shape_bound: float = 3.0   # |shape coordinates| (log k: 0.05 <= k <= 20)

    def __init__(self, prior=None, prior_precision=0.0, max_iter: int = 100, tol: float = 1e-9):
        self.prior = prior
        self.prior_precision = prior_precision
        self.max_iter = max_iter
        self.tol = tol

    # ------------------------------------------------------------ the family
    @abstractmethod
    def _events(self, lam, shape, t, log_t, order: int):
        """``log f(t)`` of the converted rows, then (``order`` >= 1) its gradient in
        ``(log λ, shape...)``, ``(n, m)``, then (``order`` 2) its Hessian, ``(n, m, m)``."""

    @abstractmethod
    def _survival(self, lam, shape, t, log_t, order: int):
        """``S(t)`` of the censored rows, then its gradient and Hessian as in :meth:`_events`."""

    @abstractmethod
    def survival(self, t):
        """P(D > t) of the fitted latency (``t`` in hours)."""

    @abstractmethod
    def mean_delay(self) -> float:
        """E[D] in hours."""

    # ------------------------------------------------------------ fitting
    def fit(self, converted, delay, elapsed, weight=None, init=None, strata=None) -> "DelayModel":
        """``converted``: a conversion was observed; ``delay``: its delay in hours (any value when
        not converted); ``elapsed``: hours observed (the censoring time of the others);
        ``weight``: frequency weights (a row standing for that many identical decisions);
        ``init``: a previous fit's ``theta_`` to start from; ``strata``: integer codes, one ``p`` each."""
        converted = np.asarray(converted, dtype=bool)
        delay = np.asarray(delay, dtype=float)
        elapsed = np.asarray(elapsed, dtype=float)
        wt = np.ones(len(converted)) if weight is None else np.asarray(weight, dtype=float)
        st = np.zeros(len(converted), np.int64) if strata is None else np.asarray(strata, np.int64)
        S = int(st.max()) + 1 if len(st) else 1
        self.n_strata_ = S
        c = converted
        self._data = (np.maximum(delay[c], 1e-9), wt[c], st[c], np.maximum(elapsed[~c], 0.0), wt[~c], st[~c])
        n_s = np.bincount(st, weights=wt, minlength=S)
        nc_s = np.bincount(st[c], weights=wt[c], minlength=S)
        self.n_, self.n_converted_ = int(round(n_s.sum())), int(round(nc_s.sum()))
        self.n_by_, self.n_converted_by_ = n_s.round().astype(np.int64), nc_s.round().astype(np.int64)
        n_conv = float(self._data[1].sum())
        prec = self.prior_precision if np.ndim(self.prior_precision) else (self.prior_precision,) * 2
        self._prec = (float(prec[0]), float(prec[1])) if self.prior is not None else (0.0, 0.0)
        if self.prior is not None:
            a0 = np.broadcast_to(np.asarray(self.prior[0], float), (S,)).copy()
            self._center = (a0, float(self.prior[1]))
        if not n_conv and self.prior is None:    # nothing converted: p = 0, λ undefined
            theta = np.concatenate([np.full(S, -30.0), [0.0], np.zeros(self.n_shape)])
            return self._set(theta, 0, True)
        warm = self._start(init, n_s, nc_s)
        theta, n_iter, converged = self._newton(warm)
        if init is not None and (not converged or self._saturated(theta)):
            # a warm start on a boundary (an early, unidentified fit) can stay there: start afresh
            cold, it2, conv2 = self._newton(self._start(None, n_s, nc_s))
            n_iter += it2
            if self._objective(cold, grad=False)[0] >= self._objective(theta, grad=False)[0] or not converged:
                theta, converged = cold, conv2
        return self._set(theta, n_iter, converged)

    def _saturated(self, theta) -> bool:
        return bool(np.any(np.abs(theta[:self.n_strata_ + 1]) >= 15))

    def _newton(self, theta):
        """Newton's method with a backtracking line search, to ``tol`` on the parameters."""
        scale = max(1.0, float(self._data[1].sum() + self._data[4].sum()))
        converged, it = False, 0
        for it in range(1, self.max_iter + 1):
            ll, g, H = self._objective(theta, hess=True)
            try:
                step = -np.linalg.solve(H, g)
                if not np.all(np.isfinite(step)) or step @ g <= 0:
                    raise np.linalg.LinAlgError
            except np.linalg.LinAlgError:        # not concave here: a scaled gradient step
                step = g / (np.abs(np.diag(H)) + 1.0)
            step = np.clip(step, -2.0, 2.0)
            t = 1.0
            while t > 1e-8:
                new = self._clip(theta + t * step)
                ll_new = self._objective(new, grad=False)[0]
                if np.isfinite(ll_new) and ll_new >= ll - 1e-12 * abs(ll):
                    break
                t /= 2
            else:                                # no ascent along the step: stationary, or stuck
                converged = bool(np.max(np.abs(g)) <= 1e-7 * scale)
                break
            moved = float(np.max(np.abs(new - theta)))
            theta = new
            if moved < self.tol:
                converged = True
                break
        return theta, it, converged

    def _clip(self, theta):
        theta = np.clip(theta, -30, 30)
        if self.n_shape:
            theta[-self.n_shape:] = np.clip(theta[-self.n_shape:], -self.shape_bound, self.shape_bound)
        return theta

    def _start(self, init, n_s, nc_s):
        S = len(n_s)
        if init is not None and len(init) == S + 1 + self.n_shape and np.all(np.isfinite(init)):
            return self._clip(np.asarray(init, float))
        d, w = self._data[0], self._data[1]
        lam = w.sum() / (w * d).sum() if len(d) else (np.exp(self.prior[1]) if self.prior is not None else 1.0)
        a = [logit(max(nc / n, 1e-6)) if n > 0 else (self._center[0][s] if self.prior is not None else -10.0)
             for s, (nc, n) in enumerate(zip(nc_s, n_s))]
        return np.concatenate([a, [np.log(lam)], np.zeros(self.n_shape)])

    def _set(self, theta, n_iter, converged):
        self.theta_ = np.asarray(theta, float)
        S = self.n_strata_
        self.p_by_ = _sigmoid(self.theta_[:S])
        # one p: its own; per stratum: their mean over the decisions
        self.p_ = float(self.p_by_[0]) if S == 1 else \
            float((self.p_by_ * self.n_by_).sum() / max(self.n_by_.sum(), 1))
        self.lam_ = float(np.exp(self.theta_[S]))
        self.shape_ = self.theta_[S + 1:].copy()
        self.n_iter_, self.converged_ = int(n_iter), bool(converged)
        self.loglik_ = float(self._objective(self.theta_, grad=False, penalty=False)[0])
        del self._data
        return self

    def _objective(self, theta, grad=True, penalty=True, hess=False):
        """``(ll, gradient)`` of the (penalised) log-likelihood at ``theta``, and with ``hess`` its
        Hessian, analytic, from the same pass over the rows."""
        S = self.n_strata_
        a, b, shape = theta[:S], theta[S], theta[S + 1:]
        p = _sigmoid(a)
        lam = np.exp(b)
        d, wd, sd, e, we, se = self._data
        n = len(theta)
        ll = 0.0
        g = np.zeros(n)
        H = np.zeros((n, n)) if hess else None
        grad = grad or hess
        order = 2 if hess else int(grad)
        if len(d):
            ev = self._events(lam, shape, d, self._log_data[0], order)
            ll += float((wd * (np.log(p[sd]) + ev[0])).sum())
            if grad:
                g[:S] += np.bincount(sd, weights=wd * (1 - p[sd]), minlength=S)
                g[S:] += wd @ ev[1]
            if hess:
                H[np.arange(S), np.arange(S)] -= np.bincount(sd, weights=wd, minlength=S) * p * (1 - p)
                H[S:, S:] += np.einsum("i,ijk->jk", wd, ev[2])
        if len(e):
            sv = self._survival(lam, shape, e, self._log_data[1], order)
            s = sv[0]
            pe = p[se]
            D = np.maximum(1 - pe + pe * s, _TINY)
            ll += float((we * np.log(D)).sum())
            if grad:
                ds = sv[1]
                r = we / D
                q = pe * (1 - pe)
                Da = (s - 1) * q                                     # dD/da
                g[:S] += np.bincount(se, weights=r * Da, minlength=S)
                g[S:] += (r * pe) @ ds
            if hess:
                # d2 log D = D''/D - D' D'^T / D^2, with D = 1 - p + p S(t)
                r2 = r / D
                H[np.arange(S), np.arange(S)] += np.bincount(
                    se, weights=r * Da * (1 - 2 * pe) - r2 * Da * Da, minlength=S)
                cross = (r * q - r2 * Da * pe)[:, None] * ds        # d2/(da dφ)
                for j in range(ds.shape[1]):
                    col = np.bincount(se, weights=cross[:, j], minlength=S)
                    H[:S, S + j] += col
                    H[S + j, :S] += col
                H[S:, S:] += np.einsum("i,ijk->jk", r * pe, sv[2]) - np.einsum("i,ij,ik->jk", r2 * pe * pe, ds, ds)
        if penalty and self.prior is not None:
            (pa, pb), (a0, b0) = self._prec, self._center
            ll -= 0.5 * pa * float(((a - a0) ** 2).sum()) + 0.5 * pb * (b - b0) ** 2
            g[:S] -= pa * (a - a0)
            g[S] -= pb * (b - b0)
            if hess:
                H[np.arange(S), np.arange(S)] -= pa
                H[S, S] -= pb
        return (ll, g, H) if hess else (ll, g)

    # ------------------------------------------------------------ use
    def interim_label(self, elapsed, window=None, stratum=0):
        """P(a conversion (within ``window`` hours) | none after ``elapsed`` hours)."""
        elapsed = np.asarray(elapsed, dtype=float)
        tail = 0.0 if window is None else self.survival(np.maximum(float(window), elapsed))
        p = self.p_by_[stratum] if np.ndim(stratum) else float(self.p_by_[stratum])
        return cure_interim_label(p, self.survival(elapsed), tail)

    def loglik(self, converted=None, delay=None, elapsed=None, weight=None, strata=None) -> float:
        """Observed-data log-likelihood (no prior) at the fitted parameters: of the fit's data
        when called without arguments, else of the data given."""
        if converted is None:
            return self.loglik_
        converted = np.asarray(converted, bool)
        wt = np.ones(len(converted)) if weight is None else np.asarray(weight, float)
        st = np.zeros(len(converted), np.int64) if strata is None else np.asarray(strata, np.int64)
        c = converted
        self._data = (np.maximum(np.asarray(delay, float)[c], 1e-9), wt[c], st[c],
                      np.maximum(np.asarray(elapsed, float)[~c], 0.0), wt[~c], st[~c])
        try:
            return float(self._objective(self.theta_, grad=False, penalty=False)[0])
        finally:
            del self._data

    @property
    def n_params(self) -> int:
        return self.n_strata_ + 1 + self.n_shape

    @property
    def aic(self) -> float:
        return 2 * self.n_params - 2 * self.loglik_

    def params(self) -> dict:
        return {"family": self.family, "p": self.p_, "p_by_stratum": self.p_by_.tolist(), "lam": self.lam_,
                "shape": self.shape_.tolist(), "mean_delay_h": self.mean_delay(), "n": self.n_,
                "n_converted": self.n_converted_, "loglik": self.loglik_, "converged": self.converged_,
                "n_iter": self.n_iter_}

    @property
    def _data(self):
        return self.__data

    @_data.setter
    def _data(self, data):
        # the rows, and the logs of their times, taken once per fit (every evaluation needs them)
        self.__data = data
        with np.errstate(divide="ignore"):
            self._log_data = (np.log(data[0]), np.log(data[3]))

    @_data.deleter
    def _data(self):
        del self.__data, self._log_data


class ExponentialCureModel(DelayModel):
    """Exponential latency, ``S(t) = exp(-λt)`` (the default family)."""

    family = "exponential"
    n_shape = 0

    def _events(self, lam, shape, t, log_t, order):
        z = lam * t
        out = (np.log(lam) - z,)
        if order >= 1:
            out += ((1 - z)[:, None],)
        if order >= 2:
            out += ((-z)[:, None, None],)
        return out

    def _survival(self, lam, shape, t, log_t, order):
        z = lam * t
        s = np.exp(-z)
        out = (s,)
        if order >= 1:
            out += ((-s * z)[:, None],)
        if order >= 2:
            out += ((-s * z * (1 - z))[:, None, None],)
        return out

    def survival(self, t):
        return np.exp(-self.lam_ * np.asarray(t, dtype=float))

    def mean_delay(self) -> float:
        return 1.0 / self.lam_ if self.lam_ > 0 else float("inf")

    def interim_label(self, elapsed, window=None, stratum=0):
        p = self.p_by_[stratum] if np.ndim(stratum) else float(self.p_by_[stratum])
        return interim_label(p, self.lam_, elapsed, window)


class WeibullCureModel(DelayModel):
    """Weibull latency, ``S(t) = exp(-(λt)^k)``; ``theta`` ends with ``log k``."""

    family = "weibull"
    n_shape = 1

    # in (log λ, log k), with z = (λt)^k: dz/dlog λ = k z, dz/dlog k = k z log(λt)
    def _events(self, lam, shape, t, log_t, order):
        k = float(np.exp(shape[0]))
        lt = np.log(lam) + log_t                         # log(λt); t > 0 for a conversion
        with np.errstate(over="ignore"):
            z = np.exp(k * lt)
        out = (np.log(k) + np.log(lam) + (k - 1) * lt - z,)
        if order >= 1:
            zl = z * lt
            out += (np.stack([k * (1 - z), 1 + k * lt - k * zl], axis=1),)
        if order >= 2:
            h = np.empty((len(t), 2, 2))
            h[:, 0, 0] = -k * k * z
            h[:, 0, 1] = h[:, 1, 0] = k * (1 - z) - k * k * zl
            h[:, 1, 1] = k * lt - k * zl - k * k * zl * lt
            out += (h,)
        return out

    def _survival(self, lam, shape, t, log_t, order):
        k = float(np.exp(shape[0]))
        lt = np.log(lam) + log_t                         # log(λt), -inf at t = 0
        with np.errstate(over="ignore", invalid="ignore"):
            z = np.exp(k * lt)                           # (λt)^k
        s = np.exp(-z)
        out = (s,)
        if order == 0:
            return out
        gone = s <= 0                                    # (λt)^k overflowed: S = 0 and so are its derivatives
        live = (t > 0) & ~gone
        with np.errstate(over="ignore", invalid="ignore"):
            zl = np.where(live, z * lt, 0.0)             # (λt)^k · log(λt) -> 0 at t = 0
            zg = np.where(gone, 0.0, z)
        sk = s * k
        out += (np.stack([-sk * zg, -sk * zl], axis=1),)
        if order >= 2:
            with np.errstate(over="ignore", invalid="ignore"):
                zl2 = np.where(live, zl * lt, 0.0)       # (λt)^k · log(λt)^2
            h = np.empty((len(t), 2, 2))
            h[:, 0, 0] = -sk * k * zg * (1 - zg)
            h[:, 0, 1] = h[:, 1, 0] = -sk * (zg + k * zl - k * zg * zl)
            h[:, 1, 1] = -sk * (zl + k * zl2 - k * zl * zl)
            out += (h,)
        return out

    def _start(self, init, n_s, nc_s):
        theta = super()._start(init, n_s, nc_s)
        if init is None or len(init) != len(theta):      # from the exponential fit (k = 1)
            d, wd, sd, e, we, se = self._data
            ex = ExponentialCureModel(self.prior, self.prior_precision, self.max_iter, self.tol)
            ex.n_strata_, ex._data, ex._prec = self.n_strata_, self._data, self._prec
            if self.prior is not None:
                ex._center = self._center
            t0 = ex._start(None, n_s, nc_s)
            for _ in range(3):                            # a few Newton steps suffice to start
                ll, g, H = ex._objective(t0, hess=True)
                try:
                    t0 = np.clip(t0 - np.clip(np.linalg.solve(H, g), -2, 2), -30, 30)
                except np.linalg.LinAlgError:
                    break
            theta = np.concatenate([t0, [0.0]])
        return theta

    @property
    def k_(self) -> float:
        return float(np.exp(self.shape_[0]))

    def survival(self, t):
        with np.errstate(over="ignore"):
            return np.exp(-(self.lam_ * np.asarray(t, dtype=float)) ** self.k_)

    def mean_delay(self) -> float:
        return float(np.exp(lgamma(1 + 1 / self.k_))) / self.lam_


FAMILIES = {"exponential": ExponentialCureModel, "weibull": WeibullCureModel}


def make_model(family: str, **kw) -> DelayModel:
    return FAMILIES[family](**kw)


#: AIC improvement another family needs over the exponential: 2·Δloglik > 2 + 4.63, i.e. a
#: likelihood-ratio test of the extra parameter at the 1% level (AIC alone picks a nested family
#: on 16% of exponential data sets)
AIC_MARGIN = 4.63


def select_family(fits: dict, margin: float = AIC_MARGIN) -> str:
    """The family with the lowest AIC among ``fits`` ({family: fitted model}); the exponential
    (the default) unless another's AIC is lower by more than ``margin`` and its fit converged."""
    best = "exponential" if "exponential" in fits else sorted(fits)[0]
    for fam, m in sorted(fits.items()):
        if fam != best and m.converged_ and m.aic < fits[best].aic - (margin if best == "exponential" else 0.0):
            best = fam
    return best


def between_precision(estimates, variances, cap: float) -> float:
    """Prior precision of a group's parameter from how much the groups really differ
    (moment estimate of the between-group variance ``τ² = var(x) - mean(v)``): ``1/τ²``, at most
    ``cap``; ``cap`` with fewer than 3 groups or when they do not differ more than their noise."""
    x, v = np.asarray(estimates, float), np.asarray(variances, float)
    ok = np.isfinite(x) & np.isfinite(v)
    x, v = x[ok], v[ok]
    if cap <= 0 or len(x) < 3:
        return max(float(cap), 0.0)
    tau2 = float(np.var(x, ddof=1) - v.mean())
    return float(cap) if tau2 <= 1.0 / cap else 1.0 / tau2


@dataclass
class CampaignDelayModels:
    """Per-group exponential (p, λ), each shrunk towards the global fit with a Normal prior on
    ``logit p`` and ``log λ`` of at most ``prior_strength`` pseudo-observations (less when the
    groups differ: :func:`between_precision`)."""

    prior_strength: float = 50.0

    def fit(self, campaign, converted, delay, elapsed) -> "CampaignDelayModels":
        campaign = np.asarray(campaign)
        converted, delay, elapsed = (np.asarray(a) for a in (converted, delay, elapsed))
        self.global_ = ExponentialCureModel().fit(converted, delay, elapsed)
        groups = np.unique(campaign)
        alone = {c: ExponentialCureModel().fit(converted[campaign == c], delay[campaign == c],
                                               elapsed[campaign == c]) for c in groups}
        prec = shrinkage_precisions(alone.values(), self.prior_strength)
        prior = (logit(self.global_.p_), float(np.log(self.global_.lam_)))
        self.models_ = {}
        for c in groups:
            m = campaign == c
            self.models_[c] = ExponentialCureModel(prior=prior, prior_precision=prec).fit(
                converted[m], delay[m], elapsed[m], init=alone[c].theta_)
        return self

    def params(self) -> dict:
        return {c: (m.p_, m.lam_, m.n_converted_) for c, m in self.models_.items()}


def shrinkage_precisions(unpooled, cap: float) -> tuple:
    """Prior precisions (for logit p, for log λ) from the groups' unpooled fits, whose sampling
    variances are taken as 1/(n·p·(1-p)) and 1/conversions (:func:`between_precision`)."""
    a, va, b, vb = [], [], [], []
    for m in unpooled:
        if m.n_converted_ <= 0:
            continue
        for s in range(m.n_strata_):
            n, p = m.n_by_[s], m.p_by_[s]
            if n > 0 and m.n_converted_by_[s] > 0:
                a.append(np.log(p / (1 - p)))
                va.append(1.0 / (n * p * (1 - p)))
        b.append(np.log(m.lam_))
        vb.append(1.0 / m.n_converted_)
    return between_precision(a, va, cap), between_precision(b, vb, cap)
