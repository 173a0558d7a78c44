"""Traffic simulator: seedable ad traffic with ground truth.

Writes, under ``--out``::

    decision/part-NNNNN.jsonl    click/part-NNNNN.jsonl    conversion/part-NNNNN.jsonl
    manifest/slices-NNNNN.jsonl one line per slice: {"seq", "files": {stream: path}, "lines": {stream: n}}
    truth/decisions.parquet      true click/conversion probabilities, true uplift, delay rate per decision
    truth/campaigns.parquet      true delay rate and base rates per campaign
    truth/summary.json           what was injected: duplicates, malformed records by kind, late events

Events are written in *arrival* order (event time plus delivery jitter), cut
into slices; slices are announced in manifest files (``manifest_every`` slices
per file, default all in one) only after their data files are complete, so a
monitoring source never reads a half-written file. One file keeps the slices in
order for Flink's FileSource (which hands files out in no particular order).

Model: users with latent tastes and a Zipf-like activity; campaigns with
creatives; a logging policy that scores K random candidates and picks the best
with probability 1-ε (else uniformly), recording the propensity of its choice;
a hash-based holdout (control arm: logged, not shown); click and conversion
probabilities that depend on user, context and creative, with heterogeneous
uplift (some users none or negative); conversion delays exponential per
campaign. The stream ends at ``start + days``: conversions later than that are
never delivered (they are censored, as in a real log read at that moment).

Two worlds (``world=``, CLI ``--world``):

- ``latent`` (default): the holdout is drawn per user (a hash of the user id) and the
  uplift is mostly a latent per-user persuadability times a creative's persuasion: no
  observed feature carries most of it;
- ``observable``: the holdout is drawn per decision, and the uplift (on the logit
  scale of the conversion probability) is a function of observable context cells:
  campaign, creative, placement, device and the crosses placement×creative and
  device×campaign, some cells negative, some exactly zero (one campaign in four has no
  effect at all). The control arm's conversion probability depends on the user, the
  campaign, the placement and the device, never on the unshown creative.

In both, ``truth/decisions.parquet`` records the true uplift of every decision.

    python -m tools.simulate --events 200000 --out data/sim --seed 7
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

from udfs.features import parse_duration

__all__ = ["simulate", "SimConfig"]

PLACEMENTS = np.array(["feed", "story", "search", "sidebar"])
DEVICES = np.array(["ios", "android", "web"])
REGIONS = np.array(["na", "eu", "apac", "latam"])
DAY = 86_400_000
WORLDS = ("latent", "observable")


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _hex_ids(prefix: str, seed: int, n: int) -> np.ndarray:
    salt = f"{prefix}:{seed}:".encode()
    return np.array([prefix + hashlib.blake2b(salt + str(i).encode(), digest_size=8).hexdigest()
                     for i in range(n)])


class SimConfig(dict):
    """Simulator parameters, with defaults (every key can be overridden)."""
    DEFAULTS = dict(
        events=200_000,            # total delivered lines, roughly (decisions are ~85%)
        users=20_000, campaigns=12, creatives_per_campaign=4,
        start_ms=1_767_225_600_000,  # 2026-01-01T00:00:00Z
        days=4.0,
        candidates=5, epsilon=0.2, holdout_pct=10,
        jitter_mean="20s", out_of_orderness="5m",
        late_rate=0.002, duplicate_rate=0.01, malformed_rate=0.005,
        slice_lines=25_000, manifest_every=0, seed=7, world="latent",
    )

    def __init__(self, **kw):
        unknown = set(kw) - set(self.DEFAULTS)
        if unknown:
            raise ValueError(f"unknown simulator settings: {sorted(unknown)}")
        super().__init__({**self.DEFAULTS, **kw})


def _observable_world(cfg, n_dec, chosen, cre_camp, camp_base, user_base, placement, device):
    """The observable-uplift world: (arm, treated, P(conversion | control), P(conversion | treatment)).
    Drawn from a generator of its own (seeded by the seed), so the shared draws are the latent
    world's."""
    g = np.random.default_rng([int(cfg["seed"]), 1])
    C = len(camp_base)
    n_cre = len(cre_camp)
    camp = cre_camp[chosen]
    p_i = pd.Index(PLACEMENTS).get_indexer(placement)
    d_i = pd.Index(DEVICES).get_indexer(device)
    # baseline (control) logit: user, campaign, placement, device; not the unshown creative
    base = camp_base[camp] + user_base + np.array([0.1, 0.0, 0.3, -0.2])[p_i] + np.array([0.0, 0.1, -0.1])[d_i]
    # uplift logit by observable cell: main effects and two crosses, sparse, some negative
    camp_eff = g.normal(0.25, 0.3, C)
    cre_eff = g.normal(0.0, 0.3, n_cre) * (g.random(n_cre) < 0.7)
    place_eff = np.array([0.35, 0.0, 0.2, -0.45])
    dev_eff = np.array([0.15, 0.0, -0.3])
    pc = g.normal(0.0, 0.35, (len(PLACEMENTS), n_cre)) * (g.random((len(PLACEMENTS), n_cre)) < 0.4)
    dc = g.normal(0.0, 0.3, (len(DEVICES), C)) * (g.random((len(DEVICES), C)) < 0.5)
    zero = np.zeros(C, bool)
    zero[::4] = True                                   # one campaign in four: no effect anywhere
    tau = camp_eff[camp] + cre_eff[chosen] + place_eff[p_i] + dev_eff[d_i] + pc[p_i, chosen] + dc[d_i, camp]
    tau = np.where(zero[camp], 0.0, tau)
    holdout = g.random(n_dec) < cfg["holdout_pct"] / 100.0   # per decision
    return (np.where(holdout, "control", "treatment"), ~holdout, _sigmoid(base), _sigmoid(base + tau))


