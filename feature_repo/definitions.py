"""Feast definitions of streamlift: entities, feature views (``*_v1``) and push sources.

The feature names and the entity columns come from ``udfs.features`` and the
half-lives from ``streamlift.yaml``: nothing is written twice. Each view's
values are the decayed accumulators *as of* ``event_timestamp`` (the key's last
event time); a reader decays them to query time with ``udfs.decay.decay_to``.
"""

import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType  # noqa: E402
from feast.types import Float64  # noqa: E402

from jobs.config import load as load_config  # noqa: E402
from udfs.features import ENTITY_COLUMNS, KEY_TYPES, feature_names  # noqa: E402

_cfg = load_config()
HALF_LIVES = tuple(_cfg.features["half_lives"])
OFFLINE_DIR = _cfg.data_dir / "offline"
VERSION = "v1"

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING, description="Pseudonymous user (keyed hash).")
campaign = Entity(name="campaign", join_keys=["campaign_id"], value_type=ValueType.STRING, description="Ad campaign.")
creative = Entity(name="creative", join_keys=["creative_id"], value_type=ValueType.STRING, description="Ad creative.")
_ENTITY = {"user_id": user, "campaign_id": campaign, "creative_id": creative}

_DOC = {"impressions": "treatment-arm decisions", "clicks": "attributed clicks",
        "conversions": "attributed conversions"}


def _view(key_type: str, offline_dir=OFFLINE_DIR):
    name = f"{key_type}_features_{VERSION}"
    batch = FileSource(name=f"{name}_offline", path=str(Path(offline_dir) / name),
                       timestamp_field="event_timestamp")
    push = PushSource(name=f"{name}_push", batch_source=batch)
    fields = [Field(name=f, dtype=Float64,
                    description=f"decayed count of {_DOC[f.split('_')[0]]}, half-life {f.rsplit('_', 1)[1]},"
                                " as of event_timestamp")
              for f in feature_names(HALF_LIVES)]
    view = FeatureView(name=name, entities=[_ENTITY[c] for c in ENTITY_COLUMNS[key_type]],
                       ttl=timedelta(days=30), schema=fields, source=push, online=True,
                       description=f"Exponentially decayed accumulators per {key_type.replace('_', ' x ')}.")
    return push, view


def build(offline_dir) -> list:
    """All objects, with the offline store under ``offline_dir`` (a run's data dir)."""
    objs = [user, campaign, creative]
    for kt in KEY_TYPES:
        push, view = _view(kt, offline_dir)
        objs += [push, view]
    return objs


user_features_push, user_features_v1 = _view("user")
user_campaign_features_push, user_campaign_features_v1 = _view("user_campaign")
campaign_creative_features_push, campaign_creative_features_v1 = _view("campaign_creative")

VIEWS = {"user": user_features_v1, "user_campaign": user_campaign_features_v1,
         "campaign_creative": campaign_creative_features_v1}
assert set(VIEWS) == set(KEY_TYPES)
OBJECTS = [user, campaign, creative, user_features_push, user_campaign_features_push,
           campaign_creative_features_push, *VIEWS.values()]
