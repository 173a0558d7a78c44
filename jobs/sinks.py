"""Sinks of the features job: every output file is named by slice sequence number.

Per slice: ``enriched/`` (decisions with their features), ``attributed/`` (clicks
and conversions joined to a decision), ``offline/`` (Feast offline store),
``quarantine/``, ``stats/``, and last ``handoff/slice-N.json``, one JSON line
naming the slice's files and its event-time clock: the outcomes and learner jobs'
input when the hand-off is on files. On Kafka (``kafka.handoff``) the slice goes to
the hand-off topic instead and no hand-off line is written: ``enriched/`` and
``attributed/`` stay as the features job's own record of what it handed off
(no other job reads them).

A replayed slice rewrites the same files with the same contents, and Feast
online writes skip rows older than the stored ones, so replays and restarts
are idempotent.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import orjson

from jobs.config import Config
from stores.feast_store import write_offline, write_online
from udfs.validation import reason_kind

__all__ = ["atomic_write", "atomic_parquet", "write_slice_files", "write_online_frames", "summarize", "read_enriched",
           "read_quarantine", "record_source_fault", "record_alert"]


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` to a hidden file beside ``path``, then rename it into place: readers see
    the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    write(tmp)
    tmp.rename(path)


def atomic_write(path: Path, data: bytes) -> None:
    _atomic(path, lambda tmp: tmp.write_bytes(data))


def atomic_parquet(path: Path, df) -> None:
    _atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_online_frames(cfg: Config, store, seq: int, online: dict, shard: int = 0) -> dict:
    """Feast online writes of one emission of one accumulator shard; their counts go to
    stats/online-<seq>-<shard>.json."""
    import numpy as np

    from udfs.accumulate import FOLDED_COLUMN

    t0 = time.perf_counter()
    rows, lag = {}, []
    for kt, df in online.items():
        rows[kt] = write_online(store, kt, df)
        if FOLDED_COLUMN in df:           # fold -> written (the write returned: readable from here on)
            folded = df[FOLDED_COLUMN].to_numpy()
            lag.append((time.time() * 1000 - folded[folded > 0]) / 1000.0)
    stats = {"seq": seq, "shard": shard, "online_rows": rows, "online_s": round(time.perf_counter() - t0, 3),
             "written_at_ms": int(time.time() * 1000)}
    if lag and sum(len(x) for x in lag):
        lag = np.concatenate(lag)
        stats["freshness_s"] = {"n": int(len(lag)), "p50": round(float(np.percentile(lag, 50)), 3),
                                "p99": round(float(np.percentile(lag, 99)), 3), "max": round(float(lag.max()), 3),
                                "quantiles": [round(float(q), 4) for q in np.percentile(lag, np.arange(101))]}
    atomic_write(cfg.data_dir / "stats" / f"online-{seq:08d}-{shard:03d}.json", json.dumps(stats).encode())
    return stats


def write_slice_files(cfg: Config, o, handoff_line: bool = True) -> dict:
    """Enriched decisions, offline features, quarantine and stats of one slice; and the hand-off
    line unless ``handoff_line`` is off (the slice is handed off on the Kafka topic instead)."""
    t0 = time.perf_counter()
    data = cfg.data_dir
    name = f"slice-{o.seq:08d}"
    files = {}
    for kind, df in (("enriched", o.enriched), ("attributed", o.attributed)):
        if df is not None and len(df):
            files[kind] = f"{kind}/{name}.parquet"
            atomic_parquet(data / files[kind], df)
    offline = {kt: len(df) for kt, df in o.features.items()}
    for kt, df in o.features.items():
        write_offline(cfg, kt, o.seq, df)
    if o.quarantine:
        body = b"".join(orjson.dumps({"stream": st, "reason": r, "reason_kind": reason_kind(r),
                                      "record": rec}) + b"\n" for st, rec, r in o.quarantine)
        atomic_write(data / "quarantine" / f"{name}.jsonl", body)
        files["quarantine"] = f"quarantine/{name}.jsonl"
    q = Counter(reason_kind(r) for _, _, r in o.quarantine)
    stats = {"seq": o.seq, "in": o.counts.get("in", {}), "processed": o.counts.get("processed", {}),
             "quarantined": dict(q), "pending": o.counts.get("pending", 0),
             "enriched": 0 if o.enriched is None else len(o.enriched),
             "offline_rows": offline,
             "timing": {**o.counts.get("timing", {}), "sink_s": round(time.perf_counter() - t0, 3)}}
    atomic_write(data / "stats" / f"{name}.json", json.dumps(stats).encode())
    if not handoff_line:
        return stats
    # the hand-off to the outcomes job, last: the slice's files are complete once it exists
    handoff = {"seq": o.seq, "root": str(data.resolve()), "files": files, "clock": o.clock, "final": o.final}
    atomic_write(data / "handoff" / f"{name}.json", json.dumps(handoff).encode() + b"\n")
    return stats


def record_source_fault(cfg: Config, reason: str, record: str) -> None:
    """A source fault that belongs to no slice (a manifest line that cannot be read, a repeated
    ``seq``): ``<data>/source-faults/<digest>.json``, counted as one input record, quarantined.
    Named by content, so a replay rewrites the same file."""
    import hashlib

    body = {"stream": "manifest", "reason": reason, "reason_kind": reason_kind(reason), "record": record[:2048]}
    name = hashlib.sha256(f"{reason}|{record}".encode()).hexdigest()[:24]
    atomic_write(cfg.data_dir / "source-faults" / f"{name}.json", orjson.dumps(body))


def record_alert(cfg: Config, kind: str, detail: dict) -> None:
    """An operator alert (e.g. a gap in slice numbers): ``<data>/alerts/<kind>-<key>.json`` and a
    warning in the worker's log."""
    import logging

    key = detail.get("seq", "")
    atomic_write(cfg.data_dir / "alerts" / f"{kind}-{key}.json", json.dumps({"kind": kind, **detail}).encode())
    logging.getLogger("streamlift").warning("ALERT %s %s", kind, detail)


