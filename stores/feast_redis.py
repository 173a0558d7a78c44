"""Feast online writes to Redis: Feast's own layout, last writer wins by event time, atomically.

Feast's ``RedisOnlineStore.online_write_batch`` reads every key's stored timestamp in one
round trip and writes the newer rows in a second: two writers can interleave between the
read and the write, so an older row can replace a newer one; and it builds a protobuf per
value and a murmur3 hash per value and row in Python. This writer keeps Feast's layout
byte for byte and moves the decision into Redis:

* **Layout** (``feast/infra/online_stores/redis.py``, Feast 0.67): one hash per entity key,
  named ``serialize_entity_key(key, entity_key_serialization_version) + project``
  (``helpers._redis_key``); one field per feature, named ``_mmh3("<view>:<feature>")``,
  holding a serialized ``Value`` proto; and ``_ts:<view>`` holding a serialized protobuf
  ``Timestamp`` (seconds, nanos; microsecond precision, as Feast's ``FromDatetime``). The
  view name is Feast's ``compute_versioned_name`` (the bare name unless online feature-view
  versioning is on). Feast reads these hashes unchanged (tested byte for byte against
  Feast's own writes).
* **Atomic last-writer-wins**: one Lua script (loaded once per connection and server,
  called with ``EVALSHA``) per batch of ``batch_rows`` rows. For each key it decodes the
  stored ``_ts:<view>`` and writes the row only if the incoming event time is **at least**
  the stored one. A script runs alone on the server, so the compare and the write of a key
  cannot interleave with another writer's. Equal event time: the row is written again, so
  replaying a batch rewrites identical values (a no-op in effect); two *different* rows
  with the same key and event time are resolved by arrival order (the last one wins).
  This is the rule of ``stores.feast_sqlite`` (``WHERE excluded.event_ts >= event_ts``).
  Feast's own writer skips an equal timestamp instead; for identical replays the two agree.
* **Conflation**: the newest row per entity key of a frame is kept (stable, so the last of
  equal event times), before any batch is built: a key appears once per call.
* **Little per-row Python**: the feature values of a batch go to the script as one blob of
  9-byte ``Value`` protos built with numpy (``double_val`` is field 5 of feast's
  ``types/Value.proto``, wire type 1: ``b"\\x29"`` + the little-endian double; the tag is
  taken from the proto descriptor and the bytes checked against protobuf in the tests),
  the event times as one blob of (seconds, nanos) doubles (for the comparison) and one of
  serialized ``Timestamp`` protos in 12-byte slots with their lengths (varints encoded
  with numpy: encoding them in Lua cost ~2 of ~7.5 µs per row on the server); the script
  cuts the blobs. Python builds only the key bytes per row. Field names are hashed once per view.

Only Float64 features and string entity columns (the project's views) take this path;
``supports`` tells, and ``stores.feast_store.write_online`` falls back to Feast's writer
otherwise and for Redis Cluster (a batch's keys span hash slots there). Event times before
1970 are refused (Feast's layout stores them as 10-byte negative varints).

Also here: ``bench_write`` (rows/s of this writer and of Feast's ``online_write_batch``,
side by side) and ``freshness_probe`` (time until ``get_online_features`` returns rows as
of a given event time).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["LUA_LWW", "RedisLuaWriter", "writer_for_store", "write_frame", "supports",
           "double_values_blob", "encode_entity_keys", "timestamp_proto_slots", "timestamp_proto_bytes",
           "bench_write", "freshness_probe", "measure_freshness"]

#: rows per EVALSHA (one atomic script run on the server)
BATCH_ROWS = 2000
#: rows per pipeline round trip (several scripts)
PIPELINE_ROWS = 20000

_STRING = 2          # feast ValueType.STRING (types/Value.proto)


def _double_tag() -> int:
    """Tag byte of ``Value.double_val``: (field number << 3) | wire type 1 (64-bit); 0x29."""
    from feast.protos.feast.types.Value_pb2 import Value

    tag = Value.DESCRIPTOR.fields_by_name["double_val"].number << 3 | 1
    assert tag < 0x80          # one byte
    return tag


_DOUBLE_TAG = _double_tag()
_VALUE_DTYPE = np.dtype([("tag", "u1"), ("v", "<f8")])   # packed: 9 bytes, a serialized Value

LUA_LWW = r"""
-- Feast RedisOnlineStore layout, last writer wins by event time (>=), one batch atomically.
-- KEYS[i]       Feast hash key of row i (serialized entity key + project)
-- ARGV[1]       timestamp field "_ts:<view>"
-- ARGV[2]       F, the number of features
-- ARGV[3..2+F]  feature field names (murmur3 of "<view>:<feature>")
-- ARGV[3+F]     values: #KEYS * F serialized Value protos of 9 bytes, row by row
-- ARGV[4+F]     event times: #KEYS * 16 bytes, (seconds, nanos) as little-endian doubles
-- ARGV[5+F]     event times as serialized google.protobuf.Timestamp: #KEYS slots of 12 bytes
-- ARGV[6+F]     the length of each Timestamp in its slot: #KEYS bytes
-- ARGV[7+F]     key TTL in seconds, 0 for none
-- returns the number of rows written
local sub, byte, call, sunpack = string.sub, string.byte, redis.call, struct.unpack
local tsf = ARGV[1]
local F = tonumber(ARGV[2])
local names = {}
for j = 1, F do names[j] = ARGV[2 + j] end
local vals = ARGV[3 + F]
local times = ARGV[4 + F]
local protos = ARGV[5 + F]
local lens = ARGV[6 + F]
local ttl = tonumber(ARGV[7 + F])
local W = 9 * F

