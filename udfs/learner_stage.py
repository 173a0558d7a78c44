"""The online learner as a :class:`udfs.stage.SliceStage`: the same engine contract, and the same
Flink wiring (``jobs.flink_env.stage_function``), as the features and outcomes stages.

One model is one stream of updates, so there is one learner stage. Its input part per slice is a
:class:`HandoffRef`: the hand-off line and the slice read from it upstream. The write-ahead log
keeps only the line (the slice's files are immutable and are read again on a restore), and the
learner's state is its core plus one part per block of held rows
(:meth:`udfs.learners.OnlineLearner.state_parts`), written every ``snapshot_every`` slices.

Outputs per slice: ``("scores", seq, scores)`` and ``("snapshot", Snapshot)`` items.
"""

from __future__ import annotations

from udfs.stage import SliceStage

__all__ = ["HandoffRef", "LearnerStage"]


class HandoffRef:
    """A hand-off line and, when read already, its :class:`udfs.ingest.HandoffSlice`; pickles as
    the line alone."""

    def __init__(self, line, handoff=None):
        self.line = line
        self._slice = handoff

    def get(self):
        if self._slice is None:
            from udfs.ingest import read_handoff

            self._slice = read_handoff(self.line)
        return self._slice

    def __getstate__(self):
        return {"line": self.line}

    def __setstate__(self, state):
        self.line, self._slice = state["line"], None


class LearnerStage(SliceStage):
    """:class:`udfs.learners.OnlineLearner` over hand-off slices, in sequence order."""

    def __init__(self, learner_params: dict, snapshot_every: int = 4):
        from udfs.learners import OnlineLearner

        super().__init__(parts=1, snapshot_every=snapshot_every)
        self.learner_params = dict(learner_params)
        self.learner = OnlineLearner(**self.learner_params)

    def _params(self) -> dict:
        return {"learner_params": self.learner_params, "snapshot_every": self.snapshot_every}

    def _take(self, seq: int, payloads: list) -> list:
        s = payloads[0].get()
        items = []
        for n, scores, snaps in self.learner.offer(s.seq, s.decisions, s.outcomes, s.clock, s.final):
            items += [("snapshot", snap) for snap in snaps]
            if scores is not None and len(scores):
                items.append(("scores", n, scores))
        return items

    def _finish(self) -> list:
        return [("snapshot", snap) for snap in self.learner.flush()]

    def _core(self):
        core, new, gone = self.learner.state_parts()
        for key, blob in new.items():
            self._put_part(f"block:{key}", blob)
        for key in gone:
            self._drop_part(f"block:{key}")
        return core

    def _load_core(self, core, parts) -> None:
        from udfs.learners import OnlineLearner

        self.learner = OnlineLearner.restore(core, {name[len("block:"):]: blob for name, blob in parts.items()})