def summarize(cfg: Config) -> dict:
    """Totals over the run's per-slice stats: counts must reconcile."""
    files = sorted((cfg.data_dir / "stats").glob("slice-*.json"))
    events_in, processed, quarantined = Counter(), Counter(), Counter()
    online, offline = Counter(), Counter()
    pending = 0
    last_seq = -1
    for f in (cfg.data_dir / "stats").glob("online-*.json"):
        online.update(json.loads(f.read_text())["online_rows"])
    for f in files:
        s = json.loads(f.read_text())
        events_in.update(s["in"]); processed.update(s["processed"]); quarantined.update(s["quarantined"])
        offline.update(s["offline_rows"])
        if s["seq"] > last_seq:
            last_seq, pending = s["seq"], s["pending"]
    for f in (cfg.data_dir / "source-faults").glob("*.json"):      # faults of no slice
        fault = json.loads(f.read_text())
        events_in["manifest"] += 1
        quarantined[fault["reason_kind"]] += 1
    partitions: dict = {}                          # Kafka: what the slices took from each partition
    for f in (cfg.data_dir / "stats").glob("partitions-*.json"):
        for tp, c in json.loads(f.read_text())["partitions"].items():
            t = partitions.setdefault(tp, {"records": 0, "quarantined_on_read": 0,
                                           "first_offset": c["first_offset"], "last_offset": c["last_offset"]})
            t["records"] += c["records"]
            t["quarantined_on_read"] += c["quarantined_on_read"]
            t["first_offset"] = min(t["first_offset"], c["first_offset"])
            t["last_offset"] = max(t["last_offset"], c["last_offset"])
    n_in = sum(events_in.values())
    n_proc, n_q = sum(processed.values()), sum(quarantined.values())
    extra = {"partitions": dict(sorted(partitions.items()))} if partitions else {}
    return {**extra, "slices": len(files), "events_in": n_in, "events_in_by_stream": dict(events_in),
            "processed": n_proc, "processed_by_stream": dict(processed),
            "quarantined": n_q, "quarantined_by_reason": dict(quarantined), "pending": pending,
            "reconciles": n_in == n_proc + n_q + pending,
            "feature_rows_online": dict(online), "feature_rows_offline": dict(offline),
            "alerts": sorted(p.name for p in (cfg.data_dir / "alerts").glob("*.json"))}


def read_enriched(cfg: Config):
    import pandas as pd

    files = sorted((cfg.data_dir / "enriched").glob("slice-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else None


def read_quarantine(cfg: Config) -> list[dict]:
    out = []
    for f in sorted((cfg.data_dir / "quarantine").glob("slice-*.jsonl")):
        out.extend(orjson.loads(l) for l in f.read_bytes().splitlines() if l)
    return out
