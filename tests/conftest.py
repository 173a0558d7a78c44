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


def manifest_lines(sim_dir):
    return [line for m in sorted((Path(sim_dir) / "manifest").glob("slices-*.jsonl"))
            for line in m.read_text().splitlines() if line]


def read_slices(sim_dir):
    from udfs.ingest import read_slice

    return [read_slice(line) for line in manifest_lines(sim_dir)]
