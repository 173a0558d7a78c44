"""A deliberately simple batch reference of the features engine: one event at a time,
dicts and ``DecayedSum`` objects, no numpy. Tests compare the engine with it."""

from __future__ import annotations

from collections import defaultdict

from schemas import CONTRACTS
from udfs.decay import DecayedSum
from udfs.features import KEY_SEP, KEY_TYPES, KIND_RANK, METRICS, parse_duration


def reference(slices, half_lives=("1h", "1d", "7d"), out_of_orderness="5m",
              click_window="1h", conversion_window="7d"):
    """``slices``: list (in sequence order) of {stream: [record dicts]} in arrival order.

    Returns (features: {key type: {key: {feature: value as of last event}}},
             enriched: {decision_id: {feature column: value}}, reasons: {reason: count}).
    """
    bound = parse_duration(out_of_orderness)
    windows = {"click": parse_duration(click_window), "conversion": parse_duration(conversion_window)}
    hls = [(h, parse_duration(h)) for h in half_lives]
    seen, accepted, reasons = set(), [], defaultdict(int)
    wm = None
    max_t = None
    for batches in slices:
        for kind, recs in batches.items():
            for r in recs:
                eid = r[CONTRACTS[kind].id_field]
                if (kind, eid) in seen:
                    reasons["duplicate"] += 1
                    continue
                seen.add((kind, eid))
                if wm is not None and r["event_time"] <= wm:
                    reasons["late"] += 1
                    continue
                accepted.append((r["event_time"], KIND_RANK[kind], eid, kind, r))
                max_t = r["event_time"] if max_t is None else max(max_t, r["event_time"])
        if max_t is not None:
            wm = max_t - bound if wm is None else max(wm, max_t - bound)
    accepted.sort(key=lambda e: e[:3])

    acc = defaultdict(lambda: {(m, h): DecayedSum(ms) for m in METRICS for h, ms in hls})
    decisions = {}
    enriched = {}
    for t, rank, eid, kind, r in accepted:
        if kind == "decision":
            keys = {"campaign_creative": r["campaign_id"] + KEY_SEP + r["creative_id"]}
            if r["consent"]:
                keys["user"] = r["user_id"]
                keys["user_campaign"] = r["user_id"] + KEY_SEP + r["campaign_id"]
            decisions[eid] = (t, keys)
            row = {}
            for kt in KEY_TYPES:
                for m in METRICS:
                    for h, _ in hls:
                        col = f"{kt}__{m}_{h}"
                        row[col] = acc[(kt, keys[kt])][(m, h)].get(t) if kt in keys else None
            enriched[eid] = row
            metric, owner = ("impressions", keys) if r["arm"] == "treatment" else (None, keys)
        else:
            d = decisions.get(r["decision_id"])
            if d is None or not (0 <= t - d[0] <= windows[kind]):
                reasons["unattributed"] += 1
                continue
            metric, owner = ("clicks" if kind == "click" else "conversions"), d[1]
        if metric is None:
            continue
        for kt, key in owner.items():
            for h, _ in hls:
                acc[(kt, key)][(metric, h)].update(1.0, t)
    features = {kt: {} for kt in KEY_TYPES}
    for (kt, key), sums in acc.items():
        last = max((s.last_t for s in sums.values() if s.last_t is not None), default=None)
        if last is None:
            continue
        features[kt][key] = {f"{m}_{h}": sums[(m, h)].get(last) for m in METRICS for h, _ in hls}
        features[kt][key]["as_of"] = last
    return features, enriched, dict(reasons)
