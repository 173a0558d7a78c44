"""The outcomes job on the local mini-cluster: simulator -> features job -> outcomes job ->
Iceberg, read back by pyiceberg and DuckDB; replay and restart from a checkpoint."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import crash_and_restart
from test_job import cfg_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """9 simulated days (so that the first days' windows close), features then outcomes."""
    from jobs.features import run as run_features
    from jobs.outcomes import run as run_outcomes
    from tools.simulate import simulate

    root = tmp_path_factory.mktemp("outcomes")
    sim = root / "sim"
    simulate(sim, events=30_000, users=2_000, campaigns=4, days=9.0, slice_lines=3_000, seed=11)
    cfg = cfg_for(root / "run")
    features = run_features(cfg, sim)
    outcomes = run_outcomes(cfg)
    return cfg, sim, features, outcomes


def table_snapshot(cfg):
    from tools.analyst import read_table

    return {name: read_table(cfg, name).sort_values(key, ignore_index=True)
            for name, key in (("outcome", "decision_id"), ("delay_model", "model_key"),
                              ("quarantine", "quarantine_id"))}


def test_every_decision_once_and_counts_reconcile(pipeline):
    from tools.analyst import read_table

    cfg, sim, features, outcomes = pipeline
    out = read_table(cfg, "outcome")
    assert out.decision_id.is_unique
    assert len(out) == features["processed_by_stream"]["decision"]
    tot = outcomes["totals"]
    n_in = sum(tot["in"].values())
    assert n_in == sum(tot["processed"].values()) + sum(tot["quarantined"].values()) + tot["pending"]
    assert tot["in"].get("click", 0) == features["processed_by_stream"]["click"]
    assert tot["in"].get("conversion", 0) == features["processed_by_stream"]["conversion"]
    assert int(out.clicks.sum()) == tot["processed"]["click"]
    assert int(out.conversions.sum()) == tot["processed"]["conversion"]
    # the pipeline's quarantine, features job and outcomes job, is in the quarantine table
    q = read_table(cfg, "quarantine")
    assert q.quarantine_id.is_unique
    assert (q.job == "features").sum() == features["quarantined"]
    assert (q.job == "outcomes").sum() == sum(tot["quarantined"].values())


def test_labels_final_exactly_when_the_window_closed(pipeline):
    from tools.analyst import read_table
    from udfs.features import parse_duration

    cfg, sim, _, outcomes = pipeline
    out = read_table(cfg, "outcome")
    clock = outcomes["last_epoch"]
    t = out.decision_time.astype("int64") // 1000
    W = parse_duration(cfg.features["conversion_window"])
    is_final = clock - t >= W
    assert ((out.label_status == "final") == is_final).all()
    assert is_final.any() and (~is_final).any()
    assert (out.loc[is_final, "conversion_label"] == out.loc[is_final, "converted"].astype(float)).all()
    open_ = out[~is_final & ~out.converted]
    assert ((open_.conversion_label > 0) & (open_.conversion_label < 1)).all()
    # every open row was relabelled by the last fit; closed days keep the fit that finalized them
    assert (out.loc[~is_final, "delay_model_version"] == out.delay_model_version.max()).all()
    # joined outcomes agree with the simulator's truth: delivered conversions within the window
    truth = pd.read_parquet(sim / "truth" / "decisions.parquet").set_index("decision_id")
    tr = truth.loc[out.decision_id]
    delivered = tr.conversion_delivered & (tr.conversion_time - tr.event_time <= W)
    agree = (out.converted.to_numpy() == delivered.to_numpy()).mean()
    assert agree > 0.995, agree     # the rest: duplicates/malformed/late records the features job quarantined


def test_tables_read_back_by_duckdb_equal_pyiceberg(pipeline):
    from tools.analyst import compare, duckdb_connection

    cfg, _, _, _ = pipeline
    snap = table_snapshot(cfg)
    con = duckdb_connection(cfg)
    for name, view, key in (("outcome", "outcomes", "decision_id"), ("delay_model", "delay_models", "model_key"),
                            ("quarantine", "quarantine", "quarantine_id")):
        got = con.sql(f"SELECT * FROM {view} ORDER BY {key}").df()
        exp = snap[name]
        assert len(got) == len(exp)
        assert got[key].tolist() == exp[key].tolist()
        num = [c for c in exp.columns if pd.api.types.is_numeric_dtype(exp[c]) and c in got]
        pd.testing.assert_frame_equal(got[num].reset_index(drop=True), exp[num].reset_index(drop=True),
                                      check_dtype=False)
    cmp = compare(cfg)
    assert (cmp.decisions.sum() == len(snap["outcome"]))
    assert (cmp.rate_estimated_now >= cmp.rate_naive).all()


def test_running_again_on_the_same_input_changes_nothing(pipeline):
    from stores.iceberg_store import open_tables
    from jobs.outcomes import run as run_outcomes

    cfg, _, _, _ = pipeline
    before = table_snapshot(cfg)
    n_snapshots = {k: len(t.metadata.snapshots) for k, t in open_tables(cfg).items()}
    shutil.rmtree(cfg.data_dir / "checkpoints-outcomes", ignore_errors=True)
    run_outcomes(cfg)                                  # a fresh job, same input, same tables
    after = table_snapshot(cfg)
    for k in before:
        pd.testing.assert_frame_equal(before[k], after[k])
    assert {k: len(t.metadata.snapshots) for k, t in open_tables(cfg).items()} == n_snapshots


def test_restart_from_a_checkpoint_midway_gives_the_tables_of_a_clean_run(pipeline, tmp_path):
    """Slices handed off one by one to a --follow job; SIGKILL after some epochs; restart from
    the last retained checkpoint; the tables equal those of the uninterrupted run."""
    from tools.analyst import read_table

    cfg, _, _, _ = pipeline
    clean = table_snapshot(cfg)
    handoffs = sorted((cfg.data_dir / "handoff").glob("slice-*.json"))
    inp, run_dir = tmp_path / "input", tmp_path / "run"
    (inp / "handoff").mkdir(parents=True)

    def epochs_done():
        return sorted((run_dir / "outcomes").glob("epoch-*.json")) if (run_dir / "outcomes").exists() else []

    half = len(handoffs) // 2
    last = json.loads(handoffs[-1].read_text())["clock"]
    first_run = crash_and_restart(
        ["jobs.outcomes", "--input", str(inp)], run_dir, "checkpoints-outcomes", handoffs[:half], handoffs[half:],
        inp / "handoff", ready=lambda: len(epochs_done()) >= 3,
        done=lambda: (run_dir / "outcomes" / f"epoch-{last}.json").exists(),
        env={"STREAMLIFT_PATHS__DATA_DIR": str(run_dir)}, timeout=180,
        after_kill=lambda: {p.name for p in epochs_done()})
    assert len({p.name for p in epochs_done()}) > len(first_run)
    rcfg = cfg_for(run_dir)
    got = {name: read_table(rcfg, name).sort_values(key, ignore_index=True)
           for name, key in (("outcome", "decision_id"), ("delay_model", "model_key"),
                             ("quarantine", "quarantine_id"))}
    for k in clean:
        pd.testing.assert_frame_equal(got[k], clean[k])


def epoch_history(cfg) -> dict:
    """Per table the jobs commit by epoch, the epoch stamp and record counts of every snapshot,
    oldest first."""
    from stores.iceberg_store import EPOCH_PROPERTY, open_tables

    out = {}
    for name, t in open_tables(cfg).items():
        if name == "dq_result":            # per data-quality run, not per epoch (jobs/dq.py)
            continue
        t.refresh()
        out[name] = [(s.summary.additional_properties.get(EPOCH_PROPERTY),
                      s.summary.additional_properties.get("total-records"),
                      s.summary.additional_properties.get("added-records"),
                      s.summary.additional_properties.get("deleted-records"))
                     for s in t.metadata.snapshots]
    return out


def test_parallelism_1_and_2_give_identical_tables_and_epochs(pipeline, tmp_path):
    """The pipeline's outcomes job ran at parallelism 2 (the local profile's default); at 1 every
    table is the same row for row, and every epoch's commits carry the same stamps and record
    counts (only the number of data files differs: one per shard and day)."""
    from jobs.config import load
    from jobs.outcomes import run as run_outcomes

    cfg, _, _, _ = pipeline
    one = load(env={"STREAMLIFT_PATHS__DATA_DIR": str(tmp_path / "p1"), "STREAMLIFT_FLINK__PARALLELISM": "1",
                    "STREAMLIFT_OUTCOMES__DATA_QUALITY": "false"})
    run_outcomes(one, cfg.data_dir)
    a, b = table_snapshot(cfg), table_snapshot(one)
    for k in a:
        pd.testing.assert_frame_equal(a[k], b[k], check_exact=True, obj=k)
    assert epoch_history(cfg) == epoch_history(one)
    files = lambda c: len(list((c.data_dir / "iceberg").rglob("epoch-*-shard1.parquet")))   # noqa: E731
    assert files(cfg) > 0 and files(one) == 0          # p=2 had a second writer, p=1 did not


def test_committer_crash_between_data_files_and_commit_commits_the_epoch_once(pipeline, tmp_path):
    """SIGKILL of the committer's worker after the labellers wrote an epoch's data files and before
    its commit: Flink restarts from the last checkpoint, the epoch is written again (same files)
    and committed once; the tables and their commit history equal the clean run's."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    cfg, _, _, _ = pipeline
    epochs = sorted(int(p.stem[6:]) for p in (cfg.data_dir / "outcomes").glob("epoch-*.json"))
    target = epochs[len(epochs) // 2]
    run_dir, marker = tmp_path / "run", tmp_path / "crashed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STREAMLIFT_PATHS__DATA_DIR": str(run_dir),
           "STREAMLIFT_CRASH_AT": f"before_commit:{target}", "STREAMLIFT_CRASH_MARKER": str(marker)}
    r = subprocess.run([sys.executable, "-m", "jobs.outcomes", "--input", str(cfg.data_dir)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.exists(), "the crash point was not reached"
    assert int(marker.read_text().split()[2]) > 0          # data files were written before the kill
    rcfg = cfg_for(run_dir)
    clean, got = table_snapshot(cfg), table_snapshot(rcfg)
    for k in clean:
        pd.testing.assert_frame_equal(got[k], clean[k], check_exact=True, obj=k)
    assert epoch_history(rcfg) == epoch_history(cfg)      # every epoch committed once


# ----------------------------------------------------------------------------- the learner job
@pytest.fixture(scope="module")
def learned(pipeline):
    """The learner job on the same hand-off."""
    from jobs.learner import run as run_learner

    cfg, sim, features, _ = pipeline
    return run_learner(cfg)


def test_learner_snapshots_are_written_loadable_and_in_iceberg(pipeline, learned):
    from tools.analyst import read_table
    from tools.evaluate import job_scores
    from serving.serve import list_versions, load_latest_model, load_model

    cfg, _, features, _ = pipeline
    versions = list_versions(cfg.model_store, cfg.learner["model_id"])
    assert [m["version"] for m in versions] == list(range(1, learned["snapshots"] + 1))
    assert learned["snapshots"] > 5 and versions[-1]["examples"] == learned["examples"]
    metrics = read_table(cfg, "learner_metrics").sort_values("version", ignore_index=True)
    assert metrics.version.tolist() == [m["version"] for m in versions]
    assert metrics.snapshot_key.is_unique
    assert metrics.ctr_auc.dropna().between(0.5, 1.0).all() and metrics.ctr_auc.notna().sum() > 3
    latest = load_latest_model(cfg=cfg)
    assert latest.manifest["version"] == max(m["version"] for m in versions if m["safe"])
    first = load_model(cfg.model_store, cfg.learner["model_id"], 1)
    assert first.bundle.digest() != latest.bundle.digest()           # it kept learning
    scores = job_scores(cfg)                                         # every decision scored once
    assert scores.decision_id.is_unique
    assert len(scores) == features["processed_by_stream"]["decision"]


def test_learner_run_again_gives_the_same_model_and_adds_no_metrics_rows(pipeline, learned):
    """A fresh job on the same input (as after losing its state) trains the same model; the
    snapshots it rewrites are equal and Iceberg skips the epochs it already has."""
    from stores.iceberg_store import open_tables
    from jobs.learner import run as run_learner
    from serving.serve import load_latest_model

    cfg, _, _, _ = pipeline
    before = load_latest_model(cfg=cfg, safe_only=False)
    n_snap = len(open_tables(cfg)["learner_metrics"].metadata.snapshots)
    shutil.rmtree(cfg.data_dir / "checkpoints-learner", ignore_errors=True)
    again = run_learner(cfg)
    after = load_latest_model(cfg=cfg, safe_only=False)
    assert again["snapshots"] == learned["snapshots"]
    assert after.bundle.digest() == before.bundle.digest()
    assert len(open_tables(cfg)["learner_metrics"].metadata.snapshots) == n_snap


def test_serving_scores_with_features_read_from_feast(pipeline, learned):
    from stores.feast_store import open_store
    from serving.serve import features_from_feast, load_latest_model
    from udfs.spec import FeatureSpec

    cfg, sim, _, _ = pipeline
    truth = pd.read_parquet(sim / "truth" / "decisions.parquet")
    req = truth[truth.arm == "treatment"].tail(20)[["user_id", "campaign_id", "creative_id"]].assign(
        placement="feed", device="ios", region="eu", hour=3)
    now = int(truth.event_time.max())
    feats = features_from_feast(open_store(cfg, apply=False), req, now, FeatureSpec.from_config(cfg))
    assert feats["campaign_creative__impressions_7d"].notna().all()           # read from Feast
    model = load_latest_model(cfg=cfg)
    got = model.score(feats)
    assert len(got) == 20 and got.ctr.between(0, 1).all() and got.conversion.between(0, 1).all()
    assert (got.model_version == model.version).all()
    # the features matter: scoring without them (all missing) gives other CTRs
    bare = model.score(req)
    assert not np.allclose(bare.ctr.to_numpy(), got.ctr.to_numpy())


def test_learner_restart_from_a_checkpoint_gives_the_models_of_an_uninterrupted_run(pipeline, learned, tmp_path):
    """Hand-off slices announced to a --follow learner job; SIGKILL after some snapshots and a
    checkpoint; the rest announced; restart --from-checkpoint: every snapshot of the restarted
    job is the model the uninterrupted run cut at that version, down to the last one it cut
    from the input (the uninterrupted run's end-of-input snapshot needs a bounded input)."""
    from serving.serve import list_versions, load_model

    cfg, _, _, _ = pipeline
    model_id = cfg.learner["model_id"]
    clean_stats = [json.loads(p.read_text()) for p in sorted((cfg.data_dir / "learner").glob("snapshot-*.json"))]
    target = max(s["version"] for s in clean_stats if not s["timing"].get("end_of_input"))
    handoffs = sorted((cfg.data_dir / "handoff").glob("slice-*.json"))
    inp, run_dir = tmp_path / "input", tmp_path / "run"
    (inp / "handoff").mkdir(parents=True)

    def snapshots_done():
        d = run_dir / "learner"
        return sorted(d.glob("snapshot-*.json")) if d.exists() else []

    half = len(handoffs) // 2
    before_kill = crash_and_restart(
        ["jobs.learner", "--input", str(inp)], run_dir, "checkpoints-learner", handoffs[:half], handoffs[half:],
        inp / "handoff", ready=lambda: len(snapshots_done()) >= 3,
        done=lambda: (run_dir / "learner" / f"snapshot-{target:06d}.json").exists(),
        env={"STREAMLIFT_PATHS__DATA_DIR": str(run_dir)}, timeout=180, after_kill=lambda: len(snapshots_done()))
    assert 3 <= before_kill < target
    store = cfg_for(run_dir).model_store
    got = {m["version"]: m for m in list_versions(store, model_id)}
    assert sorted(got) == list(range(1, target + 1))
    for v in range(1, target + 1):
        a = load_model(store, model_id, v)
        b = load_model(cfg.model_store, model_id, v)
        assert a.bundle.digest() == b.bundle.digest(), v
        assert a.manifest["examples"] == b.manifest["examples"]
        assert json.dumps(a.manifest["metrics"]) == json.dumps(b.manifest["metrics"])   # NaN-safe


def test_learner_snapshots_do_not_depend_on_the_parallelism_around_it(pipeline, learned, tmp_path):
    """The learner is one instance; the stages around it (reading, score writers, publishing)
    run at the job's parallelism. At 1 instead of 2 every snapshot is the same model."""
    from jobs.config import load
    from jobs.learner import run as run_learner
    from serving.serve import list_versions, load_model

    cfg, _, _, _ = pipeline
    one = load(env={"STREAMLIFT_PATHS__DATA_DIR": str(tmp_path / "p1"), "STREAMLIFT_FLINK__PARALLELISM": "1",
                    "STREAMLIFT_OUTCOMES__DATA_QUALITY": "false"})
    run_learner(one, cfg.data_dir)
    a = list_versions(cfg.model_store, cfg.learner["model_id"])
    b = list_versions(one.model_store, one.learner["model_id"])
    assert [m["version"] for m in a] == [m["version"] for m in b] and len(a) > 5
    for m in a:
        x = load_model(cfg.model_store, cfg.learner["model_id"], m["version"]).bundle.digest()
        y = load_model(one.model_store, one.learner["model_id"], m["version"]).bundle.digest()
        assert x == y, m["version"]


def test_a_job_that_keeps_failing_stops_with_its_traceback(pipeline, tmp_path):
    """An exception on every attempt: Flink restarts the task with exponential back-off at most
    5 times (flink-conf), then the job exits non-zero; the Python traceback is on the job's own
    stderr and in <data>/errors/."""
    import os
    import subprocess
    import sys
    import time

    from conftest import ROOT

    cfg, _, _, _ = pipeline
    first = min(int(p.stem[6:]) for p in (cfg.data_dir / "outcomes").glob("epoch-*.json"))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STREAMLIFT_PATHS__DATA_DIR": str(run_dir),
           "STREAMLIFT_CRASH_AT": f"before_commit:{first}", "STREAMLIFT_CRASH_MODE": "raise"}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "jobs.outcomes", "--input", str(cfg.data_dir)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and time.time() - t0 < 300
    assert "injected failure at before_commit" in r.stderr
    errors = sorted((run_dir / "errors").glob("committer-*.txt"))
    assert 2 <= len(errors) <= 6                     # the first attempt and at most 5 restarts
    assert "RuntimeError: injected failure" in errors[0].read_text()


def test_per_campaign_effects_are_in_the_metrics_table_and_the_analyst_cli(pipeline, learned):
    """"Did this campaign work?": each snapshot's per-campaign ATE with its interval is in
    learner_metrics_v1 and `python -m tools.analyst ate` reads the newest."""
    from tools.analyst import campaign_effects, read_table

    cfg, _, _, _ = pipeline
    m = read_table(cfg, "learner_metrics")
    assert m.ate_json.notna().any()
    eff = campaign_effects(cfg)
    assert len(eff) >= 2 and eff.version.iloc[0] == m.version.max()
    ok = eff.ate.notna()
    assert ok.any() and ((eff.lo[ok] <= eff.ate[ok]) & (eff.ate[ok] <= eff.hi[ok])).all()
    assert (eff.n == eff.n_treated + eff.n_control).all()


def test_every_data_quality_suite_passes_on_the_jobs_tables(pipeline, monkeypatch):
    """The Great Expectations suites (schemas/expectations/) on the tables and files of a real
    run: outcomes_v1, delay_models_v1, the enriched decisions and the three offline feature views;
    the outcomes job runs the same as its last step (``outcomes.data_quality``)."""
    from jobs.dq import validate
    from jobs.outcomes import run

    cfg, _, _, _ = pipeline
    res = validate(cfg)
    assert res["success"], res["suites"]
    assert set(res["suites"]) >= {"outcomes_v1", "delay_models_v1", "enriched_decisions",
                                  "offline_features:user_features_v1"}
    monkeypatch.setenv("STREAMLIFT_OUTCOMES__DATA_QUALITY", "true")
    from test_job import cfg_for

    again = run(cfg_for(cfg.data_dir))              # a replay: nothing new, the suites run again
    assert again["data_quality"]["success"] and again["data_quality"]["failed"] == 0


def test_data_quality_runs_after_each_committed_epoch(pipeline, tmp_path, monkeypatch):
    """With ``outcomes.data_quality`` the epoch suites run in the job after every commit, on the
    rows that epoch committed (results under ``<suite>@epoch``, one run per epoch, the rates
    against the previous epoch's), and the whole-table suites once at the end."""
    from tools.analyst import read_table
    from jobs.outcomes import run
    from test_job import cfg_for

    cfg, _, _, _ = pipeline
    monkeypatch.setenv("STREAMLIFT_OUTCOMES__DATA_QUALITY", "true")
    fresh = cfg_for(tmp_path / "run")
    res = run(fresh, input_dir=cfg.data_dir)
    committed = [json.loads(p.read_text()) for p in (fresh.data_dir / "outcomes").glob("epoch-*.json")]
    committed = [e["epoch"] for e in committed if e["committed"]["outcome"]]
    assert len(committed) >= 3
    per_epoch = sorted(int(p.stem[3:]) for p in (fresh.data_dir / "outcomes").glob("dq-*.json"))
    assert per_epoch == sorted(committed)
    assert res["epoch_data_quality"] == {"epochs_checked": len(committed), "failed": 0}, res
    assert res["data_quality"]["success"], res["data_quality"]
    dq = read_table(fresh, "dq_result")
    ep = dq[dq.suite.str.endswith("@epoch")]
    assert set(ep.suite) == {"outcomes_v1@epoch", "delay_models_v1@epoch"}
    assert ep.run_id.nunique() == len(committed) and ep.success.all()
    # the conversion rate of final labels (like with like), in each epoch that committed final
    # rows: the first observed, each later one bounded around the previous one's observed rate
    rel = ep[(ep.expectation == "expect_column_mean_to_be_between") & (ep.column == "conversion_label")] \
        .sort_values("run_time")
    kw = [json.loads(k) for k in rel.kwargs]
    assert 2 <= len(rel) < len(committed)          # the first epochs have no final row yet
    assert all("final" in str(k.get("row_condition")) for k in kw)
    assert kw[0]["max_value"] == float("inf")
    obs = rel.observed_value.tolist()
    for i in range(1, len(kw)):
        assert kw[i]["min_value"] < obs[i - 1] < kw[i]["max_value"]
        assert (kw[i]["min_value"] + kw[i]["max_value"]) / 2 == pytest.approx(obs[i - 1])
    assert set(dq.suite) >= {"outcomes_v1", "delay_models_v1"}             # the end-of-run suites
