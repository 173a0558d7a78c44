"""The features job on the local Flink mini-cluster: simulator -> job -> Feast."""

import json

import pandas as pd
import pytest

from conftest import read_slices
from reference import reference
from schemas import CONTRACTS

pytestmark = pytest.mark.slow


def cfg_for(data_dir):
    """The configuration of a run in ``data_dir`` (streamlift.yaml; of the environment only the
    outcomes job's data-quality switch, which conftest.py turns off by default)."""
    import os

    from jobs.config import load

    return load(env={"STREAMLIFT_PATHS__DATA_DIR": str(data_dir),
                     "STREAMLIFT_OUTCOMES__DATA_QUALITY": os.environ.get("STREAMLIFT_OUTCOMES__DATA_QUALITY", "true")})


@pytest.fixture(scope="module")
def job_run(small_sim, tmp_path_factory):
    from jobs.features import run

    cfg = cfg_for(tmp_path_factory.mktemp("run"))
    summary = run(cfg, small_sim)
    return cfg, summary


def online_snapshot(cfg, keys):
    """All online values of the given keys, per view, read back through Feast."""
    from stores.feast_store import open_store, view_name

    store = open_store(cfg, apply=False)
    out = {}
    for kt, rows in keys.items():
        view = store.get_feature_view(view_name(kt))
        feats = [f"{view.name}:{f.name}" for f in view.features]
        out[kt] = pd.DataFrame(store.get_online_features(features=feats, entity_rows=rows).to_dict())
    return out


def reference_of(sim):
    slices = read_slices(sim)
    dicts = [{k: [dict(zip(CONTRACTS[k].field_names, r)) for r in recs] for k, recs in s.batches.items()}
             for s in slices]
    return reference(dicts)


def entity_rows(ref_features):
    from udfs.features import ENTITY_COLUMNS, KEY_SEP

    return {kt: [dict(zip(ENTITY_COLUMNS[kt], key.split(KEY_SEP))) for key in sorted(keys)]
            for kt, keys in ref_features.items()}


def assert_online_equals_reference(cfg, ref):
    """Every key's online values, read back through Feast, equal the batch reference."""
    from udfs.features import ENTITY_COLUMNS, KEY_SEP

    for kt, df in online_snapshot(cfg, entity_rows(ref)).items():
        ents = list(ENTITY_COLUMNS[kt])
        for rec in df.to_dict("records"):
            key = KEY_SEP.join(rec[e] for e in ents)
            for name, v in ref[kt][key].items():
                if name != "as_of":
                    assert rec[name] == pytest.approx(v, rel=1e-9, abs=1e-12), (kt, key, name)


def test_counts_reconcile_with_the_simulator(job_run, small_sim):
    cfg, s = job_run
    truth = json.loads((small_sim / "truth" / "summary.json").read_text())
    assert s["events_in"] == truth["lines_total"]
    assert s["reconciles"] and s["pending"] == 0
    assert s["events_in"] == s["processed"] + s["quarantined"]
    q = s["quarantined_by_reason"]
    for kind, n in truth["malformed_injected"].items():
        if n:
            assert q.get(kind, 0) == n, kind
    assert q["duplicate"] > 0 and q["late"] > 0
    # every quarantined record is on disk with its reason
    from jobs.sinks import read_quarantine

    assert len(read_quarantine(cfg)) == s["quarantined"]


def test_feast_read_back_equals_batch_reference(job_run, small_sim):
    cfg, _ = job_run
    ref, ref_enriched, _ = reference_of(small_sim)
    assert_online_equals_reference(cfg, ref)
    # the enriched decisions hold the values just before each decision
    from jobs.sinks import read_enriched

    enriched = read_enriched(cfg).set_index("decision_id")
    assert set(enriched.index) == set(ref_enriched)
    some = sorted(ref_enriched)[:500]
    for did in some:
        for col, v in ref_enriched[did].items():
            if v is not None:
                assert enriched.at[did, col] == pytest.approx(v, rel=1e-9, abs=1e-12)


def test_replaying_the_input_leaves_feast_unchanged(job_run, small_sim):
    from jobs.features import run
    from jobs.sinks import read_enriched

    cfg, _ = job_run
    ref, _, _ = reference_of(small_sim)
    rows = entity_rows(ref)
    before = online_snapshot(cfg, rows)
    enriched_before = read_enriched(cfg)
    run(cfg, small_sim)                       # the same input again, same stores
    after = online_snapshot(cfg, rows)
    for kt in before:
        pd.testing.assert_frame_equal(before[kt], after[kt])
    pd.testing.assert_frame_equal(enriched_before, read_enriched(cfg))


