"""The ``edgefleet`` command: a lazy group over the programs' own CLIs.

Sub-commands are imported only when invoked, so ``edgefleet --help`` starts fast and
``edgefleet agent …`` on a device never imports the toolchain. Each entry below names the
module holding a Typer ``app`` whose top-level command or group has the same name.

This is the one place where errors become exit codes (:func:`exit_code_for`), for every
group alike: the programs' commands raise, the root prints one ``error: …`` line on stderr
and exits with the code below (``--debug`` shows the traceback instead).

    0    ok
    1    error: anything edgefleet refused or could not do (the line says what)
    2    usage: an unknown command, option or a bad option value (click's own)
    3    over budget: the model, or every variant, does not fit the profile's budget
    4    address in use: a port to listen on (API, embedded broker) is taken
    5    unreachable: the fleet server or the broker does not answer
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import importlib
import logging
import os
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


def _load(name: str) -> Any:
    """The program's command object for ``name`` (Typer's, whichever click it is built on)."""
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
    subs = getattr(cmd, "commands", None)
    if subs is not None:
        return subs.get(name)
    return cmd if cmd.name == name else None


EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_OVER_BUDGET = 3
EXIT_ADDRESS_IN_USE = 4
EXIT_UNREACHABLE = 5
EXIT_INTERRUPTED = 130


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code for an error a command raised, or None for a bug (shown as a traceback).

    Most specific first: :class:`protocol.errors.OverBudget`, ``AddressInUse`` and
    ``Unreachable`` have their own codes; every other ``EdgefleetError`` is 1.
    """
    from protocol.errors import AddressInUse, EdgefleetError, OverBudget, Unreachable

    for kind, code in (
        (OverBudget, EXIT_OVER_BUDGET),
        (AddressInUse, EXIT_ADDRESS_IN_USE),
        (Unreachable, EXIT_UNREACHABLE),
        (EdgefleetError, EXIT_ERROR),
    ):
        if isinstance(exc, kind):
            return code
    return None


class LazyGroup(click.Group):
    """The root group. Typer (0.29+) builds on its own fork of click, so the root does not
    nest the programs' commands as click objects: :meth:`main` reads the root options and
    hands the rest of the command line to the program's own Typer group."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> Any:
        if cmd_name not in COMMANDS:
            return None
        return _load(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        prog = prog_name or "edgefleet"
        debug = bool(os.environ.get("EDGEFLEET_DEBUG"))
        while argv and argv[0] == "--debug":
            debug = True
            argv.pop(0)
        if not argv or argv[0].startswith("-") or argv[0] not in COMMANDS:
            # --help, --version, nothing, or an unknown command: click renders it.
            return super().main(argv, prog, complete_var, standalone_mode, **extra)
        if debug:
            # Libraries' own log lines (quantizers, amqtt, uvicorn) show with --debug.
            logging.basicConfig(level=logging.DEBUG)
        name = argv[0]
        try:
            module = importlib.import_module(COMMANDS[name][0])
        except ModuleNotFoundError as exc:
            return self._fail(
                f"'edgefleet {name}' needs a module that is not installed ({exc.name}); "
                "install the matching extra, e.g. pip install 'edgefleet[all]'",
                EXIT_ERROR,
                standalone_mode,
            )
        import typer

        group = typer.main.get_command(module.app)
        if getattr(group, "commands", None) is None:
            argv = argv[1:]  # the module's app is that single command
        try:
            return group.main(args=argv, prog_name=prog, standalone_mode=standalone_mode)
        except Exception as exc:  # mapped below; anything unmapped is a bug and re-raised
            code = exit_code_for(exc)
            if code is None or debug:
                raise
            return self._fail(str(exc), code, standalone_mode)

    @staticmethod
    def _fail(message: str, code: int, standalone_mode: bool) -> Any:
        click.echo(f"error: {message}", err=True)
        if standalone_mode:
            sys.exit(code)
        raise SystemExit(code)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--debug",
    is_flag=True,
    help="Show tracebacks and library logs instead of one-line errors (also EDGEFLEET_DEBUG=1).",
)
@click.version_option(package_name="edgefleet")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """edgefleet: from a trained model to a healthy fleet of edge devices.

    \b
    Quick start:
      edgefleet demo                     # the whole story on an embedded broker
      edgefleet build model.joblib --data train.csv --target y --profile raspberry-pi-4 ...

    \b
    Exit codes: 0 ok, 1 error, 2 usage, 3 over budget, 4 address in use,
    5 server or broker unreachable, 130 interrupted.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main() -> None:
    cli(prog_name="edgefleet")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
