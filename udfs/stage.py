"""The engine contract: one stateful step over numbered slices.

A *stage* takes slices in sequence order, each possibly in several *parts* (one
from each upstream shard), and keeps its state as a write-ahead log plus a
periodic snapshot, so that Flink stores only what changed:

* :meth:`SliceStage.offer` ``(seq, part, payload) -> outputs``: hand in one part;
  every slice that became complete (all its parts, every earlier slice done) is
  processed, in order. A part already taken (a replay) is ignored.
* :meth:`SliceStage.flush` ``() -> outputs``: end of input.
* :meth:`SliceStage.state_delta` ``() -> {key: bytes | None}``: state entries
  changed since the last call (``None``: delete). ``log:<seq>:<part>`` holds each
  input part until the next snapshot; ``core`` is the snapshot, written every
  ``snapshot_every`` slices; ``part:<name>`` entries are written once and deleted
  (at a snapshot) when the stage no longer needs them; the snapshot lists the parts
  it holds, so a restore takes exactly those.
* :meth:`SliceStage.restore` ``(entries, **params) -> stage``: the snapshot, then
  the logged parts taken again. Their outputs are *not* returned: they were
  emitted before the checkpoint that holds the log (Flink's aligned checkpoints
  put them in the downstream state or output already).

Subclasses implement ``_take(seq, payloads) -> outputs``, ``_finish() -> outputs``,
``_core() -> object`` / ``_load_core(core)`` and may add parts with
:meth:`_put_part` / :meth:`_drop_part`.

>>> class Sum(SliceStage):
...     def __init__(self, parts=1, snapshot_every=2):
...         super().__init__(parts=parts, snapshot_every=snapshot_every); self.total = 0
...     def _params(self): return {"parts": self.parts, "snapshot_every": self.snapshot_every}
...     def _take(self, seq, payloads): self.total += sum(payloads); return [(seq, self.total)]
...     def _core(self): return self.total
...     def _load_core(self, core, parts): self.total = core
>>> s = Sum(parts=2)
>>> s.offer(1, 0, 10), s.offer(0, 1, 1), s.offer(0, 0, 2), s.offer(1, 1, 20)
([], [], [(0, 3)], [(1, 33)])
>>> state = s.state_delta(); s.offer(2, 0, 100); state.update(s.state_delta())
[]
>>> r = Sum.restore(state); (r.total, r.next_seq, r.offer(2, 1, 200))
(33, 2, [(2, 333)])
"""

from __future__ import annotations

import pickle
from abc import ABC, abstractmethod

__all__ = ["SliceStage"]


