"""The right to be forgotten, as the jobs apply it: the forget list. Plain Python, no Flink.

``python -m tools.privacy forget`` removes a user from everything stored (``tools/privacy.py``)
and adds the user to the forget list, ``<data>/privacy/forgotten.txt``: one keyed hash per line
(HMAC-SHA256 under ``privacy.quarantine_key``, :func:`udfs.ingest.keyed_hash`; the list never
holds a raw identifier). The running jobs read the list and treat a listed user as a user
without consent: the features job's reader drops the ``user_id`` of their decisions before
anything else sees it (no features, an empty ``user_id`` downstream), and the outcomes
labellers blank it in the rows they write (decisions read before the ``forget`` and still
held in the job's state). So what ``forget`` removed does not come back.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> fl = ForgetList(os.path.join(d, "forgotten.txt"), "k")
>>> fl.mask(["u_1", "u_2"]).tolist()
[False, False]
>>> fl.add(["u_2"])
1
>>> fl.mask(["u_1", "u_2"]).tolist(), open(fl.path).read().startswith("hmac:")
([False, True], True)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from udfs.ingest import keyed_hash

__all__ = ["FORGET_FILE", "ForgetList", "blank_forgotten", "blank_forgotten_arrow"]

FORGET_FILE = "privacy/forgotten.txt"      # under the run's data folder


class ForgetList:
    """The keyed hashes of forgotten users in ``path``, re-read when the file changes."""

    def __init__(self, path, key: str):
        self.path = Path(path)
        self.key = str(key)
        self._stamp = None
        self._tokens: frozenset = frozenset()

    def token(self, user_id: str) -> str:
        return keyed_hash(user_id, self.key)

    def tokens(self) -> frozenset:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._tokens = None, frozenset()
            return self._tokens
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._tokens = frozenset(t for t in self.path.read_text().split() if t)
            self._stamp = stamp
        return self._tokens

    def mask(self, user_ids) -> np.ndarray:
        """True where the user id is on the list (empty ids never are). Hashes only the
        distinct ids of the batch, and nothing at all while the list is empty."""
        ids = pd.Series(np.asarray(user_ids, dtype=object))
        tokens = self.tokens()
        if not tokens or ids.empty:
            return np.zeros(len(ids), bool)
        uniq = ids[ids.astype(bool)].unique()
        gone = {u for u in uniq if self.token(u) in tokens}
        return ids.isin(gone).to_numpy() if gone else np.zeros(len(ids), bool)

    def add(self, user_ids) -> int:
        """Append the users not yet listed; returns how many were added."""
        have = self.tokens()
        new = sorted({self.token(u) for u in user_ids} - have)
        if new:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write("".join(t + "\n" for t in new))
                f.flush()
                os.fsync(f.fileno())
        return len(new)


def blank_forgotten(df: pd.DataFrame, forget: ForgetList | None, column: str = "user_id") -> tuple[pd.DataFrame, int]:
    """``df`` with the ``column`` of listed users set to ``""`` (as for a user without consent)
    and how many rows were blanked; ``df`` itself when there are none."""
    if forget is None or df is None or column not in df or not len(df):
        return df, 0
    m = forget.mask(df[column].to_numpy(dtype=object))
    if not m.any():
        return df, 0
    df = df.copy()
    df.loc[m, column] = ""
    return df, int(m.sum())


def blank_forgotten_arrow(rows, forget: ForgetList | None, column: str = "user_id"):
    """:func:`blank_forgotten` for a pyarrow Table (the outcomes labellers' rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if forget is None or rows is None or rows.num_rows == 0 or column not in rows.column_names:
        return rows
    m = forget.mask(rows.column(column).to_numpy(zero_copy_only=False))
    if not m.any():
        return rows
    i = rows.column_names.index(column)
    col = pc.if_else(pa.array(m), pa.scalar("", rows.schema.field(i).type), rows.column(i))
    return rows.set_column(i, rows.schema.field(i), col)
