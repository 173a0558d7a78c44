"""The feature spec: one frozen description of every feature streamlift computes.

Key types with their entity columns and consent rule, the metrics, the
half-lives, the version and the column naming live here, built once from
``streamlift.yaml`` (:meth:`FeatureSpec.from_config`) and passed explicitly to
the engines, the Feast definitions, the learner's encoder and serving. Names
are generated here and parsed back only here (:meth:`FeatureSpec.parse`).

Engine state carries :attr:`FeatureSpec.fingerprint`; restoring state made
under another spec fails with :class:`SpecMismatch`, which names the difference.

>>> spec = FeatureSpec(half_lives=("1h", "7d"))
>>> spec.feature_names()[:3]
('impressions_1h', 'impressions_7d', 'clicks_1h')
>>> spec.column("user_campaign", "clicks_7d"), spec.view_name("user")
('user_campaign__clicks_7d', 'user_features_v1')
>>> spec.parse("campaign_creative__conversions_1h")
('campaign_creative', 'conversions', '1h')
>>> spec.half_life_ms("7d")
604800000
>>> FeatureSpec(half_lives=("1h",)).check(spec.describe())
Traceback (most recent call last):
...
udfs.spec.SpecMismatch: state was made under another feature spec: half_lives: state ['1h', '7d'], now ['1h']
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

__all__ = ["FeatureSpec", "KeyType", "SpecMismatch", "parse_duration", "METRICS", "KINDS", "KIND_RANK"]

KINDS = ("decision", "click", "conversion")
KIND_RANK = {k: i for i, k in enumerate(KINDS)}
METRICS = ("impressions", "clicks", "conversions")

_DUR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_duration(text) -> int:
    """``'1h'`` -> 3600000 (milliseconds). Integers pass through as milliseconds.

    >>> parse_duration("7d"), parse_duration("90s"), parse_duration(250)
    (604800000, 90000, 250)
    """
    if isinstance(text, int) or type(text).__name__ in ("int64", "int32"):
        return int(text)
    m = _DUR.match(str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 30s, 5m, 1h, 7d)")
    return int(float(m.group(1)) * _UNIT_MS[m.group(2)])


class SpecMismatch(ValueError):
    """State made under one feature spec, restored under another."""


@dataclass(frozen=True)
class KeyType:
    """One accumulator key: its entity columns (the Feast join keys, in order), whether it is
    user-level (kept only for decisions with ``consent``), and the column its shard is routed by."""
    name: str
    entities: tuple
    user_level: bool
    description: str = ""

    @property
    def route_by(self) -> tuple:
        """Entity columns the key is sharded by: the user for user-level keys (so a user's
        keys live together), else every entity column."""
        return ("user_id",) if self.user_level else self.entities


DEFAULT_KEY_TYPES = (
    KeyType("user", ("user_id",), True, "per user"),
    KeyType("user_campaign", ("user_id", "campaign_id"), True, "per user x campaign"),
    KeyType("campaign_creative", ("campaign_id", "creative_id"), False, "per campaign x creative"),
)

METRIC_DOC = {"impressions": "treatment-arm decisions", "clicks": "attributed clicks",
              "conversions": "attributed conversions"}


@dataclass(frozen=True)
class FeatureSpec:
    """What the features are: key types, metrics, half-lives, version, naming."""
    half_lives: tuple = ("1h", "1d", "7d")
    version: str = "v1"
    key_types: tuple = DEFAULT_KEY_TYPES
    metrics: tuple = METRICS
    _lookup: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "half_lives", tuple(str(h) for h in self.half_lives))
        for h in self.half_lives:
            parse_duration(h)
        if len(set(self.half_lives)) != len(self.half_lives):
            raise ValueError(f"half-lives repeat: {self.half_lives}")
        lookup = {}
        for kt in self.key_types:
            for m in self.metrics:
                for h in self.half_lives:
                    lookup[self.column(kt.name, f"{m}_{h}")] = (kt.name, m, h)
        object.__setattr__(self, "_lookup", lookup)

    @classmethod
    def from_config(cls, cfg) -> "FeatureSpec":
        """The spec of a loaded :class:`jobs.config.Config` (``features.half_lives``,
        ``features.spec_version``)."""
        f = cfg.features
        return cls(half_lives=tuple(f["half_lives"]), version=str(f.get("spec_version", "v1")))

    # ------------------------------------------------------------------ names
    @property
    def key_type_names(self) -> tuple:
        return tuple(kt.name for kt in self.key_types)

    def key_type(self, name: str) -> KeyType:
        for kt in self.key_types:
            if kt.name == name:
                return kt
        raise KeyError(f"no key type {name!r} in the feature spec ({self.key_type_names})")

    def entities(self, key_type: str) -> tuple:
        return self.key_type(key_type).entities

    def feature_names(self) -> tuple:
        """Feature names of one key type (the Feast feature names), metric-major."""
        return tuple(f"{m}_{h}" for m in self.metrics for h in self.half_lives)

    @staticmethod
    def column(key_type: str, feature: str) -> str:
        """Column of one feature in an enriched decision."""
        return f"{key_type}__{feature}"

    def columns(self, key_type: str | None = None) -> tuple:
        """Enriched-decision columns of one key type, or of all of them."""
        kts = self.key_type_names if key_type is None else (key_type,)
        return tuple(self.column(kt, f) for kt in kts for f in self.feature_names())

    def view_name(self, key_type: str) -> str:
        return f"{key_type}_features_{self.version}"

    def parse(self, column: str) -> tuple:
        """``'user__clicks_1d'`` -> ``('user', 'clicks', '1d')``; a feature name alone
        (``'clicks_1d'``) -> ``(None, 'clicks', '1d')``."""
        if column in self._lookup:
            return self._lookup[column]
        for m in self.metrics:
            for h in self.half_lives:
                if column == f"{m}_{h}":
                    return None, m, h
        raise KeyError(f"{column!r} is not a feature of this spec")

    def half_life_ms(self, half_life: str) -> int:
        return parse_duration(half_life)

    def describe_feature(self, feature: str) -> str:
        _, m, h = self.parse(feature)
        return f"decayed count of {METRIC_DOC[m]}, half-life {h}, as of event_timestamp"

    # ------------------------------------------------------------ fingerprint
    def describe(self) -> dict:
        """Everything that changes what a stored value means, as plain data."""
        return {"version": self.version, "half_lives": list(self.half_lives), "metrics": list(self.metrics),
                "key_types": [{"name": k.name, "entities": list(k.entities), "user_level": k.user_level}
                              for k in self.key_types]}

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.describe(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def check(self, stored: dict) -> None:
        """Raise :class:`SpecMismatch` naming every difference between ``stored`` (a
        :meth:`describe` kept in state) and this spec."""
        now = self.describe()
        diffs = [f"{k}: state {stored.get(k)}, now {now[k]}" for k in now if stored.get(k) != now[k]]
        if diffs:
            raise SpecMismatch("state was made under another feature spec: " + "; ".join(diffs))
