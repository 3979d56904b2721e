"""The drift hook: tell a retraining pipeline that a model drifted.

Two kinds, chosen in ``[hooks]`` of fleet.toml:

- ``drift_webhook = "https://ci.example/retrain"``: POST the drift result as JSON (httpx,
  short timeout).
- ``drift_command = "retrain.sh --model iris"``: run the command (split like a shell would,
  but **no shell**) with the drift result JSON on stdin.

A hook never raises: a failing webhook or command is logged (``fleet_server.hooks``) and
the fleet server carries on. :func:`make_hook` runs it on a short-lived background thread
by default, so a slow webhook never stalls the engine tick that found the drift; the
classes themselves are synchronous and return whether the hook succeeded.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

Hook = Callable[[dict[str, Any]], bool]


class WebhookHook:
    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"hooks.drift_webhook must be an http(s) URL, got {url!r}",
                field="hooks.drift_webhook",
            )
        self.url = url
        self.timeout = timeout

    def __call__(self, result: dict[str, Any]) -> bool:
        import httpx

        try:
            resp = httpx.post(
                self.url,
                content=_body(result),
                timeout=self.timeout,
                headers={"content-type": "application/json"},
            )
        except httpx.HTTPError as exc:
            log.warning("drift webhook %s failed: %s", self.url, exc)
            return False
        if resp.status_code >= 400:
            log.warning("drift webhook %s answered HTTP %d", self.url, resp.status_code)
            return False
        return True


class CommandHook:
    def __init__(self, command: str | Sequence[str], *, timeout: float = 30.0) -> None:
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise ConfigError("hooks.drift_command is empty", field="hooks.drift_command")
        self.argv = argv
        self.timeout = timeout

    def __call__(self, result: dict[str, Any]) -> bool:
        try:
            proc = subprocess.run(
                self.argv,
                input=_body(result),
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("drift command %s failed: %s", self.argv[0], exc)
            return False
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            log.warning(
                "drift command %s exited %d%s",
                self.argv[0],
                proc.returncode,
                f": {err[-1]}" if err else "",
            )
            return False
        return True


def _body(result: dict[str, Any]) -> bytes:
    return json.dumps({"event": "drift", **result}, default=str).encode()


def make_hook(
    webhook: str | None = None,
    command: str | Sequence[str] | None = None,
    *,
    timeout: float | None = None,
    background: bool = True,
) -> Hook | None:
    """The configured hook (both when both are set), or None when neither is.

    With ``background`` (default) the call returns at once and the hook runs on a daemon
    thread; the returned bool then only says that it was dispatched.
    """
    hooks: list[Hook] = []
    if webhook:
        hooks.append(WebhookHook(webhook, timeout=timeout or 5.0))
    if command:
        hooks.append(CommandHook(command, timeout=timeout or 30.0))
    if not hooks:
        return None

    def run_all(result: dict[str, Any]) -> bool:
        return all([h(result) for h in hooks])

    if not background:
        return hooks[0] if len(hooks) == 1 else run_all

    def dispatch(result: dict[str, Any]) -> bool:
        threading.Thread(target=run_all, args=(result,), name="drift-hook", daemon=True).start()
        return True

    return dispatch
