"""The feature spec and its consumers, without a JVM: names round-trip through ``parse``; the Feast
definitions, the learner's encoder and serving take their names from the spec handed to them."""

import pickle

import numpy as np
import pandas as pd
import pytest

from udfs.spec import FeatureSpec

SPECS = [FeatureSpec(), FeatureSpec(half_lives=("30m", "2d"), version="v2"), FeatureSpec(half_lives=("7d", "1h"))]


def cfg_for(data_dir, **env):
    from jobs.config import load

    return load(env={"STREAMLIFT_PATHS__DATA_DIR": str(data_dir), **env})


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(s.half_lives))
def test_names_round_trip_through_parse(spec):
    names = spec.feature_names()
    assert len(names) == len(set(names)) == len(spec.metrics) * len(spec.half_lives)
    for kt in spec.key_type_names:
        for f in names:
            _, m, h = spec.parse(f)
            assert spec.parse(f) == (None, m, h) and f"{m}_{h}" == f
            assert spec.parse(spec.column(kt, f)) == (kt, m, h)
            assert spec.half_life_ms(h) > 0 and h in spec.describe_feature(f)
    assert spec.columns() == tuple(spec.column(kt, f) for kt in spec.key_type_names for f in names)
    assert len(set(spec.columns())) == len(spec.columns())
    views = [spec.view_name(kt) for kt in spec.key_type_names]
    assert len(set(views)) == len(views) and all(v.endswith(spec.version) for v in views)
    for bad in ("user__clicks_3h", "clicks", "nobody__clicks_1h"):
        with pytest.raises(KeyError):
            spec.parse(bad)


def test_different_half_lives_or_versions_have_different_fingerprints():
    a, b = FeatureSpec(half_lives=("1h", "1d")), FeatureSpec(half_lives=("1h", "2d"))
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == FeatureSpec(half_lives=("1h", "1d")).fingerprint
    assert a.fingerprint != FeatureSpec(half_lives=("1h", "1d"), version="v2").fingerprint


def test_spec_from_config():
    from jobs.config import load

    cfg = load(env={"STREAMLIFT_FEATURES__HALF_LIVES": "[2h, 3d]", "STREAMLIFT_FEATURES__SPEC_VERSION": "v9"})
    spec = FeatureSpec.from_config(cfg)
    assert spec.half_lives == ("2h", "3d") and spec.view_name("user") == "user_features_v9"


@pytest.fixture(scope="module")
def definitions(tmp_path_factory):
    from stores.feast_store import definitions

    return definitions(cfg_for(tmp_path_factory.mktemp("defs")))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(s.half_lives))
def test_feast_definitions_are_the_specs(definitions, spec, tmp_path):
    from feast import Entity, FeatureView, PushSource

    objs = definitions.build(spec, tmp_path)
    entities = {o.name: o for o in objs if isinstance(o, Entity)}
    views = {o.name: o for o in objs if isinstance(o, FeatureView)}
    pushes = {o.name for o in objs if isinstance(o, PushSource)}
    assert list(views) == [spec.view_name(kt) for kt in spec.key_type_names]
    assert pushes == {f"{v}_push" for v in views}
    assert sorted(e.join_key for e in entities.values()) == \
        sorted({c for kt in spec.key_type_names for c in spec.entities(kt)})
    for kt in spec.key_type_names:
        view = views[spec.view_name(kt)]
        assert tuple(f.name for f in view.features) == spec.feature_names()
        assert [f.description for f in view.features] == [spec.describe_feature(f) for f in spec.feature_names()]
        assert tuple(entities[e].join_key for e in view.entities) == spec.entities(kt)
        assert view.batch_source.path == str(tmp_path / spec.view_name(kt))


