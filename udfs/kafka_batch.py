"""Kafka record batches -> validated columns + quarantine, and batches -> slices.

Plain Python, no Flink. The features job's Kafka source (``jobs/kafka.py``) hands Python one
row per event-time window, topic and partition: the window's record values as sent (Flink
SQL's ``ARRAY_AGG`` of the raw bytes), :data:`TOMBSTONE` standing for a record without a
value. :func:`decode_batch` turns one such row into the contract's columns
and the quarantine, every record in exactly one of them; :func:`gather_slice` joins a
window's rows into one slice, in an order that does not depend on their arrival.

Reasons a Kafka record gets besides the validator's (``bad_json``, ``missing:<field>``, ...):
``empty:tombstone`` (no value), ``empty`` (an empty or blank value), ``encoding`` (not UTF-8),
``size:line`` (longer than ``limits.max_line_bytes``), ``late`` (see ``jobs/kafka.py``),
``future`` (dated more than ``limits.max_future`` ahead of the wall clock).

>>> values = [b'{"event_id":"c1","decision_id":"d1","event_time":1767225600000}',
...           TOMBSTONE, b"", b"\\xff\\xfe", b"{bad"]
>>> b = decode_batch("click", values)
>>> len(b.frame), b.lines, sorted(r for _, _, r in b.quarantined)
(1, 5, ['bad_json', 'empty', 'empty:tombstone', 'encoding'])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from udfs.ingest import _quarantined_text, validators

__all__ = ["Batch", "decode_batch", "gather_slice", "partition_counts", "TOMBSTONE", "TOMBSTONE_SQL"]

#: how the SQL side writes a record without a value (a tombstone): bytes no UTF-8 text holds
TOMBSTONE = b"\x00\xff\x00"
TOMBSTONE_SQL = "X'00FF00'"


@dataclass
class Batch:
    """One window's records of one topic partition, validated."""
    stream: str
    window_end: int                   # epoch ms, exclusive
    topic: str = ""
    partition: int = 0
    lines: int = 0                    # records in
    frame: pd.DataFrame | None = None  # valid records, contract columns
    quarantined: list = field(default_factory=list)   # (stream, stored text, reason)
    first_offset: int = -1
    last_offset: int = -1
    late: bool = False                # every record of it was late (quarantined as such)


def decode_batch(stream: str, values, limits: dict | None = None, window_end: int = 0,
                 topic: str = "", partition: int = 0, first_offset: int = -1, last_offset: int = -1,
                 late: bool = False) -> Batch:
    """Decode and validate one batch row (see the module docstring)."""
    limits = limits or {}
    key = limits.get("quarantine_key")
    validator = validators(limits.get("max_field_chars"), limits.get("max_line_bytes"))[stream]
    out = Batch(stream, int(window_end), topic, int(partition), first_offset=int(first_offset),
                last_offset=int(last_offset), late=late)
    raw, bad = [], []
    for value in values or ():
        if value is None or value == TOMBSTONE:
            bad.append((stream, "", "empty:tombstone"))
            continue
        value = bytes(value)
        if not value.strip():
            bad.append((stream, "", "empty"))
            continue
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            bad.append((stream, _quarantined_text(value, key), "encoding"))
            continue
        raw.append(value)
    out.lines = len(raw) + len(bad)
    cols, q = validator.parse_lines(raw)
    names = validator.contract.field_names
    out.frame = pd.DataFrame({n: cols[n] for n in names})
    out.quarantined = bad + [(stream, _quarantined_text(l, key), r) for l, r in q]
    return out


def gather_slice(batches: list) -> tuple[dict, dict, list]:
    """``(frames, lines, quarantined)`` of one slice from its batches, in (stream, topic,
    partition, late, first offset) order: the same slice whatever order the batches came in."""
    frames, lines, quarantined = {}, {}, []
    for b in sorted(batches, key=lambda b: (b.stream, b.topic, b.partition, b.late, b.first_offset)):
        lines[b.stream] = lines.get(b.stream, 0) + b.lines
        quarantined += b.quarantined
        if b.frame is not None and len(b.frame):
            frames.setdefault(b.stream, []).append(b.frame)
    frames = {s: (pd.concat(f, ignore_index=True) if len(f) > 1 else f[0]) for s, f in frames.items()}
    return frames, lines, quarantined


def partition_counts(batches: list) -> dict:
    """Per ``topic:partition``: the records a slice took from it, those quarantined as they
    were read, and the offsets they span (every record of the partition is in exactly one
    slice, so over a run ``records`` adds up to the offsets the job consumed).

    >>> b = [Batch("click", 1000, "t", 0, lines=3, first_offset=0, last_offset=2),
    ...      Batch("click", 1000, "t", 0, lines=1, first_offset=7, last_offset=7, late=True,
    ...            quarantined=[("click", "", "late")])]
    >>> partition_counts(b)
    {'t:0': {'records': 4, 'quarantined_on_read': 1, 'first_offset': 0, 'last_offset': 7}}
    """
    out: dict = {}
    for b in batches:
        c = out.setdefault(f"{b.topic}:{b.partition}", {"records": 0, "quarantined_on_read": 0,
                                                          "first_offset": b.first_offset, "last_offset": b.last_offset})
        c["records"] += b.lines
        c["quarantined_on_read"] += len(b.quarantined)
        c["first_offset"] = min(c["first_offset"], b.first_offset)
        c["last_offset"] = max(c["last_offset"], b.last_offset)
    return dict(sorted(out.items()))
