"""The outcomes engine: decisions joined to their clicks and conversions, with
survival-based delayed labels, cut into idempotent commit epochs.

Plain Python and numpy, no Flink. ``jobs/outcomes.py`` runs it inside one keyed
Flink operator and hands it one *slice* at a time: the decisions the features
job released (enriched, point-in-time), the clicks and conversions it
attributed, and its event-time clock (the watermark: every event at or before
it has been released).

Per slice, in sequence order (out-of-order slices wait for their turn):

1. decisions join the held set; a decision id seen before is ``duplicate``;
2. outcomes (in the order ``(event_time, kind, event_id)``) update their
   decision's row; a redelivered event id is ``duplicate``, one outside its
   attribution window ``outside_window``; one whose decision is not held yet
   waits, and is ``unattributed`` once the clock has passed it (its decision,
   which is older, would have been released by then);
3. when the clock crosses a multiple of ``commit_every`` (or at end of input) an
   :class:`Epoch` is cut: the delay model is refitted (new version), every held
   row is (re)labelled as of the clock, and the rows of each open decision day
   are emitted to replace that day's partition. Days whose every decision has
   passed its conversion window are then final and leave the held set; their
   counts stay in per-campaign sufficient statistics for later fits.

The epoch id is the clock of the cut: deterministic, strictly increasing, the
same on replay. A writer that skips epochs at or below the last committed one
is exactly-once (``jobs/iceberg_store.py``).

Labels: ``final`` once ``clock - decision_time >= conversion_window`` (the
observed outcome); else ``interim``: 1 if a conversion arrived, otherwise
``P(conversion within W | none after e)`` from the campaign's delay model
(``udfs.delay.interim_label`` with ``window=W``).

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
from udfs.delay import HOUR_MS, ExponentialCureModel, interim_label
from udfs.features import parse_duration

__all__ = ["OutcomeEngine", "Epoch", "DAY_MS", "DECISION_COLUMNS"]

DAY_MS = parse_duration("1d")      # day partitions (UTC days since the epoch, as Iceberg's day transform)
_KIND_RANK = {"click": 0, "conversion": 1}
GLOBAL = "*"

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


class OutcomeEngine:
    """Joins decisions and outcomes, labels them with a refitted delay model, cuts epochs.

    Parameters are stored unchanged (durations as given).
    """

    def __init__(self, click_window="1h", conversion_window="7d", commit_every="1d",
                 prior_strength=50.0):
        self.click_window = click_window
        self.conversion_window = conversion_window
        self.commit_every = commit_every
        self.prior_strength = prior_strength

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
        self.quarantine: list[tuple] = []            # (job, seq, stream, reason, record) since last epoch
        self.final_stats: dict[str, list] = {}       # campaign -> [non-converted, converted, Σ delay h, n]
        self.models: dict[str, tuple] = {}           # campaign -> (p, λ per hour) of the latest fit
        self.version = 0
        self.clock: int | None = None
        self.last_epoch: int | None = None
        self.next_seq = 0
        self.waiting: dict[int, tuple] = {}
        self.dirty = False                           # changes not yet in an epoch
        self.totals = {"in": {}, "processed": {}, "quarantined": {}}

    # ------------------------------------------------------------------ input
    def offer(self, seq: int, decisions: pd.DataFrame | None, outcomes: pd.DataFrame | None,
              clock: int | None, final: bool = False, quarantined=()) -> list[Epoch]:
        """Hand in slice ``seq``. ``decisions``: enriched decisions (at least the columns of
        :data:`DECISION_COLUMNS` that exist); ``outcomes``: ``event_id, decision_id, kind,
        event_time, value``; ``clock``: every event at or before it has been handed in;
        ``final``: the input ends with this slice; ``quarantined``: records an upstream job
        quarantined in this slice, ``(stream, reason, record as JSON)``, carried into the
        quarantine table. Returns the epochs cut, in order."""
        if seq < self.next_seq or seq in self.waiting:
            return []          # a replayed slice already taken
        self.waiting[seq] = (decisions, outcomes, clock, final, list(quarantined))
        epochs = []
        while self.next_seq in self.waiting:
            s = self.next_seq
            epochs += self._process(s, *self.waiting.pop(s))
            self.next_seq += 1
        return epochs

    def flush(self) -> list[Epoch]:
        """End of input without a final slice: cut an epoch if anything is uncommitted."""
        if self.dirty and self.clock is not None:     # (labels as of the clock were cut already)
            return [self._cut(self.next_seq - 1)]
        return []

    def _count(self, what: str, key: str, n: int = 1) -> None:
        d = self.totals[what]
        d[key] = d.get(key, 0) + n

    def _quarantine(self, seq, stream, reason, record) -> None:
        self.quarantine.append(("outcomes", seq, stream, reason, record))
        self._count("quarantined", reason.split(":", 1)[0])
        self.dirty = True

    def _process(self, seq, decisions, outcomes, clock, final, quarantined) -> list[Epoch]:
        for stream, reason, record in quarantined:
            self.quarantine.append(("features", seq, stream, reason, record))
            self.dirty = True
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
        epochs = []
        if self.clock is not None and (self.dirty or self.held_rows()):
            crossed = self.last_epoch is None or self.clock // self._every > self.last_epoch // self._every
            if final or crossed:
                epochs.append(self._cut(seq))
        return epochs

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
                self._quarantine(seq, "decision", "duplicate", _record_json(tbl.slice(i, 1).to_pylist()[0]))
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
                    self._quarantine(seq, kind, "unattributed", _outcome_json(eid, did, kind, t, value))
                else:
                    keep.append((t, _KIND_RANK[kind], eid, kind, did, value))
                continue
            if eid in self.seen:
                self._quarantine(seq, kind, "duplicate", _outcome_json(eid, did, kind, t, value))
                continue
            ch, i = self.mut, at
            t_d = int(self.t[i])
            if not 0 <= t - t_d <= self._windows[kind]:
                self._quarantine(seq, kind, "outside_window", _outcome_json(eid, did, kind, t, value))
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

    def _cut(self, seq: int) -> Epoch:
        clock = self.clock
        held = self._consolidate()
        t, camp, mut = self.t, self.camp, self.mut
        elapsed = np.minimum(clock - t, self._W)
        final = clock - t >= self._W
        converted = mut["conversions"] > 0

        delay_h = np.where(converted, (mut["first_conversion_time"] - t) / HOUR_MS, 0.0)
        self.version += 1
        models_tbl = self._refit(clock, camp, converted, delay_h, elapsed, final)
        p, lam = self._params_for(camp)
        label = np.where(converted, 1.0, np.where(final, 0.0,
                                                  interim_label(p, lam, elapsed / HOUR_MS, self._W / HOUR_MS)))
        outcomes = self._outcome_table(held, elapsed, final, converted, label, clock)
        day = t // DAY_MS
        days = np.unique(day).tolist()
        quarantine = self._quarantine_table(clock)
        counts = {"rows": len(t), "interim": int((~final).sum()), "final": int(final.sum()),
                  "days": len(days), "quarantined": quarantine.num_rows}
        # days whose conversion windows have all closed leave the held set
        closed = (day + 1) * DAY_MS + self._W <= clock
        if closed.any():
            self._retire(closed, converted, delay_h)
        counts["held_after"] = len(self.t)
        counts["totals"] = {k: dict(v) for k, v in self.totals.items()}
        counts["totals"]["pending"] = len(self.orphans)
        self.last_epoch = clock
        self.quarantine = []
        self.dirty = False
        return Epoch(epoch=clock, seq=seq, outcomes=outcomes, days=days, delay_models=models_tbl,
                     quarantine=quarantine, counts=counts)

    def _retire(self, closed, converted, delay_h) -> None:
        t, camp = self.t, self.camp
        for k in np.unique(camp[closed]).tolist():
            m = closed & (camp == k)
            s = self.final_stats.setdefault(self.campaigns[k], [0, 0, 0.0])
            nc = int(converted[m].sum())
            s[0] += int(m.sum()) - nc
            s[1] += nc
            s[2] += float(delay_h[m].sum())
        clock = self.clock
        for eid in [e for e, td in self.seen.items() if (td // DAY_MS + 1) * DAY_MS + self._W <= clock]:
            del self.seen[eid]
        keep = ~closed
        self.held = self.held.filter(pa.array(keep))
        self.t, self.camp = t[keep], camp[keep]
        self.mut = {c: v[keep] for c, v in self.mut.items()}
        self.index = dict(zip(self.held.column("decision_id").to_pylist(), range(len(self.t))))

    def _refit(self, clock, camp, converted, delay_h, elapsed_ms, final) -> pa.Table:
        """Delay model per campaign from held rows (censored at min(elapsed, W)) and the
        sufficient statistics of retired ones, shrunk towards the global fit."""
        W_h = self._W / HOUR_MS
        cens_h = elapsed_ms / HOUR_MS
        present = np.bincount(camp, minlength=len(self.campaigns)) > 0 if len(camp) else \
            np.zeros(len(self.campaigns), bool)
        camps = sorted(set(self.campaigns[k] for k in np.flatnonzero(present).tolist()) | set(self.final_stats))

        def data_for(mask, stats):
            conv, d, e, w = [converted[mask]], [delay_h[mask]], [cens_h[mask]], [np.ones(int(mask.sum()))]
            for s in stats:
                non, nc, sd = s
                if non:
                    conv.append(np.array([False])); d.append(np.zeros(1)); e.append(np.array([W_h]))
                    w.append(np.array([float(non)]))
                if nc:
                    conv.append(np.array([True])); d.append(np.array([sd / nc])); e.append(np.array([W_h]))
                    w.append(np.array([float(nc)]))
            return [np.concatenate(x) for x in (conv, d, e, w)]

        everything = np.ones(len(camp), bool)
        g_data = data_for(everything, list(self.final_stats.values()))
        g = ExponentialCureModel().fit(*g_data[:3], weight=g_data[3], init=self.models.get(GLOBAL))
        fits = {GLOBAL: (g, g_data, everything)}
        for c in camps:
            m = camp == self._camp_code[c]
            c_data = data_for(m, [self.final_stats[c]] if c in self.final_stats else [])
            if g.n_converted_ == 0:
                fits[c] = (g, c_data, m)
                continue
            fits[c] = (ExponentialCureModel(prior_p=g.p_, prior_lam=g.lam_, prior_strength=self.prior_strength)
                       .fit(*c_data[:3], weight=c_data[3], init=self.models.get(c)), c_data, m)
        self.models = {c: (f.p_, f.lam_) for c, (f, _, _) in fits.items()}
        rows = []
        for c, (f, data, m) in fits.items():
            retired = sum(self.final_stats.get(c, [0, 0])[:2]) if c != GLOBAL else \
                sum(s[0] + s[1] for s in self.final_stats.values())
            rows.append({"model_key": f"{self.version}|{c}", "version": self.version, "campaign_id": c,
                         "fitted_at": clock * 1000, "conversion_prob": f.p_,
                         "delay_rate_per_hour": f.lam_,
                         "mean_delay_hours": 1.0 / f.lam_ if f.lam_ > 0 else float("inf"),
                         "decisions": f.n_, "conversions": f.n_converted_,
                         "matured_decisions": int(final[m].sum()) + retired, "epoch": clock})
        return pa.Table.from_pylist(rows, schema=table_contract("delay_model").arrow_schema())

    def _params_for(self, camp) -> tuple[np.ndarray, np.ndarray]:
        g = self.models.get(GLOBAL, (0.0, 1.0))
        ps = np.array([self.models.get(c, g)[0] for c in self.campaigns] or [0.0])
        ls = np.array([self.models.get(c, g)[1] for c in self.campaigns] or [1.0])
        return ps[camp], ls[camp]

    def _outcome_table(self, held, elapsed, final, converted, label, clock) -> pa.Table:
        def ts(ms, nullable=False):
            return pa.array(ms.astype(np.int64) * 1000, pa.timestamp("us", tz="UTC"),
                            mask=(ms < 0) if nullable else None)

        mut, n = self.mut, len(label)
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
            "conversion_label": pa.array(label),
            "delay_model_version": pa.array(np.full(n, self.version, np.int64)),
            "epoch": pa.array(np.full(n, clock, np.int64)),
        })
        schema = _OUT.arrow_schema()
        return pa.Table.from_arrays([data[f.name] for f in schema], schema=schema)

    def _quarantine_table(self, clock) -> pa.Table:
        rows, pos = [], {}
        for job, seq, stream, reason, record in self.quarantine:
            k = (job, seq)
            pos[k] = pos.get(k, -1) + 1
            rows.append({"quarantine_id": f"{job}:{seq}:{pos[k]}", "job": job, "seq": seq, "stream": stream,
                         "reason": reason, "reason_kind": reason.split(":", 1)[0], "record": record,
                         "epoch": clock})
        return pa.Table.from_pylist(rows, schema=table_contract("quarantine").arrow_schema())

    # ------------------------------------------------------------------ state
    def snapshot(self) -> bytes:
        """Everything but slices waiting for their turn (their inputs stay in the caller's log)."""
        held = self._consolidate()
        tbl = held.append_column("t", pa.array(self.t)).append_column("camp", pa.array(self.camp))
        for c, v in self.mut.items():
            tbl = tbl.append_column(f"mut:{c}", pa.array(v))
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, tbl.schema) as w:
            w.write_table(tbl)
        meta = {k: getattr(self, k) for k in ("seen", "orphans", "quarantine", "final_stats", "models",
                                              "version", "clock", "last_epoch", "next_seq", "dirty",
                                              "totals", "campaigns")}
        return pickle.dumps({"params": self._params(), "rows": sink.getvalue(), "meta": meta}, protocol=5)

    def _params(self) -> dict:
        return {"click_window": self.click_window, "conversion_window": self.conversion_window,
                "commit_every": self.commit_every, "prior_strength": self.prior_strength}

    @classmethod
    def restore(cls, blob: bytes) -> "OutcomeEngine":
        state = pickle.loads(blob)
        eng = cls(**state["params"])
        for k, v in state["meta"].items():
            setattr(eng, k, v)
        tbl = pa.ipc.open_stream(state["rows"]).read_all()
        eng._camp_code = {c: k for k, c in enumerate(eng.campaigns)}
        eng.held = tbl.select(DECISION_COLUMNS)
        eng.t = tbl.column("t").to_numpy().astype(np.int64)
        eng.camp = tbl.column("camp").to_numpy().astype(np.int32)
        eng.mut = {c: tbl.column(f"mut:{c}").to_numpy().astype(t) for c, t in _MUTABLE.items()}
        eng.index = dict(zip(eng.held.column("decision_id").to_pylist(), range(len(eng.t))))
        return eng

    def held_rows(self) -> int:
        """Decisions held (not yet in a closed day)."""
        return len(self.t)

    def pending(self) -> int:
        return len(self.orphans)


def _outcome_json(eid, did, kind, t, value) -> str:
    import orjson

    rec = {"event_id": eid, "decision_id": did, "event_time": int(t)}
    if kind == "conversion":
        rec["value"] = float(value)
    return orjson.dumps(rec).decode()


def _record_json(row: dict) -> str:
    import orjson

    return orjson.dumps(row).decode()
