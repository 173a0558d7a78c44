"""A local Apache Kafka broker in KRaft mode (one JVM: broker + controller), for development,
the demo and the tests; its jars are fetched from Maven Central by ``make kafka-jars``
(``kafka/pom.xml`` pins the versions).

::

    python -m tools.broker up [--port 9092] [--dir data/kafka]    # format storage once, start, wait
    python -m tools.broker down [--dir data/kafka]
    python -m tools.broker status [--dir data/kafka]

:func:`start` is what the tests use (a free port, a temporary folder). Production brokers are
the platform's; nothing in the jobs depends on this module.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from jobs.config import ROOT

__all__ = ["BROKER_LIBS", "CONNECTOR_DIR", "Broker", "start", "stop", "free_port", "jars_present"]

#: where ``make kafka-jars`` copies the broker's classpath and the Flink connector jar
BROKER_LIBS = ROOT / ".jvm" / "kafka-broker"
CONNECTOR_DIR = ROOT / ".jvm" / "connectors"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jars_present() -> bool:
    return BROKER_LIBS.is_dir() and any(BROKER_LIBS.glob("kafka_2.13-*.jar"))


@dataclass
class Broker:
    bootstrap: str          # host:port of the PLAINTEXT listener
    folder: Path            # config, storage, log
    pid: int

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
            return True
        except OSError:
            return False


def _properties(folder: Path, port: int, controller_port: int, extra: dict | None = None) -> str:
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(folder / "logs"),
        "num.partitions": "2",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        "log.retention.hours": "-1",            # a development broker keeps everything
        "message.max.bytes": str(2 * 1024 * 1024),
        **(extra or {}),
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _java_cmd(*args: str, heap: str = "512m") -> list[str]:
    return ["java", f"-Xmx{heap}", "-Xms128m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn", "-cp", f"{BROKER_LIBS}/*", *args]


def start(folder: Path, port: int | None = None, timeout: float = 60.0, extra: dict | None = None) -> Broker:
    """Format ``folder`` (first time only) and start a broker on ``port`` (a free one by default);
    returns once it answers a metadata request. Fails with the broker's log if it does not."""
    if not jars_present():
        raise RuntimeError(f"the Kafka broker's jars are not in {BROKER_LIBS}: run `make kafka-jars` "
                           "(fetches them from Maven Central)")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    ports = folder / "ports"
    if ports.exists():                 # a restart: the same listeners (clients and the quorum know them)
        old_port, old_controller = (int(x) for x in ports.read_text().split())
        port, controller = port or old_port, old_controller
    else:
        port, controller = port or free_port(), free_port()
    ports.write_text(f"{port} {controller}")
    conf = folder / "server.properties"
    conf.write_text(_properties(folder, port, controller, extra))
    if not (folder / "logs" / "meta.properties").exists():
        cluster_id = folder / "cluster.id"
        if not cluster_id.exists():
            import base64

            cluster_id.write_text(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))
        r = subprocess.run(_java_cmd("kafka.tools.StorageTool", "format", "-t", cluster_id.read_text().strip(),
                                     "-c", str(conf), "--ignore-formatted"), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"formatting Kafka storage failed:\n{r.stdout}\n{r.stderr}")
    log = open(folder / "broker.log", "ab")
    proc = subprocess.Popen(_java_cmd("kafka.Kafka", str(conf), heap="1g"), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    (folder / "broker.pid").write_text(str(proc.pid))
    (folder / "bootstrap").write_text(f"127.0.0.1:{port}")
    broker = Broker(f"127.0.0.1:{port}", folder, proc.pid)
    deadline = time.time() + timeout
    from confluent_kafka.admin import AdminClient

    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the Kafka broker exited ({proc.returncode}):\n"
                               + (folder / "broker.log").read_text()[-3000:])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            md = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 0}).list_topics(timeout=5)
            if md.brokers:
                return broker
        except (OSError, Exception):              # noqa: BLE001 - not up yet
            pass
        if time.time() > deadline:
            stop(broker)
            raise RuntimeError(f"the Kafka broker did not answer within {timeout:.0f} s:\n"
                               + (folder / "broker.log").read_text()[-3000:])
        time.sleep(0.3)


def stop(broker: Broker | None = None, folder: Path | None = None, timeout: float = 30.0) -> None:
    """Stop the broker (SIGTERM: a controlled shutdown, then SIGKILL after ``timeout``)."""
    if broker is None:
        pid_file = Path(folder) / "broker.pid"
        if not pid_file.exists():
            return
        broker = Broker((Path(folder) / "bootstrap").read_text(), Path(folder), int(pid_file.read_text()))
    if not broker.alive():
        return
    try:
        os.killpg(broker.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while broker.alive() and time.time() < deadline:
        try:
            os.waitpid(broker.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    if broker.alive():
        os.killpg(broker.pid, signal.SIGKILL)
    (broker.folder / "broker.pid").unlink(missing_ok=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="a local Kafka broker (KRaft, one process)")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--dir", default=str(ROOT / "data" / "kafka"), help="config, storage and log folder")
    p.add_argument("--port", type=int, default=int(os.environ.get("KAFKA_PORT", 9092)))
    a = p.parse_args(argv)
    folder = Path(a.dir)
    if a.action == "up":
        pid = folder / "broker.pid"
        if pid.exists() and Broker("", folder, int(pid.read_text())).alive():
            print(f"already running: {(folder / 'bootstrap').read_text()} (pid {pid.read_text()})")
            return
        b = start(folder, a.port)
        print(f"Kafka broker up: bootstrap.servers={b.bootstrap} (pid {b.pid}, log {folder / 'broker.log'})")
    elif a.action == "down":
        stop(folder=folder)
        print("Kafka broker stopped")
    else:
        pid = folder / "broker.pid"
        up = pid.exists() and Broker("", folder, int(pid.read_text())).alive()
        print(f"{'up' if up else 'down'}" + (f": {(folder / 'bootstrap').read_text()}" if up else ""))
        sys.exit(0 if up else 1)


if __name__ == "__main__":
    main()
