"""Producers for the contracts' Kafka topics: create the topics, replay a folder of slice files
(the simulator's output, or a backfill) into them, at full speed or paced.

::

    python -m tools.produce create-topics [--partitions 2]
    python -m tools.produce replay --input data/sim [--rate 20000] [--follow]
    python -m tools.produce live --input data/sim --rate 20000 [--seconds 180]   # event time = now

Every record goes to ``<prefix><stream>.v<version>`` keyed by its ``decision_id`` (so a decision
and its clicks and conversions share a partition number), with the record timestamp set to its
``event_time`` and the header ``streamlift-contract: <stream>.v<version>`` (a record whose header
names another contract or version is quarantined by the job as ``version:<header>``); a line that
does not parse keeps its stream's latest timestamp sent (it is quarantined by the job, not here). The bootstrap servers and client settings come from ``kafka`` in
``streamlift.yaml`` (``STREAMLIFT_KAFKA__BOOTSTRAP_SERVERS``) or ``--bootstrap-servers``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import orjson

from jobs.config import load
from jobs.kafka import CONTRACT_HEADER, HANDOFF_MAX_BYTES, client_config, handoff_topic, librdkafka_config, topics

__all__ = ["create_topics", "replay", "producer", "slice_lines"]


def producer(cfg, bootstrap: str | None = None, **extra):
    from confluent_kafka import Producer

    conf = {**librdkafka_config(client_config(cfg, bootstrap)), "linger.ms": 20, "batch.num.messages": 10000,
            "queue.buffering.max.messages": 1_000_000, "compression.type": "lz4", "enable.idempotence": True,
            "message.max.bytes": 2 * 1024 * 1024,
            "log_level": 3,              # errors; a broker still loading its coordinator is retried, not news
            **extra}
    return Producer(conf)


def create_topics(cfg, bootstrap: str | None = None, partitions: int | None = None, timeout: float = 30) -> list:
    """Create every contract's topic (``kafka.partitions`` each) and the hand-off topic (one
    partition) that do not exist yet; returns the topics created."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({**librdkafka_config(client_config(cfg, bootstrap)), "log_level": 0})
    have = admin.list_topics(timeout=timeout).topics
    n = int(partitions or cfg.kafka.get("partitions", 2))
    new = [NewTopic(t, n, 1) for t in topics(cfg) if t not in have]
    # the features job's hand-off: one partition (its records in commit order), records up to a
    # backfill slice's size
    ho = handoff_topic(cfg)
    if ho not in have:
        new.append(NewTopic(ho, 1, 1, config={"max.message.bytes": str(HANDOFF_MAX_BYTES)}))
    for t, f in admin.create_topics(new, operation_timeout=timeout).items() if new else []:
        f.result()
    deadline = time.time() + timeout           # wait until the broker lists them with their leaders
    while new and time.time() < deadline:
        md = admin.list_topics(timeout=timeout).topics
        if all(t.topic in md and md[t.topic].partitions and all(p.leader >= 0 for p in md[t.topic].partitions.values())
               for t in new):
            break
        time.sleep(0.2)
    return [t.topic for t in new]


def slice_lines(input_dir: Path):
    """``(stream, raw line)`` of every slice under ``input_dir`` in manifest order (arrival order)."""
    from udfs.ingest import manifest_lines

    for m in manifest_lines(input_dir):
        m = orjson.loads(m)
        root = Path(m.get("root", input_dir))
        for stream, rel in m["files"].items():
            path = Path(rel) if Path(rel).is_absolute() else root / rel
            for line in path.read_bytes().split(b"\n"):
                if line.strip():
                    yield stream, line


