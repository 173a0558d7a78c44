"""Data quality (issue 14, part 2): the Great Expectations suites of schemas/expectations/ pass on
valid tables, and each deliberately corrupted table fails the expectation it targets, and only
that one; results land in Iceberg (dq_results_v1) and the Data Docs; a mean far from the previous
run's fails the distribution check. No JVM: the frames are written here, the catalog is SQLite."""

import numpy as np
import pandas as pd
import pytest

from test_job import cfg_for

W = 7 * 86_400_000


def outcomes(n=400, seed=0):
    rng = np.random.default_rng(seed)
    final = rng.random(n) < 0.5
    conv = rng.random(n) < 0.05
    return pd.DataFrame({
        "decision_id": [f"d_{i:016x}" for i in range(n)],
        "user_id": [f"u_{i % 37:016x}" if i % 10 else "" for i in range(n)],   # no consent: empty
        "arm": np.where(rng.random(n) < 0.9, "treatment", "control"),
        "propensity": rng.uniform(0.05, 1.0, n),
        "label_status": np.where(final, "final", "interim"),
        "elapsed_ms": np.where(final, W + rng.integers(0, W, n), rng.integers(0, W, n)),
        "conversion_label": np.where(conv, 1.0, np.where(final, 0.0, rng.uniform(0, 0.05, n))),
        "conversions": conv.astype(int), "clicks": (rng.random(n) < 0.15).astype(int)})


CORRUPTIONS = {   # case: (how, the expectation and column that must fail)
    "duplicate_id": (lambda d: d.assign(decision_id=d.decision_id.where(d.index != 5, d.decision_id[4])),
                     ("expect_column_values_to_be_unique", "decision_id")),
    "label_above_one": (lambda d: d.assign(conversion_label=d.conversion_label.where(   # an interim row
        d.index != d[d.label_status == "interim"].index[0], 1.5)),
        ("expect_column_values_to_be_between", "conversion_label")),
    "final_before_window": (lambda d: d.assign(elapsed_ms=d.elapsed_ms.where(
        ~((d.label_status == "final") & (d.index == d[d.label_status == "final"].index[0])), W - 1)),
        ("expect_column_values_to_be_between", "elapsed_ms")),
    "soft_final_label": (lambda d: d.assign(conversion_label=d.conversion_label.where(
        ~((d.label_status == "final") & (d.index == d[d.label_status == "final"].index[0])), 0.4)),
        ("expect_column_values_to_be_in_set", "conversion_label")),
    "zero_propensity": (lambda d: d.assign(propensity=d.propensity.where(d.index != 7, 0.0)),
                        ("expect_column_values_to_be_between", "propensity")),
    "unknown_arm": (lambda d: d.assign(arm=d.arm.where(d.index != 9, "maybe")),
                    ("expect_column_values_to_be_in_set", "arm")),
    "raw_identifier": (lambda d: d.assign(user_id=d.user_id.where(d.index != 11, "alice@example.com")),
                       ("expect_column_values_to_match_regex", "user_id")),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from jobs.dq import load_suites, validate

    cfg = cfg_for(tmp_path_factory.mktemp("dq"))
    suite = load_suites()["outcomes_v1"]
    data = {"outcomes_v1:valid": (suite, outcomes(), ())}
    for case, (how, _) in CORRUPTIONS.items():
        data[f"outcomes_v1:{case}"] = (suite, how(outcomes()), ())
    return cfg, validate(cfg, data=data)


def test_valid_outcomes_pass_every_expectation(results):
    _, res = results
    r = res["suites"]["outcomes_v1:valid"]
    assert r["success"] and r["expectations"] >= 15, r


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_each_corrupted_table_fails_the_expectation_it_targets(results, case):
    _, res = results
    r = res["suites"][f"outcomes_v1:{case}"]
    assert [(f["expectation"], f["column"]) for f in r["failed"]] == [CORRUPTIONS[case][1]], r["failed"]
    assert r["failed"][0]["unexpected_count"] in (1, 2)      # (a duplicated id: both of its rows)


def test_results_are_in_iceberg_and_the_data_docs(results):
    from tools.analyst import read_table

    cfg, res = results
    assert not res["success"] and res["failed"] == len(CORRUPTIONS)
    rows = read_table(cfg, "dq_result")
    assert set(rows.run_id) == {res["run_id"]} and rows.result_key.is_unique
    assert (~rows.success).sum() == len(CORRUPTIONS)
    docs = res["docs"].removeprefix("file://")
    assert docs.endswith("index.html") and "outcomes_v1__duplicate_id" in open(docs).read()


def test_the_mean_label_is_checked_against_the_previous_run(tmp_path):
    from jobs.dq import load_suites, validate

    cfg = cfg_for(tmp_path)
    suite = load_suites()["outcomes_v1"]
    first = validate(cfg, docs=False, data={"outcomes_v1": (suite, outcomes(), ())})
    assert first["success"]                                   # the first run observes the mean
    same = validate(cfg, docs=False, data={"outcomes_v1": (suite, outcomes(seed=1), ())})
    assert same["success"], same
    d = outcomes(seed=2)
    d.loc[d.index % 3 == 0, "conversions"] = 1                # a third of decisions converted
    d.loc[d.index % 3 == 0, "conversion_label"] = 1.0
    jump = validate(cfg, docs=False, data={"outcomes_v1": (suite, d, ())})
    assert [(f["expectation"], f["column"]) for f in jump["suites"]["outcomes_v1"]["failed"]] == \
        [("expect_column_mean_to_be_between", "conversion_label")]


def test_the_cli_exits_non_zero_on_a_broken_expectation_and_keeps_the_data(tmp_path, capsys):
    """The CLI over a run's tables: a clean run passes (exit 0); the outcome table corrupted in
    place (a label of 1.5, through pyiceberg) fails with exit 1, and its rows are still there."""
    import pyarrow as pa

    from tools.analyst import read_table
    from jobs.dq import main
    from stores.iceberg_store import open_tables
    from schemas import table_contract

    cfg = cfg_for(tmp_path)
    schema = table_contract("outcome").arrow_schema()
    d = outcomes(50)
    full = {f.name: d[f.name] if f.name in d else None for f in schema}
    n = len(d)
    defaults = {"string": "", "int64": 0, "double": 0.0, "bool": False}
    for f in schema:
        if full[f.name] is None:
            t = str(f.type)
            full[f.name] = [pd.Timestamp("2026-01-01", tz="UTC")] * n if t.startswith("timestamp") else \
                [defaults.get(t, None)] * n
    full["converted"] = d.conversions > 0
    full["feature_schema_version"] = [1] * n
    table = open_tables(cfg)["outcome"]
    table.append(pa.Table.from_pydict({k: list(v) for k, v in full.items()}, schema=schema))
    assert main(["--data-dir", str(cfg.data_dir), "--no-docs"]) == 0
    bad = read_table(cfg, "outcome")
    bad.loc[0, "conversion_label"] = 1.5
    table.overwrite(pa.Table.from_pandas(bad, schema=schema, preserve_index=False))
    capsys.readouterr()
    assert main(["--data-dir", str(cfg.data_dir), "--no-docs"]) == 1
    out = capsys.readouterr().out
    assert "FAIL outcomes_v1" in out and "conversion_label" in out
    assert len(read_table(cfg, "outcome")) == n
