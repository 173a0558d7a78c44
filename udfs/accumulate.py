"""Shard of the features pipeline keyed by entity: decayed accumulators and point-in-time values.

Each key type's rows are routed by its route hash (user-level keys by the user,
``campaign_creative`` by the pair), so a key lives in exactly one shard. Per slice the
shard takes one part from every attribution shard, orders each key type's rows by the
total order ``(event_time, kind rank, event id)`` (decisions before clicks before
conversions at equal times) and, with numpy on whole columns:

* each decision (a *query*) reads its keys' accumulators strictly before it;
* each treatment decision adds an impression, each attributed click / conversion its metric
  (a *contribution*), as forward-decayed sums ``S = Σ x·e^{r(t-L)}`` (``udfs.decay``).

The landmark ``L`` is a function of the slice's clock only (a multiple of half the
longest span ``exp`` can take), so every shard moves it at the same slices by the same
factor: a key's values are bit-for-bit the same whichever shard holds it.

Outputs per slice: the enrichment columns of this shard's queries, the feature rows of the
keys it touched (Feast offline), and every ``online_every`` slices the newest row of each
key touched since (Feast online, conflated per key).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from udfs.keys import order_by
from udfs.spec import FeatureSpec, parse_duration
from udfs.stage import SliceStage

__all__ = ["AccumulatorStage", "AccPart", "AccOut", "MAX_EXPONENT", "KEY_COLUMN", "FOLDED_COLUMN"]

#: key hash column of the feature frames between the accumulators and the merge
KEY_COLUMN = "_key"
#: wall-clock ms when an online row's newest event was folded in (the writer measures freshness)
FOLDED_COLUMN = "_folded_ms"

#: largest r·(t - L) reached before the landmark moves (exp(600) ~ 4e260 < 1.8e308)
MAX_EXPONENT = 600.0
_NO_TIME = np.iinfo(np.int64).min


@dataclass
class AccPart:
    """One attribution shard's rows for one accumulator shard and slice."""
    seq: int
    clock: int | None
    final: bool
    tables: dict          # key type -> {column: numpy array} (udfs.attribution.ACC_COLUMNS + entity columns)
    source: int = 0       # the attribution shard it comes from (its part number)


@dataclass
class AccOut:
    seq: int
    shard: int
    enrich: dict = field(default_factory=dict)     # key type -> (decision ids, values matrix)
    features: dict = field(default_factory=dict)   # key type -> DataFrame of touched keys
    online: dict = field(default_factory=dict)     # key type -> DataFrame (conflated, every online_every)
    timing: dict = field(default_factory=dict)


class _KeyTable:
    """Rows of one key type: key hash <-> row, entity values, forward-decayed sums, last event time."""

    def __init__(self, entities: tuple, n_cols: int):
        self.entities = entities
        self.hashes = np.zeros(0, np.uint64)
        self.ents = [np.zeros(0, object) for _ in entities]
        self.sums = np.zeros((0, n_cols))
        self.last_t = np.zeros(0, np.int64)
        self.folded_ms = np.zeros(0, np.int64)   # wall clock of each row's last update (freshness; not state)
        self._index = None
        self.new_from = 0        # rows from here on are not in state yet

    def __len__(self):
        return len(self.hashes)

    def index(self) -> pd.Index:
        if self._index is None:
            self._index = pd.Index(self.hashes)
        return self._index

    def add(self, hashes: np.ndarray, ents: list) -> None:
        self.hashes = np.concatenate([self.hashes, hashes])
        self.ents = [np.concatenate([a, np.asarray(b, object)]) for a, b in zip(self.ents, ents)]
        self._index = None
        n = len(self.hashes)
        if n > len(self.last_t):
            cap = max(n, int(len(self.last_t) * 1.5) + 1024)
            sums = np.zeros((cap, self.sums.shape[1]))
            sums[:len(self.sums)] = self.sums
            last = np.full(cap, _NO_TIME, np.int64)
            last[:len(self.last_t)] = self.last_t
            folded = np.zeros(cap, np.int64)
            folded[:len(self.folded_ms)] = self.folded_ms
            self.sums, self.last_t, self.folded_ms = sums, last, folded

    def rows(self, keys: np.ndarray, is_query: np.ndarray, ents: list) -> np.ndarray:
        """Row of each key; keys first seen in a query row are added (in order of appearance).
        Rows of keys never queried (cannot happen: a decision precedes its outcomes) are -1."""
        r = self.index().get_indexer(keys) if len(self.hashes) else np.full(len(keys), -1)
        new = (r < 0) & is_query
        if new.any():
            where = np.flatnonzero(new)
            _, first = np.unique(keys[where], return_index=True)
            first = where[np.sort(first)]
            self.add(keys[first], [e[first] for e in ents])
            r = self.index().get_indexer(keys)
        return r


