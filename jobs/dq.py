"""Data quality with Great Expectations: the suites in ``schemas/expectations/`` run on a run's
tables, results stored in Iceberg (``dq_results_v1``) and in Great Expectations' Data Docs.

    python -m jobs.dq --data-dir data/demo/run          # exit 1 when an expectation broke

Suites (one JSON file each, versioned next to the contracts; schemas/expectations/README.md):
``outcomes_v1``, ``delay_models_v1``, ``enriched_decisions`` and ``offline_features`` (one per
Feast offline view). Each suite's expectations are those its contracts imply (required, enums,
bounds, patterns) plus the file's own (uniqueness, label rules, the mean label against the
previous run's). The outcomes job runs :func:`validate` as its last step.

A broken expectation never touches the data: it is reported (non-zero exit, ``failed`` in the
result, a row per expectation in ``dq_results_v1``, Data Docs under ``<data>/gx/``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import uuid
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402

from jobs.config import ROOT, Config, load_for_cli  # noqa: E402

__all__ = ["SUITES_DIR", "load_suites", "suite_expectations", "frames", "epoch_frames", "validate",
           "validate_epoch", "main"]

#: the suites that run after each outcomes epoch, on the rows that epoch committed
EPOCH_SUITES = ("outcomes_v1", "delay_models_v1")

SUITES_DIR = ROOT / "schemas" / "expectations"


def load_suites() -> dict:
    return {f.stem: json.loads(f.read_text()) for f in sorted(SUITES_DIR.glob("*.json"))}


def _contract(name: str):
    from schemas import CONTRACTS, TABLES, table_contract

    return CONTRACTS[name] if name in CONTRACTS else table_contract(name) if name in TABLES else None


def _contract_expectations(suite: dict, columns) -> list[tuple[str, dict]]:
    """What the suite's contracts say about the columns present (per column and kind of rule, the
    first contract that states one wins: a table's contract may repeat a stream's field unbounded)."""
    import re

    out, seen = [], set()
    empty = set(suite.get("allow_empty", ()))

    def add(col, kind, exp):
        if (col, kind) not in seen:
            seen.add((col, kind))
            out.append(exp)

    for cname in suite.get("contracts", ()):
        c = _contract(cname)
        for f in c.fields if c else ():
            col = f.name
            if col not in columns:
                continue
            if f.required:
                add(col, "null", ("expect_column_values_to_not_be_null", {"column": col}))
            if f.enum:
                add(col, "set", ("expect_column_values_to_be_in_set", {"column": col, "value_set": list(f.enum)}))
            lo = f.exclusive_minimum if f.exclusive_minimum is not None else f.minimum
            if lo is not None or f.maximum is not None:
                kw = {"column": col, "min_value": lo, "max_value": f.maximum}
                if f.exclusive_minimum is not None:
                    kw["strict_min"] = True
                add(col, "range", ("expect_column_values_to_be_between", kw))
            if f.pattern:
                body = f.pattern.removeprefix("^").removesuffix("$")
                regex = f"^(?:{body})?$" if col in empty else f"^(?:{body})$"
                re.compile(regex)
                add(col, "regex", ("expect_column_values_to_match_regex", {"column": col, "regex": regex}))
    return out


def _fill(v, params: dict):
    if isinstance(v, str) and v.startswith("{") and v.endswith("}") and v[1:-1] in params:
        return params[v[1:-1]]
    return v


DRIFT_Z = 4.0     # a mean compared with the previous run's may also move by this many standard errors


def _rows_under(frame, kw: dict) -> int:
    """The rows of ``frame`` an expectation sees (its pandas ``row_condition``, if any)."""
    cond = kw.get("row_condition")
    if not cond:
        return len(frame)
    return int(len(frame.query(cond, engine="python")))


def suite_expectations(suite: dict, columns, params: dict, previous: dict | None = None,
                       features=(), frame=None) -> list[tuple[str, dict]]:
    """The (expectation type, kwargs) list of ``suite`` for a frame with ``columns``: the contracts'
    expectations, ``per_feature`` ones for each of ``features``, then the suite's own
    (``{name}`` values filled from ``params``; a ``relative_to_previous: r`` mean bounded by the
    ``previous`` run's observed mean m, {(type, column): value}: within ``max(r·m, DRIFT_Z·√(m/n))``
    of it for the ``n`` rows of ``frame`` it sees (a rate's sampling error: few rows may move
    further by chance), observed only without a previous value, left out when no row is seen)."""
    out = _contract_expectations(suite, set(columns))
    for col in features:
        for e in suite.get("per_feature", ()):
            out.append((e["type"], {"column": col, **e["kwargs"]}))
    for e in suite.get("expectations", ()):
        kw = {k: _fill(v, params) for k, v in e["kwargs"].items()}
        if "column" in kw and kw["column"] not in columns:
            continue
        r = e.get("relative_to_previous")
        if r is not None:
            n = None if frame is None else _rows_under(frame, kw)
            if n == 0:                                # nothing to compare like with like
                continue
            prev = (previous or {}).get((e["type"], kw.get("column")))
            if prev is None:                          # the first run: observe only
                kw.update(min_value=None, max_value=float("inf"))
            else:
                half = r * abs(prev)
                if n:
                    half = max(half, DRIFT_Z * (max(prev, 0.0) / n) ** 0.5)
                kw.update(min_value=prev - half, max_value=prev + half)
        out.append((e["type"], kw))
    return out


def frames(cfg: Config) -> dict:
    """{suite name: (suite, frame, feature columns)} for the run at ``cfg.data_dir``; a data set
    the run has not written is left out."""
    from jobs.sinks import read_enriched
    from stores.feast_store import offline_root
    from stores.iceberg_store import read_table
    from udfs.spec import FeatureSpec

    out = {}
    for name, suite in load_suites().items():
        data = suite["data"]
        if data.startswith("table:"):
            df = read_table(cfg, data.split(":", 1)[1])
            if len(df):
                out[name] = (suite, df, ())
        elif data == "enriched":
            df = read_enriched(cfg)
            if df is not None and len(df):
                out[name] = (suite, df, ())
        elif data == "offline":
            spec = FeatureSpec.from_config(cfg)
            for kt in spec.key_type_names:
                # a local offline root only (an s3:// one: the suite is left out)
                files = sorted((Path(offline_root(cfg)) / spec.view_name(kt)).glob("*.parquet"))
                if files:
                    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
                    out[f"{name}:{spec.view_name(kt)}"] = (suite, df, tuple(spec.feature_names()))
    return out


def epoch_frames(cfg: Config, epoch: int) -> dict:
    """{"<suite>@epoch": (suite, frame, ())}: the rows of outcomes_v1 and delay_models_v1 stamped
    with ``epoch`` (the open day partitions the epoch rewrote, the delay fits it added)."""
    from pyiceberg.expressions import EqualTo

    from stores.iceberg_store import open_tables

    suites, tables = load_suites(), open_tables(cfg)
    out = {}
    for name in EPOCH_SUITES:
        suite = suites[name]
        table = tables[suite["data"].split(":", 1)[1]]
        table.refresh()
        df = table.scan(row_filter=EqualTo("epoch", int(epoch))).to_pandas()
        if len(df):
            out[f"{name}@epoch"] = (suite, df, ())
    return out


def validate_epoch(cfg: Config, epoch: int) -> dict:
    """The epoch suites on one committed epoch's rows (results in ``dq_results_v1`` under
    ``<suite>@epoch``; the rates compared with the previous epoch's). Data Docs are left to the
    run's last validation."""
    data = epoch_frames(cfg, epoch)
    if not data:
        return {"success": True, "run_id": None, "failed": 0, "suites": {}, "docs": None}
    return validate(cfg, docs=False, data=data)


