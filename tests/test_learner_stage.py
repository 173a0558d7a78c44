"""The learner as a SliceStage (udfs/learner_stage.py), no JVM: its write-ahead log keeps the
hand-off lines only, and a restore from its state midway continues exactly like an uninterrupted
run (the same snapshots, the same model digest)."""

import pickle

import pytest


@pytest.fixture(scope="module")
def handoff(small_sim, tmp_path_factory):
    """The features pipeline in process over the shared small simulation, its hand-off written."""
    from conftest import read_slices
    from jobs.config import load
    from jobs.sinks import write_slice_files
    from udfs.features import FeatureEngine
    from udfs.ingest import handoff_lines

    data = tmp_path_factory.mktemp("handoff")
    cfg = load(env={"STREAMLIFT_PATHS__DATA_DIR": str(data)})
    eng = FeatureEngine(**cfg.engine_params())
    for s in read_slices(small_sim):
        for o in eng.offer(s.seq, s.batches, s.lines, s.quarantined):
            write_slice_files(cfg, o)
    for o in eng.flush():
        write_slice_files(cfg, o)
    return cfg, handoff_lines(data)


def _params(cfg):
    from udfs.spec import FeatureSpec

    return {"learner_params": {**cfg.learner_params(), "spec": FeatureSpec.from_config(cfg),
                               "snapshot_every": "2h"}, "snapshot_every": 3}


def _offer(stage, line):
    from udfs.ingest import read_handoff
    from udfs.learner_stage import HandoffRef

    s = read_handoff(line)
    return stage.offer(s.seq, 0, HandoffRef(line, s))


def test_restore_midway_continues_like_an_uninterrupted_run(handoff):
    from udfs.learner_stage import LearnerStage

    cfg, lines = handoff
    full = LearnerStage(**_params(cfg))
    items = [i for line in lines for i in _offer(full, line)] + full.flush()
    snaps = [i[1] for i in items if i[0] == "snapshot"]
    assert len(snaps) >= 3

    stage, state = LearnerStage(**_params(cfg)), {}
    half = len(lines) // 2 + 1                      # not on a state boundary (every 3 slices)
    first = []
    for line in lines[:half]:
        first += _offer(stage, line)
        for k, v in stage.state_delta().items():
            state.pop(k, None) if v is None else state.__setitem__(k, v)
    logs = [k for k in state if k.startswith("log:")]
    assert logs and any(k.startswith("part:block:") for k in state)
    assert all(len(state[k]) < 2000 for k in logs)          # the log holds lines, not slices
    restored = LearnerStage.restore(state, **_params(cfg))
    assert restored.next_seq == half
    rest = [i for line in lines[half:] for i in _offer(restored, line)] + restored.flush()
    got = [i[1] for i in first + rest if i[0] == "snapshot"]
    assert [s.version for s in got] == [s.version for s in snaps]
    assert [pickle.loads(s.bundle).digest() for s in got] == [pickle.loads(s.bundle).digest() for s in snaps]
    assert restored.learner.state_digest() == full.learner.state_digest()
    assert pickle.loads(pickle.dumps(restored)).learner.state_digest() == full.learner.state_digest()
