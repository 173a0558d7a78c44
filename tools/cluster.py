"""A real standalone Flink cluster from the apache-flink pip distribution, and job submission.

    python -m tools.cluster up        # bin/start-cluster.sh with FLINK_CONF_DIR=flink-conf/cluster
    python -m tools.cluster submit --job features --input data/sim --data-dir /abs/path
    python -m tools.cluster down      # bin/stop-cluster.sh

Submission is ``bin/flink run -py jobs/<job>.py -pyfs schemas,udfs,jobs,stores,serving -pyexec <venv python>``:
the same job file as the local run, only the configuration differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from jobs.config import ROOT
from jobs.flink_env import python_files

__all__ = ["flink_home", "up", "down", "submit", "rest_ready", "start_taskmanager", "taskmanager_pids",
           "job_status"]

REST = "http://localhost:8081"


def flink_home() -> Path:
    import pyflink

    return Path(pyflink.__file__).resolve().parent


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _env(slots: int | None = None, conf_overrides: dict | None = None) -> dict:
    env = dict(os.environ)
    home = flink_home()
    conf = Path("/tmp/streamlift-cluster/conf")
    # the distribution's scripts also want log4j files beside config.yaml
    conf.mkdir(parents=True, exist_ok=True)
    for f in (home / "conf").iterdir():
        if f.is_file() and f.name != "config.yaml":
            shutil.copy(f, conf / f.name)
    # the distribution's defaults (JVM --add-opens for Java 17, ...) overlaid with ours
    merged = _flatten(yaml.safe_load((home / "conf" / "config.yaml").read_text()))
    merged.update(_flatten(yaml.safe_load((ROOT / "flink-conf" / "cluster" / "config.yaml").read_text())))
    if slots is not None:
        merged["taskmanager.numberOfTaskSlots"] = int(slots)
    merged.update(conf_overrides or {})
    (conf / "config.yaml").write_text(yaml.safe_dump(merged, default_flow_style=False))
    log_dir = Path("/tmp/streamlift-cluster/log")
    log_dir.mkdir(parents=True, exist_ok=True)
    env.update(FLINK_HOME=str(home), FLINK_CONF_DIR=str(conf), FLINK_LOG_DIR=str(log_dir))
    return env


def rest_ready(timeout: float = 0) -> dict | None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(REST + "/overview", timeout=2) as r:
                ov = json.load(r)
                if ov.get("taskmanagers", 0) >= 1:
                    return ov
        except OSError:
            pass
        if time.time() >= deadline:
            return None
        time.sleep(1)


def up(timeout: float = 90, taskmanagers: int = 1, slots: int | None = None,
       conf: dict | None = None) -> dict:
    """Start a JobManager and ``taskmanagers`` TaskManagers (``slots`` task slots each, default
    from flink-conf/cluster; ``conf``: more cluster settings); returns the REST overview once
    every TaskManager registered."""
    home = flink_home()
    for script in home.glob("bin/*.sh"):
        script.chmod(script.stat().st_mode | 0o111)
    env = _env(slots, conf)
    subprocess.run(["bash", str(home / "bin" / "start-cluster.sh")], env=env, check=True)
    for _ in range(taskmanagers - 1):
        subprocess.run(["bash", str(home / "bin" / "taskmanager.sh"), "start"], env=env, check=True)
    deadline = time.time() + timeout
    while True:
        ov = rest_ready(max(0.0, deadline - time.time()))
        # a TaskManager is counted before its slots are: wait for both
        if ov is not None and ov.get("taskmanagers", 0) >= taskmanagers and \
                ov.get("slots-total", 0) >= taskmanagers * (slots or 1):
            return ov
        if time.time() >= deadline:
            raise RuntimeError(f"Flink cluster did not come up with {taskmanagers} TaskManagers within "
                               f"{timeout}s; logs in /tmp/streamlift-cluster/log")
        time.sleep(1)


def start_taskmanager(slots: int | None = None, conf: dict | None = None) -> None:
    """One more TaskManager (``bin/taskmanager.sh start``), e.g. to replace a killed one."""
    subprocess.run(["bash", str(flink_home() / "bin" / "taskmanager.sh"), "start"], env=_env(slots, conf),
                   check=True, capture_output=True)


def taskmanager_pids() -> list[int]:
    """Process ids of this machine's TaskManager JVMs."""
    r = subprocess.run(["pgrep", "-f", "org.apache.flink.runtime.taskexecutor.TaskManagerRunner"],
                       capture_output=True, text=True)
    return sorted(int(x) for x in r.stdout.split())


