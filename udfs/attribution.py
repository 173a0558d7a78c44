"""Shard of the features pipeline keyed by decision id: dedupe, lateness, release, attribution.

A decision and its clicks and conversions carry the same ``decision_id``, so they
meet in one shard (``shard_of(id_hash(decision_id))``). Per slice, columnar:

1. dedupe by (stream, event id hash) within ``dedupe_ttl`` of event time -> ``duplicate``;
2. events at or behind the clock (the watermark before the slice) -> ``late``;
3. the rest wait (``pending``); the clock becomes ``max event time seen - out_of_orderness``,
   where the maximum is over *all shards*: every shard is handed every slice's maximum
   event time by the reader, so every shard computes the same clock whatever the
   parallelism (an in-band watermark, deterministic on replay);
4. pending events at or before the clock are released; released clicks and conversions
   join their decision by id hash within the attribution window, else ``unattributed``;
5. the released events go to the accumulator shards (:mod:`udfs.accumulate`), one table
   of rows per key type, routed by each key's route hash; decisions, attributed outcomes,
   quarantine and counts go to the slice's merge (:func:`udfs.features.merge_slice`).

State: the clock and the pending events in the snapshot; the decision index (kept for
the longest attribution window) and the dedupe hashes as one part per slice, put once
and dropped when expired.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from schemas import CONTRACTS
from udfs.keys import id_hash, key_hash, shard_of
from udfs.spec import KINDS, KIND_RANK, FeatureSpec, parse_duration
from udfs.stage import SliceStage

__all__ = ["AttributionStage", "ReaderPart", "RouterOut", "ACC_COLUMNS"]

#: columns of the rows an accumulator shard gets per key type
ACC_COLUMNS = ("t", "rank", "id", "key", "metric", "query", "contrib", "decision_id")


@dataclass
class ReaderPart:
    """What the reader hands one attribution shard for one slice."""
    seq: int
    clock_t: int | None                  # max event time of every valid record of the whole slice
    batches: dict                        # stream -> DataFrame (contract columns) for this shard
    lines: dict | None = None            # stream -> input lines (shard 0 only)
    quarantined: list = field(default_factory=list)   # validation quarantine (shard 0 only)


@dataclass
class RouterOut:
    """What one attribution shard produced for one slice (for the merge)."""
    seq: int
    shard: int
    decisions: pd.DataFrame | None       # released decisions, contract columns
    attributed: pd.DataFrame | None      # clicks/conversions joined to a decision
    quarantine: list                     # (stream, record dict, reason)
    counts: dict
    clock: int | None
    final: bool
    lines: dict | None = None
    quarantined: list = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    to_acc: list = field(default_factory=list)    # per accumulator shard: {key type: rows or None}


class AttributionStage(SliceStage):
    """One attribution shard (``shard`` of ``shards``) feeding ``acc_shards`` accumulators."""

    def __init__(self, spec: FeatureSpec | None = None, shard: int = 0, shards: int = 1, acc_shards: int = 1,
                 out_of_orderness="5m", click_window="1h", conversion_window="7d", dedupe_ttl="1d",
                 snapshot_every: int = 8):
        super().__init__(parts=1, snapshot_every=snapshot_every)
        self.spec = spec or FeatureSpec()
        self.shard, self.shards, self.acc_shards = int(shard), int(shards), int(acc_shards)
        self.out_of_orderness = out_of_orderness
        self.click_window = click_window
        self.conversion_window = conversion_window
        self.dedupe_ttl = dedupe_ttl
        self._bound = parse_duration(out_of_orderness)
        self._windows = {"click": parse_duration(click_window), "conversion": parse_duration(conversion_window)}
        self._retention = max(self._windows.values())
        self._ttl = parse_duration(dedupe_ttl)
        self._id = {k: CONTRACTS[k].id_field for k in KINDS}
        self._fields = {k: list(CONTRACTS[k].field_names) for k in KINDS}
        self.watermark: int | None = None
        self.max_t: int | None = None
        self.pending: dict[str, pd.DataFrame] = {}
        self.dec_chunks: dict[int, tuple[int, pd.DataFrame]] = {}
        self.seen_chunks: dict[int, tuple[int, dict]] = {}
        self._seen_cache = None
        self._dec_cache = None
        self.events_in = 0        # events taken, for the sharding balance in the bench

    def _params(self) -> dict:
        return {"spec": self.spec, "shard": self.shard, "shards": self.shards, "acc_shards": self.acc_shards,
                "out_of_orderness": self.out_of_orderness, "click_window": self.click_window,
                "conversion_window": self.conversion_window, "dedupe_ttl": self.dedupe_ttl,
                "snapshot_every": self.snapshot_every}

    def _check_restore(self, stored: dict) -> None:
        self.spec.check(stored["spec"].describe())
        self._require_same(stored, ("shard", "shards", "acc_shards"))

    # ------------------------------------------------------------------ state
    def _core(self):
        return {"watermark": self.watermark, "max_t": self.max_t, "pending": self.pending}

    def _load_core(self, core, parts):
        self.watermark, self.max_t, self.pending = core["watermark"], core["max_t"], core["pending"]
        for name, obj in parts.items():
            kind, seq = name.split(":")
            (self.dec_chunks if kind == "dec" else self.seen_chunks)[int(seq)] = obj

    def _seen(self, kind: str) -> np.ndarray:
        if self._seen_cache is None:
            self._seen_cache = {k: np.concatenate([c[1][k] for c in self.seen_chunks.values() if k in c[1]]
                                                  or [np.zeros(0, np.uint64)]) for k in KINDS}
        return self._seen_cache[kind]

    def _decision_index(self):
        if self._dec_cache is None:
            chunks = [c[1] for _, c in sorted(self.dec_chunks.items())]
            df = pd.concat(chunks, ignore_index=True) if chunks else None
            if df is None:
                self._dec_cache = (pd.Index(np.zeros(0, np.uint64)), None)
            else:
                keep = ~df["h"].duplicated(keep="last").to_numpy()
                df = df[keep].reset_index(drop=True)
                self._dec_cache = (pd.Index(df["h"].to_numpy()), df)
        return self._dec_cache

    # ------------------------------------------------------------------ slice
    def _take(self, seq: int, payloads: list) -> list:
        p: ReaderPart = payloads[0]
        self.events_in += sum(len(df) for df in p.batches.values())
        wm = self.watermark
        quarantine = []
        new_seen = {}
        for kind in KINDS:
            df = p.batches.get(kind)
            if df is None or not len(df):
                continue
            h = id_hash(df[self._id[kind]].to_numpy())
            dup = pd.Series(h).duplicated().to_numpy() | np.isin(h, self._seen(kind))
            t = df["event_time"].to_numpy(np.int64)
            late = ~dup & (t <= wm) if wm is not None else np.zeros(len(df), bool)
            for reason, mask in (("duplicate", dup), ("late", late)):
                if mask.any():
                    quarantine += [(kind, r, reason) for r in df[mask].to_dict("records")]
            new_seen[kind] = (h[~dup], t[~dup])
            ok = ~(dup | late)
            if ok.any():
                acc = df[ok].assign(_h=h[ok])
                prev = self.pending.get(kind)
                self.pending[kind] = acc if prev is None or not len(prev) else pd.concat([prev, acc], ignore_index=True)
        if any(len(h) for h, _ in new_seen.values()):
            max_seen = max(int(t.max()) for _, t in new_seen.values() if len(t))
            self.seen_chunks[seq] = (max_seen, {k: h for k, (h, _) in new_seen.items()})
            self._put_part(f"seen:{seq}", self.seen_chunks[seq])
            self._seen_cache = None
        if p.clock_t is not None:
            self.max_t = p.clock_t if self.max_t is None else max(self.max_t, int(p.clock_t))
            new_wm = self.max_t - self._bound
            if self.watermark is None or new_wm > self.watermark:
                self.watermark = new_wm
        outs = self._release(seq, final=False, quarantine=quarantine)
        outs[-1].lines, outs[-1].quarantined = p.lines, list(p.quarantined)
        self._expire()
        return outs

    def _finish(self) -> list:
        seq = self.next_seq
        self.next_seq += 1
        return self._release(seq, final=True, quarantine=[])

    def _release(self, seq: int, final: bool, quarantine: list) -> list:
        wm = self.watermark
        released = {}
        for kind in KINDS:
            df = self.pending.get(kind)
            if df is None or not len(df):
                continue
            if final:
                released[kind], self.pending[kind] = df, None
            else:
                m = (df["event_time"].to_numpy(np.int64) <= wm) if wm is not None else np.zeros(len(df), bool)
                if m.any():
                    released[kind] = df[m]
                    self.pending[kind] = df[~m].reset_index(drop=True)
        self.pending = {k: v for k, v in self.pending.items() if v is not None and len(v)}
        counts = {"processed": {}, "pending": sum(len(v) for v in self.pending.values())}
        acc_rows = {kt: [] for kt in self.spec.key_type_names}
        decisions = attributed = None

        dec = released.get("decision")
        if dec is not None:
            dec = dec.reset_index(drop=True)
            consent = dec["consent"].to_numpy(bool)
            idx = pd.DataFrame({"h": dec["_h"].to_numpy(np.uint64), "t": dec["event_time"].to_numpy(np.int64)})
            treated = (dec["arm"].to_numpy(object) == "treatment")
            hashes = {}                    # one hash per entity column, shared by the key types

            def h(cols):
                for c in cols:
                    if c not in hashes:
                        hashes[c] = id_hash(dec[c].to_numpy(object))
                return key_hash([hashes[c] for c in cols], hashed=True)

            ids = dec["decision_id"].to_numpy(object)
            for kt in self.spec.key_types:
                k = h(kt.entities)
                r = shard_of(h(kt.route_by), self.acc_shards)
                if kt.user_level:
                    k = np.where(consent, k, np.uint64(0))
                    r = np.where(consent, r, -1)
                idx[f"k:{kt.name}"], idx[f"s:{kt.name}"] = k, r
                has = k != 0
                n = int(has.sum())
                rows = {"t": idx["t"].to_numpy()[has], "rank": np.zeros(n, np.int8), "id": ids[has],
                        "key": k[has], "metric": np.zeros(n, np.int8), "query": np.ones(n, bool),
                        "contrib": treated[has], "decision_id": ids[has], "_shard": r[has]}
                for e in kt.entities:
                    rows[e] = dec[e].to_numpy(object)[has]
                acc_rows[kt.name].append(rows)
            self.dec_chunks[seq] = (int(idx["t"].max()), idx)
            self._put_part(f"dec:{seq}", self.dec_chunks[seq])
            self._dec_cache = None
            decisions = dec.drop(columns="_h")
            counts["processed"]["decision"] = len(dec)

        outs = [df.assign(kind=kind).reset_index(drop=True) for kind, df in released.items() if kind != "decision"]
        if outs:
            index, table = self._decision_index()
            att = []
            for o in outs:
                kind = o["kind"].iat[0]
                pos = index.get_indexer(id_hash(o["decision_id"].to_numpy(object))) if table is not None \
                    else np.full(len(o), -1)
                t = o["event_time"].to_numpy(np.int64)
                found = pos >= 0
                dt = np.where(found, table["t"].to_numpy()[np.maximum(pos, 0)] if table is not None else 0, 0)
                ok = found & (t - dt >= 0) & (t - dt <= self._windows[kind])
                if (~ok).any():
                    quarantine += [(kind, r, "unattributed")
                                   for r in o[~ok].drop(columns=["_h", "kind"]).to_dict("records")]
                if not ok.any():
                    continue
                good, gpos = o[ok], pos[ok]
                metric = np.int8(KIND_RANK[kind])
                for kt in self.spec.key_type_names:
                    k = table[f"k:{kt}"].to_numpy()[gpos]
                    has = k != 0
                    n = int(has.sum())
                    rows = {"t": t[ok][has], "rank": np.full(n, metric, np.int8),
                            "id": good["event_id"].to_numpy(object)[has], "key": k[has],
                            "metric": np.full(n, metric, np.int8), "query": np.zeros(n, bool),
                            "contrib": np.ones(n, bool), "decision_id": np.full(n, None, object),
                            "_shard": table[f"s:{kt}"].to_numpy()[gpos][has]}
                    acc_rows[kt].append(rows)
                att.append(pd.DataFrame({
                    "event_id": good["event_id"].to_numpy(object), "decision_id": good["decision_id"].to_numpy(object),
                    "kind": kind, "event_time": t[ok], "rank": np.full(int(ok.sum()), metric, np.int8),
                    "value": good["value"].to_numpy(float) if kind == "conversion" else np.zeros(int(ok.sum()))}))
                counts["processed"][kind] = int(ok.sum())
            if att:
                attributed = pd.concat(att, ignore_index=True)

        clock, is_final = (self.max_t, True) if final else (wm, False)
        # one column batch per key type and accumulator shard (empty ones too: each shard waits
        # for a part from every attribution shard)
        to_acc = [{} for _ in range(self.acc_shards)]
        for kt in self.spec.key_type_names:
            batches = acc_rows[kt]
            if not batches:
                continue
            cols = list(dict.fromkeys(c for b in batches for c in b))     # outcome rows carry no entities
            rows = {c: np.concatenate([b[c] if c in b else np.full(len(b["t"]), None, object) for b in batches])
                    for c in cols}
            shard = rows.pop("_shard")
            order = np.argsort(shard, kind="stable")
            bounds = np.searchsorted(shard[order], np.arange(self.acc_shards + 1))
            for j in range(self.acc_shards):
                take = order[bounds[j]:bounds[j + 1]]
                if len(take):
                    to_acc[j][kt] = {c: v[take] for c, v in rows.items()}
        out = RouterOut(seq=seq, shard=self.shard, decisions=decisions, attributed=attributed,
                        quarantine=quarantine, counts=counts, clock=clock, final=is_final, to_acc=to_acc)
        if self.restored_from is not None:
            out.timing["restored_from_seq"], self.restored_from = self.restored_from, None
        return [out]

    def _expire(self) -> None:
        wm = self.watermark
        if wm is None:
            return
        for s, (max_t, _) in list(self.dec_chunks.items()):
            if max_t + self._retention < wm:
                del self.dec_chunks[s]
                self._drop_part(f"dec:{s}")
                self._dec_cache = None
        for s, (max_t, _) in list(self.seen_chunks.items()):
            if max_t + self._ttl < wm:
                del self.seen_chunks[s]
                self._drop_part(f"seen:{s}")
                self._seen_cache = None
