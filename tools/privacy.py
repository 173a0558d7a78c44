"""The right to be forgotten: remove users from everything a run stores, with an audit record.

    python -m tools.privacy forget --user u_0123456789abcdef [--user ...] [--data-dir data/demo/run]
    python -m tools.privacy forget --users-file ids.txt           # the batch form: one id per line

What ``forget`` does, for each user, in this order (each step is idempotent: run it again
after a failure):

1. adds the user to the forget list (``<data>/privacy/forgotten.txt``, keyed hashes only;
   :mod:`udfs.privacy`): from then on the running jobs treat the user as without consent, so
   nothing removed below is written again;
2. Feast online store (SQLite or Redis): deletes every entity key that holds the user
   (``user`` and ``user×campaign`` features);
3. Feast offline files (``<data>/offline/<user views>/``): rewrites each file that holds the
   user without those rows;
4. enriched decisions (``<data>/enriched/``, which the hand-off points to): the user's
   decisions keep their row with an empty ``user_id``, as a decision without consent;
5. quarantine files (``<data>/quarantine/``, ``<data>/source-faults/``): the user's id, and
   its keyed hash, in a quarantined record become ``forgotten`` (a record rejected by the
   contract holds the keyed hash; one that failed to parse, or a valid decision quarantined
   later as a duplicate or late, holds the id itself);
6. Iceberg: in every table of the namespace with a ``user_id`` column (``outcomes_v1``) the
   user's rows get an empty ``user_id``, and in ``quarantine_v1`` the records are rewritten as
   in 5, each in one commit stamped with the table's last epoch (so the jobs' exactly-once
   bookkeeping is unchanged); then every older snapshot of the changed tables is expired and
   the data files only they referenced are deleted (pyiceberg 0.8.1 has no snapshot expiry:
   :func:`expire_snapshots` applies Iceberg's ``remove-snapshots`` metadata update itself);
7. writes an audit record ``<data>/privacy/audit/forget-<time>.json``: the keyed hashes (never
   the ids), and per place the rows, keys or files changed.

What it does not touch: the input slices (upstream's files), the simulator's truth, and the
jobs' checkpoints. The features job's checkpointed state keeps the user's decayed counters
(keyed by a hash of the id) until the job is restarted without that state; they are never
emitted again, because the reader drops the user's id from every later decision. Model
snapshots and scores hold no user ids (the models see aggregates; scores are by decision id).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from jobs.config import Config, load_for_cli  # noqa: E402

__all__ = ["forget", "expire_snapshots", "main"]

FORGOTTEN = "forgotten"       # what a forgotten user's keyed hash becomes in quarantine records


# ----------------------------------------------------------------------------- files
def _atomic_parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(path.name + ".forget-tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def _rewrite_parquet(files, users: set, drop: bool) -> dict:
    """Rows of ``users`` dropped (``drop``) or their ``user_id`` blanked, file by file."""
    rows = changed = 0
    arr = pa.array(sorted(users))
    for f in files:
        t = pq.read_table(f)
        if "user_id" not in t.column_names:
            continue
        m = pc.is_in(t.column("user_id"), value_set=arr)
        n = pc.sum(m).as_py() or 0
        if not n:
            continue
        if drop:
            t = t.filter(pc.invert(m))
        else:
            i = t.column_names.index("user_id")
            t = t.set_column(i, t.schema.field(i), pc.if_else(m, pa.scalar("", t.schema.field(i).type),
                                                              t.column(i)))
        _atomic_parquet(Path(f), t)
        rows += n
        changed += 1
    return {"rows": rows, "files": changed}


def _rewrite_quarantine(folder: Path, tokens: set) -> dict:
    """Every occurrence of a needle (a user id, or its keyed hash) in the quarantined records
    of ``folder`` replaced by ``forgotten``."""
    rows = changed = 0
    files = sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.json")) if folder.exists() else []
    for f in files:
        text = f.read_text()
        hits = sum(text.count(t) for t in tokens)
        if not hits:
            continue
        for t in tokens:
            text = text.replace(t, FORGOTTEN)
        tmp = f.with_name(f.name + ".forget-tmp")
        tmp.write_text(text)
        tmp.replace(f)
        rows += hits
        changed += 1
    return {"records": rows, "files": changed}


# ----------------------------------------------------------------------------- Feast
def _user_views(store) -> list:
    return [v for v in store.list_feature_views() if "user_id" in [e.name for e in v.entity_columns]]


def _holds(key: bytes, users_enc: list[bytes], version: int, users: set) -> bool:
    from feast.infra.key_encoding_utils import deserialize_entity_key

    if not any(u in key for u in users_enc):
        return False
    ek = deserialize_entity_key(key, version)
    vals = dict(zip(ek.join_keys, (v.string_val for v in ek.entity_values)))
    return vals.get("user_id") in users


def _forget_online(cfg: Config, users: set) -> dict:
    from stores.feast_store import open_store

    store = open_store(cfg, apply=False)
    conf = store.config
    version = conf.entity_key_serialization_version
    enc = [u.encode() for u in users]
    if getattr(conf.online_store, "type", None) == "redis":
        from stores.feast_redis import _client_for

        client = _client_for(conf.online_store)
        tail = conf.project.encode()
        gone = []
        for u in enc:
            for key in client.scan_iter(match=b"*" + u + b"*", count=1000):
                if key.endswith(tail) and _holds(key[:-len(tail)], enc, version, users):
                    gone.append(key)
        if gone:
            client.delete(*gone)
        return {"store": "redis", "keys": len(gone)}
    from feast.infra.online_stores.sqlite import _table_id

    conn = store._get_provider().online_store._get_conn(conf)
    conn.execute("PRAGMA secure_delete = ON")      # deleted rows are overwritten, not just unlinked
    keys = 0
    versioning = bool(getattr(conf.registry, "enable_online_feature_view_versioning", False))
    for view in _user_views(store):
        name = '"' + _table_id(conf.project, view, versioning).replace('"', '""') + '"'
        try:
            found = {k for u in enc for (k,) in conn.execute(
                f"SELECT DISTINCT entity_key FROM {name} WHERE instr(entity_key, ?) > 0", (u,))}
        except Exception as e:             # a view never written has no table yet
            if "no such table" in str(e):
                continue
            raise
        hit = [k for k in found if _holds(bytes(k), enc, version, users)]
        conn.executemany(f"DELETE FROM {name} WHERE entity_key = ?", [(k,) for k in hit])
        keys += len(hit)
    conn.commit()
    # the writers run the database in WAL mode: copy the WAL (with the overwritten pages) into the
    # database file and truncate it, so neither file keeps an old copy of the deleted rows
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    if busy:
        raise RuntimeError("the Feast SQLite online store is in use (a job still reading or writing it): "
                           "stop the features job and run forget again")
    return {"store": "sqlite", "keys": keys}


# ----------------------------------------------------------------------------- Iceberg
def _register_remove_snapshots() -> None:
    """pyiceberg 0.8.1 defines Iceberg's ``remove-snapshots`` table update but cannot apply
    it; this applies it as the specification says (the snapshots and their log entries leave
    the metadata; the current snapshot and referenced ones cannot be removed)."""
    from pyiceberg.table.update import RemoveSnapshotsUpdate, _apply_table_update

    if RemoveSnapshotsUpdate in _apply_table_update.registry:
        return

    @_apply_table_update.register(RemoveSnapshotsUpdate)
    def _(update, base_metadata, context):
        ids = set(update.snapshot_ids)
        held = {r.snapshot_id for r in base_metadata.refs.values()} | {base_metadata.current_snapshot_id}
        if ids & held:
            raise ValueError(f"cannot remove referenced snapshots {sorted(ids & held)}")
        context.add_update(update)
        return base_metadata.model_copy(update={
            "snapshots": [s for s in base_metadata.snapshots if s.snapshot_id not in ids],
            "snapshot_log": [e for e in base_metadata.snapshot_log if e.snapshot_id not in ids]})


def _data_files(table, snapshot) -> set:
    out = set()
    for m in snapshot.manifests(table.io):
        for e in m.fetch_manifest_entry(table.io, discard_deleted=True):
            out.add(e.data_file.file_path)
    return out


def expire_snapshots(table) -> dict:
    """Expire every snapshot of ``table`` but the current one, then delete the data files that
    only the expired snapshots referenced (as Iceberg's ``expireSnapshots`` with
    ``retainLast(1)``). Returns the counts."""
    from pyiceberg.table.update import AssertRefSnapshotId, RemoveSnapshotsUpdate

    _register_remove_snapshots()
    table.refresh()
    cur = table.current_snapshot()
    old = [s for s in table.metadata.snapshots if cur is None or s.snapshot_id != cur.snapshot_id]
    if not old:
        return {"snapshots": 0, "files": 0}
    keep = _data_files(table, cur) if cur is not None else set()
    before = set()
    for s in old:
        before |= _data_files(table, s)
    req = (AssertRefSnapshotId(snapshot_id=cur.snapshot_id if cur else None, ref="main"),)
    table.catalog.commit_table(table, requirements=req,
                               updates=(RemoveSnapshotsUpdate(snapshot_ids=[s.snapshot_id for s in old]),))
    files = sorted(before - keep)
    for f in files:
        try:
            table.io.delete(f)
        except FileNotFoundError:
            pass
    table.refresh()
    return {"snapshots": len(old), "files": len(files)}


def _forget_iceberg(cfg: Config, users: set, tokens: set) -> dict:
    import warnings

    from pyiceberg.expressions import In

    from stores.iceberg_store import EPOCH_PROPERTY, last_epoch, open_catalog

    catalog = open_catalog(cfg)
    ns = cfg.iceberg["namespace"]
    out = {}
    for ident in catalog.list_tables(ns):
        table = catalog.load_table(ident)
        names = [f.name for f in table.schema().fields]
        name = ident[-1]
        if "user_id" in names:
            flt = In("user_id", sorted(users))
            rows = table.scan(row_filter=flt).to_arrow()
        elif "record" in names:                      # quarantine: keyed hashes inside records
            rows = table.scan().to_arrow()
            rec = rows.column("record")
            m = pc.or_(*[pc.match_substring(rec, t) for t in tokens]) if len(tokens) > 1 else \
                pc.match_substring(rec, next(iter(tokens)))
            rows = rows.filter(m)
            flt = In("quarantine_id", rows.column("quarantine_id").to_pylist()) if "quarantine_id" in names else None
        else:
            continue
        n = rows.num_rows
        if n and flt is not None:
            if "user_id" in names:
                i = names.index("user_id")
                rows = rows.set_column(i, rows.schema.field(i), pa.array([""] * n, rows.schema.field(i).type))
            else:
                i = rows.column_names.index("record")
                col = rows.column(i).to_pylist()
                for t in tokens:
                    col = [c.replace(t, FORGOTTEN) if c is not None else c for c in col]
                rows = rows.set_column(i, rows.schema.field(i), pa.array(col, rows.schema.field(i).type))
            epoch = last_epoch(table)
            props = {} if epoch is None else {EPOCH_PROPERTY: str(epoch)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                table.overwrite(rows.cast(table.schema().as_arrow()), overwrite_filter=flt,
                                snapshot_properties=props)
        exp = expire_snapshots(table) if n else {"snapshots": 0, "files": 0}
        out[name] = {"rows": n, "expired_snapshots": exp["snapshots"], "deleted_files": exp["files"]}
    return out


# ----------------------------------------------------------------------------- forget
def forget(cfg: Config, users) -> dict:
    """Remove ``users`` (user ids) from everything the run at ``cfg.data_dir`` stores (see the
    module docstring); returns the audit record, also written to ``<data>/privacy/audit/``."""
    from jobs.sinks import atomic_write
    from stores.feast_store import offline_root, view_name
    from udfs.privacy import FORGET_FILE, ForgetList
    from udfs.spec import FeatureSpec

    users = {str(u) for u in users if str(u)}
    if not users:
        raise ValueError("no user ids given")
    data = cfg.data_dir
    fl = ForgetList(data / FORGET_FILE, str(cfg.privacy["quarantine_key"]))
    tokens = {fl.token(u) for u in users}
    added = fl.add(users)
    spec = FeatureSpec.from_config(cfg)
    removed = {"forget_list": {"added": added}}
    removed["feast_online"] = _forget_online(cfg, users)
    offline = []
    for kt in spec.key_type_names:
        folder = Path(offline_root(cfg)) / view_name(kt, spec)     # local offline files only
        offline += sorted(folder.glob("*.parquet")) if folder.exists() else []
    removed["feast_offline"] = _rewrite_parquet(offline, users, drop=True)
    removed["enriched"] = _rewrite_parquet(sorted((data / "enriched").glob("*.parquet")), users, drop=False)
    needles = tokens | users
    removed["quarantine_files"] = {
        d: _rewrite_quarantine(data / d, needles) for d in ("quarantine", "source-faults")}
    removed["iceberg"] = _forget_iceberg(cfg, users, needles)
    now = dt.datetime.now(dt.timezone.utc)
    audit = {"action": "forget", "time": now.isoformat(), "users": sorted(tokens),
             "data_dir": str(data), "removed": removed}
    atomic_write(data / "privacy" / "audit" / f"forget-{now.strftime('%Y%m%dT%H%M%S%fZ')}.json",
                 json.dumps(audit, indent=1).encode())
    return audit


def main(argv=None) -> int:
    from jobs.config import quiet_third_party_warnings

    quiet_third_party_warnings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("forget", help="remove users from Feast, the files and every Iceberg table")
    f.add_argument("--user", action="append", default=[], help="a user id (repeat for several)")
    f.add_argument("--users-file", help="a file of user ids, one per line (the batch form)")
    f.add_argument("--data-dir", help="the run's data folder (default: paths.data_dir)")
    a = ap.parse_args(argv)
    users = list(a.user)
    if a.users_file:
        users += [line.strip() for line in Path(a.users_file).read_text().splitlines() if line.strip()]
    if not users:
        ap.error("give --user or --users-file")
    cfg = load_for_cli(a.data_dir)
    t0 = time.perf_counter()
    audit = forget(cfg, users)
    print(json.dumps({**audit, "seconds": round(time.perf_counter() - t0, 2)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
