"""Feast wiring: open the store of a run, apply the definitions, write features safely.

Feast's SQLite online store overwrites a row whatever its event time, so
:func:`write_online` reads the stored event timestamps first and drops every row
that is older than what the store already holds (Redis does the same check
itself; doing it here keeps one behaviour for every store). Offline, each slice
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

__all__ = ["open_store", "definitions", "write_online", "write_offline", "view_name"]


def definitions(cfg: Config):
    """Import feature_repo/definitions.py (it derives names from udfs and the config)."""
    path = ROOT / cfg.feast["repo"] / "definitions.py"
    spec = importlib.util.spec_from_file_location("streamlift_feature_definitions", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def view_name(key_type: str) -> str:
    return f"{key_type}_features_v1"


def repo_config(cfg: Config):
    from feast.repo_config import RepoConfig

    raw = yaml.safe_load((ROOT / cfg.feast["repo"] / "feature_store.yaml").read_text())
    data = cfg.data_dir
    data.mkdir(parents=True, exist_ok=True)
    raw["registry"] = str(data / "registry.db")
    if cfg.feast["online_store"] == "redis":
        raw["online_store"] = {"type": "redis", "connection_string": cfg.feast["redis_connection"]}
    else:
        raw["online_store"] = {"type": "sqlite", "path": str(data / "online_store.db")}
    return RepoConfig(repo_path=ROOT / cfg.feast["repo"], **raw)


def open_store(cfg: Config, apply: bool = True):
    """The run's FeatureStore; with ``apply`` the definitions are registered (idempotent)."""
    import warnings

    from feast import FeatureStore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        store = FeatureStore(config=repo_config(cfg))
        if apply:
            store.apply(definitions(cfg).OBJECTS)
    return store


def _entity_keys(view, df: pd.DataFrame):
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    cols = [e.name for e in view.entity_columns]
    cols_values = [df[c].tolist() for c in cols]
    return [EntityKey(join_keys=cols, entity_values=[Value(string_val=v) for v in vals])
            for vals in zip(*cols_values)]


def _not_newer(stored_ts, t) -> bool:
    """True when the stored row (if any) is not newer than event time ``t``."""
    if stored_ts is None:
        return True
    stored_ts = pd.Timestamp(stored_ts)
    if stored_ts.tzinfo is None:
        stored_ts = stored_ts.tz_localize("UTC")
    return stored_ts <= t


def write_online(store, key_type: str, df: pd.DataFrame) -> int:
    """Write rows no older than what the online store holds; returns rows written."""
    if df is None or df.empty:
        return 0
    view = store.get_feature_view(view_name(key_type))
    provider = store._get_provider()
    stored = provider.online_read(config=store.config, table=view,
                                  entity_keys=_entity_keys(view, df))
    keep = [_not_newer(ts, t) for (ts, _), t in zip(stored, df["event_timestamp"])]
    df = df[keep]
    if not df.empty:
        store.write_to_online_store(view_name(key_type), df, transform_on_write=False)
    return len(df)


def write_offline(cfg: Config, key_type: str, seq: int, df: pd.DataFrame) -> Path | None:
    if df is None or df.empty:
        return None
    folder = cfg.data_dir / "offline" / view_name(key_type)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"slice-{seq:08d}.parquet"
    tmp = path.with_suffix(".tmp")
    df.to_parquet(tmp, index=False)
    tmp.rename(path)
    return path
