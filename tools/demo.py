"""make demo: simulate traffic, produce it to Kafka, run the features, outcomes and learner jobs on
the local mini-cluster against the broker (the jobs hand off through the hand-off topic), read
features back from Feast, the outcomes from Iceberg and the models from the model store.

    python -m tools.demo --events 200000 --data-dir data/demo                 # a local broker, started and stopped
    python -m tools.demo --bootstrap-servers host:9092                        # an existing broker
    python -m tools.demo --source files                                       # the file source and hand-off lines
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from jobs.config import load as load_config


def main(argv=None) -> None:
    from jobs.config import quiet_third_party_warnings

    quiet_third_party_warnings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--data-dir", default="data/demo")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--days", type=float, default=10.0, help="simulated days (the conversion window is 7)")
    p.add_argument("--campaigns", type=int, default=6)
    p.add_argument("--slice-lines", type=int, default=5_000,
                   help="files: lines per slice (~5 h of traffic): the learner scores and trains per slice")
    p.add_argument("--source", choices=["kafka", "files"], default="kafka",
                   help="kafka: produce the traffic to the contracts' topics, the jobs read them and hand off "
                        "through the hand-off topic; files: the slice files and hand-off lines")
    p.add_argument("--bootstrap-servers",
                   help="Kafka: an existing broker (topics under a fresh prefix); default: a local broker in "
                        "<data-dir>/kafka, started for the demo and stopped after it")
    p.add_argument("--batch-interval", default="6h",
                   help="Kafka: event time per slice (a replay of 10 days: 6 h, the learner's snapshot interval)")
    args = p.parse_args(argv)

    root = Path(args.data_dir).resolve()
    if root.exists():
        shutil.rmtree(root)           # a demo starts clean: stores, outputs, checkpoints, the local broker
    sim_dir = root / "sim"
    os.environ["STREAMLIFT_PATHS__DATA_DIR"] = str(root / "run")
    broker = None
    if args.source == "kafka":
        from tools.broker import start

        if args.bootstrap_servers:
            bootstrap = args.bootstrap_servers
            os.environ["STREAMLIFT_KAFKA__TOPIC_PREFIX"] = f"streamlift-demo-{int(time.time())}."
        else:
            t0 = time.time()
            broker = start(root / "kafka")
            bootstrap = broker.bootstrap
            print(f"Kafka broker up: bootstrap.servers={bootstrap} (KRaft, {time.time() - t0:.1f}s; "
                  f"log {broker.folder / 'broker.log'})")
        os.environ["STREAMLIFT_KAFKA__BOOTSTRAP_SERVERS"] = bootstrap
        os.environ["STREAMLIFT_KAFKA__BATCH_INTERVAL"] = args.batch_interval
        os.environ["STREAMLIFT_KAFKA__HANDOFF"] = "true"
    t_start = time.time()
    try:
        _demo(args, root, sim_dir, load_config())
        print(f"\ndemo wall time {time.time() - t_start:.0f} s")
    finally:
        if broker is not None:
            from tools.broker import stop

            stop(broker)
            print("Kafka broker stopped")


def _demo(args, root: Path, sim_dir: Path, cfg) -> None:
    from tools.simulate import simulate
    from jobs.features import run

    t0 = time.time()
    truth = simulate(sim_dir, events=args.events, seed=args.seed, days=args.days, campaigns=args.campaigns,
                     slice_lines=args.slice_lines)
    print(f"simulated {truth['lines_total']:,} lines in {truth['slices']} slices "
          f"({time.time() - t0:.1f}s) -> {sim_dir}")
    kafka = None
    if args.source == "kafka":
        from jobs.kafka import handoff_topic, topics
        from tools.produce import create_topics, replay

        kafka = {"bootstrap": cfg.kafka["bootstrap_servers"], "until": "latest"}
        create_topics(cfg)
        sent = replay(cfg, sim_dir)
        print(f"produced {sent['records']:,} records to {', '.join(sorted(topics(cfg)))} "
              f"({sent['records_per_second']:,.0f} records/s); hand-off topic {handoff_topic(cfg)}")
        summary = run(cfg, None, kafka=kafka)
    else:
        summary = run(cfg, sim_dir)

    src = (f"Kafka, {cfg.kafka['batch_interval']} event-time windows, hand-off on the topic" if kafka
           else "slice files, hand-off lines")
    print(f"\n== features job (local mini-cluster, checkpointing on; {src}) ==")
    print(f"events in        {summary['events_in']:>10,}   {summary['events_in_by_stream']}")
    print(f"processed        {summary['processed']:>10,}   {summary['processed_by_stream']}")
    print(f"quarantined      {summary['quarantined']:>10,}   {summary['quarantined_by_reason']}")
    print(f"pending          {summary['pending']:>10,}")
    print(f"reconciles       {str(summary['reconciles']):>10}   (in = processed + quarantined + pending)")
    print(f"online rows      {sum(summary['feature_rows_online'].values()):>10,}   {summary['feature_rows_online']}")
    print(f"offline rows     {sum(summary['feature_rows_offline'].values()):>10,}   {summary['feature_rows_offline']}")
    print(f"wall time        {summary['wall_seconds']:>10.1f} s  (incl. ~6 s Flink start-up)")
    print(f"throughput       {summary['events_per_second']:>10,.0f} events/s end to end")

    # a feature consumer: read the three views for a few users from Feast
    import pandas as pd

    from stores.feast_store import offline_root, open_store
    from udfs.decay import decay_to
    from udfs.features import parse_duration

    store = open_store(cfg, apply=False)
    dec = pd.read_parquet(sim_dir / "truth" / "decisions.parquet",
                          columns=["user_id", "campaign_id", "creative_id"])
    top = dec["user_id"].value_counts().index[:3]
    rows = [{"user_id": u, "campaign_id": dec[dec.user_id == u].campaign_id.iloc[0],
             "creative_id": dec[dec.user_id == u].creative_id.iloc[0]} for u in top]
    feats = ["user_features_v1:impressions_1d", "user_features_v1:clicks_1d",
             "user_features_v1:conversions_7d", "user_campaign_features_v1:impressions_7d",
             "campaign_creative_features_v1:clicks_1d"]
    got = store.get_online_features(features=feats, entity_rows=rows, full_feature_names=True).to_df()
    print("\n== online features (as of each key's last event) via FeatureStore.get_online_features ==")
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(got.round(3).T.to_string(header=False))
    # decay to "now" (the end of the simulated stream) the way a reader does
    now = truth["end_ms"]
    off = pd.read_parquet(f"{offline_root(cfg)}/user_features_v1")
    last = off.sort_values("event_timestamp").groupby("user_id").tail(1).set_index("user_id")
    u = top[0]
    as_of = int(last.at[u, "event_timestamp"].value // 1_000_000)
    v = last.at[u, "impressions_1d"]
    print(f"\n{u}: impressions_1d = {v:.3f} as of its last event; decayed to the end of the stream "
          f"({(now - as_of) / 3.6e6:.1f} h later): {decay_to(v, as_of, now, parse_duration('1d')):.3f}")
    outcomes_report(cfg, sim_dir, kafka)
    summary["learner"] = learner_report(cfg, sim_dir, kafka)
    from tools.report import build_report

    page = build_report(cfg)
    print(f"\n== report: one HTML page of plots (python -m tools.report) ==\n{page}")
    summary["report"] = str(page)
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def outcomes_report(cfg, sim_dir, kafka: dict | None = None) -> dict:
    """Run the outcomes job on the features job's hand-off (the lines, or the topic with ``kafka``)
    and compare with the ground truth."""
    import pandas as pd

    from tools.analyst import accuracy, compare
    from jobs.outcomes import run as run_outcomes

    s = run_outcomes(cfg, kafka=kafka)
    tot = s["totals"]
    n_in = sum(tot["in"].values())
    print("\n== outcomes job (local mini-cluster) -> Iceberg ==")
    print(f"events in        {n_in:>10,}   {tot['in']}")
    print(f"joined           {sum(tot['processed'].values()):>10,}   {tot['processed']}")
    print(f"quarantined      {sum(tot['quarantined'].values()):>10,}   {tot['quarantined']}")
    print(f"pending          {tot['pending']:>10,}")
    print(f"epochs committed {s['epochs']:>10,}   (one per {cfg.outcomes['commit_every']} of event time + end of input)")
    print(f"wall time        {s['wall_seconds']:>10.1f} s  ({n_in / s['wall_seconds']:,.0f} events/s end to end)")
    dq = s.get("data_quality")
    if dq:
        print(f"data quality     {'every expectation held' if dq['success'] else str(dq['failed']) + ' BROKEN'}"
              f"   (Great Expectations suites; Data Docs: {dq['docs']})")
    edq = s.get("epoch_data_quality") or {}
    if edq.get("epochs_checked"):
        print(f"epoch checks     {edq['epochs_checked']:>10,}   epochs validated in the job, "
              f"{edq['failed']} expectation(s) broken")
    for w in s.get("warnings", []):
        print(f"warning: {w}")
    acc = accuracy(cfg, sim_dir)
    print(f"rows             {acc['rows']:>10,}   ({acc['unique_decisions']:,} distinct decisions): "
          f"{acc['interim']:,} interim, {acc['final']:,} final; delay model v{acc['delay_model_version']}")
    print("\n-- delay rate per campaign: estimated (latest fit) vs simulator truth --")
    with pd.option_context("display.width", 160, "display.float_format", "{:.4f}".format):
        print(acc["delay"].to_string())
    oc = acc["open_cohorts"]
    if oc:
        print(f"\n-- conversion rate of the {oc['decisions']:,} decisions still inside their window --")
        print(f"from interim labels   {oc['estimated']:.4f}   ({oc['estimated_relative_error']:+.1%} vs truth)")
        print(f"naive observed        {oc['naive']:.4f}   ({oc['naive_relative_error']:+.1%} vs truth)")
        print(f"truth                 {oc['true']:.4f}   (mean P(conversion within the window) of the simulator)")
    print("\n-- python -m tools.analyst compare: conversion rate by campaign, now vs finalized vs naive --")
    with pd.option_context("display.width", 160, "display.float_format", "{:.4f}".format):
        print(compare(cfg).to_string(index=False))
    return {"summary": s, "open_cohorts": oc, "delay": acc["delay"].reset_index().to_dict("records")}


def learner_report(cfg, sim_dir, kafka: dict | None = None) -> dict:
    """Run the learner job on the hand-off, score its first-sight predictions against the truth,
    then serve: newest snapshot + features from Feast -> calibrated CTR, conversion, uplift."""
    import pandas as pd

    from tools.evaluate import quality
    from jobs.learner import run as run_learner
    from serving.serve import score_requests

    s = run_learner(cfg, kafka=kafka)
    print("\n== learner job (local mini-cluster) -> model store + Iceberg learner_metrics_v1 ==")
    print(f"snapshots        {s['snapshots']:>10,}   (every {cfg.learner['snapshot_every']} of event time or "
          f"{cfg.learner['snapshot_examples']:,} decisions; {s['unsafe_snapshots']} flagged by the drift check)")
    print(f"trained          {s['examples']:>10,}   decisions (interim labels), {s['corrections']:,} corrected to final")
    print(f"wall time        {s['wall_seconds']:>10.1f} s  (learner itself {s['learner_seconds']:.1f} s: "
          f"{s['examples'] / max(s['learner_seconds'], 1e-9):,.0f} examples/s)")
    q = quality(cfg, sim_dir)
    c, v, u, o = q["ctr"], q["conversion"], q["uplift"], q["oracle"]
    print(f"\n-- prequential quality vs the simulator's truth ({q['decisions_scored']:,} decisions after a "
          f"{q['warmup']} warm-up; every score was made before the decision's labels were used) --")
    print(f"CTR          AUC {c['auc']:.4f} (oracle {o['ctr_auc']:.4f}, true p {c['auc_true_p']:.4f})  "
          f"log loss {c['log_loss']:.4f} (oracle {o['ctr_log_loss']:.4f})  ECE {c['ece']:.4f}  "
          f"mean {c['mean_prediction']:.4f} vs rate {c['rate']:.4f}")
    w = q["vw"]
    print(f"             Vowpal Wabbit on the same stream and features: AUC {w['auc']:.4f}  log loss "
          f"{w['log_loss']:.4f}  ECE {w['ece']:.4f}  ({w['scored'] / max(w['seconds'], 1e-9):,.0f} examples/s, "
          f"one model; the learner trains six)")
    print(f"conversion   AUC delayed-feedback {v['auc']:.4f} | naive labels {v['auc_naive']:.4f} | "
          f"oracle {o['conversion_auc']:.4f} (true p {v['auc_true_p']:.4f}): {v['gap_closed']:.0%} of the "
          f"naive-oracle gap closed")
    print(f"             mean prediction {v['mean_prediction']:.4f} (naive {v['mean_prediction_naive']:.4f}) "
          f"vs final rate {v['rate']:.4f}")
    print(f"uplift       Qini T-learner {u['qini_t']:.5f} ({u['ratio_t']:.0%} of ranking by the true uplift "
          f"{u['qini_true_uplift']:.5f}), DR {u['qini_dr']:.5f} ({u['ratio_dr']:.0%}); ranking by each "
          f"creative's mean true uplift: {u['ratio_creative_mean_true_uplift']:.0%}, by each observable "
          f"cell's: {u.get('ratio_cell_mean_true_uplift', float('nan')):.0%}")
    print(f"             mean predicted uplift T {u['mean_t']:+.4f}, DR {u['mean_dr']:+.4f} vs true "
          f"{u['mean_true']:+.4f} (latent world: the holdout is per user and most of the uplift is a "
          f"per-user persuadability no feature observes)")
    last = _last_snapshot_stats(cfg)
    if last is not None:
        _print_ate(last["metrics"].get("ate") or {}, pd.read_parquet(sim_dir / "truth" / "decisions.parquet"),
                   last["clock"], f"snapshot v{last['version']}")
        for w in last["metrics"].get("warnings") or []:
            print(f"warning (v{last['version']}): {w}")
    uplift_worlds_report(args_of(sim_dir))
    from udfs.delay import HOUR_MS

    dec = pd.read_parquet(sim_dir / "truth" / "decisions.parquet")
    now = int(dec.event_time.max())
    req = dec.tail(4)[["user_id", "campaign_id", "creative_id"]].assign(
        placement="feed", device="ios", region="eu", hour=int((now // HOUR_MS) % 24))
    model, scores = score_requests(cfg, req, now)
    print("\n== serving: serving.serve.load_latest_model() + features from Feast -> score ==")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4f}".format):
        print(pd.concat([req[["user_id", "campaign_id", "creative_id"]].reset_index(drop=True), scores], axis=1)
              .to_string(index=False))
    return {"job": s, "quality": q, "served_version": model.version}


def _last_snapshot_stats(cfg) -> dict | None:
    from jobs.learner import stats_dir

    files = sorted(stats_dir(cfg).glob("snapshot-*.json"))
    return json.loads(files[-1].read_text()) if files else None


def _print_ate(ate: dict, truth, end_ms, label: str) -> None:
    import pandas as pd

    from tools.evaluate import ate_table

    if not ate:
        print(f"\n-- average treatment effect per campaign ({label}): no decision with a final label yet --")
        return
    t = ate_table(ate, truth, end_ms)
    print(f"\n-- average treatment effect per campaign ({label}; self-normalized AIPW on the decisions whose "
          f"7-day window closed, 95 % interval; 'true': the simulator's mean uplift of the same decisions) --")
    with pd.option_context("display.width", 160, "display.float_format", "{:.4f}".format):
        print(t.to_string())
    print(f"intervals covering the truth: {int(t.covered.sum())} of {len(t)}")


def args_of(sim_dir) -> dict:
    """The demo's simulator settings (from the latent world's summary)."""
    cfg = json.loads((Path(sim_dir) / "truth" / "summary.json").read_text())["config"]
    return {k: cfg[k] for k in ("events", "seed", "days", "campaigns")} | {"dir": Path(sim_dir).parent / "sim-observable"}


def uplift_worlds_report(sim_args: dict) -> dict:
    """The observable-uplift world (holdout per decision, uplift a function of observable context
    cells) with the demo's settings, through the learner in process (no features job: the
    decayed features count as missing), delayed labels and oracle."""
    from tools.evaluate import learn_all, truth_handoff, uplift_quality
    from tools.simulate import simulate
    from udfs.learners import OnlineLearner

    d = sim_args.pop("dir")
    simulate(d, world="observable", **sim_args)
    print("\n== uplift on the observable world (same settings, world=observable; learner in process "
          "on the simulator's decisions and outcomes, no decayed features) ==")
    out = {}
    for labels in ("delayed", "oracle"):
        slices, truth = truth_handoff(d, oracle_labels=labels == "oracle")
        lrn = OnlineLearner(snapshot_every="1d", refit_every="1d", labels=labels)
        from types import SimpleNamespace
        scores = learn_all(lrn, (SimpleNamespace(seq=k, decisions=dd, outcomes=o, clock=c, final=f)
                                 for k, dd, o, c, f in slices))
        q = uplift_quality(scores, truth)
        out[labels] = {**q, "ate": lrn.ate()}
        print(f"{labels:8s} Qini T {q['ratio_t']:.0%}, DR {q['ratio_dr']:.0%} of ranking by the true uplift "
              f"(by each cell's mean true uplift: {q['ratio_cell_mean_true_uplift']:.0%}); mean predicted "
              f"T {q['mean_t']:+.4f}, DR {q['mean_dr']:+.4f} vs true {q['mean_true']:+.4f}")
        if labels == "delayed":
            _print_ate(lrn.ate(), truth, slices[-1][3], "observable world, delayed labels")
    return out


if __name__ == "__main__":
    main()