class SliceStage(ABC):
    """Base of the features, outcomes and learner stages (see the module docstring)."""

    def __init__(self, parts: int = 1, snapshot_every: int = 8):
        self.parts = int(parts)
        self.snapshot_every = int(snapshot_every)
        self.next_seq = 0
        self.waiting: dict[int, dict[int, object]] = {}
        self.restored_from: int | None = None
        self._logged: set[tuple[int, int]] = set()     # (seq, part) in state under log:
        self._dirty: dict[str, bytes | None] = {}
        self._gone_parts: set[str] = set()             # part entries to delete at the next snapshot
        self._live_parts: set[str] = set()             # part entries the stage holds now
        self._snapshot_due = False
        self._replaying = False

    # ------------------------------------------------------------ subclass hooks
    @abstractmethod
    def _params(self) -> dict:
        """Constructor arguments (stored with the snapshot)."""

    @abstractmethod
    def _take(self, seq: int, payloads: list) -> list:
        """Process slice ``seq`` given its parts in part order; return its outputs."""

    def _finish(self) -> list:
        """End of input (after every complete slice was taken)."""
        return []

    @abstractmethod
    def _core(self) -> object:
        """The snapshot: everything but the parts."""

    @abstractmethod
    def _load_core(self, core, parts: dict) -> None:
        """Inverse of :meth:`_core`, given the stored parts ``{name: object}``."""

    def _check_restore(self, stored_params: dict) -> None:
        """Refuse a snapshot that cannot be restored under this stage's parameters."""

    def _require_same(self, stored_params: dict, names) -> None:
        """Raise ValueError if any of ``names`` differs between the snapshot and this stage (the
        shard layout: state is per shard, so changing it needs a new run)."""
        for k in names:
            if stored_params[k] != getattr(self, k):
                raise ValueError(f"{type(self).__name__} state made with {k}={stored_params[k]} restored with "
                                 f"{k}={getattr(self, k)}: start a new run to change it (state is per shard, "
                                 "e.g. a new engine parallelism)")

    # ------------------------------------------------------------------ input
    def offer(self, seq: int, part: int, payload) -> list:
        if seq < self.next_seq or part in self.waiting.get(seq, {}):
            return []
        if not 0 <= part < self.parts:
            raise ValueError(f"part {part} of slice {seq}: this stage takes parts 0..{self.parts - 1}")
        self.waiting.setdefault(seq, {})[part] = payload
        if not self._replaying:
            self._dirty[f"log:{seq}:{part}"] = pickle.dumps(payload, protocol=5)
        self._logged.add((seq, part))
        return self._drain()

    def _drain(self) -> list:
        outs = []
        while len(self.waiting.get(self.next_seq, ())) == self.parts:
            seq = self.next_seq
            parts = self.waiting.pop(seq)
            outs += self._take(seq, [parts[i] for i in range(self.parts)])
            self.next_seq += 1
            if self.next_seq % self.snapshot_every == 0:
                self._snapshot_due = True
        return outs

    def flush(self) -> list:
        outs = self._drain() + self._finish()
        self._snapshot_due = True
        return outs

    # ------------------------------------------------------------------ state
    def _put_part(self, name: str, obj) -> None:
        self._gone_parts.discard(name)
        self._live_parts.add(name)
        self._dirty[f"part:{name}"] = pickle.dumps(obj, protocol=5)

    def _drop_part(self, name: str) -> None:
        self._dirty.pop(f"part:{name}", None)
        self._gone_parts.add(name)
        self._live_parts.discard(name)

    def state_delta(self) -> dict:
        core = self._core() if self._snapshot_due else None      # (it may put or drop parts)
        out, self._dirty = self._dirty, {}
        if self._snapshot_due:
            out["core"] = pickle.dumps({"params": self._params(), "next_seq": self.next_seq,
                                        "parts": sorted(self._live_parts), "core": core}, protocol=5)
            for name in self._gone_parts:
                out[f"part:{name}"] = None
            self._gone_parts = set()
            for seq, part in sorted(self._logged):
                if seq < self.next_seq:
                    out[f"log:{seq}:{part}"] = None
            self._logged = {(s, p) for s, p in self._logged if s >= self.next_seq}
            self._snapshot_due = False
        return out

    @classmethod
    def restore(cls, entries: dict, **params) -> "SliceStage":
        """The stage as of ``entries`` (the accumulated :meth:`state_delta`). ``params``, when
        given, are this run's constructor arguments: a snapshot made under parameters the stage
        cannot continue from is refused (:meth:`_check_restore`)."""
        entries = {k: v for k, v in entries.items() if v is not None}     # deletions
        logs = sorted((tuple(int(x) for x in k.split(":")[1:]), v)
                      for k, v in entries.items() if k.startswith("log:"))
        if "core" in entries:
            snap = pickle.loads(entries["core"])
            stage = cls(**(params or snap["params"]))
            stage._check_restore(snap["params"])
            # the parts the snapshot holds (not those of the logged slices, put again below)
            parts = {name: pickle.loads(entries[f"part:{name}"]) for name in snap["parts"]}
            stage._live_parts = set(parts)
            stage._load_core(snap["core"], parts)
            stage.next_seq = snap["next_seq"]
        else:
            stage = cls(**params)
        stage._replaying = True
        try:
            for (seq, part), blob in logs:
                stage.offer(seq, part, pickle.loads(blob))    # outputs were emitted before the checkpoint
        finally:
            stage._replaying = False
        stage._logged = {key for key, _ in logs}
        stage._snapshot_due = False
        stage._dirty = {}
        stage.restored_from = stage.next_seq if entries else None
        return stage
