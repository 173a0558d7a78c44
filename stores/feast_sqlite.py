"""A Feast SQLite online store that never replaces a row with an older one.

Feast's own SQLite store overwrites whatever the event time (DESIGN.md); Redis
skips a row whose timestamp is not newer. This store puts that rule into the
upsert itself (``... DO UPDATE ... WHERE excluded.event_ts >= event_ts``), so
no read is needed before a write, and writes a batch with one ``executemany``
instead of a statement per value. Same table layout as Feast's store, so
Feast reads it unchanged. Selected in feature_store.yaml with
``type: stores.feast_sqlite.GuardedSqliteOnlineStore``.

Several writers (the features job's feast-online subtasks, each its own process) share the
database file. SQLite allows one writer at a time, so each connection runs in WAL mode (readers
never block the writer) with a busy timeout of :data:`BUSY_TIMEOUT_MS`: a writer waits for the
lock instead of failing at once with ``database is locked``, and writes a batch in transactions
of at most :data:`ROWS_PER_TRANSACTION` rows, so no writer holds the lock for long.
"""

from __future__ import annotations

from typing import Literal

from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.sqlite import (SqliteOnlineStore, SqliteOnlineStoreConfig,
                                              _quote_id, _table_id)
from feast.utils import to_naive_utc

__all__ = ["GuardedSqliteOnlineStore", "GuardedSqliteOnlineStoreConfig", "BUSY_TIMEOUT_MS",
           "ROWS_PER_TRANSACTION"]

#: how long a writer waits for another writer's lock before the write fails
BUSY_TIMEOUT_MS = 120_000
#: rows (feature values) per transaction: bounds how long one writer holds the lock
ROWS_PER_TRANSACTION = 50_000


class GuardedSqliteOnlineStoreConfig(SqliteOnlineStoreConfig):
    type: Literal["stores.feast_sqlite.GuardedSqliteOnlineStore"] = \
        "stores.feast_sqlite.GuardedSqliteOnlineStore"


class GuardedSqliteOnlineStore(SqliteOnlineStore):
    def _get_conn(self, config):
        """Feast's connection (made once per store), set up for several writers when it is made:
        every use of it, reads and the privacy tool's deletes too, waits for the lock."""
        fresh = not self._conn
        conn = super()._get_conn(config)
        if fresh:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def online_write_batch(self, config, table, data, progress) -> None:
        conn = self._get_conn(config)
        name = _quote_id(_table_id(config.project, table,
                                   config.registry.enable_online_feature_view_versioning))
        sql = (f"INSERT INTO {name} (entity_key, feature_name, value, event_ts, created_ts) "
               f"VALUES (?, ?, ?, ?, ?) ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
               f"value = excluded.value, event_ts = excluded.event_ts, created_ts = excluded.created_ts "
               f"WHERE excluded.event_ts >= {name}.event_ts")
        version = config.entity_key_serialization_version
        rows = []
        for entity_key, values, ts, created in data:
            key = serialize_entity_key(entity_key, entity_key_serialization_version=version)
            ts = to_naive_utc(ts)
            created = to_naive_utc(created) if created is not None else None
            rows.extend((key, f, v.SerializeToString(), ts, created) for f, v in values.items())
        for i in range(0, len(rows), ROWS_PER_TRANSACTION):
            with conn:
                conn.executemany(sql, rows[i:i + ROWS_PER_TRANSACTION])
        if progress:
            progress(len(data))
