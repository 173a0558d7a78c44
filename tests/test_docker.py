"""docker/ (image, compose stack), the at-scale profile and the Kafka DDL, checked without Docker
or a JVM: the files' structure and their agreement with the repository. The images were never
built and the stack never run here (no Docker engine); see the README's "Deploying"."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from jobs.config import ROOT, load
from schemas import CONTRACTS

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
PROFILE = DOCKER / "at-scale.yaml"

SERVICES = {"jobmanager", "taskmanager", "submit", "redis", "postgres", "objectstore"}
ONE_SHOT = {"submit", "buckets"}
SECRET_NAME = re.compile(r"(password|secret|token|auth|access[-_]?key|quarantine[-_]?key)", re.I)
REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:[-?][^}]*)?\}")

# what the at-scale profile needs from the environment, as the compose file passes it
SECRETS = {"POSTGRES_USER": "sl-user", "POSTGRES_PASSWORD": "pg-pw-x1", "REDIS_PASSWORD": "redis-pw-x2",
           "S3_ACCESS_KEY": "s3-ak-x3", "S3_SECRET_KEY": "s3-sk-x4", "STREAMLIFT_QUARANTINE_KEY": "qk-x5"}


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def _is_reference(value) -> bool:
    """A whole ``${VAR}`` / ``${VAR:?msg}`` reference: no literal, no fallback default."""
    m = REF.fullmatch(str(value).strip())
    return bool(m) and not (m.group(2) or "").startswith(":-")


def _flink_properties(env: dict) -> dict:
    return dict(line.split(": ", 1) for line in env["FLINK_PROPERTIES"].strip().splitlines())


# ----------------------------------------------------------------------------------------- compose
def test_compose_has_the_services_health_checks_and_named_volumes(compose):
    services = compose["services"]
    assert SERVICES <= set(services)
    for name, svc in services.items():
        if name in ONE_SHOT:
            assert svc.get("restart") == "no", name
            continue
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name}: no health check"
    declared = set(compose["volumes"])
    assert {"streamlift-data", "redis-data", "postgres-data", "objectstore-data"} <= declared
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            source = v.split(":")[0] if isinstance(v, str) else v["source"]
            assert source in declared, f"{name}: {source} is not a named volume"
    # the job services share the run's data volume (hand-off between the jobs)
    for name in ("jobmanager", "taskmanager", "submit"):
        assert "streamlift-data:/data" in services[name]["volumes"]


def test_taskmanager_scales_and_the_jobs_wait_for_healthy_services(compose):
    s = compose["services"]
    tm = s["taskmanager"]
    assert "container_name" not in tm and "ports" not in tm, "--scale needs no fixed name or host port"
    assert tm["command"] == "taskmanager" and s["jobmanager"]["command"] == "jobmanager"
    for dep in ("postgres", "redis", "objectstore"):
        assert s["jobmanager"]["depends_on"][dep]["condition"] == "service_healthy"
    assert s["jobmanager"]["depends_on"]["buckets"]["condition"] == "service_completed_successfully"
    for dep in ("jobmanager", "taskmanager"):
        assert s["submit"]["depends_on"][dep]["condition"] == "service_healthy"
    # the one image for the cluster and the submit service, built from docker/Dockerfile
    for name in ("jobmanager", "taskmanager", "submit"):
        assert s[name]["build"]["dockerfile"] == "docker/Dockerfile"
        assert (COMPOSE.parent / s[name]["build"]["context"]).resolve() == ROOT


def test_submit_runs_the_three_jobs_in_order_with_flink_run_py(compose):
    cmd = compose["services"]["submit"]["command"]
    assert cmd[-1] == "/opt/streamlift/docker/submit.sh"
    script = (DOCKER / "submit.sh").read_text()
    assert "flink run" in script and '-py "$ROOT/jobs/$1.py"' in script
    assert re.findall(r"^run (\w+) ", script, re.M) == ["features", "outcomes", "learner"]
    assert "set -euo pipefail" in script          # a failing job stops the chain
    for job in ("features", "outcomes", "learner"):
        assert (ROOT / "jobs" / f"{job}.py").exists()


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


def test_compose_has_no_literal_secrets(compose):
    checked = 0
    for path, value in _walk(compose):
        key = path.rsplit(".", 1)[-1]
        if key == "FLINK_PROPERTIES":
            for line in value.strip().splitlines():
                k, v = line.split(": ", 1)
                if SECRET_NAME.search(k):
                    assert _is_reference(v), f"{path}: {k}"
                    checked += 1
        elif SECRET_NAME.search(key) and not key.startswith("x-"):
            assert _is_reference(value), f"{path} = {value!r} is not a ${{VAR}} reference"
            checked += 1
    assert checked >= 10
    # commands read secrets from the container's environment ($$VAR), never inline
    redis = compose["services"]["redis"]["command"][-1]
    assert '--requirepass "$$REDIS_PASSWORD"' in redis
    assert '"$$S3_ACCESS_KEY" "$$S3_SECRET_KEY"' in compose["services"]["buckets"]["command"][0]


def test_env_example_lists_every_required_variable_with_placeholders(compose):
    example = dict(line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", COMPOSE.read_text()))
    assert required and required <= set(example), required - set(example)
    for k, v in example.items():
        if SECRET_NAME.search(k):
            assert v.startswith("change-me"), f"{k} must be a placeholder"
    assert (DOCKER / ".gitignore").read_text().split().count(".env") == 1


def test_compose_validates_against_the_compose_spec_schema_when_available(compose):
    """No installed package ships the Compose specification's JSON schema: point
    ``COMPOSE_SPEC_SCHEMA`` at a copy of compose-spec's ``schema/compose-spec.json`` to run this."""
    path = os.environ.get("COMPOSE_SPEC_SCHEMA")
    if not path:
        pytest.skip("COMPOSE_SPEC_SCHEMA not set: no offline copy of the Compose spec schema")
    import jsonschema

    schema = json.loads(Path(path).read_text())
    errors = [f"{e.json_path}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(compose)]
    assert not errors, errors


# -------------------------------------------------------------------------------------- Dockerfile
def _instructions():
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _lock() -> dict:
    return dict(l.split("==") for l in (ROOT / "requirements.lock").read_text().split())


def test_every_path_the_dockerfile_copies_exists():
    copies = [i.split()[1:] for i in _instructions() if i.upper().startswith(("COPY ", "ADD "))]
    sources = [p for args in copies if not any(a.startswith("--from") for a in args) for p in args[:-1]]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    for needed in ("jobs/", "udfs/", "schemas/", "feature_repo/", "flink-conf/", "streamlift.yaml",
                   "requirements.lock", "docker/at-scale.yaml", "docker/submit.sh"):
        assert needed in sources, needed


def test_image_is_flink_2_java17_with_python_311_and_the_pyflink_of_the_lock():
    ins = _instructions()
    args = dict(i.split(None, 1)[1].split("=", 1) for i in ins if i.startswith("ARG ") and "=" in i)
    frm = [i for i in ins if i.startswith("FROM ")]
    assert frm[-1] == "FROM flink:${FLINK_VERSION}-java17"        # the final stage; before it the jars'
    assert all(f.endswith(" AS jvm-deps") for f in frm[:-1])
    pyflink = _lock()["apache-flink"]
    assert pyflink.startswith("2.") and args["FLINK_VERSION"] == ".".join(pyflink.split(".")[:2])
    assert args["PYTHON_VERSION"].startswith("3.11.")
    # the build itself fails when the image's Flink and the locked PyFlink disagree
    assert any("flink-dist" in i and "apache-flink" in i for i in ins)


def test_image_installs_exactly_the_lock():
    runs = " ".join(i for i in _instructions() if i.startswith("RUN "))
    installs = re.findall(r"pip install ([^&;]+)", runs)
    assert [i.split() for i in installs] == [["--no-cache-dir", "--upgrade", "pip"],
                                            ["--no-cache-dir", "--no-deps", "-r",
                                             "/opt/streamlift/requirements.lock"]]
    assert "pip check" in runs
    assert "COPY requirements.lock /opt/streamlift/requirements.lock" in _instructions()
    assert not re.search(r"\b(uv pip|conda|poetry) install", runs)


# ------------------------------------------------------------------------------- at-scale profile
def test_default_config_is_unchanged_without_a_profile():
    assert load(env={}) == load(env={"UNRELATED": "1"})
    assert load(env={}).feast["online_store"] == "sqlite"
    assert load(env={}).iceberg["catalog"]["uri"].startswith("sqlite:///")


def test_at_scale_profile_switches_the_services():
    cfg = load(env={"STREAMLIFT_PROFILE": "at-scale", **SECRETS})
    assert cfg.feast["online_store"] == "redis"
    assert cfg.feast["redis_connection"] == "redis:6379,password=redis-pw-x2"
    assert cfg.feast["registry"]["registry_type"] == "sql"
    assert cfg.feast["registry"]["path"] == "postgresql+psycopg2://sl-user:pg-pw-x1@postgres:5432/streamlift"
    cat = cfg.iceberg["catalog"]
    assert cat["type"] == "sql" and cat["uri"] == "postgresql+psycopg2://sl-user:pg-pw-x1@postgres:5432/streamlift"
    assert cat["warehouse"] == "s3://streamlift-warehouse/iceberg"
    assert (cat["s3.endpoint"], cat["s3.access-key-id"], cat["s3.secret-access-key"]) == \
        ("http://objectstore:9000", "s3-ak-x3", "s3-sk-x4")
    assert cfg.feast["offline_dir"] == "s3://streamlift-feast/offline"
    assert cfg.model_store == "s3://streamlift-models/models"
    assert cfg.flink["profile"] == "cluster" and (ROOT / "flink-conf" / "cluster" / "config.yaml").exists()
    assert cfg.flink["checkpoints_dir"] == "s3://streamlift-checkpoints/flink"
    assert cfg.privacy["quarantine_key"] == "qk-x5"
    assert str(cfg.data_dir) == "/data/run"
    # what the profile does not name stays as in streamlift.yaml
    base = load(env={})
    assert cfg.features == base.features and cfg.learner["lr"] == base.learner["lr"]
    assert cfg.feast["repo"] == base.feast["repo"] and cfg.iceberg["namespace"] == base.iceberg["namespace"]


def test_at_scale_profile_takes_the_environment():
    env = {"STREAMLIFT_PROFILE": "at-scale", **SECRETS, "S3_BUCKET_MODELS": "team-models",
           "POSTGRES_HOST": "db.internal", "STREAMLIFT_FEATURES__OUT_OF_ORDERNESS": "10m",
           "STREAMLIFT_FEAST__ONLINE_STORE": "sqlite"}
    cfg = load(env=env)
    assert cfg.model_store == "s3://team-models/models"
    assert "@db.internal:5432/" in cfg.iceberg["catalog"]["uri"]
    # STREAMLIFT_<SECTION>__<KEY> still wins over the profile
    assert cfg.features["out_of_orderness"] == "10m" and cfg.feast["online_store"] == "sqlite"
    for missing in SECRETS:
        with pytest.raises(KeyError, match=missing):
            load(env={"STREAMLIFT_PROFILE": "at-scale", **{k: v for k, v in SECRETS.items() if k != missing}})
    with pytest.raises(FileNotFoundError):
        load(env={"STREAMLIFT_PROFILE": "no-such-profile"})


def test_profile_is_found_beside_the_configuration_file(tmp_path):
    """As in the image: STREAMLIFT_CONFIG=/opt/streamlift/streamlift.yaml, docker/ beside it."""
    (tmp_path / "docker").mkdir()
    (tmp_path / "streamlift.yaml").write_text((ROOT / "streamlift.yaml").read_text())
    (tmp_path / "docker" / "at-scale.yaml").write_text("feast: {online_store: redis}\n")
    cfg = load(env={"STREAMLIFT_CONFIG": str(tmp_path / "streamlift.yaml"), "STREAMLIFT_PROFILE": "at-scale"})
    assert cfg.feast["online_store"] == "redis" and cfg.feast["repo"] == "feature_repo"


def test_at_scale_profile_has_no_literal_secrets_and_compose_provides_its_variables(compose):
    raw = yaml.safe_load(PROFILE.read_text())
    for path, value in _walk(raw):
        if SECRET_NAME.search(path.rsplit(".", 1)[-1]):
            assert _is_reference(value), f"{path} = {value!r}"
    for path, value in _walk(raw):      # inside URLs: the password part is a reference too
        if isinstance(value, str) and "://" in value and "@" in value:
            assert re.search(r"://\$\{\w+\}:\$\{\w+\}@", value), path
    env = compose["x-streamlift-env"]
    refs = [m for _, v in _walk(raw) if isinstance(v, str) for m in REF.finditer(v)]
    required = {m.group(1) for m in refs if not m.group(2)}
    assert required == set(SECRETS) and required <= set(env)
    assert env["STREAMLIFT_PROFILE"] == "at-scale"
    assert env["STREAMLIFT_CONFIG"] == "/opt/streamlift/streamlift.yaml"   # the image's copy
    for name in ("jobmanager", "taskmanager", "submit"):
        assert compose["services"][name]["environment"]["STREAMLIFT_PROFILE"] == "at-scale"


def test_cluster_checkpoints_go_to_the_profiles_bucket(compose):
    props = _flink_properties(compose["x-streamlift-env"])
    assert props["state.checkpoints.dir"] == raw_profile()["flink"]["checkpoints_dir"]
    assert props["state.checkpoints.dir"].startswith("s3://")
    assert props["python.executable"] == "/opt/venv/bin/python"
    assert props["jobmanager.rpc.address"] == "jobmanager"
    assert props["execution.checkpointing.mode"] == "EXACTLY_ONCE"


def raw_profile() -> dict:
    return yaml.safe_load(PROFILE.read_text())


# ------------------------------------------------------------------------------------ Kafka
def test_the_image_takes_the_kafka_connector_pinned_in_kafka_pom():
    text = DOCKERFILE.read_text()
    assert "COPY kafka/pom.xml" in text and "-DincludeArtifactIds=flink-sql-connector-kafka" in text
    assert "COPY --from=jvm-deps /build/connectors/ /opt/flink/lib/" in text
    assert "STREAMLIFT_KAFKA__CONNECTOR_JAR=/opt/flink/lib/flink-sql-connector-kafka.jar" in text
    pom = (ROOT / "kafka" / "pom.xml").read_text()
    assert re.search(r"<flink.kafka.connector.version>[0-9.]+-[0-9.]+</flink.kafka.connector.version>", pom)
    assert "KAFKA_CONNECTOR_URL" not in (DOCKER / "compose.yaml").read_text() + text
