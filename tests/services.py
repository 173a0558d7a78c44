"""Real servers for the tests, each started on a free port in a temporary folder and stopped at the
end: Redis (Debian's ``redis-server``), PostgreSQL (Debian's ``postgresql``: initdb + pg_ctl; as root, run as the ``postgres`` user,
which PostgreSQL requires) and an S3 API server (``moto_server`` from ``moto[server]``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

__all__ = ["free_port", "redis_server", "postgres_server", "s3_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_server(work: Path, password: str | None = None):
    """Debian's redis-server on a free port (no persistence, ``password`` if given); yields
    ``("127.0.0.1:<port>", client)``."""
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: `make redis` installs Debian's redis-server "
                           "(make test does it first)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(work), *(["--requirepass", password] if password else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=password)
        deadline = time.time() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield f"127.0.0.1:{port}", client
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _pg_bin(name: str) -> str:
    exe = shutil.which(name)
    if exe:
        return exe
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: `make postgres` installs Debian's postgresql "
                           "(make test does it first)")
    return str(found[-1])


@contextmanager
def postgres_server(work: Path, db: str = "streamlift", user: str = "streamlift", password: str = "pg-test-secret"):
    """A PostgreSQL server on a free port; yields its SQLAlchemy URL (postgresql+psycopg2) and
    the parts (host, port, db, user, password)."""
    as_root = os.geteuid() == 0
    if as_root:
        # postgres refuses to run as root: the server runs as the postgres user, in a folder of
        # its own under /tmp (pytest's folders under /tmp/pytest-of-root are closed to it)
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="streamlift-pg-"))
        shutil.chown(work, "postgres")
    work = Path(work)
    data, sock = work / "pgdata", work / "pgsock"
    sock.mkdir(parents=True, exist_ok=True)
    if as_root:
        shutil.chown(sock, "postgres")
    run = (lambda cmd: ["runuser", "-u", "postgres", "--", *cmd]) if as_root else (lambda cmd: cmd)
    pwfile = work / "pw"
    pwfile.write_text(password + "\n")
    if as_root:
        shutil.chown(pwfile, "postgres")
    def check(cmd):
        r = subprocess.run(run(cmd), capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")

    check([_pg_bin("initdb"), "-D", str(data), "-U", user, "--pwfile", str(pwfile),
           "--auth", "scram-sha-256", "-E", "UTF8"])
    port = free_port()
    check([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(work / "pg.log"), "-w", "-t", "60",
           "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"])
    try:
        import psycopg2

        deadline = time.time() + 30
        while True:
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=port, user=user, password=password, dbname="postgres")
                break
            except psycopg2.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        conn.autocommit = True
        conn.cursor().execute(f"CREATE DATABASE {db}")
        conn.close()
        url = f"postgresql+psycopg2://{user}:{password}@127.0.0.1:{port}/{db}"
        yield url, {"host": "127.0.0.1", "port": port, "db": db, "user": user, "password": password}
    finally:
        subprocess.run(run([_pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True)
        if as_root:
            shutil.rmtree(work, ignore_errors=True)


@contextmanager
def s3_server(work: Path, buckets=(), access_key: str = "test-access", secret_key: str = "test-secret"):
    """moto's S3 API server on a free port with ``buckets`` created; yields its endpoint URL and
    the credentials."""
    port = free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    log = open(Path(work) / "moto.log", "wb")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key,
                          aws_secret_access_key=secret_key, region_name="us-east-1")
        deadline = time.time() + 30
        while True:
            try:
                s3.list_buckets()
                break
            except Exception:                      # noqa: BLE001 - not listening yet
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        for b in buckets:
            s3.create_bucket(Bucket=b)
        yield endpoint, {"access_key": access_key, "secret_key": secret_key, "client": s3}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
