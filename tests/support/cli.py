"""Run ``edgefleet …`` in-process through the root CLI, as a user's shell would.

The root (``edgefleet/cli.py``) is the one place errors become exit codes, so command tests
go through it rather than through a program's Typer app.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from click.testing import CliRunner, Result


def run_cli(args: Sequence[object], env: Mapping[str, str] | None = None, **kw: object) -> Result:
    """``edgefleet ARGS`` with stdout and stderr captured (``result.stderr`` is separate)."""
    from edgefleet.cli import cli

    runner = CliRunner(env={"COLUMNS": "200", **(env or {})})
    return runner.invoke(cli, [str(a) for a in args], prog_name="edgefleet", **kw)  # type: ignore[arg-type]
