"""The ``edgefleet`` command: a lazy group over the programs' own CLIs.

Sub-commands are imported only when invoked, so ``edgefleet --help`` starts fast and
``edgefleet agent …`` on a device never imports the toolchain. Each entry below names the
module holding a Typer ``app`` whose top-level command or group has the same name.

Errors derived from :class:`protocol.EdgefleetError` become one readable line on stderr and
exit code 1 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

# name → (module with a Typer `app`, one-line help shown by `edgefleet --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "build": ("toolchain.cli", "Convert, optimize and package a model in one step."),
    "convert": ("toolchain.cli", "Convert a scikit-learn, ONNX or Keras model and check parity."),
    "quantize": ("toolchain.cli", "Quantize an ONNX or TFLite model (dynamic, static, fp16)."),
    "bench": ("toolchain.cli", "Benchmark a model against a device profile's budget."),
    "optimize": ("toolchain.cli", "Try every variant and pick the best that fits the profile."),
    "package": ("toolchain.cli", "Package a model as a signed .efb bundle."),
    "verify": ("toolchain.cli", "Verify a bundle's signature, hashes and validity."),
    "inspect": ("toolchain.cli", "Show a readable summary of a bundle."),
    "keys": ("toolchain.cli", "Generate signing keys."),
    "profiles": ("toolchain.cli", "List and show device profiles."),
    "agent": ("agent.cli", "Run and manage the on-device agent."),
    "fleet": ("fleet_server.cli", "Run the fleet server and manage bundles and devices."),
    "rollout": ("fleet_server.cli", "Start and steer staged rollouts."),
    "drift": ("fleet_server.cli", "Drift reports from merged device sketches."),
    "telemetry": ("fleet_server.cli", "Watch MQTT telemetry live."),
    "demo": ("edgefleet.demo_cli", "Run the whole story on the embedded broker."),
}


def _load(name: str) -> click.Command | None:
    module_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # A sub-command whose module is present but whose extra is not installed.
        raise click.ClickException(
            f"'edgefleet {name}' needs a module that is not installed ({exc.name}); "
            "install the matching extra, e.g. pip install 'edgefleet[all]'"
        ) from None
    import typer

    cmd = typer.main.get_command(module.app)
    if isinstance(cmd, click.Group):
        return cmd.commands.get(name)
    return cmd if cmd.name == name else None


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        return _load(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        from protocol.errors import EdgefleetError

        try:
            return super().invoke(ctx)
        except EdgefleetError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="edgefleet")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """edgefleet: from a trained model to a healthy fleet of edge devices.

    \b
    Quick start:
      edgefleet demo                     # the whole story on an embedded broker
      edgefleet build model.joblib --data train.csv --target y --profile raspberry-pi-4 ...
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main() -> None:
    cli(prog_name="edgefleet")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
