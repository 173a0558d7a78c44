"""The outcomes engine: decisions joined to their clicks and conversions, with
survival-based delayed labels, cut into idempotent commit epochs, sharded by decision id.

Plain Python and numpy, no Flink. Three stages (:class:`udfs.stage.SliceStage`), which
``jobs/outcomes.py`` runs as keyed Flink operators and :class:`OutcomeEngine` runs in one
process::

    hand-off slice ─ split by hash(decision_id) ─► OutcomeShard × P    join, dedupe, windows;
                                                   │                   at each epoch: its rows (unlabelled)
                                                   │                   and the delay model's sufficient
                                                   │                   statistics
                      stats to every labeller, ────┤
                      rows to its own              ▼
                                                 EpochLabeller × P     sums the statistics of all shards,
                                                   │                   fits the delay model (the same fit
                                                   │                   in every labeller), labels its rows;
                                                   │                   the job writes their data files here
                                                   ▼
                                                 EpochCommitter × 1    one commit per epoch, once

The shards take the decisions the features job released (enriched, point-in-time),
the clicks and conversions it attributed, and its event-time clock (the watermark:
every event at or before it has been released), one *slice* at a time.

Per slice, in sequence order (out-of-order slices wait for their turn):

1. decisions join the held set; a decision id seen before is ``duplicate``;
2. outcomes (in the order ``(event_time, kind, event_id)``) update their
   decision's row; a redelivered event id is ``duplicate``, one outside its
   attribution window ``outside_window``; one whose decision is not held yet
   waits, and is ``unattributed`` once the clock has passed it (its decision,
   which is older, would have been released by then);
3. when the clock crosses a multiple of ``commit_every`` (or at end of input) an
   :class:`Epoch` is cut in every shard (the clock is the same in all): the delay model
   is refitted (new version) from the summed sufficient statistics of all shards (per
   campaign and arm: histograms in ``STAT_BIN_MS`` bins, counts and integer Σ ms per bin,
   of the converted rows' delays and of the other rows' censoring times, and the
   retired days' counts and delay histogram; :func:`fit_delay_models`), every held row
   is (re)labelled as of the clock, and the rows of each open decision day are emitted
   to replace that day's partition. Days whose every decision has passed its conversion
   window are then final and leave the held set; their counts stay in per-campaign-and-arm
   sufficient statistics for later fits. An epoch in which no shard holds or changed
   anything is skipped.

The epoch id is the clock of the cut: deterministic, strictly increasing, the
same on replay. A writer that skips epochs at or below the last committed one
is exactly-once (``stores/iceberg_store.py``).

Labels: ``final`` once ``clock - decision_time >= conversion_window`` (the
observed outcome); else ``interim``: 1 if a conversion arrived, otherwise
``P(conversion within W | none after e)`` from the delay model of the row's campaign
with its arm's ``p`` (:meth:`udfs.delay.DelayModel.interim_label` with ``window=W``;
exponential or Weibull delays, chosen per campaign).

>>> import pandas as pd
>>> H = 3_600_000
>>> eng = OutcomeEngine(conversion_window="2h", commit_every="1h")
>>> dec = pd.DataFrame({"decision_id": ["d1", "d2"], "event_time": [0, 10], "campaign_id": ["c", "c"]})
>>> conv = pd.DataFrame({"event_id": ["v1"], "decision_id": ["d1"], "kind": ["conversion"],
...                      "event_time": [30 * 60_000], "value": [5.0]})
>>> [e.epoch for e in eng.offer(0, dec, conv, clock=H)]
[3600000]
>>> e = eng.offer(1, None, None, clock=3 * H)[0]
>>> e.outcomes.to_pandas()[["decision_id", "label_status", "converted", "conversion_label"]].values.tolist()
[['d1', 'final', True, 1.0], ['d2', 'final', False, 0.0]]
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from schemas import table_contract
from udfs.delay import HOUR_MS, logit, shrinkage_precisions, make_model, select_family
from udfs.keys import id_hash, shard_of
from udfs.spec import parse_duration
from udfs.stage import SliceStage

__all__ = ["stream_warnings", "OutcomeEngine", "OutcomeShard", "EpochLabeller", "EpochCommitter", "Epoch", "EpochPart",
           "LabelledPart", "split_handoff", "fit_delay_models", "DAY_MS", "DECISION_COLUMNS", "STAT_BIN_MS"]

DAY_MS = parse_duration("1d")      # day partitions (UTC days since the epoch, as Iceberg's day transform)
_KIND_RANK = {"click": 0, "conversion": 1}
GLOBAL = "*"
#: censoring times of open decisions are summed per campaign in bins of this width for the fit
STAT_BIN_MS = 60_000

_OUT = table_contract("outcome")
#: decision attributes carried into the outcome rows (from the enriched decisions)
DECISION_COLUMNS = ["decision_id", "event_time", "user_id", "campaign_id", "creative_id", "placement",
                    "device", "region", "arm", "propensity", "policy_id", "model_version",
                    "feature_schema_version"]
_DEFAULTS = {"user_id": "", "creative_id": "", "placement": "", "device": "", "region": "",
             "arm": "treatment", "propensity": 1.0, "policy_id": "", "model_version": "",
             "feature_schema_version": 1}
_MUTABLE = {"clicks": np.int64, "first_click_time": np.int64, "conversions": np.int64,
            "first_conversion_time": np.int64, "conversion_value": np.float64}


@dataclass
class Epoch:
    """One commit: the rows replacing the open day partitions, the delay-model fit, quarantine."""
    epoch: int                          # event-time clock of the cut (epoch ms): the commit id
    seq: int                            # last input slice included
    outcomes: pa.Table                  # every row of ``days`` (outcomes_v1 schema)
    days: list                          # day numbers (ms // DAY_MS) whose partitions are replaced
    delay_models: pa.Table              # delay_models_v1 rows of this fit
    quarantine: pa.Table                # quarantine_v1 rows since the previous epoch
    counts: dict = field(default_factory=dict)
    files: list = field(default_factory=list)   # data files the job's labellers wrote (outcomes then None)


def _decision_schema() -> pa.Schema:
    out = _OUT.arrow_schema()
    types = {"event_time": pa.int64()}
    return pa.schema([pa.field(c, types.get(c, out.field(c).type if c in out.names else pa.string()))
                      for c in DECISION_COLUMNS])


_DEC_SCHEMA = _decision_schema()


def _as_decision_table(df) -> pa.Table:
    """Enriched decisions (pandas or Arrow) -> the carried columns, defaults for missing ones."""
    tbl = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    n = tbl.num_rows
    cols = []
    for f in _DEC_SCHEMA:
        if f.name in tbl.column_names:
            cols.append(tbl.column(f.name).cast(f.type))
        else:
            cols.append(pa.array([_DEFAULTS[f.name]] * n, f.type))
    return pa.Table.from_arrays(cols, schema=_DEC_SCHEMA)


@dataclass
class HandoffPart:
    """One shard's part of a hand-off slice."""
    seq: int
    decisions: object          # pa.Table / pd.DataFrame of enriched decisions, or None
    outcomes: object           # pd.DataFrame of attributed outcomes, or None
    clock: int | None
    final: bool
    quarantined: list          # the features job's quarantine of the slice (shard 0 only)


