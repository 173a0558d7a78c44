"""DecayedSum against the closed form Σ x·2^(-(now - t)/h) on every prefix, in any order."""

import math
import pickle
import random

import pytest

from udfs.decay import DecayedSum, decay_to

H = 3_600_000


def closed_form(events, now, h=H):
    return sum(x * 2.0 ** (-(now - t) / h) for x, t in events)


def stream(seed, n=300, span=5 * 86_400_000):
    rnd = random.Random(seed)
    return [(rnd.choice([1.0, 2.5, 0.5]), rnd.randrange(0, span)) for _ in range(n)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_prefix_matches_closed_form(seed):
    events = sorted(stream(seed), key=lambda e: e[1])
    acc = DecayedSum(H)
    for i, (x, t) in enumerate(events):
        acc.update(x, t)
        ref = closed_form(events[: i + 1], t)
        assert acc.get(t) == pytest.approx(ref, rel=1e-9)
        assert acc.get(t + 7_200_000) == pytest.approx(ref / 4, rel=1e-9)


def test_arrival_order_does_not_matter():
    events = stream(4)
    a, b = DecayedSum(H), DecayedSum(H)
    for x, t in events:
        a.update(x, t)
    shuffled = events[:]
    random.Random(9).shuffle(shuffled)
    for x, t in shuffled:
        b.update(x, t)
    now = max(t for _, t in events)
    assert a.get(now) == pytest.approx(b.get(now), rel=1e-12)
    assert a.get(now) == pytest.approx(closed_form(events, now), rel=1e-9)


def test_landmark_moves_before_overflow():
    acc = DecayedSum(1000)            # 1 s half-life over 10 days: 864,000 half-lives
    for t in range(0, 10 * 86_400_000, 3_600_000):
        acc.update(1.0, t)
        assert math.isfinite(acc.get(t))
    assert acc.get() == pytest.approx(1.0)


def test_pickle_round_trip_and_reader_decay():
    acc = DecayedSum(H).update(2.0, 0).update(1.0, H)
    clone = pickle.loads(pickle.dumps(acc))
    assert clone.get(5 * H) == acc.get(5 * H)
    assert decay_to(acc.get(H), H, 5 * H, H) == pytest.approx(acc.get(5 * H))
