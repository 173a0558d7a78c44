"""Exponentially decayed accumulators, ``z_t = λ·z_{t-1} + x_t`` in event time.

With a half-life ``h`` and a gap ``Δ`` between events, the per-step factor is
``λ = 2^(-Δ/h)``. Kept as *forward decay* (Cormode et al., ICDE 2009): the
state is ``S = Σ x·exp(r·(t - L))`` with ``r = ln 2 / h`` and a landmark ``L``;
the value at time ``now`` is ``S·exp(-r·(now - L))``. A sum commutes, so the
state does not depend on arrival order. The landmark moves forward before the
exponent could overflow a double.

>>> acc = DecayedSum(half_life_ms=1000)
>>> acc.update(1.0, t=0).update(1.0, t=1000).get(1000)
1.5
>>> acc.get(2000)
0.75
"""

from __future__ import annotations

import math

__all__ = ["DecayedSum", "rate", "MAX_EXPONENT", "decay_to"]

#: the landmark moves when r·(t - L) would pass this (exp(600) ~ 1e260 < 1.8e308)
MAX_EXPONENT = 300.0


def rate(half_life_ms: float) -> float:
    """Decay rate r = ln 2 / h, per millisecond."""
    return math.log(2.0) / half_life_ms


def decay_to(value: float, as_of_ms: int, now_ms: int, half_life_ms: float) -> float:
    """Decay a stored (value, as-of time) pair to ``now_ms``: what a feature reader does.

    >>> decay_to(4.0, 0, 7_200_000, 3_600_000)
    1.0
    """
    return value * 2.0 ** (-(now_ms - as_of_ms) / half_life_ms)


class DecayedSum:
    """One key's decayed sum at one half-life; ``update(x, t)`` / ``get(now)``.

    Arrival order does not matter: updates may come in any order of ``t``.
    """

    def __init__(self, half_life_ms: float):
        self.half_life_ms = half_life_ms
        self._r = rate(half_life_ms)
        self._landmark: int | None = None
        self._s = 0.0
        self.last_t: int | None = None

    def _move_landmark(self, new_landmark: int) -> None:
        self._s *= math.exp(-self._r * (new_landmark - self._landmark))
        self._landmark = new_landmark

    def update(self, x: float, t: int) -> "DecayedSum":
        if self._landmark is None:
            self._landmark = t
        elif self._r * (t - self._landmark) > MAX_EXPONENT:
            self._move_landmark(t)
        self._s += x * math.exp(self._r * (t - self._landmark))
        self.last_t = t if self.last_t is None else max(self.last_t, t)
        return self

    def get(self, now: int | None = None) -> float:
        """Value at ``now`` (default: the latest event time seen)."""
        if self._landmark is None:
            return 0.0
        now = self.last_t if now is None else now
        return self._s * math.exp(-self._r * (now - self._landmark))
