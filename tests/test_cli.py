"""One entry point (issue 14, part 4): ``streamlift <command>`` for every tool and job, each with
``--help``; ``pyproject.toml`` packages the three packages with the schemas and expectation suites,
the dependencies read from requirements.in (one list)."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tools.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent


def test_the_listing_names_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("simulate", "features", "outcomes", "learner", "serve", "ope", "dq", "report", "analyst", "cluster"):
        assert f"  {name} " in out
    assert main(["nope"]) == 2


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_explains_its_flags(command):
    r = subprocess.run([sys.executable, "-m", "tools.cli", command, "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"usage: streamlift {command}") and "--" in r.stdout
    assert "Warning" not in r.stderr, r.stderr[-2000:]              # third-party warnings silenced


def test_pyproject_packages_what_the_commands_need():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"] == {"streamlift": "tools.cli:main"}
    assert meta["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.in"]
    assert meta["tool"]["setuptools"]["packages"]["find"]["include"] == ["jobs", "stores", "serving", "tools", "udfs", "schemas", "schemas.*"]
    assert meta["tool"]["setuptools"]["package-data"]["*"] == ["*.json", "*.md"]
    # after `make venv` (pip install -e .) the command is on the virtual environment's path
    exe = Path(sys.executable).parent / "streamlift"
    assert exe.exists()
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "commands:" in r.stdout


def test_entry_points_silence_other_libraries_warnings_and_keep_the_projects():
    """Feast's imports put ``simplefilter("always")`` in front of any filter: without the entry
    point's quieting, importing PyFlink's table API after Feast prints its deprecation warnings."""
    code = ("import warnings\n{quiet}import feast\nimport pyflink.table\n"
            "warnings.warn('streamlift: own warning')\n")
    loud = subprocess.run([sys.executable, "-c", code.format(quiet="")], capture_output=True, text=True, cwd=ROOT)
    assert "DeprecationWarning" in loud.stderr                    # the test can fail
    quiet = "from jobs.config import quiet_third_party_warnings\nquiet_third_party_warnings()\n"
    r = subprocess.run([sys.executable, "-c", code.format(quiet=quiet)], capture_output=True, text=True, cwd=ROOT)
    assert "DeprecationWarning" not in r.stderr and "streamlift: own warning" in r.stderr, r.stderr[-2000:]
