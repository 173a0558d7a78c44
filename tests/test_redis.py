"""Feast on a real Redis server (Debian's redis-server, started here on a free port): the
features job writes its online features there and Feast reads back the batch reference;
a replay changes nothing; an older row never replaces a newer one."""

import shutil
import socket
import subprocess
import time

import pandas as pd
import pytest

from test_job import assert_online_equals_reference, entity_rows, online_snapshot, reference_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: `make redis` installs Debian's redis-server "
                    "(make test does it first)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.time() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.1)
    yield f"127.0.0.1:{port}", client
    proc.terminate()
    proc.wait(timeout=10)


def redis_cfg(data_dir, url):
    from jobs.config import load

    return load(env={"STREAMLIFT_PATHS__DATA_DIR": str(data_dir), "STREAMLIFT_FEAST__ONLINE_STORE": "redis",
                     "STREAMLIFT_FEAST__REDIS_CONNECTION": url})


@pytest.fixture(scope="module")
def redis_run(redis_url, small_sim, tmp_path_factory):
    from jobs.features import run

    url, client = redis_url
    cfg = redis_cfg(tmp_path_factory.mktemp("run-redis"), url)
    return cfg, run(cfg, small_sim), client


def test_features_job_writes_to_redis_and_feast_reads_back_the_reference(redis_run, small_sim):
    cfg, summary, client = redis_run
    assert not (cfg.data_dir / "online_store.db").exists()          # nothing went to SQLite
    ref, _, _ = reference_of(small_sim)
    n_keys = sum(len(keys) for keys in ref.values())
    assert client.dbsize() >= len(ref["user"])                      # Feast keeps one hash per entity key
    assert sum(summary["feature_rows_online"].values()) >= n_keys
    assert_online_equals_reference(cfg, ref)


def test_replay_into_redis_changes_nothing(redis_run, small_sim):
    from jobs.features import run

    cfg, _, client = redis_run
    ref, _, _ = reference_of(small_sim)
    rows = entity_rows(ref)
    before, size = online_snapshot(cfg, rows), client.dbsize()
    run(cfg, small_sim)
    after = online_snapshot(cfg, rows)
    for kt in before:
        pd.testing.assert_frame_equal(before[kt], after[kt])
    assert client.dbsize() == size


def test_redis_keeps_the_newer_row(redis_url, tmp_path):
    from jobs.feast_store import open_store, write_online
    from udfs.features import feature_names

    cfg = redis_cfg(tmp_path, redis_url[0])
    store = open_store(cfg)
    cols = feature_names(cfg.features["half_lives"])
    new = pd.DataFrame([{"user_id": "u_redis_newer", **{c: 2.0 for c in cols},
                         "event_timestamp": pd.Timestamp("2026-01-02", tz="UTC")}])
    old = new.assign(event_timestamp=pd.Timestamp("2026-01-01", tz="UTC"), **{c: 1.0 for c in cols})
    write_online(store, "user", new)
    write_online(store, "user", old)
    got = store.get_online_features(features=[f"user_features_v1:{cols[0]}"],
                                    entity_rows=[{"user_id": "u_redis_newer"}]).to_dict()
    assert got[cols[0]] == [2.0]
