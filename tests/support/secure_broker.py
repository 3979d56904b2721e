"""Mosquitto running the shipped deploy/ config: TLS, per-device passwords, pattern ACLs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support.brokers import Mosquitto, free_port
from tests.support.pki import make_pki

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
SERVER_USER = "edgefleet-server"


def secure_mosquitto(folder: Path, users: dict[str, str]) -> tuple[Mosquitto, dict[str, Path]]:
    """Return a started Mosquitto on the deploy config, and the PKI paths."""
    etc = folder / "etc"
    (etc / "data").mkdir(parents=True)
    pki = make_pki(etc)
    shutil.copy(DEPLOY / "acl", etc / "acl")
    passwd = etc / "passwd"
    passwd.touch(mode=0o600)
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True)
    port = free_port()
    conf = (DEPLOY / "mosquitto.conf").read_text()
    assert "listener 8883\n" in conf
    conf = conf.replace("/etc/mosquitto/edgefleet", str(etc)).replace(
        "listener 8883\n", f"listener {port} 127.0.0.1\n"
    )
    broker = Mosquitto(config=conf.replace("{", "{{").replace("}", "}}"), port=port)
    broker.start()
    return broker, pki