def test_online_writes_never_go_back_in_time(tmp_path):
    from stores.feast_store import open_store, write_online
    from udfs.features import feature_names

    cfg = cfg_for(tmp_path)
    store = open_store(cfg)
    cols = feature_names(cfg.features["half_lives"])
    new = pd.DataFrame([{"user_id": "u_0000000000000001", **{c: 2.0 for c in cols},
                         "event_timestamp": pd.Timestamp("2026-01-02", tz="UTC")}])
    old = new.assign(event_timestamp=pd.Timestamp("2026-01-01", tz="UTC"), **{c: 1.0 for c in cols})
    assert write_online(store, "user", new) == 1
    write_online(store, "user", old)        # older: the store keeps the newer row
    got = store.get_online_features(features=[f"user_features_v1:{cols[0]}"],
                                    entity_rows=[{"user_id": "u_0000000000000001"}]).to_dict()
    assert got[cols[0]] == [2.0]


def test_offline_store_point_in_time_join(job_run, small_sim):
    """Feast's get_historical_features over the offline Parquet the job wrote: as of
    each key's last event, the values equal the reference."""
    from stores.feast_store import open_store

    cfg, _ = job_run
    ref, _, _ = reference_of(small_sim)
    users = sorted(ref["user"])[:25]
    entity_df = pd.DataFrame({
        "user_id": users,
        "event_timestamp": [pd.Timestamp(ref["user"][u]["as_of"] + 1, unit="ms", tz="UTC") for u in users]})
    store = open_store(cfg, apply=False)
    got = store.get_historical_features(
        entity_df=entity_df, features=["user_features_v1:clicks_1d", "user_features_v1:impressions_7d"]).to_df()
    got = got.set_index("user_id")
    for u in users:
        assert got.at[u, "clicks_1d"] == pytest.approx(ref["user"][u]["clicks_1d"], rel=1e-9, abs=1e-12)
        assert got.at[u, "impressions_7d"] == pytest.approx(ref["user"][u]["impressions_7d"], rel=1e-9)


def test_source_faults_are_counted_not_crashes(tmp_path):
    """A manifest with a malformed line, a repeated seq and a slice naming a missing file: the
    job finishes, each fault is quarantined with its reason, and the counts still reconcile."""
    from jobs.features import run
    from tools.simulate import simulate

    sim = tmp_path / "sim"
    simulate(sim, events=6_000, users=500, campaigns=2, days=0.5, slice_lines=2_000, seed=3)
    lines = [json.loads(l) for f in sorted((sim / "manifest").glob("*.jsonl")) for l in f.read_text().splitlines() if l]
    broken = dict(lines[-1], seq=len(lines), files={**lines[-1]["files"], "click": "click/nope.jsonl"})
    (sim / "manifest" / "slices-faults.jsonl").write_text(
        "{not json\n" + json.dumps(lines[0]) + "\n" + json.dumps(broken) + "\n")
    cfg = cfg_for(tmp_path / "run")
    s = run(cfg, sim)
    q = s["quarantined_by_reason"]
    assert q.get("source") == 3, q           # bad manifest line, repeated seq 0, missing file
    assert s["reconciles"] and s["pending"] == 0


def _write_many(data_dir, worker, n):
    """One writer process: ``n`` users' rows in one Feast online write (each its own store)."""
    from jobs.config import load
    from stores.feast_store import open_store, write_online
    from udfs.features import feature_names

    cfg = load(env={"STREAMLIFT_PATHS__DATA_DIR": str(data_dir)})
    store = open_store(cfg, apply=False)
    cols = feature_names(cfg.features["half_lives"])
    for rnd in range(2):
        df = pd.DataFrame({"user_id": [f"u_{worker:04x}{i:012x}" for i in range(n)],
                           **{c: float(rnd + 1) for c in cols},
                           "event_timestamp": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(hours=rnd)})
        write_online(store, "user", df)
    return n


def test_two_writers_with_large_batches_share_the_sqlite_online_store(tmp_path):
    """Two processes (as the feast-online subtasks at parallelism 2) write 150k users x 9 values
    (1.35M values) each, twice, at once: neither fails with 'database is locked', every row is there."""
    import multiprocessing as mp

    from stores.feast_store import open_store
    from udfs.features import feature_names

    cfg = cfg_for(tmp_path)
    open_store(cfg)
    n = 150_000
    with mp.get_context("spawn").Pool(2) as pool:
        got = pool.starmap(_write_many, [(cfg.data_dir, w, n) for w in (1, 2)])
    assert got == [n, n]
    cols = feature_names(cfg.features["half_lives"])
    store = open_store(cfg, apply=False)
    rows = [{"user_id": f"u_{w:04x}{i:012x}"} for w in (1, 2) for i in (0, n // 2, n - 1)]
    vals = store.get_online_features(features=[f"user_features_v1:{cols[0]}"], entity_rows=rows).to_dict()
    assert vals[cols[0]] == [2.0] * 6
