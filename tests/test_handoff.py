"""The hand-off record (udfs/handoff.py) without a JVM: a slice read from its record equals the
slice read from the files the features job writes, for every slice of a simulated stream."""

import pandas as pd
import pytest


def test_a_handoff_record_holds_what_the_handoff_files_hold(small_sim, tmp_path):
    from jobs.config import load
    from jobs.sinks import write_slice_files
    from udfs.features import FeatureEngine
    from udfs.handoff import decode_handoff, encode_handoff
    from udfs.ingest import handoff_lines, read_slice, manifest_lines
    from udfs.spec import FeatureSpec

    cfg = load(env={"STREAMLIFT_PATHS__DATA_DIR": str(tmp_path)})
    eng = FeatureEngine(**{**cfg.engine_params(), "shards": 2}, spec=FeatureSpec.from_config(cfg))
    outs = []
    for line in manifest_lines(small_sim):
        s = read_slice(line)
        outs += eng.offer(s.seq, s.batches, s.lines, s.quarantined)
    outs += eng.flush()
    blobs = {o.seq: encode_handoff(o.seq, o.clock, o.final, o.enriched, o.attributed, o.quarantine) for o in outs}
    for o in outs:
        write_slice_files(cfg, o)
    from udfs.ingest import read_handoff

    lines = handoff_lines(tmp_path)
    assert len(lines) == len(outs) > 5
    n_q = 0
    for line in lines:
        want = read_handoff(line)
        got = decode_handoff(blobs[want.seq])
        assert (got.seq, got.clock, got.final) == (want.seq, want.clock, want.final)
        assert got.quarantined == want.quarantined
        n_q += len(got.quarantined)
        for a, b in ((got.decisions, want.decisions), (got.outcomes, want.outcomes)):
            assert (a is None) == (b is None)
            if a is not None:
                a, b = (x.to_pandas() if hasattr(x, "to_pandas") else x for x in (a, b))
                pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert n_q > 0 and any(o.final for o in outs)


@pytest.mark.parametrize("mutate, reason", [
    (lambda b: b[:3], "not a streamlift hand-off record"),
    (lambda b: b[:-1], "header accounts for"),
    (lambda b: b.replace(b'"v":1', b'"v":2', 1), "version 2"),
])
def test_a_damaged_or_foreign_record_is_refused_with_a_reason(mutate, reason):
    from udfs.handoff import decode_handoff, encode_handoff

    blob = encode_handoff(1, 5, True, pd.DataFrame({"decision_id": ["d"]}), None, [])
    with pytest.raises(ValueError, match=reason):
        decode_handoff(mutate(blob))
