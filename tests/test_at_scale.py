"""The at-scale profile end to end (issue 15): with STREAMLIFT_PROFILE=at-scale and nothing else
changed, features -> outcomes -> learner are submitted with `flink run` to a standalone cluster
against real servers started here: PostgreSQL (Iceberg SQL catalog, Feast SQL registry), moto's
S3 API server (Iceberg warehouse, Feast offline files, model store) and Redis (Feast online).
The tables, features and snapshots are read back by independent readers, and a replay changes
nothing. Flink's own checkpoints stay on local disk: the apache-flink package ships no S3
filesystem plugin (see README "Deploying")."""

import os

import pytest

from services import postgres_server, redis_server, s3_server

pytestmark = pytest.mark.slow

BUCKETS = ("streamlift-warehouse", "streamlift-feast", "streamlift-models", "streamlift-checkpoints")
TABLES = ("outcomes_v1", "delay_models_v1", "quarantine_v1", "learner_metrics_v1", "dq_results_v1")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """PostgreSQL, the S3 server and Redis, the profile's variables in the environment (the
    cluster's processes inherit them), and a standalone cluster of one TaskManager, two slots."""
    from tools import cluster as c

    if c.rest_ready():
        pytest.fail("a Flink cluster is already running on localhost:8081; stop it first (make cluster-down)")
    work = tmp_path_factory.mktemp("at-scale")
    (work / "pg").mkdir()
    with postgres_server(work / "pg") as (pg_url, pg), s3_server(work, buckets=BUCKETS) as (endpoint, s3), \
            redis_server(work, password="redis-test-secret") as (redis_url, rclient):
        rport = redis_url.rsplit(":", 1)[1]
        env = {"STREAMLIFT_PROFILE": "at-scale", "STREAMLIFT_DATA_DIR": str(work / "run"),
               "STREAMLIFT_QUARANTINE_KEY": "quarantine-test-key",
               "POSTGRES_USER": pg["user"], "POSTGRES_PASSWORD": pg["password"], "POSTGRES_HOST": pg["host"],
               "POSTGRES_PORT": str(pg["port"]), "POSTGRES_DB": pg["db"],
               "S3_ENDPOINT": endpoint, "S3_ACCESS_KEY": s3["access_key"], "S3_SECRET_KEY": s3["secret_key"],
               "S3_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": s3["access_key"],
               "AWS_SECRET_ACCESS_KEY": s3["secret_key"], "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1",
               "REDIS_HOST": "127.0.0.1", "REDIS_PORT": rport, "REDIS_PASSWORD": "redis-test-secret",
               "STREAMLIFT_OUTCOMES__DATA_QUALITY": "true"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            c.up(taskmanagers=1, slots=2)
            yield {"work": work, "run": work / "run", "pg_url": pg_url, "s3": s3["client"], "endpoint": endpoint,
                   "redis": rclient, "cluster": c, "env": env}
        finally:
            c.down()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _cfg():
    from jobs.config import load

    return load()


def _submit(stack, job, input_dir):
    r = stack["cluster"].submit(job, str(input_dir), str(stack["run"]), parallelism=2)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _objects(s3, bucket, prefix=""):
    """(key, size) of every object under ``prefix``, all pages."""
    out, token = [], None
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = s3.list_objects_v2(**kw)
        out += [(o["Key"], o["Size"]) for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def _keys(s3, bucket, prefix=""):
    return [k for k, _ in _objects(s3, bucket, prefix)]


def _state(stack):
    """What a replay must not change: every table's current snapshot, the model versions, the
    bucket's objects (name, size) and Redis' keys and values."""
    from serving.serve import list_versions
    from stores.iceberg_store import open_tables

    cfg = _cfg()
    tables = {}
    for name, t in open_tables(cfg).items():
        t.refresh()
        snap = t.current_snapshot()
        tables[name] = None if snap is None else snap.snapshot_id
    objects = {b: sorted(_objects(stack["s3"], b)) for b in ("streamlift-feast", "streamlift-models")}
    r = stack["redis"]
    online = {k: r.hgetall(k) for k in r.scan_iter(count=1000)}
    models = [m["version"] for m in list_versions(cfg.model_store, cfg.learner["model_id"])]
    return {"tables": tables, "objects": objects, "online": online, "models": models}


@pytest.fixture(scope="module")
def pipeline(stack, small_sim):
    """The three jobs, submitted in order, all under the profile; then the state a replay must keep."""
    _submit(stack, "features", small_sim)
    _submit(stack, "outcomes", stack["run"])
    _submit(stack, "learner", stack["run"])
    return _state(stack)


def test_iceberg_tables_live_in_the_bucket_and_the_postgres_catalog(stack, pipeline):
    import sqlalchemy

    eng = sqlalchemy.create_engine(stack["pg_url"])
    with eng.connect() as conn:
        rows = dict(conn.execute(sqlalchemy.text(
            "SELECT table_name, metadata_location FROM iceberg_tables WHERE table_namespace = 'streamlift'")).all())
    assert set(TABLES) <= set(rows), rows
    assert all(loc.startswith("s3://streamlift-warehouse/iceberg/streamlift.db/") for loc in rows.values()), rows
    data = [k for k in _keys(stack["s3"], "streamlift-warehouse", "iceberg/streamlift.db/outcomes_v1/data/")
            if k.endswith(".parquet")]
    assert data, "no outcome data files in the bucket"
    assert not (stack["run"] / "iceberg").exists()      # nothing of the tables on local disk


def test_pyiceberg_and_duckdb_read_the_same_rows_from_the_bucket(stack, pipeline):
    import duckdb
    import s3fs

    from stores.iceberg_store import open_tables, read_table

    cfg = _cfg()
    out = read_table(cfg, "outcome")
    decisions = sum(1 for _ in out.decision_id)
    assert decisions > 1000 and out.decision_id.is_unique
    table = open_tables(cfg)["outcome"]
    files = [t.file.file_path for t in table.scan().plan_files()]
    con = duckdb.connect()
    con.register_filesystem(s3fs.S3FileSystem(key=stack["env"]["S3_ACCESS_KEY"], secret=stack["env"]["S3_SECRET_KEY"],
                                              endpoint_url=stack["endpoint"]))
    got = con.execute("SELECT count(*), count(DISTINCT decision_id), sum(conversion_label) FROM read_parquet($1)",
                      [files]).fetchone()
    assert got[0] == got[1] == decisions
    assert got[2] == pytest.approx(float(out.conversion_label.sum()), rel=1e-9)


def test_feast_serves_from_redis_with_its_registry_in_postgres(stack, pipeline):
    import pandas as pd
    import sqlalchemy

    from stores.feast_store import offline_root, open_store

    eng = sqlalchemy.create_engine(stack["pg_url"])
    with eng.connect() as conn:
        views = {r[0] for r in conn.execute(sqlalchemy.text("SELECT feature_view_name FROM feature_views"))}
    assert {"user_features_v1", "user_campaign_features_v1", "campaign_creative_features_v1"} <= views
    assert stack["redis"].dbsize() > 100
    cfg = _cfg()
    root = offline_root(cfg)
    assert root.startswith("s3://streamlift-feast/")
    off = pd.read_parquet(f"{root}/user_features_v1", storage_options={"client_kwargs": {
        "endpoint_url": stack["endpoint"]}})
    last = off.sort_values("event_timestamp").groupby("user_id").tail(1).set_index("user_id")
    users = list(last.index[:20])
    store = open_store(cfg, apply=False)
    got = store.get_online_features(features=["user_features_v1:impressions_1d"],
                                    entity_rows=[{"user_id": u} for u in users]).to_df().set_index("user_id")
    # the online value of a user is the newest row written for it: the last offline row
    assert got.loc[users, "impressions_1d"].to_numpy() == pytest.approx(last.loc[users, "impressions_1d"].to_numpy())


def test_snapshots_load_from_the_s3_model_store(stack, pipeline):
    from serving.serve import list_versions, load_latest_model

    cfg = _cfg()
    assert cfg.model_store.startswith("s3://streamlift-models/")
    versions = list_versions(cfg.model_store, cfg.learner["model_id"])
    assert len(versions) >= 2 and pipeline["models"] == [m["version"] for m in versions]
    model = load_latest_model(cfg=cfg)
    assert model.manifest["version"] == max(m["version"] for m in versions if m["safe"])
    assert _keys(stack["s3"], "streamlift-models", f"models/{cfg.learner['model_id']}/LATEST")


def test_a_replay_changes_nothing(stack, small_sim, pipeline):
    """The three jobs again on the same input and state stores: every table keeps its snapshot,
    the bucket's offline files and snapshots are the same objects, Redis holds the same values."""
    _submit(stack, "features", small_sim)
    _submit(stack, "outcomes", stack["run"])
    _submit(stack, "learner", stack["run"])
    again = _state(stack)
    # the end-of-run data-quality suites ran again: a new run of checks, appended to dq_results_v1
    again["tables"].pop("dq_result"), pipeline["tables"].pop("dq_result")
    assert again["tables"] == pipeline["tables"]
    assert again["models"] == pipeline["models"]
    assert again["objects"] == pipeline["objects"]
    assert again["online"] == pipeline["online"]
