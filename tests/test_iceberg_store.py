"""Idempotent, exactly-once Iceberg commits; tables read back by pyiceberg and by DuckDB."""

import duckdb
import pyarrow as pa
import pytest

from stores.iceberg_store import commit_epoch, ensure_table, last_epoch, open_catalog

SCHEMA = pa.schema([pa.field("decision_id", pa.string(), nullable=False),
                    pa.field("decision_time", pa.timestamp("us", tz="UTC"), nullable=False),
                    pa.field("label_status", pa.string()), pa.field("label", pa.float64())])


def batch(ids, status, label, day=1):
    return pa.table({"decision_id": ids,
                     "decision_time": pa.array([1_767_225_600_000_000 + day * 86_400_000_000] * len(ids),
                                               pa.timestamp("us", tz="UTC")),
                     "label_status": [status] * len(ids), "label": [label] * len(ids)}, schema=SCHEMA)


@pytest.fixture
def table(tmp_path):
    from jobs.config import load

    cfg = load(env={"STREAMLIFT_PATHS__DATA_DIR": str(tmp_path)})
    catalog = open_catalog(cfg)
    return ensure_table(catalog, cfg.iceberg["namespace"], "outcomes_test", SCHEMA, day_partition="decision_time")


def contents(table):
    table.refresh()
    return table.scan().to_arrow().sort_by("decision_id")


def duckdb_contents(table):
    """An independent reader: DuckDB over the table's current data files."""
    table.refresh()
    files = [t.file.file_path.removeprefix("file://") for t in table.scan().plan_files()]
    out = duckdb.sql(f"SELECT * FROM read_parquet({files!r}) ORDER BY decision_id").arrow()
    return out.read_all() if hasattr(out, "read_all") else out


def test_epochs_commit_once_and_replays_change_nothing(table):
    assert commit_epoch(table, batch(["d1", "d2"], "interim", 0.2), epoch=1, key="decision_id")
    assert commit_epoch(table, batch(["d3"], "interim", 0.1, day=2), epoch=2, key="decision_id")
    before, n_snap = contents(table), len(table.metadata.snapshots)
    # replay of both epochs (a restart from an older checkpoint): skipped
    assert not commit_epoch(table, batch(["d1", "d2"], "interim", 0.2), epoch=1, key="decision_id")
    assert not commit_epoch(table, batch(["d3"], "interim", 0.1, day=2), epoch=2, key="decision_id")
    assert contents(table).equals(before) and len(table.metadata.snapshots) == n_snap
    assert last_epoch(table) == 2


def test_rows_are_replaced_by_key(table):
    commit_epoch(table, batch(["d1", "d2"], "interim", 0.2), epoch=1, key="decision_id")
    commit_epoch(table, batch(["d2"], "final", 1.0), epoch=2, key="decision_id")   # d2 finalized
    got = contents(table).to_pylist()
    assert [r["decision_id"] for r in got] == ["d1", "d2"]
    assert got[1]["label_status"] == "final" and got[1]["label"] == 1.0
    assert duckdb_contents(table).select(["decision_id", "label_status", "label"]).to_pylist() == \
        contents(table).select(["decision_id", "label_status", "label"]).to_pylist()


def test_duplicate_keys_in_one_batch_are_an_error(table):
    with pytest.raises(ValueError, match="duplicate"):
        commit_epoch(table, batch(["d1", "d1"], "interim", 0.2), epoch=1, key="decision_id")
    assert last_epoch(table) is None