def _get(path: str):
    with urllib.request.urlopen(REST + path, timeout=5) as r:
        return json.load(r)


def job_status(name: str) -> dict | None:
    """The newest job called ``name``: its id, state, restarts, completed checkpoints, vertices'
    states and when the last of them (re)started (ms), or None."""
    jobs = [j for j in _get("/jobs/overview")["jobs"] if j["name"] == name]
    if not jobs:
        return None
    j = max(jobs, key=lambda j: j["start-time"])
    d = _get(f"/jobs/{j['jid']}")
    restarts = 0
    try:
        m = _get(f"/jobs/{j['jid']}/metrics?get=numRestarts")
        restarts = int(float(m[0]["value"])) if m else 0
    except (OSError, ValueError, KeyError, IndexError):
        pass
    ck = {}
    try:
        ck = _get(f"/jobs/{j['jid']}/checkpoints")["counts"]
    except (OSError, KeyError):
        pass
    starts = [v.get("start-time", -1) for v in d["vertices"]]
    return {"jid": j["jid"], "state": d["state"], "restarts": restarts, "checkpoints": ck.get("completed", 0),
            "vertices": [v["status"] for v in d["vertices"]],
            "started_ms": min(starts) if starts and min(starts) > 0 else None}


def job_metrics(name: str, group: str = "streamlift", agg: str = "sum") -> dict:
    """The jobs' own metrics (:class:`jobs.flink_env.JobMetrics`) of the newest job called ``name``,
    through the REST API: {operator: {metric: value}}, the value over the operator's subtasks
    their ``agg`` ("sum" for counters, "max" for gauges such as the last slice, or "list"); a
    counter per reason is ``reason.<reason>.<metric>``."""
    st = job_status(name)
    if st is None:
        return {}
    jid = st["jid"]
    out: dict = {}
    for v in _get(f"/jobs/{jid}")["vertices"]:
        ids = [m["id"] for m in _get(f"/jobs/{jid}/vertices/{v['id']}/metrics")]
        ours = [i for i in ids if f".{group}." in i]
        for k in range(0, len(ours), 40):                 # ?get= takes a list; keep URLs short
            chunk = ours[k:k + 40]
            q = urllib.parse.quote(",".join(chunk), safe=",")
            for m in _get(f"/jobs/{jid}/vertices/{v['id']}/metrics?get={q}"):
                # "<subtask>.<task (Flink's chain)>.streamlift.<operator>.<metric>"
                operator, metric = m["id"].split(f".{group}.", 1)[1].split(".", 1)
                try:
                    value = float(m["value"])
                except (TypeError, ValueError):
                    continue
                out.setdefault(operator, {}).setdefault(metric, []).append(value)
    fold = {"sum": sum, "max": max, "list": sorted}[agg]
    return {op: {k: fold(v) for k, v in ms.items()} for op, ms in out.items()}


def source_offsets(name: str) -> dict[str, int]:
    """``topic:partition`` -> the next offset the Kafka source of the newest job called ``name``
    reads (the connector's ``currentOffset`` gauge + 1), through the REST API."""
    st = job_status(name)
    if st is None:
        return {}
    jid, out = st["jid"], {}
    for v in _get(f"/jobs/{jid}")["vertices"]:
        ids = [m["id"] for m in _get(f"/jobs/{jid}/vertices/{v['id']}/metrics")
               if m["id"].endswith(".currentOffset") and ".KafkaSourceReader.topic." in m["id"]]
        for k in range(0, len(ids), 40):
            q = urllib.parse.quote(",".join(ids[k:k + 40]), safe=",")
            for m in _get(f"/jobs/{jid}/vertices/{v['id']}/metrics?get={q}"):
                # "<subtask>.<task>.KafkaSourceReader.topic.<topic>.partition.<p>.currentOffset"
                rest = m["id"].split(".KafkaSourceReader.topic.", 1)[1].rsplit(".currentOffset", 1)[0]
                topic, part = rest.rsplit(".partition.", 1)
                try:
                    pos = int(float(m["value"])) + 1
                except (TypeError, ValueError):
                    continue
                if pos > 0:
                    key = f"{topic}:{part}"
                    out[key] = max(out.get(key, 0), pos)
    return dict(sorted(out.items()))


