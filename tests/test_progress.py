"""Progress lines (issue 14): read from the statistics a job writes, printed while it runs."""

import io
import json
import time

from jobs.progress import Progress, count_lines, progress_line


def _slice(d, seq, events, quarantined):
    (d / "stats").mkdir(parents=True, exist_ok=True)
    (d / "stats" / f"slice-{seq:08d}.json").write_text(json.dumps(
        {"seq": seq, "in": {"decision": events - quarantined, "click": quarantined},
         "quarantined": {"schema": quarantined}}))


def test_features_progress_counts_slices_events_and_quarantine(tmp_path):
    for seq in range(3):
        _slice(tmp_path, seq, 1000, 7)
    line = progress_line("features", tmp_path, 10, elapsed=2.0)
    assert line == "features: 3/10 slices, 3,000 events (1,500/s), 21 quarantined, 2 s"


def test_outcomes_and_learner_progress(tmp_path):
    (tmp_path / "outcomes").mkdir()
    assert progress_line("outcomes", tmp_path, 5, 1.0).startswith("outcomes: 0 epochs")
    for i, (epoch, seq) in enumerate(((100, 1), (200, 3))):
        (tmp_path / "outcomes" / f"epoch-{epoch}.json").write_text(json.dumps(
            {"epoch": epoch, "seq": seq, "rows": 10 * (i + 1), "totals": {"quarantined": {"duplicate": 2}}}))
    (tmp_path / "outcomes" / "dq-200.json").write_text("{}")          # not an epoch
    assert progress_line("outcomes", tmp_path, 5, 1.0) == \
        "outcomes: 2 epochs committed, through slice 4/5, 20 rows in the last, 2 quarantined, 1 s"
    (tmp_path / "learner").mkdir()
    (tmp_path / "learner" / "snapshot-000002.json").write_text(json.dumps({"version": 2, "seq": 4, "examples": 77}))
    assert progress_line("learner", tmp_path, 5, 3.0) == "learner: 1 snapshots, through slice 5/5, 77 examples, 3 s"


def test_count_lines_skips_hidden_files(tmp_path):
    (tmp_path / "a.jsonl").write_text("x\ny\n\n")
    (tmp_path / ".b.jsonl.tmp").write_text("z\n")
    assert count_lines(tmp_path) == 2


def test_lines_while_running_and_a_last_one(tmp_path):
    out = io.StringIO()
    with Progress("features", tmp_path, 4, interval=0.05, stream=out, mode="always"):
        _slice(tmp_path, 0, 500, 0)
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and lines[-1].startswith("features: 1/4 slices, 500 events")


def test_silent_off_a_terminal_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAMLIFT_PROGRESS", raising=False)
    out = io.StringIO()                        # not a TTY
    with Progress("features", tmp_path, 4, interval=0.01, stream=out):
        time.sleep(0.05)
    assert out.getvalue() == ""
