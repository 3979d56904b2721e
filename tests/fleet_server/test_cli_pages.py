"""The CLI reads lists page by page: every page by default, one page with ``--limit``."""

from __future__ import annotations

import re

import pytest

from fleet_server import client as client_module
from tests.fleet_server.test_api import Fleet
from tests.fleet_server.test_cli import fleet, run  # noqa: F401 (the fixture)


def _seed(fleet: Fleet, n: int) -> list[str]:  # noqa: F811
    ids = [f"dev-{i:03d}" for i in range(n)]
    for i, d in enumerate(ids):
        fleet.service.repo.upsert_device(d, profile="host", online=1, tags=["lab"] if i % 2 else [])
    return ids


def _listed(output: str) -> list[str]:
    return re.findall(r"dev-\d{3}", output)


def test_devices_list_reads_every_page(
    fleet: Fleet,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = _seed(fleet, 12)
    monkeypatch.setattr(client_module, "PAGE_SIZE", 5)  # 3 pages
    r = run("fleet", "devices", "list", token=fleet.tokens["viewer"])
    assert r.exit_code == 0, r.output
    assert _listed(r.output) == ids
    assert "12 devices" in r.output and "next page" not in r.output
    r = run("fleet", "devices", "list", "--tag", "lab", token=fleet.tokens["viewer"])
    assert _listed(r.output) == ids[1::2]


def test_devices_list_with_limit_shows_one_page_and_the_next_command(fleet: Fleet) -> None:  # noqa: F811
    ids = _seed(fleet, 7)
    token = fleet.tokens["viewer"]
    seen: list[str] = []
    args = ["fleet", "devices", "list", "--limit", "3"]
    for _ in range(3):
        r = run(*args, token=token)
        assert r.exit_code == 0, r.output
        seen += _listed(r.output)
        nxt = re.search(r"next page: edgefleet (.*)", r.output)
        if nxt is None:
            break
        args = nxt.group(1).split()
    assert seen == ids


@pytest.mark.parametrize(
    ("args", "field"),
    [(["--cursor", "garbage!"], "cursor"), (["--limit", "3", "--cursor", "W10"], "cursor")],
)
def test_devices_list_with_a_bad_cursor_says_so_in_one_line(
    fleet: Fleet,  # noqa: F811
    args: list[str],
    field: str,
) -> None:
    _seed(fleet, 2)
    r = run("fleet", "devices", "list", *args, token=fleet.tokens["viewer"])
    assert r.exit_code != 0
    out = r.output.strip()
    assert field in out and "Traceback" not in out and len(out.splitlines()) == 1, out


def test_devices_list_refuses_a_limit_above_the_servers_page(fleet: Fleet) -> None:  # noqa: F811
    r = run("fleet", "devices", "list", "--limit", "5000", token=fleet.tokens["viewer"])
    assert r.exit_code == 2 and "--limit" in r.output