local function decode_ts(b)
  local s, n, i, len = 0, 0, 1, #b
  while i <= len do
    local tag = byte(b, i)
    i = i + 1
    local v, mul, c = 0, 1, 0
    repeat
      c = byte(b, i) or 0
      i = i + 1
      v = v + (c % 128) * mul
      mul = mul * 128
    until c < 128
    if tag == 8 then
      if v >= 9223372036854775808 then v = v - 18446744073709551616 end
      s = v
    elseif tag == 16 then
      n = v
    end
  end
  return s, n
end

local written = 0
local args = {}
for i = 1, #KEYS do
  local s, n = sunpack("<dd", times, (i - 1) * 16 + 1)
  local old = call("HGET", KEYS[i], tsf)
  local newer = true
  if old then
    local os, on = decode_ts(old)
    newer = s > os or (s == os and n >= on)
  end
  if newer then
    args[1] = tsf
    args[2] = sub(protos, (i - 1) * 12 + 1, (i - 1) * 12 + byte(lens, i))
    local off = (i - 1) * W
    for j = 1, F do
      args[2 * j + 1] = names[j]
      args[2 * j + 2] = sub(vals, off + 9 * (j - 1) + 1, off + 9 * j)
    end
    call("HSET", KEYS[i], unpack(args))
    if ttl > 0 then call("EXPIRE", KEYS[i], ttl) end
    written = written + 1
  end
