"""Vowpal Wabbit on the CTR model's stream, protocol and features: the baseline of ``make bench``
and ``make demo``.

:class:`VowpalCTR` takes the same hand-off slices as :class:`udfs.learners.OnlineLearner`, in
the same order, and follows the CTR model's protocol: each treatment-arm decision is
scored when it first arrives (prequential), and learned with its click once
``max(label_wait, click_window)`` of event time has passed. Its features are the same
information: the encoder's numeric block (log1p of the decayed accumulators, missing
flags, smoothed rates) in namespace ``n``, and the raw values of the same categorical
fields and crosses in namespace ``c`` (VW hashes them itself). Loss: logistic, link:
logistic, VW's default adaptive, normalized, invariant updates.

>>> import pandas as pd
>>> vw = VowpalCTR(half_lives=("1h",))
>>> d = pd.DataFrame({"decision_id": ["d1"], "event_time": [0], "arm": ["treatment"], "placement": ["feed"],
...                   "device": ["ios"], "region": ["eu"], "hour": [3], "campaign_id": ["c1"],
...                   "creative_id": ["k1"]})
>>> s = vw.offer(d, pd.DataFrame({"decision_id": ["d1"], "kind": ["click"], "event_time": [5]}), clock=0)
>>> list(s.columns), vw.trained
(['decision_id', 'ctr'], 0)
>>> _ = vw.offer(None, None, clock=3_600_000); vw.trained
1
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from udfs.features import parse_duration
from udfs.learners import FeatureEncoder

__all__ = ["VowpalCTR", "VW_ARGS"]

VW_ARGS = "--loss_function logistic --link logistic --quiet -b 20"


class VowpalCTR:
    def __init__(self, half_lives=("1h", "1d", "7d"), click_window="1h", label_wait="1h", args: str = VW_ARGS):
        from vowpalwabbit import Workspace

        self.vw = Workspace(args)
        self.args = args
        self.encoder = FeatureEncoder(half_lives)
        self.wait = max(parse_duration(label_wait), parse_duration(click_window))
        self.pending: deque = deque()          # (event time, decision id, features line), in arrival order
        self.clicked: set = set()
        self.trained = 0
        self.scored = 0

    def lines(self, df: pd.DataFrame) -> list[str]:
        """VW text features (no label) of decision rows, built column-wise with Arrow compute
        (zero-valued numeric features left out, as VW's own input writers do)."""
        num = self.encoder.numeric(df)
        parts = [pa.scalar(" |n")]
        for j in range(num.shape[1]):
            col = pa.array(num[:, j])
            text = pc.binary_join_element_wise(pa.scalar(str(j)), pc.cast(col, pa.string()), ":")
            parts.append(pc.if_else(pc.equal(col, 0), pa.scalar(""), text))
        parts.append(pa.scalar("|c"))
        for name, values in self.encoder.field_values(df):          # the CTR model's fields and crosses
            v = pc.replace_substring_regex(pa.array(values, pa.string()), r"[\s|:]", "_")
            parts.append(pc.binary_join_element_wise(pa.scalar(name + "="), v, ""))
        return pc.binary_join_element_wise(*parts, " ").to_pylist()

    def offer(self, decisions=None, outcomes=None, clock: int | None = None) -> pd.DataFrame | None:
        """One hand-off slice: score its treatment-arm decisions, note its clicks, then learn
        every pending decision whose wait has passed by ``clock``. Returns the scores."""
        scores = None
        if decisions is not None and len(decisions):
            df = decisions.to_pandas() if not isinstance(decisions, pd.DataFrame) else decisions
            df = df[df["arm"].to_numpy(dtype=object) == "treatment"]
            feats = self.lines(df)
            p = np.array([self.vw.predict(x) for x in feats], float)
            self.pending.extend(zip(df["event_time"].to_numpy(np.int64).tolist(),
                                    df["decision_id"].tolist(), feats))
            self.scored += len(feats)
            scores = pd.DataFrame({"decision_id": df["decision_id"].to_numpy(), "ctr": p})
        if outcomes is not None and len(outcomes):
            clicks = outcomes["kind"].to_numpy(dtype=object) == "click"
            self.clicked.update(outcomes["decision_id"].to_numpy(dtype=object)[clicks].tolist())
        if clock is not None:
            while self.pending and self.pending[0][0] + self.wait <= clock:
                _, did, x = self.pending.popleft()
                label = "1" if did in self.clicked else "-1"
                self.clicked.discard(did)
                self.vw.learn(label + x)
                self.trained += 1
        return scores