def split_handoff(seq, decisions, outcomes, clock, final=False, quarantined=(), shards: int = 1) -> list:
    """One :class:`HandoffPart` per shard, by ``hash(decision_id)``; every shard gets the clock."""
    parts = [HandoffPart(seq, None, None, clock, final, list(quarantined) if i == 0 else [])
             for i in range(shards)]
    if shards == 1:
        parts[0].decisions, parts[0].outcomes = decisions, outcomes
        return parts
    if decisions is not None and len(decisions):
        tbl = decisions if isinstance(decisions, pa.Table) else pa.Table.from_pandas(decisions, preserve_index=False)
        s = shard_of(id_hash(tbl.column("decision_id").to_numpy(zero_copy_only=False)), shards)
        for i in range(shards):
            parts[i].decisions = tbl.filter(pa.array(s == i))
    if outcomes is not None and len(outcomes):
        s = shard_of(id_hash(outcomes["decision_id"].to_numpy(object)), shards)
        for i in range(shards):
            parts[i].outcomes = outcomes[s == i].reset_index(drop=True)
    return parts


@dataclass
class EpochPart:
    """What one shard cut at one epoch."""
    index: int                 # the cut's number (every shard cuts at the same slices)
    epoch: int                 # the clock of the cut: the commit id
    seq: int
    shard: int
    active: bool               # held rows, or changes since the previous cut
    stats: dict                # the delay model's sufficient statistics (per (campaign, arm))
    rows: pa.Table | None      # held rows, every outcomes_v1 column but the label's two
    quarantine: list           # (job, seq, stream, reason, record, id) since the previous cut
    counts: dict


@dataclass
class LabelledPart:
    """One shard's labelled rows of one epoch (or, in the job, the data files holding them)."""
    index: int
    epoch: int
    seq: int
    shard: int
    skip: bool
    outcomes: pa.Table | None = None
    days: list = field(default_factory=list)
    delay_models: pa.Table | None = None     # the fit (the same in every labeller; sent by shard 0)
    quarantine: pa.Table | None = None
    counts: dict = field(default_factory=dict)
    files: list = field(default_factory=list)   # data files written by the job (then outcomes is None)


_EMPTY_HIST = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
_EMPTY_STAT = {"held": 0, "final": 0, "conv_n": 0, "conv_delay_ms": 0, "conv_hist": _EMPTY_HIST,
               "open_hist": _EMPTY_HIST, "retired": (0, 0, 0), "retired_hist": _EMPTY_HIST}


def _hist(ms) -> tuple:
    """Integer histogram of durations (ms) in ``STAT_BIN_MS`` bins: (bins, counts, Σ ms per bin)."""
    ms = np.asarray(ms, np.int64)
    ub, inv = np.unique(ms // STAT_BIN_MS, return_inverse=True)
    tot = np.zeros(len(ub), np.int64)
    np.add.at(tot, inv, ms)
    return ub.astype(np.int64), np.bincount(inv, minlength=len(ub)).astype(np.int64), tot


def _merge_hist(*hists) -> tuple:
    """Sum of histograms (integers: the same in any order)."""
    hists = [h for h in hists if len(h[0])]
    if not hists:
        return _EMPTY_HIST
    if len(hists) == 1:
        return hists[0]
    bins = np.concatenate([h[0] for h in hists])
    ub, inv = np.unique(bins, return_inverse=True)
    n = np.zeros(len(ub), np.int64)
    ms = np.zeros(len(ub), np.int64)
    np.add.at(n, inv, np.concatenate([h[1] for h in hists]))
    np.add.at(ms, inv, np.concatenate([h[2] for h in hists]))
    return ub.astype(np.int64), n, ms


def merge_stats(parts: list) -> dict:
    """Sum the shards' statistics, keyed by ``(campaign, arm)`` (integers only: the same sums
    in any order)."""
    out = {}
    for stats in parts:
        for key, s in stats.items():
            m = out.setdefault(key, dict(_EMPTY_STAT))
            for k in ("held", "final", "conv_n", "conv_delay_ms"):
                m[k] = m[k] + s[k]
            m["retired"] = tuple(a + b for a, b in zip(m["retired"], s["retired"]))
            for k in ("conv_hist", "open_hist", "retired_hist"):
                m[k] = _merge_hist(m[k], s[k])
    return out


def _fit_data(stats: dict, keys: list, strata: dict, W_h: float) -> list:
    """(converted, delay_h, elapsed_h, weight, stratum) rows of the summed statistics of ``keys``:
    one row per histogram bin (its mean duration), the retired non-converted censored at W."""
    parts = []
    for key in keys:
        s = stats[key]
        st = strata.get(key, 0)
        cb, cn, cms = _merge_hist(s["conv_hist"], s["retired_hist"])
        if len(cn):
            parts.append((np.ones(len(cn), bool), cms / cn / HOUR_MS, np.full(len(cn), W_h), cn, st))
        ob, on, oms = s["open_hist"]
        if len(on):
            parts.append((np.zeros(len(on), bool), np.zeros(len(on)), oms / on / HOUR_MS, on, st))
        non = s["retired"][0]
        if non:
            parts.append((np.zeros(1, bool), np.zeros(1), np.full(1, W_h), np.array([non]), st))
    if not parts:
        return [np.zeros(0, bool), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0, np.int64)]
    return [np.concatenate([x[0] for x in parts]), np.concatenate([x[1] for x in parts]),
            np.concatenate([x[2] for x in parts]), np.concatenate([x[3] for x in parts]).astype(float),
            np.concatenate([np.full(len(x[0]), x[4], np.int64) for x in parts])]


