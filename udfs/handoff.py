"""One hand-off record: a slice of the features job's output as the outcomes and learner jobs
read it, in one self-contained value (a Kafka record on the hand-off topic).

Layout: ``b"SLHO"``, a 4-byte big-endian header length, the header (JSON: ``v`` the record's
contract version, ``seq``, ``clock``, ``final``, and each section's byte length), then the
sections: ``enriched`` decisions and ``attributed`` clicks and conversions as Arrow IPC streams
(columnar: the engines read them without a per-row step), ``quarantine`` as JSON lines in the
features job's quarantine format. The event-time clock travels in the record with the data it
covers, so a reader closes its epochs on the clock of the slices it has read, never on a
clock that got ahead of them.

>>> import pandas as pd
>>> dec = pd.DataFrame({"decision_id": ["d1", "d2"], "event_time": [1, 2]})
>>> blob = encode_handoff(7, 1_767_225_600_000, False, dec, None, [("click", {"event_id": "c"}, "late")])
>>> h = decode_handoff(blob)
>>> h.seq, h.clock, h.final, h.decisions.num_rows, h.outcomes, h.quarantined
(7, 1767225600000, False, 2, None, [('click', 'late', '{"event_id":"c"}')])
>>> decode_handoff(b"junk")
Traceback (most recent call last):
...
ValueError: not a streamlift hand-off record (magic b'junk')
"""

from __future__ import annotations

import struct

import orjson

from udfs.ingest import HandoffSlice
from udfs.validation import reason_kind

__all__ = ["encode_handoff", "decode_handoff", "HANDOFF_VERSION", "MAGIC"]

MAGIC = b"SLHO"
#: the hand-off record's contract version (the topic is ``<prefix>handoff.v<version>``)
HANDOFF_VERSION = 1
_SECTIONS = ("enriched", "attributed", "quarantine")


def _ipc(df) -> bytes:
    import pyarrow as pa

    table = pa.Table.from_pandas(df, preserve_index=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _table(buf: bytes):
    import pyarrow as pa

    return pa.ipc.open_stream(pa.py_buffer(buf)).read_all()


def encode_handoff(seq: int, clock: int | None, final: bool, enriched, attributed, quarantine: list) -> bytes:
    """``quarantine``: ``(stream, record, reason)`` as the features job's slice output holds it."""
    body = {"enriched": _ipc(enriched) if enriched is not None and len(enriched) else b"",
            "attributed": _ipc(attributed) if attributed is not None and len(attributed) else b"",
            "quarantine": b"".join(orjson.dumps({"stream": st, "reason": r, "reason_kind": reason_kind(r),
                                                 "record": rec}) + b"\n" for st, rec, r in quarantine)}
    header = orjson.dumps({"v": HANDOFF_VERSION, "seq": int(seq), "clock": None if clock is None else int(clock),
                           "final": bool(final), "sections": {k: len(body[k]) for k in _SECTIONS}})
    return b"".join([MAGIC, struct.pack(">I", len(header)), header, *(body[k] for k in _SECTIONS)])


def decode_handoff(value: bytes) -> HandoffSlice:
    """The :class:`udfs.ingest.HandoffSlice` of a record; a value that is not one, or of another
    contract version, raises ``ValueError`` (the reader quarantines it with the reason)."""
    value = bytes(value)
    if value[:4] != MAGIC:
        raise ValueError(f"not a streamlift hand-off record (magic {value[:4]!r})")
    (n,) = struct.unpack(">I", value[4:8])
    header = orjson.loads(value[8:8 + n])
    if header.get("v") != HANDOFF_VERSION:
        raise ValueError(f"hand-off record version {header.get('v')!r}, this reader takes {HANDOFF_VERSION}")
    pos, parts = 8 + n, {}
    for k in _SECTIONS:
        size = int(header["sections"][k])
        parts[k] = value[pos:pos + size]
        pos += size
    if pos != len(value):
        raise ValueError(f"hand-off record of {len(value)} bytes, its header accounts for {pos}")
    quarantined = []
    for raw in parts["quarantine"].splitlines():
        if raw:
            q = orjson.loads(raw)
            rec = q["record"]
            quarantined.append((q["stream"], q["reason"], rec if isinstance(rec, str) else orjson.dumps(rec).decode()))
    return HandoffSlice(seq=int(header["seq"]),
                        decisions=_table(parts["enriched"]) if parts["enriched"] else None,
                        outcomes=_table(parts["attributed"]).to_pandas() if parts["attributed"] else None,
                        clock=header["clock"], final=bool(header["final"]), quarantined=quarantined)
