"""Model store and serving read path.

Snapshots of the learner job live in a model store, any fsspec URL
(``learner.model_store``; a local folder by default)::

    <store>/<model_id>/v000007/model.pkl        the pickled udfs.learners.ModelBundle
    <store>/<model_id>/v000007/manifest.json    version, clock, feature schema version, training
                                                window, metrics, drift, safe flag
    <store>/<model_id>/LATEST                   the newest version written (never goes back)

A serving process::

    from serving.serve import load_latest_model, features_from_feast
    model = load_latest_model()                       # newest snapshot marked safe
    feats = features_from_feast(store, requests, now_ms)   # Feast online features, decayed to now
    scores = model.score(feats)                       # ctr, conversion, uplift, uplift_dr, model_version

(``score_requests(cfg, requests, now_ms)`` does the three.)

``python -m serving.serve --data-dir data/demo/run`` does that for a few users.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fsspec  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["write_snapshot", "list_versions", "load_model", "load_latest_model", "ServingModel",
           "features_from_feast", "score_requests"]


def _join(*parts) -> str:
    return "/".join(str(p).rstrip("/") for p in parts)


def _snapshot_key() -> bytes | None:
    """The HMAC key of model snapshots (``STREAMLIFT_SNAPSHOT_KEY``), or None: digests only."""
    import os

    key = os.environ.get("STREAMLIFT_SNAPSHOT_KEY")
    return key.encode() if key else None


def _hmac(blob: bytes, key: bytes) -> str:
    import hashlib
    import hmac

    return hmac.new(key, blob, hashlib.sha256).hexdigest()


def write_snapshot(store_url: str, snap) -> str:
    """Write one ``udfs.learners.Snapshot``; returns its folder URL. Rewriting a version (a
    replay after a restart) writes the same bytes; ``LATEST`` only moves forward. The manifest
    carries the SHA-256 of ``model.pkl`` (and its HMAC under ``STREAMLIFT_SNAPSHOT_KEY`` when set);
    :func:`load_model` checks them before unpickling."""
    import hashlib

    fs, root = fsspec.core.url_to_fs(store_url)
    folder = _join(root, snap.model_id, f"v{snap.version:06d}")
    fs.makedirs(folder, exist_ok=True)
    with fs.open(_join(folder, "model.pkl"), "wb") as f:
        f.write(snap.bundle)
    manifest = {**snap.manifest(), "model_sha256": hashlib.sha256(snap.bundle).hexdigest()}
    key = _snapshot_key()
    if key:
        manifest["model_hmac_sha256"] = _hmac(snap.bundle, key)
    with fs.open(_join(folder, "manifest.json"), "w") as f:     # written last: marks the snapshot complete
        f.write(json.dumps(manifest, indent=2))
    latest = _join(root, snap.model_id, "LATEST")
    current = int(fs.cat_file(latest)) if fs.exists(latest) else 0
    if snap.version > current:
        with fs.open(latest, "w") as f:
            f.write(str(snap.version))
    return _join(store_url, snap.model_id, f"v{snap.version:06d}")


def list_versions(store_url: str, model_id: str) -> list[dict]:
    """The manifests of every complete snapshot of ``model_id``, oldest first."""
    fs, root = fsspec.core.url_to_fs(store_url)
    base = _join(root, model_id)
    if not fs.exists(base):
        return []
    out = []
    for p in sorted(fs.ls(base, detail=False)):
        m = _join(p, "manifest.json")
        if Path(p).name.startswith("v") and fs.exists(m):
            out.append(json.loads(fs.cat_file(m)))
    return sorted(out, key=lambda m: m["version"])


@dataclass
class ServingModel:
    """A loaded snapshot: :meth:`score` returns calibrated CTR, conversion probability and uplift
    with the model version to log with the decision."""
    bundle: object
    manifest: dict

    @property
    def version(self) -> str:
        return f"{self.manifest['model_id']}@v{self.manifest['version']}"

    @property
    def feature_schema_version(self) -> str:
        return self.manifest["feature_schema_version"]

    def score(self, features) -> pd.DataFrame:
        out = self.bundle.score(features)
        out["model_version"] = self.version
        out["feature_schema_version"] = self.feature_schema_version
        return out


def load_model(store_url: str, model_id: str, version: int) -> ServingModel:
    """Load one snapshot, after checking ``model.pkl`` against the manifest's SHA-256 (and its
    HMAC when ``STREAMLIFT_SNAPSHOT_KEY`` is set): unpickling runs code, so a file that is not the
    one the learner wrote is refused (ValueError) before it is unpickled."""
    import hashlib
    import hmac

    fs, root = fsspec.core.url_to_fs(store_url)
    folder = _join(root, model_id, f"v{version:06d}")
    manifest = json.loads(fs.cat_file(_join(folder, "manifest.json")))
    blob = fs.cat_file(_join(folder, "model.pkl"))
    digest = manifest.get("model_sha256")
    if digest is None or hashlib.sha256(blob).hexdigest() != digest:
        raise ValueError(f"{folder}/model.pkl does not match its manifest's SHA-256: refusing to load it")
    key = _snapshot_key()
    if key and not hmac.compare_digest(manifest.get("model_hmac_sha256", ""), _hmac(blob, key)):
        raise ValueError(f"{folder}/model.pkl has no valid HMAC under STREAMLIFT_SNAPSHOT_KEY: refusing to load it")
    bundle = pickle.loads(blob)
    return ServingModel(bundle, manifest)


def load_latest_model(store_url: str | None = None, model_id: str | None = None,
                      safe_only: bool = True, cfg=None) -> ServingModel:
    """The newest snapshot (by default the newest one not flagged by the drift check)."""
    if store_url is None or model_id is None:
        from jobs.config import load
        cfg = cfg or load()
        store_url = store_url or cfg.model_store
        model_id = model_id or cfg.learner["model_id"]
    versions = [m for m in list_versions(store_url, model_id) if m["safe"] or not safe_only]
    if not versions:
        raise FileNotFoundError(f"no {'safe ' if safe_only else ''}snapshot of {model_id!r} in {store_url}")
    return load_model(store_url, model_id, versions[-1]["version"])


def features_from_feast(store, requests: pd.DataFrame, now_ms: int, spec=None) -> pd.DataFrame:
    """The features of each request row (decision context with the entity columns,
    ``user_id``, ``campaign_id``, ``creative_id``) from Feast's online store, decayed from each
    key's last event to ``now_ms`` (Feast keeps a key's accumulators as of its last event), in
    the columns the learner reads. ``spec``: the :class:`udfs.spec.FeatureSpec` the features were
    written under (by default, that of the configuration, ``jobs.config.load()``)."""
    from udfs.decay import decay_to
    from udfs.spec import FeatureSpec

    if spec is None:
        from jobs.config import load
        spec = FeatureSpec.from_config(load())
    elif not isinstance(spec, FeatureSpec):
        raise TypeError(f"spec must be a FeatureSpec (FeatureSpec.from_config(cfg)), not {type(spec).__name__}")
    names = spec.feature_names()
    half_life_ms = {n: spec.half_life_ms(spec.parse(n)[2]) for n in names}
    out = requests.reset_index(drop=True).copy()
    for kt in spec.key_type_names:
        view = spec.view_name(kt)
        rows = out[list(spec.entities(kt))].to_dict("records")
        resp = store.get_online_features(features=[f"{view}:{n}" for n in names], entity_rows=rows)
        got = resp.to_df()
        # each value's event time, to the millisecond (to_df's "__ts" columns keep whole seconds)
        stamps = dict(zip(resp.proto.metadata.feature_names.val, resp.proto.results))
        for n in names:
            v = got[n].to_numpy(dtype=float, na_value=np.nan)
            as_of = np.array([t.seconds * 1000 + t.nanos // 1_000_000 for t in stamps[n].event_timestamps],
                             dtype=np.int64)
            out[spec.column(kt, n)] = decay_to(v, as_of, np.maximum(now_ms, as_of), half_life_ms[n])
    return out


def score_requests(cfg, requests: pd.DataFrame, now_ms: int) -> tuple[ServingModel, pd.DataFrame]:
    """What a serving process does per request batch: the newest safe model, the requests'
    features from Feast as of ``now_ms``, the scores (one row per request)."""
    from stores.feast_store import open_store
    from udfs.spec import FeatureSpec

    model = load_latest_model(cfg=cfg)
    feats = features_from_feast(open_store(cfg, apply=False), requests, now_ms, FeatureSpec.from_config(cfg))
    return model, model.score(feats)


def main(argv=None) -> None:
    from jobs.config import quiet_third_party_warnings

    quiet_third_party_warnings()
    p = argparse.ArgumentParser(description="score a few decisions with the newest model and Feast features")
    p.add_argument("--data-dir", help="override paths.data_dir (the features/learner run)")
    p.add_argument("-n", type=int, default=5)
    args = p.parse_args(argv)
    from jobs.config import load_for_cli

    cfg = load_for_cli(args.data_dir)
    last = sorted((cfg.data_dir / "enriched").glob("*.parquet"))[-1]      # the newest decisions' contexts
    dec = pd.read_parquet(last).tail(args.n)
    req = dec[["user_id", "campaign_id", "creative_id", "placement", "device", "region", "hour"]]
    model, scores = score_requests(cfg, req, int(dec.event_time.max()))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.concat([req[["user_id", "campaign_id", "creative_id"]].reset_index(drop=True), scores], axis=1))


if __name__ == "__main__":
    main()
