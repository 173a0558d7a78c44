"""For analysts: read the Iceberg tables, compare interim and finalized conversion rates.

    python -m tools.analyst compare                  # conversion rate by campaign: now vs finalized vs naive
    python -m tools.analyst compare --data-dir data/demo/run
    python -m tools.analyst delay                    # the latest delay model per campaign and arm
    python -m tools.analyst sql "SELECT label_status, count(*) FROM outcomes GROUP BY 1"

``compare`` puts side by side, per campaign: the conversion rate *estimated now*
(mean of ``conversion_label`` over every decision, interim rows counting their
survival-corrected label), the rate over *finalized* decisions only (windows
closed), and the *naive* observed rate over every decision (open windows counted
as non-conversions, biased low while conversions are still arriving).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd

from jobs.config import Config, load_for_cli
from stores.iceberg_store import read_table  # noqa: F401 - part of the analysts' API

__all__ = ["read_table", "duckdb_connection", "compare", "latest_delay_models", "accuracy"]


def duckdb_connection(cfg: Config):
    """DuckDB with one view per table (``outcomes``, ``delay_models``, ``quarantine``) over the
    Parquet data files of each table's current snapshot."""
    import duckdb

    from stores.iceberg_store import open_tables, table_files

    con = duckdb.connect()
    for name, table in open_tables(cfg).items():
        view = {"outcome": "outcomes", "delay_model": "delay_models"}.get(name, name)
        files = table_files(table)
        if files:
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet({files!r})")
    return con


COMPARE_SQL = """
SELECT campaign_id,
       count(*)                                                         AS decisions,
       count(*) FILTER (WHERE label_status = 'interim')                 AS interim,
       avg(conversion_label)                                            AS rate_estimated_now,
       avg(CASE WHEN label_status = 'final' THEN conversion_label END)  AS rate_finalized,
       avg(CASE WHEN converted THEN 1.0 ELSE 0.0 END)                   AS rate_naive
FROM outcomes GROUP BY campaign_id ORDER BY campaign_id
"""


def compare(cfg: Config) -> pd.DataFrame:
    """Conversion rate by campaign: estimated now vs finalized only vs naive (DuckDB)."""
    return duckdb_connection(cfg).sql(COMPARE_SQL).df()


def latest_delay_models(cfg: Config) -> pd.DataFrame:
    dm = read_table(cfg, "delay_model")
    if dm.empty:
        return dm
    cols = [c for c in ["version", "campaign_id", "arm", "family", "conversion_prob", "delay_rate_per_hour",
                        "mean_delay_hours", "weibull_shape", "decisions", "conversions", "matured_decisions",
                        "fitted_at", "model_key", "epoch"] if c in dm.columns]
    latest = dm[dm.version == dm.version.max()]
    return latest.sort_values(["campaign_id", "arm"], na_position="first")[cols].reset_index(drop=True)


def accuracy(cfg: Config, sim_dir) -> dict:
    """The outcomes against the simulator's ground truth (``<sim_dir>/truth``).

    * per campaign: estimated delay rate vs the true one;
    * over decisions still inside their window: the conversion rate from the
      interim labels, the naive observed rate, and the true rate
      ``mean(p_arm · (1 - exp(-λ·W)))`` (probability of a conversion within W).
    """
    from udfs.delay import HOUR_MS
    from udfs.features import parse_duration

    W = parse_duration(cfg.features["conversion_window"])
    out = read_table(cfg, "outcome")
    truth = pd.read_parquet(os.path.join(sim_dir, "truth", "decisions.parquet")).set_index("decision_id")
    camps = pd.read_parquet(os.path.join(sim_dir, "truth", "campaigns.parquet")).set_index("campaign_id")
    dm = latest_delay_models(cfg)
    # one row per campaign and arm; the arms share the campaign's delay distribution
    per_camp = dm.groupby("campaign_id").agg(rate=("delay_rate_per_hour", "first"),
                                             conversions=("conversions", "sum"))
    delay = pd.DataFrame({"true_rate_per_hour": camps.delay_rate_per_ms * HOUR_MS,
                          "estimated_rate_per_hour": per_camp.rate,
                          "conversions": per_camp.conversions}).dropna()
    delay["relative_error"] = delay.estimated_rate_per_hour / delay.true_rate_per_hour - 1

    def rates(rows):
        tr = truth.loc[rows.decision_id]
        p_arm = np.where(tr.arm == "treatment", tr.p_conv_treatment, tr.p_conv_control)
        true = float((p_arm * (1 - np.exp(-tr.delay_rate_per_ms.to_numpy() * W))).mean())
        est, naive = float(rows.conversion_label.mean()), float(rows.converted.mean())
        return {"decisions": len(rows), "estimated": est, "naive": naive, "true": true,
                "estimated_relative_error": est / true - 1, "naive_relative_error": naive / true - 1}

    open_rows = out[out.label_status == "interim"]
    return {"rows": len(out), "unique_decisions": int(out.decision_id.nunique()),
            "interim": len(open_rows), "final": int((out.label_status == "final").sum()),
            "delay": delay, "open_cohorts": rates(open_rows) if len(open_rows) else None,
            "delay_model_version": int(dm.version.max()) if len(dm) else None}


def campaign_effects(cfg: Config) -> pd.DataFrame:
    """"Did this campaign work?": the per-campaign average treatment effect of the newest learner
    snapshot (self-normalized AIPW on final labels, 95 % interval), from learner_metrics_v1."""
    import json

    m = read_table(cfg, "learner_metrics")
    m = m[m.ate_json.notna()] if "ate_json" in m else m.iloc[0:0]
    if m.empty:
        return pd.DataFrame(columns=["campaign_id", "ate", "lo", "hi", "n", "version"])
    last = m.sort_values("version").iloc[-1]
    rows = [{"campaign_id": c, **v} for c, v in json.loads(last.ate_json).items()]
    out = pd.DataFrame(rows).sort_values("campaign_id", ignore_index=True)
    out["significant"] = (out.lo > 0) | (out.hi < 0)
    out["version"] = int(last.version)
    return out[["campaign_id", "ate", "lo", "hi", "significant", "n", "n_treated", "n_control", "version"]]


def main(argv=None) -> None:
    from jobs.config import quiet_third_party_warnings

    quiet_third_party_warnings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["compare", "delay", "ate", "sql"])
    p.add_argument("query", nargs="?", help="SQL for `sql` (views: outcomes, delay_models, quarantine)")
    p.add_argument("--data-dir", help="override paths.data_dir")
    args = p.parse_args(argv)
    cfg = load_for_cli(args.data_dir)
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.float_format",
                           "{:.4f}".format):
        if args.command == "compare":
            print(compare(cfg).to_string(index=False))
        elif args.command == "delay":
            print(latest_delay_models(cfg).to_string(index=False))
        elif args.command == "ate":
            print(campaign_effects(cfg).to_string(index=False))
        else:
            print(duckdb_connection(cfg).sql(args.query).df().to_string(index=False))


if __name__ == "__main__":
    main()
