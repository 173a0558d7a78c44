"""Feast wiring: open the store of a run, apply the definitions, write features safely.

Feast's SQLite online store overwrites a row whatever its event time, so the
repo uses ``stores.feast_sqlite.GuardedSqliteOnlineStore``, which never replaces a
row with an older one (on Redis, ``stores.feast_redis`` writes Feast's layout with
that rule checked atomically on the server). Offline, each slice
becomes one Parquet file ``<data>/offline/<view>/slice-NNNNNNNN.parquet`` with a
deterministic name, so a replayed slice rewrites its own file instead of adding
a copy; the views' ``FileSource`` reads that folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import yaml

from jobs.config import ROOT, Config

__all__ = ["open_store", "definitions", "write_online", "write_offline", "view_name", "offline_root"]


def offline_root(cfg: Config) -> str:
    """Where the offline views' Parquet files go: ``feast.offline_dir`` (a folder or an ``s3://``
    URL: the at-scale profile), else ``<data>/offline``."""
    return str(cfg.feast.get("offline_dir") or cfg.data_dir / "offline").rstrip("/")


def definitions(cfg: Config):
    """Import feature_repo/definitions.py (it derives names from udfs and the config)."""
    path = ROOT / cfg.feast["repo"] / "definitions.py"
    spec = importlib.util.spec_from_file_location("streamlift_feature_definitions", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def view_name(key_type: str, spec=None) -> str:
    """The Feast view of a key type: ``spec.view_name`` (default: the spec of the loaded
    configuration, ``features.spec_version``)."""
    if spec is None:
        spec = _config_spec()
    return spec.view_name(key_type)


_SPEC = {}


def _config_spec():
    """The feature spec of the loaded configuration, parsed again only when the file or the
    environment's overrides change (writers ask for it on every write)."""
    import os

    from jobs.config import PREFIX, ROOT, load
    from udfs.spec import FeatureSpec

    path = Path(os.environ.get("STREAMLIFT_CONFIG", ROOT / "streamlift.yaml"))
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = None
    key = (str(path), mtime, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(PREFIX))))
    if key not in _SPEC:
        _SPEC[key] = FeatureSpec.from_config(load())
    return _SPEC[key]


def repo_config(cfg: Config):
    from feast.repo_config import RepoConfig

    raw = yaml.safe_load((ROOT / cfg.feast["repo"] / "feature_store.yaml").read_text())
    data = cfg.data_dir
    data.mkdir(parents=True, exist_ok=True)
    # a SQL registry (feast.registry: {registry_type: sql, path: <SQLAlchemy URL>}: the at-scale
    # profile's PostgreSQL) or the run's file registry
    registry = cfg.feast.get("registry")
    raw["registry"] = dict(registry) if hasattr(registry, "keys") else str(registry or data / "registry.db")
    if cfg.feast["online_store"] == "redis":
        raw["online_store"] = {"type": "redis", "connection_string": cfg.feast["redis_connection"]}
    else:
        raw["online_store"]["path"] = str(data / "online_store.db")
    return RepoConfig(repo_path=ROOT / cfg.feast["repo"], **raw)


def open_store(cfg: Config, apply: bool = True):
    """The run's FeatureStore; with ``apply`` the definitions are registered (idempotent)."""
    import warnings

    from feast import FeatureStore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        store = FeatureStore(config=repo_config(cfg))
        if apply:
            from udfs.spec import FeatureSpec

            store.apply(definitions(cfg).build(FeatureSpec.from_config(cfg), offline_root(cfg),
                                               s3_endpoint=cfg.feast.get("s3_endpoint")))
    return store


def _entity_keys(view, df: pd.DataFrame):
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    cols = [e.name for e in view.entity_columns]
    cols_values = [df[c].tolist() for c in cols]
    return [EntityKey(join_keys=cols, entity_values=[Value(string_val=v) for v in vals])
            for vals in zip(*cols_values)]


def write_online(store, key_type: str, df: pd.DataFrame) -> int:
    """Write feature rows to the online store; returns the rows handed to it.

    An older row never replaces a newer one. On Redis (``online_store.type: redis``)
    the rows go through ``stores.feast_redis``: Feast's layout, written by one Lua script
    per batch that compares event times on the server (atomic under concurrent
    writers; an equal event time rewrites, so a replay is a no-op in effect). On
    SQLite the store's upsert keeps the newest row (``stores.feast_sqlite``); rows go
    to the provider's ``online_write_batch`` as protos: Feast's DataFrame path
    converts value by value through pandas, about twice as slow.
    """
    if df is None or df.empty:
        return 0
    from feast.protos.feast.types.Value_pb2 import Value

    view = store.get_feature_view(view_name(key_type))
    if getattr(store.config.online_store, "type", None) == "redis":
        from stores.feast_redis import write_frame

        if write_frame(store, view, df) is not None:
            return len(df)
    keys = _entity_keys(view, df)
    stamps = df["event_timestamp"].dt.to_pydatetime()
    names = [f.name for f in view.features]
    columns = [df[n].tolist() for n in names]
    rows = [(keys[i], {n: Value(double_val=col[i]) for n, col in zip(names, columns)}, ts, None)
            for i, ts in enumerate(stamps)]
    store._get_provider().online_write_batch(store.config, view, rows, progress=None)
    return len(rows)


def write_offline(cfg: Config, key_type: str, seq: int, df: pd.DataFrame) -> str | None:
    """One slice's rows of a view: ``<offline root>/<view>/slice-NNNNNNNN.parquet`` (a replay
    rewrites the same file), renamed into place locally, one PUT on an object store."""
    if df is None or df.empty:
        return None
    from udfs.spec import FeatureSpec

    root = offline_root(cfg)
    name = f"{view_name(key_type, FeatureSpec.from_config(cfg))}/slice-{seq:08d}.parquet"
    if "://" in root:
        import fsspec

        with fsspec.open(f"{root}/{name}", "wb") as f:       # an object appears whole or not at all
            df.to_parquet(f, index=False)
        return f"{root}/{name}"
    path = Path(root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    df.to_parquet(tmp, index=False)
    tmp.rename(path)
    return str(path)
