"""One entry point: ``streamlift <command> [options]`` (``pip install -e .``); each command is the
module's own command line, so ``python -m jobs.<module>`` keeps working and ``streamlift
<command> --help`` explains its flags."""

from __future__ import annotations

import importlib
import sys

__all__ = ["COMMANDS", "main"]

#: command -> (module whose main() runs it, what it does)
COMMANDS = {
    "simulate": ("tools.simulate", "generate a traffic stream (decisions, clicks, conversions) with its truth"),
    "produce": ("tools.produce", "Kafka: create the contracts' topics, replay slice files into them (paced or live)"),
    "broker": ("tools.broker", "a local Kafka broker (KRaft) for development: up, down, status"),
    "features": ("jobs.features", "the features job: decayed features to Feast, enriched decisions, hand-off"),
    "outcomes": ("jobs.outcomes", "the outcomes job: decisions joined to outcomes, delayed labels, Iceberg"),
    "learner": ("jobs.learner", "the learner job: online CTR, conversion and uplift models, snapshots"),
    "serve": ("serving.serve", "score decisions with the newest model and features read from Feast"),
    "ope": ("tools.ope", "off-policy evaluation of a target policy on outcomes_v1"),
    "dq": ("jobs.dq", "the Great Expectations suites on a run's tables (exit 1 if one broke)"),
    "report": ("tools.report", "one self-contained HTML page of plots from a run's tables"),
    "analyst": ("tools.analyst", "read the tables: SQL through DuckDB, per-campaign effects, delay models"),
    "privacy": ("tools.privacy", "forget users: Feast, files, Iceberg (snapshots expired), audit record"),
    "cluster": ("tools.cluster", "a standalone Flink cluster: up, down, submit, status"),
    "evaluate": ("tools.evaluate", "uplift figures on a simulated stream (in process)"),
    "bench": ("tools.bench", "the benchmarks against their baselines (make bench)"),
    "demo": ("tools.demo", "simulate, run the three jobs, read everything back (make demo)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: streamlift <command> [options]   (streamlift <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"streamlift: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    sys.argv = [f"streamlift {cmd}", *rest]           # argparse's prog: "streamlift <command>"
    rc = module.main(rest)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
