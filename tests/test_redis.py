"""Feast on a real Redis server (Debian's redis-server, started here on a free port): the
features job writes its online features there and Feast reads back the batch reference;
a replay changes nothing; an older row never replaces a newer one."""

import pandas as pd
import pytest

from services import redis_server
from test_job import assert_online_equals_reference, entity_rows, online_snapshot, reference_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as (url, client):
        yield url, client


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
    from stores.feast_store import open_store, write_online
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


# --- stores.feast_redis: Feast's layout written by one Lua script per batch -----------------------

@pytest.fixture
def lua_store(redis_url, tmp_path):
    """A Feast store on database 1 of the test server (the features job uses database 0),
    emptied first; with a client on that database."""
    import redis

    from stores.feast_store import open_store

    url, client0 = redis_url
    host, port = url.split(":")
    client = redis.Redis(host=host, port=int(port), db=1)
    client.flushdb()
    store = open_store(redis_cfg(tmp_path, f"{url},db=1"))
    return store, client


def _frame(view, ids, ts, values):
    """Rows of ``view``: ``ids`` (one tuple of entity values per row), event times ``ts``, and
    ``values`` (one number per row, feature j gets value + j, or one list per row)."""
    import numpy as np

    ents = [c.name for c in view.entity_columns]
    feats = [f.name for f in view.features]
    rows = []
    for key, t, v in zip(ids, ts, values):
        vals = list(v) if np.ndim(v) else [v + j for j in range(len(feats))]
        rows.append({**dict(zip(ents, key)), **dict(zip(feats, vals)), "event_timestamp": t})
    return pd.DataFrame(rows)


def _hashes(client, keys):
    return [client.hgetall(k) for k in keys]


def _feast_keys(store, view, df):
    """The Redis keys of ``df``'s rows as Feast builds them (``helpers._redis_key``)."""
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    ents = [c.name for c in view.entity_columns]
    return [_redis_key(store.config.project,
                       EntityKey(join_keys=ents, entity_values=[Value(string_val=r[e]) for e in ents]),
                       entity_key_serialization_version=store.config.entity_key_serialization_version)
            for r in df.to_dict("records")]