def _init(previous: dict, key, what: str):
    m = previous.get(key)
    return getattr(m, "inits_", {}).get(what)


#: the global delay fit's weak prior: a mean delay of W / 4 (4 means per window: ~2 % of an exponential's
#: delays beyond the attribution window), worth 1 pseudo-observation on log λ
DELAY_PRIOR_MEANS_PER_WINDOW = 4.0
DELAY_PRIOR_PRECISION = 1.0


def fit_delay_models(stats: dict, previous: dict, prior_strength: float, window_ms: int, version: int,
                     clock: int, families=("exponential", "weibull")) -> tuple[dict, pa.Table]:
    """Delay models from the summed statistics (keys ``(campaign, arm)``); returns
    ``{campaign or "*": DelayModel}`` and their delay_models_v1 rows.

    * ``"*"``: the global fit (one ``p``), of the family with the lowest AIC;
    * per campaign: ``p`` per arm (the strata, in sorted order: ``model.arms_``) and one latency
      distribution (the delay of a conversion is the campaign's, the arm changes whether it
      happens). The family is chosen by AIC on the campaign's unpooled fits (exponential by
      default, :func:`udfs.delay.select_family`); the model is then refitted with a Normal prior
      on ``logit p`` and ``log λ`` centred on the global fit of that family, of precision at most
      ``prior_strength`` pseudo-observations, less when the campaigns differ by more than their
      noise (:func:`udfs.delay.between_precision`).

    Every fit is Newton's method to a tolerance, warm-started from ``previous``.
    """
    W_h = window_ms / HOUR_MS
    keys = sorted(stats)
    camps = sorted({c for c, _ in keys})
    g_data = _fit_data(stats, keys, {}, W_h)
    # A weak prior on the global delay scale (mean delay W/4, DELAY_PRIOR_PRECISION pseudo-observations
    # on log λ): early in a stream every decision is young and only p·λ is identified; without it the
    # first epochs' fits ran to p = 1 with a mean delay of ~1000 h, and their interim labels to 3× the
    # rate (caught by the per-epoch data-quality check). With matured data its pull vanishes.
    g_prior = {"prior": (0.0, float(np.log(DELAY_PRIOR_MEANS_PER_WINDOW / W_h))),
               "prior_precision": (0.0, DELAY_PRIOR_PRECISION)} if np.any(g_data[0]) else {}
    g_fits = {f: make_model(f, **g_prior).fit(*g_data[:4], init=_init(previous, GLOBAL, ("global", f)))
              for f in families}
    g = g_fits[select_family(g_fits)]
    g.inits_ = {("global", f): m.theta_ for f, m in g_fits.items()}
    g.arms_ = []
    fits = {GLOBAL: g}
    alone, data = {}, {}
    for c in camps:
        ck = [k for k in keys if k[0] == c]
        strata = {k: i for i, k in enumerate(ck)}
        data[c] = (_fit_data(stats, ck, strata, W_h), [a for _, a in ck])
        d = data[c][0]
        alone[c] = {f: make_model(f).fit(*d[:4], strata=d[4], init=_init(previous, c, ("alone", f)))
                    for f in families}
    # how much the campaigns really differ, from their unpooled fits (exponential: λ comparable)
    prec = shrinkage_precisions([a.get("exponential", next(iter(a.values()))) for a in alone.values()],
                                prior_strength)
    for c in camps:
        d, arms = data[c]
        inits = {("alone", f): m.theta_ for f, m in alone[c].items()}
        if g.n_converted_ == 0 or not alone[c]:
            m = g
        else:
            fam = select_family(alone[c])
            gf = g_fits[fam]
            prior = (logit(gf.p_), float(np.log(gf.lam_)))
            init = _init(previous, c, ("shrunk", fam))
            m = make_model(fam, prior=prior, prior_precision=prec).fit(
                *d[:4], strata=d[4], init=init if init is not None else alone[c][fam].theta_)
            inits[("shrunk", fam)] = m.theta_
        if m is not g:
            m.inits_, m.arms_ = inits, arms
        fits[c] = m
    rows = []
    for c, f in fits.items():
        shape = float(f.k_) if f.family == "weibull" else None
        common = {"version": version, "fitted_at": clock * 1000, "delay_rate_per_hour": f.lam_,
                  "mean_delay_hours": f.mean_delay(), "family": f.family, "weibull_shape": shape, "epoch": clock}
        if c == GLOBAL or f is g:
            cs = keys if c == GLOBAL else [k for k in keys if k[0] == c]
            matured = sum(stats[k]["final"] + stats[k]["retired"][0] + stats[k]["retired"][1] for k in cs)
            rows.append({"model_key": f"{version}|{c}", "campaign_id": c, "arm": None,
                         "conversion_prob": f.p_, "decisions": f.n_ if c == GLOBAL else
                         sum(stats[k]["held"] + stats[k]["retired"][0] + stats[k]["retired"][1] for k in cs),
                         "conversions": f.n_converted_ if c == GLOBAL else
                         sum(stats[k]["conv_n"] + stats[k]["retired"][1] for k in cs),
                         "matured_decisions": matured, **common})
            continue
        for s, arm in enumerate(f.arms_):
            st = stats[(c, arm)]
            rows.append({"model_key": f"{version}|{c}|{arm}", "campaign_id": c, "arm": arm,
                         "conversion_prob": float(f.p_by_[s]), "decisions": int(f.n_by_[s]),
                         "conversions": int(f.n_converted_by_[s]),
                         "matured_decisions": st["final"] + st["retired"][0] + st["retired"][1], **common})
    return fits, pa.Table.from_pylist(rows, schema=table_contract("delay_model").arrow_schema())


