import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def small_sim(tmp_path_factory):
    """A small simulated stream (about 30k lines in 10 slices), shared by the tests."""
    from jobs.simulate import simulate

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


def announce(sim_dir, manifest_file):
    """Announce one manifest file atomically, as a producer does."""
    import os
    import shutil

    tmp = Path(sim_dir) / "manifest" / ("." + manifest_file.name)
    shutil.copy(manifest_file, tmp)
    os.rename(tmp, tmp.with_name(manifest_file.name))


def wait_for(cond, timeout=120):
    """Poll ``cond`` until it returns something truthy; that value, or AssertionError on timeout."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError("timed out")


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
