"""One self-contained HTML page of plots from a run's tables and files (``make report``).

    python -m tools.report --data-dir data/demo/run [--out report.html]

Plots (matplotlib, PNG embedded as data URIs: the page needs no other file):
input and quarantine by reason per slice; feature freshness (fold -> readable online) per slice; CTR reliability diagram and AUC by model version;
Qini curves of both uplift learners against random targeting; per-campaign treatment effects
with 95 % intervals; Kaplan–Meier conversion-delay curves per campaign against the fitted delay
model; interim and final conversion rate per cohort day; drift per snapshot against its
threshold; off-policy estimates of uniform-random targeting with intervals; the data-quality
results. A plot whose data the run does not have says so in its place (and its ``<figure>`` carries
``data-empty`` with the reason). The page checks itself
when opened: ``document.body.dataset.plots`` says how many images rendered and
``data-errors`` lists script errors (tests/test_report.py opens it in Chromium).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from jobs.config import Config, load_for_cli  # noqa: E402

__all__ = ["build_report", "main"]

DAY_MS = 86_400_000


def _fig(w=7.0, h=3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(w, h), dpi=90)
    return fig, ax


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _empty(ax, why: str):
    ax.figure.empty_reason = why                     # the page marks the figure (data-empty)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def _table(cfg, name):
    from stores.iceberg_store import read_table

    try:
        return read_table(cfg, name)
    except Exception:                                 # noqa: BLE001 - a table this run never wrote
        return pd.DataFrame()


def _scores(cfg) -> pd.DataFrame:
    files = sorted((cfg.data_dir / "scores").glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()


# ----------------------------------------------------------------------------- plots
def plot_throughput(cfg):
    fig, ax = _fig()
    stats = [json.loads(f.read_text()) for f in sorted((cfg.data_dir / "stats").glob("slice-*.json"))]
    if not stats:
        _empty(ax, "no slice statistics (the features job has not run here)")
        return fig, "Input and quarantine per slice"
    seq = [s["seq"] for s in stats]
    ax.plot(seq, [sum(s["in"].values()) for s in stats], label="records in", color="#333")
    reasons = sorted({r for s in stats for r in s["quarantined"]})
    bottom = np.zeros(len(stats))
    for r in reasons:
        v = np.array([s["quarantined"].get(r, 0) for s in stats], float)
        ax.bar(seq, v, bottom=bottom, label=f"quarantined: {r}", width=0.8)
        bottom += v
    ax.set_xlabel("slice")
    ax.set_ylabel("records")
    ax.set_yscale("symlog")
    ax.legend(fontsize=7, ncol=3)
    return fig, "Input and quarantine by reason per slice"


def plot_freshness(cfg):
    """Fold -> readable in Feast online, per slice (the online writers' p50/p99/max)."""
    fig, ax = _fig()
    stats = [json.loads(f.read_text()) for f in sorted((cfg.data_dir / "stats").glob("online-*.json"))]
    stats = [s for s in stats if s.get("freshness_s")]
    if not stats:
        _empty(ax, "no online writes with freshness (features.write_online off, or no features run)")
        return fig, "Feature freshness"
    by_seq = {}
    for s in stats:                                   # shards of one slice: the worst of them
        cur = by_seq.setdefault(s["seq"], {"p50": 0.0, "p99": 0.0, "max": 0.0})
        for k in cur:
            cur[k] = max(cur[k], s["freshness_s"][k])
    seq = sorted(by_seq)
    for k, style in (("p50", "-"), ("p99", "--"), ("max", ":")):
        ax.plot(seq, [by_seq[q][k] for q in seq], style, label=k, color="#333" if k == "p50" else "C3")
    ax.set_xlabel("slice")
    ax.set_ylabel("seconds, fold -> readable online")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return fig, "Feature freshness: time from folding an event to its value being readable in Feast"


def plot_calibration(cfg, out, scores):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    if len(out) and len(scores) and "ctr" in scores:
        m = scores.merge(out[["decision_id", "clicked", "arm"]], on="decision_id")
        m = m[m.arm == "treatment"]
        bins = np.quantile(m.ctr, np.linspace(0, 1, 21))
        k = np.clip(np.searchsorted(bins, m.ctr, side="right") - 1, 0, 19)
        g = m.groupby(k).agg(p=("ctr", "mean"), y=("clicked", "mean"))
        a1.plot([0, g.p.max()], [0, g.p.max()], "--", color="#999", label="perfect")
        a1.plot(g.p, g.y, "o-", label="served CTR (calibrated)")
        a1.set_xlabel("predicted CTR")
        a1.set_ylabel("observed click rate")
        a1.legend(fontsize=8)
        a1.set_title("reliability (20 equal-mass bins)", fontsize=9)
    else:
        _empty(a1, "no scores joined to outcomes")
    metrics = _table(cfg, "learner_metrics")
    if len(metrics):
        metrics = metrics.sort_values("version")
        a2.plot(metrics.version, metrics.ctr_auc, label="CTR AUC")
        a2.plot(metrics.version, metrics.conversion_auc, label="conversion AUC")
        a2.plot(metrics.version, metrics.conversion_auc_naive, label="conversion AUC, naive labels")
        a2.set_xlabel("model version")
        a2.legend(fontsize=8)
        a2.set_title("prequential AUC per snapshot", fontsize=9)
    else:
        _empty(a2, "no learner metrics")
    return fig, "CTR calibration and AUC over model versions"


def plot_qini(out, scores):
    from udfs.metrics import qini_curve

    fig, ax = _fig()
    fin = out[out.label_status == "final"] if len(out) else out
    if not len(fin) or not len(scores) or not {"uplift", "uplift_dr"} <= set(scores):
        _empty(ax, "no decisions with final labels and uplift scores")
        return fig, "Qini curves of the uplift models"
    m = scores.merge(fin[["decision_id", "conversion_label", "arm"]], on="decision_id")
    m = m[m.uplift.notna()]
    if not len(m) or m.arm.nunique() < 2:
        _empty(ax, "uplift not identified (no holdout outcomes)")
        return fig, "Qini curves of the uplift models"
    t = (m.arm == "treatment").to_numpy()
    for col, name in (("uplift", "T-learner"), ("uplift_dr", "DR learner")):
        frac, q = qini_curve(m[col].to_numpy(), m.conversion_label.to_numpy(), t)
        ax.plot(frac, q, label=name)
    ax.plot([0, 1], [0, q[-1]], "--", color="#999", label="random targeting")
    ax.set_xlabel("share of decisions targeted (by predicted uplift)")
    ax.set_ylabel("incremental conversions")
    ax.legend(fontsize=8)
    return fig, f"Qini curves of the uplift models ({len(m):,} decisions with final labels)"


def plot_ate(cfg):
    fig, ax = _fig()
    metrics = _table(cfg, "learner_metrics")
    ate = {}
    if len(metrics):
        last = metrics.sort_values("version").iloc[-1]
        ate = json.loads(last.ate_json) if isinstance(last.ate_json, str) and last.ate_json else {}
    ate = {c: a for c, a in ate.items() if a.get("ate") is not None and np.isfinite(a["ate"])}
    if not ate:
        _empty(ax, "no per-campaign effects (no final labels in both arms yet)")
        return fig, "Average treatment effect per campaign"
    names = sorted(ate)
    est = np.array([ate[c]["ate"] for c in names])
    lo = np.array([ate[c]["lo"] for c in names])
    hi = np.array([ate[c]["hi"] for c in names])
    y = np.arange(len(names))
    ax.errorbar(est, y, xerr=[est - lo, hi - est], fmt="o", capsize=3)
    ax.axvline(0, color="#999", ls="--")
    ax.set_yticks(y, names)
    ax.set_xlabel("effect on the conversion rate (AIPW, 95 % interval)")
    return fig, "Average treatment effect per campaign (newest snapshot)"


def plot_survival(out, delay):
    fig, ax = _fig(8, 4)
    if not len(out) or not out.converted.any():
        _empty(ax, "no conversions")
        return fig, "Conversion delay: Kaplan–Meier against the fitted model"
    from lifelines import KaplanMeierFitter

    t0 = out.decision_time.astype("int64") // 1000
    conv = out.first_conversion_time.notna()
    dur = np.where(conv, (out.first_conversion_time.astype("int64") // 1000 - t0) / 3.6e6, out.elapsed_ms / 3.6e6)
    dur = np.maximum(dur, 1e-6)
    latest = delay.sort_values("version").groupby(["campaign_id", "arm"], dropna=False).tail(1) if len(delay) else delay
    for k, c in enumerate(sorted(out.campaign_id.unique())[:6]):
        m = (out.campaign_id == c).to_numpy()
        color = f"C{k}"
        km = KaplanMeierFitter(label=c).fit(dur[m], conv.to_numpy()[m])
        sf = km.survival_function_
        ax.step(sf.index, sf[c], where="post", color=color, label=c)
        rows = latest[latest.campaign_id == c] if len(latest) else latest
        if len(rows):                              # one latency per campaign, p per arm: mix by arm share
            arms = out[m].arm.value_counts(normalize=True)
            p = float(sum(arms.get(r.arm, 0.0) * r.conversion_prob for r in rows.itertuples()))
            r = rows.iloc[0]
            shape = r.weibull_shape if r.family == "weibull" and pd.notna(r.weibull_shape) else 1.0
            tt = np.linspace(0, dur[m].max(), 200)
            ax.plot(tt, 1 - p * (1 - np.exp(-((r.delay_rate_per_hour * tt) ** shape))), color=color, ls="--")
    ax.plot([], [], color="#333", ls="--", label="fitted model")
    ax.set_xlabel("hours since the decision")
    ax.set_ylabel("P(not converted yet)")
    ax.legend(fontsize=7, ncol=2)
    return fig, "Conversion delay per campaign: Kaplan–Meier (steps) against the fitted delay model (dashed)"


def plot_cohorts(out):
    fig, ax = _fig()
    if not len(out):
        _empty(ax, "no outcome rows")
        return fig, "Conversion rate per cohort day, interim and final"
    day = out.decision_time.dt.floor("D").dt.date
    g = out.groupby([day, "label_status"]).conversion_label.mean().unstack()
    for col in g:
        ax.plot(range(len(g)), g[col], "o-", label=f"{col} labels")
    ax.set_xticks(range(len(g)), [str(d) for d in g.index], rotation=45, fontsize=7)
    ax.set_ylabel("mean conversion label")
    ax.legend(fontsize=8)
    return fig, "Conversion rate per cohort day: interim (survival-corrected) and final"


def plot_drift(cfg):
    fig, ax = _fig()
    metrics = _table(cfg, "learner_metrics")
    if not len(metrics):
        _empty(ax, "no learner metrics")
        return fig, "Drift per snapshot"
    metrics = metrics.sort_values("version")
    ax.plot(metrics.version, metrics.drift, "o-", label="drift distance")
    ax.axhline(float(cfg.learner["drift_threshold"]), color="C3", ls="--", label="threshold (unsafe above)")
    ax.set_xlabel("model version")
    ax.legend(fontsize=8)
    return fig, "Feature drift per snapshot against the threshold"


def plot_ope(out):
    fig, ax = _fig()
    try:
        from tools.ope import run as ope_run

        res = ope_run(out, policy="uniform", reward="click", n_boot=200)
    except Exception as e:                            # noqa: BLE001 - no logged decisions
        _empty(ax, f"no off-policy estimate: {e}")
        return fig, "Off-policy value of uniform-random targeting"
    est = res["estimates"]
    y = np.arange(len(est))
    ax.errorbar(est.value, y, xerr=[est.value - est.lower, est.upper - est.value], fmt="o", capsize=3)
    on = res["on_policy"]
    ax.axvspan(on["lower"], on["upper"], color="#ccc", alpha=0.5, label="logging policy, on-policy 95 %")
    ax.set_yticks(y, est.estimator)
    ax.set_xlabel("CTR")
    ax.legend(fontsize=8)
    return fig, "Off-policy CTR of uniform-random targeting (95 % intervals)"


def plot_dq(cfg):
    fig, ax = _fig()
    dq = _table(cfg, "dq_result")
    if not len(dq):
        _empty(ax, "no data-quality results (python -m jobs.dq)")
        return fig, "Data quality"
    last = dq[dq.run_id == dq.sort_values("run_time").run_id.iloc[-1]]
    g = last.groupby("suite").success.agg(["sum", "count"])
    y = np.arange(len(g))
    ax.barh(y, g["sum"], color="C2", label="held")
    ax.barh(y, g["count"] - g["sum"], left=g["sum"], color="C3", label="broken")
    ax.set_yticks(y, g.index, fontsize=7)
    ax.set_xlabel("expectations")
    ax.legend(fontsize=8)
    return fig, f"Data quality, newest run ({last.run_id.iloc[0]})"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>streamlift report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}
figure{{margin:2em 0}} img{{max-width:100%}} figcaption{{font-weight:bold;margin-bottom:.5em}}</style>
<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message)));
const origError = console.error;
console.error = (...a) => {{ window.__errors.push(a.join(" ")); origError(...a); }};
window.addEventListener("load", () => {{
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length;
  document.body.dataset.plots = ok + "/" + imgs.length;
  document.body.dataset.errors = JSON.stringify(window.__errors);
}});
</script></head><body>
<h1>streamlift report</h1>
<p>Run <code>{data}</code>, written {when}. {summary}</p>
{figures}
</body></html>
"""


def _empty_attr(fig) -> str:
    why = getattr(fig, "empty_reason", None)
    return f' data-empty="{html.escape(why)}"' if why else ""


def build_report(cfg: Config, out_path: Path | None = None) -> Path:
    """Write the report of the run at ``cfg.data_dir``; returns its path."""
    import warnings

    out_path = Path(out_path or cfg.data_dir / "report.html")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _table(cfg, "outcome")
        delay = _table(cfg, "delay_model")
        scores = _scores(cfg)
        plots = [plot_throughput(cfg), plot_freshness(cfg), plot_calibration(cfg, out, scores), plot_qini(out, scores), plot_ate(cfg),
                 plot_survival(out, delay), plot_cohorts(out), plot_drift(cfg), plot_ope(out), plot_dq(cfg)]
    figures = "\n".join(
        f'<figure{_empty_attr(fig)}><figcaption>{html.escape(title)}</figcaption>'
        f'<img alt="{html.escape(title)}" src="data:image/png;base64,{_png(fig)}"></figure>' for fig, title in plots)
    summary = (f"{len(out):,} decisions in outcomes_v1 ({int((out.label_status == 'final').sum()):,} final)."
               if len(out) else "No outcome table yet.")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(PAGE.format(data=html.escape(str(cfg.data_dir)), when=time.strftime("%Y-%m-%d %H:%M UTC",
                                    time.gmtime()), summary=summary, figures=figures))
    return out_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="the run's data folder (default: paths.data_dir)")
    p.add_argument("--out", help="the HTML file (default: <data>/report.html)")
    a = p.parse_args(argv)
    cfg = load_for_cli(a.data_dir)
    path = build_report(cfg, Path(a.out) if a.out else None)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