def kafka_lag(name: str, bootstrap: str | None = None) -> dict:
    """Consumer lag per partition of the features job: the broker's end offset minus the next
    offset the job reads (a partition it has not read from yet: its whole content)."""
    from jobs.config import load
    from jobs.kafka import offsets

    cfg = load()
    held = offsets(cfg, bootstrap)
    # Flink's metric names replace the dots of a topic's name
    reported = source_offsets(name)
    pos = {tp: reported[tp.replace(".", "_")] for tp in held if tp.replace(".", "_") in reported}
    lag = {tp: high - max(pos.get(tp, low), low) for tp, (low, high) in held.items()}
    return {"lag": lag, "lag_total": sum(lag.values()), "position": pos,
            "end_offsets": {tp: high for tp, (_, high) in held.items()}}


def cancel(name: str) -> None:
    """Cancel the newest running job called ``name`` (REST ``PATCH /jobs/<id>``)."""
    st = job_status(name)
    if st is None or st["state"] in ("FINISHED", "CANCELED", "FAILED"):
        return
    req = urllib.request.Request(f"{REST}/jobs/{st['jid']}?mode=cancel", method="PATCH")
    urllib.request.urlopen(req, timeout=5).close()


def down() -> None:
    home = flink_home()
    env = _env()
    subprocess.run(["bash", str(home / "bin" / "taskmanager.sh"), "stop-all"], env=env, check=False)
    subprocess.run(["bash", str(home / "bin" / "stop-cluster.sh")], env=env, check=False)


def submit(job: str, input_dir: str | None, data_dir: str, extra: list[str] | None = None,
           parallelism: int | None = None, flink_opts: list[str] | None = None, wait: bool = True):
    """``flink run [-p parallelism] [flink_opts] -py jobs/<job>.py``; waits for a bounded job to
    finish (a CompletedProcess), or with ``wait=False`` returns the running ``flink run``
    (a Popen, output to pipes). Without ``input_dir`` the features job reads Kafka (``extra``:
    ``--bootstrap-servers``, ``--until``; the connector jar ships with the job)."""
    home = flink_home()
    env = _env()
    env["STREAMLIFT_ON_CLUSTER"] = "1"
    env["STREAMLIFT_PATHS__DATA_DIR"] = str(Path(data_dir).resolve())
    cmd = ["bash", str(home / "bin" / "flink"), "run", *(["-p", str(parallelism)] if parallelism else []),
           *(flink_opts or []),
           "-py", str(ROOT / "jobs" / f"{job}.py"),
           "-pyfs", python_files(),
           "-pyexec", sys.executable, "-pyclientexec", sys.executable,
           *(["--input", str(Path(input_dir).resolve())] if input_dir else []),
           "--data-dir", str(Path(data_dir).resolve()),
           *(extra or [])]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)


def main(argv=None) -> None:
    from jobs.config import quiet_third_party_warnings

    quiet_third_party_warnings()
    p = argparse.ArgumentParser(description="standalone Flink cluster")
    p.add_argument("action", choices=["up", "down", "submit", "status", "metrics"])
    p.add_argument("--job", default="features")
    p.add_argument("--input")
    p.add_argument("--data-dir")
    p.add_argument("--taskmanagers", type=int, default=1, help="TaskManagers to start (up)")
    p.add_argument("--slots", type=int, help="task slots per TaskManager (up; default flink-conf/cluster)")
    p.add_argument("-p", "--parallelism", type=int, help="job parallelism (submit; default parallelism.default)")
    p.add_argument("--bootstrap-servers", help="submit features without --input: read Kafka here "
                   "(default kafka.bootstrap_servers); metrics: the consumer lag against this broker")
    p.add_argument("--until", choices=["latest", "never"], help="submit on Kafka: stop at the offsets "
                   "current at start (latest) or never")
    a = p.parse_args(argv)
    if a.action == "up":
        print(json.dumps(up(taskmanagers=a.taskmanagers, slots=a.slots)))
    elif a.action == "down":
        down()
    elif a.action == "metrics":         # the job's own metrics, as the web UI shows them
        out = job_metrics(f"streamlift-{a.job}")
        if a.job == "features":
            try:
                out["kafka"] = kafka_lag(f"streamlift-{a.job}", a.bootstrap_servers)
            except Exception as e:       # a file-source run, or no broker: say so, keep the rest
                out["kafka"] = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out, indent=2))
    elif a.action == "status":
        print(json.dumps(rest_ready()))
    else:
        extra = []
        if not a.input:
            extra = [*(["--bootstrap-servers", a.bootstrap_servers] if a.bootstrap_servers else []),
                     "--until", a.until or "never"]
        r = submit(a.job, a.input, a.data_dir, extra=extra, parallelism=a.parallelism)
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr[-5000:])
        sys.exit(r.returncode)


if __name__ == "__main__":
    main()
