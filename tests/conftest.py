import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# the outcomes job's last step (the Great Expectations suites, ~10 s a run) is run by the tests
# that are about it (test_dq.py, test_outcomes_job.py), not after every outcomes run of the suite
import os  # noqa: E402

os.environ.setdefault("STREAMLIFT_OUTCOMES__DATA_QUALITY", "false")


@pytest.fixture(scope="session")
def small_sim(tmp_path_factory):
    """A small simulated stream (about 30k lines in 10 slices), shared by the tests."""
    from tools.simulate import simulate

    out = tmp_path_factory.mktemp("sim")
    simulate(out, events=30_000, users=2_000, campaigns=6, days=2.0, slice_lines=3_000, seed=11)
    return out


def read_slices(sim_dir):
    from udfs.ingest import manifest_lines, read_slice

    return [read_slice(line) for line in manifest_lines(sim_dir)]


def hold_manifests(sim_dir, held):
    """Move the simulator's manifest files aside: the stream starts with nothing announced."""
    import shutil

    shutil.move(str(Path(sim_dir) / "manifest"), held)
    (Path(sim_dir) / "manifest").mkdir()
    return sorted(Path(held).glob("slices-*.jsonl"))


def announce(folder, file):
    """Announce ``file`` in the monitored ``folder`` atomically, as a producer does (a hidden
    copy renamed into place)."""
    import os
    import shutil

    tmp = Path(folder) / ("." + file.name)
    shutil.copy(file, tmp)
    os.rename(tmp, tmp.with_name(file.name))


def crash_and_restart(args, data, checkpoints, first, rest, folder, ready, done, env=None,
                      timeout=120, settle=2.0, after_kill=None):
    """A ``--follow`` job (``python -m <args...>``, output under ``data``) is handed the files
    ``first`` (announced in ``folder``); once ``ready()`` holds and a checkpoint newer than the
    one at that point is complete under ``data/checkpoints``, it is killed (SIGKILL); ``rest``
    are announced and the job restarts from the newest retained checkpoint until ``done()``
    (then ``settle`` seconds for anything more to come). Returns ``after_kill()``, called
    between the two runs."""
    import os
    import signal
    import subprocess
    import time

    def start(*extra):
        return subprocess.Popen([sys.executable, "-m", *args, "--follow", *extra], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(proc, sig):
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    for f in first:
        announce(folder, f)
    proc = start()
    try:
        wait_for(ready)
        wait_for_newer_checkpoint(data, checkpoints)
    finally:
        stop(proc, signal.SIGKILL)                                    # crash
    seen = after_kill() if after_kill else None
    checkpoint = completed_checkpoints(data, checkpoints)[-1]
    for f in rest:
        announce(folder, f)
    proc = start("--from-checkpoint", str(checkpoint))
    try:
        wait_for(done, timeout=timeout)
        time.sleep(settle)
    finally:
        stop(proc, signal.SIGTERM)
    return seen


def wait_for(cond, timeout=120, what="timed out", every=0.5):
    """Poll ``cond`` every ``every`` s until it returns something truthy; that value, or
    AssertionError(``what``) on timeout."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(what)


def completed_checkpoints(data, folder="checkpoints"):
    """Completed checkpoint directories of the job(s) under ``<data>/<folder>``, oldest first."""
    return [p.parent for p in sorted(Path(data).glob(f"{folder}/*/chk-*/_metadata"),
                                     key=lambda p: int(p.parent.name[4:]))]


def wait_for_newer_checkpoint(data, folder="checkpoints", timeout=90):
    """Wait for a checkpoint newer than the newest one now; return its directory. Flink retains
    only the newest checkpoint, so a count of them says nothing: compare their numbers."""
    def newest():
        chk = completed_checkpoints(data, folder)
        return int(chk[-1].name[4:]) if chk else -1

    k = newest()
    wait_for(lambda: newest() > k, timeout=timeout)
    return completed_checkpoints(data, folder)[-1]


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """One Kafka broker (KRaft, from the jars ``make kafka-jars`` fetched) for the whole test run,
    on a free port; tests keep apart by topic prefix (:func:`kafka_cfg`). Yields bootstrap servers."""
    from tools.broker import start, stop

    broker = start(tmp_path_factory.mktemp("kafka"))
    try:
        yield broker.bootstrap
    finally:
        stop(broker)


def kafka_env(bootstrap: str, prefix: str, data_dir, **extra) -> dict:
    """The configuration overrides of a run on the test broker under its own topic prefix."""
    env = {"STREAMLIFT_PATHS__DATA_DIR": str(data_dir), "STREAMLIFT_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
           "STREAMLIFT_KAFKA__TOPIC_PREFIX": prefix}
    env.update({f"STREAMLIFT_{k.upper()}": str(v) for k, v in extra.items()})
    return env
