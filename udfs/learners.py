"""Online learners: hashed features, river models fed in mini-batches, online
Platt calibration, delayed-feedback conversion labels, a T-learner and a
doubly-robust learner for uplift. Plain Python, numpy and river; no Flink.

The models (all :class:`river.linear_model` GLMs, updated by river's mini-batch step
``_fit`` on fixed-size mini-batches with numpy weights, AdaGrad steps):

- ``ctr``: P(click | shown), treatment-arm decisions (the control arm is never
  shown), label final after ``click_window``; raw score s, served as
  ``σ(a·s + b)`` by :class:`OnlinePlatt` fitted on the most recent outcomes;
- ``conversion``: P(conversion within W | shown) under delayed feedback. It is
  trained once per decision when the decision is ``label_wait`` old, on the
  *interim* label (1 if converted, else ``P(convert within W | none after e)``
  from the delay model of its campaign and arm, :func:`udfs.delay.interim_label`),
  and trained again on its final label when the window closes (so the model's
  fixed point is the final rate once the interim labels are calibrated; an
  exact retraction, a step with weight −1 on the interim label, measured worse:
  nothing pulls back the noise of such steps);
- ``conversion_naive``: the baseline that delayed-feedback methods are judged
  against: trained at the same moment on the label observed then (not yet
  converted = negative), never corrected;
- outcome models ``mu1`` on treatment, ``mu0`` on control (logistic, every feature,
  same delayed labels, unweighted: the arm is drawn independently of the creative the
  policy chose, so the creative's logged propensity has no bearing on it): the DR
  learner's nuisance and the feasible range of the uplift. μ0 does not see the
  creative's fields and history: a holdout decision logs the creative the policy chose
  but does not show it. Like every logistic model, μ0 and μ1 start from the base rate
  of the first rows they learn (not from σ(0) = 0.5);
- uplift, T-learner ``tau_t``: both arms' outcomes on the effect modifiers, fitted
  jointly by ridge least squares, y = μ0(x) + T·τ(x) with μ0(x) = a + β·x and
  τ(x) = c + γ·x, from sufficient statistics that follow every held row's label as it
  matures (interim → converted → final), penalties per effect modifier by empirical
  Bayes (:meth:`OnlineLearner._t_solve`). The SGD-trained logistic μ1 − μ0 it replaces
  learned each row once at ``label_wait`` (when the interim label is nearly the
  campaign's rate) and again only when the window closed: 71 % of the ideal Qini
  where this reaches 83 % on the same stream;
- uplift, doubly robust: pseudo-outcome
  ``φ = μ1 − μ0 + T·(y − μ1)/e(x) − (1 − T)·(y − μ0)/(1 − e(x))`` with
  ``e(x) = P(treatment arm | campaign)`` counted online (shrunk to the global share),
  the weights clipped at ``ipw_clip`` (share clipped reported), φ from the μ before
  they learn the row; ``tau_dr`` is the ridge regression of φ on the effect
  modifiers only (``effect_modifiers``: any context field and crosses, by default
  the whole context and the encoder's crosses; the μ models, its nuisance, see
  every feature), solved exactly from sufficient statistics, which follow every
  held row's label as it matures (φ is linear in y);
- uplift scores are NaN while either arm's outcome model is untrained (no
  holdout: not identified), with a warning in each snapshot; both uplifts lie in
  [−μ0, 1 − μ0];
- per-campaign average treatment effect (:meth:`OnlineLearner.ate`) on the
  decisions with final labels, with a 95 % interval, in each snapshot's metrics.

:class:`OnlineLearner` is the training loop that ``jobs/learner.py`` runs in a
Flink operator, one hand-off slice at a time (test-then-train: every decision
is scored when it arrives, before any label of it is used), and
:class:`ModelBundle` is what a snapshot serializes and serving loads.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import xxhash
from river import linear_model, optim

from schemas import CONTRACTS
from udfs.delay import HOUR_MS, CampaignDelayModels, interim_label
from udfs.spec import FeatureSpec, parse_duration
from udfs.metrics import FeatureSummary, auc, drift, ece, log_loss, qini_coefficient

__all__ = ["FeatureEncoder", "SoftLog", "VectorAdaGrad", "Ring", "BatchLogisticRegression", "BatchLinearRegression",
           "OnlineGLM", "OnlinePlatt", "ModelBundle", "OnlineLearner", "Snapshot", "MODEL_NAMES"]

CLIP_Z = 6.0
MODEL_NAMES = ("ctr", "conversion", "conversion_naive", "mu1", "mu0", "tau_dr", "tau_t")
UPLIFT_MODELS = ("mu1", "mu0", "tau_dr", "tau_t")   # on the numeric block and the uplift fields (ModelBundle)
CONTEXT = ("placement", "device", "region", "hour", "campaign_id", "creative_id")
# default fields of the uplift regression τ_dr: the whole context and the encoder's crosses
EFFECT_MODIFIERS = CONTEXT + ("placement*creative_id", "device*campaign_id", "region*campaign_id")
UPLIFT_BUCKETS = 4096
ATE_SUMS = ("n", "phi", "phi2", "d", "d2", "n1", "r1", "r1sq", "n0", "r0", "r0sq")
# τ_dr: ridge penalty (pseudo-rows) on each effect-modifier coefficient, about Var(φ) / Var(τ) (the
# random-effects choice): φ's variance is ~0.5 at a 4 % rate and a 10 % holdout (1/(1 − e) ≈ 10),
# the cells' uplifts vary by a few hundredths
DR_RIDGE = 1000.0
# τ_t: ridge penalty (pseudo-rows) on each cell's baseline and uplift coefficient, about Var(y) /
# Var(coefficient): y's variance is ~0.04 at a 4 % rate, the cells' effects a few hundredths
T_RIDGE = 1000.0
T_EM_STEPS = 5              # τ_t: most empirical-Bayes steps per refit of its penalties
ARM_PRIOR = 20.0            # pseudo-decisions pulling a campaign's treatment share to the global one


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -35, 35)))


# ----------------------------------------------------------------------------- features
class FeatureEncoder:
    """Enriched decision -> (numeric block, hashed categorical indices) -> dense row.

    Numeric: ``log1p`` of every decayed accumulator (``spec.columns()``; NaN, i.e. no key
    or no consent, -> 0), a missing flag per key type, smoothed click and conversion
    rates per key type and half-life. Categorical: each
    field (and cross) value is hashed (xxh64 of ``"field=value"``) into one of
    ``buckets`` one-hot columns.

    The features are those of ``spec`` (a :class:`udfs.spec.FeatureSpec`); without one, of
    ``FeatureSpec(half_lives=half_lives)``.

    >>> enc = FeatureEncoder(("1h",), buckets=16)
    >>> df = pd.DataFrame({"placement": ["feed"], "device": ["ios"], "region": ["eu"], "hour": [3],
    ...                    "campaign_id": ["c1"], "creative_id": ["k1"]})
    >>> num, cat = enc.encode(df)
    >>> num.shape, cat.shape, enc.dense(num, cat).shape == (1, enc.n_features)
    ((1, 18), (1, 9), True)
    """

    FIELDS = ("placement", "device", "region", "hour", "campaign_id", "creative_id",
              ("placement", "creative_id"), ("device", "campaign_id"), ("region", "campaign_id"))

    def __init__(self, half_lives=None, buckets: int = 128, spec: FeatureSpec | None = None):
        if spec is None:
            spec = FeatureSpec(half_lives=("1h", "1d", "7d") if half_lives is None else tuple(half_lives))
        elif half_lives is not None and tuple(str(h) for h in half_lives) != spec.half_lives:
            raise ValueError(f"half-lives {tuple(half_lives)} are not the spec's {spec.half_lives}")
        self.spec = spec
        self.half_lives = spec.half_lives
        self.buckets = int(buckets)
        self.raw_columns = list(spec.columns())
        kts = spec.key_type_names
        names = [f"log1p:{c}" for c in self.raw_columns] + [f"missing:{kt}" for kt in kts]
        names += [f"{r}:{kt}_{h}" for kt in kts for h in self.half_lives for r in ("ctr", "cvr")]
        self.numeric_names = names
        self.field_names = ["*".join(f) if isinstance(f, tuple) else f for f in self.FIELDS]
        self.context_columns = sorted({g for f in self.FIELDS for g in (f if isinstance(f, tuple) else (f,))})
        self.uplift_fields: tuple = ()               # set by ModelBundle.set_uplift_fields
        self.uplift_buckets = UPLIFT_BUCKETS
        self._layout()
        self._cache = {}

    @staticmethod
    def parse_fields(fields) -> tuple:
        """Field specs (a context column, or a cross as ``"a*b"`` or a tuple) -> tuple of names
        ``"a*b"``; ValueError naming the unknown ones (every part must be a context column)."""
        out = []
        for f in fields:
            parts = tuple(f) if isinstance(f, (tuple, list)) else tuple(str(f).split("*"))
            out.append("*".join(parts))
        unknown = sorted({n for n in out if not set(n.split("*")) <= set(CONTEXT)})
        if unknown:
            raise ValueError(f"effect modifiers {unknown} are not context fields or crosses of them "
                             f"(context: {list(CONTEXT)})")
        return tuple(dict.fromkeys(out))

    def set_uplift_fields(self, fields, buckets: int = UPLIFT_BUCKETS) -> None:
        """Also hash ``fields`` (context columns and crosses) into a one-hot space of their own,
        ``buckets`` wide, for the uplift models: :meth:`encode` appends them as extra columns of
        ``cat`` (the main models read the first ``len(FIELDS)`` only). A model setting, not part of
        the feature schema version."""
        self.uplift_fields = self.parse_fields(fields)
        self.uplift_buckets = int(buckets)

    def _layout(self) -> None:
        """Per key type, where its raw columns are, and its impressions, clicks and conversions
        by half-life (``spec.parse`` of each raw column)."""
        at = {self.spec.parse(c): j for j, c in enumerate(self.raw_columns)}
        self._blocks = [(np.array([j for (k, _, _), j in at.items() if k == kt]),
                         *(np.array([at[kt, m, h] for h in self.half_lives])
                           for m in ("impressions", "clicks", "conversions")))
                        for kt in self.spec.key_type_names]

    def unshown_mask(self) -> tuple[np.ndarray, np.ndarray]:
        """(numeric columns to keep, categorical fields to keep) for a model of the control arm's
        outcome: a holdout decision logs the creative the policy chose but does not show it,
        so the creative's fields and history (the key types keyed by the creative) cannot
        cause that outcome and are left out."""
        kts = self.spec.key_type_names
        of_column = [self.spec.parse(c)[0] for c in self.raw_columns] + list(kts) + \
            [kt for kt in kts for _ in self.half_lives for _ in ("ctr", "cvr")]    # as numeric_names
        creative = {kt for kt in kts if "creative_id" in self.spec.entities(kt)}
        keep_num = np.array([kt not in creative for kt in of_column])
        keep_fields = np.array([j for j, f in enumerate(self.FIELDS)
                                if "creative_id" not in (f if isinstance(f, tuple) else (f,))])
        return keep_num, keep_fields


    @property
    def n_numeric(self) -> int:
        return len(self.numeric_names)

    @property
    def n_features(self) -> int:
        return self.n_numeric + self.buckets

    @property
    def version(self) -> str:
        """Feature schema version: the decision contract version and a hash of the spec."""
        spec = repr((self.numeric_names, self.field_names, self.buckets)).encode()
        return f"decision-v{CONTRACTS['decision'].version}-{hashlib.sha256(spec).hexdigest()[:8]}"

    def _bucket(self, field: str, values: np.ndarray, buckets: int | None = None) -> np.ndarray:
        buckets = self.buckets if buckets is None else buckets
        codes, uniques = pd.factorize(values)
        cache = self._cache.setdefault((field, buckets), {})
        b = np.empty(len(uniques), np.int32)
        for i, u in enumerate(uniques):
            h = cache.get(u)
            if h is None:
                h = cache[u] = xxhash.xxh64_intdigest(f"{field}={u}".encode()) % buckets
            b[i] = h
        return b[codes]

    def _frame(self, df) -> pd.DataFrame:
        """``df`` as a DataFrame, refused (ValueError) without its decision context."""
        if not isinstance(df, pd.DataFrame):
            df = df.to_pandas()
        missing = [c for c in self.context_columns if c not in df]
        if missing:
            raise ValueError(f"decision context columns missing: {missing} (needed: {self.context_columns})")
        return df

    def encode(self, df) -> tuple[np.ndarray, np.ndarray]:
        """``df``: a DataFrame (or pyarrow Table) with the decision context and, where known, the
        enriched feature columns (absent columns count as missing)."""
        df = self._frame(df)
        nf = len(self.FIELDS)
        up = getattr(self, "uplift_fields", ())
        cat = np.empty((len(df), nf + len(up)), np.int32)
        for j, (name, values) in enumerate(self.field_values(df)):
            cat[:, j] = self._bucket(name, values)
        for j, (name, values) in enumerate(self.field_values(df, up)):
            cat[:, nf + j] = self._bucket(name, values, self.uplift_buckets)
        return self.numeric(df), cat

    def field_values(self, df: pd.DataFrame, fields=None) -> list[tuple[str, np.ndarray]]:
        """(field name, value of each row as text) per categorical field (default: ``FIELDS``;
        else names such as ``"placement*creative_id"``); a cross joins its fields' values with "|"."""
        out = []
        pairs = zip(self.FIELDS, self.field_names) if fields is None else \
            ((tuple(n.split("*")), n) for n in fields)
        for f, name in pairs:
            parts = f if isinstance(f, tuple) else (f,)
            values = df[parts[0]].astype(str).to_numpy(dtype=object)
            for g in parts[1:]:
                values = values + "|" + df[g].astype(str).to_numpy(dtype=object)
            out.append((name, values))
        return out

    def numeric(self, df) -> np.ndarray:
        """The numeric block (float32) of decision rows."""
        df = self._frame(df)
        n = len(df)
        raw = np.full((n, len(self.raw_columns)), np.nan)
        for j, c in enumerate(self.raw_columns):
            if c in df:
                raw[:, j] = df[c].to_numpy(dtype=float, na_value=np.nan)
        missing = np.column_stack([np.isnan(raw[:, cols]).all(axis=1) for cols, *_ in self._blocks])
        vals = np.nan_to_num(raw, nan=0.0)
        parts = [np.log1p(np.maximum(vals, 0.0)), missing.astype(float)]
        h = len(self.half_lives)
        for _, imp, clk, cnv in self._blocks:         # by half-life, in the spec's order
            imp, clk, cnv = vals[:, imp], vals[:, clk], vals[:, cnv]
            rates = np.empty((n, 2 * h))
            rates[:, 0::2] = (clk + 0.05) / (imp + 1.0)
            rates[:, 1::2] = (cnv + 0.01) / (imp + 1.0)
            parts.append(rates)
        return np.hstack(parts).astype(np.float32)

    def dense(self, num: np.ndarray, cat: np.ndarray) -> np.ndarray:
        """One row per decision: the numeric block (as given: standardize it first) and the
        one-hot hashed buckets."""
        n = len(num)
        cat = cat[:, :len(self.FIELDS)]
        x = np.zeros((n, self.n_features))
        x[:, :self.n_numeric] = num
        rows = np.repeat(np.arange(n), cat.shape[1])
        np.add.at(x, (rows, self.n_numeric + cat.ravel()), 1.0)
        return x

    def raw_score(self, weights: np.ndarray, num: np.ndarray, cat: np.ndarray) -> np.ndarray:
        """``dense(num, cat) @ weights`` without building the dense matrix."""
        return num @ weights[:self.n_numeric] + weights[self.n_numeric:][cat[:, :len(self.FIELDS)]].sum(axis=1)

    def __getstate__(self):
        return {k: v for k, v in {**self.__dict__, "_cache": {}}.items() if k != "_blocks"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "spec" not in state:                      # pickled before the encoder kept its spec
            self.spec = FeatureSpec(half_lives=self.half_lives)
        self._layout()


# ----------------------------------------------------------------------------- river models
class SoftLog(optim.losses.BinaryLoss):
    """Log loss on a logit that accepts soft labels y ∈ [0, 1] (river's ``Log`` maps labels to
    ±1, which is only right for hard ones). Gradient: σ(s) − y."""

    def __call__(self, y_true, y_pred):
        p = np.clip(_sigmoid(np.asarray(y_pred, float)), 1e-15, 1 - 1e-15)
        y = np.asarray(y_true, float)
        out = -(y * np.log(p) + (1 - y) * np.log(1 - p))
        return float(out) if np.ndim(out) == 0 else out

    def gradient(self, y_true, y_pred):
        g = _sigmoid(np.asarray(y_pred, float)) - np.asarray(y_true, float)
        return float(g) if np.ndim(g) == 0 else g


class _ArrayBatch:
    """river's mini-batch update (``_fit``: optimizer look-ahead, gradient, intercept step on
    river's schedule, optimizer step) with the weights held in one numpy array and the batch given
    as a numpy matrix. river's own ``learn_many`` takes a DataFrame, keys its weights by column in
    a VectorDict and returns the gradient as a dict: on this stream that machinery cost more than
    the arithmetic (profiled: 9 of 22 s for 888k decisions). The arithmetic is river's:
    g = mean_i(clip(w_i·∂loss(y_i, s_i)))·x_i + l2·w, intercept −= lr_b·mean(∂loss)."""

    def learn_array(self, X: np.ndarray, y: np.ndarray, w=1.0) -> None:
        if not isinstance(self._weights, np.ndarray):
            self._weights = np.zeros(X.shape[1])
        self._fit(X, y, w, get_grad=self._eval_gradient_array)

    def _eval_gradient_array(self, X, y, w):
        lg = self.loss.gradient(y_true=y, y_pred=X @ self._weights + self.intercept) * w
        lg = np.clip(lg, -self.clip_gradient, self.clip_gradient)
        g = lg @ X / len(lg)
        if self.l2:
            g += self.l2 * self._weights
        return g, lg.mean()

    def learn_sparse(self, z: np.ndarray, idx: np.ndarray, n: int, y: np.ndarray, w=1.0) -> None:
        """The same step on rows given as a dense block ``z`` (the first columns) and one-hot
        columns ``idx`` (absolute column numbers, one row of indices per row), ``n`` columns in all:
        the one-hot part of the gradient is a bincount, no dense matrix is built."""
        if not isinstance(self._weights, np.ndarray):
            self._weights = np.zeros(n)
        self._fit((z, idx), y, w, get_grad=self._eval_gradient_sparse)

    def _eval_gradient_sparse(self, X, y, w):
        z, idx = X
        wt = self._weights
        s = z @ wt[:z.shape[1]] + wt[idx].sum(axis=1) + self.intercept
        lg = self.loss.gradient(y_true=y, y_pred=s) * w
        lg = np.clip(lg, -self.clip_gradient, self.clip_gradient)
        g = np.bincount(idx.ravel(), weights=np.repeat(lg, idx.shape[1]), minlength=len(wt)) / len(lg)
        g[:z.shape[1]] += lg @ z / len(lg)
        if self.l2:
            g += self.l2 * wt
        return g, lg.mean()

    def weight_array(self, n: int) -> np.ndarray:
        return self._weights.copy() if isinstance(self._weights, np.ndarray) else np.zeros(n)


class VectorAdaGrad(optim.AdaGrad):
    """river's AdaGrad with a vectorized step over numpy weights (river's AdaGrad only loops
    over a dict): g2 += g², w −= lr·g/√(g2 + eps), in place."""

    def _step_with_vector(self, w, g):
        if not isinstance(self.g2, np.ndarray):
            self.g2 = np.zeros_like(g)
        self.g2 += g * g
        w -= self.learning_rate * g / np.sqrt(self.g2 + self.eps)
        return w


class BatchLogisticRegression(_ArrayBatch, linear_model.LogisticRegression):
    """river LogisticRegression with soft labels and numpy mini-batch steps."""


class BatchLinearRegression(_ArrayBatch, linear_model.LinearRegression):
    """river LinearRegression with numpy mini-batch steps."""


class OnlineGLM:
    """A river GLM over the dense encoded features, fed in mini-batches of ``batch_size`` rows:
    AdaGrad steps with learning rate ``lr`` for the weights, plain SGD steps
    (``intercept_lr``) for the intercept. A logistic model's intercept starts at the logit of the
    (smoothed, weighted) label rate of the first rows it is given, not at 0 (σ(0) = 0.5: on a
    stream whose rate is 4 % a model trained on few rows, such as the holdout arm's, would
    otherwise stay far above it for many mini-batches). ``learn`` takes dense rows ``x``, or
    ``(z, idx)``: a dense block and one-hot column numbers (:meth:`_ArrayBatch.learn_sparse`)."""

    def __init__(self, kind: str, n_features: int, lr: float, l2: float, batch_size: int,
                 intercept_lr: float):
        if kind == "logistic":
            self.model = BatchLogisticRegression(optimizer=VectorAdaGrad(lr), loss=SoftLog(), l2=l2,
                                                 intercept_lr=intercept_lr)
        else:
            self.model = BatchLinearRegression(optimizer=VectorAdaGrad(lr), l2=l2, intercept_lr=intercept_lr)
        self.kind = kind
        self.n_features = int(n_features)
        self.batch_size = int(batch_size)
        self.started = False
        self.rows = 0                                # rows learned so far

    def weights(self) -> np.ndarray:
        return self.model.weight_array(self.n_features)

    @property
    def intercept(self) -> float:
        return float(self.model.intercept)

    def learn(self, x, y: np.ndarray, w: np.ndarray | None = None) -> None:
        b = self.batch_size
        y = np.asarray(y, float)
        if not len(y):
            return
        if not getattr(self, "started", True):
            self.started = True
            if self.kind == "logistic":
                ww = np.ones(len(y)) if w is None else np.asarray(w, float)
                rate = (float(ww @ y) + 0.5) / (float(ww.sum()) + 1.0)
                self.model.intercept = float(np.log(rate / (1.0 - rate)))
        self.rows = getattr(self, "rows", 0) + len(y)
        if isinstance(x, tuple):
            z, idx = x
            for i in range(0, len(y), b):
                self.model.learn_sparse(z[i:i + b], idx[i:i + b], self.n_features, y[i:i + b],
                                        1.0 if w is None else w[i:i + b])
            return
        for i in range(0, len(x), b):
            self.model.learn_array(x[i:i + b], y[i:i + b], 1.0 if w is None else w[i:i + b])


class Ring:
    """The last ``size`` rows of a few arrays, allocated on the first push (row order within
    the buffer is not kept: its users are order-free fits)."""

    def __init__(self, size: int):
        self.size = int(size)
        self.arrays = None
        self.n = 0                                  # rows pushed in all

    def push(self, *arrays) -> None:
        k = min(len(arrays[0]), self.size)
        if self.arrays is None:
            self.arrays = [np.zeros((self.size,) + a.shape[1:], a.dtype) for a in arrays]
        pos = (self.n + np.arange(k)) % self.size
        for buf, a in zip(self.arrays, arrays):
            buf[pos] = a[len(a) - k:]
        self.n += len(arrays[0])

    def view(self) -> list:
        k = min(self.n, self.size)
        return [] if self.arrays is None else [b[:k] for b in self.arrays]


class OnlinePlatt:
    """Online calibration ŷ = σ(a·s + b), (a, b) the maximum-likelihood fit on the last
    ``window`` (score, outcome) pairs, refitted by Newton steps (warm-started) after each update.

    >>> rng = np.random.default_rng(0)
    >>> s = rng.normal(-2, 1, 40000); y = rng.random(40000) < _sigmoid(0.7 * s + 0.3)
    >>> cal = OnlinePlatt(window=40000); cal.update(s, y)
    >>> round(cal.a, 1), round(cal.b, 1)
    (0.7, 0.3)
    """

    def __init__(self, window: int = 50_000, newton_steps: int = 6):
        self.window = int(window)
        self.newton_steps = newton_steps
        self.recent = Ring(self.window)     # (score, outcome) pairs given to update()
        self.a, self.b = 1.0, 0.0

    def update(self, s: np.ndarray, y: np.ndarray) -> None:
        self.recent.push(np.asarray(s, float), np.asarray(y, float))
        self.refit(*self.recent.view())

    def refit(self, s: np.ndarray, y: np.ndarray) -> None:
        """(a, b) = the fit on these pairs, warm-started from the current ones."""
        self.a, self.b = self.fit(s, y, (self.a, self.b), self.newton_steps)

    @staticmethod
    def fit(s, y, init=(1.0, 0.0), steps: int = 25, ridge: float = 1.0) -> tuple[float, float]:
        """Newton-Raphson for logistic regression of y on (s, 1), with a weak Gaussian prior
        (``ridge`` pseudo-precision) towards the identity map (a, b) = (1, 0) and steps capped at
        2: while the model's scores barely vary (early on) the slope stays finite."""
        s, y = np.asarray(s, float), np.asarray(y, float)
        if len(s) == 0:
            return init
        X = np.column_stack([s, np.ones(len(s))])
        beta = np.array(init, float)
        if not np.all(np.isfinite(beta)) or abs(beta[0]) > 50:
            beta = np.array([1.0, 0.0])
        prior = np.array([1.0, 0.0])
        for _ in range(steps):
            p = _sigmoid(X @ beta)
            grad = X.T @ (p - y) + ridge * (beta - prior)
            H = (X * (p * (1 - p))[:, None]).T @ X + ridge * np.eye(2)
            step = np.linalg.solve(H, grad)
            step *= min(1.0, 2.0 / max(np.abs(step).max(), 1e-300))
            beta -= step
            if np.abs(step).max() < 1e-8:
                break
        return float(beta[0]), float(beta[1])

    def predict(self, s) -> np.ndarray:
        return _sigmoid(self.a * np.asarray(s, float) + self.b)


# ----------------------------------------------------------------------------- the bundle
class ModelBundle:
    """Everything needed to score a decision: the encoder, the six models, the calibrator and
    the treatment share. Pickled into each snapshot; serving scores with :meth:`score`.

    The uplift models (μ1, μ0, τ_dr) read the numeric block and a one-hot space of their own
    (``uplift_buckets`` wide, so the crosses of the effect modifiers rarely collide) over the
    uplift fields: the encoder's fields and the effect modifiers. μ1 sees all of them, μ0 all
    but the creative's (fields and history: a holdout decision is not shown its creative), τ_dr
    the effect modifiers only (EconML's X; the μ models, its nuisance, see everything)."""

    def __init__(self, encoder: FeatureEncoder, lr=0.05, l2=0.0, batch_size=512,
                 calibration_window=50_000, intercept_lr=0.2, dr_intercept_lr=0.01,
                 effect_modifiers=EFFECT_MODIFIERS, uplift_buckets=UPLIFT_BUCKETS):
        self.encoder = encoder
        self.effect_modifiers = encoder.parse_fields(effect_modifiers)
        encoder.set_uplift_fields(tuple(encoder.field_names) + self.effect_modifiers, uplift_buckets)
        nf = encoder.n_features
        nu = encoder.n_numeric + encoder.uplift_buckets
        self.models = {
            name: OnlineGLM("linear", nu, lr, l2, batch_size, dr_intercept_lr) if name in ("tau_dr", "tau_t")
            else OnlineGLM("logistic", nu if name in UPLIFT_MODELS else nf, lr, l2, batch_size, intercept_lr)
            for name in MODEL_NAMES}
        self.calibrator = OnlinePlatt(calibration_window)
        self.scaler = FeatureSummary(encoder.n_numeric)   # running mean/std of the numeric block
        up = encoder.uplift_fields
        keep_num, _ = encoder.unshown_mask()
        every = np.arange(len(up))
        self._masks = {
            "mu1": (np.ones(encoder.n_numeric, bool), every),
            "mu0": (keep_num, np.array([j for j, f in enumerate(up) if "creative_id" not in f.split("*")], np.int64)),
            "tau_dr": (np.zeros(encoder.n_numeric, bool),
                       np.array([j for j, f in enumerate(up) if f in self.effect_modifiers], np.int64))}
        self._masks["tau_t"] = self._masks["tau_dr"]
        self.n_treated = 0
        self.n_control = 0

    @property
    def treatment_share(self) -> float:
        """e = P(treatment arm), counted with a +1/+1 prior."""
        return (self.n_treated + 1.0) / (self.n_treated + self.n_control + 2.0)

    @property
    def uplift_identified(self) -> bool:
        """Both arms' outcome models have been trained: without holdout (or treated) outcomes
        the uplift is not identified and is served as NaN."""
        return self.models["mu1"].rows > 0 and self.models["mu0"].rows > 0

    def standardize(self, num: np.ndarray) -> np.ndarray:
        """Numeric block in running standard units (spread floored at 0.05, clipped to ±CLIP_Z:
        a feature that was constant so far must not blow up when it first moves)."""
        if self.scaler.n < 2:
            return num.astype(float)
        z = num - self.scaler.mean                   # float64, then in place
        z *= 1.0 / np.maximum(self.scaler.std, 0.05)
        return np.clip(z, -CLIP_Z, CLIP_Z, out=z)

    def rows(self, name: str, z: np.ndarray, cat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Uplift model ``name``'s rows as ``(dense numeric block, one-hot column numbers)`` from
        standardized numeric rows ``z`` and the encoder's ``cat`` (with its uplift columns)."""
        keep_num, keep_fields = self._masks[name]
        nf = len(self.encoder.FIELDS)
        return z * keep_num, self.encoder.n_numeric + cat[:, nf + keep_fields]

    def design(self, num: np.ndarray, cat: np.ndarray) -> np.ndarray:
        """The dense rows the main models (ctr, conversion) train on."""
        return self.encoder.dense(self.standardize(num), cat)

    def digest(self) -> str:
        """A hash of every model's weights and intercept, the calibrator and the scaler: equal
        digests, equal models."""
        h = hashlib.sha256()
        for name in MODEL_NAMES:
            m = self.models[name]
            h.update(np.append(m.weights(), m.intercept).tobytes())
        h.update(np.array([self.calibrator.a, self.calibrator.b, self.n_treated, self.n_control]).tobytes())
        h.update(self.scaler.mean.tobytes() + self.scaler.m2.tobytes())
        return h.hexdigest()

    def raw_score(self, name: str, num, cat, z=None) -> np.ndarray:
        """Model ``name``'s logit (or value, for ``tau_dr``) of encoded rows."""
        m = self.models[name]
        z = self.standardize(num) if z is None else z
        if name in UPLIFT_MODELS:
            zz, idx = self.rows(name, z, cat)
            w = m.weights()
            return zz @ w[:zz.shape[1]] + w[idx].sum(axis=1) + m.intercept
        return self.encoder.raw_score(m.weights(), z, cat) + m.intercept

    def raw_scores(self, num, cat) -> dict:
        z = self.standardize(num)
        return {name: self.raw_score(name, num, cat, z) for name in self.models}

    def predict(self, num, cat) -> pd.DataFrame:
        """Scores of encoded rows. The uplift is NaN while it is not identified
        (:attr:`uplift_identified`); both uplifts lie in the feasible range [−μ0, 1 − μ0]
        (the T-learner's by construction, the DR regression's clipped to it)."""
        raw = self.raw_scores(num, cat)
        mu1, mu0 = _sigmoid(raw["mu1"]), _sigmoid(raw["mu0"])
        if self.uplift_identified:
            up = np.clip(raw["tau_t"], -mu0, 1.0 - mu0)
            up_dr = np.clip(raw["tau_dr"], -mu0, 1.0 - mu0)
        else:
            up = up_dr = np.full(len(mu0), np.nan)
        return pd.DataFrame({
            "ctr": self.calibrator.predict(raw["ctr"]), "ctr_raw": _sigmoid(raw["ctr"]),
            "ctr_logit": raw["ctr"],
            "conversion": _sigmoid(raw["conversion"]), "conversion_naive": _sigmoid(raw["conversion_naive"]),
            "mu1": mu1, "mu0": mu0, "uplift": up, "uplift_dr": up_dr})

    def score(self, features) -> pd.DataFrame:
        """Score decisions given their context and features (a DataFrame, a pyarrow Table, or
        one dict): calibrated CTR, conversion probability, uplift (T-learner and DR)."""
        if isinstance(features, dict):
            features = pd.DataFrame([features])
        num, cat = self.encoder.encode(features)
        return self.predict(num, cat)[["ctr", "conversion", "uplift", "uplift_dr"]]


# ----------------------------------------------------------------------------- the loop
@dataclass
class Snapshot:
    """One model snapshot: what ``jobs/learner.py`` writes to the model store and Iceberg."""
    model_id: str
    version: int
    clock: int                      # event time of the cut (the hand-off clock)
    seq: int                        # last hand-off slice included
    feature_schema_version: str
    window_start: int | None        # decision times of the examples trained so far
    window_end: int | None
    examples: int                   # training examples (first-sight updates) so far
    corrections: int                # final-label corrections so far
    metrics: dict                   # prequential, over the examples since the previous snapshot
    drift: float
    safe: bool
    bundle: bytes = field(repr=False, default=b"")
    warnings: list = field(default_factory=list)   # what the snapshot cannot be trusted for

    def manifest(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "bundle"}


class _Block:
    """The decisions of one hand-off slice (``key``: its seq), held until their conversion window
    closes. The ``FIXED`` fields never change once made; the rest are the labels and flags."""

    FIXED = ("ids", "t", "camp", "treated", "prop", "num", "cat", "scores", "true_click", "true_conv")

    def __init__(self, key, ids, t, camp, treated, prop, num, cat, scores):
        self.key = str(key)
        self.ids = pd.Index(ids)
        self.t = t
        self.camp = camp
        self.treated = treated
        self.prop = prop
        self.num, self.cat = num, cat
        self.scores = scores                       # dict name -> array (first-sight predictions)
        n = len(t)
        self.clicked = np.zeros(n, bool)
        self.conv_t = np.full(n, -1, np.int64)     # conversion event time, -1: none yet
        self.true_click = None                     # oracle mode only
        self.true_conv = None
        self.trained = np.zeros(n, bool)           # ctr trained (first sight)
        self.conv_trained = np.zeros(n, bool)      # conversion models trained on interim labels
        self.y_interim = np.zeros(n)
        self.phi_interim = np.zeros(n)
        self.e_used = np.zeros(n)
        self.mu_used = np.zeros((n, 2))            # (μ1, μ0) in φ at the interim step
        self.done = np.zeros(n, bool)              # final correction applied

    def __len__(self):
        return len(self.t)


class OnlineLearner:
    """Test-then-train over hand-off slices (see the module docstring).

    ``labels``: ``"delayed"`` (the product: interim then final labels), or ``"oracle"``
    (evaluation only: each decision is trained as soon as it is scored, on its true final
    labels, taken from the ``true_click`` and ``true_conversion`` columns of the decisions).
    The features are those of ``spec`` (a :class:`udfs.spec.FeatureSpec`), or of
    ``FeatureSpec(half_lives=half_lives)`` (:class:`FeatureEncoder`).
    """

    def __init__(self, half_lives=None, click_window="1h", conversion_window="7d",
                 label_wait="1h", refit_every="1d", snapshot_every="6h", snapshot_examples=100_000,
                 buckets=128, lr=0.05, l2=0.0, batch_size=512, intercept_lr=0.2,
                 dr_intercept_lr=0.01, calibration_window=50_000,
                 ipw_clip=20.0, prior_strength=50.0, fit_sample=50_000, drift_threshold=0.5,
                 model_id="streamlift", labels="delayed", effect_modifiers=None, spec=None,
                 uplift_buckets=UPLIFT_BUCKETS, dr_ridge=DR_RIDGE, t_ridge=T_RIDGE,
                 t_empirical_bayes=True):
        effect_modifiers = tuple(effect_modifiers or EFFECT_MODIFIERS)
        if labels not in ("delayed", "oracle"):
            raise ValueError(f"labels must be 'delayed' or 'oracle', not {labels!r}")
        self.click_window = parse_duration(click_window)
        self.window = parse_duration(conversion_window)
        self.wait = 0 if labels == "oracle" else max(parse_duration(label_wait), self.click_window)
        self.refit_every = parse_duration(refit_every)
        self.snapshot_every = parse_duration(snapshot_every)
        self.snapshot_examples = int(snapshot_examples)
        self.ipw_clip = float(ipw_clip)
        self.prior_strength = float(prior_strength)
        self.fit_sample = int(fit_sample)
        self.drift_threshold = float(drift_threshold)
        self.model_id = model_id
        self.labels = labels
        self.bundle = ModelBundle(FeatureEncoder(half_lives, buckets, spec), lr, l2, batch_size,
                                  calibration_window, intercept_lr, dr_intercept_lr, tuple(effect_modifiers),
                                  uplift_buckets)
        self.arm_counts = np.zeros((0, 2))         # per campaign code: (treated, control) decisions
        self.ate_sums = np.zeros((0, len(ATE_SUMS)))   # per campaign code: ATE_SUMS on final labels
        self.clip_counts = np.zeros(2)             # φ rows, of which with a clipped weight (window)
        self.dr_ridge = float(dr_ridge)
        self.dr_cols = np.zeros(0, np.int64)       # τ_dr's one-hot columns seen, in order of arrival
        self.dr_xtx = np.zeros((1, 1))             # sufficient statistics of τ_dr: [1, one-hots]ᵀ[...]
        self.dr_xty = np.zeros(1)                  # ... and [1, one-hots]ᵀ φ
        self.t_ridge = float(t_ridge)
        self.t_eb = bool(t_empirical_bayes)
        self.t_field = np.zeros(0, np.int64)       # the effect modifier of each of dr_cols
        self.t_lam = None                          # τ_t's ridge per (baseline | uplift, field), empirical Bayes
        self.t_xtx1 = np.zeros((1, 1))             # τ_t: [1, one-hots]ᵀ[...] of the treated rows
        self.t_xty = np.zeros((2, 1))              # ... and [1, one-hots]ᵀ y, treated and control rows
        self.dr_dirty = False
        self.blocks: list[_Block] = []
        self.campaigns: dict[str, int] = {}
        self.delay_params = None                   # (p, λ per hour) arrays by campaign code
        self.next_refit = None
        self.next_snapshot = None
        self.next_seq = 0
        self.waiting: dict[int, tuple] = {}
        self.clock = None
        self.version = 0
        self.examples = 0
        self.corrections = 0
        self.since_snapshot = 0
        self.t_min = self.t_max = None
        self.ref_summary = None
        self.live_summary = FeatureSummary(self.bundle.encoder.n_numeric)
        self._eval = self._new_eval()
        self._cal = Ring(calibration_window)         # calibration window: numeric, buckets, clicks
        self._stored: set = set()                    # block parts handed out by state_parts()
        self.totals = {"decisions": 0, "outcomes": 0, "unmatched_outcomes": 0, "trained": 0,
                       "conversion_trained": 0, "finalized": 0}

    # ------------------------------------------------------------------ input
    def offer(self, seq: int, decisions=None, outcomes: pd.DataFrame | None = None,
              clock: int | None = None, final: bool = False) -> list[tuple[int, pd.DataFrame | None, list]]:
        """Take one hand-off slice; returns, per slice processed now (a slice that arrived early
        waits for the gap to fill), ``(seq, scores of its decisions, snapshots cut)``."""
        if seq < self.next_seq or seq in self.waiting:
            return []                              # a replayed slice: already taken
        self.waiting[seq] = (decisions, outcomes, clock, final)
        out = []
        while self.next_seq in self.waiting:
            s = self.next_seq
            out.append((s, *self._process(s, *self.waiting.pop(s))))
            self.next_seq = s + 1
        return out

    def flush(self) -> list[Snapshot]:
        """End of input: a last snapshot of what was learned (rows still inside their waits stay
        untrained: their labels are not known yet)."""
        if self.since_snapshot or self.version == 0:
            return [self._snapshot(self.next_seq - 1)]
        return []

    def _campaign_codes(self, names) -> np.ndarray:
        out = np.empty(len(names), np.int32)
        for i, c in enumerate(names):
            code = self.campaigns.get(c)
            if code is None:
                code = self.campaigns[c] = len(self.campaigns)
            out[i] = code
        return out

    def _process(self, seq, decisions, outcomes, clock, final):
        scored = None
        if decisions is not None and len(decisions):
            scored = self._add_decisions(seq, decisions)
        if outcomes is not None and len(outcomes):
            self._add_outcomes(outcomes)
        if clock is not None:
            self.clock = clock if self.clock is None else max(self.clock, clock)
        snaps = []
        if self.clock is not None:
            snaps = self._advance(seq, final)
        return scored, snaps

    def _add_decisions(self, seq, decisions) -> pd.DataFrame:
        df = decisions.to_pandas() if not isinstance(decisions, pd.DataFrame) else decisions
        enc = self.bundle.encoder
        num, cat = enc.encode(df)
        preds = self.bundle.predict(num, cat)
        t = df["event_time"].to_numpy(np.int64)
        camp = df["campaign_id"].to_numpy(dtype=object)
        uniq, inv = np.unique(camp, return_inverse=True)
        codes = self._campaign_codes(uniq)[inv]
        treated = (df["arm"].to_numpy(dtype=object) == "treatment")
        scores = {k: preds[k].to_numpy() for k in ("ctr", "ctr_logit", "conversion", "conversion_naive",
                                                    "uplift", "uplift_dr")}
        b = _Block(seq, df["decision_id"].to_numpy(dtype=object), t, codes, treated,
                   df["propensity"].to_numpy(float), num, cat, scores)
        if self.labels == "oracle":
            b.true_click = df["true_click"].to_numpy(bool)
            b.true_conv = df["true_conversion"].to_numpy(bool)
        self.blocks.append(b)
        self.totals["decisions"] += len(b)
        preds.insert(0, "decision_id", df["decision_id"].to_numpy())
        preds.insert(1, "model_version", self.version)
        preds.insert(2, "feature_schema_version", enc.version)
        return preds.drop(columns=["ctr_logit"])

    def _add_outcomes(self, outcomes: pd.DataFrame) -> None:
        self.totals["outcomes"] += len(outcomes)
        ids = outcomes["decision_id"].to_numpy(dtype=object)
        kind = outcomes["kind"].to_numpy(dtype=object)
        t = outcomes["event_time"].to_numpy(np.int64)
        matched = np.zeros(len(ids), bool)
        for b in self.blocks:
            pos = b.ids.get_indexer(ids)
            hit = pos >= 0
            if not hit.any():
                continue
            matched |= hit
            clk = hit & (kind == "click")
            b.clicked[pos[clk]] = True
            self.totals["clicks"] = self.totals.get("clicks", 0) + int(clk.sum())
            self.totals["conversions"] = self.totals.get("conversions", 0) + int((hit & (kind == "conversion")).sum())
            cnv = hit & (kind == "conversion")
            p = pos[cnv]
            first = (b.conv_t[p] < 0) | (t[cnv] < b.conv_t[p])
            b.conv_t[p[first]] = t[cnv][first]
        self.totals["unmatched_outcomes"] += int((~matched).sum())

    # ------------------------------------------------------------------ training
    def _advance(self, seq, final) -> list[Snapshot]:
        clock = self.clock
        if self.next_refit is None:
            self.next_refit = (clock // self.refit_every + 1) * self.refit_every
            self.next_snapshot = (clock // self.snapshot_every + 1) * self.snapshot_every
        due = clock >= self.next_refit
        if self.labels == "delayed" and (due or (final and self.delay_params is None)):
            self._refit()
        if due:
            self.next_refit = (clock // self.refit_every + 1) * self.refit_every
        self._train_first_sight(clock)
        self._finalize(clock)
        self._dr_refresh(clock)
        self._dr_solve(due or final)
        self.blocks = [b for b in self.blocks if not b.done.all()]
        snaps = []
        if self.since_snapshot >= self.snapshot_examples or clock >= self.next_snapshot:
            snaps.append(self._snapshot(seq))
            self.next_snapshot = (clock // self.snapshot_every + 1) * self.snapshot_every
        return snaps

    def _refit(self) -> None:
        """Delay models per campaign and arm (the arms convert at different rates: that is the
        uplift), each shrunk towards the global fit, on the held decisions (an evenly spaced
        sample of at most ``fit_sample``), as of the clock."""
        if not self.blocks:
            return
        group = np.concatenate([2 * b.camp + b.treated for b in self.blocks])
        t = np.concatenate([b.t for b in self.blocks])
        conv_t = np.concatenate([b.conv_t for b in self.blocks])
        keep = np.arange(len(t))
        if len(keep) > self.fit_sample:
            keep = np.linspace(0, len(t) - 1, self.fit_sample).astype(np.int64)
        group, t, conv_t = group[keep], t[keep], conv_t[keep]
        elapsed_h = np.minimum((self.clock - t) / HOUR_MS, self.window / HOUR_MS)
        seen = (conv_t >= 0) & (conv_t <= self.clock)
        delay_h = np.where(seen, (conv_t - t) / HOUR_MS, 0.0)
        models = CampaignDelayModels(self.prior_strength).fit(group, seen, delay_h, elapsed_h)
        n = 2 * len(self.campaigns)
        p = np.full(n, models.global_.p_)
        lam = np.full(n, models.global_.lam_)
        for g, (pg, lg, _) in models.params().items():
            p[g], lam[g] = pg, lg
        self.delay_params = (p, lam)

    def _delay_for(self, camp, treated):
        p, lam = self.delay_params
        n = 2 * len(self.campaigns)
        if len(p) < n:                               # a campaign newer than the last fit: global
            gp, gl = np.median(p), np.median(lam)
            p = np.concatenate([p, np.full(n - len(p), gp)])
            lam = np.concatenate([lam, np.full(n - len(lam), gl)])
            self.delay_params = (p, lam)
        g = 2 * camp + treated
        return p[g], lam[g]

    def _train_first_sight(self, clock) -> None:
        models = self.bundle.models
        recalibrate = False
        for b in self.blocks:
            due = ~b.trained & (b.t + self.wait <= clock)
            conv_due = ~b.conv_trained & (b.t + self.wait <= clock) & \
                (self.labels == "oracle" or self.delay_params is not None)
            if not due.any() and not conv_due.any():
                continue
            x = None
            if due.any():
                idx = np.flatnonzero(due)
                self.bundle.scaler.update(b.num[idx])
                x = self.bundle.design(b.num[idx], b.cat[idx])
                tr = b.treated[idx]
                click = (b.true_click if self.labels == "oracle" else b.clicked)[idx]
                if tr.any():
                    models["ctr"].learn(x[tr], click[tr].astype(float))
                    self._cal.push(b.num[idx][tr], b.cat[idx][tr], click[tr])
                    recalibrate = True
                    self._eval["ctr"].append((b.scores["ctr"][idx][tr], b.scores["ctr_logit"][idx][tr],
                                              click[tr]))
                b.trained[idx] = True
                self.bundle.n_treated += int(tr.sum())
                self.bundle.n_control += int((~tr).sum())
                self._count_arms(b.camp[idx], tr)
                self.live_summary.update(b.num[idx])
                self.examples += len(idx)
                self.since_snapshot += len(idx)
                self.totals["trained"] += len(idx)
                tmin, tmax = int(b.t[idx].min()), int(b.t[idx].max())
                self.t_min = tmin if self.t_min is None else min(self.t_min, tmin)
                self.t_max = tmax if self.t_max is None else max(self.t_max, tmax)
            if conv_due.any():
                # the usual case: both are due together, on the same design rows
                same = x is not None and np.array_equal(due, conv_due)
                self._train_conversion(b, np.flatnonzero(conv_due), clock, x if same else None)
        if recalibrate:
            self._calibrate()

    def _calibrate(self) -> None:
        """Refit the CTR calibration on the most recent ``calibration_window`` CTR outcomes, scored
        by the current model (scores from older models would mix in a model that no longer is)."""
        bn, bc, by = self._cal.view()
        self.bundle.calibrator.refit(self.bundle.raw_score("ctr", bn, bc), by)

    def _labels_now(self, b: _Block, idx, clock):
        """(interim label ỹ, observed label) of rows ``idx`` as of ``clock``."""
        if self.labels == "oracle":
            y = b.true_conv[idx].astype(float)
            return y, y
        seen = (b.conv_t[idx] >= 0) & (b.conv_t[idx] <= clock)
        p, lam = self._delay_for(b.camp[idx], b.treated[idx])
        elapsed_h = (clock - b.t[idx]) / HOUR_MS
        soft = interim_label(p, lam, elapsed_h, window=self.window / HOUR_MS)
        return np.where(seen, 1.0, soft), seen.astype(float)

    def _count_arms(self, camp, tr) -> None:
        n = len(self.campaigns)
        if len(self.arm_counts) < n:
            self.arm_counts = np.vstack([self.arm_counts, np.zeros((n - len(self.arm_counts), 2))])
        np.add.at(self.arm_counts, (camp, (~tr).astype(np.int64)), 1.0)

    def _arm_share(self, camp) -> np.ndarray:
        """e(x) = P(treatment arm | campaign): the campaign's counted share, shrunk towards the
        global share by ARM_PRIOR pseudo-decisions (the holdout is drawn by the serving system,
        per user or per decision, at a rate that may differ by campaign; it does not depend on
        the creative the policy chose, so the creative's propensity has no place in it)."""
        n = len(self.campaigns)
        if len(self.arm_counts) < n:
            self.arm_counts = np.vstack([self.arm_counts, np.zeros((n - len(self.arm_counts), 2))])
        g = self.bundle.treatment_share
        c = self.arm_counts[camp]
        return (c[:, 0] + ARM_PRIOR * g) / (c.sum(axis=1) + ARM_PRIOR)

    def _arm_weights(self, e, t):
        """(w, clipped): 1/e for treated rows, 1/(1 − e) for control rows, clipped at ``ipw_clip``."""
        raw = np.where(t > 0, 1.0 / np.maximum(e, 1e-9), 1.0 / np.maximum(1.0 - e, 1e-9))
        return np.minimum(raw, self.ipw_clip), raw > self.ipw_clip

    def _train_conversion(self, b: _Block, idx, clock, x=None) -> None:
        models = self.bundle.models
        if x is None:
            x = self.bundle.design(b.num[idx], b.cat[idx])
        y, observed = self._labels_now(b, idx, clock)
        tr = b.treated[idx]
        if tr.any():
            models["conversion"].learn(x[tr], y[tr])
            models["conversion_naive"].learn(x[tr], observed[tr])
        z = self.bundle.standardize(b.num[idx])
        phi, e, mu = self._uplift_update(b.cat[idx], z, y, tr, b.camp[idx])
        self._dr_add(b.cat[idx], z, phi, y, tr)
        b.y_interim[idx], b.phi_interim[idx], b.e_used[idx] = y, phi, e
        b.mu_used[idx] = mu
        b.conv_trained[idx] = True
        self.totals["conversion_trained"] += len(idx)
        if self.labels == "oracle":                  # the labels are final: into the ATE at once
            self._add_ate(b.camp[idx], tr, y, phi, mu)

    def _uplift_update(self, cat, z, y, tr, camp, phi=None):
        """φ for these rows (unless given), from the current μ, before they learn from them (as
        in cross-fitting: a row's own label does not enter its nuisance estimate); then one
        T-learner step (μ1 on the treated rows, μ0 on the control rows, unweighted: the arm's
        propensity is constant given the campaign and the creative's propensity does not bear on
        the arm) and one DR step of τ_dr on φ. Returns (φ, e, (μ1, μ0)) (e, μ: None if φ given)."""
        models = self.bundle.models
        b = self.bundle
        r1, r0 = b.rows("mu1", z, cat), b.rows("mu0", z, cat)
        e = mu = None
        if phi is None:
            e = self._arm_share(camp)
            t = tr.astype(float)
            w, clipped = self._arm_weights(e, t)
            m1, m0 = (models[n] for n in ("mu1", "mu0"))
            mu1 = _sigmoid(r1[0] @ m1.weights()[:r1[0].shape[1]] + m1.weights()[r1[1]].sum(axis=1) + m1.intercept)
            mu0 = _sigmoid(r0[0] @ m0.weights()[:r0[0].shape[1]] + m0.weights()[r0[1]].sum(axis=1) + m0.intercept)
            phi = mu1 - mu0 + t * w * (y - mu1) - (1 - t) * w * (y - mu0)
            self.clip_counts += (len(y), int(clipped.sum()))
            mu = np.column_stack([mu1, mu0])
        for name, (rz, ri), m in (("mu1", r1, tr), ("mu0", r0, ~tr)):
            if m.any():
                models[name].learn((rz[m], ri[m]), y[m])
        return phi, e, mu

    def _dr_add(self, cat, z, phi, y, tr, rows=True) -> None:
        """Add rows (one-hot effect modifiers, pseudo-outcome φ, label y, arm) to the sufficient
        statistics of τ_dr and τ_t; ``rows=False``: only a change of the φ and y of rows already
        added (a final label replacing an interim one: the least-squares fits are then exactly
        the fits on the final labels)."""
        idx = self.bundle.rows("tau_dr", z, cat)[1]
        new, first = np.unique(idx, return_index=True)
        keep = ~np.isin(new, self.dr_cols)
        new, first = new[keep], first[keep]
        if len(new):
            self.dr_cols = np.concatenate([self.dr_cols, new])
            self.t_field = np.concatenate([self.t_field, first % idx.shape[1]])
            k = len(self.dr_cols) + 1
            xtx, xty = np.zeros((k, k)), np.zeros(k)
            m = len(self.dr_xty)
            xtx[:m, :m], xty[:m] = self.dr_xtx, self.dr_xty
            self.dr_xtx, self.dr_xty = xtx, xty
            xtx1, ty = np.zeros((k, k)), np.zeros((2, k))
            xtx1[:m, :m], ty[:, :m] = self.t_xtx1, self.t_xty
            self.t_xtx1, self.t_xty = xtx1, ty
        order = np.argsort(self.dr_cols, kind="stable")
        j = order[np.searchsorted(self.dr_cols, idx, sorter=order)] + 1
        a = np.column_stack([np.zeros(len(j), np.int64), j])
        m = len(self.dr_xty)
        self.dr_xty += np.bincount(a.ravel(), weights=np.repeat(phi, a.shape[1]), minlength=m)
        for arm, sel in ((0, tr), (1, ~tr)):
            if sel.any():
                self.t_xty[arm] += np.bincount(a[sel].ravel(), weights=np.repeat(y[sel], a.shape[1]), minlength=m)
        if rows:
            k = a.shape[1]
            flat = (np.repeat(a, k, axis=1) * m + np.tile(a, (1, k)))
            self.dr_xtx += np.bincount(flat.ravel(), minlength=m * m).reshape(m, m)
            if tr.any():
                self.t_xtx1 += np.bincount(flat[tr].ravel(), minlength=m * m).reshape(m, m)
        self.dr_dirty = True

    def _dr_refresh(self, clock) -> None:
        """Held rows whose interim label moved (a conversion seen since, or the delay model's
        P(convert later) decayed): their φ in τ_dr's statistics follows it exactly (φ is linear in
        y), so τ_dr always fits the labels as they stand, not as they stood ``label_wait`` after
        each decision (a least-squares fit can be corrected; the μ models' SGD steps cannot)."""
        if self.labels == "oracle" or self.delay_params is None:
            return
        for b in self.blocks:
            idx = np.flatnonzero(b.conv_trained & ~b.done)
            if not len(idx):
                continue
            y, _ = self._labels_now(b, idx, clock)
            dy = y - b.y_interim[idx]
            moved = np.abs(dy) > 1e-3
            if not moved.any():
                continue
            idx, dy = idx[moved], dy[moved]
            t = b.treated[idx].astype(float)
            w, _ = self._arm_weights(b.e_used[idx], t)
            dphi = dy * w * (2 * t - 1)
            self._dr_add(b.cat[idx], self.bundle.standardize(b.num[idx]), dphi, dy, b.treated[idx], rows=False)
            b.y_interim[idx] += dy
            b.phi_interim[idx] += dphi

    def _dr_solve(self, eb: bool = False) -> None:
        """τ_dr = the ridge regression of φ on the effect modifiers (intercept not penalized),
        solved exactly from the sufficient statistics: a regression on pseudo-outcomes this noisy
        (|φ| up to 1/(1 − e) ≈ 10 for a holdout row) is what stochastic steps average worst."""
        if not self.dr_dirty or self.dr_xtx[0, 0] < 2:
            return
        a = self.dr_xtx + self.dr_ridge * np.diag(np.r_[0.0, np.ones(len(self.dr_cols))])
        beta = np.linalg.solve(a, self.dr_xty)
        m = self.bundle.models["tau_dr"]
        w = np.zeros(m.n_features)
        w[self.dr_cols] = beta[1:]
        m.model._weights = w
        m.model.intercept = float(beta[0])
        m.rows = int(self.dr_xtx[0, 0])
        self._t_solve(eb)
        self.dr_dirty = False

    def _t_solve(self, eb: bool = False) -> None:
        """τ_t: the T-learner's two outcome models on the effect modifiers, fitted jointly by
        ridge least squares on the labels as they stand (interim labels that follow each
        conversion as it arrives, then final labels): y = a + Σ β_j x_j + T·(c + Σ γ_j x_j),
        so μ0(x) = a + β·x, μ1(x) = μ0(x) + c + γ·x and τ_t(x) = c + γ·x. The cells' baselines
        β are learned from both arms (mostly the treated: 90 % of rows), the uplift terms γ from
        the difference; both are shrunk (``t_ridge``), γ towards a common effect c (a cell with
        few holdout rows gets its campaign's effect, not zero). Two separate per-arm fits would
        shrink the holdout's cells harder than the treated arm's and call the difference uplift.

        The penalties are per term kind (baseline, uplift) and effect modifier, by empirical
        Bayes: each is σ²/τ², with τ² the variance of that group's coefficients under the
        current fit (EM steps at each ``refit_every`` and at the end, from the last penalties,
        which start at ``t_ridge``, until they move by less than 0.1 %, at most T_EM_STEPS;
        σ² = ȳ(1 − ȳ)); ``t_empirical_bayes=False``: ``t_ridge`` throughout. A campaign's effect, measured on thousands of rows, is then
        hardly shrunk, while the many thin cross cells are pulled towards it."""
        a1 = self.t_xtx1
        a = self.dr_xtx                              # both arms
        k = len(a)
        if a1[0, 0] < 2 or a[0, 0] - a1[0, 0] < 2:
            return
        xtx = np.empty((2 * k, 2 * k))
        xtx[:k, :k], xtx[:k, k:], xtx[k:, :k], xtx[k:, k:] = a, a1, a1, a1
        xty = np.r_[self.t_xty[0] + self.t_xty[1], self.t_xty[0]]
        nf = len(self.bundle.effect_modifiers)
        if self.t_lam is None:
            self.t_lam = np.full((2, nf), self.t_ridge)
        ybar = min(max(xty[0] / a[0, 0], 1e-4), 1 - 1e-4)
        s2 = ybar * (1 - ybar)
        f = self.t_field
        for step in range(T_EM_STEPS if self.t_eb and eb else 0):
            inv = np.linalg.inv(xtx + np.diag(np.r_[0.0, self.t_lam[0][f], 0.0, self.t_lam[1][f]]))
            beta = inv @ xty
            post = s2 * np.diag(inv)
            old = self.t_lam.copy()
            for part, off in ((0, 1), (1, k + 1)):
                sq = beta[off:off + k - 1] ** 2 + post[off:off + k - 1]
                tau2 = np.bincount(f, weights=sq, minlength=nf) / np.maximum(np.bincount(f, minlength=nf), 1)
                self.t_lam[part] = np.clip(s2 / np.maximum(tau2, 1e-12), 1.0, 1e6)
            if np.max(np.abs(np.log(self.t_lam / old))) < 1e-3:
                break
        pen = np.r_[0.0, self.t_lam[0][f], 0.0, self.t_lam[1][f]]
        beta = np.linalg.solve(xtx + np.diag(pen), xty)
        m = self.bundle.models["tau_t"]
        w = np.zeros(m.n_features)
        w[self.dr_cols] = beta[k + 1:]
        m.model._weights = w
        m.model.intercept = float(beta[k])
        m.rows = int(a[0, 0])

    def _add_ate(self, camp, tr, y, phi, mu) -> None:
        """Per campaign sums for the average treatment effect, on final labels (ATE_SUMS)."""
        n = len(self.campaigns)
        if len(self.ate_sums) < n:
            self.ate_sums = np.vstack([self.ate_sums, np.zeros((n - len(self.ate_sums), len(ATE_SUMS)))])
        t = tr.astype(float)
        d = mu[:, 0] - mu[:, 1]
        r = np.where(tr, y - mu[:, 0], y - mu[:, 1])
        cols = np.column_stack([np.ones(len(y)), phi, phi * phi, d, d * d,
                                t, t * r, t * r * r, 1 - t, (1 - t) * r, (1 - t) * r * r])
        np.add.at(self.ate_sums, camp, cols)

    def ate(self, z: float = 1.96) -> dict:
        """Average treatment effect per campaign on its decisions with final labels, with a
        ``z`` (95 %) confidence interval: the augmented IPW estimate with self-normalized
        weights, mean(μ1 − μ0) + mean_T(y − μ1) − mean_C(y − μ0) (with the arm's share constant
        within a campaign this is the mean of the DR pseudo-outcomes φ with 1/e and 1/(1 − e)
        replaced by their empirical counterparts, so no weight needs clipping), and its standard
        error from the three terms' variances; ``ate_dr``: the plain mean of φ (clipped weights)."""
        out = {}
        names = {v: k for k, v in self.campaigns.items()}
        for c, row in enumerate(self.ate_sums):
            s = dict(zip(ATE_SUMS, row))
            n, n1, n0 = s["n"], s["n1"], s["n0"]
            if n < 2:
                continue
            md = s["d"] / n
            vd = max(s["d2"] / n - md * md, 0.0) / n
            if n1 < 2 or n0 < 2:
                est = se = float("nan")
            else:
                m1, m0 = s["r1"] / n1, s["r0"] / n0
                v1 = max(s["r1sq"] / n1 - m1 * m1, 0.0) / n1
                v0 = max(s["r0sq"] / n0 - m0 * m0, 0.0) / n0
                est, se = md + m1 - m0, math.sqrt(vd + v1 + v0)
            mphi = s["phi"] / n
            out[names.get(c, str(c))] = {
                "n": int(n), "n_treated": int(n1), "n_control": int(n0), "ate": est, "se": se,
                "lo": est - z * se, "hi": est + z * se, "ate_dr": mphi,
                "se_dr": math.sqrt(max(s["phi2"] / n - mphi * mphi, 0.0) / n)}
        return out

    def _finalize(self, clock) -> None:
        """Rows whose conversion window has closed: correct the delayed-feedback models from the
        interim to the final label; score the first-sight predictions against it."""
        if self.labels == "oracle":
            for b in self.blocks:
                b.done |= b.trained & b.conv_trained & (b.t + self.window <= clock)
            return
        models = self.bundle.models
        for b in self.blocks:
            due = ~b.done & (b.t + self.window <= clock)
            if not due.any():
                continue
            idx = np.flatnonzero(due & b.conv_trained)
            if len(idx):
                x = self.bundle.design(b.num[idx], b.cat[idx])
                y = ((b.conv_t[idx] >= 0) & (b.conv_t[idx] - b.t[idx] <= self.window)).astype(float)
                yi, tr = b.y_interim[idx], b.treated[idx]
                if tr.any():
                    models["conversion"].learn(x[tr], y[tr])
                t = tr.astype(float)
                w, _ = self._arm_weights(b.e_used[idx], t)
                phi_f = b.phi_interim[idx] + (y - yi) * w * (2 * t - 1)
                z = self.bundle.standardize(b.num[idx])
                self._uplift_update(b.cat[idx], z, y, tr, b.camp[idx], phi=phi_f)
                self._dr_add(b.cat[idx], z, phi_f - b.phi_interim[idx], y - yi, tr, rows=False)
                self._add_ate(b.camp[idx], tr, y, phi_f, b.mu_used[idx])
                self._eval["conversion"].append((b.scores["conversion"][idx][tr],
                                                 b.scores["conversion_naive"][idx][tr], y[tr]))
                self._eval["uplift"].append((b.scores["uplift"][idx], b.scores["uplift_dr"][idx], y, tr))
                self.corrections += len(idx)
            b.done[due] = True
            self.totals["finalized"] += int(due.sum())

    # ------------------------------------------------------------------ snapshots
    @staticmethod
    def _new_eval() -> dict:
        return {"ctr": [], "conversion": [], "uplift": []}

    def window_metrics(self) -> dict:
        """Prequential metrics over the examples labelled since the last snapshot."""
        m = {}
        if self._eval["ctr"]:
            p, s, y = (np.concatenate(a) for a in zip(*self._eval["ctr"]))
            m["ctr"] = {"n": int(len(y)), "log_loss": log_loss(p, y), "auc": auc(p, y),
                        "ece": ece(p, y), "ece_raw": ece(_sigmoid(s), y), "rate": float(y.mean()),
                        "mean_prediction": float(p.mean())}
        if self._eval["conversion"]:
            p, pn, y = (np.concatenate(a) for a in zip(*self._eval["conversion"]))
            m["conversion"] = {"n": int(len(y)), "log_loss": log_loss(p, y), "auc": auc(p, y),
                               "ece": ece(p, y), "auc_naive": auc(pn, y), "rate": float(y.mean())}
        up = {"identified": self.bundle.uplift_identified,
              "clipped_share": float(self.clip_counts[1] / self.clip_counts[0]) if self.clip_counts[0] else 0.0}
        if self._eval["uplift"]:
            u, ud, y, tr = (np.concatenate(a) for a in zip(*self._eval["uplift"]))
            ok = np.isfinite(u) & np.isfinite(ud)
            up.update({"n": int(len(y)), "n_scored": int(ok.sum()),
                       "qini": qini_coefficient(u[ok], y[ok], tr[ok]) if ok.any() else float("nan"),
                       "qini_dr": qini_coefficient(ud[ok], y[ok], tr[ok]) if ok.any() else float("nan"),
                       "mean_uplift": float(u[ok].mean()) if ok.any() else float("nan"),
                       "mean_uplift_dr": float(ud[ok].mean()) if ok.any() else float("nan")})
        m["uplift"] = up
        m["ate"] = self.ate()
        return m

    def warnings(self) -> list[str]:
        """What the current models cannot be trusted for (in each snapshot's metrics and manifest)."""
        out = []
        b = self.bundle
        if b.models["mu0"].rows == 0:
            out.append("uplift not identified: no holdout (control-arm) outcomes trained on, "
                       "uplift scores are missing (NaN)")
        if b.models["mu1"].rows == 0:
            out.append("uplift not identified: no treatment-arm outcomes trained on, "
                       "uplift scores are missing (NaN)")
        t = self.totals
        if t["trained"] and not t.get("clicks", 0) and self.labels == "delayed":
            out.append(f"no clicks seen for {t['trained']} decisions: the CTR model has only negatives")
        if t["trained"] and not t.get("conversions", 0) and self.labels == "delayed":
            out.append(f"no conversions seen for {t['trained']} decisions: the conversion and uplift models "
                       f"have only negatives and the delay model is its prior")
        if t["trained"] and not t["finalized"] and self.labels == "delayed":
            out.append("no decision has reached the end of its conversion window: every conversion label "
                       "so far is interim")
        n, k = self.clip_counts
        if k:
            out.append(f"inverse arm-propensity weights clipped at {self.ipw_clip:g} for {k / n:.1%} of the "
                       f"rows in this window (DR pseudo-outcomes; the ATE uses self-normalized weights)")
        return out

    def _snapshot(self, seq) -> Snapshot:
        self.version += 1
        metrics = self.window_metrics()
        warnings = self.warnings()
        metrics["warnings"] = warnings
        # reference: the window of the previous snapshot (the model being served while this
        # window's traffic arrived); the first snapshot has none
        d = 0.0 if self.ref_summary is None else drift(self.live_summary, self.ref_summary)
        if self.live_summary.n:
            self.ref_summary = self.live_summary
        metrics["drift"] = {"distance": d, "threshold": self.drift_threshold,
                            "examples": int(self.live_summary.n)}
        snap = Snapshot(model_id=self.model_id, version=self.version, clock=int(self.clock or 0),
                        seq=int(seq), feature_schema_version=self.bundle.encoder.version,
                        window_start=self.t_min, window_end=self.t_max, examples=self.examples,
                        corrections=self.corrections, metrics=_plain(metrics), drift=d,
                        safe=bool(d <= self.drift_threshold),
                        bundle=pickle.dumps(self.bundle, protocol=pickle.HIGHEST_PROTOCOL),
                        warnings=warnings)
        self.clip_counts = np.zeros(2)
        self.live_summary = FeatureSummary(self.bundle.encoder.n_numeric)
        self._eval = self._new_eval()
        self.since_snapshot = 0
        return snap

    # ------------------------------------------------------------------ state
    def pending(self) -> dict:
        """Rows scored but not (yet) trained, per stage."""
        return {"untrained": int(sum((~b.trained).sum() for b in self.blocks)),
                "conversion_untrained": int(sum((~b.conv_trained).sum() for b in self.blocks)),
                "open": int(sum((~b.done).sum() for b in self.blocks))}

    def snapshot(self) -> bytes:
        """The whole learner state (models, held rows, counters) in one blob."""
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    def state_parts(self) -> tuple[bytes, dict, list]:
        """The state as Flink keeps it, incrementally: ``(core, new parts, gone parts)``. The
        held rows' fixed fields (features, first-sight scores: ~90 % of the bytes) are one part
        per block, handed out once when new and named again only when the block retires; the
        core is the rest (models, labels and flags of held rows, counters).
        ``restore(core, parts)`` with every part handed out and not gone rebuilds the learner."""
        keys = {b.key for b in self.blocks}
        new = {b.key: pickle.dumps({k: b.__dict__[k] for k in _Block.FIXED}, protocol=pickle.HIGHEST_PROTOCOL)
               for b in self.blocks if b.key not in self._stored}
        gone = sorted(self._stored - keys)
        self._stored = keys
        fixed = [{k: b.__dict__.pop(k) for k in _Block.FIXED} for b in self.blocks]
        try:
            core = pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            for b, f in zip(self.blocks, fixed):
                b.__dict__.update(f)
        return core, new, gone

    @staticmethod
    def restore(blob: bytes, parts: dict | None = None) -> "OnlineLearner":
        """From :meth:`snapshot`, or from the core and parts of :meth:`state_parts`."""
        lrn = pickle.loads(blob)
        for b in lrn.blocks:
            if "num" not in b.__dict__:
                b.__dict__.update(pickle.loads(parts[b.key]))
        return lrn

    def state_digest(self) -> str:
        return self.bundle.digest()


def _plain(x):
    """JSON-safe copy (NaN -> None)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x
