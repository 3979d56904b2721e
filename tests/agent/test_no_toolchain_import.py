"""The agent must run with ``pip install 'edgefleet[agent]'`` alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ["sklearn", "skl2onnx", "tensorflow", "toolchain", "onnx", "keras", "pandas"]


def test_agent_cli_and_modules_import_nothing_from_the_toolchain() -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import edgefleet.cli
        from agent.cli import app
        try:
            app(["agent", "--help"], prog_name="edgefleet")
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        try:  # the root command as a device runs it
            edgefleet.cli.cli(["agent", "--help"], prog_name="edgefleet")
        except SystemExit:
            pass
        import agent, agent.predictor, agent.app, agent.installer, agent.prediction_log, agent.slots
        from agent.config import AgentConfig
        from agent.app import create_app
        from agent.predictor import Predictor
        create_app(Predictor(), config=AgentConfig())
        bad = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})
        print("LOADED", bad)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout[-2000:]
    assert "install" in out.stdout and "rollback" in out.stdout  # the help was printed


def test_importing_agent_does_not_load_runtimes_or_web_stack() -> None:
    heavy = ("onnxruntime", "fastapi", "paho", "ai_edge_litert")
    script = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); import agent; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
