"""Versioned event contracts: the single source of truth for every event type.

Each contract lives in ``schemas/<name>/v<version>.json``. Everything else is
derived from it: the validator (``udfs.validation``), the pyarrow/Iceberg
schema (:meth:`Contract.arrow_schema`), the Flink SQL DDL columns
(:meth:`Contract.flink_sql_columns`) and the Flink row type
(:meth:`Contract.flink_row_type`).

>>> c = load("decision", 1)
>>> c.id_field, c.time_field
('decision_id', 'event_time')
>>> c.field("propensity").exclusive_minimum
0.0
>>> str(load("click").arrow_schema().field("event_time").type)
'int64'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field as dc_field
from functools import lru_cache
from pathlib import Path

__all__ = ["Field", "Contract", "load", "CONTRACTS", "STREAMS", "TABLES", "table_contract"]

_HERE = Path(__file__).resolve().parent

#: event streams and the contract version each one is read with
STREAMS = {"decision": 1, "click": 1, "conversion": 1}

_ARROW = {"string": "string", "int": "int64", "double": "float64",
          "bool": "bool_", "timestamp_ms": "int64"}
_FLINK_SQL = {"string": "STRING", "int": "BIGINT", "double": "DOUBLE",
              "bool": "BOOLEAN", "timestamp_ms": "BIGINT", "timestamp": "TIMESTAMP_LTZ(6)"}

#: Iceberg tables written by the jobs, and the contract version of each
TABLES = {"outcome": 1, "delay_model": 1, "quarantine": 1, "learner_metrics": 1, "dq_result": 1}


def _arrow_type(t: str):
    import pyarrow as pa

    if t == "timestamp":        # Iceberg timestamptz
        return pa.timestamp("us", tz="UTC")
    return getattr(pa, _ARROW[t])()


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    doc: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    enum: tuple | None = None
    pattern: str | None = None
    required: bool = True


@dataclass(frozen=True)
class Contract:
    name: str
    version: int
    doc: str
    id_field: str
    time_field: str
    fields: tuple[Field, ...] = dc_field(default_factory=tuple)
    kind: str = "event"                  # event (a stream) or table (an Iceberg table)
    partition_day: str | None = None     # tables: partitioned by day of this column
    table: str | None = None             # tables: Iceberg table name without version

    @property
    def qualified_name(self) -> str:
        return f"{self.name}_v{self.version}"

    @property
    def table_name(self) -> str:
        """Iceberg table name, versioned (``outcomes_v1``)."""
        if self.table is None:
            raise ValueError(f"{self.qualified_name} is an event contract, not a table")
        return f"{self.table}_v{self.version}"

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.qualified_name} has no field {name!r}")

    def arrow_schema(self):
        import pyarrow as pa

        return pa.schema([pa.field(f.name, _arrow_type(f.type),
                                   nullable=not f.required,
                                   metadata={"doc": f.doc})
                          for f in self.fields],
                         metadata={"contract": self.qualified_name})

    def flink_sql_columns(self) -> str:
        """Column list for a Flink SQL ``CREATE TABLE`` reading this contract."""
        return ",\n  ".join(f"`{f.name}` {_FLINK_SQL[f.type]}" for f in self.fields)

    def flink_row_type(self):
        from pyflink.common import Types

        flink = {"string": Types.STRING(), "int": Types.LONG(), "double": Types.DOUBLE(),
                 "bool": Types.BOOLEAN(), "timestamp_ms": Types.LONG()}
        return Types.ROW_NAMED(self.field_names, [flink[f.type] for f in self.fields])


@lru_cache(maxsize=None)
def load(name: str, version: int | None = None) -> Contract:
    """Load contract ``name`` at ``version`` (default: the version in STREAMS)."""
    version = STREAMS[name] if version is None else version
    path = _HERE / name / f"v{version}.json"
    raw = json.loads(path.read_text())
    fields = []
    for f in raw["fields"]:
        f = dict(f)
        if "enum" in f:
            f["enum"] = tuple(f["enum"])
        fields.append(Field(**f))
    return Contract(name=raw["name"], version=raw["version"], doc=raw.get("doc", ""),
                    id_field=raw["id_field"], time_field=raw["time_field"],
                    fields=tuple(fields), kind=raw.get("kind", "event"),
                    partition_day=raw.get("partition_day"), table=raw.get("table"))


CONTRACTS = {name: load(name, v) for name, v in STREAMS.items()}


def table_contract(name: str) -> Contract:
    """The contract of Iceberg table ``name`` (``outcome``, ``delay_model``, ``quarantine``).

    >>> c = table_contract("outcome")
    >>> c.table_name, c.partition_day, str(c.arrow_schema().field("decision_time").type)
    ('outcomes_v1', 'decision_time', 'timestamp[us, tz=UTC]')
    """
    return load(name, TABLES[name])
