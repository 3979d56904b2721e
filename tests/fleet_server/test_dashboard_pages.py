"""The dashboard's lists in pages, in-process: rollouts 50 a page with an "older" link."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_server.rollout_engine import Rollout, RolloutSpec
from protocol import KeyPair
from tests.fleet_server.test_dashboard import Fleet, bundles  # noqa: F401 (fixture)


@pytest.fixture
def fleet(tmp_path: Path, signing_key: KeyPair, bundles: dict[str, bytes]) -> Iterator[Fleet]:  # noqa: F811
    f = Fleet(tmp_path, signing_key, bundles)
    yield f
    f.service.repo.close()


def test_rollouts_page_shows_50_newest_and_links_to_older(fleet: Fleet) -> None:
    sha = fleet.v1["sha256"]
    for i in range(60):  # written through the registry: a list test needs many rows
        r = Rollout.plan(f"r-{i:04d}", RolloutSpec(bundle_sha256=sha, stages=(100,)), ["x"], i)
        fleet.service.repo.save_rollout(r.to_dict(), sha)
    b = fleet.browser("viewer")
    first = b.get("/ui/rollouts").text
    shown = re.findall(r'href="/ui/rollouts/(r-\d{4})"', first)
    assert shown == [f"r-{i:04d}" for i in reversed(range(10, 60))]
    older = re.search(r'href="(\?cursor=[^"]+)" class="next"', first)
    assert older is not None and 'class="first"' not in first
    rest = b.get("/ui/rollouts" + older.group(1).replace("&amp;", "&")).text
    assert re.findall(r'href="/ui/rollouts/(r-\d{4})"', rest) == [
        f"r-{i:04d}" for i in reversed(range(10))
    ]
    assert 'class="next"' not in rest and 'href="/ui/rollouts" class="first"' in rest
    bad = b.get("/ui/rollouts?cursor=WyJkZXZpY2VzIixbIngiXV0")  # a devices cursor
    assert bad.status_code == 422 and "cursor" in bad.text