def stream_warnings(outcomes: pa.Table, totals: dict | None = None, tiny_propensity: float = 1e-3) -> list[str]:
    """What an outcome table (``outcomes_v1``: arm, label_status, campaign_id, creative_id,
    propensity) and the engine's totals say the analyst cannot rely on: a degenerate stream
    runs to completion, and says so.

    >>> t = pa.table({"arm": ["treatment"], "label_status": ["interim"], "campaign_id": ["c"],
    ...               "creative_id": ["k"], "propensity": [1e-5]})
    >>> [w.split(":")[0] for w in stream_warnings(t, {"processed": {"decision": 1}})]
    ['no clicks', 'no conversions', 'no holdout', 'no final labels', 'a single campaign', 'a single creative', 'tiny propensities']
    """
    import pyarrow.compute as pc

    out = []
    n = outcomes.num_rows
    if not n:
        return ["no decisions: the outcome table is empty"]
    proc = (totals or {}).get("processed", {})
    if not proc.get("click", 0):
        out.append(f"no clicks: none of {n} decisions was clicked; click rates and the CTR model have only negatives")
    if not proc.get("conversion", 0):
        out.append(f"no conversions: none of {n} decisions converted; the delay models are their prior and "
                   f"every label is 0 or the prior's interim value")
    arm = outcomes.column("arm")
    if not pc.sum(pc.equal(arm, "control")).as_py():
        out.append("no holdout: no control-arm decision; uplift and treatment effects are not identified")
    if not pc.sum(pc.equal(arm, "treatment")).as_py():
        out.append("no treatment: no treatment-arm decision; uplift and treatment effects are not identified")
    if not pc.sum(pc.equal(outcomes.column("label_status"), "final")).as_py():
        out.append("no final labels: no decision's conversion window has closed; every label is interim")
    if pc.count_distinct(outcomes.column("campaign_id")).as_py() == 1:
        out.append("a single campaign: the delay model's shrinkage has no other campaign to pool with")
    if pc.count_distinct(outcomes.column("creative_id")).as_py() == 1:
        out.append("a single creative: a policy over creatives cannot be evaluated off-policy")
    low = pc.min(outcomes.column("propensity")).as_py()
    if low is not None and low < tiny_propensity:
        share = pc.mean(pc.cast(pc.less(outcomes.column("propensity"), tiny_propensity), pa.float64())).as_py()
        out.append(f"tiny propensities: {share:.1%} of decisions logged below {tiny_propensity:g} (lowest {low:.3g}); "
                   f"inverse-propensity weights up to {1 / low:.3g}, off-policy estimates will be heavy-tailed")
    return out


def quarantine_table(entries: list, clock: int) -> pa.Table:
    rows = [{"quarantine_id": qid, "job": job, "seq": seq, "stream": stream, "reason": reason,
             "reason_kind": reason.split(":", 1)[0], "record": record, "epoch": clock}
            for job, seq, stream, reason, record, qid in sorted(entries, key=lambda q: q[5])]
    return pa.Table.from_pylist(rows, schema=table_contract("quarantine").arrow_schema())