def _previous(cfg: Config) -> dict:
    """The newest observed value of each expectation, {(suite, type, column): value}."""
    from stores.iceberg_store import read_table

    try:
        r = read_table(cfg, "dq_result")
    except Exception:                                 # noqa: BLE001 - no table yet
        return {}
    r = r[r.observed_value.notna()]
    if r.empty:
        return {}
    # per expectation, its newest observed value (a run that did not see it leaves the one before)
    last = r.sort_values("run_time").groupby(["suite", "expectation", "column"], sort=False).tail(1)
    return {(s, e, c): float(v) for s, e, c, v in zip(last.suite, last.expectation, last.column, last.observed_value)}


def _context(cfg: Config):
    import great_expectations as gx

    ctx = gx.get_context(mode="file", project_root_dir=str(cfg.data_dir))     # -> <data>/gx/
    try:
        ctx.variables.progress_bars = {"globally": False}
        ctx.variables.save()
    except Exception:                                 # noqa: BLE001 - older layouts: bars stay
        pass
    return ctx


def _replace(collection, name, obj):
    try:
        collection.delete(name)
    except Exception:                                 # noqa: BLE001 - not there yet
        pass
    return collection.add(obj)


def validate(cfg: Config, docs: bool = True, store: bool = True, data: dict | None = None) -> dict:
    """Run every suite on the run's data (or on ``data``: {suite name: (suite, frame, features)});
    store one row per expectation in ``dq_results_v1`` and update the Data Docs. Returns
    {"success", "run_id", "suites": {name: {"success", "failed": [...]}}, "failed": n, "docs"}."""
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import great_expectations as gx
        from great_expectations.expectations.registry import get_expectation_impl

        data = frames(cfg) if data is None else data
        ctx = _context(cfg)
        try:
            ds = ctx.data_sources.get("streamlift")
        except Exception:                             # noqa: BLE001
            ds = ctx.data_sources.add_pandas("streamlift")
        params = {"conversion_window_ms": int(pd.Timedelta(cfg.features["conversion_window"]).total_seconds() * 1000)}
        prev = _previous(cfg) if store else {}
        run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        now = pd.Timestamp.now(tz="UTC")
        rows, report, defs = [], {}, []
        for name, (suite, df, features) in data.items():
            safe = name.replace(":", "__")
            previous = {(e, c): v for (s, e, c), v in prev.items() if s == name}
            exps = suite_expectations(suite, df.columns, params, previous, features, frame=df)
            gsuite = _replace(ctx.suites, safe, gx.ExpectationSuite(
                name=safe, expectations=[get_expectation_impl(t)(**kw) for t, kw in exps]))
            try:
                asset = ds.get_asset(safe)
            except Exception:                         # noqa: BLE001
                asset = ds.add_dataframe_asset(safe)
            try:
                bd = asset.get_batch_definition("whole")
            except Exception:                         # noqa: BLE001
                bd = asset.add_batch_definition_whole_dataframe("whole")
            vd = _replace(ctx.validation_definitions, safe, gx.ValidationDefinition(name=safe, data=bd, suite=gsuite))
            defs.append((name, safe, vd, df))
        actions = [gx.checkpoint.UpdateDataDocsAction(name="docs")] if docs else []
        for name, safe, vd, df in defs:
            cp = _replace(ctx.checkpoints, safe, gx.Checkpoint(name=safe, validation_definitions=[vd], actions=actions))
            res = cp.run(batch_parameters={"dataframe": df})
            failed = []
            for vr in res.run_results.values():
                for i, r in enumerate(vr.results):
                    conf = r.expectation_config
                    col = conf.kwargs.get("column") or ""
                    kw = {k: v for k, v in conf.kwargs.items() if k not in ("batch_id",)}
                    obs = r.result.get("observed_value")
                    rows.append({"result_key": f"{run_id}|{name}|{i}", "run_id": run_id, "run_time": now,
                                 "suite": name, "expectation": conf.type, "column": col,
                                 "kwargs": json.dumps(kw, default=str, sort_keys=True), "success": bool(r.success),
                                 "element_count": r.result.get("element_count"),
                                 "unexpected_count": r.result.get("unexpected_count"),
                                 "observed_value": float(obs) if isinstance(obs, (int, float)) else None})
                    if not r.success:
                        failed.append({"expectation": conf.type, "column": col,
                                       "unexpected_count": r.result.get("unexpected_count"),
                                       "observed_value": obs})
            report[name] = {"success": not failed, "rows": len(df), "expectations": len(rows) - sum(
                v["expectations"] for v in report.values()), "failed": failed}
        site = ctx.get_docs_sites_urls()
    if store and rows:
        _store(cfg, rows)
    n_failed = sum(len(v["failed"]) for v in report.values())
    return {"success": n_failed == 0, "run_id": run_id, "failed": n_failed, "suites": report,
            "docs": site[0]["site_url"] if docs and site else None}


