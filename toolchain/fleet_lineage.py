"""Ask a fleet server where a bundle has been: its release-channel lineage.

Used by ``edgefleet inspect BUNDLE --server URL``. The toolchain never imports the fleet
server: this is one GET on the REST API (``/v1/bundles/{sha256}/lineage``, viewer token)
with the standard library, the bundle named by the sha256 of the file's bytes. Network and
HTTP errors become :class:`FleetLookupError` here, with one readable line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import ToolchainError

MAX_ANSWER_BYTES = 4 * 1024 * 1024


class FleetLookupError(ToolchainError):
    """The fleet server could not be asked, or refused the question."""


def bundle_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lineage(server: str, token: str | None, path: Path, timeout: float = 10.0) -> dict[str, Any]:
    """The server's lineage answer for the bundle file at ``path``."""
    import urllib.error
    import urllib.request

    base = server.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise FleetLookupError(f"--server must be an http(s) URL, got {server!r}")
    url = f"{base}/v1/bundles/{bundle_sha256(path)}/lineage"
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read(MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as exc:
        detail = _detail(exc.read(64 * 1024))
        hint = " (set EDGEFLEET_TOKEN or --token)" if exc.code == 401 else ""
        raise FleetLookupError(f"fleet server {base}: {exc.code}: {detail}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FleetLookupError(f"cannot reach the fleet server at {base}: {reason}") from None
    if len(body) > MAX_ANSWER_BYTES:
        raise FleetLookupError(f"fleet server {base}: answer over {MAX_ANSWER_BYTES} bytes")
    try:
        out = json.loads(body)
    except ValueError:
        raise FleetLookupError(f"fleet server {base}: the answer is not JSON") from None
    if not isinstance(out, dict) or not isinstance(out.get("lineage"), list):
        raise FleetLookupError(f"fleet server {base}: the answer has no lineage")
    return out


def _detail(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace")
    return str(data.get("detail") if isinstance(data, dict) else data)[:300]