class OutcomeShard(SliceStage):
    """The held decisions of one shard (``hash(decision_id)``), their outcomes, and epoch cuts."""

    def __init__(self, click_window="1h", conversion_window="7d", commit_every="1d", shard: int = 0,
                 shards: int = 1, snapshot_every: int = 4):
        super().__init__(parts=1, snapshot_every=snapshot_every)
        self.click_window = click_window
        self.conversion_window = conversion_window
        self.commit_every = commit_every
        self.shard, self.shards = int(shard), int(shards)

        self._windows = {"click": parse_duration(click_window), "conversion": parse_duration(conversion_window)}
        self._W = self._windows["conversion"]
        self._every = parse_duration(commit_every)

        # held decisions: their carried columns as Arrow (consolidated at each epoch) and,
        # per row, numpy arrays: event time, campaign code, and the outcome counters
        self.held = _DEC_SCHEMA.empty_table()
        self.new_chunks: list[pa.Table] = []
        self.t = np.zeros(0, np.int64)
        self.camp = np.zeros(0, np.int32)
        self.campaigns: list[str] = []               # campaign code -> id
        self._camp_code: dict[str, int] = {}
        self.mut = {c: np.zeros(0, t) for c, t in _MUTABLE.items()}
        self.index: dict[str, int] = {}              # decision_id -> row
        self.seen: dict[str, int] = {}               # outcome event id -> its decision's time
        self.orphans: list[tuple] = []               # outcomes whose decision is not held (yet)
        self.quarantine: list[tuple] = []            # (job, seq, stream, reason, record, id) since last cut
        self._qcount: dict[str, int] = {}
        # (campaign, arm) -> (non-converted, converted, Σ delay ms, delay histogram) of retired days
        self.final_stats: dict[tuple, tuple] = {}
        self.clock: int | None = None
        self.last_epoch: int | None = None
        self.cuts = 0
        self.dirty = False                           # changes not yet in an epoch
        self.totals = {"in": {}, "processed": {}, "quarantined": {}}

    def _params(self) -> dict:
        return {"click_window": self.click_window, "conversion_window": self.conversion_window,
                "commit_every": self.commit_every, "shard": self.shard, "shards": self.shards,
                "snapshot_every": self.snapshot_every}

    def _check_restore(self, stored: dict) -> None:
        self._require_same(stored, ("shard", "shards", "conversion_window", "click_window", "commit_every"))

    # ------------------------------------------------------------------ input
    def _take(self, seq: int, payloads: list) -> list:
        p: HandoffPart = payloads[0]
        return self._process(seq, p.decisions, p.outcomes, p.clock, p.final, p.quarantined)

    def _finish(self) -> list:
        """End of input: a last cut in every shard (the labeller skips it if nothing changed)."""
        return [self._cut(self.next_seq - 1)] if self.clock is not None else []

    def _count(self, what: str, key: str, n: int = 1) -> None:
        d = self.totals[what]
        d[key] = d.get(key, 0) + n

    def _quarantine(self, seq, stream, reason, record, job="outcomes", ident="") -> None:
        base = f"{job}:{seq}:{stream}:{ident}"
        n = self._qcount.get(base, 0)
        self._qcount[base] = n + 1
        self.quarantine.append((job, seq, stream, reason, record, f"{base}:{n}"))
        if job == "outcomes":
            self._count("quarantined", reason.split(":", 1)[0])
        self.dirty = True

    def _process(self, seq, decisions, outcomes, clock, final, quarantined) -> list:
        for i, (stream, reason, record) in enumerate(quarantined):
            self._quarantine(seq, stream, reason, record, job="features", ident=f"{i:07d}")
        if decisions is not None and len(decisions):
            self._add_decisions(seq, decisions)
        if outcomes is not None and len(outcomes):
            o = outcomes.sort_values(["event_time", "kind", "event_id"], kind="stable",
                                     key=lambda c: c.map(_KIND_RANK) if c.name == "kind" else c)
            for kind, n in o["kind"].value_counts().items():
                self._count("in", kind, int(n))
            self.orphans.extend(zip(o["event_time"].tolist(), o["kind"].map(_KIND_RANK).tolist(),
                                    o["event_id"].tolist(), o["kind"].tolist(), o["decision_id"].tolist(),
                                    (o["value"] if "value" in o else pd.Series(0.0, index=o.index))
                                    .fillna(0.0).tolist()))
        if clock is not None and (self.clock is None or clock > self.clock):
            self.clock = int(clock)
        self._join(seq)
        if self.clock is not None:
            crossed = self.last_epoch is None or self.clock // self._every > self.last_epoch // self._every
            if final or crossed:
                return [self._cut(seq)]
        return []

    def _add_decisions(self, seq, df) -> None:
        # canonical order, whatever the input's: the same rows give the same fits to the last bit
        tbl = _as_decision_table(df).sort_by([("event_time", "ascending"), ("decision_id", "ascending")])
        ids = tbl.column("decision_id").to_pylist()
        self._count("in", "decision", len(ids))
        index = self.index
        fresh = np.ones(len(ids), bool)
        distinct = set(ids)
        if len(distinct) < len(ids) or not index.keys().isdisjoint(distinct):   # rare: find them
            batch = set()
            for i, d in enumerate(ids):
                if d in index or d in batch:
                    fresh[i] = False
                else:
                    batch.add(d)
        if not fresh.all():
            for i in np.flatnonzero(~fresh).tolist():
                self._quarantine(seq, "decision", "duplicate", _record_json(tbl.slice(i, 1).to_pylist()[0]),
                                 ident=ids[i])
            tbl = tbl.filter(pa.array(fresh))
            ids = [d for d, f in zip(ids, fresh) if f]
        n = len(ids)
        if not n:
            return
        base = len(self.t)
        self.new_chunks.append(tbl)
        self.t = np.concatenate([self.t, tbl.column("event_time").to_numpy()])
        enc = tbl.column("campaign_id").combine_chunks().dictionary_encode()
        local = []
        for c in enc.dictionary.to_pylist():
            if c not in self._camp_code:
                self._camp_code[c] = len(self.campaigns)
                self.campaigns.append(c)
            local.append(self._camp_code[c])
        codes = np.array(local, np.int32)[enc.indices.to_numpy()] if local else np.zeros(0, np.int32)
        self.camp = np.concatenate([self.camp, codes])
        for c, typ in _MUTABLE.items():
            self.mut[c] = np.concatenate([self.mut[c], np.full(n, -1, typ) if c.startswith("first_")
                                          else np.zeros(n, typ)])
        index.update(zip(ids, range(base, base + n)))
        self._count("processed", "decision", n)
        self.dirty = True

    def _join(self, seq) -> None:
        """Apply waiting outcomes whose decision is held; give up on those the clock has passed."""
        if not self.orphans:
            return
        self.orphans.sort()
        keep = []
        for t, _, eid, kind, did, value in self.orphans:
            at = self.index.get(did)
            if at is None:
                if self.clock is not None and t <= self.clock:
                    self._quarantine(seq, kind, "unattributed", _outcome_json(eid, did, kind, t, value), ident=eid)
                else:
                    keep.append((t, _KIND_RANK[kind], eid, kind, did, value))
                continue
            if eid in self.seen:
                self._quarantine(seq, kind, "duplicate", _outcome_json(eid, did, kind, t, value), ident=eid)
                continue
            ch, i = self.mut, at
            t_d = int(self.t[i])
            if not 0 <= t - t_d <= self._windows[kind]:
                self._quarantine(seq, kind, "outside_window", _outcome_json(eid, did, kind, t, value), ident=eid)
                continue
            self.seen[eid] = t_d
            if kind == "click":
                ch["clicks"][i] += 1
                if ch["first_click_time"][i] < 0 or t < ch["first_click_time"][i]:
                    ch["first_click_time"][i] = t
            else:
                ch["conversions"][i] += 1
                ch["conversion_value"][i] += value
                if ch["first_conversion_time"][i] < 0 or t < ch["first_conversion_time"][i]:
                    ch["first_conversion_time"][i] = t
            self._count("processed", kind)
            self.dirty = True
        self.orphans = keep

    # ------------------------------------------------------------------ epochs
    def _consolidate(self) -> pa.Table:
        if self.new_chunks:
            self.held = pa.concat_tables([self.held, *self.new_chunks]).combine_chunks()
            self.new_chunks = []
        return self.held

    def _cut(self, seq: int) -> EpochPart:
        clock = self.clock
        held = self._consolidate()
        t, mut = self.t, self.mut
        elapsed = np.minimum(clock - t, self._W)
        final = clock - t >= self._W
        converted = mut["conversions"] > 0
        delay_ms = np.where(converted, mut["first_conversion_time"] - t, 0)
        # relabelling at the clock of the previous cut changes nothing (a flush after a final slice)
        active = bool(self.dirty or (len(t) and clock != self.last_epoch))
        arm = held.column("arm").to_numpy(zero_copy_only=False)
        stats = self._stats(converted, delay_ms, elapsed, final, arm)
        rows = self._rows(held, elapsed, final, converted, clock)
        counts = {"rows": len(t), "interim": int((~final).sum()), "final": int(final.sum()),
                  "quarantined": len(self.quarantine)}
        part = EpochPart(index=self.cuts, epoch=clock, seq=seq, shard=self.shard, active=active, stats=stats,
                         rows=rows, quarantine=self.quarantine, counts=counts)
        # days whose conversion windows have all closed leave the held set
        day = t // DAY_MS
        closed = (day + 1) * DAY_MS + self._W <= clock
        if closed.any():
            self._retire(closed, converted, delay_ms, arm)
        counts["held_after"] = len(self.t)
        counts["totals"] = {k: dict(v) for k, v in self.totals.items()}
        counts["totals"]["pending"] = len(self.orphans)
        self.cuts += 1
        self.last_epoch = clock
        self.quarantine = []
        self._qcount = {}
        self.dirty = False
        return part

    def _groups(self, arm) -> tuple:
        """Per held row, the code of its (campaign, arm), and the keys of the codes (sorted)."""
        arms, arm_code = np.unique(np.asarray(arm, dtype=object).astype(str), return_inverse=True)
        code = self.camp.astype(np.int64) * len(arms) + arm_code
        ucode, inv = np.unique(code, return_inverse=True)
        keys = [(self.campaigns[int(u) // len(arms)], str(arms[int(u) % len(arms)])) for u in ucode]
        return keys, inv

    def _stats(self, converted, delay_ms, elapsed, final, arm) -> dict:
        """Per (campaign, arm): counts, a histogram of the converted rows' delays and one of the
        open rows' censoring times (``STAT_BIN_MS`` bins: counts and Σ ms), the retired days' counts
        and delay histogram. Integers only."""
        out = {}
        keys, inv = self._groups(arm) if len(self.t) else ([], np.zeros(0, np.int64))
        for i, key in enumerate(keys):
            m = inv == i
            conv, open_ = converted & m, ~converted & m
            out[key] = {
                "held": int(m.sum()), "final": int((final & m).sum()), "conv_n": int(conv.sum()),
                "conv_delay_ms": int(delay_ms[conv].sum()), "conv_hist": _hist(delay_ms[conv]),
                "open_hist": _hist(elapsed[open_]), "retired": (0, 0, 0), "retired_hist": _EMPTY_HIST}
        for key in sorted(self.final_stats):
            non, nc, dms, hist = self.final_stats[key]
            s = out.setdefault(key, dict(_EMPTY_STAT))
            s["retired"], s["retired_hist"] = (non, nc, dms), hist
        return out

    def _rows(self, held, elapsed, final, converted, clock) -> pa.Table:
        def ts(ms, nullable=False):
            return pa.array(ms.astype(np.int64) * 1000, pa.timestamp("us", tz="UTC"),
                            mask=(ms < 0) if nullable else None)

        mut = self.mut
        data = {c: held.column(c) for c in DECISION_COLUMNS if c != "event_time"}
        data.update({
            "decision_time": ts(self.t),
            "clicked": pa.array(mut["clicks"] > 0), "clicks": pa.array(mut["clicks"]),
            "first_click_time": ts(mut["first_click_time"], True),
            "converted": pa.array(converted), "conversions": pa.array(mut["conversions"]),
            "first_conversion_time": ts(mut["first_conversion_time"], True),
            "conversion_value": pa.array(mut["conversion_value"]),
            "elapsed_ms": pa.array(elapsed.astype(np.int64)),
            "label_status": pa.DictionaryArray.from_arrays(pa.array(final.astype(np.int8)),
                                                           pa.array(["interim", "final"])).cast(pa.string()),
            "epoch": pa.array(np.full(len(self.t), clock, np.int64)),
        })
        return pa.table(data)

    def _retire(self, closed, converted, delay_ms, arm) -> None:
        t, camp = self.t, self.camp
        keys, inv = self._groups(arm)
        for i in np.unique(inv[closed]).tolist():
            m = closed & (inv == i)
            old = self.final_stats.get(keys[i], (0, 0, 0, _EMPTY_HIST))
            nc = int(converted[m].sum())
            self.final_stats[keys[i]] = (old[0] + int(m.sum()) - nc, old[1] + nc,
                                         old[2] + int(delay_ms[m & converted].sum()),
                                         _merge_hist(old[3], _hist(delay_ms[m & converted])))
        clock = self.clock
        for eid in [e for e, td in self.seen.items() if (td // DAY_MS + 1) * DAY_MS + self._W <= clock]:
            del self.seen[eid]
        keep = ~closed
        self.held = self.held.filter(pa.array(keep))
        self.t, self.camp = t[keep], camp[keep]
        self.mut = {c: v[keep] for c, v in self.mut.items()}
        self.index = dict(zip(self.held.column("decision_id").to_pylist(), range(len(self.t))))

    # ------------------------------------------------------------------ state
    def _core(self):
        held = self._consolidate()
        tbl = held.append_column("t", pa.array(self.t)).append_column("camp", pa.array(self.camp))
        for c, v in self.mut.items():
            tbl = tbl.append_column(f"mut:{c}", pa.array(v))
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, tbl.schema) as w:
            w.write_table(tbl)
        meta = {k: getattr(self, k) for k in ("seen", "orphans", "quarantine", "_qcount", "final_stats", "clock",
                                              "last_epoch", "cuts", "dirty", "totals", "campaigns")}
        return {"rows": sink.getvalue(), "meta": meta}

    def _load_core(self, core, parts) -> None:
        for k, v in core["meta"].items():
            setattr(self, k, v)
        tbl = pa.ipc.open_stream(core["rows"]).read_all()
        self._camp_code = {c: k for k, c in enumerate(self.campaigns)}
        self.held = tbl.select(DECISION_COLUMNS)
        self.t = tbl.column("t").to_numpy().astype(np.int64)
        self.camp = tbl.column("camp").to_numpy().astype(np.int32)
        self.mut = {c: tbl.column(f"mut:{c}").to_numpy().astype(t) for c, t in _MUTABLE.items()}
        self.index = dict(zip(self.held.column("decision_id").to_pylist(), range(len(self.t))))

    def held_rows(self) -> int:
        """Decisions held (not yet in a closed day)."""
        return len(self.t)

    def pending(self) -> int:
        return len(self.orphans)


class EpochLabeller(SliceStage):
    """Labeller ``shard``: per epoch, one :class:`EpochPart` from every shard; fits the delay model
    on their summed statistics (warm-started from its previous fit) and labels its shard's rows."""

    def __init__(self, conversion_window="7d", prior_strength=50.0, shard: int = 0, shards: int = 1,
                 snapshot_every: int = 1):
        super().__init__(parts=shards, snapshot_every=snapshot_every)
        self.conversion_window = conversion_window
        self.prior_strength = float(prior_strength)
        self.shard, self.shards = int(shard), int(shards)
        self._W = parse_duration(conversion_window)
        self.version = 0
        self.models: dict = {}                       # campaign or "*" -> udfs.delay.DelayModel

    def _params(self) -> dict:
        return {"conversion_window": self.conversion_window, "prior_strength": self.prior_strength,
                "shard": self.shard, "shards": self.shards, "snapshot_every": self.snapshot_every}

    def _core(self):
        return {"version": self.version, "models": self.models}

    def _load_core(self, core, parts) -> None:
        self.version, self.models = core["version"], core["models"]

    def _take(self, index: int, parts: list) -> list:
        own = parts[self.shard]
        out = LabelledPart(index=index, epoch=own.epoch, seq=own.seq, shard=self.shard,
                           skip=not any(p.active for p in parts))
        if out.skip:
            return [out]
        self.version += 1
        self.models, fit = fit_delay_models(merge_stats([p.stats for p in parts]), self.models,
                                            self.prior_strength, self._W, self.version, own.epoch)
        rows = own.rows
        converted = rows.column("converted").to_numpy(zero_copy_only=False).astype(bool)
        final = rows.column("label_status").to_numpy(zero_copy_only=False) == "final"
        label = np.where(converted, 1.0, 0.0)
        open_ = np.flatnonzero(~converted & ~final)
        if len(open_):
            elapsed_h = rows.column("elapsed_ms").to_numpy()[open_] / HOUR_MS
            camp = rows.column("campaign_id").to_numpy(zero_copy_only=False)[open_]
            arm = rows.column("arm").to_numpy(zero_copy_only=False)[open_]
            # (campaign, arm) groups by hashing (np.unique on strings sorted them: ~20 % of a worker)
            inv, pairs = pd.factorize(pd.MultiIndex.from_arrays([camp, arm]))
            g = self.models[GLOBAL]
            for i, (c, a) in enumerate(pairs.tolist()):
                at = inv == i
                m = self.models.get(c, g)
                arms = getattr(m, "arms_", [])
                m, s = (m, arms.index(a)) if a in arms else (g, 0)     # an arm the fit has not seen: global
                label[open_[at]] = m.interim_label(elapsed_h[at], self._W / HOUR_MS, stratum=s)
        data = {c: rows.column(c) for c in rows.column_names}
        data["conversion_label"] = pa.array(np.asarray(label, float))
        data["delay_model_version"] = pa.array(np.full(len(label), self.version, np.int64))
        schema = _OUT.arrow_schema()
        out.outcomes = pa.Table.from_arrays([data[f.name] for f in schema], schema=schema)
        day = rows.column("decision_time").cast(pa.int64()).to_numpy() // (DAY_MS * 1000)
        out.days = np.unique(day).tolist()
        out.delay_models = fit if self.shard == 0 else None
        out.quarantine = quarantine_table(own.quarantine, own.epoch)
        out.counts = own.counts
        return [out]


class EpochCommitter(SliceStage):
    """Per epoch, the :class:`LabelledPart` of every labeller -> one :class:`Epoch` (the job commits
    it, idempotent by epoch). Skipped epochs give nothing."""

    def __init__(self, shards: int = 1, snapshot_every: int = 1):
        super().__init__(parts=shards, snapshot_every=snapshot_every)
        self.shards = int(shards)

    def _params(self) -> dict:
        return {"shards": self.shards, "snapshot_every": self.snapshot_every}

    def _core(self):
        return None

    def _load_core(self, core, parts) -> None:
        pass

    def _take(self, index: int, parts: list) -> list:
        if parts[0].skip:
            return []
        tables = [p.outcomes for p in parts if p.outcomes is not None]
        outcomes = pa.concat_tables(tables) if tables else None
        if outcomes is not None and self.shards > 1:
            outcomes = outcomes.sort_by([("decision_time", "ascending"), ("decision_id", "ascending")])
        quarantine = pa.concat_tables([p.quarantine for p in parts]).sort_by("quarantine_id")
        counts = {k: sum(p.counts[k] for p in parts) for k in ("rows", "interim", "final", "held_after")}
        for k in ("engine_s", "write_s"):          # the job's timings, summed over the shards
            if any(k in p.counts for p in parts):
                counts[k] = round(sum(p.counts.get(k, 0.0) for p in parts), 3)
        counts["quarantined"] = quarantine.num_rows
        counts["days"] = len(set().union(*(p.days for p in parts)))
        totals = {}
        for p in parts:
            for what, d in p.counts["totals"].items():
                if isinstance(d, dict):
                    t = totals.setdefault(what, {})
                    for k, v in d.items():
                        t[k] = t.get(k, 0) + v
                else:
                    totals[what] = totals.get(what, 0) + d
        counts["totals"] = totals
        e = Epoch(epoch=parts[0].epoch, seq=parts[0].seq, outcomes=outcomes,
                  days=sorted(set().union(*(p.days for p in parts))), delay_models=parts[0].delay_models,
                  quarantine=quarantine, counts=counts, files=[f for p in parts for f in p.files])
        return [e]


class OutcomeEngine:
    """The whole outcomes pipeline in one process: ``shards`` shards and labellers and the
    committer (the job runs the same stages as Flink operators). Returns the :class:`Epoch` s.

    Parameters are stored unchanged (durations as given).
    """

    def __init__(self, click_window="1h", conversion_window="7d", commit_every="1d", prior_strength=50.0,
                 shards: int = 1):
        self.click_window = click_window
        self.conversion_window = conversion_window
        self.commit_every = commit_every
        self.prior_strength = prior_strength
        self.shards = int(shards)
        self.parts = [OutcomeShard(**self.shard_params(i)) for i in range(self.shards)]
        self.labellers = [EpochLabeller(**self.labeller_params(i)) for i in range(self.shards)]
        self.committer = EpochCommitter(shards=self.shards)

    def shard_params(self, i: int) -> dict:
        return {"click_window": self.click_window, "conversion_window": self.conversion_window,
                "commit_every": self.commit_every, "shard": i, "shards": self.shards}

    def labeller_params(self, i: int) -> dict:
        return {"conversion_window": self.conversion_window, "prior_strength": self.prior_strength,
                "shard": i, "shards": self.shards}

    @property
    def next_seq(self) -> int:
        return self.parts[0].next_seq

    def offer(self, seq: int, decisions, outcomes, clock: int | None, final: bool = False,
              quarantined=()) -> list[Epoch]:
        """Hand in slice ``seq``. ``decisions``: enriched decisions (at least the columns of
        :data:`DECISION_COLUMNS` that exist); ``outcomes``: ``event_id, decision_id, kind,
        event_time, value``; ``clock``: every event at or before it has been handed in;
        ``final``: the input ends with this slice; ``quarantined``: records an upstream job
        quarantined in this slice, ``(stream, reason, record as JSON)``, carried into the
        quarantine table. Returns the epochs cut, in order."""
        if seq < self.next_seq or seq in self.parts[0].waiting:
            return []          # a replayed slice already taken
        splits = split_handoff(seq, decisions, outcomes, clock, final, quarantined, self.shards)
        return self._route([e for i, p in enumerate(splits) for e in self.parts[i].offer(seq, 0, p)])

    def flush(self) -> list[Epoch]:
        """End of input without a final slice: cut an epoch if anything is uncommitted."""
        return self._route([e for shard in self.parts for e in shard.flush()])

    def _route(self, epoch_parts) -> list[Epoch]:
        labelled = []
        for ep in epoch_parts:
            for j, lab in enumerate(self.labellers):
                part = ep if j == ep.shard else EpochPart(ep.index, ep.epoch, ep.seq, ep.shard, ep.active,
                                                          ep.stats, None, [], ep.counts)
                labelled += lab.offer(ep.index, ep.shard, part)
        return [e for lp in labelled for e in self.committer.offer(lp.index, lp.shard, lp)]

    @property
    def totals(self) -> dict:
        out = {"in": {}, "processed": {}, "quarantined": {}}
        for p in self.parts:
            for what, d in p.totals.items():
                for k, v in d.items():
                    out[what][k] = out[what].get(k, 0) + v
        return out

    @property
    def version(self) -> int:
        return self.labellers[0].version

    @property
    def models(self) -> dict:
        return self.labellers[0].models

    def held_rows(self) -> int:
        return sum(p.held_rows() for p in self.parts)

    def pending(self) -> int:
        return sum(p.pending() for p in self.parts)

    def snapshot(self) -> bytes:
        return pickle.dumps(self, protocol=5)

    @classmethod
    def restore(cls, blob: bytes) -> "OutcomeEngine":
        return pickle.loads(blob)


def _outcome_json(eid, did, kind, t, value) -> str:
    import orjson

    rec = {"event_id": eid, "decision_id": did, "event_time": int(t)}
    if kind == "conversion":
        rec["value"] = float(value)
    return orjson.dumps(rec).decode()


def _record_json(row: dict) -> str:
    import orjson

    return orjson.dumps(row).decode()