end
return written
"""


# ---------------------------------------------------------------------------------------
# encoding (pure functions; tests compare them with Feast's and protobuf's own encoders)

def double_values_blob(values: np.ndarray) -> bytes:
    """Serialized ``Value(double_val=x)`` protos of a 2-D float array, row by row, 9 bytes
    each, concatenated.

    >>> from feast.protos.feast.types.Value_pb2 import Value
    >>> double_values_blob(np.array([[1.5, 0.0]])) == (Value(double_val=1.5).SerializeToString()
    ...                                                + Value(double_val=0.0).SerializeToString())
    True
    """
    values = np.asarray(values, dtype="<f8")
    buf = np.empty(values.shape, dtype=_VALUE_DTYPE)
    buf["tag"] = _DOUBLE_TAG
    buf["v"] = values
    return buf.tobytes()


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def encode_entity_keys(join_keys, columns, project: str) -> list[bytes]:
    """Feast's Redis hash keys (``helpers._redis_key``, entity key serialization version 3)
    of string entities: ``columns[i]`` holds the values of ``join_keys[i]``, row by row.

    Version 3 layout: uint32 number of keys; per join key in sorted order uint32 STRING,
    uint32 length, utf-8 name; per value in the same order uint32 STRING, uint32 length,
    utf-8 value; then the project name.
    """
    order = sorted(range(len(join_keys)), key=lambda i: join_keys[i])
    head = _u32(len(join_keys)) + b"".join(
        _u32(_STRING) + _u32(len(join_keys[i].encode())) + join_keys[i].encode() for i in order)
    tail = project.encode()
    tag = _u32(_STRING)
    enc = [[str(v).encode() for v in columns[i]] for i in order]
    if len(enc) == 1:
        return [b"".join((head, tag, _u32(len(a)), a, tail)) for a in enc[0]]
    if len(enc) == 2:
        return [b"".join((head, tag, _u32(len(a)), a, tag, _u32(len(b)), b, tail))
                for a, b in zip(*enc)]
    return [head + b"".join(tag + _u32(len(v)) + v for v in vals) + tail for vals in zip(*enc)]


_TS_SLOT = 12      # tag + 5-byte varint, twice


def timestamp_proto_slots(seconds, nanos) -> tuple[np.ndarray, np.ndarray]:
    """Serialized ``google.protobuf.Timestamp(seconds, nanos)`` of every row, vectorized:
    a ``(n, 12)`` uint8 array (row i's proto in its first ``lengths[i]`` bytes) and the
    lengths. Fields 1 (seconds) and 2 (nanos) as varints, a zero field omitted, as protobuf
    serializes them. ``0 <= seconds < 2**35`` (until the year 3058), ``0 <= nanos < 10**9``.
    """
    sec = np.asarray(seconds, dtype=np.int64)
    nan = np.asarray(nanos, dtype=np.int64)
    if len(sec) and (sec.min() < 0 or sec.max() >= 2**35 or nan.min() < 0 or nan.max() >= 10**9):
        raise ValueError("event time out of range for the Redis writer (1970 to 3058)")
    n = len(sec)
    out = np.zeros((n, _TS_SLOT), dtype=np.uint8)
    pos = np.zeros(n, dtype=np.int64)
    rows = np.arange(n)
    for tag, x in ((0x08, sec), (0x10, nan)):
        nb = sum(((x >> (7 * k)) != 0).astype(np.int64) for k in range(5))   # varint bytes; 0: omitted
        has = nb > 0
        out[rows[has], pos[has]] = tag
        pos += has
        for k in range(5):
            m = nb > k
            byte = ((x >> (7 * k)) & 0x7F) | np.where(nb > k + 1, 0x80, 0)
            out[rows[m], pos[m] + k] = byte[m]
        pos += nb
    return out, pos.astype(np.uint8)


def timestamp_proto_bytes(seconds: int, nanos: int) -> bytes:
    """One row of :func:`timestamp_proto_slots`.

    >>> from google.protobuf.timestamp_pb2 import Timestamp
    >>> timestamp_proto_bytes(1767225600, 123000) == Timestamp(seconds=1767225600, nanos=123000).SerializeToString()
    True
    """
    slots, lens = timestamp_proto_slots([seconds], [nanos])
    return slots[0, :lens[0]].tobytes()


def _event_times(ts: pd.Series) -> np.ndarray:
    """(seconds, nanos) per row as float64 pairs, truncated to microseconds as Feast's
    ``Timestamp.FromDatetime`` of a Python datetime; naive times are taken as UTC."""
    ns = pd.to_datetime(ts, utc=True).dt.tz_convert(None).dt.as_unit("ns").to_numpy().view("i8")
    if len(ns) and ns.min() < 0:
        raise ValueError("event times before 1970-01-01 (or missing) are not supported by the Redis writer")
    out = np.empty((len(ns), 2), dtype="<f8")
    out[:, 0] = ns // 1_000_000_000
    out[:, 1] = (ns % 1_000_000_000) // 1000 * 1000
    return out


# ---------------------------------------------------------------------------------------
# the writer

@dataclass(frozen=True)
class _ViewLayout:
    name: str                 # versioned view name as Feast stores it
    join_keys: tuple
    features: tuple
    ts_field: bytes
    fields: tuple             # murmur3 field names, in features order


def _layout(view, versioning: bool = False) -> _ViewLayout:
    from feast.infra.online_stores.helpers import _mmh3, compute_versioned_name

    name = compute_versioned_name(view, versioning)
    feats = tuple(f.name for f in view.features)
    return _ViewLayout(name=name, join_keys=tuple(c.name for c in view.entity_columns), features=feats,
                       ts_field=f"_ts:{name}".encode(), fields=tuple(_mmh3(f"{name}:{f}") for f in feats))


def supports(view) -> bool:
    """Float64 features and string entity columns only (everything else: Feast's writer)."""
    from feast.types import Float64, String

    return (bool(view.features) and bool(view.entity_columns)
            and all(f.dtype == Float64 for f in view.features)
            and all(c.dtype == String for c in view.entity_columns))


def conflate(df: pd.DataFrame, join_keys) -> pd.DataFrame:
    """The newest row per entity key (the last one of equal event times)."""
    if len(df) < 2:
        return df
    df = df.sort_values("event_timestamp", kind="stable")
    return df.drop_duplicates(subset=list(join_keys), keep="last")


class RedisLuaWriter:
    """Writes DataFrames into Feast's Redis layout with the ``LUA_LWW`` script.

    ``client``: a redis-py client (one per writer; thread-safe through its connection pool).
    ``project`` and ``entity_key_serialization_version`` as in the Feast repo config.
    """

    def __init__(self, client, project: str, entity_key_serialization_version: int = 3,
                 key_ttl_seconds: int | None = None, batch_rows: int = BATCH_ROWS,
                 pipeline_rows: int = PIPELINE_ROWS, versioning: bool = False):
        if entity_key_serialization_version != 3:
            raise ValueError("only entity_key_serialization_version 3 is supported")
        self.client = client
        self.project = project
        self.ttl = int(key_ttl_seconds or 0)
        self.batch_rows = int(batch_rows)
        self.pipeline_rows = max(int(pipeline_rows), self.batch_rows)
        self.versioning = versioning
        self._layouts: dict = {}
        self._sha = None
        self._lock = threading.Lock()

    def _load(self) -> str:
        with self._lock:
            self._sha = self.client.script_load(LUA_LWW)
            return self._sha

    def layout(self, view) -> _ViewLayout:
        key = (view.name, tuple(f.name for f in view.features), tuple(c.name for c in view.entity_columns))
        lay = self._layouts.get(key)
        if lay is None:
            lay = self._layouts[key] = _layout(view, self.versioning)
        return lay

    def prepare(self, view, df: pd.DataFrame) -> list[tuple[list, list]]:
        """The (keys, args) of every EVALSHA for ``df`` (conflated first)."""
        lay = self.layout(view)
        df = conflate(df, lay.join_keys)
        n = len(df)
        keys = encode_entity_keys(lay.join_keys, [df[c].to_numpy() for c in lay.join_keys], self.project)
        buf = np.empty((n, len(lay.features)), dtype=_VALUE_DTYPE)
        buf["tag"] = _DOUBLE_TAG
        buf["v"] = df[list(lay.features)].to_numpy(dtype="<f8", na_value=np.nan)
        times = _event_times(df["event_timestamp"])
        protos, lens = timestamp_proto_slots(times[:, 0].astype(np.int64), times[:, 1].astype(np.int64))
        head = [lay.ts_field, len(lay.fields), *lay.fields]
        calls = []
        for a in range(0, n, self.batch_rows):
            b = min(a + self.batch_rows, n)
            calls.append((keys[a:b], [*head, buf[a:b].tobytes(), times[a:b].tobytes(),
                                      protos[a:b].tobytes(), lens[a:b].tobytes(), self.ttl]))
        return calls

    def write(self, view, df: pd.DataFrame) -> int:
        """Writes ``df`` (entity columns, feature columns, ``event_timestamp``); returns the
        rows stored (those at least as new as what Redis held), after conflation."""
        if df is None or df.empty:
            return 0
        return self.run(self.prepare(view, df))

    def run(self, calls) -> int:
        from redis.exceptions import NoScriptError

        sha = self._sha or self._load()
        written = 0
        start = 0
        while start < len(calls):
            rows, stop = 0, start
            while stop < len(calls) and (stop == start or rows + len(calls[stop][0]) <= self.pipeline_rows):
                rows += len(calls[stop][0])
                stop += 1
            chunk = calls[start:stop]
            for attempt in range(2):
                with self.client.pipeline(transaction=False) as pipe:
                    for keys, args in chunk:
                        pipe.evalsha(sha, len(keys), *keys, *args)
                    results = pipe.execute(raise_on_error=False)
                missing = [c for c, r in zip(chunk, results) if isinstance(r, NoScriptError)]
                for r in results:
                    if isinstance(r, Exception) and not isinstance(r, NoScriptError):
                        raise r
                written += sum(r for r in results if not isinstance(r, Exception))
                if not missing:
                    break
                # the server lost its scripts (restart, SCRIPT FLUSH): load again and redo
                # those batches (safe: a batch is idempotent)
                sha = self._load()
                chunk = missing
            else:
                raise RuntimeError("Redis kept refusing the Lua script (NOSCRIPT)")
            start = stop
        return written


# ---------------------------------------------------------------------------------------
# Feast wiring

_WRITERS: dict = {}
_WRITERS_LOCK = threading.Lock()


def _client_for(online_store_config):
    from feast.infra.online_stores.redis import RedisOnlineStore

    return RedisOnlineStore()._get_client(online_store_config)   # Feast's own parsing, redis or sentinel


def writer_for_store(store) -> RedisLuaWriter | None:
    """The process's writer for a FeatureStore whose online store is Redis (standalone or
    Sentinel); None otherwise (Redis Cluster included: a batch's keys span hash slots)."""
    cfg = store.config
    osc = cfg.online_store
    if getattr(osc, "type", None) != "redis" or osc.redis_type == "redis_cluster":
        return None
    if cfg.entity_key_serialization_version != 3:
        return None
    versioning = bool(getattr(cfg.registry, "enable_online_feature_view_versioning", False))
    key = (osc.connection_string, str(osc.redis_type), osc.sentinel_master, cfg.project,
           osc.key_ttl_seconds, versioning)
    with _WRITERS_LOCK:
        w = _WRITERS.get(key)
        if w is None:
            w = _WRITERS[key] = RedisLuaWriter(_client_for(osc), cfg.project, 3, osc.key_ttl_seconds,
                                               versioning=versioning)
    return w


def write_frame(store, view, df: pd.DataFrame) -> int | None:
    """Writes ``df`` to ``view`` through the Lua writer; None when this store or view does
    not take that path (the caller then uses Feast's writer)."""
    w = writer_for_store(store)
    if w is None or not supports(view):
        return None
    return w.write(view, df)


# ---------------------------------------------------------------------------------------
# measurement

def _bench_view(n_features: int):
    from datetime import timedelta

    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, String

    user = Entity(name="bench_user", join_keys=["user_id"], value_type=ValueType.STRING)
    src = FileSource(name="bench_source", path="unused.parquet", timestamp_field="event_timestamp")
    return FeatureView(name="bench_features_v1", entities=[user], ttl=timedelta(days=30), source=src,
                       schema=[Field(name="user_id", dtype=String)]
                       + [Field(name=f"f{i}", dtype=Float64) for i in range(n_features)])


def _bench_frame(n_rows: int, n_features: int, ts: pd.Timestamp, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    vals = rng.random((n_rows, n_features)) * 100
    df = pd.DataFrame(vals, columns=[f"f{i}" for i in range(n_features)])
    df.insert(0, "user_id", [f"u_{i:016x}" for i in range(n_rows)])
    df["event_timestamp"] = ts + pd.to_timedelta(rng.integers(0, 1000, n_rows), unit="ms")
    return df


def _feast_rows(view, df: pd.DataFrame):
    """The rows ``stores.feast_store.write_online`` hands to Feast's ``online_write_batch``."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    cols = [e.name for e in view.entity_columns]
    keys = [EntityKey(join_keys=cols, entity_values=[Value(string_val=v) for v in vals])
            for vals in zip(*[df[c].tolist() for c in cols])]
    names = [f.name for f in view.features]
    columns = [df[n].tolist() for n in names]
    stamps = pd.DatetimeIndex(df["event_timestamp"]).to_pydatetime()
    return [(keys[i], {n: Value(double_val=col[i]) for n, col in zip(names, columns)}, ts, None)
            for i, ts in enumerate(stamps)]


def bench_write(connection: str, n_rows: int = 100_000, n_features: int = 9, batch_rows: int = BATCH_ROWS,
                repeat: int = 1) -> dict:
    """Rows/s of the Lua writer and of Feast's ``RedisOnlineStore.online_write_batch`` on the
    Redis at ``connection`` (Feast's connection string, ``host:port[,db=N]``), side by side.

    Each path writes ``n_rows`` rows of ``n_features`` doubles (one string entity) as a
    DataFrame twice: ``insert`` (new keys) and ``update`` (the same keys, newer rows, so
    every stored timestamp is compared and every row rewritten). Times include building the
    keys and values from the DataFrame (for Feast: the protos ``write_online`` builds, then
    ``online_write_batch``; ``feast_write_only`` times that call alone). The two paths
    write under different projects (so different keys) and both key sets are deleted at the
    end. The best of ``repeat`` runs is reported.
    """
    import warnings

    from feast.infra.online_stores.redis import RedisOnlineStore
    from feast.repo_config import RepoConfig

    view = _bench_view(n_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        configs = {p: RepoConfig(project=f"streamlift_bench_{p}", registry="unused-registry.db",
                                 provider="local", repo_path=".", entity_key_serialization_version=3,
                                 online_store={"type": "redis", "connection_string": connection})
                   for p in ("lua", "feast")}
    feast_store = RedisOnlineStore()
    client = feast_store._get_client(configs["feast"].online_store)
    lua = RedisLuaWriter(client, configs["lua"].project, batch_rows=batch_rows)
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    frames = {"insert": _bench_frame(n_rows, n_features, t0, 1),
              "update": _bench_frame(n_rows, n_features, t0 + pd.Timedelta(hours=1), 2)}
    out = {"rows": n_rows, "features": n_features, "batch_rows": batch_rows}

    def clean():
        for p, cfg in configs.items():
            keys = encode_entity_keys(["user_id"], [frames["insert"]["user_id"].to_numpy()], cfg.project)
            for a in range(0, len(keys), 10_000):
                client.delete(*keys[a:a + 10_000])

    try:
        for r in range(max(1, repeat)):
            clean()
            for phase, df in frames.items():
                t = time.perf_counter()
                stored = lua.write(view, df)
                dt = time.perf_counter() - t
                assert stored == n_rows, (phase, stored)
                k = f"lua_{phase}_rows_per_s"
                out[k] = max(out.get(k, 0), n_rows / dt)
                t = time.perf_counter()
                rows = _feast_rows(view, df)
                t1 = time.perf_counter()
                feast_store.online_write_batch(configs["feast"], view, rows, progress=None)
                t2 = time.perf_counter()
                k = f"feast_{phase}_rows_per_s"
                out[k] = max(out.get(k, 0), n_rows / (t2 - t))
                k = f"feast_write_only_{phase}_rows_per_s"
                out[k] = max(out.get(k, 0), n_rows / (t2 - t1))
    finally:
        clean()
    for phase in frames:
        out[f"ratio_{phase}"] = out[f"lua_{phase}_rows_per_s"] / out[f"feast_{phase}_rows_per_s"]
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in out.items()}


def _online_as_of_ms(store, view_name: str, feature: str, entity_rows) -> list:
    """Event time (ms) of each entity row's online values, None where there are none."""
    resp = store.get_online_features(features=[f"{view_name}:{feature}"], entity_rows=list(entity_rows))
    names = list(resp.proto.metadata.feature_names.val)
    vec = resp.proto.results[names.index(feature)]
    out = []
    for status, ts in zip(vec.statuses, vec.event_timestamps):
        present = status == 1   # FieldStatus.PRESENT
        out.append(ts.seconds * 1000 + ts.nanos // 1_000_000 if present else None)
    return out


def freshness_probe(store, key_type: str, entity_rows, expected_as_of_ms, since: float | None = None,
                    timeout_s: float = 30.0, poll_s: float = 0.002) -> dict:
    """Polls ``get_online_features`` until every entity row's online values are as of at
    least ``expected_as_of_ms`` (one event time for all, or one per row).

    Returns ``{"seconds": ..., "polls": ...}``: seconds from ``since`` (a ``time.time()``
    taken when the rows were handed to the writer, possibly in another process) or from
    the call, until Feast returns them. Raises ``TimeoutError`` after ``timeout_s``.
    """
    from stores.feast_store import view_name

    entity_rows = list(entity_rows)
    expected = (list(expected_as_of_ms) if np.ndim(expected_as_of_ms)
                else [int(expected_as_of_ms)] * len(entity_rows))
    name = view_name(key_type)
    feature = store.get_feature_view(name).features[0].name
    start = time.time() if since is None else since
    deadline = time.time() + timeout_s
    polls = 0
    while True:
        polls += 1
        got = _online_as_of_ms(store, name, feature, entity_rows)
        if all(g is not None and g >= e for g, e in zip(got, expected)):
            return {"seconds": time.time() - start, "polls": polls}
        if time.time() > deadline:
            raise TimeoutError(f"online rows not as of the expected event times after {timeout_s}s "
                               f"({sum(g is None or g < e for g, e in zip(got, expected))} behind)")
        time.sleep(poll_s)


def measure_freshness(store, key_type: str, df: pd.DataFrame, sample: int = 100, timeout_s: float = 30.0) -> dict:
    """Writes ``df`` with ``stores.feast_store.write_online`` and probes ``sample`` of its keys
    (evenly spaced; reading every key of a large frame through Feast would time the read)
    until Feast returns them: write seconds, write-to-visible seconds, polls. In one process
    the rows are visible once the write returns (the script has run); a benchmark whose
    writer runs elsewhere (the features job) calls ``freshness_probe`` with ``since``."""
    from stores.feast_store import view_name, write_online

    view = store.get_feature_view(view_name(key_type))
    ents = [c.name for c in view.entity_columns]
    newest = conflate(df, ents)
    if len(newest) > sample:
        newest = newest.iloc[np.linspace(0, len(newest) - 1, sample).round().astype(int)]
    rows = newest[ents].to_dict("records")
    et = _event_times(newest["event_timestamp"]).astype("i8")
    as_of = (et[:, 0] * 1000 + et[:, 1] // 1_000_000).tolist()
    t = time.time()
    write_online(store, key_type, df)
    wrote = time.time() - t
    probe = freshness_probe(store, key_type, rows, as_of, since=t, timeout_s=timeout_s)
    return {"write_s": wrote, "visible_s": probe["seconds"], "polls": probe["polls"], "probed": len(rows)}


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Lua writer vs Feast's online_write_batch on a Redis server")
    ap.add_argument("--connection", default="localhost:6379")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--batch-rows", type=int, default=BATCH_ROWS)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    print(json.dumps(bench_write(a.connection, a.rows, batch_rows=a.batch_rows, repeat=a.repeat), indent=1))
