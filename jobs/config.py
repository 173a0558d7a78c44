"""Configuration: ``streamlift.yaml`` plus ``STREAMLIFT_<SECTION>__<KEY>`` environment
overrides, frozen after loading.

>>> cfg = load(env={"STREAMLIFT_FEATURES__OUT_OF_ORDERNESS": "10m"})
>>> cfg.features["out_of_orderness"], cfg.features["half_lives"]
('10m', ('1h', '1d', '7d'))
>>> cfg.features["click_window"] = "2h"
Traceback (most recent call last):
...
TypeError: 'mappingproxy' object does not support item assignment

A *profile* (``STREAMLIFT_PROFILE=<name>``) is ``docker/<name>.yaml`` (beside the configuration
file) merged key by key over
``streamlift.yaml`` before the environment overrides; its ``${VAR}`` / ``${VAR:-default}``
values are read from the environment (secrets stay out of the files). Without
``STREAMLIFT_PROFILE`` nothing changes.

>>> _merge({"a": {"x": 1, "y": 2}, "b": 3}, {"a": {"y": 20}})
{'a': {'x': 1, 'y': 20}, 'b': 3}
>>> _expand({"uri": "postgresql://${PGUSER}:${PGPASSWORD}@${PGHOST:-postgres}/db"},
...         {"PGUSER": "sl", "PGPASSWORD": "pw"}, "docker/at-scale.yaml")
{'uri': 'postgresql://sl:pw@postgres/db'}
>>> _expand("${NOT_SET}", {}, "docker/at-scale.yaml")
Traceback (most recent call last):
...
KeyError: 'docker/at-scale.yaml: environment variable NOT_SET is not set'
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import yaml

__all__ = ["Config", "load", "load_for_cli", "ROOT"]

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "STREAMLIFT_"


def _freeze(v):
    if isinstance(v, dict):
        return MappingProxyType({k: _freeze(x) for k, x in v.items()})
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base`` key by key (nested mappings merged, anything else replaced)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _expand(v, env, source):
    """``${VAR}`` and ``${VAR:-default}`` in the strings of ``v`` filled from ``env``."""
    if isinstance(v, dict):
        return {k: _expand(x, env, source) for k, x in v.items()}
    if isinstance(v, list):
        return [_expand(x, env, source) for x in v]
    if not isinstance(v, str):
        return v

    def sub(m):
        if m.group(1) in env:
            return env[m.group(1)]
        if m.group(2) is not None:
            return m.group(2)
        raise KeyError(f"{source}: environment variable {m.group(1)} is not set")

    return _VAR.sub(sub, v)


def _profile(raw: dict, env, base: Path) -> dict:
    name = env.get(PREFIX + "PROFILE")
    if not name:
        return raw
    path = base.parent / "docker" / f"{name}.yaml"      # beside the configuration file
    if not path.exists():
        raise FileNotFoundError(f"{PREFIX}PROFILE={name}: no profile {path}")
    over = yaml.safe_load(path.read_text()) or {}
    unknown = set(over) - set(raw)
    if unknown:
        raise KeyError(f"{path}: unknown sections {sorted(unknown)}")
    return _merge(raw, _expand(over, env, f"docker/{name}.yaml"))


@dataclass(frozen=True)
class Config:
    paths: MappingProxyType
    features: MappingProxyType
    flink: MappingProxyType
    feast: MappingProxyType
    iceberg: MappingProxyType
    outcomes: MappingProxyType
    learner: MappingProxyType
    limits: MappingProxyType
    privacy: MappingProxyType
    kafka: MappingProxyType

    @property
    def data_dir(self) -> Path:
        p = Path(self.paths["data_dir"])
        return p if p.is_absolute() else ROOT / p

    def engine_params(self) -> dict:
        """Constructor arguments of ``udfs.features.FeatureEngine``."""
        return {**self.features, "max_future": self.limits.get("max_future")}

    def outcome_params(self) -> dict:
        """Constructor arguments of ``udfs.outcomes.OutcomeEngine``."""
        return {"click_window": self.features["click_window"],
                "conversion_window": self.features["conversion_window"],
                "commit_every": self.outcomes["commit_every"],
                "prior_strength": float(self.outcomes["prior_strength"])}

    def learner_params(self) -> dict:
        """Constructor arguments of ``udfs.learners.OnlineLearner``."""
        keys = ("label_wait", "refit_every", "snapshot_every", "snapshot_examples", "batch_size", "lr",
                "intercept_lr", "buckets", "calibration_window", "ipw_clip", "drift_threshold", "model_id",
                "effect_modifiers", "uplift_buckets", "dr_ridge", "t_ridge", "t_empirical_bayes")
        return {"half_lives": tuple(self.features["half_lives"]),
                "click_window": self.features["click_window"],
                "conversion_window": self.features["conversion_window"],
                "prior_strength": float(self.outcomes["prior_strength"]),
                **{k: self.learner[k] for k in keys}}

    @property
    def model_store(self) -> str:
        """The model store URL, ``{data_dir}`` filled in."""
        return str(self.learner["model_store"]).replace("{data_dir}", str(self.data_dir))


def load(path: str | os.PathLike | None = None, env: dict | None = None) -> Config:
    env = os.environ if env is None else env
    path = Path(path or env.get("STREAMLIFT_CONFIG", ROOT / "streamlift.yaml"))
    raw = _profile(yaml.safe_load(path.read_text()), env, path)
    for key, value in env.items():
        if not key.startswith(PREFIX) or "__" not in key:
            continue
        section, _, name = key[len(PREFIX):].lower().partition("__")
        if section not in raw:
            raise KeyError(f"{key}: no section {section!r} in {path}")
        raw[section][name] = yaml.safe_load(value)
    return Config(**{k: _freeze(v) for k, v in raw.items()})


#: libraries whose deprecation and future warnings are theirs to fix, not the user's to read
THIRD_PARTY = ("pyflink", "httplib2", "pyparsing", "pyiceberg", "pydantic", "feast", "great_expectations",
               "google", "dask", "pandas", "pyarrow", "river", "sklearn", "altair", "marshmallow", "ruamel",
               "typeguard", "fsspec", "s3fs", "aiobotocore", "botocore", "boto3", "duckdb", "sqlalchemy")


def quiet_third_party_warnings() -> None:
    """At a command's entry point: silence other libraries' Deprecation/Future/UserWarnings so the
    terminal holds what the user asked for; the project's own warnings stay. Filters alone do
    not hold: a library imported later (Apache Beam's annotations, under Feast) puts
    ``simplefilter("always")`` in front of them, so the warnings are dropped where they are shown,
    by the file that raised them (an installed package), and by module name for the rest."""
    import re
    import warnings

    pattern = r"(%s)(\.|$)" % "|".join(re.escape(m) for m in THIRD_PARTY)
    quiet = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, UserWarning)
    for cat in quiet:
        warnings.filterwarnings("ignore", category=cat, module=pattern)
    shown = warnings.showwarning
    if not getattr(shown, "streamlift_quiet", False):
        def showwarning(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, quiet) and ("site-packages" in str(filename) or "dist-packages" in str(filename)):
                return
            shown(message, category, filename, lineno, file, line)

        showwarning.streamlift_quiet = True
        warnings.showwarning = showwarning
    # the Python processes Flink starts inherit this environment (module patterns cannot be named here)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")


def load_for_cli(data_dir: str | None = None) -> Config:
    """For a command's ``main()``: ``--data-dir`` overrides ``paths.data_dir`` in this process's
    environment (so Flink's Python workers started from it see it too), then :func:`load`;
    other libraries' deprecation warnings are silenced (:func:`quiet_third_party_warnings`)."""
    quiet_third_party_warnings()
    if data_dir:
        os.environ[PREFIX + "PATHS__DATA_DIR"] = str(data_dir)
    return load()
