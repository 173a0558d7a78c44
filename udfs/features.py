"""The features pipeline: decayed accumulators per key, in event time, sharded by key.

Plain Python and numpy, no Flink. Three steps, each a :class:`udfs.stage.SliceStage`
except the merge; ``jobs/features.py`` runs each as a keyed Flink operator at the
configured parallelism, :class:`FeatureEngine` runs them in one process (tests, bench)::

    slice (validated records)
      │ split_slice: one part per attribution shard, by hash(decision_id), + the slice's
      │              max event time (every shard gets it: one clock for all shards)
      ▼ AttributionStage × N  (udfs/attribution.py)  dedupe, lateness, release at the clock,
      │                       clicks/conversions ⋈ decision -> rows per key type, by key shard
      ▼ AccumulatorStage × M  (udfs/accumulate.py)    decayed sums, point-in-time enrichment
      ▼ merge_slice                                    one SliceOutput per slice: enriched
                                                       decisions, attributed outcomes, offline
                                                       features, quarantine, counts

Released events are taken in the total order ``(event_time, kind, id)`` (decisions before
clicks before conversions at equal times); each decision is enriched with its keys'
accumulators strictly before it. Impressions count treatment-arm decisions; user-level
keys are kept only for decisions with ``consent``. The results do not depend on N or M
(tested): each key's events reach one accumulator shard in the same order, and every
shard runs on the same clock and landmark.

Every input record ends in exactly one place: processed, quarantined with a reason, or
still pending (behind the watermark) until the stream ends; :meth:`FeatureEngine.flush`
releases everything at end of input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from schemas import CONTRACTS
from udfs.accumulate import FOLDED_COLUMN, KEY_COLUMN, AccPart, AccumulatorStage
from udfs.attribution import AttributionStage, ReaderPart
from udfs.keys import id_hash, order_by, shard_of
from udfs.spec import KIND_RANK, METRICS, FeatureSpec, parse_duration

__all__ = ["FeatureEngine", "SliceOutput", "split_slice", "withhold_user_ids", "merge_slice", "to_frames",
           "KEY_TYPES", "METRICS", "KIND_RANK", "parse_duration", "feature_names", "ENTITY_COLUMNS", "KEY_SEP"]

_DEFAULT = FeatureSpec()
KEY_TYPES = _DEFAULT.key_type_names
ENTITY_COLUMNS = {kt.name: kt.entities for kt in _DEFAULT.key_types}
#: separator of composite keys in test and report listings only (the engines hash each column)
KEY_SEP = "|"


def feature_names(half_lives) -> list[str]:
    """Feature names of one key type, e.g. ``impressions_1h`` (:meth:`FeatureSpec.feature_names`)."""
    return list(FeatureSpec(half_lives=tuple(half_lives)).feature_names())


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


# ----------------------------------------------------------------------------- reading side
def to_frames(batches: dict) -> dict:
    """stream -> DataFrame in contract columns, from lists of tuples (contract order), lists of
    dicts, column dicts or DataFrames."""
    out = {}
    for kind, recs in batches.items():
        fields = list(CONTRACTS[kind].field_names)
        if isinstance(recs, pd.DataFrame):
            df = recs
        elif isinstance(recs, dict):
            df = pd.DataFrame({f: recs[f] for f in fields})
        elif not len(recs):
            continue
        else:                       # records: dicts, or tuples in contract order
            df = pd.DataFrame.from_records(recs, columns=fields)
        if len(df):
            out[kind] = df
    return out


def withhold_user_ids(dec: pd.DataFrame, forget=None) -> pd.DataFrame:
    """Decisions without ``consent``, or of a user on the forget list ``forget`` (a
    :class:`udfs.privacy.ForgetList`), with an empty ``user_id``: consent, end to end, means no
    user-level value is kept anywhere downstream (features, enriched decisions, hand-off,
    outcome rows, quarantine)."""
    if dec is None or not len(dec):
        return dec
    if "consent" in dec and not dec["consent"].all():
        dec = dec.copy()
        dec.loc[~dec["consent"].astype(bool), "user_id"] = ""
    if forget is not None:
        from udfs.privacy import blank_forgotten

        dec = blank_forgotten(dec, forget)[0]
    return dec


def split_slice(seq: int, batches: dict, lines: dict | None = None, quarantined: list | None = None,
                shards: int = 1, max_future_ms: int | None = None, now_ms: int | None = None,
                forget=None, clock_t: int | None = None) -> list[ReaderPart]:
    """One :class:`ReaderPart` per attribution shard: each record goes to
    ``shard_of(id_hash(decision_id))``; every part carries the slice's max event time (the
    clock input); shard 0 carries the line counts and the validation quarantine.

    With ``max_future_ms``, a record dated more than that after ``now_ms`` (processing time,
    default the wall clock) is quarantined as ``future`` before it can move the clock: one
    mis-dated record would otherwise make every later event ``late``.

    ``clock_t`` replaces the slice's max event time as the clock input (the Kafka source closes
    a slice at its window's end: ``clock_t`` = window end - 1 ms + ``out_of_orderness``).

    A decision without ``consent``, or of a user on the forget list ``forget`` (a
    :class:`udfs.privacy.ForgetList`), loses its ``user_id`` here, before anything else sees it."""
    frames = to_frames(batches)
    quarantined = list(quarantined or [])
    if "decision" in frames:
        frames["decision"] = withhold_user_ids(frames["decision"], forget)
    if max_future_ms is not None:
        import time

        limit = (int(time.time() * 1000) if now_ms is None else int(now_ms)) + int(max_future_ms)
        for kind, df in list(frames.items()):
            ahead = df["event_time"].to_numpy() > limit
            if ahead.any():
                quarantined += [(kind, r, "future") for r in df[ahead].to_dict("records")]
                frames[kind] = df[~ahead].reset_index(drop=True)
        frames = {k: v for k, v in frames.items() if len(v)}
    if clock_t is None:
        ts = [int(df["event_time"].max()) for df in frames.values() if len(df)]
        clock_t = max(ts) if ts else None
    parts = [ReaderPart(seq=seq, clock_t=clock_t, batches={}) for _ in range(shards)]
    parts[0].lines, parts[0].quarantined = (dict(lines) if lines is not None else None), quarantined
    for kind, df in frames.items():
        if shards == 1:
            parts[0].batches[kind] = df
            continue
        s = shard_of(id_hash(df["decision_id"].to_numpy(object)), shards)
        for i in range(shards):
            m = s == i
            if m.any():
                parts[i].batches[kind] = df[m].reset_index(drop=True)
    return parts


# ----------------------------------------------------------------------------- merging side
def _sorted_frames(frames: list, t: str | None = None, rank: str | None = None, by: str | None = None,
                   key: str | None = None) -> pd.DataFrame | None:
    """Concatenate and order by ``(t, rank, by)`` (times, then strings only among ties), or by
    the hash column ``key`` (dropped)."""
    frames = [f for f in frames if f is not None and len(f)]
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if key is not None:
        df = df.take(np.argsort(df[key].to_numpy(), kind="stable")).drop(columns=key)
    else:
        r = df[rank].to_numpy() if rank else None
        df = df.take(order_by(df[t].to_numpy(), r, df[by].to_numpy(object)))
    return df.reset_index(drop=True)


def _quarantine_order(entry) -> tuple:
    stream, rec, reason = entry
    return KIND_RANK.get(stream, 9), reason, str(rec.get(CONTRACTS[stream].id_field, "")) if isinstance(rec, dict) else ""


def merge_slice(spec: FeatureSpec, router_outs: list, acc_outs: list) -> SliceOutput:
    """The :class:`SliceOutput` of one slice from every attribution shard's and every
    accumulator shard's output, ordered so that it does not depend on the shard counts."""
    r0 = router_outs[0]
    out = SliceOutput(seq=r0.seq, clock=r0.clock, final=r0.final)
    dec = _sorted_frames([r.decisions for r in router_outs], t="event_time", by="decision_id")
    if dec is not None:
        index = pd.Index(dec["decision_id"].to_numpy(object))
        data = {c: dec[c] for c in dec.columns}
        for kt in spec.key_type_names:
            block = np.full((len(dec), len(spec.feature_names())), np.nan)
            for a in acc_outs:
                if kt in a.enrich:
                    dids, vals = a.enrich[kt]
                    block[index.get_indexer(dids)] = vals
            for j, col in enumerate(spec.columns(kt)):
                data[col] = block[:, j]
        out.enriched = pd.DataFrame(data)
    att = _sorted_frames([r.attributed for r in router_outs], t="event_time", rank="rank", by="event_id")
    if att is not None:
        out.attributed = att.drop(columns="rank")
    for kt in spec.key_type_names:
        f = _sorted_frames([a.features.get(kt) for a in acc_outs], key=KEY_COLUMN)
        if f is not None:
            out.features[kt] = f
        o = _sorted_frames([a.online.get(kt) for a in acc_outs], key=KEY_COLUMN)
        if o is not None and FOLDED_COLUMN in o:
            o = o.drop(columns=FOLDED_COLUMN)          # wall clock: the freshness measurement only
        if o is not None:
            out.online[kt] = o
    out.quarantine = [q for r in router_outs for q in r.quarantined]
    out.quarantine += sorted((q for r in router_outs for q in r.quarantine), key=_quarantine_order)
    processed = {}
    for r in router_outs:
        for k, v in r.counts["processed"].items():
            processed[k] = processed.get(k, 0) + v
    timing = {}
    for part in [*router_outs, *acc_outs]:
        for k, v in part.timing.items():
            timing[k] = max(timing[k], v) if k in timing else v
    out.counts = {"in": dict(r0.lines) if r0.lines is not None else {}, "processed": processed,
                  "quarantined": {}, "pending": sum(r.counts["pending"] for r in router_outs), "timing": timing}
    return out


