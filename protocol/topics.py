"""MQTT topic names. The prefix is configurable (default ``edgefleet``).

{p}/devices/{id}/state                      retained birth / last will (DeviceState)
{p}/devices/{id}/cmd                        server → device commands (Command)
{p}/devices/{id}/status                     device → server command progress (CommandStatus)
{p}/artifacts/{sha256}/{chunk}              server → devices: an artifact's chunks (ArtifactChunk),
                                            QoS 1, retained, published once for every device
{p}/devices/{id}/artifact/{sha256}/{chunk}  older servers' per-device chunks (still accepted)
{p}/devices/{id}/telemetry/metrics          device → server (MetricsReport)
{p}/devices/{id}/telemetry/sketch           device → server (SketchReport)
{p}/alerts                                  server → anyone (Alert)
{p}/fleet/kex                               retained fleet X25519 key (KexAnnouncement)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "edgefleet"
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def valid_device_id(device_id: str) -> bool:
    return bool(DEVICE_ID_RE.match(device_id))


@dataclass(frozen=True)
class ParsedTopic:
    device_id: str
    kind: str  # state | cmd | status | artifact | metrics | sketch
    rest: tuple[str, ...] = ()


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def _dev(self, device_id: str) -> str:
        if not valid_device_id(device_id):
            raise ValueError(f"invalid device id {device_id!r}")
        return f"{self.prefix}/devices/{device_id}"

    def state(self, device_id: str) -> str:
        return f"{self._dev(device_id)}/state"

    def cmd(self, device_id: str) -> str:
        return f"{self._dev(device_id)}/cmd"

    def status(self, device_id: str) -> str:
        return f"{self._dev(device_id)}/status"

    def artifact(self, device_id: str, sha256: str, chunk: int) -> str:
        return f"{self._dev(device_id)}/artifact/{sha256}/{chunk}"

    def artifact_filter(self, device_id: str) -> str:
        return f"{self._dev(device_id)}/artifact/#"

    def artifact_chunk(self, sha256: str, chunk: int) -> str:
        """Chunk ``chunk`` of artifact ``sha256``: one topic whoever receives it."""
        if not _SHA256_RE.match(sha256):
            raise ValueError(f"invalid artifact sha256 {sha256[:80]!r}")
        return f"{self.prefix}/artifacts/{sha256}/{chunk}"

    def artifact_chunks(self, sha256: str) -> str:
        """A device subscribes to this while it downloads ``sha256``."""
        if not _SHA256_RE.match(sha256):
            raise ValueError(f"invalid artifact sha256 {sha256[:80]!r}")
        return f"{self.prefix}/artifacts/{sha256}/+"

    def parse_artifact_chunk(self, topic: str) -> tuple[str, int] | None:
        """``(sha256, index)`` of a shared chunk topic; None for any other topic."""
        head = f"{self.prefix}/artifacts/"
        if not topic.startswith(head):
            return None
        sha, _, index = topic[len(head) :].partition("/")
        if not _SHA256_RE.match(sha) or not re.fullmatch(r"[0-9]{1,6}", index):
            return None
        return sha, int(index)

    def metrics(self, device_id: str) -> str:
        return f"{self._dev(device_id)}/telemetry/metrics"

    def sketch(self, device_id: str) -> str:
        return f"{self._dev(device_id)}/telemetry/sketch"

    def alerts(self) -> str:
        return f"{self.prefix}/alerts"

    def kex(self) -> str:
        """The fleet's X25519 key, signed by its command key (protocol.device_mac)."""
        return f"{self.prefix}/fleet/kex"

    # Server-side subscription filters.
    def all_states(self) -> str:
        return f"{self.prefix}/devices/+/state"

    def all_status(self) -> str:
        return f"{self.prefix}/devices/+/status"

    def all_telemetry(self) -> str:
        return f"{self.prefix}/devices/+/telemetry/+"

    def parse(self, topic: str) -> ParsedTopic | None:
        parts = topic.split("/")
        head = self.prefix.split("/")
        n = len(head)
        if parts[:n] != head or len(parts) < n + 3 or parts[n] != "devices":
            return None
        device_id, kind, rest = parts[n + 1], parts[n + 2], tuple(parts[n + 3 :])
        if not valid_device_id(device_id):
            return None
        if kind == "telemetry" and len(rest) == 1 and rest[0] in ("metrics", "sketch"):
            return ParsedTopic(device_id, rest[0])
        if kind in ("state", "cmd", "status") and not rest:
            return ParsedTopic(device_id, kind)
        if kind == "artifact" and len(rest) == 2:
            return ParsedTopic(device_id, kind, rest)
        return None


def shared(topic_filter: str, group: str) -> str:
    """MQTT 5 shared subscription filter (``$share/group/filter``)."""
    return f"$share/{group}/{topic_filter}"
