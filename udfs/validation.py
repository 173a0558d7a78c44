"""Contract validation, compiled from ``schemas/``.

A record either passes its contract (and comes back as a dict holding exactly
the contract's fields) or fails with one reason string. Reasons are
``bad_json``, ``not_object``, or ``<check>:<field>`` with check one of
``missing``, ``type``, ``range``, ``enum``, ``pattern``, ``timestamp``.
:func:`reason_kind` gives the part before the colon, used for counts.

>>> from schemas import load
>>> v = Validator(load("click"))
>>> v.parse_line(b'{"event_id": "c1", "decision_id": "d1", "event_time": 1767225600000}')
({'event_id': 'c1', 'decision_id': 'd1', 'event_time': 1767225600000}, None)
>>> v.parse_line(b'{"event_id": "c1", "decision_id": "d1"}')
(None, 'missing:event_time')
>>> v.parse_line(b'{"event_id": "c1", "decision_id": 7, "event_time": 1767225600000}')
(None, 'type:decision_id')
>>> v.parse_line(b'{oops')
(None, 'bad_json')
"""

from __future__ import annotations

import re

import orjson

__all__ = ["Validator", "reason_kind", "MIN_TIMESTAMP_MS", "MAX_TIMESTAMP_MS", "MAX_FIELD_CHARS",
           "MAX_LINE_BYTES", "MAX_ABS_DOUBLE"]

#: 2000-01-01 and 2100-01-01 UTC: anything outside is an impossible event time
MIN_TIMESTAMP_MS = 946_684_800_000
MAX_TIMESTAMP_MS = 4_102_444_800_000
#: default size limits: a string field longer than this is ``size:<field>``, a line longer than
#: this is ``size:line`` (both configurable: ``limits`` in streamlift.yaml)
MAX_FIELD_CHARS = 256
MAX_LINE_BYTES = 65_536
#: doubles without a contract bound must be finite and at most this in magnitude (sums of many
#: of them must not overflow)
MAX_ABS_DOUBLE = 1e15


def reason_kind(reason: str) -> str:
    """``'missing:user_id'`` -> ``'missing'``."""
    return reason.split(":", 1)[0]


def _check_for(f, max_chars: int = MAX_FIELD_CHARS):
    """Build one field's check: value -> (clean value, failed check or None)."""
    name = f.name
    if f.type == "string":
        # fullmatch: "$" in a pattern also matches before a trailing newline
        rx = re.compile(f.pattern) if f.pattern else None
        enum = frozenset(f.enum) if f.enum else None

        def check(v):
            if type(v) is not str or not v:
                return None, "type"
            if len(v) > max_chars:
                return None, "size"
            if enum is not None and v not in enum:
                return None, "enum"
            if rx is not None and rx.fullmatch(v) is None:
                return None, "pattern"
            return v, None
    elif f.type in ("int", "timestamp_ms"):
        lo, hi = f.minimum, f.maximum
        if f.type == "timestamp_ms":
            lo, hi, bad = MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS, "timestamp"
        else:
            bad = "range"

        def check(v):
            if type(v) is not int:  # bool is not accepted as int
                return None, "type"
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                return None, bad
            return v, None
    elif f.type == "double":
        lo, hi, xlo = f.minimum, f.maximum, f.exclusive_minimum

        def check(v):
            t = type(v)
            if t is not float and t is not int:
                return None, "type"
            try:
                v = float(v)
            except OverflowError:           # an int beyond a double
                return None, "range"
            if v != v or abs(v) > MAX_ABS_DOUBLE or (lo is not None and v < lo) or (hi is not None and v > hi) \
                    or (xlo is not None and v <= xlo):
                return None, "range"
            return v, None
    elif f.type == "bool":
        def check(v):
            if type(v) is not bool:
                return None, "type"
            return v, None
    else:  # pragma: no cover - a contract error, caught by the schema tests
        raise ValueError(f"unknown type {f.type!r} for field {name!r}")
    return check


class Validator:
    """Validates records against one contract; built once per contract."""

    def __init__(self, contract, max_field_chars: int = MAX_FIELD_CHARS, max_line_bytes: int = MAX_LINE_BYTES):
        self.contract = contract
        self.max_field_chars = int(max_field_chars)
        self.max_line_bytes = int(max_line_bytes)
        self._checks = [(f.name, _check_for(f, self.max_field_chars)) for f in contract.fields]

    def validate(self, obj) -> tuple[dict | None, str | None]:
        if type(obj) is not dict:
            return None, "not_object"
        out = {}
        for name, check in self._checks:
            if name not in obj or obj[name] is None:
                return None, f"missing:{name}"
            v, bad = check(obj[name])
            if bad is not None:
                return None, f"{bad}:{name}"
            out[name] = v
        return out, None

    def parse_line(self, line: bytes | str) -> tuple[dict | None, str | None]:
        if len(line) > self.max_line_bytes:
            return None, "size:line"
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None, "bad_json"
        return self.validate(obj)

    def parse_lines(self, lines):
        """Validate many lines; returns (columns: {field: list}, quarantined: [(line, reason)])."""
        names = self.contract.field_names
        cols = {n: [] for n in names}
        appends = [(n, cols[n].append) for n in names]
        bad = []
        loads, err = orjson.loads, orjson.JSONDecodeError
        validate = self.validate
        limit = self.max_line_bytes
        for line in lines:
            if not line.strip():
                continue
            if len(line) > limit:
                bad.append((line, "size:line"))
                continue
            try:
                obj = loads(line)
            except err:
                bad.append((line, "bad_json"))
                continue
            rec, reason = validate(obj)
            if reason is not None:
                bad.append((line, reason))
                continue
            for n, app in appends:
                app(rec[n])
        return cols, bad
