"""Reading one slice: its manifest line -> validated records per stream + quarantine.

A slice manifest is one JSON line ``{"seq": n, "root": dir, "files": {stream: path},
"lines": {stream: count}}``; paths are relative to ``root``.

>>> import json, tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "c.jsonl").write_text('{"event_id":"c1","decision_id":"d1","event_time":1767225600000}\\n{bad\\n')
>>> s = read_slice(json.dumps({"seq": 3, "root": str(d), "files": {"click": "c.jsonl"}}))
>>> s.seq, s.lines, len(s.batches["click"]), s.quarantined[0][2]
(3, {'click': 2}, 1, 'bad_json')
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import orjson

from schemas import CONTRACTS
from udfs.validation import Validator

__all__ = ["Slice", "read_slice", "manifest_lines", "VALIDATORS", "HandoffSlice", "handoff_lines", "read_handoff"]

VALIDATORS = {name: Validator(c) for name, c in CONTRACTS.items()}
_VALIDATORS = {}
#: a quarantined line longer than this is stored as its head and a digest, never whole
QUARANTINE_HEAD = 512


def validators(max_field_chars: int | None = None, max_line_bytes: int | None = None) -> dict:
    """The contracts' validators with these size limits (the defaults when None)."""
    if max_field_chars is None and max_line_bytes is None:
        return VALIDATORS
    key = (max_field_chars, max_line_bytes)
    if key not in _VALIDATORS:
        kw = {k: v for k, v in (("max_field_chars", max_field_chars), ("max_line_bytes", max_line_bytes))
              if v is not None}
        _VALIDATORS[key] = {name: Validator(c, **kw) for name, c in CONTRACTS.items()}
    return _VALIDATORS[key]


#: fields whose rejected values are stored in quarantine as a keyed hash, never verbatim
IDENTIFIER_FIELDS = ("user_id",)


def keyed_hash(value: str, key: str) -> str:
    """HMAC-SHA256 of a rejected identifier under the quarantine key (``privacy.quarantine_key``):
    equal values stay comparable, the value cannot be read back.

    >>> keyed_hash("alice@example.com", "k") == keyed_hash("alice@example.com", "k"), keyed_hash("a", "k")[:5]
    (True, 'hmac:')
    """
    import hashlib
    import hmac

    return "hmac:" + hmac.new(key.encode(), str(value).encode(), hashlib.sha256).hexdigest()[:32]


def _quarantined_text(line: bytes, key: str | None = None) -> str:
    """A rejected line as stored in quarantine: identifier fields replaced by a keyed hash; whole
    if short, else its head and a digest."""
    if key is not None and b"user_id" in line and len(line) <= QUARANTINE_HEAD * 8:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and any(f in obj for f in IDENTIFIER_FIELDS):
            for f in IDENTIFIER_FIELDS:
                if f in obj:
                    obj[f] = keyed_hash(obj[f], key)
            line = orjson.dumps(obj)
    if len(line) <= QUARANTINE_HEAD:
        return line.decode("utf-8", "replace")
    import hashlib

    return (line[:QUARANTINE_HEAD].decode("utf-8", "replace")
            + f"…[{len(line)} bytes, sha256 {hashlib.sha256(line).hexdigest()}]")


@dataclass
class Slice:
    seq: int
    batches: dict       # stream -> list of record tuples in contract field order
    lines: dict         # stream -> non-empty input lines
    quarantined: list   # (stream, raw line as str, reason)


def manifest_lines(input_dir) -> list[str]:
    """Every slice's manifest line under ``<input_dir>/manifest/``, in file order."""
    files = sorted((Path(input_dir) / "manifest").glob("slices-*.jsonl"))
    return [line for f in files for line in f.read_text().splitlines() if line]


def read_slice(manifest_line: str | bytes, as_frames: bool = False, limits: dict | None = None) -> Slice:
    """Read and validate the files of one slice; with ``as_frames`` each stream's valid records
    come as one pandas DataFrame in contract columns instead of a list of tuples. ``limits``:
    ``max_field_chars``, ``max_line_bytes`` (``limits`` in streamlift.yaml) and ``quarantine_key``
    (identifiers in rejected lines are stored as a keyed hash under it)."""
    limits = limits or {}
    vals = validators(limits.get("max_field_chars"), limits.get("max_line_bytes"))
    m = orjson.loads(manifest_line)
    root = Path(m.get("root", "."))
    batches, lines, bad = {}, {}, []
    for stream, rel in m["files"].items():
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        # source faults are data: the file's entry counts as one input record, quarantined
        if stream not in vals:
            lines[stream] = lines.get(stream, 0) + 1
            bad.append((stream, str(rel), "source:unknown_stream"))
            continue
        try:
            raw = [l for l in path.read_bytes().split(b"\n") if l.strip()]
        except OSError as e:
            lines[stream] = lines.get(stream, 0) + 1
            bad.append((stream, str(rel), f"source:{'missing_file' if isinstance(e, FileNotFoundError) else 'unreadable'}"))
            continue
        validator = vals[stream]
        cols, q = validator.parse_lines(raw)
        names = validator.contract.field_names
        if as_frames:
            import pandas as pd

            batches[stream] = pd.DataFrame({n: cols[n] for n in names})
        else:
            batches[stream] = list(zip(*(cols[n] for n in names)))
        lines[stream] = lines.get(stream, 0) + len(raw)
        bad.extend((stream, _quarantined_text(l, limits.get("quarantine_key")), r) for l, r in q)
    return Slice(seq=int(m["seq"]), batches=batches, lines=lines, quarantined=bad)


@dataclass
class HandoffSlice:
    """One slice of the features job's output, as the outcomes job reads it."""
    seq: int
    decisions: object          # pyarrow.Table of enriched decisions, or None
    outcomes: object           # pandas.DataFrame of attributed clicks/conversions, or None
    clock: int | None          # every event at or before it has been released
    final: bool                # the features job's input ended with this slice
    quarantined: list          # (stream, reason, record as JSON text) quarantined by the features job


def handoff_lines(data_dir) -> list[str]:
    """Every hand-off line under ``<data_dir>/handoff/``, in sequence order."""
    files = sorted((Path(data_dir) / "handoff").glob("slice-*.json"))
    return [line for f in files for line in f.read_text().splitlines() if line]


def read_handoff(line: str | bytes) -> HandoffSlice:
    """Read the files a hand-off line names (``jobs/sinks.write_slice_files`` wrote them), or
    decode a hand-off record from the Kafka topic (``udfs/handoff.py``)."""
    import pandas as pd
    import pyarrow.parquet as pq

    from udfs.handoff import MAGIC, decode_handoff

    if isinstance(line, (bytes, bytearray, memoryview)) and bytes(line[:4]) == MAGIC:
        return decode_handoff(line)

    m = orjson.loads(line)
    root, files = Path(m["root"]), m["files"]
    decisions = pq.read_table(root / files["enriched"]) if "enriched" in files else None
    outcomes = pd.read_parquet(root / files["attributed"]) if "attributed" in files else None
    quarantined = []
    if "quarantine" in files:
        for raw in (root / files["quarantine"]).read_bytes().splitlines():
            if raw:
                q = orjson.loads(raw)
                rec = q["record"]
                quarantined.append((q["stream"], q["reason"],
                                    rec if isinstance(rec, str) else orjson.dumps(rec).decode()))
    return HandoffSlice(seq=int(m["seq"]), decisions=decisions, outcomes=outcomes, clock=m["clock"],
                        final=bool(m["final"]), quarantined=quarantined)
