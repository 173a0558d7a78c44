"""Shared Flink wiring: the execution environment with flink-conf/ applied."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from jobs.config import ROOT, Config

__all__ = ["flink_settings", "stream_env", "job_env", "python_files", "line_source", "terminate",
           "run_handoff_job", "handoff_cli", "WORKER_PACKAGES", "END_OF_INPUT_TIMER", "parallelism",
           "on_cluster", "shard_keys", "flink_subtask_of", "stage_function", "record_error", "JobMetrics",
           "METRIC_GROUP"]

#: the metric group of every streamlift metric (Flink's scope: <subtask>.<operator>.streamlift.<name>)
METRIC_GROUP = "streamlift"


class JobMetrics:
    """The operator's metrics, through PyFlink's metric group (``python.metric.enabled``): in the
    Flink web UI and REST API as ``<subtask>.<task>.streamlift.<operator>.<name>``, and
    ``….streamlift.<operator>.reason.<reason>.<name>`` for a counter per reason (``<task>`` is
    Flink's name of the chain the operator runs in; ``operator`` is ours). Counters are made on
    first use; a gauge reports the last value set. Without metrics (disabled) every call is a no-op."""

    def __init__(self, runtime_context, operator: str):
        try:
            self.group = runtime_context.get_metrics_group().add_group(METRIC_GROUP).add_group(operator)
        except Exception:                            # noqa: BLE001 - python.metric.enabled: false
            self.group = None
        self.counters, self.values = {}, {}

    def inc(self, name: str, n: int = 1, reason: str | None = None) -> None:
        if self.group is None or not n:
            return
        key = (name, reason)
        if key not in self.counters:
            g = self.group if reason is None else self.group.add_group("reason", str(reason))
            self.counters[key] = g.counter(name)
        self.counters[key].inc(int(n))

    def set(self, name: str, value) -> None:
        if self.group is None or value is None:
            return
        if name not in self.values:
            self.group.gauge(name, lambda: self.values[name])
        self.values[name] = int(value)

#: the packages the jobs' Python workers import (shipped with a job: ``-pyfs`` / add_python_file);
#: tools/ is never imported by a job
WORKER_PACKAGES = ("schemas", "udfs", "jobs", "stores", "serving")

#: the event-time timer jobs flush on: it fires only when the final watermark passes (bounded input ended)
END_OF_INPUT_TIMER = 2 ** 62


def flink_settings(cfg: Config, checkpoint_dir: Path | None = None) -> dict:
    profile = cfg.flink["profile"]
    settings = yaml.safe_load((ROOT / "flink-conf" / profile / "config.yaml").read_text())
    settings = {k: str(v) for k, v in settings.items()}
    # the Python workers run this interpreter (the project's virtual environment)
    settings.setdefault("python.executable", sys.executable)
    settings.setdefault("python.client.executable", sys.executable)
    if checkpoint_dir is not None:
        settings["state.checkpoints.dir"] = checkpoint_dir.resolve().as_uri()
    # streamlift.yaml's flink.settings (or STREAMLIFT_FLINK__SETTINGS='{key: value}') over the profile
    settings.update({str(k): str(v) for k, v in dict(cfg.flink.get("settings") or {}).items()})
    return settings


def python_files() -> str:
    """The project's packages, shipped with the job to cluster workers."""
    return ",".join(str(ROOT / p) for p in WORKER_PACKAGES)


def stream_env(cfg: Config, checkpoint_dir: Path | None = None, overrides: dict | None = None):
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment

    # On the local mini-cluster PyFlink would run every Python operator as a thread of
    # this process ("loopback"), all behind one GIL; in process mode each operator gets
    # its own Python worker, so reading, the engine and the sinks use both cores.
    os.environ.setdefault("_python_worker_execution_mode", "process")
    conf = Configuration()
    for k, v in {**flink_settings(cfg, checkpoint_dir), **(overrides or {})}.items():
        conf.set_string(k, str(v))
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    for package in WORKER_PACKAGES:
        env.add_python_file(str(ROOT / package))
    return env


def job_env(cfg: Config, checkpoint_dir: Path | None = None, overrides: dict | None = None):
    """The environment a job runs in: the cluster's when submitted with ``flink run``
    (``STREAMLIFT_ON_CLUSTER``, set by ``tools.cluster``), else the local mini-cluster."""
    if os.environ.get("STREAMLIFT_ON_CLUSTER"):
        from pyflink.datastream import StreamExecutionEnvironment

        return StreamExecutionEnvironment.get_execution_environment()
    return stream_env(cfg, checkpoint_dir=checkpoint_dir, overrides=overrides)


def on_cluster() -> bool:
    """Submitted with ``flink run`` (``tools.cluster`` sets STREAMLIFT_ON_CLUSTER)."""
    return bool(os.environ.get("STREAMLIFT_ON_CLUSTER"))


def parallelism(cfg: Config, env) -> int:
    """Parallelism of the sharded stages: ``flink.parallelism`` when set (> 0), else the
    environment's default (``parallelism.default`` of the profile, or ``flink run -p``)."""
    p = int(cfg.flink.get("parallelism") or 0)
    return p if p > 0 else max(1, int(env.get_parallelism()))


def flink_subtask_of(key: int, parallelism: int, max_parallelism: int = 128) -> int:
    """The subtask Flink sends an int key of a PyFlink ``key_by`` to: PyFlink keys by a
    ``Row(key)``, and Flink's own ``KeyGroupRangeAssignment`` (called through the gateway, so
    it is Flink's hash, not a copy of it) picks the key group and the subtask."""
    from pyflink.java_gateway import get_gateway

    gw = get_gateway()
    arr = gw.new_array(gw.jvm.Object, 1)
    arr[0] = int(key)
    row = gw.jvm.org.apache.flink.types.Row.of(arr)
    return int(gw.jvm.org.apache.flink.runtime.state.KeyGroupRangeAssignment.assignKeyToParallelOperator(
        row, max_parallelism, parallelism))


def shard_keys(p: int, env=None) -> list[int]:
    """For each shard 0..p-1, the smallest int key Flink sends to subtask ``shard``: keyed by
    these, the shards land on distinct subtasks (hash partitioning of 0..p-1 would put some on
    the same one). Tested by the parallelism tests, which record each shard's subtask."""
    max_p = 128
    if env is not None and int(env.get_max_parallelism()) > 0:
        max_p = int(env.get_max_parallelism())
    keys, k = [None] * p, 0
    while None in keys:
        s = flink_subtask_of(k, p, max_p)
        if keys[s] is None:
            keys[s] = k
        k += 1
    return keys


def record_error(data_dir: Path, where: str) -> str:
    """Write the current exception's Python traceback to ``<data_dir>/errors/<where>-<time>.txt``
    (Flink's own log is shared by every job of the installation); returns the text."""
    import traceback

    text = traceback.format_exc()
    folder = Path(data_dir) / "errors"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{where}-{int(time.time() * 1000)}-{os.getpid()}.txt").write_text(text)
    return text


def stage_function(state_name: str, stage_cls, params_for_key, take, emit, flush_at_end: bool = False,
                   errors_dir: Path | None = None, watch=None, observe=None, operator: str | None = None):
    """A keyed function running one :class:`udfs.stage.SliceStage` per key (shard), its state a
    MapState of the stage's :meth:`state_delta` entries.

    ``take(stage, value, timing) -> outputs`` hands the element to the stage;
    ``emit(output, timing)`` yields ``(None, element)`` for the main output or ``(tag, element)``
    for a side output. With ``flush_at_end`` the stage is flushed when the input ends (the
    final watermark). Outputs of slices taken again on a restore are not emitted twice
    (``SliceStage.restore``). An exception's traceback is written to ``errors_dir`` (see
    :func:`record_error`) before Flink fails the task (and restarts it, up to its restart strategy).
    ``watch(stage, now) -> seconds | None``, called after each element and again when the
    processing-time timer it asked for fires: a check that must run on an idle stream too
    (the features job's alert on a gap in slice numbers). ``observe(stage, outputs, metrics)``,
    called after each element and flush, updates the operator's :class:`JobMetrics` (named
    ``operator``, default ``state_name``).
    """
    from pyflink.common import Types
    from pyflink.datastream import KeyedProcessFunction
    from pyflink.datastream.state import MapStateDescriptor

    class StageFunction(KeyedProcessFunction):
        def open(self, ctx):
            self.state = ctx.get_map_state(MapStateDescriptor(state_name, Types.STRING(), Types.PICKLED_BYTE_ARRAY()))
            self.stages = {}
            self.subtask = ctx.get_index_of_this_subtask()
            self.metrics = JobMetrics(ctx, operator or state_name) if observe is not None else None

        def _observe(self, stage, outs):
            if observe is not None:
                observe(stage, outs, self.metrics)

        def _stage(self, key):
            if key not in self.stages:
                entries = dict(self.state.items())
                params = params_for_key(key)
                self.stages[key] = stage_cls.restore(entries, **params) if entries else stage_cls(**params)
            return self.stages[key]

        def _persist(self, stage):
            for k, v in stage.state_delta().items():
                if v is None:
                    self.state.remove(k)
                else:
                    self.state.put(k, v)

        def _out(self, outs, timing):
            for o in outs:
                for tag, element in emit(o, timing):
                    yield element if tag is None else (tag, element)

        def process_element(self, value, ctx):
            try:
                stage = self._stage(ctx.get_current_key())
                timing = {f"{state_name}_subtask:{getattr(stage, 'shard', 0)}": self.subtask}
                outs = take(stage, value[1], timing)
                self._observe(stage, outs)
                if flush_at_end:
                    ctx.timer_service().register_event_time_timer(END_OF_INPUT_TIMER)
                out = list(self._out(outs, timing))
                self._persist(stage)  # a crash before this replays the outputs, idempotently
                self._watch(stage, ctx)
            except Exception:
                if errors_dir is not None:
                    record_error(errors_dir, state_name)
                raise
            yield from out

        def _watch(self, stage, ctx):
            if watch is None:
                return
            import time as _time

            delay = watch(stage, _time.time())
            if delay is not None:
                now = ctx.timer_service().current_processing_time()
                ctx.timer_service().register_processing_time_timer(now + max(int(delay * 1000), 1))

        def on_timer(self, timestamp, ctx):
            try:
                stage = self._stage(ctx.get_current_key())
                if timestamp != END_OF_INPUT_TIMER:        # a watch's processing-time timer
                    self._watch(stage, ctx)
                    return
                outs = stage.flush()
                self._observe(stage, outs)
                out = list(self._out(outs, {}))
                self._persist(stage)
            except Exception:
                if errors_dir is not None:
                    record_error(errors_dir, state_name)
                raise
            yield from out

    return StageFunction()


def line_source(env, folder: Path, follow: bool, uid: str):
    """One element per text line of every file in ``folder`` (files starting with "." are
    skipped, so producers announce a file by renaming it): bounded, or with ``follow``
    monitored every second. Files come in no particular order."""
    from pyflink.common import Duration, WatermarkStrategy
    from pyflink.datastream.connectors.file_system import FileSource, StreamFormat

    builder = FileSource.for_record_stream_format(StreamFormat.text_line_format(), str(Path(folder).resolve()))
    if follow:
        builder = builder.monitor_continuously(Duration.of_seconds(1))
    return env.from_source(builder.build(), WatermarkStrategy.no_watermarks(), uid) \
        .uid(uid).set_parallelism(1)


def terminate(stats) -> None:
    """End the graph: stats go to stdout with STREAMLIFT_PRINT=1, else are discarded
    (the jobs write them to <data>/ themselves)."""
    if os.environ.get("STREAMLIFT_PRINT"):
        stats.print().name("stats").uid("stats")
        return
    from pyflink.datastream.functions import SinkFunction

    stats.add_sink(SinkFunction("org.apache.flink.streaming.api.functions.sink.legacy.DiscardingSink")) \
        .name("discard").uid("discard")


# ----------------------------------------------------------------------------- hand-off consumers
def handoff_input(env, cfg: Config, input_dir: Path, follow: bool, kafka: dict | None, name: str):
    """The features job's slices for consumer ``name``: the hand-off lines under
    ``<input_dir>/handoff``, or with ``kafka`` (``{"bootstrap", "until", "startup"}``) the
    hand-off topic's committed records (consumer group ``streamlift-<name>``)."""
    if kafka is None:
        return line_source(env, Path(input_dir) / "handoff", follow, "handoff")
    from jobs.kafka import handoff_stream

    return handoff_stream(env, cfg, f"streamlift-{name}", kafka.get("bootstrap"), kafka.get("until"),
                          kafka.get("startup"))


def handoff_value(value):
    """A hand-off line (files) or the bytes of a hand-off record (a Kafka row of one field)."""
    if isinstance(value, (str, bytes)):
        return value
    return bytes(value[0])


def run_handoff_job(cfg: Config, name: str, build, summarize, input_dir: Path | None = None,
                    follow: bool = False, overrides: dict | None = None, kafka: dict | None = None) -> dict:
    """Run a hand-off consumer wired by ``build(env, cfg, input_dir, follow) -> stats stream`` over
    ``<input_dir>/handoff`` (bounded unless ``follow``) on the local mini-cluster, or on the cluster
    under ``flink run``; checkpoints in ``<data>/checkpoints-<name>``; returns ``summarize(cfg)``
    with the wall time."""
    from stores.iceberg_store import open_tables

    input_dir = Path(input_dir or cfg.data_dir)
    open_tables(cfg)
    t0 = time.time()
    env = job_env(cfg, checkpoint_dir=cfg.data_dir / f"checkpoints-{name}", overrides=overrides)
    terminate(build(env, cfg, input_dir, follow, kafka=kafka))
    from jobs.progress import Progress, count_lines

    with Progress(name, cfg.data_dir, None if (follow or kafka) else count_lines(input_dir / "handoff")):
        env.execute(f"streamlift-{name}")
    summary = summarize(cfg)
    summary["wall_seconds"] = round(time.time() - t0, 2)
    return summary


def default_handoff(cfg: Config, input_dir: Path) -> str:
    """``files`` when ``input_dir`` holds hand-off lines (the features job read files, or handed
    off on files), else ``kafka`` when ``kafka.handoff`` is on."""
    if (Path(input_dir) / "handoff").is_dir() or not cfg.kafka["handoff"]:
        return "files"
    return "kafka"


def handoff_cli(name: str, run, argv=None) -> None:
    """The command line of a hand-off consumer: ``--input``, ``--data-dir``, ``--follow``,
    ``--from-checkpoint``; prints ``run(cfg, input_dir, follow, overrides)``."""
    from jobs.config import load_for_cli

    p = argparse.ArgumentParser(description=f"streamlift {name} job")
    p.add_argument("--input", help="the features job's data dir (with handoff/); default paths.data_dir")
    p.add_argument("--data-dir", help="override paths.data_dir")
    p.add_argument("--follow", action="store_true", help="keep taking slices as they are handed off")
    p.add_argument("--from-checkpoint", help="restore from a retained checkpoint (…/chk-N) or savepoint")
    p.add_argument("--handoff", choices=["files", "kafka"],
                   help="read the hand-off lines under --input, or the hand-off topic (default: the lines "
                        "when --input has a handoff/ folder, else the topic when kafka.handoff is on)")
    p.add_argument("--bootstrap-servers", help="Kafka: override kafka.bootstrap_servers")
    p.add_argument("--until", choices=["latest", "never"], default="never",
                   help="Kafka: read up to the offsets current at start, then end, or never end")
    p.add_argument("--startup", choices=["earliest-offset", "latest-offset", "group-offsets"],
                   help="Kafka: where a new job starts reading (a restored one resumes at its checkpoint)")
    args = p.parse_args(argv)
    cfg = load_for_cli(args.data_dir)
    input_dir = Path(args.input) if args.input else cfg.data_dir
    overrides = {"execution.state-recovery.path": args.from_checkpoint} if args.from_checkpoint else None
    source = args.handoff or default_handoff(cfg, input_dir)
    kafka = None if source == "files" else {"bootstrap": args.bootstrap_servers, "until": args.until,
                                            "startup": args.startup}
    res = run(cfg, input_dir, args.follow, overrides=overrides, kafka=kafka)
    print(json.dumps(res, indent=2, default=str))
    if res.get("data_quality", {}).get("success") is False:    # the tables stay; the exit says it
        sys.exit(1)
