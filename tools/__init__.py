"""Tools around the jobs: simulator, demo, benchmark, evaluation, analysts' commands (tables, OPE, report),
privacy, the standalone cluster, and the one `streamlift` command (tools/cli.py)."""
