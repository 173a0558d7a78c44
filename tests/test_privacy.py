"""The right to be forgotten (issue 13): the forget list as the jobs apply it (no JVM), and
``tools.privacy forget`` on a real run of the features and outcomes jobs, checked through every
documented read path: Feast online and offline, the enriched files, pyiceberg, DuckDB over every
Parquet file of the warehouse, and the bytes of every file the run wrote."""

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from udfs.features import split_slice
from udfs.privacy import ForgetList, blank_forgotten_arrow


def test_forget_list_blanks_listed_users_and_holds_no_raw_id(tmp_path):
    fl = ForgetList(tmp_path / "forgotten.txt", "key")
    dec = pd.DataFrame({"decision_id": ["d1", "d2", "d3"], "event_time": [1, 2, 3],
                        "user_id": ["u_a", "u_b", ""], "consent": [True, True, True]})
    part = split_slice(0, {"decision": dec}, forget=fl)[0]
    assert part.batches["decision"].user_id.tolist() == ["u_a", "u_b", ""]     # empty list: as is
    assert fl.add(["u_b"]) == 1 and fl.add(["u_b"]) == 0
    assert "u_b" not in (tmp_path / "forgotten.txt").read_text()
    part = split_slice(0, {"decision": dec}, forget=fl)[0]
    assert part.batches["decision"].user_id.tolist() == ["u_a", "", ""]
    # a second process (another job) sees the list as soon as it is written
    other = ForgetList(tmp_path / "forgotten.txt", "key")
    rows = pa.table({"decision_id": ["d1", "d2"], "user_id": ["u_a", "u_b"]})
    assert blank_forgotten_arrow(rows, other).column("user_id").to_pylist() == ["u_a", ""]
    fl.add(["u_a"])
    assert blank_forgotten_arrow(rows, other).column("user_id").to_pylist() == ["", ""]
    # a different key: another list (the hashes are keyed)
    assert not ForgetList(tmp_path / "forgotten.txt", "other").mask(["u_a"]).any()


def _files_holding(root: Path, needle: bytes, skip=("checkpoints",)) -> list[str]:
    out = []
    for f in root.rglob("*"):
        if f.is_file() and not any(part.startswith(skip) for part in f.relative_to(root).parts):
            if needle in f.read_bytes():
                out.append(str(f.relative_to(root)))
    return out


@pytest.mark.slow
def test_forget_removes_the_user_from_every_read_path(tmp_path):
    import duckdb
    import pyarrow.parquet as pq

    from tools.analyst import read_table
    from stores.feast_store import open_store, view_name
    from jobs.features import run as run_features
    from stores.iceberg_store import last_epoch, open_tables
    from jobs.outcomes import run as run_outcomes
    from tools.privacy import main as privacy_main
    from tools.simulate import simulate
    from test_job import cfg_for

    sim = tmp_path / "sim"
    simulate(sim, events=12_000, users=300, campaigns=3, days=8.0, slice_lines=2_000, seed=21)
    cfg = cfg_for(tmp_path / "run")
    run_features(cfg, sim)
    run_outcomes(cfg)
    data = cfg.data_dir
    enriched = pd.concat([pd.read_parquet(f) for f in sorted((data / "enriched").glob("*.parquet"))])
    who = enriched[enriched.user_id != ""].user_id.value_counts()
    user, other = who.index[0], who.index[1]
    # a quarantined record of the user (a redelivered decision: stored whole, id included)
    assert _files_holding(data, user.encode()), "the user must be stored before forget"
    out_before = read_table(cfg, "outcome")
    assert (out_before.user_id == user).sum() == who[user]
    epochs = {n: last_epoch(t) for n, t in open_tables(cfg).items()}
    store = open_store(cfg, apply=False)

    def online(u):
        feats = [f"{view_name('user')}:impressions_1d"]
        return store.get_online_features(features=feats, entity_rows=[{"user_id": u}]).to_dict()

    assert online(user)["impressions_1d"][0] is not None

    ids = tmp_path / "ids.txt"
    ids.write_text(f"{user}\n")
    assert privacy_main(["forget", "--users-file", str(ids), "--data-dir", str(data)]) == 0

    # Feast: online and offline
    assert online(user)["impressions_1d"] == [None]
    assert online(other)["impressions_1d"][0] is not None                     # others untouched
    for kt in ("user", "user_campaign"):
        off = pd.concat([pd.read_parquet(f) for f in (data / "offline" / view_name(kt)).glob("*.parquet")])
        assert not (off.user_id == user).any() and (off.user_id == other).any()
    # the enriched files: the decisions stay, without the user id
    after = pd.concat([pd.read_parquet(f) for f in sorted((data / "enriched").glob("*.parquet"))])
    assert len(after) == len(enriched) and not (after.user_id == user).any()
    assert (after.user_id == "").sum() == (enriched.user_id == "").sum() + who[user]
    # Iceberg through pyiceberg: same rows, the user's without id; one snapshot left; epochs kept
    out = read_table(cfg, "outcome")
    assert len(out) == len(out_before) and not (out.user_id == user).any()
    assert (out.user_id == other).sum() == who[other]
    tables = open_tables(cfg)
    assert {n: last_epoch(t) for n, t in tables.items()} == epochs
    assert len(tables["outcome"].metadata.snapshots) == 1
    # DuckDB over every Parquet file under the warehouse (current or not): nothing of the user
    files = [str(f) for f in (data / "iceberg").rglob("*.parquet")]
    con = duckdb.connect()
    hits = con.sql(f"SELECT count(*) FROM read_parquet({files!r}, union_by_name=true) "
                   f"WHERE user_id = '{user}'").fetchall()[0][0]
    assert hits == 0
    q = read_table(cfg, "quarantine")
    assert not q.record.str.contains(user).any()
    # and no file the run wrote holds the id (the jobs' checkpoints are not rewritten: README)
    assert _files_holding(data, user.encode()) == []
    audit = json.loads(next((data / "privacy" / "audit").glob("forget-*.json")).read_text())
    assert user not in json.dumps(audit) and audit["removed"]["feast_online"]["keys"] > 0
    assert audit["removed"]["iceberg"]["outcomes_v1"]["rows"] == who[user]
    # the outcomes job run again: nothing to redo (its epochs are intact), the user stays gone
    run_outcomes(cfg)
    assert not (read_table(cfg, "outcome").user_id == user).any()
    # forget is idempotent
    assert privacy_main(["forget", "--user", user, "--data-dir", str(data)]) == 0
    assert pq.read_table(next((data / "enriched").glob("*.parquet"))).num_rows > 0
