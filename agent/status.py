"""Offline status of an agent: what is installed, what is active, log health.

Used by ``edgefleet agent status`` and by the local API; reads only ``data_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import AgentConfig
from .errors import SlotError
from .identity import KEY_FILE
from .prediction_log import LOG_FILE
from .runtimes import runtime_versions
from .slots import Slots


@dataclass
class SlotInfo:
    slot: str
    name: str
    version: str
    release: int
    active: bool
    ok: bool
    problem: str = ""


@dataclass
class AgentStatus:
    device_id: str
    profile: str
    data_dir: str
    active: str | None
    slots: list[SlotInfo] = field(default_factory=list)
    runtimes: dict[str, str] = field(default_factory=dict)
    log_rows: int | None = None
    device_key_id: str | None = None  # compare with `edgefleet fleet devices pending`

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def agent_status(config: AgentConfig) -> AgentStatus:
    slots = Slots(config.data_dir / "slots", config.slots.keep_previous)
    active = slots.active_id()
    infos = []
    for slot in reversed(slots.order()):
        try:
            m = slots.load(slot).manifest
            infos.append(SlotInfo(slot, m.name, m.version, m.release, slot == active, True))
        except SlotError as exc:
            infos.append(SlotInfo(slot, "?", "?", int(slot[1:9]), slot == active, False, str(exc)))
    log_rows = None
    db_path = config.data_dir / LOG_FILE
    if db_path.is_file():
        import sqlite3

        try:
            con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
            try:
                log_rows = con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error:
            log_rows = None
    key_id = None
    key_file = config.data_dir / KEY_FILE
    if key_file.is_file():
        from protocol.errors import ProtocolError
        from protocol.signing import load_private_key

        try:
            key_id = load_private_key(key_file.read_bytes()).key_id
        except (OSError, ProtocolError):
            key_id = None
    return AgentStatus(
        device_id=config.device_id,
        profile=config.profile,
        data_dir=str(config.data_dir),
        active=active,
        slots=infos,
        runtimes=runtime_versions(),
        log_rows=log_rows,
        device_key_id=key_id,
    )