def _store(cfg: Config, rows: list) -> None:
    import pyarrow as pa

    from stores.iceberg_store import open_tables
    from schemas import table_contract

    schema = table_contract("dq_result").arrow_schema()
    table = pa.Table.from_pylist(rows, schema=schema)
    open_tables(cfg)["dq_result"].append(table)


def main(argv=None) -> int:
    from jobs.config import quiet_third_party_warnings

    quiet_third_party_warnings()
    ap = argparse.ArgumentParser(description=(
        "Run the Great Expectations suites (schemas/expectations/) on a run's tables; store the "
        "results in Iceberg (dq_results_v1) and Data Docs (<data>/gx/); exit 1 when one broke."))
    ap.add_argument("--data-dir", help="the run's data folder (default: paths.data_dir)")
    ap.add_argument("--no-docs", action="store_true", help="skip the Data Docs update")
    a = ap.parse_args(argv)
    cfg = load_for_cli(a.data_dir)
    res = validate(cfg, docs=not a.no_docs)
    for name, r in res["suites"].items():
        print(f"{'ok  ' if r['success'] else 'FAIL'} {name}: {r['expectations']} expectations on {r['rows']} rows")
        for f in r["failed"]:
            print(f"     broken: {f['expectation']} {f['column']} (unexpected {f['unexpected_count']}, "
                  f"observed {f['observed_value']})")
    print(f"data docs: {res['docs']}" if res["docs"] else "", f"results: dq_results_v1 run {res['run_id']}")
    return 0 if res["success"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
