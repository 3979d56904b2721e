"""Write measured speed factors into profile files (``edgefleet profiles calibrate``).

The fleet server derives, per profile, the median device/host latency ratio of field
benchmarks (``GET /v1/calibration``). :func:`with_measured` puts it into the profile's TOML
text as a ``[measured]`` table, replacing an older one and leaving every other line (the
estimate and its comment included) as it was; the result is validated before it is written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from protocol.errors import ProfileError
from protocol.profiles import DeviceProfile, parse_profile

_TABLE = re.compile(r"^\s*\[\[?\s*[A-Za-z0-9_.\"-]+\s*\]\]?\s*(#.*)?$")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(round(float(v), 6)) if isinstance(v, float) else str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    text = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def with_measured(text: str, measured: dict[str, Any]) -> str:
    """``text`` with its ``[measured]`` table replaced by ``measured`` (validated)."""
    lines = text.splitlines()
    out: list[str] = []
    skipping = False
    for line in lines:
        if line.strip().startswith("[measured]"):
            skipping = True
            continue
        if skipping and _TABLE.match(line):
            skipping = False
        if not skipping:
            out.append(line)
    while out and not out[-1].strip():
        out.pop()
    keys = ("speed_factor", "devices", "spread", "date", "bundles", "source")
    table = [
        "",
        "# Measured by edgefleet field benchmarks (edgefleet profiles calibrate --from-fleet);",
    ]
    table.append("# bench and optimize use this factor instead of the estimate above.")
    table.append("[measured]")
    for k in keys:
        if measured.get(k) is not None:
            table.append(f"{k} = {_toml_value(measured[k])}")
    new = "\n".join(out + table) + "\n"
    parse_profile(new, "<calibrated profile>")
    return new


def profile_path(name: str, folder: Path | None = None) -> Path:
    """The file a profile is read from (or, with ``folder``, the file it should go to)."""
    from protocol.profiles import _dirs

    if folder is not None:
        return folder / f"{name}.toml"
    for d in _dirs():
        path = d / f"{name}.toml"
        if path.is_file():
            return path
    raise ProfileError(f"unknown profile {name!r}")


def calibrate(
    data: dict[str, Any],
    *,
    names: list[str] | None = None,
    folder: Path | None = None,
    min_devices: int = 1,
    dry_run: bool = False,
) -> list[tuple[DeviceProfile, Path]]:
    """Write each profile's ``[measured]`` table from the server's calibration answer."""
    done = []
    for entry in data.get("profiles", []):
        name = entry["profile"]
        if names and name not in names:
            continue
        if int(entry.get("devices", 0)) < min_devices:
            continue
        source = profile_path(name)
        target = profile_path(name, folder)
        text = source.read_text(encoding="utf-8")
        measured = {
            "speed_factor": float(entry["speed_factor"]),
            "devices": int(entry["devices"]),
            "spread": float(entry.get("spread") or 0.0),
            "date": str(entry["date"]),
            "bundles": list(entry.get("bundles") or [])[:64],
        }
        new = with_measured(text, measured)
        if not dry_run:
            tmp = target.with_suffix(".toml.tmp")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(new, encoding="utf-8")
                os.replace(tmp, target)
            except OSError as exc:
                from .errors import ToolchainError

                raise ToolchainError(
                    f"cannot write {target}: {exc.strerror}; choose a folder with --dir "
                    "(and add it to EDGEFLEET_PROFILES_DIR)"
                ) from None
        done.append((parse_profile(new, str(target)), target))
    return done


def fetch_calibration(url: str, token: str | None, timeout: float = 30.0) -> dict[str, Any]:
    """``GET /v1/calibration`` from a fleet server."""
    import json
    import urllib.error
    import urllib.request

    from .errors import ToolchainError

    req = urllib.request.Request(url.rstrip("/") + "/v1/calibration")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read(16 * 1024 * 1024 + 1)
    except urllib.error.HTTPError as exc:
        raise ToolchainError(f"fleet server answered {exc.code} for /v1/calibration") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ToolchainError(f"cannot reach the fleet server at {url}: {exc}") from None
    if len(body) > 16 * 1024 * 1024:
        raise ToolchainError("the calibration answer is over 16 MiB")
    try:
        data: dict[str, Any] = json.loads(body)
    except ValueError:
        raise ToolchainError("the fleet server's calibration answer is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), list):
        raise ToolchainError("the fleet server's calibration answer has no profiles list")
    return data
