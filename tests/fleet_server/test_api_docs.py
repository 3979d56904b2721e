"""docs/api.md must not drift: the paged lists it names and the limits it states."""

from __future__ import annotations

from pathlib import Path

from fleet_server.app import create_app
from fleet_server.pagination import DEFAULT_LIMIT, MAX_CURSOR_CHARS, MAX_LIMIT
from protocol import KeyPair
from tests.fleet_server.test_api import Fleet

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_api_doc_names_every_paged_list_and_its_limits(
    tmp_path: Path, signing_key: KeyPair
) -> None:
    fleet = Fleet(tmp_path, signing_key)
    try:
        spec = create_app(fleet.service).openapi()
    finally:
        fleet.service.repo.close()
    paged = {
        path
        for path, ops in spec["paths"].items()
        if "get" in ops
        and {"limit", "cursor"} <= {p["name"] for p in ops["get"].get("parameters", [])}
    }
    assert paged == {
        "/v1/devices",
        "/v1/bundles",
        "/v1/rollouts",
        "/v1/drift",
        "/v1/events",
        "/v1/audit",
    }
    text = DOC.read_text()
    for path in paged:
        assert f"| `GET {path}` |" in text, path
    assert f"`limit`: 1 to {MAX_LIMIT}; {DEFAULT_LIMIT} when absent" in text
    assert f"at most {MAX_CURSOR_CHARS} characters" in text
