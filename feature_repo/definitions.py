"""Feast definitions of streamlift: entities, feature views and push sources.

Everything is built from a :class:`udfs.spec.FeatureSpec` handed in
(:func:`build`): the view names (``spec.view_name``, e.g. ``user_features_v1``),
the feature names and their descriptions, the entities (each key type's entity
columns are its join keys); nothing is named here. Each view's values are the
decayed accumulators *as of* ``event_timestamp`` (the key's last event time); a
reader decays them to query time with ``udfs.decay.decay_to``.

``stores.feast_store.open_store`` applies ``build(FeatureSpec.from_config(cfg), ...)``
of the run's config. The feast CLI (``feast -c feature_repo apply``) collects the
module's attributes instead: for it, the objects of ``streamlift.yaml``'s spec
are built once at import (:data:`SPEC`, :data:`OBJECTS`) and bound by name.
"""

import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType  # noqa: E402
from feast.types import Float64  # noqa: E402

from jobs.config import load as load_config  # noqa: E402
from udfs.spec import FeatureSpec  # noqa: E402

#: Feast entity of an entity column: (name, description). A column not listed here is an
#: entity named after the column without its ``_id``.
ENTITY_DOC = {"user_id": ("user", "Pseudonymous user (keyed hash)."),
              "campaign_id": ("campaign", "Ad campaign."),
              "creative_id": ("creative", "Ad creative.")}


def entities(spec: FeatureSpec) -> dict:
    """entity column (join key) -> Entity, for every entity column of the spec's key types."""
    out = {}
    for kt in spec.key_types:
        for col in kt.entities:
            if col not in out:
                name, doc = ENTITY_DOC.get(col, (col.removesuffix("_id"), col))
                out[col] = Entity(name=name, join_keys=[col], value_type=ValueType.STRING, description=doc)
    return out


def views(spec: FeatureSpec, offline_dir, entity_of: dict | None = None, s3_endpoint: str | None = None) -> dict:
    """key type -> (push source, feature view), the offline store under ``offline_dir`` (a
    folder or an ``s3://`` URL, read through ``s3_endpoint`` when given)."""
    entity_of = entities(spec) if entity_of is None else entity_of
    out = {}
    for kt in spec.key_types:
        name = spec.view_name(kt.name)
        batch = FileSource(name=f"{name}_offline", path=f"{str(offline_dir).rstrip('/')}/{name}",
                           timestamp_field="event_timestamp",
                           **({"s3_endpoint_override": s3_endpoint} if s3_endpoint else {}))
        push = PushSource(name=f"{name}_push", batch_source=batch)
        fields = [Field(name=f, dtype=Float64, description=spec.describe_feature(f)) for f in spec.feature_names()]
        per = kt.description or "per " + kt.name.replace("_", " x ")
        view = FeatureView(name=name, entities=[entity_of[c] for c in spec.entities(kt.name)],
                           ttl=timedelta(days=30), schema=fields, source=push, online=True,
                           description=f"Exponentially decayed accumulators {per}.")
        out[kt.name] = (push, view)
    return out


def build(spec: FeatureSpec, offline_dir, s3_endpoint: str | None = None) -> list:
    """All objects of ``spec`` (entities, then each key type's push source and view), with the
    offline store under ``offline_dir`` (``stores.feast_store.offline_root``)."""
    entity_of = entities(spec)
    objs = list(entity_of.values())
    for push, view in views(spec, offline_dir, entity_of, s3_endpoint).values():
        objs += [push, view]
    return objs


# ----------------------------------------------------------------------------- for the feast CLI
_cfg = load_config()
SPEC = FeatureSpec.from_config(_cfg)
OBJECTS = build(SPEC, _cfg.feast.get("offline_dir") or _cfg.data_dir / "offline", _cfg.feast.get("s3_endpoint"))
# the feast CLI collects the Feast objects among the module's attributes (not inside lists)
assert not {o.name for o in OBJECTS} & set(globals()), "a Feast object's name shadows a module attribute"
globals().update({o.name: o for o in OBJECTS})