def simulate(out: str | os.PathLike, **kw) -> dict:
    """Generate traffic into ``out``; returns the summary (also written to truth/summary.json)."""
    cfg = SimConfig(**kw)
    if cfg["world"] not in WORLDS:
        raise ValueError(f"world must be one of {WORLDS}, not {cfg['world']!r}")
    rng = np.random.default_rng(cfg["seed"])
    out = Path(out)
    for sub in ("decision", "click", "conversion", "manifest", "truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    n_dec = int(cfg["events"] / 1.12)  # clicks and conversions add ~12%
    U, C, K = cfg["users"], cfg["campaigns"], cfg["creatives_per_campaign"]
    dim = 4

    # --- population -------------------------------------------------------
    user_ids = _hex_ids("u_", cfg["seed"], U)
    user_taste = rng.normal(0, 1, (U, dim))
    user_activity = rng.pareto(1.5, U) + 1
    user_activity /= user_activity.sum()
    user_base = rng.normal(0, 0.5, U)                  # organic conversion propensity
    user_sens = rng.normal(0.6, 0.8, U)                # persuadability: some <= 0
    user_consent = rng.random(U) < 0.9
    holdout = np.array([int(u[2:6], 16) % 100 < cfg["holdout_pct"] for u in user_ids])

    camp_ids = np.array([f"cmp_{i:03d}" for i in range(C)])
    camp_delay_mean_h = rng.uniform(6, 72, C)          # mean conversion delay, hours
    camp_rate = 1.0 / (camp_delay_mean_h * 3_600_000)  # per ms
    camp_base = rng.normal(-3.2, 0.4, C)
    n_cre = C * K
    cre_ids = np.array([f"cre_{c:03d}_{k}" for c in range(C) for k in range(K)])
    cre_camp = np.repeat(np.arange(C), K)
    cre_vec = rng.normal(0, 0.6, (n_cre, dim))
    cre_quality = rng.normal(0, 0.3, n_cre)
    cre_persuasion = rng.uniform(0.0, 1.0, n_cre)
    place_eff = dict(zip(PLACEMENTS, [0.3, 0.0, 0.5, -0.6]))
    dev_eff = dict(zip(DEVICES, [0.1, 0.0, -0.2]))

    # --- decisions --------------------------------------------------------
    start, span = cfg["start_ms"], int(cfg["days"] * DAY)
    t_dec = np.sort(start + rng.integers(0, span, n_dec))
    u = rng.choice(U, n_dec, p=user_activity)
    placement = PLACEMENTS[rng.integers(0, len(PLACEMENTS), n_dec)]
    device = DEVICES[rng.integers(0, len(DEVICES), n_dec)]
    region = REGIONS[rng.integers(0, len(REGIONS), n_dec)]
    hour = ((t_dec // 3_600_000) % 24).astype(np.int64)
    ctx = np.vectorize(place_eff.get)(placement) + np.vectorize(dev_eff.get)(device)

    cand = rng.integers(0, n_cre, (n_dec, cfg["candidates"]))
    true_logit = np.einsum("nd,nkd->nk", user_taste[u], cre_vec[cand]) + cre_quality[cand]
    policy_score = true_logit + rng.normal(0, 0.7, true_logit.shape)   # an imperfect model
    greedy = policy_score.argmax(axis=1)
    explore = rng.random(n_dec) < cfg["epsilon"]
    pick = np.where(explore, rng.integers(0, cfg["candidates"], n_dec), greedy)
    chosen = cand[np.arange(n_dec), pick]
    Kc, eps = cfg["candidates"], cfg["epsilon"]
    # a creative may appear more than once among the candidates: count its copies
    copies = (cand == chosen[:, None]).sum(axis=1)
    is_greedy = cand[np.arange(n_dec), greedy] == chosen
    propensity = (1 - eps) * is_greedy + eps * copies / Kc
    arm = np.where(holdout[u], "control", "treatment")
    treated = ~holdout[u]

    p_click = _sigmoid(-3.0 + true_logit[np.arange(n_dec), pick] + ctx)
    if cfg["world"] == "latent":
        p_conv0 = _sigmoid(camp_base[cre_camp[chosen]] + user_base[u])
        p_conv1 = _sigmoid(camp_base[cre_camp[chosen]] + user_base[u]
                           + user_sens[u] * cre_persuasion[chosen])
    else:
        arm, treated, p_conv0, p_conv1 = _observable_world(cfg, n_dec, chosen, cre_camp, camp_base,
                                                           user_base[u], placement, device)
    uplift = p_conv1 - p_conv0

    clicked = treated & (rng.random(n_dec) < p_click)
    converted = rng.random(n_dec) < np.where(treated, p_conv1, p_conv0)
    rate = camp_rate[cre_camp[chosen]]
    t_click = t_dec + np.minimum(rng.exponential(60_000, n_dec), 3_000_000).astype(np.int64)
    t_conv = t_dec + rng.exponential(1.0 / rate).astype(np.int64) + 1
    horizon = start + span
    conv_delivered = converted & (t_conv <= horizon)

    dec_ids = _hex_ids("d_", cfg["seed"], n_dec)
    user_col = user_ids[u]
    records = []   # (arrival, stream, dict)
    jitter_mean = parse_duration(cfg["jitter_mean"])
    bound = parse_duration(cfg["out_of_orderness"])

    def arrivals(t):
        j = np.minimum(rng.exponential(jitter_mean, len(t)), 0.8 * bound)
        late = rng.random(len(t)) < cfg["late_rate"]
        j = np.where(late, bound + rng.uniform(60_000, 3_600_000, len(t)), j)
        return t + j.astype(np.int64), late

    a_dec, late_dec = arrivals(t_dec)
    for i in range(n_dec):
        records.append((a_dec[i], "decision", {
            "decision_id": dec_ids[i], "event_time": int(t_dec[i]), "user_id": user_col[i],
            "placement": placement[i], "device": device[i], "region": region[i],
            "hour": int(hour[i]), "campaign_id": camp_ids[cre_camp[chosen[i]]],
            "creative_id": cre_ids[chosen[i]], "arm": arm[i],
            "propensity": round(float(propensity[i]), 6), "policy_id": "eps_greedy_v1",
            "model_version": "policy-2026.01", "feature_schema_version": 1,
            "consent": bool(user_consent[u[i]])}))
    ci = np.flatnonzero(clicked)
    a_clk, late_clk = arrivals(t_click[ci])
    for j, i in enumerate(ci):
        records.append((a_clk[j], "click", {"event_id": "k" + dec_ids[i][1:], "decision_id": dec_ids[i],
                                            "event_time": int(t_click[i])}))
    vi = np.flatnonzero(conv_delivered)
    a_cnv, late_cnv = arrivals(t_conv[vi])
    values = np.round(rng.lognormal(3.0, 0.8, len(vi)), 2)
    for j, i in enumerate(vi):
        records.append((a_cnv[j], "conversion", {"event_id": "v" + dec_ids[i][1:], "decision_id": dec_ids[i],
                                                 "event_time": int(t_conv[i]), "value": float(values[j])}))

    # --- delivery faults --------------------------------------------------
    n = len(records)
    dup_idx = np.flatnonzero(rng.random(n) < cfg["duplicate_rate"])
    dups = [(records[i][0] + int(rng.exponential(30_000)) + 1, records[i][1], records[i][2]) for i in dup_idx]
    malformed_kinds = ["bad_json", "missing", "type", "range", "timestamp"]
    bad_idx = np.flatnonzero(rng.random(n) < cfg["malformed_rate"])
    bad_kind_counts = dict.fromkeys(malformed_kinds, 0)
    bad_kinds = rng.integers(0, len(malformed_kinds), len(bad_idx))
    bad_set = {int(i): malformed_kinds[k] for i, k in zip(bad_idx, bad_kinds)}
    all_records = records + dups
    lines = []
    for idx, (arr, stream, rec) in enumerate(all_records):
        kind = bad_set.get(idx)
        if kind is None:
            lines.append((arr, stream, orjson.dumps(rec)))
            continue
        rec = dict(rec)
        if kind == "bad_json":
            line = orjson.dumps(rec)[:-7]
        elif kind == "missing":
            rec.pop("event_time")
            line = orjson.dumps(rec)
        elif kind == "type":
            rec["event_time"] = str(rec["event_time"])
            line = orjson.dumps(rec)
        elif kind == "range":
            if stream == "decision":
                rec["propensity"] = 1.5
            else:
                rec["decision_id"] = ""   # empty id: a type failure of the contract
                kind = "type"
            line = orjson.dumps(rec)
        else:
            rec["event_time"] = -rec["event_time"]
            line = orjson.dumps(rec)
        bad_kind_counts[kind] += 1
        lines.append((arr, stream, line))
    lines.sort(key=lambda r: r[0])

    # --- write slices -----------------------------------------------------
    per = cfg["slice_lines"]
    totals = {"decision": 0, "click": 0, "conversion": 0}
    n_slices = 0
    group = []

    def announce(entries):
        first = orjson.loads(entries[0])["seq"]
        tmp = out / "manifest" / f".slices-{first:05d}.jsonl.tmp"
        tmp.write_bytes(b"".join(entries))
        tmp.rename(out / "manifest" / f"slices-{first:05d}.jsonl")   # announce atomically

    for seq, s0 in enumerate(range(0, len(lines), per)):
        chunk = lines[s0:s0 + per]
        files, counts = {}, {}
        for stream in totals:
            body = b"\n".join(l for _, st, l in chunk if st == stream)
            cnt = sum(1 for _, st, _ in chunk if st == stream)
            rel = f"{stream}/part-{seq:05d}.jsonl"
            (out / rel).write_bytes(body + (b"\n" if body else b""))
            files[stream], counts[stream] = rel, cnt
            totals[stream] += cnt
        group.append(orjson.dumps({"seq": seq, "root": str(out.resolve()), "files": files,
                                   "lines": counts}) + b"\n")
        n_slices += 1
        if cfg["manifest_every"] and len(group) == cfg["manifest_every"]:
            announce(group)
            group = []
    if group:
        announce(group)

    truth = pd.DataFrame({
        "decision_id": dec_ids, "event_time": t_dec, "user_id": user_col,
        "campaign_id": camp_ids[cre_camp[chosen]], "creative_id": cre_ids[chosen], "arm": arm,
        "placement": placement, "device": device, "region": region, "hour": hour,
        "propensity": propensity, "p_click": np.where(treated, p_click, 0.0),
        "p_conv_treatment": p_conv1, "p_conv_control": p_conv0, "true_uplift": uplift,
        "clicked": clicked, "converted": converted, "conversion_delivered": conv_delivered,
        "conversion_time": np.where(converted, t_conv, -1), "click_time": np.where(clicked, t_click, -1),
        "delay_rate_per_ms": rate, "decision_late": late_dec,
    })
    truth.to_parquet(out / "truth" / "decisions.parquet", index=False)
    pd.DataFrame({"campaign_id": camp_ids, "delay_rate_per_ms": camp_rate,
                  "mean_delay_hours": camp_delay_mean_h, "base_logit": camp_base}) \
        .to_parquet(out / "truth" / "campaigns.parquet", index=False)
    summary = {
        "config": dict(cfg), "slices": n_slices, "lines": totals, "lines_total": sum(totals.values()),
        "decisions": int(n_dec), "clicks": int(clicked.sum()), "conversions_delivered": int(conv_delivered.sum()),
        "duplicates_injected": len(dups), "malformed_injected": bad_kind_counts,
        "late_injected": int(late_dec.sum() + late_clk.sum() + late_cnv.sum()),
        "end_ms": int(horizon),
    }
    (out / "truth" / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def main(argv=None) -> None:
    from jobs.config import quiet_third_party_warnings

    quiet_third_party_warnings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    for key, default in SimConfig.DEFAULTS.items():
        typ = type(default) if not isinstance(default, str) else str
        p.add_argument("--" + key.replace("_", "-"), type=typ, default=None)
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    kw = {k: v for k, v in args.items() if v is not None}
    t0 = time.time()
    s = simulate(out, **kw)
    print(json.dumps({k: s[k] for k in ("slices", "lines", "lines_total", "duplicates_injected",
                                         "malformed_injected", "late_injected")}),
          f"({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