# ----------------------------------------------------------------------------- in one process
class FeatureEngine:
    """The whole features pipeline in one process, with ``shards`` attribution and accumulator
    shards (the Flink job runs the same stages as operators).

    Parameters are stored unchanged (durations as given, e.g. ``"1h"``).

    >>> eng = FeatureEngine(half_lives=("1h",), out_of_orderness="0ms")
    >>> d = {"decision_id": "d1", "event_time": 1_767_225_600_000, "user_id": "u_0000000000000001",
    ...      "placement": "feed", "device": "ios", "region": "eu", "hour": 0, "campaign_id": "c1",
    ...      "creative_id": "k1", "arm": "treatment", "propensity": 0.5, "policy_id": "p",
    ...      "model_version": "m1", "feature_schema_version": 1, "consent": True}
    >>> out = eng.offer(0, {"decision": [d]})
    >>> out += eng.flush()
    >>> float(out[0].features["user"]["impressions_1h"].iloc[0]), [o.seq for o in out], out[-1].final
    (1.0, [0, 1], True)
    """

    def __init__(self, half_lives=("1h", "1d", "7d"), out_of_orderness="5m", click_window="1h",
                 conversion_window="7d", dedupe_ttl="1d", online_every=1, snapshot_every=8, shards=1,
                 spec_version="v1", spec: FeatureSpec | None = None, max_future=None):
        self.half_lives = tuple(half_lives)
        self.out_of_orderness = out_of_orderness
        self.click_window = click_window
        self.conversion_window = conversion_window
        self.dedupe_ttl = dedupe_ttl
        self.online_every = online_every
        self.snapshot_every = snapshot_every
        self.shards = int(shards)
        self.spec_version = spec_version
        self.max_future = max_future
        self.spec = spec or FeatureSpec(half_lives=self.half_lives, version=spec_version)
        self.feature_columns = list(self.spec.feature_names())
        n = self.shards
        self.routers = [AttributionStage(**self.router_params(i)) for i in range(n)]
        self.accs = [AccumulatorStage(**self.acc_params(j)) for j in range(n)]
        self._r_outs: dict[int, list] = {}
        self._a_outs: dict[int, list] = {}

    def router_params(self, i: int) -> dict:
        return {"spec": self.spec, "shard": i, "shards": self.shards, "acc_shards": self.shards,
                "out_of_orderness": self.out_of_orderness, "click_window": self.click_window,
                "conversion_window": self.conversion_window, "dedupe_ttl": self.dedupe_ttl,
                "snapshot_every": self.snapshot_every}

    def acc_params(self, j: int) -> dict:
        return {"spec": self.spec, "shard": j, "shards": self.shards, "parts": self.shards,
                "online_every": self.online_every, "snapshot_every": self.snapshot_every}

    @property
    def next_seq(self) -> int:
        return self.routers[0].next_seq

    def offer(self, seq: int, batches: dict, lines: dict | None = None,
              quarantined: list | None = None) -> list[SliceOutput]:
        """Hand in slice ``seq`` (stream -> records); returns the outputs of every slice that
        became processable, in sequence order. A slice already taken is ignored."""
        if seq < self.next_seq or seq in self.routers[0].waiting:
            return []
        parts = split_slice(seq, batches, lines, quarantined, self.shards,
                            None if self.max_future is None else parse_duration(self.max_future))
        return self._route([r for i, p in enumerate(parts) for r in self.routers[i].offer(seq, 0, p)])

    def flush(self) -> list[SliceOutput]:
        """End of input: release everything still buffered (one final slice)."""
        return self._route([r for router in self.routers for r in router.flush()]) + \
            [o for a in self.accs for o in a.flush()]

    def _route(self, router_outs) -> list[SliceOutput]:
        for r in router_outs:
            self._r_outs.setdefault(r.seq, []).append(r)
            for j, acc in enumerate(self.accs):
                for a in acc.offer(r.seq, r.shard, AccPart(r.seq, r.clock, r.final, r.to_acc[j], r.shard)):
                    self._a_outs.setdefault(a.seq, []).append(a)
        done = []
        for seq in sorted(self._r_outs):
            rs, accs = self._r_outs[seq], self._a_outs.get(seq, [])
            if len(rs) == self.shards and len(accs) == self.shards:
                done.append(merge_slice(self.spec, sorted(rs, key=lambda r: r.shard),
                                        sorted(accs, key=lambda a: a.shard)))
                del self._r_outs[seq], self._a_outs[seq]
        return done

    # ------------------------------------------------------------------ state
    def state_delta(self) -> dict:
        """Changed state entries of every stage, keys prefixed ``attr<i>/`` and ``acc<j>/``."""
        out = {}
        for i, r in enumerate(self.routers):
            out.update({f"attr{i}/{k}": v for k, v in r.state_delta().items()})
        for j, a in enumerate(self.accs):
            out.update({f"acc{j}/{k}": v for k, v in a.state_delta().items()})
        return out

    def _params(self) -> dict:
        return {"half_lives": self.half_lives, "out_of_orderness": self.out_of_orderness,
                "click_window": self.click_window, "conversion_window": self.conversion_window,
                "dedupe_ttl": self.dedupe_ttl, "online_every": self.online_every,
                "snapshot_every": self.snapshot_every, "shards": self.shards, "spec_version": self.spec_version,
                "max_future": self.max_future}

    @classmethod
    def restore(cls, entries: dict, **params) -> "FeatureEngine":
        """The engine as of the accumulated :meth:`state_delta` entries, under ``params`` (state
        made under another feature spec is refused with :class:`udfs.spec.SpecMismatch`)."""
        eng = cls(**params)
        for i in range(eng.shards):
            sub = {k[len(f"attr{i}/"):]: v for k, v in entries.items() if k.startswith(f"attr{i}/")}
            eng.routers[i] = AttributionStage.restore(sub, **eng.router_params(i))
        for j in range(eng.shards):
            sub = {k[len(f"acc{j}/"):]: v for k, v in entries.items() if k.startswith(f"acc{j}/")}
            eng.accs[j] = AccumulatorStage.restore(sub, **eng.acc_params(j))
        return eng

    def feature_values(self, kt: str) -> pd.DataFrame:
        """Every key's current values, as of its last event (what Feast should hold)."""
        df = _sorted_frames([a.feature_values(kt, with_key=True) for a in self.accs], key=KEY_COLUMN)
        return df if df is not None else self.accs[0].feature_values(kt)
