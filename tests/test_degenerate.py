"""Degenerate streams (issue 13, point 2): each runs through all three jobs on the local
mini-cluster to completion, every record accounted for, with the warning that says what cannot
be relied on: no conversions, no clicks, no holdout arm, a single campaign and creative,
propensities of 1e-5, a stream shorter than the conversion window."""

import json

import orjson
import pytest

from test_job import cfg_for

pytestmark = pytest.mark.slow

KINDS = {   # kind: (the outcomes job's warning, the learner's warning or None)
    "no_conversions": ("no conversions", "no conversions seen"),
    "no_clicks": ("no clicks", "no clicks seen"),
    "no_holdout": ("no holdout", "uplift not identified: no holdout"),
    "single_campaign": ("a single campaign", None),
    "tiny_propensities": ("tiny propensities", None),
    "short_stream": ("no final labels", "no decision has reached the end of its conversion window"),
}


def degenerate_stream(root, kind):
    """A small simulated stream made degenerate in one way (files rewritten in place, the
    manifests' line counts kept true)."""
    from tools.simulate import simulate

    sim = root / kind
    kw = dict(events=4_000, users=300, campaigns=3, days=9.0, slice_lines=1_000, seed=31)
    if kind == "no_holdout":
        kw["holdout_pct"] = 0
    if kind == "short_stream":
        kw["days"] = 1.0
    simulate(sim, **kw)
    empty = {"no_conversions": "conversion", "no_clicks": "click"}.get(kind)

    def edit(rec):
        if kind == "single_campaign":
            rec["campaign_id"], rec["creative_id"] = "cmp_000", "cre_000_0"
        elif kind == "tiny_propensities":
            rec["propensity"] = 1e-5
        return rec

    for mf in sorted((sim / "manifest").glob("*")):
        out = []
        for line in mf.read_text().splitlines():
            m = json.loads(line)
            if empty and empty in m["files"]:
                (sim / m["files"][empty]).write_text("")
                m["lines"][empty] = 0
            if kind in ("single_campaign", "tiny_propensities"):
                f = sim / m["files"]["decision"]
                lines = []
                for raw in f.read_bytes().splitlines():
                    try:
                        rec = orjson.loads(raw)
                    except orjson.JSONDecodeError:            # the simulator's malformed lines stay
                        lines.append(raw)
                        continue
                    lines.append(orjson.dumps(edit(rec)) if isinstance(rec, dict) and "propensity" in rec else raw)
                f.write_bytes(b"\n".join(lines) + b"\n")
            out.append(json.dumps(m))
        mf.write_text("\n".join(out) + "\n")
    return sim


@pytest.mark.parametrize("kind", list(KINDS))
def test_degenerate_stream_runs_through_all_three_jobs_with_a_warning(kind, tmp_path):
    from jobs.features import run as run_features
    from jobs.learner import run as run_learner
    from jobs.outcomes import run as run_outcomes

    sim = degenerate_stream(tmp_path, kind)
    truth = json.loads((sim / "truth" / "summary.json").read_text())
    cfg = cfg_for(tmp_path / "run")
    f = run_features(cfg, sim)
    assert f["reconciles"] and f["pending"] == 0
    assert f["events_in"] == f["processed"] + f["quarantined"]
    if kind in ("no_conversions", "no_clicks"):
        assert f["events_in"] < truth["lines_total"]             # the emptied stream is not counted
    o = run_outcomes(cfg)
    tot = o["totals"]
    assert sum(tot["in"].values()) == sum(tot["processed"].values()) + sum(tot["quarantined"].values()) \
        + tot["pending"]
    want_o, want_l = KINDS[kind]
    assert any(w.startswith(want_o) for w in o["warnings"]), o["warnings"]
    lr = run_learner(cfg)
    assert lr["snapshots"] >= 1 and lr["examples"] > 0
    if want_l:
        assert any(want_l in w for w in lr["warnings"]), lr["warnings"]
    # a healthy stream's warnings are not raised by a degenerate one's neighbours
    others = {w for k, (w, _) in KINDS.items() if k != kind}
    assert not any(w.startswith(tuple(others)) for w in o["warnings"] if not w.startswith(want_o)), o["warnings"]