def test_value_and_timestamp_encodings_equal_protobufs():
    import numpy as np
    from feast.protos.feast.types.Value_pb2 import Value
    from google.protobuf.timestamp_pb2 import Timestamp

    from stores.feast_redis import double_values_blob, timestamp_proto_bytes, timestamp_proto_slots

    rng = np.random.default_rng(3)
    xs = [0.0, -0.0, 1.0, -1.5, 1 / 3, 1e-310, 1.7976931348623157e308, float("inf"), float("-inf"),
          float("nan"), *rng.normal(0, 1e6, 200)]
    assert double_values_blob(np.array([xs])) == b"".join(Value(double_val=x).SerializeToString() for x in xs)
    secs = [0, 1, 0, 127, 128, 1767225600, 1767225600, 2**31, 2**35 - 1, *rng.integers(0, 2**35, 300)]
    nanos = [0, 0, 1, 128, 16383, 0, 123_456_000, 999_999_999, 1000, *rng.integers(0, 10**9, 300)]
    nanos[-100:] = [n // 1000 * 1000 if i % 2 else 0 for i, n in enumerate(nanos[-100:])]
    slots, lens = timestamp_proto_slots(secs, nanos)
    for i, (s, n) in enumerate(zip(secs, nanos)):
        want = Timestamp(seconds=int(s), nanos=int(n)).SerializeToString()
        assert slots[i, :lens[i]].tobytes() == want, (s, n)
        assert timestamp_proto_bytes(int(s), int(n)) == want
    with pytest.raises(ValueError):
        timestamp_proto_slots([-1], [0])


def test_lua_writer_writes_feasts_own_layout_and_feast_reads_it_back(lua_store):
    """Byte for byte the hashes Feast's own online_write_batch writes (keys, murmur3 field
    names, Value protos, the _ts Timestamp), for a single and a composite entity key; and
    get_online_features returns the values and event times written."""
    import math

    from stores.feast_redis import _feast_rows, encode_entity_keys
    from stores.feast_store import view_name, write_online

    store, client = lua_store
    ts = [pd.Timestamp("2026-01-02 03:04:05", tz="UTC"),                 # whole second: no nanos field
          pd.Timestamp("2026-01-02 03:04:05.678", tz="UTC"),
          pd.Timestamp("2026-01-02 03:04:05.678901", tz="UTC"),
          pd.Timestamp("2026-03-01 00:00:00.000001", tz="UTC")]
    cases = {"user": [("u_00000000000000a1",), ("u_00000000000000a2",), ("u_00000000000000a3",),
                      ("u_00000000000000a4",)],
             # composite key: Feast sorts the join keys (campaign_id before user_id)
             "user_campaign": [("u_00000000000000a1", "c_1"), ("u_00000000000000a1", "c_ü"),
                               ("u_00000000000000a2", "c_1"), ("u_00000000000000a3", "c_12345678901234567890")]}
    values = [0.0, -0.0, 1 / 3, 12345.678]
    for kt, ids in cases.items():
        view = store.get_feature_view(view_name(kt))
        df = _frame(view, ids, ts, values)
        nan_row = df.iloc[[0]].assign(**{view.features[1].name: float("nan")},
                                      **{[c.name for c in view.entity_columns][-1]: "x_nan"})
        df = pd.concat([df, nan_row], ignore_index=True)
        keys = _feast_keys(store, view, df)
        ents = [c.name for c in view.entity_columns]
        assert encode_entity_keys(ents, [df[e].to_numpy() for e in ents], store.config.project) == keys

        store._get_provider().online_write_batch(store.config, view, _feast_rows(view, df), progress=None)
        feast_hashes = _hashes(client, keys)
        assert all(len(h) == len(view.features) + 1 for h in feast_hashes)
        client.delete(*keys)
        assert write_online(store, kt, df) == len(df)
        assert _hashes(client, keys) == feast_hashes

        feats = [f"{view.name}:{f.name}" for f in view.features]
        resp = store.get_online_features(features=feats, entity_rows=df[ents].to_dict("records"))
        got = pd.DataFrame(resp.to_dict())
        for f in view.features:
            for a, b in zip(got[f.name], df[f.name]):
                assert (math.isnan(a) and math.isnan(b)) if math.isnan(b) else (a == b and
                                                                                math.copysign(1, a) == math.copysign(1, b))
        names = list(resp.proto.metadata.feature_names.val)
        for f in view.features:
            stamps = [pd.Timestamp(t.seconds * 10**9 + t.nanos, unit="ns", tz="UTC")
                      for t in resp.proto.results[names.index(f.name)].event_timestamps]
            assert stamps == list(df["event_timestamp"]), (kt, f.name)


def test_concurrent_writers_never_leave_an_older_row(lua_store):
    """Two threads, each with its own connection and writer, write 30 versions of the same
    keys, one oldest first and one newest first, in small batches (many interleaved scripts);
    a third reads while they write. Every read sees a row whose values belong to its event
    time and a key's event time never goes back; at the end every key holds its newest row."""
    import random
    import threading

    import numpy as np
    import redis

    from feast.infra.online_stores.helpers import _mmh3
    from feast.protos.feast.types.Value_pb2 import Value
    from google.protobuf.timestamp_pb2 import Timestamp

    from stores.feast_redis import RedisLuaWriter
    from stores.feast_store import view_name

    store, client = lua_store
    view = store.get_feature_view(view_name("user"))
    kw = client.connection_pool.connection_kwargs
    ids = [(f"u_{i:016x}",) for i in range(300)]
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    versions = 30

    def frame(v, rng):
        keys = list(ids)
        rng.shuffle(keys)
        # value = version: the features of a row tell which version (event time) it is
        return _frame(view, keys, [t0 + pd.Timedelta(seconds=v, milliseconds=7 * v)] * len(keys),
                      [float(v) * 1000] * len(keys))

    keys = _feast_keys(store, view, frame(0, random.Random(0)).sort_values("user_id"))
    ts_field = f"_ts:{view.name}".encode()
    f0, f8 = (_mmh3(f"{view.name}:{view.features[j].name}") for j in (0, len(view.features) - 1))
    barrier = threading.Barrier(3)
    errors, stop = [], threading.Event()

    def writer(order, seed):
        try:
            rng = random.Random(seed)
            w = RedisLuaWriter(redis.Redis(**kw), store.config.project, batch_rows=37)
            barrier.wait()
            for v in order:
                df = frame(v, rng)
                if v % 5 == 0:      # now and then an older and a newer row of a key in one frame
                    df = pd.concat([df, frame(max(v - 3, 0), rng)], ignore_index=True).sample(frac=1, random_state=v)
                w.write(view, df)
        except Exception as e:      # noqa: BLE001
            errors.append(e)

    def as_version(raw_ts, raw0, raw8):
        t = Timestamp()
        t.ParseFromString(raw_ts)
        v0, v8 = Value(), Value()
        v0.ParseFromString(raw0)
        v8.ParseFromString(raw8)
        return t.seconds * 10**9 + t.nanos, v0.double_val, v8.double_val

    def reader():
        r = redis.Redis(**kw)
        seen = {}
        barrier.wait()
        try:
            while not stop.is_set():
                for k in random.sample(keys, 40):
                    raw = r.hmget(k, [ts_field, f0, f8])
                    if raw[0] is None:
                        continue
                    ns, v0, v8 = as_version(*raw)
                    v = round(v0 / 1000)
                    assert ns == (t0 + pd.Timedelta(seconds=v, milliseconds=7 * v)).value, "values of another row"
                    assert v8 == v0 + len(view.features) - 1
                    assert ns >= seen.get(k, 0), "went back in time"
                    seen[k] = ns
        except Exception as e:      # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(list(range(versions)), 1)),
               threading.Thread(target=writer, args=(list(reversed(range(versions))), 2)),
               threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads[:2]:
        t.join(timeout=300)
    stop.set()
    threads[2].join(timeout=60)
    assert not errors, errors
    newest = (t0 + pd.Timedelta(seconds=versions - 1, milliseconds=7 * (versions - 1))).value
    final = [as_version(*client.hmget(k, [ts_field, f0, f8])) for k in keys]
    assert final == [(newest, (versions - 1) * 1000.0, (versions - 1) * 1000.0 + len(view.features) - 1)] * len(keys)
    got = store.get_online_features(features=[f"{view.name}:{view.features[0].name}"],
                                    entity_rows=[{"user_id": i[0]} for i in ids]).to_dict()
    assert got[view.features[0].name] == [(versions - 1) * 1000.0] * len(ids)
    assert np.all(np.array([client.exists(k) for k in keys]) == 1)


def test_lua_writer_replay_changes_nothing(lua_store):
    """Writing the same batches again, an older batch after a newer one, and both in one
    frame leaves every hash byte for byte as it was. An equal event time is rewritten (with
    the same values), an older one skipped: the writer's counts say which."""
    from stores.feast_redis import RedisLuaWriter
    from stores.feast_store import view_name, write_online

    store, client = lua_store
    view = store.get_feature_view(view_name("user_campaign"))
    t0 = pd.Timestamp("2026-02-01 12:00:00.250", tz="UTC")
    old_ids = [(f"u_{i:016x}", f"c_{i % 3}") for i in range(100)]
    new_ids = [(f"u_{i:016x}", f"c_{i % 3}") for i in range(50, 150)]
    old = _frame(view, old_ids, [t0] * 100, [1.0] * 100)
    new = _frame(view, new_ids, [t0 + pd.Timedelta(minutes=5)] * 100, [2.0] * 100)
    write_online(store, "user_campaign", old)
    write_online(store, "user_campaign", new)
    keys = _feast_keys(store, view, pd.concat([old, new]).drop_duplicates(["user_id", "campaign_id"]))
    before, size = _hashes(client, keys), client.dbsize()
    assert size == 150 and all(before)
    w = RedisLuaWriter(client, store.config.project)
    assert w.write(view, old) == 50          # keys 0-49: equal event time, rewritten; 50-99: older, skipped
    assert w.write(view, new) == 100         # equal event time everywhere
    assert w.write(view, old) == 50
    assert w.write(view, pd.concat([new, old])) == 150     # conflated: one row per key, the newest
    write_online(store, "user_campaign", old)
    assert _hashes(client, keys) == before
    assert client.dbsize() == size
    feats = [f"{view.name}:{f.name}" for f in view.features]
    rows = [{"user_id": u, "campaign_id": c} for u, c in old_ids + new_ids[50:]]
    got = pd.DataFrame(store.get_online_features(features=feats, entity_rows=rows).to_dict())
    first = view.features[0].name
    assert list(got[first]) == [1.0] * 50 + [2.0] * 100


def test_feasts_writer_and_the_lua_writer_respect_each_others_timestamps(lua_store):
    from stores.feast_redis import _feast_rows
    from stores.feast_store import view_name, write_online

    store, client = lua_store
    view = store.get_feature_view(view_name("user"))
    ids = [("u_00000000000000f1",), ("u_00000000000000f2",)]
    t = pd.Timestamp("2026-01-05", tz="UTC")
    write_online(store, "user", _frame(view, ids[:1], [t], [5.0]))                          # Lua, newer
    store._get_provider().online_write_batch(store.config, view, _feast_rows(
        view, _frame(view, ids, [t - pd.Timedelta(hours=1)] * 2, [1.0, 1.0])), progress=None)   # Feast, older
    write_online(store, "user", _frame(view, ids[1:], [t - pd.Timedelta(hours=2)], [0.5]))   # Lua, older
    got = store.get_online_features(features=[f"{view.name}:{view.features[0].name}"],
                                    entity_rows=[{"user_id": i[0]} for i in ids]).to_dict()
    assert got[view.features[0].name] == [5.0, 1.0]


def test_bench_and_freshness_probe(redis_url, lua_store):
    from stores.feast_redis import bench_write, freshness_probe, measure_freshness
    from stores.feast_store import view_name

    url, client0 = redis_url
    size = client0.dbsize()
    out = bench_write(url, 3000)
    assert out["lua_insert_rows_per_s"] > 0 and out["feast_update_rows_per_s"] > 0
    assert client0.dbsize() == size                         # the bench removes its keys

    store, _ = lua_store
    view = store.get_feature_view(view_name("user"))
    t = pd.Timestamp("2026-01-07 08:00:00.123", tz="UTC")
    df = _frame(view, [("u_00000000000000e1",), ("u_00000000000000e2",)], [t, t], [3.0, 4.0])
    m = measure_freshness(store, "user", df)
    assert m["polls"] == 1 and m["visible_s"] >= m["write_s"]
    with pytest.raises(TimeoutError):
        freshness_probe(store, "user", [{"user_id": "u_00000000000000e1"}], t.value // 10**6 + 1, timeout_s=0.2)


def test_forget_deletes_the_users_keys_from_redis(redis_run, small_sim):
    """``tools.privacy forget`` on Feast's Redis layout: every hash whose entity key holds the user
    (user and user×campaign keys) is deleted; other users' are untouched. Last in this module:
    it changes the shared run."""
    from tools.privacy import forget

    cfg, _, client = redis_run
    ref, _, _ = reference_of(small_sim)
    rows = entity_rows(ref)
    user, other = rows["user"][0]["user_id"], rows["user"][1]["user_id"]
    holding = [k for k in client.scan_iter(match=f"*{user}*".encode())]
    assert len(holding) >= 2                                      # the user key and a user×campaign key
    size = client.dbsize()
    audit = forget(cfg, [user])
    assert audit["removed"]["feast_online"] == {"store": "redis", "keys": len(holding)}
    assert list(client.scan_iter(match=f"*{user}*".encode())) == []
    assert client.dbsize() == size - len(holding)
    snap = online_snapshot(cfg, {"user": [{"user_id": user}, {"user_id": other}]})["user"]
    values = snap.drop(columns=["user_id"])
    assert values.iloc[0].isna().all() and values.iloc[1].notna().all()
