"""Drift hooks: webhook POST, command with JSON on stdin; failures logged, never raised."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import pytest

from fleet_server.errors import ConfigError
from fleet_server.hooks import CommandHook, WebhookHook, make_hook
from tests.support.brokers import free_port

RESULT = {"model": "iris", "version": "1.0.0", "dataset_drift": True, "drifted_share": 0.75}


class _Receiver(BaseHTTPRequestHandler):
    bodies: ClassVar[list[bytes]] = []
    status = 200

    def do_POST(self) -> None:
        n = int(self.headers["content-length"])
        type(self).bodies.append(self.rfile.read(n))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def receiver():
    handler = type("Receiver", (_Receiver,), {"bodies": [], "status": 200})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/retrain", handler
    server.shutdown()
    server.server_close()


def test_webhook_posts_the_drift_result_as_json(receiver):
    url, handler = receiver
    assert make_hook(webhook=url, background=False)(RESULT) is True
    body = json.loads(handler.bodies[0])
    assert body["event"] == "drift" and body["model"] == "iris" and body["drifted_share"] == 0.75


def test_webhook_error_answer_is_logged_not_raised(receiver, caplog):
    url, handler = receiver
    handler.status = 500
    with caplog.at_level(logging.WARNING, "fleet_server.hooks"):
        assert WebhookHook(url)(RESULT) is False
    assert "HTTP 500" in caplog.text


def test_webhook_to_nothing_listening_is_logged_not_raised(caplog):
    with caplog.at_level(logging.WARNING, "fleet_server.hooks"):
        assert WebhookHook(f"http://127.0.0.1:{free_port()}/x", timeout=1.0)(RESULT) is False
    assert "failed" in caplog.text


def test_command_gets_the_result_json_on_stdin(tmp_path):
    out = tmp_path / "got.json"
    script = f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())"
    assert CommandHook([sys.executable, "-c", script])(RESULT) is True
    assert json.loads(out.read_text())["version"] == "1.0.0"


def test_command_string_is_split_without_a_shell(tmp_path):
    marker = tmp_path / "pwned"
    hook = CommandHook(f"{sys.executable} -c pass ; touch {marker}")
    hook(RESULT)  # python ignores the extra argv; no shell runs `touch`
    assert not marker.exists()


def test_failing_or_missing_command_is_logged_not_raised(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "fleet_server.hooks"):
        fail = CommandHook([sys.executable, "-c", "import sys; sys.exit('no retraining today')"])
        assert fail(RESULT) is False
        assert CommandHook([str(tmp_path / "does-not-exist")])(RESULT) is False
    assert "no retraining today" in caplog.text and "does-not-exist" in caplog.text


def test_make_hook_with_nothing_configured_is_none_and_bad_url_is_a_config_error():
    assert make_hook() is None
    with pytest.raises(ConfigError, match="drift_webhook"):
        make_hook(webhook="ftp://example/x")


def test_make_hook_runs_webhook_and_command_in_the_background(receiver, tmp_path):
    url, handler = receiver
    out = tmp_path / "got.json"
    script = f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())"
    hook = make_hook(webhook=url, command=[sys.executable, "-c", script])
    assert hook(RESULT) is True  # dispatched; the work happens on a thread
    deadline = time.monotonic() + 10
    while not (handler.bodies and out.exists() and out.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert json.loads(handler.bodies[0])["model"] == "iris"
    assert json.loads(out.read_text())["model"] == "iris"
