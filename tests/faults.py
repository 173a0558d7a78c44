"""Fault injection on the standalone cluster: SIGKILL of a TaskManager at random moments of a
running job, a replacement TaskManager started at once, Flink's own failover (restart strategy,
latest completed checkpoint) left to recover. Seeded: a failing seed replays the same delays.

A kill lands wherever the job is at that moment: between an output written and the checkpoint
that covers it, inside a write-ahead-log step of a stage's state, in a Feast or Iceberg write.
The checkpoint interval is 1 s so that completed checkpoints and writes interleave densely."""

from __future__ import annotations

import os
import random
import signal
import time

from conftest import wait_for

#: cluster settings for fault runs: a killed TaskManager is noticed within seconds
FAULT_CONF = {"heartbeat.interval": 1000, "heartbeat.timeout": 10000}
#: job settings for fault runs: checkpoints every second, enough restarts for every kill
FAULT_OPTS = ["-Dexecution.checkpointing.interval=1s", "-Dexecution.checkpointing.unaligned.enabled=true",
              "-Drestart-strategy.exponential-delay.attempts-before-reset-backoff=50",
              "-Drestart-strategy.exponential-delay.initial-backoff=500ms",
              "-Drestart-strategy.exponential-delay.max-backoff=2s"]


def _wait(cond, timeout, what):
    return wait_for(cond, timeout, what, every=0.2)


def run_with_kills(cluster, job: str, input_dir, data_dir, kills: int = 5, seed: int = 0,
                   parallelism: int = 2, slots: int = 4, max_delay: float = 4.0, timeout: float = 600,
                   extra: list | None = None) -> dict:
    """Submit ``job`` and SIGKILL a random TaskManager (on a one-TaskManager cluster: the one that
    runs the job) until ``kills`` kills made the job restart, each a random delay in
    [0.2, ``max_delay``] s after the job is running again, the last one 0–0.3 s after the first
    checkpoint completed since the restore (so a mid-run checkpoint is restored however loaded
    the machine is); a new TaskManager replaces each. The log gives, per kill, the
    checkpoints completed by then. Returns the kills' log and the exit."""
    rng = random.Random(seed)
    name = f"streamlift-{job}"
    proc = cluster.submit(job, input_dir and str(input_dir), str(data_dir), parallelism=parallelism,
                          flink_opts=FAULT_OPTS, wait=False, extra=extra)
    log = []
    try:
        st = _wait(lambda: (s := cluster.job_status(name)) and s["state"] == "RUNNING" and s, 120, "job start")
        jid = st["jid"]
        attempt, last_kill_ms = 0, 0
        while sum(k["restarted"] for k in log) < kills and attempt < 3 * kills:
            i, attempt = attempt, attempt + 1
            # running again after the previous kill: every task redeployed since (INITIALIZING: restoring
            # its state and the in-flight data of an unaligned checkpoint, which it processes then)
            st = _wait(lambda: (s := cluster.job_status(name)) and s["jid"] == jid and (
                s["state"] in ("FINISHED", "FAILED") or (
                    s["vertices"] and all(v in ("RUNNING", "INITIALIZING", "FINISHED") for v in s["vertices"])
                    and s["state"] == "RUNNING" and (s["started_ms"] or 0) > last_kill_ms)) and s,
                180, f"job running again before kill {i}")
            if st["state"] != "RUNNING":
                break
            waited = sum(k["restarted"] for k in log) == kills - 1
            if waited:
                # the last kill waits for a checkpoint completed since the restore, and comes right
                # after it: a restore from a mid-run checkpoint is exercised whatever the load
                ck = st["checkpoints"]
                st = _wait(lambda: (s := cluster.job_status(name)) and (
                    s["checkpoints"] > ck or s["state"] != "RUNNING") and s, 180, f"checkpoint before kill {i}")
                if st["state"] != "RUNNING":
                    break
                delay = rng.uniform(0.0, 0.3)
            else:
                delay = rng.uniform(0.2, max_delay)
            time.sleep(delay)
            st = cluster.job_status(name)
            if st["state"] != "RUNNING":
                break
            victim = rng.choice(cluster.taskmanager_pids())
            last_kill_ms = int(time.time() * 1000)
            os.kill(victim, signal.SIGKILL)
            cluster.start_taskmanager(slots, FAULT_CONF)
            after = _wait(lambda: (s := cluster.job_status(name)) and (
                s["restarts"] > st["restarts"] or s["state"] in ("FINISHED", "FAILED")) and s,
                120, f"restart after kill {i}")
            # a kill after the last task finished (the job only committing) restarts nothing
            log.append({"kill": i, "delay_s": round(delay, 2), "pid": victim, "checkpoints": st["checkpoints"],
                        "after_checkpoint": waited, "restarted": after["restarts"] > st["restarts"]})
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        raise
    final = cluster.job_status(name)
    return {"returncode": proc.returncode, "kills": log, "state": final["state"], "restarts": final["restarts"],
            "stderr": err[-3000:], "stdout": out[-2000:]}
