"""Hashed keys and shard routing, on columns (no per-event Python loop).

Ids and entity keys are hashed to 64 bits with pandas' vectorized SipHash
(``pandas.util.hash_array``, a fixed key: the same value in every process and
run). A composite key hashes each column and combines the hashes, so no
separator character can merge two keys (``("a|b", "c")`` and ``("a", "b|c")``
differ). 0 means "no key" (a decision without consent has no user key).

>>> h = key_hash([["a|b", "a"], ["c", "b|c"]])
>>> bool(h[0] != h[1]), h.dtype.name
(True, 'uint64')
>>> shard_of(key_hash([["u1", "u2", "u1"]]), 4).tolist() == shard_of(key_hash([["u1", "u2", "u1"]]), 4).tolist()
True
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["id_hash", "key_hash", "shard_of", "order_by"]

_MIX = np.uint64(0x9E3779B97F4A7C15)


def id_hash(values) -> np.ndarray:
    """64-bit hash of each string (never 0)."""
    arr = np.asarray(values, dtype=object)
    if not len(arr):
        return np.zeros(0, np.uint64)
    h = pd.util.hash_array(arr, categorize=False)
    h[h == 0] = 1
    return h


def key_hash(columns, hashed: bool = False) -> np.ndarray:
    """64-bit hash of each row of ``columns`` (a list of equally long string sequences, or with
    ``hashed`` their :func:`id_hash` arrays)."""
    cols = [np.asarray(c, np.uint64) if hashed else id_hash(c) for c in columns]
    h = cols[0].copy()
    with np.errstate(over="ignore"):
        for c in cols[1:]:
            h = (h * _MIX) ^ c
            h = h ^ (h >> np.uint64(29))
    h[h == 0] = 1
    return h


def shard_of(hashes: np.ndarray, shards: int) -> np.ndarray:
    """Shard of each hashed key: ``(h >> 17) % shards`` (the low bits feed other tables)."""
    if shards == 1:
        return np.zeros(len(hashes), np.int64)
    return ((np.asarray(hashes, np.uint64) >> np.uint64(17)) % np.uint64(shards)).astype(np.int64)


def order_by(t, rank, ids) -> np.ndarray:
    """Positions that sort rows by ``(t, rank, id)``: numpy on the numbers, strings compared only
    within the (rare) runs of equal ``(t, rank)``.

    >>> order_by(np.array([5, 3, 5, 5]), np.array([0, 0, 0, 1]), np.array(["b", "z", "a", "a"], object)).tolist()
    [1, 2, 0, 3]
    """
    t = np.asarray(t)
    rank = np.zeros(len(t), np.int8) if rank is None else np.asarray(rank)
    order = np.lexsort((rank, t))
    if len(order) < 2:
        return order
    ts, rs = t[order], rank[order]
    same = (ts[1:] == ts[:-1]) & (rs[1:] == rs[:-1])
    if not same.any():
        return order
    ids = np.asarray(ids, object)
    starts = np.flatnonzero(same & ~np.concatenate([[False], same[:-1]]))
    for s in starts.tolist():
        e = s + 1
        while e < len(same) and same[e]:
            e += 1
        block = order[s:e + 1]
        order[s:e + 1] = block[np.argsort(ids[block].astype(str), kind="stable")]
    return order