def _parse(line: bytes):
    """The line as a JSON object, or None (the job quarantines it; the producer only routes it)."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _event_time(obj) -> int | None:
    t = obj.get("event_time") if obj is not None else None
    if isinstance(t, int) and not isinstance(t, bool) and 0 < t < 2 ** 53:
        return t
    return None


def _key(obj) -> bytes | None:
    d = obj.get("decision_id") if obj is not None else None
    return d.encode() if isinstance(d, str) and d else None


def _first_event_time(input_dir: Path) -> int:
    for _, line in slice_lines(input_dir):
        t = _event_time(_parse(line))
        if t is not None:
            return t
    return int(time.time() * 1000)


def replay(cfg, input_dir: Path, bootstrap: str | None = None, rate: float | None = None,
           live: bool = False, seconds: float | None = None, on_send=None) -> dict:
    """Produce every line of the slices under ``input_dir`` to its topic (see the module
    docstring); ``rate``: records per second (paced), else as fast as possible. With ``live``
    the event times are rewritten to the send time (the stream plays as if it happened now;
    needs ``rate``), for ``seconds`` at most. ``on_send(stream, value, ts_ms)`` is called per record."""
    names = {s: t for t, s in topics(cfg).items()}
    from schemas import CONTRACTS

    contract = {s: f"{s}.v{CONTRACTS[s].version}".encode() for s in names}
    p = producer(cfg, bootstrap)
    sent, errors = {s: 0 for s in names}, []

    def delivered(err, msg):
        if err is not None:
            errors.append(str(err))

    last_t = {}                      # an unparseable line gets its stream's latest event time sent before it
    t0, n = time.time(), 0
    if live and not rate:
        raise ValueError("live replay needs a rate")
    for stream, line in slice_lines(Path(input_dir)):
        if stream not in names:
            continue
        if rate:
            wait = t0 + n / rate - time.time()
            if wait > 0:
                time.sleep(wait)
            if seconds is not None and time.time() - t0 > seconds:
                break
        obj = _parse(line)                    # once per record: time, key, and the live rewrite
        if live:
            ts = int(time.time() * 1000)
            if obj is not None and isinstance(obj.get("event_time"), int):
                obj["event_time"] = ts
                line = orjson.dumps(obj)
        else:
            t = _event_time(obj)
            if stream not in last_t:
                last_t[stream] = t if t is not None else _first_event_time(Path(input_dir))
            ts = last_t[stream] if t is None else t
            if t is not None:
                last_t[stream] = max(last_t[stream], t)
        while True:
            try:
                p.produce(names[stream], value=line, key=_key(obj), timestamp=ts, on_delivery=delivered,
                          headers=[(CONTRACT_HEADER, contract[stream])])
                break
            except BufferError:
                p.poll(0.05)
        if on_send is not None:
            on_send(stream, line, ts)
        sent[stream] += 1
        n += 1
        if n % 5000 == 0:
            p.poll(0)
    p.flush(60)
    if errors:
        raise RuntimeError(f"{len(errors)} records were not delivered, first: {errors[0]}")
    wall = time.time() - t0
    return {"sent": sent, "records": n, "seconds": round(wall, 2), "records_per_second": round(n / wall, 1) if wall else None}


def main(argv=None) -> None:
    from jobs.config import quiet_third_party_warnings

    quiet_third_party_warnings()
    ap = argparse.ArgumentParser(description="create the topics and produce traffic to them")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create-topics", help="create the contracts' topics")
    c.add_argument("--partitions", type=int)
    for name in ("replay", "live"):
        r = sub.add_parser(name, help="produce a folder of slice files" + (" with event time = now" if name == "live" else ""))
        r.add_argument("--input", required=True, help="folder with manifest/ (python -m tools.simulate --out ...)")
        r.add_argument("--rate", type=float, required=(name == "live"), help="records per second (default: as fast as possible)")
        r.add_argument("--seconds", type=float, help="stop after this long")
        r.add_argument("--bootstrap-servers")
    c.add_argument("--bootstrap-servers")
    a = ap.parse_args(argv)
    cfg = load()
    if a.cmd == "create-topics":
        made = create_topics(cfg, a.bootstrap_servers, a.partitions)
        print(json.dumps({"created": made, "topics": list(topics(cfg))}))
        return
    res = replay(cfg, Path(a.input), a.bootstrap_servers, a.rate, live=(a.cmd == "live"), seconds=a.seconds)
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
