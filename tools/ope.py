"""Off-policy evaluation on ``outcomes_v1``: what would a different policy have earned?

    python -m tools.ope --data-dir data/demo/run --policy uniform --reward click
    python -m tools.ope --data-dir data/demo/run --policy model --reward conversion --epsilon 0.1
    python -m tools.ope --data-dir data/demo/run --policy model --temperature 0.5
    python -m tools.ope --data-dir data/demo/run --policy my_policy.csv --reward click

Reads the outcome table (``tools.analyst.read_table(load_config(), "outcome")``), keeps the
treatment arm by default (control rows were logged but not shown, their reward does not depend
on the creative), and estimates the target policy's value with IPS, SNIPS, DM, DR and switch-DR
(``udfs/ope.py``, the Open Bandit Pipeline's definitions). The actions of a decision are the
creatives seen in the table for its campaign. Target policies:

* ``uniform``: uniform over the campaign's creatives;
* ``model``: the newest safe learned model (``serving.serve.load_latest_model``), scoring the
  decision's context (placement, device, region, hour, campaign, user) with each candidate
  creative substituted; greedy on its predicted CTR (``--reward click``) or conversion
  probability (``--reward conversion``), ε-greedy with ``--epsilon``, softmax on the logit
  with ``--temperature``. The outcome table carries no Feast features, so the model sees
  them as missing (its context and creative terms only);
* ``<file>.csv``: a table ``decision_id, creative_id, probability`` (every decision evaluated
  must be in it; probabilities of a decision sum to 1).

Rewards: ``click`` (``clicked``) or ``conversion`` (``conversion_label``: the observed outcome
for final rows, the survival-corrected label for interim ones; the report says how many rows
are still interim). DM and DR use a cross-fitted tabular reward model (creative × placement ×
device, shrunk to the creative's and the global mean). The report ends with the sanity check:
the logging policy's own estimate against its on-policy mean.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from udfs import ope  # noqa: E402

__all__ = ["prepare", "model_scores", "target_policy", "run", "main"]

CONTEXT = ["user_id", "placement", "device", "region", "campaign_id"]


def prepare(outcomes: pd.DataFrame, reward: str = "click", arm: str | None = "treatment") -> dict:
    """The logged data as OPE arrays: one row per decision (``arm`` kept; None: every arm),
    candidates = the creatives seen in the (whole) table per campaign, sorted, one slot each."""
    if reward not in ("click", "conversion"):
        raise ValueError("reward must be click or conversion")
    cands = (outcomes[["campaign_id", "creative_id"]].drop_duplicates()
             .sort_values(["campaign_id", "creative_id"]).reset_index(drop=True))
    cands["slot"] = cands.groupby("campaign_id").cumcount()
    k = cands.groupby("campaign_id").size()
    d = outcomes if arm in (None, "all") else outcomes[outcomes.arm == arm]
    d = d.sort_values("decision_id").reset_index(drop=True)
    d = d.merge(cands, on=["campaign_id", "creative_id"], how="left")
    y = d.clicked.astype(float).to_numpy() if reward == "click" else d.conversion_label.astype(float).to_numpy()
    per_decision = d[["decision_id", "campaign_id"]].merge(cands, on="campaign_id")[["decision_id", "creative_id", "slot", "campaign_id"]]
    return {"rows": d, "reward": y, "reward_name": reward, "action": d.slot.to_numpy(int),
            "pscore": d.propensity.to_numpy(float), "n_candidates": d.campaign_id.map(k).to_numpy(int),
            "candidates": per_decision, "campaign_creatives": cands,
            "interim": int((d.label_status == "interim").sum()) if "label_status" in d else 0}


def model_scores(model, prep: dict, column: str = "ctr") -> np.ndarray:
    """(n, K) scores of ``model`` (anything with ``score(DataFrame) -> DataFrame``) for every
    decision with each candidate creative of its campaign substituted; -inf off the candidates."""
    d = prep["rows"]
    ctx = d[["decision_id"] + [c for c in CONTEXT if c in d]].copy()
    ctx["hour"] = pd.to_datetime(d.decision_time, utc=True).dt.hour.to_numpy() if "decision_time" in d else 0
    long = prep["candidates"][["decision_id", "creative_id", "slot"]].merge(ctx, on="decision_id")
    scored = model.score(long.drop(columns=["slot"]).reset_index(drop=True))
    n, K = len(d), int(prep["n_candidates"].max())
    s = np.full((n, K), -np.inf)
    row = pd.Series(np.arange(n), index=d.decision_id.to_numpy())
    s[row[long.decision_id].to_numpy(), long.slot.to_numpy(int)] = np.asarray(scored[column], float)
    return s


def target_policy(prep: dict, policy: str, model=None, kind: str = "greedy", epsilon: float = 0.0,
                  temperature: float = 1.0) -> np.ndarray:
    """``action_dist`` (n, K) of ``policy``: uniform, logging, model, or the path of a CSV table."""
    k = prep["n_candidates"]
    if policy == "uniform":
        return ope.uniform_policy(k)
    if policy == "logging":
        return ope.logging_policy(prep["action"], prep["pscore"], k)
    if policy == "model":
        if model is None:
            from serving.serve import load_latest_model
            model = load_latest_model()
        col = "ctr" if prep["reward_name"] == "click" else "conversion"
        return ope.policy_from_scores(model_scores(model, prep, col), k, kind, epsilon, temperature)
    table = pd.read_csv(policy, dtype={"decision_id": str, "creative_id": str})
    return ope.policy_table_from_long(prep["rows"], prep["candidates"], table)


def run(outcomes: pd.DataFrame, policy: str = "uniform", reward: str = "click", model=None,
        kind: str = "greedy", epsilon: float = 0.0, temperature: float = 1.0, clip: float = np.inf,
        arm: str | None = "treatment", alpha: float = 0.05, ci: str = "bootstrap", n_boot: int = 1000,
        seed: int = 12345) -> dict:
    """Estimates for the target and the logging-policy sanity check (DataFrames), with counts."""
    prep = prepare(outcomes, reward, arm)
    if not len(prep["rows"]):
        raise ValueError("no logged decisions to evaluate")
    q = ope.tabular_q(prep["rows"], prep["reward"], prep["candidates"])
    kw = dict(alpha=alpha, ci=ci, n_boot=n_boot, seed=seed)
    pi = target_policy(prep, policy, model, kind, epsilon, temperature)
    est = ope.evaluate(prep["reward"], prep["action"], prep["pscore"], pi, q, clip=clip, **kw)
    logging = ope.evaluate(prep["reward"], prep["action"], prep["pscore"],
                           target_policy(prep, "logging"), q, **kw)
    lo, hi = (ope.bootstrap_ci(prep["reward"], alpha, n_boot, seed) if ci == "bootstrap"
              else ope.normal_ci(prep["reward"], alpha))
    return {"estimates": est, "logging": logging[logging.estimator.isin(["IPS", "SNIPS"])],
            "on_policy": {"value": float(prep["reward"].mean()), "lower": lo, "upper": hi},
            "rows": len(prep["rows"]), "interim": prep["interim"],
            "campaigns": int(prep["campaign_creatives"].campaign_id.nunique()),
            "creatives": len(prep["campaign_creatives"])}


def _fmt(df: pd.DataFrame) -> str:
    cols = ["estimator", "value", "lower", "upper", "ess", "clipped_share", "mean_weight", "max_weight",
            "tail_index", "warnings"]
    with pd.option_context("display.width", 200, "display.max_colwidth", 90, "display.float_format",
                           "{:.5f}".format):
        return df[cols].to_string(index=False)


def main(argv=None) -> None:
    from jobs.config import quiet_third_party_warnings

    quiet_third_party_warnings()
    p = argparse.ArgumentParser(description="off-policy evaluation of a target policy on outcomes_v1")
    p.add_argument("--data-dir", help="override paths.data_dir")
    p.add_argument("--policy", default="uniform", help="uniform | model | a CSV (decision_id, creative_id, probability)")
    p.add_argument("--reward", default="click", choices=["click", "conversion"])
    p.add_argument("--epsilon", type=float, help="model policy: epsilon-greedy with this epsilon")
    p.add_argument("--temperature", type=float, help="model policy: softmax on the logit with this temperature")
    p.add_argument("--clip", type=float, default=np.inf, help="clip the importance weight at this value (IPS, DR; "
                   "also the switch-DR threshold); default: no clipping")
    p.add_argument("--arm", default="treatment", choices=["treatment", "control", "all"])
    p.add_argument("--ci", default="bootstrap", choices=["bootstrap", "normal"])
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=12345)
    args = p.parse_args(argv)
    from stores.iceberg_store import read_table
    from jobs.config import load_for_cli

    kind = "softmax" if args.temperature is not None else "epsilon-greedy" if args.epsilon is not None else "greedy"
    cfg = load_for_cli(args.data_dir)
    model = None
    if args.policy == "model":
        from serving.serve import load_latest_model
        model = load_latest_model(cfg=cfg)
    outcomes = read_table(cfg, "outcome")
    res = run(outcomes, args.policy, args.reward, model=model, kind=kind, epsilon=args.epsilon or 0.0,
              temperature=args.temperature or 1.0, clip=args.clip, arm=args.arm, alpha=args.alpha,
              ci=args.ci, n_boot=args.n_boot, seed=args.seed)
    level = f"{1 - args.alpha:.0%}"
    name = args.policy if args.policy != "model" else f"model ({kind})"
    print(f"target policy: {name}; reward: {args.reward}; arm: {args.arm}; {res['rows']} decisions, "
          f"{res['campaigns']} campaigns, {res['creatives']} creatives; {res['interim']} rows still interim"
          + (" (their survival-corrected labels are used)" if args.reward == "conversion" else ""))
    print(f"{level} intervals: {args.ci}" + (f" ({args.n_boot} resamples, seed {args.seed})" if args.ci == "bootstrap" else ""))
    print(_fmt(res["estimates"]))
    o = res["on_policy"]
    print(f"\nsanity check, the logging policy: on-policy mean {o['value']:.5f} [{o['lower']:.5f}, {o['upper']:.5f}]")
    print(_fmt(res["logging"]))


if __name__ == "__main__":
    main()
