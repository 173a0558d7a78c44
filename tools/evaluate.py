"""The learner's scores against the simulator's ground truth (``make demo``, ``make bench``).

Every decision's first-sight scores (``<data>/scores/``, written by the learner job
before any label of that decision was used) are compared with the truth: CTR and
conversion AUC, log loss, calibration error; uplift Qini against ranking by the
true uplift. The oracle is the same learner given each decision's true final labels
at once (``OnlineLearner(labels="oracle")``, run here in process on the same hand-off). The
CTR baseline is Vowpal Wabbit on the same stream, protocol and features
(``udfs.baselines.VowpalCTR``), also in process.
The first ``warmup`` of event time is left out (every model starts from zero).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from udfs.features import parse_duration
from udfs.ingest import handoff_lines, read_handoff
from udfs.metrics import auc, ece, log_loss, qini_coefficient

__all__ = ["truth_labels", "job_scores", "handoff_slices", "learn_all", "oracle_scores", "vw_scores", "ctr_quality", "quality",
           "truth_handoff", "uplift_quality", "uplift_run"]


def truth_labels(cfg, sim_dir) -> pd.DataFrame:
    W = parse_duration(cfg.features["conversion_window"])
    t = pd.read_parquet(Path(sim_dir) / "truth" / "decisions.parquet")
    t["true_click"] = t["clicked"]
    t["true_conversion"] = t["converted"] & (t["conversion_time"] - t["event_time"] <= W)
    return t


def job_scores(cfg) -> pd.DataFrame:
    files = sorted((cfg.data_dir / "scores").glob("slice-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def handoff_slices(cfg, input_dir=None) -> list:
    """The features job's hand-off of a run, decoded (``udfs.ingest.HandoffSlice``): the
    hand-off lines under ``<input_dir>/handoff`` (default: the data dir), or the hand-off
    topic's committed records (``jobs.kafka.committed_handoff``), as the consumers choose
    (``jobs.flink_env.default_handoff``)."""
    from jobs.flink_env import default_handoff

    d = Path(input_dir or cfg.data_dir)
    if default_handoff(cfg, d) == "files":
        records = handoff_lines(d)
    else:
        from jobs.kafka import committed_handoff

        records = committed_handoff(cfg)
    return [read_handoff(r) for r in records]


def learn_all(learner, slices) -> pd.DataFrame:
    """Hand-off slices (``udfs.ingest.HandoffSlice``) through ``learner`` in order, then its
    flush, as the learner job does without Flink; the first-sight scores."""
    out = []
    for s in slices:
        out += [sc for _, sc, _ in learner.offer(s.seq, s.decisions, s.outcomes, s.clock, s.final)
                if sc is not None]
    learner.flush()
    return pd.concat(out, ignore_index=True)


def oracle_scores(cfg, truth: pd.DataFrame, slices=None) -> pd.DataFrame:
    """The oracle learner over the features job's hand-off (``slices``, default: the run's),
    labels from the truth."""
    import dataclasses

    from udfs.learners import OnlineLearner

    lab = truth.set_index("decision_id")[["true_click", "true_conversion"]]

    def labelled(s):
        if s.decisions is None:
            return s
        return dataclasses.replace(s, decisions=s.decisions.to_pandas().join(lab, on="decision_id"))

    lrn = OnlineLearner(**{**cfg.learner_params(), "labels": "oracle"})
    return learn_all(lrn, (labelled(s) for s in (handoff_slices(cfg) if slices is None else slices)))


def vw_scores(cfg, input_dir=None, slices=None) -> tuple[pd.DataFrame, dict]:
    """Vowpal Wabbit's first-sight CTR scores over the hand-off of ``input_dir`` (default: the
    data dir; or the decoded ``slices``), with its examples and seconds (VW's own work: building
    its text examples from the slice, predicting, learning; reading the slices is left out, as
    for the learner)."""
    import time

    from udfs.baselines import VowpalCTR

    p = cfg.learner_params()
    vw = VowpalCTR(p["half_lives"], p["click_window"], p["label_wait"])
    out, seconds = [], 0.0
    for s in handoff_slices(cfg, input_dir) if slices is None else slices:
        t0 = time.perf_counter()
        sc = vw.offer(s.decisions, s.outcomes, s.clock)
        seconds += time.perf_counter() - t0
        if sc is not None:
            out.append(sc)
    return pd.concat(out, ignore_index=True), {"scored": vw.scored, "trained": vw.trained,
                                               "seconds": round(seconds, 2), "args": vw.args}


def uplift_means(sc: pd.DataFrame) -> dict:
    """Mean predicted uplift (T, DR; NaN scores left out) against the mean true uplift, and the
    share of decisions with an uplift score."""
    ok = sc.uplift.notna()
    return {"mean_t": float(sc.uplift[ok].mean()), "mean_dr": float(sc.uplift_dr[ok].mean()),
            "mean_true": float(sc.true_uplift[ok].mean()), "scored_share": float(ok.mean())}


def uplift_quality(scores: pd.DataFrame, truth: pd.DataFrame, warmup: str = "1d") -> dict:
    """Uplift figures of first-sight ``scores`` against the truth after ``warmup``: Qini of the
    T and DR learners and of ranking by each observable cell's (campaign, creative, placement,
    device) mean true uplift, as shares of ranking by the true uplift; mean predictions."""
    sc = scores.merge(truth[["decision_id", "event_time", "campaign_id", "creative_id", "placement", "device",
                             "true_uplift"]], on="decision_id")
    sc = sc[sc.event_time >= sc.event_time.min() + parse_duration(warmup)]
    best = qini_coefficient(sc.true_uplift, true_uplift=sc.true_uplift)
    cm = sc.groupby(["campaign_id", "creative_id", "placement", "device"]).true_uplift.transform("mean")
    ok = sc.uplift.notna()
    return {"decisions": int(len(sc)), "qini_true_uplift": best,
            "ratio_t": qini_coefficient(sc.uplift.fillna(0), true_uplift=sc.true_uplift) / best,
            "ratio_dr": qini_coefficient(sc.uplift_dr.fillna(0), true_uplift=sc.true_uplift) / best,
            "ratio_cell_mean_true_uplift": qini_coefficient(cm, true_uplift=sc.true_uplift) / best,
            **uplift_means(sc)} if ok.any() else {"decisions": int(len(sc)), "scored_share": 0.0}


def ate_table(ate: dict, truth: pd.DataFrame | None = None, end_ms: int | None = None) -> pd.DataFrame:
    """A learner's per-campaign ATE (``OnlineLearner.ate()`` or a snapshot's ``metrics["ate"]``)
    as a table; with the truth, the mean true uplift of the decisions whose window closed by
    ``end_ms`` (those the ATE is computed on) and whether the interval covers it."""
    t = pd.DataFrame(ate).T[["n", "n_treated", "n_control", "ate", "lo", "hi"]]
    t = t.astype({"n": int, "n_treated": int, "n_control": int})
    t.index.name = "campaign_id"
    if truth is not None:
        done = truth if end_ms is None else truth[truth.event_time + parse_duration("7d") <= end_ms]
        t["true"] = done.groupby("campaign_id").true_uplift.mean()
        t["covered"] = (t.lo <= t.true) & (t.true <= t.hi)
    return t


def ctr_quality(scores: pd.DataFrame, truth: pd.DataFrame, t0: int) -> dict:
    """Prequential CTR quality of first-sight ``scores`` (decision_id, ctr) on the treatment arm
    after event time ``t0``."""
    d = scores[["decision_id", "ctr"]].merge(truth[["decision_id", "event_time", "arm", "true_click"]],
                                             on="decision_id")
    d = d[(d.event_time >= t0) & (d.arm == "treatment")]
    return {"n": int(len(d)), "auc": auc(d.ctr, d.true_click), "log_loss": log_loss(d.ctr, d.true_click),
            "ece": ece(d.ctr, d.true_click)}


def quality(cfg, sim_dir, warmup: str = "1d", oracle: bool = True, vw: bool = True) -> dict:
    truth = truth_labels(cfg, sim_dir)
    t0 = truth.event_time.min() + parse_duration(warmup)
    cols = ["decision_id", "event_time", "arm", "creative_id", "p_click", "true_click", "true_conversion",
            "true_uplift", "p_conv_treatment"]
    sc = job_scores(cfg).merge(truth[cols], on="decision_id")
    sc = sc[sc.event_time >= t0]
    tr = sc[sc.arm == "treatment"]
    slices = handoff_slices(cfg) if (oracle or vw) else None       # read once for both baselines
    res = {"decisions_scored": int(len(sc)), "warmup": warmup,
           "ctr": {"auc": auc(tr.ctr, tr.true_click), "log_loss": log_loss(tr.ctr, tr.true_click),
                   "ece": ece(tr.ctr, tr.true_click), "auc_true_p": auc(tr.p_click, tr.true_click),
                   "rate": float(tr.true_click.mean()), "mean_prediction": float(tr.ctr.mean())},
           "conversion": {"auc": auc(tr.conversion, tr.true_conversion),
                          "auc_naive": auc(tr.conversion_naive, tr.true_conversion),
                          "auc_true_p": auc(tr.p_conv_treatment, tr.true_conversion),
                          "log_loss": log_loss(tr.conversion, tr.true_conversion),
                          "mean_prediction": float(tr.conversion.mean()),
                          "mean_prediction_naive": float(tr.conversion_naive.mean()),
                          "rate": float(tr.true_conversion.mean())}}
    best = qini_coefficient(sc.true_uplift, true_uplift=sc.true_uplift)
    creative_mean = sc.groupby("creative_id").true_uplift.transform("mean")
    res["uplift"] = {"qini_t": qini_coefficient(sc.uplift, true_uplift=sc.true_uplift),
                     "qini_dr": qini_coefficient(sc.uplift_dr, true_uplift=sc.true_uplift),
                     "qini_true_uplift": best,
                     "qini_creative_mean_true_uplift": qini_coefficient(creative_mean, true_uplift=sc.true_uplift),
                     "qini_observed_t": qini_coefficient(sc.uplift, sc.true_conversion, sc.arm == "treatment")}
    res["uplift"].update(uplift_means(sc))
    if "placement" in truth:
        cell = sc[["decision_id"]].merge(truth[["decision_id", "campaign_id", "placement", "device"]], on="decision_id")
        sc = sc.assign(_cell=cell.groupby(["campaign_id", "placement", "device"]).ngroup().to_numpy())
        cm = sc.groupby(["_cell", "creative_id"]).true_uplift.transform("mean")
        res["uplift"]["qini_cell_mean_true_uplift"] = qini_coefficient(cm, true_uplift=sc.true_uplift)
    for k in ("qini_t", "qini_dr", "qini_creative_mean_true_uplift", "qini_cell_mean_true_uplift"):
        if k in res["uplift"]:
            res["uplift"][k.replace("qini", "ratio")] = res["uplift"][k] / best
    if oracle:
        o = oracle_scores(cfg, truth, slices).merge(truth[cols], on="decision_id")
        o = o[o.event_time >= t0]
        otr = o[o.arm == "treatment"]
        res["oracle"] = {"ctr_auc": auc(otr.ctr, otr.true_click), "ctr_log_loss": log_loss(otr.ctr, otr.true_click),
                         "ctr_ece": ece(otr.ctr, otr.true_click),
                         "conversion_auc": auc(otr.conversion, otr.true_conversion),
                         "qini_t": qini_coefficient(o.uplift, true_uplift=o.true_uplift)}
        c = res["conversion"]
        gap = res["oracle"]["conversion_auc"] - c["auc_naive"]
        c["gap_closed"] = (c["auc"] - c["auc_naive"]) / gap if gap > 0 else float("nan")
    if vw:
        v, timing = vw_scores(cfg, slices=slices)
        res["vw"] = {**ctr_quality(v, truth, t0), **timing}
    return res


def truth_handoff(sim_dir, slice_every: str = "6h", oracle_labels: bool = False) -> tuple[list, pd.DataFrame]:
    """A hand-off without the features job (no JVM): the simulator's decisions (context, arm,
    propensity; no decayed features: they count as missing) and their clicks and conversions,
    cut into slices of ``slice_every`` of event time as ``(seq, decisions, outcomes, clock,
    final)`` for :meth:`udfs.learners.OnlineLearner.offer`, and the truth. Conversions after the
    end of the stream are never delivered (as in the simulator's own files). With
    ``oracle_labels`` the decisions carry ``true_click`` and ``true_conversion`` (7-day window)."""
    import numpy as np

    t = pd.read_parquet(Path(sim_dir) / "truth" / "decisions.parquet")
    step = parse_duration(slice_every)
    W = parse_duration("7d")
    t["true_click"] = t["clicked"]
    t["true_conversion"] = t["converted"] & (t["conversion_time"] - t["event_time"] <= W)
    cols = ["decision_id", "event_time", "placement", "device", "region", "hour", "campaign_id",
            "creative_id", "arm", "propensity"] + (["true_click", "true_conversion"] if oracle_labels else [])
    dec = t[cols]
    clk = t[t.clicked][["decision_id", "click_time"]].rename(columns={"click_time": "event_time"}).assign(kind="click")
    cnv = t[t.conversion_delivered][["decision_id", "conversion_time"]].rename(
        columns={"conversion_time": "event_time"}).assign(kind="conversion")
    out = pd.concat([clk, cnv], ignore_index=True)
    start = int(t.event_time.min()) // step * step
    end = int(t.event_time.max()) + 1
    slices = []
    bounds = list(range(start, end + step, step))
    dk = np.searchsorted(np.asarray(bounds), dec.event_time.to_numpy(), side="right") - 1
    ok = np.searchsorted(np.asarray(bounds), out.event_time.to_numpy(), side="right") - 1
    n = len(bounds) - 1
    for k in range(n):
        slices.append((k, dec[dk == k].reset_index(drop=True), out[ok == k].reset_index(drop=True),
                       bounds[k + 1], k == n - 1))
    return slices, t


def uplift_run(sim_dir, labels: str = "delayed", warmup: str = "1d", **learner_params) -> dict:
    """The uplift figures of the README's table for one simulated stream, in process: the
    learner (``labels``: ``delayed`` or ``oracle``) over :func:`truth_handoff`, then
    :func:`uplift_quality`, and per learner the number of deciles (of 10) whose mean predicted
    uplift lies in the doubly robust interval of its decisions with closed windows
    (:func:`udfs.metrics.uplift_calibration`)."""
    from udfs.learners import OnlineLearner
    from udfs.metrics import uplift_calibration

    slices, truth = truth_handoff(sim_dir, oracle_labels=labels == "oracle")
    lrn = OnlineLearner(**{"snapshot_every": "1d", "refit_every": "1d", **learner_params, "labels": labels})
    parts = [sc for s in slices for _, sc, _ in lrn.offer(*s) if sc is not None]
    lrn.flush()
    scores = pd.concat(parts, ignore_index=True)
    res = uplift_quality(scores, truth, warmup)
    m = scores.merge(truth[["decision_id", "event_time", "arm", "true_conversion"]], on="decision_id")
    m = m[(m.event_time >= m.event_time.min() + parse_duration(warmup))
          & (m.event_time + lrn.window <= slices[-1][3])]
    for col, key in (("uplift", "calibrated_deciles_t"), ("uplift_dr", "calibrated_deciles_dr")):
        cal = uplift_calibration(m[col], m.true_conversion, m.arm == "treatment", m.mu1, m.mu0)
        res[key] = int(cal.covered.sum())
    return res


def main(argv=None) -> int:
    from jobs.config import quiet_third_party_warnings

    quiet_third_party_warnings()
    import argparse
    import json
    import tempfile

    from tools.simulate import simulate

    ap = argparse.ArgumentParser(description=(
        "uplift: simulate a stream, run the learner in process, print the uplift figures "
        "(Qini as a share of ranking by the true uplift, mean effects, calibrated deciles)"))
    ap.add_argument("what", choices=["uplift"])
    ap.add_argument("--events", type=int, default=300_000, help="decisions to simulate (default 300000)")
    ap.add_argument("--days", type=int, default=10, help="days of event time (default 10)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--world", choices=["observable", "latent"], default="observable")
    ap.add_argument("--labels", choices=["delayed", "oracle"], default="delayed")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        simulate(d, events=a.events, seed=a.seed, days=a.days, world=a.world)
        res = uplift_run(d, a.labels)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
