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
from udfs.metrics import auc, ece, log_loss, qini_coefficient

__all__ = ["truth_labels", "job_scores", "learn_all", "oracle_scores", "vw_scores", "ctr_quality", "quality"]


def truth_labels(cfg, sim_dir) -> pd.DataFrame:
    W = parse_duration(cfg.features["conversion_window"])
    t = pd.read_parquet(Path(sim_dir) / "truth" / "decisions.parquet")
    t["true_click"] = t["clicked"]
    t["true_conversion"] = t["converted"] & (t["conversion_time"] - t["event_time"] <= W)
    return t


def job_scores(cfg) -> pd.DataFrame:
    files = sorted((cfg.data_dir / "scores").glob("slice-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def learn_all(learner, slices) -> pd.DataFrame:
    """Hand-off slices (``udfs.ingest.HandoffSlice``) through ``learner`` in order, then its
    flush, as the learner job does without Flink; the first-sight scores."""
    out = []
    for s in slices:
        out += [sc for _, sc, _ in learner.offer(s.seq, s.decisions, s.outcomes, s.clock, s.final)
                if sc is not None]
    learner.flush()
    return pd.concat(out, ignore_index=True)


def oracle_scores(cfg, truth: pd.DataFrame) -> pd.DataFrame:
    """The oracle learner over the features job's hand-off, labels from the truth."""
    import dataclasses

    from udfs.ingest import handoff_lines, read_handoff
    from udfs.learners import OnlineLearner

    lab = truth.set_index("decision_id")[["true_click", "true_conversion"]]

    def labelled(s):
        if s.decisions is None:
            return s
        return dataclasses.replace(s, decisions=s.decisions.to_pandas().join(lab, on="decision_id"))

    lrn = OnlineLearner(**{**cfg.learner_params(), "labels": "oracle"})
    return learn_all(lrn, (labelled(read_handoff(line)) for line in handoff_lines(cfg.data_dir)))


def vw_scores(cfg, input_dir=None) -> tuple[pd.DataFrame, dict]:
    """Vowpal Wabbit's first-sight CTR scores over the hand-off of ``input_dir`` (default: the
    data dir), with its examples and seconds (VW's own work: building its text examples from
    the slice, predicting, learning; reading the slices is left out, as for the learner)."""
    import time

    from udfs.baselines import VowpalCTR
    from udfs.ingest import handoff_lines, read_handoff

    p = cfg.learner_params()
    vw = VowpalCTR(p["half_lives"], p["click_window"], p["label_wait"])
    out, seconds = [], 0.0
    for line in handoff_lines(input_dir or cfg.data_dir):
        s = read_handoff(line)
        t0 = time.perf_counter()
        sc = vw.offer(s.decisions, s.outcomes, s.clock)
        seconds += time.perf_counter() - t0
        if sc is not None:
            out.append(sc)
    return pd.concat(out, ignore_index=True), {"scored": vw.scored, "trained": vw.trained,
                                               "seconds": round(seconds, 2), "args": vw.args}


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
    for k in ("qini_t", "qini_dr", "qini_creative_mean_true_uplift"):
        res["uplift"][k.replace("qini", "ratio")] = res["uplift"][k] / best
    if oracle:
        o = oracle_scores(cfg, truth).merge(truth[cols], on="decision_id")
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
        v, timing = vw_scores(cfg)
        res["vw"] = {**ctr_quality(v, truth, t0), **timing}
    return res
