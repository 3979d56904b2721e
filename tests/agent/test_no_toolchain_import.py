"""The agent must run with ``pip install 'edgefleet[agent]'`` alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = [
    "sklearn", "skl2onnx", "tensorflow", "toolchain", "onnx", "keras", "pandas",
    # the converter extras: xgboost, lightgbm, catboost, torch and their ONNX converters
    "xgboost", "lightgbm", "catboost", "torch", "onnxmltools", "onnxscript", "tf2onnx",
]  # fmt: skip


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


def test_root_cli_runs_agent_help_without_toolchain_imports() -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import edgefleet.cli
        sys.argv = ["edgefleet", "agent", "--help"]
        try:
            edgefleet.cli.main()
        except SystemExit as exc:
            print("EXIT", exc.code)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})
        print("LOADED", bad)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "EXIT 0" in out.stdout, out.stdout + out.stderr
    assert "rollback" in out.stdout
    assert "LOADED []" in out.stdout, out.stdout[-2000:]
