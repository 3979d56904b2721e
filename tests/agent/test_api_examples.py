"""The inference API examples in README.md and docs/agent.md, run as written against a
real agent (uvicorn on a loopback port, serving an iris bundle), so the docs cannot drift."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.config import AgentConfig, ApiConfig, TrustConfig
from agent.daemon import Agent
from protocol import KeyPair
from protocol.transport import MemoryBroker
from tests.support.bundles import make_bundle

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED = "127.0.0.1:8765"
SECTIONS = {
    "README.md": "### Calling the inference API on a device",
    "docs/agent.md": "## The local inference API",
}


def section(path: str) -> str:
    text = (ROOT / path).read_text(encoding="utf-8")
    start = text.index(SECTIONS[path])
    rest = text[start + len(SECTIONS[path]) :]
    end = re.search(r"^#{2,3} ", rest, re.M)
    return rest[: end.start()] if end else rest


def blocks(path: str) -> list[tuple[str, str]]:
    return re.findall(r"```(bash|python)\n(.*?)```", section(path), re.S)


@pytest.fixture(scope="module")
def agent_url(tmp_path_factory: pytest.TempPathFactory, signing_key: KeyPair) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("api-docs")
    (tmp / "release.pub").write_bytes(signing_key.public_pem())
    cfg = AgentConfig(
        device_id="docs-agent",
        data_dir=tmp / "data",
        api=ApiConfig(port=0),
        trust=TrustConfig(bundle_keys=[tmp / "release.pub"]),
    )
    agent = Agent(cfg, transport=MemoryBroker().client("docs-agent")).start()
    try:
        agent.installer.install_bytes(make_bundle(signing_key)[0])
        assert agent.api_url is not None
        yield agent.api_url.removeprefix("http://")
    finally:
        agent.stop()


def test_readme_and_agent_guide_show_the_same_examples() -> None:
    readme, guide = blocks("README.md"), blocks("docs/agent.md")
    assert readme == guide
    kinds = [k for k, _ in readme]
    assert kinds.count("bash") == 2 and kinds.count("python") == 1
    assert any('"inputs"' in code for _, code in readme)
    assert any('"instances"' in code for _, code in readme)


@pytest.mark.parametrize("index", [0, 1])
def test_curl_examples_answer_as_documented(agent_url: str, index: int) -> None:
    kind, code = blocks("docs/agent.md")[index]
    assert kind == "bash" and DOCUMENTED in code
    out = subprocess.run(
        ["bash", "-c", code.replace(DOCUMENTED, agent_url)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["model"]["name"] == "iris" and answer["labels"]
    assert len(answer["probabilities"][0]) == 3


def test_python_example_answers_as_documented(agent_url: str) -> None:
    kind, code = blocks("docs/agent.md")[2]
    assert kind == "python" and DOCUMENTED in code
    out = subprocess.run(
        [sys.executable, "-c", code.replace(DOCUMENTED, agent_url)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"\[\d, \d\] \[\[[0-9., e-]+\]\]\n", out.stdout), out.stdout


def test_the_documented_error_is_the_real_one(agent_url: str) -> None:
    text = " ".join(section("docs/agent.md").split())
    r = httpx.post(f"http://{agent_url}/v1/predict", json={"inputs": [[5.1, 3.5, 1.4]]})
    assert r.status_code == 422
    body = json.dumps(r.json())
    assert f"`422 {body}`" in text, body
