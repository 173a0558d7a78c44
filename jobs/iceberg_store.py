"""Iceberg tables with idempotent, exactly-once batch commits (pyiceberg 0.8.1).

PyFlink gives Python no checkpoint hooks (DESIGN.md), so a job makes its
Iceberg writes idempotent itself, as the Java Iceberg sink does with
``flink.max-committed-checkpoint-id``:

* each commit carries a deterministic *epoch* (a slice sequence number, a
  window end) in its snapshot summary, ``streamlift.epoch``;
* :func:`commit_epoch` skips an epoch at or below the last committed one, so a
  replay or a restart from a checkpoint never commits the same batch twice;
* rows are replaced by key (``overwrite`` with an ``In(key, ...)`` filter, one
  atomic commit), so a row updated later (interim -> final label) appears
  once per table state.

Keep one writer per table: a SQL catalog on SQLite serializes commits.

This is the writing core for the outcomes job of issue 3 (not built yet).
"""

from __future__ import annotations

import pyarrow as pa

from jobs.config import Config

__all__ = ["open_catalog", "ensure_table", "last_epoch", "commit_epoch", "EPOCH_PROPERTY"]

EPOCH_PROPERTY = "streamlift.epoch"


def open_catalog(cfg: Config):
    from pyiceberg.catalog import load_catalog

    data = cfg.data_dir
    props = {k: str(v).replace("{data_dir}", str(data)) for k, v in cfg.iceberg["catalog"].items()}
    if props.get("type") == "sql":
        (data / "iceberg" / "warehouse").mkdir(parents=True, exist_ok=True)
    catalog = load_catalog(cfg.iceberg["catalog_name"], **props)
    ns = cfg.iceberg["namespace"]
    if (ns,) not in catalog.list_namespaces():
        catalog.create_namespace(ns)
    return catalog


def ensure_table(catalog, namespace: str, name: str, schema: pa.Schema, day_partition: str | None = None):
    """The table, created on first use; partitioned by day of ``day_partition`` if given."""
    from pyiceberg.exceptions import NoSuchTableError

    ident = f"{namespace}.{name}"
    try:
        return catalog.load_table(ident)
    except NoSuchTableError:
        pass
    table = catalog.create_table(ident, schema=schema)
    if day_partition:
        from pyiceberg.transforms import DayTransform

        with table.update_spec() as spec:
            spec.add_field(day_partition, DayTransform(), f"{day_partition}_day")
    return table


def last_epoch(table) -> int | None:
    """Highest epoch committed to ``table`` (None before the first commit)."""
    table.refresh()
    epochs = [int(s.summary[EPOCH_PROPERTY]) for s in table.metadata.snapshots
              if s.summary is not None and EPOCH_PROPERTY in (s.summary.additional_properties or {})]
    return max(epochs) if epochs else None


def commit_epoch(table, rows: pa.Table, epoch: int, key: str) -> bool:
    """Replace the rows of ``rows[key]`` and add the rest, atomically, stamped with ``epoch``.

    Returns False (and writes nothing) when ``epoch`` was already committed.
    """
    from pyiceberg.expressions import In

    done = last_epoch(table)
    if done is not None and epoch <= done:
        return False
    keys = list(dict.fromkeys(rows.column(key).to_pylist()))
    if len(keys) != rows.num_rows:
        raise ValueError(f"epoch {epoch}: {rows.num_rows - len(keys)} duplicate values of {key!r} in one batch")
    props = {EPOCH_PROPERTY: str(epoch)}
    if keys:
        import warnings

        with warnings.catch_warnings():   # new keys: "Delete operation did not match any records"
            warnings.filterwarnings("ignore", message="Delete operation did not match")
            table.overwrite(rows, overwrite_filter=In(key, keys), snapshot_properties=props)
    else:
        table.append(rows, snapshot_properties=props)
    return True
