"""Progress lines for long runs: while a job runs, a client-side thread reads the per-slice,
per-epoch or per-snapshot statistics the job writes under ``<data>/`` and prints one line to
stderr, e.g.::

    features: 41/100 slices, 1,230,000 events (48,200/s), 312 quarantined, 26 s

On a terminal the line is rewritten in place every ``interval`` seconds; elsewhere (a log, CI)
a full line is printed every 30 s with ``STREAMLIFT_PROGRESS=always``. ``STREAMLIFT_PROGRESS=never``
turns it off; the default (``auto``) shows it on a terminal only.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

__all__ = ["Progress", "progress_line", "count_lines"]


def count_lines(folder: Path) -> int:
    """Lines of the non-hidden files of ``folder`` (the slices a manifest or hand-off announces)."""
    n = 0
    for f in Path(folder).glob("*"):
        if f.is_file() and not f.name.startswith("."):
            with open(f, "rb") as fh:
                n += sum(1 for line in fh if line.strip())
    return n


class _Reader:
    """Parsed statistics files, each read once (they are written atomically and never change)."""

    def __init__(self):
        self.seen: dict[Path, dict] = {}

    def read(self, folder: Path, pattern: str) -> list[dict]:
        for f in Path(folder).glob(pattern):
            if f not in self.seen:
                try:
                    self.seen[f] = json.loads(f.read_text())
                except (OSError, ValueError):          # being renamed into place: next time
                    continue
        return [v for k, v in self.seen.items() if k.parent == Path(folder) and k.match(pattern)]


def progress_line(job: str, data_dir: Path, total: int | None, elapsed: float, reader: _Reader | None = None) -> str:
    """The progress of ``job`` ("features", "outcomes", "learner") from its statistics in ``data_dir``."""
    reader = reader or _Reader()
    data_dir = Path(data_dir)
    of = f"/{total:,}" if total else ""
    if job == "features":
        stats = reader.read(data_dir / "stats", "slice-*.json")
        events = sum(sum(s["in"].values()) for s in stats)
        quarantined = sum(sum(s["quarantined"].values()) for s in stats)
        rate = events / elapsed if elapsed > 0 else 0.0
        return (f"features: {len(stats):,}{of} slices, {events:,} events ({rate:,.0f}/s), "
                f"{quarantined:,} quarantined, {elapsed:.0f} s")
    if job == "outcomes":
        epochs = reader.read(data_dir / "outcomes", "epoch-*.json")
        if not epochs:
            return f"outcomes: 0 epochs committed, {elapsed:.0f} s"
        last = max(epochs, key=lambda e: e["epoch"])
        totals = last.get("totals") or {}
        q = sum((totals.get("quarantined") or {}).values())
        return (f"outcomes: {len(epochs):,} epochs committed, through slice {last['seq'] + 1:,}{of}, "
                f"{last['rows']:,} rows in the last, {q:,} quarantined, {elapsed:.0f} s")
    if job == "learner":
        snaps = reader.read(data_dir / "learner", "snapshot-*.json")
        if not snaps:
            return f"learner: 0 snapshots, {elapsed:.0f} s"
        last = max(snaps, key=lambda s: s["version"])
        return (f"learner: {len(snaps):,} snapshots, through slice {last['seq'] + 1:,}{of}, "
                f"{last['examples']:,} examples, {elapsed:.0f} s")
    raise ValueError(f"unknown job {job!r}")


class Progress:
    """``with Progress("features", data_dir, total):`` prints progress lines while the block runs
    (see the module's docstring for when), and a last one at its end."""

    def __init__(self, job: str, data_dir: Path, total: int | None = None, interval: float | None = None,
                 stream=None, mode: str | None = None):
        self.job, self.data_dir, self.total = job, Path(data_dir), total
        self.stream = stream or sys.stderr
        mode = (mode or os.environ.get("STREAMLIFT_PROGRESS", "auto")).lower()
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = mode == "always" or (mode == "auto" and tty)
        self.inplace = tty and mode != "never"
        self.interval = interval if interval is not None else 2.0 if self.inplace else 30.0
        self._stop = threading.Event()
        self._reader = _Reader()
        self._thread = None

    def _print(self, final: bool = False) -> None:
        try:
            line = progress_line(self.job, self.data_dir, self.total, time.time() - self.t0, self._reader)
        except Exception as e:                          # noqa: BLE001 - progress never fails a run
            line = f"{self.job}: (no progress: {type(e).__name__})"
        if self.inplace:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._print()

    def __enter__(self):
        self.t0 = time.time()
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, name=f"progress-{self.job}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._print(final=True)
        return False
