"""Comparing two runs' outputs file for file (the parallelism tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

FEATURE_DIRS = ("enriched", "attributed", "offline/user_features_v1", "offline/user_campaign_features_v1",
                "offline/campaign_creative_features_v1")


def assert_same_feature_outputs(a: Path, b: Path, handoff_lines: bool = True) -> int:
    """Every output file of the features job in run ``a`` equals the one in run ``b``: enriched
    decisions, attributed outcomes and offline features (Parquet, exactly), quarantine (byte for
    byte) and the hand-off lines (but for the run folder they name; none when the runs handed
    off on Kafka: ``handoff_lines=False``). Returns the files compared."""
    n = 0
    for sub in FEATURE_DIRS:
        fa = sorted(p.name for p in (a / sub).glob("*.parquet"))
        fb = sorted(p.name for p in (b / sub).glob("*.parquet"))
        assert fa == fb, (sub, fa, fb)
        for f in fa:
            pd.testing.assert_frame_equal(pd.read_parquet(a / sub / f), pd.read_parquet(b / sub / f),
                                          check_exact=True, obj=f"{sub}/{f}")
            n += 1
    qa = sorted(p.name for p in (a / "quarantine").glob("*.jsonl"))
    assert qa == sorted(p.name for p in (b / "quarantine").glob("*.jsonl"))
    for f in qa:
        assert (a / "quarantine" / f).read_bytes() == (b / "quarantine" / f).read_bytes(), f
        n += 1
    if not handoff_lines:
        return n
    ha = sorted(p.name for p in (a / "handoff").glob("*.json"))
    assert ha and ha == sorted(p.name for p in (b / "handoff").glob("*.json"))
    for f in ha:
        x, y = json.loads((a / "handoff" / f).read_text()), json.loads((b / "handoff" / f).read_text())
        assert Path(x.pop("root")) == a.resolve() and Path(y.pop("root")) == b.resolve()
        assert x == y, f
        n += 1
    return n


def online_values(cfg, spec, keys: dict) -> dict:
    """Online values and event timestamps of ``keys`` ({key type: [entity row dicts]}) read back
    through Feast."""
    from stores.feast_store import open_store

    store = open_store(cfg, apply=False)
    out = {}
    for kt, rows in keys.items():
        feats = [f"{spec.view_name(kt)}:{f}" for f in spec.feature_names()]
        out[kt] = store.get_online_features(features=feats, entity_rows=rows).to_df(include_event_timestamps=True)
    return out


def all_keys(data: Path, spec) -> dict:
    """Every key in the offline store of a run, as entity rows."""
    out = {}
    for kt in spec.key_type_names:
        files = sorted((data / "offline" / spec.view_name(kt)).glob("*.parquet"))
        df = pd.concat([pd.read_parquet(f) for f in files])[list(spec.entities(kt))].drop_duplicates()
        out[kt] = df.sort_values(list(spec.entities(kt))).to_dict("records")
    return out
