"""Off-policy evaluation (OPE) of a target policy on logged bandit data: plain numpy/pandas.

The estimators follow the Open Bandit Pipeline's (obp 0.5, ``obp.ope.estimators``) published
definitions, on the same arrays (without obp's ``position`` axis):

* ``reward`` (n,), ``action`` (n,) integer slot of the logged action, ``pscore`` (n,) the logging
  propensity of the logged action, ``action_dist`` (n, K) the target policy's probabilities,
  ``q_hat`` (n, K) an estimated reward of every action (for DM, DR, switch-DR);
* ``w = action_dist[i, action[i]] / pscore[i]``, the importance weight;
* **IPS** (obp ``InverseProbabilityWeighting``): round value ``r·min(w, λ)`` (clipped at ``λ``,
  no clipping by default: ``λ = inf``);
* **SNIPS** (obp ``SelfNormalizedInverseProbabilityWeighting``): ``r·w / mean(w)`` (no clipping,
  as in obp);
* **DM** (obp ``DirectMethod``): ``Σ_a π(a|x)·q̂(x, a)``;
* **DR** (obp ``DoublyRobust``): ``Σ_a π(a|x)·q̂(x, a) + min(w, λ)·(r − q̂(x, a_i))``;
* **switch-DR** (obp ``SwitchDoublyRobust``): ``Σ_a π(a|x)·q̂(x, a) + 1[w ≤ λ]·w·(r − q̂(x, a_i))``
  (rows whose weight exceeds ``λ`` fall back to the direct method).

The estimate is the mean of the round values (as obp's ``estimate_policy_value``). Each
:class:`Estimate` also carries

* a confidence interval: by default the **percentile bootstrap of the round values** with a
  seed (obp's ``estimate_confidence_interval_by_bootstrap``: resample the round values with
  replacement, take the mean, the ``α/2`` and ``1 − α/2`` percentiles); ``ci="normal"`` gives
  the asymptotic ``mean ± z·sd/√n`` instead. For SNIPS both treat ``mean(w)`` of the full
  sample as fixed, as obp does;
* the effective sample size of the weights the estimator uses, ``(Σw)² / Σw²`` (Kish), and
  the share of rows whose weight was clipped (IPS, DR) or switched to DM (switch-DR);
* ``warnings``: the weights are flagged heavy-tailed when the Pareto tail index estimated from
  the largest weights (Hill estimator, as PSIS's ``k̂``) exceeds 0.7, or when the effective
  sample size is under 1 % of the rows; also when ``mean(w)`` is far from 1 (the target
  puts mass where the logging policy has none, or the propensities are wrong).

>>> import numpy as np
>>> r = np.array([1.0, 0.0, 1.0]); a = np.array([0, 1, 1]); p = np.array([0.5, 0.25, 0.5])
>>> pi = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
>>> q = np.array([[0.5, 0.5], [0.2, 0.4], [0.6, 0.8]])
>>> round(ips(r, a, p, pi).value, 12)                       # (1·2 + 0·2 + 1·2) / 3
1.333333333333
>>> round(ips(r, a, p, pi, clip=1.5).value, 12)             # weights clipped at 1.5
1.0
>>> round(snips(r, a, p, pi).value, 12)                     # 4/3 divided by mean(w) = 2
0.666666666667
>>> round(dm(a, pi, q).value, 12)                           # (0.5 + 0.3 + 0.8) / 3
0.533333333333
>>> round(dr(r, a, p, pi, q).value, 12)                     # DM + (2·0.5 + 2·(−0.4) + 2·0.2)/3
0.733333333333
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = ["Estimate", "importance_weights", "ips", "snips", "dm", "dr", "switch_dr", "evaluate",
           "bootstrap_ci", "normal_ci", "effective_sample_size", "pareto_tail_index",
           "policy_table_from_long", "uniform_policy", "policy_from_scores", "logging_policy",
           "tabular_q", "ESTIMATORS"]

HEAVY_TAIL_K = 0.7          # PSIS's threshold on the Pareto tail index of the weights
MIN_ESS_SHARE = 0.01        # ESS below 1 % of the rows: warn


@dataclass
class Estimate:
    """One estimator's result: ``value`` (the mean of the round values), ``lower``/``upper`` the
    confidence interval at level ``1 − alpha`` (``ci``: ``bootstrap`` or ``normal``)."""
    estimator: str
    value: float
    lower: float
    upper: float
    n: int
    ess: float
    clipped_share: float
    mean_weight: float
    max_weight: float
    tail_index: float
    alpha: float = 0.05
    ci: str = "bootstrap"
    warnings: list = field(default_factory=list)
    round_values: np.ndarray | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "round_values"}
        d["warnings"] = "; ".join(self.warnings)
        return d


# ----------------------------------------------------------------------------- checks and weights
def _arrays(reward, action, pscore, action_dist, q_hat=None):
    action = np.asarray(action)
    if action.ndim != 1 or not np.issubdtype(action.dtype, np.integer):
        raise ValueError("action must be a 1-d integer array (the logged action's slot)")
    n = len(action)
    pi = np.asarray(action_dist, dtype=float)
    if pi.ndim == 3 and pi.shape[2] == 1:       # obp's (n, K, 1) position axis
        pi = pi[:, :, 0]
    if pi.ndim != 2 or pi.shape[0] != n:
        raise ValueError(f"action_dist must be (n, K) with n = {n}, got {pi.shape}")
    if (pi < -1e-12).any() or not np.allclose(pi.sum(axis=1), 1.0, atol=1e-8):
        raise ValueError("action_dist rows must be probability distributions (non-negative, sum 1)")
    if ((action < 0) | (action >= pi.shape[1])).any():
        raise ValueError("action out of range of action_dist's columns")
    r = None if reward is None else np.asarray(reward, dtype=float)
    if r is not None and r.shape != (n,):
        raise ValueError("reward must be (n,)")
    p = None if pscore is None else np.asarray(pscore, dtype=float)
    if p is not None and (p.shape != (n,) or (p <= 0).any() or (p > 1 + 1e-12).any()):
        raise ValueError("pscore must be (n,) in (0, 1]")
    q = None
    if q_hat is not None:
        q = np.asarray(q_hat, dtype=float)
        if q.ndim == 3 and q.shape[2] == 1:
            q = q[:, :, 0]
        if q.shape != pi.shape:
            raise ValueError(f"q_hat must have action_dist's shape {pi.shape}, got {q.shape}")
    return r, action, p, pi, q


def importance_weights(action, pscore, action_dist) -> np.ndarray:
    """``π(a_i | x_i) / pscore_i`` (unclipped)."""
    _, action, p, pi, _ = _arrays(None, action, pscore, action_dist)
    return pi[np.arange(len(action)), action] / p


def effective_sample_size(w) -> float:
    """Kish's effective sample size ``(Σw)² / Σw²`` (0 for all-zero weights).

    >>> effective_sample_size([1, 1, 1, 1]), effective_sample_size([4, 0, 0, 0])
    (4.0, 1.0)
    """
    w = np.asarray(w, dtype=float)
    s2 = float((w * w).sum())
    return float(w.sum() ** 2 / s2) if s2 > 0 else 0.0


def pareto_tail_index(w) -> float:
    """Hill estimate of the Pareto tail index ``k`` of the positive weights, from the largest
    ``M = min(n/5, 3√n)`` of them (PSIS's choice of M); ``k > 0.7``: heavy-tailed (too few
    weights dominate for the mean to be reliable). NaN with fewer than 20 positive weights.

    >>> rng = np.random.default_rng(0)
    >>> round(pareto_tail_index(rng.pareto(1.0, 20000) + 1), 1)     # Pareto with k = 1
    1.0
    >>> pareto_tail_index(np.full(1000, 2.0))                       # bounded: no tail at all
    0.0
    """
    w = np.sort(np.asarray(w, dtype=float)[np.asarray(w) > 0])
    n = len(w)
    if n < 20:
        return float("nan")
    m = int(max(5, min(n / 5, 3 * np.sqrt(n))))
    top, threshold = w[-m:], w[-m - 1]
    return float(np.mean(np.log(top) - np.log(threshold)))


# ----------------------------------------------------------------------------- intervals
def bootstrap_ci(values, alpha=0.05, n_boot=1000, seed=12345, chunk_elems=4_000_000):
    """Percentile bootstrap of the mean of ``values`` (obp's
    ``estimate_confidence_interval_by_bootstrap``: resample with replacement, mean, the
    ``α/2`` and ``1 − α/2`` percentiles), seeded; memory bounded by ``chunk_elems``."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    rng = np.random.default_rng(seed)
    per = max(1, chunk_elems // max(n, 1))
    means = np.empty(n_boot)
    done = 0
    while done < n_boot:
        b = min(per, n_boot - done)
        idx = rng.integers(0, n, (b, n))
        means[done:done + b] = v[idx].mean(axis=1)
        done += b
    return float(np.percentile(means, 100 * alpha / 2)), float(np.percentile(means, 100 * (1 - alpha / 2)))


def normal_ci(values, alpha=0.05):
    """``mean ± z_{1−α/2}·sd/√n`` (sd with ``ddof=1``).

    >>> [round(x, 6) for x in normal_ci([0.0, 1.0, 0.0, 1.0])]   # 0.5 ± 1.959964·0.288675
    [-0.065793, 1.065793]
    """
    from statistics import NormalDist

    v = np.asarray(values, dtype=float)
    z = NormalDist().inv_cdf(1 - alpha / 2)
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    m = v.mean()
    return float(m - z * se), float(m + z * se)


def _finish(name, round_values, w_used, w_raw, clipped, alpha, ci, n_boot, seed) -> Estimate:
    v = np.asarray(round_values, dtype=float)
    if ci == "bootstrap":
        lo, hi = bootstrap_ci(v, alpha, n_boot, seed)
    elif ci == "normal":
        lo, hi = normal_ci(v, alpha)
    else:
        raise ValueError("ci must be 'bootstrap' or 'normal'")
    n = len(v)
    ess = effective_sample_size(w_used) if w_used is not None else float(n)
    k = pareto_tail_index(w_raw) if w_raw is not None else float("nan")
    mean_w = float(np.mean(w_raw)) if w_raw is not None else float("nan")
    warns = []
    if w_raw is not None:
        if np.isfinite(k) and k > HEAVY_TAIL_K:
            warns.append(f"heavy-tailed weights (Pareto k-hat {k:.2f} > {HEAVY_TAIL_K})")
        if ess < MIN_ESS_SHARE * n:
            warns.append(f"heavy-tailed weights (ESS {ess:.0f} < {MIN_ESS_SHARE:.0%} of {n} rows)")
        se_w = np.std(w_raw, ddof=1) / np.sqrt(n) if n > 1 else 0.0
        if n > 1 and abs(mean_w - 1) > max(0.05, 4 * se_w):
            warns.append(f"mean weight {mean_w:.3f} is not 1: the target policy has mass where the "
                         "logging policy has none, or the propensities are off")
    return Estimate(name, float(v.mean()), lo, hi, n, ess, float(clipped), mean_w,
                    float(np.max(w_raw)) if w_raw is not None and n else float("nan"), k,
                    alpha, ci, warns, v)


# ----------------------------------------------------------------------------- estimators
def ips(reward, action, pscore, action_dist, clip=np.inf, alpha=0.05, ci="bootstrap",
        n_boot=1000, seed=12345) -> Estimate:
    """Inverse propensity scoring, obp's IPW: ``mean(r · min(w, clip))``."""
    r, a, p, pi, _ = _arrays(reward, action, pscore, action_dist)
    w = pi[np.arange(len(a)), a] / p
    wc = np.minimum(w, clip)
    return _finish("IPS", r * wc, wc, w, np.mean(w > clip), alpha, ci, n_boot, seed)


def snips(reward, action, pscore, action_dist, alpha=0.05, ci="bootstrap", n_boot=1000,
          seed=12345) -> Estimate:
    """Self-normalized IPS, obp's SNIPW: ``mean(r · w / mean(w))`` (no clipping)."""
    r, a, p, pi, _ = _arrays(reward, action, pscore, action_dist)
    w = pi[np.arange(len(a)), a] / p
    mw = w.mean()
    if mw <= 0:
        raise ValueError("SNIPS: every importance weight is 0 (no logged action has target mass)")
    return _finish("SNIPS", r * w / mw, w, w, 0.0, alpha, ci, n_boot, seed)


def dm(action, action_dist, q_hat, alpha=0.05, ci="bootstrap", n_boot=1000, seed=12345) -> Estimate:
    """Direct method, obp's DM: ``mean(Σ_a π(a|x) q̂(x, a))``; no weights (ESS = n)."""
    _, a, _, pi, q = _arrays(None, action, None, action_dist, q_hat)
    return _finish("DM", (pi * q).sum(axis=1), None, None, 0.0, alpha, ci, n_boot, seed)


def dr(reward, action, pscore, action_dist, q_hat, clip=np.inf, alpha=0.05, ci="bootstrap",
       n_boot=1000, seed=12345) -> Estimate:
    """Doubly robust, obp's DR: ``mean(Σ_a π(a|x) q̂(x, a) + min(w, clip)·(r − q̂(x, a_i)))``."""
    r, a, p, pi, q = _arrays(reward, action, pscore, action_dist, q_hat)
    i = np.arange(len(a))
    w = pi[i, a] / p
    wc = np.minimum(w, clip)
    v = (pi * q).sum(axis=1) + wc * (r - q[i, a])
    return _finish("DR", v, wc, w, np.mean(w > clip), alpha, ci, n_boot, seed)


def switch_dr(reward, action, pscore, action_dist, q_hat, switch=np.inf, alpha=0.05,
              ci="bootstrap", n_boot=1000, seed=12345) -> Estimate:
    """Switch-DR, obp's SwitchDR: ``mean(Σ_a π q̂ + 1[w ≤ switch]·w·(r − q̂(x, a_i)))``."""
    r, a, p, pi, q = _arrays(reward, action, pscore, action_dist, q_hat)
    i = np.arange(len(a))
    w = pi[i, a] / p
    on = w <= switch
    v = (pi * q).sum(axis=1) + on * w * (r - q[i, a])
    return _finish("switch-DR", v, w * on, w, np.mean(~on), alpha, ci, n_boot, seed)


ESTIMATORS = ("IPS", "SNIPS", "DM", "DR", "switch-DR")


def evaluate(reward, action, pscore, action_dist, q_hat=None, clip=np.inf, switch=None,
             alpha=0.05, ci="bootstrap", n_boot=1000, seed=12345) -> pd.DataFrame:
    """Every estimator on the same arrays, one row each (DM, DR, switch-DR only with ``q_hat``;
    switch-DR's threshold defaults to ``clip`` when finite, else to the 99th percentile of the
    positive weights)."""
    kw = dict(alpha=alpha, ci=ci, n_boot=n_boot, seed=seed)
    out = [ips(reward, action, pscore, action_dist, clip=clip, **kw),
           snips(reward, action, pscore, action_dist, **kw)]
    if q_hat is not None:
        out.append(dm(action, action_dist, q_hat, **kw))
        out.append(dr(reward, action, pscore, action_dist, q_hat, clip=clip, **kw))
        if switch is None:
            w = importance_weights(action, pscore, action_dist)
            switch = clip if np.isfinite(clip) else float(np.percentile(w[w > 0], 99)) if (w > 0).any() else np.inf
        out.append(switch_dr(reward, action, pscore, action_dist, q_hat, switch=switch, **kw))
    return pd.DataFrame([e.as_dict() for e in out])


# ----------------------------------------------------------------------------- policies
def policy_table_from_long(decisions: pd.DataFrame, candidates: pd.DataFrame, probs: pd.DataFrame,
                           ) -> np.ndarray:
    """``action_dist`` (n, K) from a long table ``probs`` (``decision_id``, ``creative_id``,
    ``probability``), laid out as ``candidates`` (``decision_id``, ``creative_id``, ``slot``).
    A decision missing from ``probs`` is an error; a probability on a creative that is not a
    candidate of the decision's campaign is an error; rows must sum to 1."""
    n = len(decisions)
    K = int(candidates.slot.max()) + 1 if len(candidates) else 1
    pos = pd.Series(np.arange(n), index=decisions.decision_id.to_numpy())
    m = probs.merge(candidates, on=["decision_id", "creative_id"], how="left")
    unknown = m[m.slot.isna() & m.decision_id.isin(pos.index)]
    if len(unknown):
        raise ValueError(f"{len(unknown)} probabilities on creatives outside the decision's campaign, "
                         f"e.g. {unknown.iloc[0][['decision_id', 'creative_id']].to_dict()}")
    m = m[m.decision_id.isin(pos.index)]
    missing = set(pos.index) - set(m.decision_id)
    if missing:
        raise ValueError(f"{len(missing)} decisions have no target probabilities, e.g. {sorted(missing)[0]}")
    pi = np.zeros((n, K))
    np.add.at(pi, (pos[m.decision_id].to_numpy(), m.slot.astype(int).to_numpy()), m.probability.to_numpy(float))
    return pi


def uniform_policy(n_candidates) -> np.ndarray:
    """Uniform over each row's first ``n_candidates[i]`` slots.

    >>> uniform_policy([2, 1])
    array([[0.5, 0.5],
           [1. , 0. ]])
    """
    k = np.asarray(n_candidates, dtype=int)
    K = int(k.max())
    mask = np.arange(K)[None, :] < k[:, None]
    return mask / k[:, None]


def policy_from_scores(scores, n_candidates, kind="greedy", epsilon=0.0, temperature=1.0) -> np.ndarray:
    """A policy over each row's first ``n_candidates[i]`` slots from ``scores`` (n, K), e.g. a
    model's predicted CTR: ``greedy`` (ties share the mass equally), ``epsilon-greedy``
    (``(1 − ε)·greedy + ε/k``) or ``softmax`` (``exp(logit(s)/T)`` normalised: on the logit of
    the predicted probability, temperature ``T``).

    >>> s = np.array([[0.1, 0.3, 0.3], [0.2, 0.1, 0.0]])
    >>> policy_from_scores(s, [3, 2], "greedy")
    array([[0. , 0.5, 0.5],
           [1. , 0. , 0. ]])
    >>> policy_from_scores(s, [3, 2], "epsilon-greedy", epsilon=0.3).round(3)
    array([[0.1 , 0.45, 0.45],
           [0.85, 0.15, 0.  ]])
    """
    s = np.asarray(scores, dtype=float)
    k = np.asarray(n_candidates, dtype=int)
    mask = np.arange(s.shape[1])[None, :] < k[:, None]
    if kind in ("greedy", "epsilon-greedy"):
        sm = np.where(mask, s, -np.inf)
        best = mask & (sm >= sm.max(axis=1, keepdims=True) - 1e-15)
        g = best / best.sum(axis=1, keepdims=True)
        if kind == "greedy":
            return g
        if not 0 <= epsilon <= 1:
            raise ValueError("epsilon must be in [0, 1]")
        return (1 - epsilon) * g + epsilon * mask / k[:, None]
    if kind == "softmax":
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        p = np.clip(s, 1e-9, 1 - 1e-9)
        z = np.where(mask, np.log(p / (1 - p)) / temperature, -np.inf)
        z = z - z.max(axis=1, keepdims=True)
        e = np.where(mask, np.exp(z), 0.0)
        return e / e.sum(axis=1, keepdims=True)
    raise ValueError("kind must be greedy, epsilon-greedy or softmax")


def logging_policy(action, pscore, n_candidates) -> np.ndarray:
    """The logging policy as a target, as far as the log knows it: the logged propensity on the
    logged action, the rest spread evenly over the other candidates (only the logged action's
    probability matters to IPS and SNIPS, whose weights are then all 1)."""
    a = np.asarray(action)
    p = np.asarray(pscore, dtype=float)
    k = np.asarray(n_candidates, dtype=int)
    K = int(k.max())
    mask = np.arange(K)[None, :] < k[:, None]
    others = np.where(k > 1, (1 - p) / np.maximum(k - 1, 1), 0.0)
    pi = mask * others[:, None]
    pi[np.arange(len(a)), a] = np.where(k > 1, p, 1.0)
    return pi


def tabular_q(df: pd.DataFrame, reward: np.ndarray, candidates: pd.DataFrame, keys=("placement", "device"),
              strength=20.0, folds=2, fold_key="decision_id") -> np.ndarray:
    """A cross-fitted reward model for DM/DR: ``q̂(x, a)`` = the mean logged reward of creative
    ``a`` in the cell ``keys`` of ``x``, shrunk (``strength`` pseudo-rows) towards the creative's
    mean, itself shrunk towards the global mean; fitted on the other folds (``folds``, by a hash
    of ``fold_key``) so that a row's own reward never enters its prediction. ``df``: one row per
    decision (``creative_id`` and ``keys``); ``candidates``: ``decision_id``, ``creative_id``, ``slot``."""
    keys = list(keys)
    n = len(df)
    K = int(candidates.slot.max()) + 1
    fold = pd.util.hash_pandas_object(df[fold_key], index=False).to_numpy() % folds if folds > 1 \
        else np.zeros(n, dtype=np.uint64)
    base = df[["decision_id", "creative_id"] + keys].assign(_r=np.asarray(reward, float), _f=fold)
    cand = candidates.merge(base[["decision_id", "_f"] + keys], on="decision_id")
    q = np.zeros((n, K))
    row = pd.Series(np.arange(n), index=df.decision_id.to_numpy())
    for f in range(max(folds, 1)):
        train = base[base._f != f] if folds > 1 else base
        g = train._r.mean() if len(train) else 0.0
        cre = train.groupby("creative_id")._r.agg(["sum", "count"])
        cre_mean = (cre["sum"] + strength * g) / (cre["count"] + strength)
        cell = train.groupby(["creative_id"] + keys)._r.agg(["sum", "count"]).reset_index()
        target = cand[cand._f == f]
        t = target.merge(cell, on=["creative_id"] + keys, how="left")
        prior = t.creative_id.map(cre_mean).fillna(g).to_numpy()
        s, c = t["sum"].fillna(0).to_numpy(), t["count"].fillna(0).to_numpy()
        q[row[t.decision_id].to_numpy(), t.slot.to_numpy(int)] = (s + strength * prior) / (c + strength)
    return q
