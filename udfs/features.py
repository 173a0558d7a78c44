"""The features engine: decayed accumulators per key, in event time, a slice at a time.

Plain Python and numpy, no Flink. ``jobs/features.py`` runs one engine per
shard inside a Flink keyed operator and crosses into Python once per *slice*
(a micro-batch of a few tens of thousands of events), never once per event.

Per slice, in source order (slices carry a sequence number; out-of-order slices
wait until the gap is filled, so results do not depend on upstream parallelism):

1. dedupe by (stream, event id) within a TTL in event time -> ``duplicate``;
2. events at or behind the watermark -> ``late``;
3. the rest wait in a buffer; the watermark becomes ``max event time seen -
   out_of_orderness``; buffered events at or before it are *released* in a
   total order ``(event_time, kind, id)`` (decisions before clicks before
   conversions at equal times);
4. released clicks and conversions join their decision by ``decision_id``
   within the attribution window, else ``unattributed``;
5. every released decision is enriched with its keys' accumulators as they
   stood strictly before it in that order (point-in-time correct), then the
   accumulators take the slice's contributions.

Accumulators: impressions (treatment-arm decisions), clicks and conversions,
per ``user``, ``user_campaign`` and ``campaign_creative``, at each half-life,
as forward-decayed sums (see ``udfs.decay``). User-level keys are kept only for
decisions with ``consent``.

Every input record ends in exactly one place: processed, quarantined with a
reason, or still pending (behind the watermark) until the stream ends.
:meth:`FeatureEngine.flush` releases everything at end of input.
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from schemas import CONTRACTS

__all__ = ["FeatureEngine", "SliceOutput", "KEY_TYPES", "METRICS", "KIND_RANK",
           "parse_duration", "feature_names", "ENTITY_COLUMNS"]

KINDS = ("decision", "click", "conversion")
KIND_RANK = {k: i for i, k in enumerate(KINDS)}
METRICS = ("impressions", "clicks", "conversions")
_METRIC_OF_KIND = {"decision": 0, "click": 1, "conversion": 2}
KEY_TYPES = ("user", "user_campaign", "campaign_creative")
#: entity columns of each key type, in the order they are joined into the key string
ENTITY_COLUMNS = {"user": ("user_id",), "user_campaign": ("user_id", "campaign_id"),
                  "campaign_creative": ("campaign_id", "creative_id")}
KEY_SEP = "|"
_USER_LEVEL = ("user", "user_campaign")

#: largest r·(t - L) a slice may reach before the landmark moves (exp(600) ~ 4e260)
MAX_EXPONENT = 600.0

_DUR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_duration(text) -> int:
    """``'1h'`` -> 3600000 (milliseconds). Integers pass through as milliseconds.

    >>> parse_duration("7d"), parse_duration("90s"), parse_duration(250)
    (604800000, 90000, 250)
    """
    if isinstance(text, (int, np.integer)):
        return int(text)
    m = _DUR.match(str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 30s, 5m, 1h, 7d)")
    return int(float(m.group(1)) * _UNIT_MS[m.group(2)])


def feature_names(half_lives) -> list[str]:
    """Feature names of one key type, e.g. ``impressions_1h``."""
    return [f"{m}_{h}" for m in METRICS for h in half_lives]


@dataclass
class SliceOutput:
    """What one slice (or the final flush) produced."""
    seq: int
    enriched: pd.DataFrame | None = None
    features: dict = field(default_factory=dict)     # key type -> DataFrame (rows touched by this slice)
    online: dict = field(default_factory=dict)       # key type -> DataFrame (latest rows, every online_every slices)
    quarantine: list = field(default_factory=list)   # (stream, record, reason)
    counts: dict = field(default_factory=dict)
    attributed: pd.DataFrame | None = None           # clicks/conversions joined to a decision
    clock: int | None = None       # every event at or before it has been released (the watermark)
    final: bool = False            # end of input: everything was released


class _KeyTable:
    """Rows of one key type: key string <-> row, forward-decayed sums, last event time."""

    def __init__(self, n_cols: int):
        self.index: dict[str, int] = {}
        self.keys: list[str] = []
        self.parts: list[tuple] = []        # entity values of each row, for the feature frames
        self.sums = np.zeros((0, n_cols))
        self.last_t = np.zeros(0, dtype=np.int64)
        self.new_keys: list[str] = []
        self._ent = (0, [])                 # (rows covered, entity columns as numpy arrays)

    def add(self, key: str) -> int:
        r = self.index[key] = len(self.keys)
        self.keys.append(key)
        self.parts.append(tuple(key.split(KEY_SEP)))
        self.new_keys.append(key)
        return r

    def entity_columns(self) -> list[np.ndarray]:
        """Entity values per column for every row, as object arrays (rebuilt when keys grew)."""
        n, cols = self._ent
        if n != len(self.keys):
            extra = list(zip(*self.parts[n:]))
            cols = [np.concatenate([cols[i], np.array(extra[i], dtype=object)]) if cols
                    else np.array(extra[i], dtype=object) for i in range(len(extra))]
            self._ent = (len(self.keys), cols)
        return cols

    def rows(self, keys: list[str]) -> np.ndarray:
        """Row of each key, adding the keys not seen before (in order of first appearance)."""
        get = self.index.get
        rows = [get(k, -1) for k in keys]
        if -1 in rows:
            for j, r in enumerate(rows):
                if r == -1:
                    rows[j] = get(keys[j], -1)
                    if rows[j] == -1:
                        rows[j] = self.add(keys[j])
        return np.array(rows, dtype=np.int64)

    def grow(self) -> None:
        n = len(self.keys)
        if n > len(self.last_t):
            cap = max(n, int(len(self.last_t) * 1.5) + 1024)
            sums = np.zeros((cap, self.sums.shape[1]))
            sums[:len(self.sums)] = self.sums
            last = np.full(cap, np.iinfo(np.int64).min, dtype=np.int64)
            last[:len(self.last_t)] = self.last_t
            self.sums, self.last_t = sums, last


class FeatureEngine:
    """Decayed per-key features over decisions, clicks and conversions.

    Parameters are stored unchanged (durations as given, e.g. ``"1h"``).

    >>> eng = FeatureEngine(half_lives=("1h",), out_of_orderness="0ms")
    >>> d = {"decision_id": "d1", "event_time": 1_767_225_600_000, "user_id": "u_0000000000000001",
    ...      "placement": "feed", "device": "ios", "region": "eu", "hour": 0, "campaign_id": "c1",
    ...      "creative_id": "k1", "arm": "treatment", "propensity": 0.5, "policy_id": "p",
    ...      "model_version": "m1", "feature_schema_version": 1, "consent": True}
    >>> out = eng.offer(0, {"decision": [d]})
    >>> out += eng.flush()
    >>> float(out[-1].features["user"]["impressions_1h"].iloc[0])
    1.0
    """

    def __init__(self, half_lives=("1h", "1d", "7d"), out_of_orderness="5m",
                 click_window="1h", conversion_window="7d", dedupe_ttl="1d", online_every=1,
                 snapshot_every=8):
        self.half_lives = tuple(half_lives)
        self.out_of_orderness = out_of_orderness
        self.click_window = click_window
        self.conversion_window = conversion_window
        self.dedupe_ttl = dedupe_ttl
        self.online_every = online_every
        self.snapshot_every = snapshot_every

        self._hl_ms = np.array([parse_duration(h) for h in self.half_lives], dtype=float)
        self._rates = math.log(2.0) / self._hl_ms
        self._bound = parse_duration(out_of_orderness)
        self._windows = {"click": parse_duration(click_window),
                         "conversion": parse_duration(conversion_window)}
        self._retention = max(self._windows.values())
        self._ttl = parse_duration(dedupe_ttl)
        self._n_cols = len(METRICS) * len(self.half_lives)
        self.feature_columns = feature_names(self.half_lives)
        self._fields = {k: CONTRACTS[k].field_names for k in KINDS}
        self._id_field = {k: CONTRACTS[k].id_field for k in KINDS}
        self._value_pos = self._fields["conversion"].index("value")

        self.tables = {kt: _KeyTable(self._n_cols) for kt in KEY_TYPES}
        self.watermark: int | None = None
        self.max_t: int | None = None
        self.landmark: int | None = None
        self.next_seq = 0
        self.waiting: dict[int, dict] = {}      # slices that came before their turn
        self.pending: list[tuple] = []           # (t, rank, id, kind, record tuple)
        # decision index and dedupe set, kept in chunks (one per slice) so that
        # state is written incrementally and expires chunk by chunk
        self.decisions: dict[str, tuple] = {}    # decision_id -> (t, rows per key type, arm)
        self.seen: set[str] = set()
        self._dec_chunks: dict[int, tuple[int, list]] = {}   # seq -> (max t, [(id, value)])
        self._seen_chunks: dict[int, tuple[int, list]] = {}  # seq -> (max t, [key])
        self._dirty: dict[str, object] = {}
        # write-ahead log: inputs of the slices processed since the last snapshot of
        # ``core``; a restore takes the snapshot and processes them again
        self._log: dict[int, dict] = {}
        self._deferred: set[str] = set()     # state entries to delete at the next snapshot
        self._snapshot_due = True
        self.online_touched = {kt: set() for kt in KEY_TYPES}   # rows not yet sent online

    # ------------------------------------------------------------------ input
    def offer(self, seq: int, batches: dict, lines: dict | None = None,
              quarantined: list | None = None) -> list[SliceOutput]:
        """Hand in slice ``seq``: ``batches`` maps stream -> list of valid records (dicts
        or tuples in contract field order). Returns the outputs of every slice that
        became processable, in sequence order."""
        if seq < self.next_seq or seq in self.waiting:
            return []   # a replayed slice this engine has already taken
        self.waiting[seq] = {"batches": batches, "lines": lines, "quarantined": quarantined or []}
        self._dirty[f"wait:{seq}"] = True
        return self._drain()

    def _drain(self) -> list[SliceOutput]:
        outs = []
        while self.next_seq in self.waiting:
            s = self.next_seq
            item = self._log[s] = self.waiting.pop(s)
            outs.append(self._process_slice(s, item["batches"], item["lines"], item["quarantined"]))
            self.next_seq += 1
            if self.next_seq % int(self.snapshot_every) == 0:
                self._snapshot()
        return outs

    def _snapshot(self) -> None:
        """Mark ``core`` for writing; the logged inputs and expired chunks can then go."""
        self._deferred.update(f"wait:{s}" for s in self._log)
        self._log = {}
        self._snapshot_due = True

    def flush(self) -> list[SliceOutput]:
        """End of input: release everything still buffered."""
        outs = self._drain()            # slices logged before a restore, if any
        if self.pending:
            out = SliceOutput(seq=self.next_seq)
            self._release(out, final=True)
            self._emit_online(out)
            outs.append(out)
        self._snapshot()
        return outs

    def _process_slice(self, seq, batches, lines, quarantined) -> SliceOutput:
        out = SliceOutput(seq=seq)
        counts = {"in": {}, "processed": {}, "quarantined": {}, "pending": 0}
        out.counts = counts
        for stream, rec, reason in quarantined:
            out.quarantine.append((stream, rec, reason))
        wm = self.watermark
        new_seen = []
        max_t = self.max_t
        for kind, records in batches.items():
            rank, fields = KIND_RANK[kind], self._fields[kind]
            id_pos = fields.index(self._id_field[kind])
            t_pos = fields.index("event_time")
            for rec in records:
                if isinstance(rec, dict):
                    rec = tuple(rec[f] for f in fields)
                eid, t = rec[id_pos], rec[t_pos]
                skey = kind[:2] + ":" + eid
                if skey in self.seen:
                    out.quarantine.append((kind, dict(zip(fields, rec)), "duplicate"))
                    continue
                self.seen.add(skey)
                new_seen.append((skey, t))
                if wm is not None and t <= wm:
                    out.quarantine.append((kind, dict(zip(fields, rec)), "late"))
                    continue
                self.pending.append((t, rank, eid, kind, rec))
                if max_t is None or t > max_t:
                    max_t = t
        if lines is not None:
            counts["in"] = dict(lines)
        if new_seen:
            self._seen_chunks[seq] = (max(t for _, t in new_seen), [k for k, _ in new_seen])
            self._dirty[f"seen:{seq}"] = True
        self.max_t = max_t
        if max_t is not None:
            new_wm = max_t - self._bound
            if wm is None or new_wm > wm:
                self.watermark = new_wm
        self._release(out, final=False)
        if (seq + 1) % int(self.online_every) == 0:
            self._emit_online(out)
        self._expire(seq)
        return out

    # ---------------------------------------------------------------- release
    def _release(self, out: SliceOutput, final: bool) -> None:
        wm = self.watermark
        if final:
            released, self.pending = self.pending, []
        else:
            released = [e for e in self.pending if e[0] <= wm]
            self.pending = [e for e in self.pending if e[0] > wm]
        c = out.counts.setdefault("processed", {})
        out.counts["pending"] = len(self.pending)
        out.clock, out.final = (self.max_t, True) if final else (wm, False)
        if not released:
            return
        released.sort(key=lambda e: (e[0], e[1], e[2]))
        # split where one batch would span too many half-lives for the landmark
        span = MAX_EXPONENT / float(self._rates.max())
        start = 0
        n = len(released)
        enriched, touched, attributed = [], {kt: set() for kt in KEY_TYPES}, []
        while start < n:
            t0 = released[start][0]
            end = start
            while end < n and released[end][0] - t0 <= span:
                end += 1
            self._process_released(released[start:end], out, c, enriched, touched, attributed)
            start = end
        if enriched:
            out.enriched = pd.concat(enriched, ignore_index=True)
        if attributed:
            out.attributed = pd.concat(attributed, ignore_index=True)
        for kt in KEY_TYPES:
            rows = np.fromiter(sorted(touched[kt]), dtype=np.int64)
            if len(rows):
                out.features[kt] = self._feature_frame(kt, rows)

    def _emit_online(self, out: SliceOutput) -> None:
        """Conflated online writes: each touched key once per ``online_every`` slices."""
        for kt in KEY_TYPES:
            rows = self.online_touched[kt]
            if rows:
                out.online[kt] = self._feature_frame(kt, np.fromiter(sorted(rows), dtype=np.int64))
                self.online_touched[kt] = set()

    def _move_landmark(self, new_landmark: int) -> None:
        if self.landmark is not None:
            factor = np.exp(-self._rates * (new_landmark - self.landmark))
            col = np.tile(factor, len(METRICS))
            for tab in self.tables.values():
                tab.sums *= col
        self.landmark = new_landmark

    def _process_released(self, events, out, counts, enriched, touched, attributed) -> None:
        t_first, t_last = events[0][0], events[-1][0]
        if self.landmark is None or float(self._rates.max()) * (t_last - self.landmark) > MAX_EXPONENT:
            self._move_landmark(t_first)
        tables = self.tables
        dec_fields = self._fields["decision"]
        f = {name: i for i, name in enumerate(dec_fields)}
        n = len(events)
        ranks = np.fromiter((e[1] for e in events), np.int8, n)
        ts_all = np.fromiter((e[0] for e in events), np.int64, n)
        dec_pos = np.flatnonzero(ranks == 0)
        out_pos = np.flatnonzero(ranks != 0)
        # contributions and queries per key type: arrays of rows, positions, metrics, times
        contrib = {kt: [] for kt in KEY_TYPES}
        queries = {kt: None for kt in KEY_TYPES}
        dec_records = []
        if len(dec_pos):
            dec_records = [events[i][4] for i in dec_pos]
            dec_cols = list(zip(*dec_records))
            users, camps, cres = dec_cols[f["user_id"]], dec_cols[f["campaign_id"]], dec_cols[f["creative_id"]]
            consent = np.array(dec_cols[f["consent"]], dtype=bool)
            treated = np.array([a == "treatment" for a in dec_cols[f["arm"]]], dtype=bool)
            nd = len(dec_records)
            rows = {kt: np.full(nd, -1, dtype=np.int64) for kt in KEY_TYPES}
            rows["campaign_creative"] = tables["campaign_creative"].rows(
                [c + KEY_SEP + k for c, k in zip(camps, cres)])
            ci = np.flatnonzero(consent)
            if len(ci):
                cil = ci.tolist()
                rows["user"][ci] = tables["user"].rows([users[i] for i in cil])
                rows["user_campaign"][ci] = tables["user_campaign"].rows(
                    [users[i] + KEY_SEP + camps[i] for i in cil])
            t_dec = ts_all[dec_pos]
            values = list(zip(t_dec.tolist(), zip(*(rows[kt].tolist() for kt in KEY_TYPES))))
            new_decisions = list(zip((events[i][2] for i in dec_pos), values))
            self.decisions.update(new_decisions)
            seq = out.seq
            prev = self._dec_chunks.get(seq)
            items = (prev[1] if prev else []) + new_decisions
            self._dec_chunks[seq] = (int(t_dec.max()) if prev is None else max(prev[0], int(t_dec.max())), items)
            self._dirty[f"dec:{seq}"] = True
            for kt in KEY_TYPES:
                r = rows[kt]
                has = r >= 0
                queries[kt] = (r[has], dec_pos[has], t_dec[has])
                m = has & treated
                contrib[kt].append((r[m], dec_pos[m], np.zeros(int(m.sum()), np.int64), t_dec[m]))
            counts["decision"] = counts.get("decision", 0) + nd
        if len(out_pos):
            dget = self.decisions.get
            found = [dget(events[i][4][1]) for i in out_pos]   # decision_id: 2nd field of outcomes
            ok = []
            for j, i in enumerate(out_pos.tolist()):
                d = found[j]
                t, kind = events[i][0], events[i][3]
                if d is None or not (0 <= t - d[0] <= self._windows[kind]):
                    out.quarantine.append((kind, dict(zip(self._fields[kind], events[i][4])), "unattributed"))
                    ok.append(False)
                else:
                    ok.append(True)
            ok = np.array(ok, dtype=bool)
            good = out_pos[ok]
            if len(good):
                recs = [events[i] for i in good.tolist()]
                attributed.append(pd.DataFrame({
                    "event_id": [e[2] for e in recs], "decision_id": [e[4][1] for e in recs],
                    "kind": [e[3] for e in recs], "event_time": np.array([e[0] for e in recs], np.int64),
                    "value": [e[4][self._value_pos] if e[3] == "conversion" else 0.0 for e in recs]}))
                d_rows = np.array([found[j][1] for j in np.flatnonzero(ok).tolist()], dtype=np.int64)
                metric = np.where(ranks[good] == 1, 1, 2).astype(np.int64)
                for k, kt in enumerate(KEY_TYPES):
                    r = d_rows[:, k]
                    has = r >= 0
                    contrib[kt].append((r[has], good[has], metric[has], ts_all[good][has]))
                n_click = int((ranks[good] == 1).sum())
                counts["click"] = counts.get("click", 0) + n_click
                counts["conversion"] = counts.get("conversion", 0) + len(good) - n_click
        contrib = {kt: tuple(np.concatenate([c[i] for c in parts]) if parts else np.zeros(0, np.int64)
                             for i in range(4)) for kt, parts in contrib.items()}
        queries = {kt: q if q is not None else (np.zeros(0, np.int64),) * 3 for kt, q in queries.items()}

        feats = {}
        H = len(self.half_lives)
        for kt in KEY_TYPES:
            tab = tables[kt]
            tab.grow()
            rows, pos, met, ts = contrib[kt]
            qrows, qpos, qts = queries[kt]
            n_c = len(rows)
            vals = np.zeros((n_c, self._n_cols))
            if n_c:
                w = np.exp(np.outer(ts - self.landmark, self._rates))     # (n, H)
                cols = met[:, None] * H + np.arange(H)[None, :]
                np.put_along_axis(vals, cols, w, axis=1)
            if len(qrows):
                # queries sort before contributions at the same (row, pos): strictly-before
                all_rows = np.concatenate([qrows, rows])
                all_pos = np.concatenate([qpos, pos])
                is_c = np.concatenate([np.zeros(len(qrows), np.int8), np.ones(n_c, np.int8)])
                all_vals = np.vstack([np.zeros((len(qrows), self._n_cols)), vals])
                order = np.lexsort((is_c, all_pos, all_rows))
                sv = pd.DataFrame(all_vals[order])
                cum = sv.groupby(all_rows[order], sort=False).cumsum().to_numpy()
                # exclusive sum before each query = inclusive cumsum (query adds zero)
                q_mask = is_c[order] == 0
                q_idx = order[q_mask]                   # index into the query arrays
                pre = tab.sums[all_rows[order][q_mask]] + cum[q_mask]
                decay = np.exp(-np.outer(qts[q_idx] - self.landmark, self._rates))
                pre = pre * np.tile(decay, (1, len(METRICS)))
                full = np.full((len(qrows), self._n_cols), np.nan)
                full[q_idx] = pre
                feats[kt] = (qpos, full)
            if n_c:
                np.add.at(tab.sums, rows, vals)
                np.maximum.at(tab.last_t, rows, ts)
                touched[kt].update(rows.tolist())
                self.online_touched[kt].update(rows.tolist())
        if dec_records:
            data = dict(zip(dec_fields, dec_cols))
            for kt in KEY_TYPES:
                block = np.full((len(dec_records), self._n_cols), np.nan)
                if kt in feats:
                    qpos, full = feats[kt]
                    block[np.searchsorted(dec_pos, qpos)] = full
                for j, name in enumerate(self.feature_columns):
                    data[f"{kt}__{name}"] = block[:, j]
            enriched.append(pd.DataFrame(data))

    def _feature_frame(self, kt: str, rows: np.ndarray) -> pd.DataFrame:
        tab = self.tables[kt]
        last = tab.last_t[rows]
        decay = np.exp(-np.outer(last - self.landmark, self._rates))
        vals = tab.sums[rows] * np.tile(decay, (1, len(METRICS)))
        ents = ENTITY_COLUMNS[kt]
        cols = tab.entity_columns() if len(rows) else [np.zeros(0, dtype=object)] * len(ents)
        data = {e: c[rows] for e, c in zip(ents, cols)}
        data.update(zip(self.feature_columns, vals.T))
        df = pd.DataFrame(data)
        df["event_timestamp"] = pd.to_datetime(last, unit="ms", utc=True)
        return df

    # ----------------------------------------------------------------- expiry
    def _expire(self, seq: int) -> None:
        wm = self.watermark
        if wm is None:
            return
        for s, (max_t, items) in list(self._dec_chunks.items()):
            if max_t + self._retention < wm:
                for did, _ in items:
                    self.decisions.pop(did, None)
                del self._dec_chunks[s]
                self._deferred.add(f"dec:{s}")
        for s, (max_t, keys) in list(self._seen_chunks.items()):
            if max_t + self._ttl < wm:
                self.seen.difference_update(keys)
                del self._seen_chunks[s]
                self._deferred.add(f"seen:{s}")

    # ------------------------------------------------------------------ state
    def state_delta(self) -> dict[str, bytes | None]:
        """Entries changed since the last call: ``{state key: bytes, or None to delete}``.

        Every slice writes only what it added: its input (``wait:<seq>``, the
        write-ahead log), its decision and dedupe chunks, and new keys. ``core``
        (sums, watermark, landmark, buffered events) is written every
        ``snapshot_every`` slices; then the logged inputs and expired chunks are
        deleted. :meth:`restore` takes ``core`` and processes the logged slices again.
        """
        out: dict[str, bytes | None] = {}
        for key in self._dirty:
            kind, s = key.split(":")
            s = int(s)
            if kind == "wait":
                item = self.waiting.get(s) or self._log.get(s)
                if item is not None:
                    out[key] = pickle.dumps(item, protocol=5)
            elif kind == "dec" and s in self._dec_chunks:
                out[key] = pickle.dumps(self._dec_chunks[s], protocol=5)
            elif kind == "seen" and s in self._seen_chunks:
                out[key] = pickle.dumps(self._seen_chunks[s], protocol=5)
        self._dirty = {}
        for kt, tab in self.tables.items():
            if tab.new_keys:
                out[f"keys:{kt}:{len(tab.keys) - len(tab.new_keys)}"] = pickle.dumps(
                    tab.new_keys, protocol=5)
                tab.new_keys = []
        if self._snapshot_due:
            for key in self._deferred:
                out[key] = None
            self._deferred = set()
            n = {kt: len(tab.keys) for kt, tab in self.tables.items()}
            core = {
                "params": self._params(), "watermark": self.watermark, "max_t": self.max_t,
                "landmark": self.landmark, "next_seq": self.next_seq,
                "pending": self.pending, "online_touched": self.online_touched,
                "sums": {kt: tab.sums[:n[kt]].copy() for kt, tab in self.tables.items()},
                "last_t": {kt: tab.last_t[:n[kt]].copy() for kt, tab in self.tables.items()},
            }
            out["core"] = pickle.dumps(core, protocol=5)
            self._snapshot_due = False
        return out

    def _params(self) -> dict:
        return {"half_lives": self.half_lives, "out_of_orderness": self.out_of_orderness,
                "click_window": self.click_window, "conversion_window": self.conversion_window,
                "dedupe_ttl": self.dedupe_ttl, "online_every": self.online_every,
                "snapshot_every": self.snapshot_every}

    @classmethod
    def restore(cls, entries: dict[str, bytes], **params) -> "FeatureEngine":
        """Rebuild an engine from the accumulated :meth:`state_delta` entries.

        Entries written after the last ``core`` snapshot (keys, decision and dedupe
        chunks of later slices) are skipped: those slices are in the log and are
        processed again, in order, by the next :meth:`offer` or :meth:`flush`.
        ``params`` are used only when no snapshot exists yet.
        """
        if "core" not in entries:
            eng = cls(**params)
            for k, v in entries.items():
                if k.startswith("wait:"):
                    eng.waiting[int(k.split(":")[1])] = pickle.loads(v)
            return eng
        core = pickle.loads(entries["core"])
        eng = cls(**core["params"])
        for k in ("watermark", "max_t", "landmark", "next_seq", "pending", "online_touched"):
            setattr(eng, k, core[k])
        eng._snapshot_due = False
        for kt, tab in eng.tables.items():
            n = len(core["sums"][kt])
            chunks = sorted((int(k.split(":")[2]), v) for k, v in entries.items()
                            if k.startswith(f"keys:{kt}:") and int(k.split(":")[2]) < n)
            for _, blob in chunks:
                for key in pickle.loads(blob):
                    tab.add(key)
            assert len(tab.keys) == n, f"state of {kt}: {len(tab.keys)} keys for {n} rows"
            tab.new_keys = []
            tab.sums, tab.last_t = core["sums"][kt].copy(), core["last_t"][kt].copy()
            tab.grow()
        for k, v in entries.items():
            kind, _, rest = k.partition(":")
            if kind == "wait":
                eng.waiting[int(rest)] = pickle.loads(v)
            elif kind in ("dec", "seen") and int(rest) < eng.next_seq:
                chunk = pickle.loads(v)
                if kind == "dec":
                    eng._dec_chunks[int(rest)] = chunk
                    eng.decisions.update(chunk[1])
                else:
                    eng._seen_chunks[int(rest)] = chunk
                    eng.seen.update(chunk[1])
        # slices processed after the snapshot will be processed again: their inputs
        # stay logged, not "waiting for their turn"
        return eng

    def feature_values(self, kt: str) -> pd.DataFrame:
        """Every key's current values, as of its last event (what Feast should hold)."""
        tab = self.tables[kt]
        rows = np.flatnonzero(tab.last_t[:len(tab.keys)] > np.iinfo(np.int64).min).astype(np.int64)
        return self._feature_frame(kt, rows)