def test_feast_cli_sees_the_configured_specs_objects(definitions):
    """``feast -c feature_repo apply`` collects the module's attributes: one per object of the
    configuration's spec, under the object's name."""
    from jobs.config import load

    spec = FeatureSpec.from_config(load())
    assert definitions.SPEC == spec
    for kt in spec.key_type_names:
        assert getattr(definitions, spec.view_name(kt)).name == spec.view_name(kt)
        assert getattr(definitions, f"{spec.view_name(kt)}_push") in definitions.OBJECTS


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(s.half_lives))
def test_encoder_raw_columns_are_the_specs(spec):
    from udfs.learners import FeatureEncoder, OnlineLearner

    enc = FeatureEncoder(spec=spec)
    assert tuple(enc.raw_columns) == spec.columns()
    assert enc.half_lives == spec.half_lives and enc.spec is spec
    assert FeatureEncoder(spec.half_lives).version == enc.version              # the same features
    assert OnlineLearner(spec=spec).bundle.encoder.version == enc.version
    with pytest.raises(ValueError, match="not the spec's"):
        FeatureEncoder(half_lives=("5m",), spec=spec)
    # the numeric block reads each raw column in its place: a feature set only in one column
    # moves only that column's log1p and its key type's rates
    ctx = {"placement": ["feed"], "device": ["ios"], "region": ["eu"], "hour": [3],
           "campaign_id": ["c1"], "creative_id": ["k1"]}
    col = spec.column("user_campaign", f"clicks_{spec.half_lives[-1]}")
    base, one = enc.numeric(pd.DataFrame(ctx)), enc.numeric(pd.DataFrame({**ctx, col: [3.0]}))
    moved = [enc.numeric_names[j] for j in np.flatnonzero(base[0] != one[0])]
    assert moved == [f"log1p:{col}", "missing:user_campaign", f"ctr:user_campaign_{spec.half_lives[-1]}"]
    # the control arm's model leaves out the key types keyed by the creative
    keep, _ = enc.unshown_mask()
    assert [n for n, k in zip(enc.numeric_names, keep) if not k] == \
        [n for n in enc.numeric_names if "campaign_creative" in n]


def test_encoder_pickles_with_its_spec_and_restores_one_pickled_without():
    from udfs.learners import FeatureEncoder

    spec = FeatureSpec(half_lives=("30m", "2d"), version="v2")
    enc = FeatureEncoder(spec=spec)
    again = pickle.loads(pickle.dumps(enc))
    assert again.spec == spec and again.version == enc.version
    old = FeatureEncoder(("30m", "2d"))                 # as pickled before the encoder kept a spec
    state = old.__getstate__()
    del state["spec"]
    restored = FeatureEncoder.__new__(FeatureEncoder)
    restored.__setstate__(state)
    df = pd.DataFrame({"placement": ["feed"], "device": ["ios"], "region": ["eu"], "hour": [3],
                       "campaign_id": ["c1"], "creative_id": ["k1"], "user__clicks_2d": [1.5]})
    assert restored.spec.half_lives == ("30m", "2d")
    np.testing.assert_array_equal(restored.numeric(df), old.numeric(df))


def test_serving_reads_the_specs_views_and_decays_each_feature_by_its_half_life(tmp_path):
    """Features written to Feast (SQLite online store) and read back by ``features_from_feast``:
    every column of the spec, each decayed by its own half-life from its key's last event."""
    from stores.feast_store import open_store, write_online
    from serving.serve import features_from_feast

    cfg = cfg_for(tmp_path, STREAMLIFT_FEAST__ONLINE_STORE="sqlite")
    spec = FeatureSpec.from_config(cfg)
    store = open_store(cfg)
    t0 = 1_700_000_000_000                  # a whole second (the SQLite store keeps seconds)
    key = {"user_id": "u1", "campaign_id": "c1", "creative_id": "k1"}
    for i, kt in enumerate(spec.key_type_names):
        row = {c: key[c] for c in spec.entities(kt)}
        row.update({f: float(8 * (i + 1) + j) for j, f in enumerate(spec.feature_names())})
        row["event_timestamp"] = pd.Timestamp(t0, unit="ms", tz="UTC")
        assert write_online(store, kt, pd.DataFrame([row])) == 1
    req = pd.DataFrame([{**key, "placement": "feed"}, {"user_id": "u2", "campaign_id": "c1", "creative_id": "k9",
                                                       "placement": "side"}])
    now = t0 + 3_600_000
    got = features_from_feast(store, req, now, spec)
    assert list(got.columns) == [*req.columns, *spec.columns()]
    for i, kt in enumerate(spec.key_type_names):
        for j, f in enumerate(spec.feature_names()):
            hl = spec.half_life_ms(spec.parse(f)[2])
            assert got.loc[0, spec.column(kt, f)] == pytest.approx(
                float(8 * (i + 1) + j) * 2.0 ** (-3_600_000 / hl), rel=1e-9)
    for kt in spec.key_type_names:                             # row 1: none of its keys is known
        assert got.loc[1, list(spec.columns(kt))].isna().all()
    with pytest.raises(TypeError, match="FeatureSpec"):
        features_from_feast(store, req, now, cfg.features["half_lives"])
