"""Shared Flink wiring: the execution environment with flink-conf/ applied."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from jobs.config import ROOT, Config

__all__ = ["flink_settings", "stream_env", "job_env", "python_files", "line_source", "terminate"]


def flink_settings(cfg: Config, checkpoint_dir: Path | None = None) -> dict:
    profile = cfg.flink["profile"]
    settings = yaml.safe_load((ROOT / "flink-conf" / profile / "config.yaml").read_text())
    settings = {k: str(v) for k, v in settings.items()}
    # the Python workers run this interpreter (the project's virtual environment)
    settings.setdefault("python.executable", sys.executable)
    settings.setdefault("python.client.executable", sys.executable)
    if checkpoint_dir is not None:
        settings["state.checkpoints.dir"] = checkpoint_dir.resolve().as_uri()
    return settings


def python_files() -> str:
    """The project's packages, shipped with the job to cluster workers."""
    return ",".join(str(ROOT / p) for p in ("schemas", "udfs", "jobs"))


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
    env.add_python_file(str(ROOT / "schemas"))
    env.add_python_file(str(ROOT / "udfs"))
    env.add_python_file(str(ROOT / "jobs"))
    return env


def job_env(cfg: Config, checkpoint_dir: Path | None = None, overrides: dict | None = None):
    """The environment a job runs in: the cluster's when submitted with ``flink run``
    (``STREAMLIFT_ON_CLUSTER``, set by ``jobs.cluster``), else the local mini-cluster."""
    if os.environ.get("STREAMLIFT_ON_CLUSTER"):
        from pyflink.datastream import StreamExecutionEnvironment

        return StreamExecutionEnvironment.get_execution_environment()
    return stream_env(cfg, checkpoint_dir=checkpoint_dir, overrides=overrides)


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