class AccumulatorStage(SliceStage):
    """One accumulator shard (``shard`` of ``shards``), taking a part from each of ``parts``
    attribution shards per slice."""

    def __init__(self, spec: FeatureSpec | None = None, shard: int = 0, shards: int = 1, parts: int = 1,
                 online_every: int = 1, snapshot_every: int = 8):
        super().__init__(parts=parts, snapshot_every=snapshot_every)
        self.spec = spec or FeatureSpec()
        self.shard, self.shards = int(shard), int(shards)
        self.online_every = int(online_every)
        hl = np.array([parse_duration(h) for h in self.spec.half_lives], float)
        self._rates = math.log(2.0) / hl
        self._H = len(hl)
        self._n_cols = len(self.spec.metrics) * self._H
        self._col_rates = np.tile(self._rates, len(self.spec.metrics))
        self._q = int(MAX_EXPONENT / float(self._rates.max())) // 2
        self.landmark: int | None = None
        self.tables = {kt.name: _KeyTable(kt.entities, self._n_cols) for kt in self.spec.key_types}
        self.online_touched = {kt: set() for kt in self.tables}
        self.rows_in = 0          # rows taken (all key types), for the sharding balance in the bench

    def _params(self) -> dict:
        return {"spec": self.spec, "shard": self.shard, "shards": self.shards, "parts": self.parts,
                "online_every": self.online_every, "snapshot_every": self.snapshot_every}

    def _check_restore(self, stored: dict) -> None:
        self.spec.check(stored["spec"].describe())
        self._require_same(stored, ("shard", "shards", "parts"))

    # ------------------------------------------------------------------ state
    def _core(self):
        return {"landmark": self.landmark, "online_touched": self.online_touched,
                "sums": {kt: t.sums[:len(t)].copy() for kt, t in self.tables.items()},
                "last_t": {kt: t.last_t[:len(t)].copy() for kt, t in self.tables.items()}}

    def state_delta(self) -> dict:
        # keys are parts, one per call that added some: put once, never rewritten
        for kt, tab in self.tables.items():
            if tab.new_from < len(tab):
                self._put_part(f"keys:{kt}:{tab.new_from}",
                               (tab.hashes[tab.new_from:], [e[tab.new_from:] for e in tab.ents]))
                tab.new_from = len(tab)
        return super().state_delta()

    def _load_core(self, core, parts):
        self.landmark, self.online_touched = core["landmark"], core["online_touched"]
        for kt, tab in self.tables.items():
            n = len(core["sums"][kt])
            chunks = sorted((int(name.split(":")[2]), v) for name, v in parts.items()
                            if name.startswith(f"keys:{kt}:") and int(name.split(":")[2]) < n)
            for _, (h, ents) in chunks:
                tab.add(h, ents)
            if len(tab) != n:
                raise ValueError(f"accumulator state of {kt}: {len(tab)} keys for {n} rows")
            tab.sums[:n], tab.last_t[:n] = core["sums"][kt], core["last_t"][kt]
            tab.new_from = n

    # ------------------------------------------------------------------ slice
    def _move_landmark(self, clock: int) -> None:
        target = self._q * (clock // self._q) - self._q
        if self.landmark is None:
            self.landmark = target
        elif target > self.landmark:
            factor = np.exp(-self._col_rates * (target - self.landmark))
            for tab in self.tables.values():
                tab.sums *= factor
            self.landmark = target

    def _take(self, seq: int, payloads: list) -> list:
        clock, final = payloads[0].clock, payloads[0].final
        self._now_ms = int(time.time() * 1000)
        if clock is not None:
            self._move_landmark(int(clock))
        out = AccOut(seq=seq, shard=self.shard)
        for kt in self.tables:
            parts = [p.tables.get(kt) for p in payloads]
            parts = [p for p in parts if p is not None and len(p["t"])]
            if not parts:
                continue
            if len(parts) > 1:    # a part holding only outcome rows carries no entity columns
                names = list(dict.fromkeys(c for p in parts for c in p))
                cols = {c: np.concatenate([p[c] if c in p else np.full(len(p["t"]), None, object) for p in parts])
                        for c in names}
            else:
                cols = parts[0]
            self.rows_in += len(cols["t"])
            order = order_by(cols["t"], cols["rank"], cols["id"])
            self._accumulate(kt, {c: v[order] for c, v in cols.items()}, out)
        for kt, rows in self.online_touched.items():
            if rows and (final or (seq + 1) % self.online_every == 0):
                r = np.fromiter(sorted(rows), np.int64)
                out.online[kt] = self._feature_frame(kt, r).assign(**{FOLDED_COLUMN: self.tables[kt].folded_ms[r]})
                self.online_touched[kt] = set()
        return [out]

    def _accumulate(self, kt: str, df: dict, out: AccOut) -> None:
        """``df``: column batch (numpy arrays) of this key type's rows in the total order."""
        tab = self.tables[kt]
        q = df["query"].astype(bool)
        c = df["contrib"].astype(bool)
        keys = df["key"].astype(np.uint64)
        ents = [df[e].astype(object) if e in df else np.full(len(keys), None, object) for e in tab.entities]
        rows_all = tab.rows(keys, q, ents)
        known = rows_all >= 0
        q = q & known
        c = c & known
        ts = df["t"].astype(np.int64)
        pos = np.arange(len(ts))
        rows, cpos, ct = rows_all[c], pos[c], ts[c]
        met = df["metric"].astype(np.int64)[c]
        vals = np.zeros((len(rows), self._n_cols))
        if len(rows):
            w = np.exp(np.outer(ct - self.landmark, self._rates))
            np.put_along_axis(vals, met[:, None] * self._H + np.arange(self._H)[None, :], w, axis=1)
        qrows, qpos, qts = rows_all[q], pos[q], ts[q]
        if len(qrows):
            # queries sort before contributions at the same (row, position): strictly before
            all_rows = np.concatenate([qrows, rows])
            all_pos = np.concatenate([qpos, cpos])
            is_c = np.concatenate([np.zeros(len(qrows), np.int8), np.ones(len(rows), np.int8)])
            all_vals = np.vstack([np.zeros((len(qrows), self._n_cols)), vals])
            order = np.lexsort((is_c, all_pos, all_rows))
            cum = pd.DataFrame(all_vals[order]).groupby(all_rows[order], sort=False).cumsum().to_numpy()
            q_mask = is_c[order] == 0
            q_idx = order[q_mask]
            pre = tab.sums[all_rows[order][q_mask]] + cum[q_mask]
            decay = np.exp(-np.outer(qts[q_idx] - self.landmark, self._rates))
            full = np.empty((len(qrows), self._n_cols))
            full[q_idx] = pre * np.tile(decay, (1, len(self.spec.metrics)))
            out.enrich[kt] = (df["decision_id"][q], full)
        if len(rows):
            np.add.at(tab.sums, rows, vals)
            np.maximum.at(tab.last_t, rows, ct)
            touched = np.unique(rows)
            tab.folded_ms[touched] = self._now_ms
            out.features[kt] = self._feature_frame(kt, touched)
            self.online_touched[kt].update(touched.tolist())

    def _feature_frame(self, kt: str, rows: np.ndarray, with_key: bool = True) -> pd.DataFrame:
        """Feature rows of ``rows`` as of each key's last event; with ``with_key`` a
        :data:`KEY_COLUMN` of key hashes the merge orders by (and drops)."""
        tab = self.tables[kt]
        last = tab.last_t[rows]
        decay = np.exp(-np.outer(last - self.landmark, self._rates))
        vals = tab.sums[rows] * np.tile(decay, (1, len(self.spec.metrics)))
        data = {e: col[rows] for e, col in zip(tab.entities, tab.ents)}
        data.update(zip(self.spec.feature_names(), vals.T))
        df = pd.DataFrame(data)
        df["event_timestamp"] = pd.to_datetime(last, unit="ms", utc=True)
        if with_key:
            df[KEY_COLUMN] = tab.hashes[rows]
        return df

    def feature_values(self, kt: str, with_key: bool = False) -> pd.DataFrame:
        """Every key's current values, as of its last event (what Feast should hold); with
        ``with_key`` the :data:`KEY_COLUMN` too."""
        tab = self.tables[kt]
        rows = np.flatnonzero(tab.last_t[:len(tab)] != _NO_TIME).astype(np.int64)
        return self._feature_frame(kt, rows, with_key=with_key)
