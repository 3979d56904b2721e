"""``deploy/cluster/``: PostgreSQL, the 3 NATS nodes and 2 fleet servers as one compose file.

There is no container engine here, so the compose file is checked, not run: it names the
whole topology, every file it mounts exists (and what is not committed, ``.env`` and
``secrets/``, is git-ignored), the NATS nodes run the configs ``deploy/nats`` runs, and each
``fleet-N.toml`` loads through the fleet server's own config loader and points at these
services. Then the configs are run, with only what compose provides moved to this machine
(hosts, the secrets folder, data_dir): ``edgefleet fleet token create`` with
``fleet-1.toml`` against a PostgreSQL 15 that demands the password, which reaches it only
through ``PGPASSWORD`` as compose passes it; and ``fleet serve`` with both configs on that
PostgreSQL and the 3 NATS nodes of ``deploy/nats``: both live, one runs the rollout tick.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from fleet_server.config import FleetConfig, load_config
from tests.support.cli import run_cli

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CLUSTER = DEPLOY / "cluster"
SERVICES = {"postgres", "nats-1", "nats-2", "nats-3", "fleet-1", "fleet-2"}
NATS = ("nats-1", "nats-2", "nats-3")
FLEETS = ("fleet-1", "fleet-2")
NOT_COMMITTED = {".env", "secrets"}  # made on the deployment host (deploy/README.md)
PASSWORD_REF = re.compile(r"^\$\{EDGEFLEET_DB_PASSWORD:\?[^}]+\}$")


def compose(path: Path = CLUSTER / "compose.yaml") -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path → host path of the service's bind mounts (short syntax), resolved
    against ``deploy/cluster`` as compose resolves them."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (CLUSTER / source).resolve()
    return mounts


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where ``container_path`` comes from on the host, through the service's bind mounts."""
    for target, source in bind_mounts(service).items():
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / Path(container_path).relative_to(target)
    raise AssertionError(f"{container_path} is in no bind mount of {service.get('hostname')}")


def mqtt_port() -> int:
    """The MQTT port every node listens on, from ``deploy/nats/cluster.conf``."""
    text = (DEPLOY / "nats" / "cluster.conf").read_text(encoding="utf-8")
    m = re.search(r"^mqtt \{\s*listen: [0-9.]+:(\d+)", text, re.M)
    assert m, "deploy/nats/cluster.conf has no mqtt listen line"
    return int(m.group(1))


def fleet_config(name: str) -> tuple[Path, FleetConfig]:
    """The fleet.toml the image's ``fleet serve`` reads (the Dockerfile's CMD), on the host,
    loaded by the fleet server's loader."""
    svc = services()[name]
    dockerfile = CLUSTER / svc["build"]["context"] / svc["build"]["dockerfile"]
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile.read_text(encoding="utf-8"), re.M)
    assert cmd, f"{dockerfile} has no CMD"
    args = json.loads(cmd.group(1))
    path = host_path(svc, args[args.index("--config") + 1])
    return path, load_config(path)


def test_compose_names_postgres_three_nats_nodes_and_two_fleet_servers() -> None:
    assert set(services()) == SERVICES
    assert services()["postgres"]["image"] == "postgres:15"
    for name in FLEETS:
        depends = services()[name]["depends_on"]
        assert set(depends) == {"postgres", *NATS}
        assert depends["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in services()["postgres"]
    named = {
        spec.split(":")[0]
        for svc in services().values()
        for spec in svc.get("volumes", [])
        if not spec.startswith((".", "/"))
    }
    assert named == set(compose()["volumes"])  # every named volume declared, none unused


def test_every_file_the_compose_file_mounts_or_builds_from_exists() -> None:
    checked = []
    for name, svc in services().items():
        for target, source in bind_mounts(svc).items():
            if source.relative_to(DEPLOY).parts[0] == "cluster" and source.name in NOT_COMMITTED:
                continue  # made by the user: see the next test
            assert source.exists(), f"{name} mounts {source} at {target}: missing"
            checked.append(source)
        if "build" in svc:
            context = CLUSTER / svc["build"]["context"]
            assert (context / svc["build"]["dockerfile"]).is_file(), name
            assert (context / "pyproject.toml").is_file(), f"{name}: context is not the repo"
    assert len(checked) == 5  # ../nats for three nodes, fleet-1.toml, fleet-2.toml


def test_what_is_not_committed_is_git_ignored_and_its_template_is() -> None:
    for rel in ("deploy/cluster/.env", "deploy/cluster/secrets/fleet-command.key"):
        ignored = subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO, check=False)
        assert ignored.returncode == 0, f"{rel} is not git-ignored"
    example = (CLUSTER / ".env.example").read_text(encoding="utf-8")
    assert re.search(r"^EDGEFLEET_DB_PASSWORD=", example, re.M)
    # the password reaches PostgreSQL and the fleet servers only through .env
    env = {name: services()[name]["environment"] for name in ("postgres", *FLEETS)}
    assert PASSWORD_REF.match(env["postgres"]["POSTGRES_PASSWORD"])
    for name in FLEETS:
        assert PASSWORD_REF.match(env[name]["PGPASSWORD"]), name


def test_nats_nodes_run_the_configs_and_mounts_of_deploy_nats() -> None:
    shipped = compose(DEPLOY / "nats" / "compose.yaml")["services"]
    for name in NATS:
        ours = services()[name]
        assert ours["image"] == shipped[name]["image"]
        assert ours["command"] == shipped[name]["command"] == ["-c", f"/etc/nats/{name}.conf"]
        assert ours["hostname"] == name
        assert host_path(ours, f"/etc/nats/{name}.conf") == DEPLOY / "nats" / f"{name}.conf"
        assert (DEPLOY / "nats" / f"{name}.conf").is_file()
        assert [v.split(":", 1)[1] for v in ours["volumes"]] == [
            v.split(":", 1)[1] for v in shipped[name]["volumes"]
        ]


def test_fleet_configs_load_and_select_the_compose_postgresql_without_its_password() -> None:
    for name in FLEETS:
        path, cfg = fleet_config(name)
        assert path == CLUSTER / f"{name}.toml"
        assert cfg.registry.url is not None
        url = urlparse(cfg.registry.url)
        assert url.scheme == "postgresql"
        assert (url.hostname, url.port) == ("postgres", 5432)
        assert url.password is None, f"{path}: the password belongs in .env"
        pg_env = services()["postgres"]["environment"]
        assert url.username == pg_env["POSTGRES_USER"]
        assert url.path == "/" + pg_env["POSTGRES_DB"]


def test_fleet_servers_list_every_nats_node_of_the_compose_file_in_their_own_order() -> None:
    nodes = {(services()[n]["hostname"], mqtt_port()) for n in NATS}
    orders, client_ids = [], []
    for name in FLEETS:
        _, cfg = fleet_config(name)
        urls = cfg.broker.all_urls()
        assert len(urls) == 3 and not cfg.broker.embedded
        parsed = [urlparse(u) for u in urls]
        assert {(u.hostname, u.port) for u in parsed} == nodes, f"{name}: {urls}"
        orders.append(tuple(u.hostname for u in parsed))
        client_ids.append(cfg.broker.client_id)
    assert len(set(orders)) == len(FLEETS), f"every fleet server starts on node {orders[0][0]}"
    assert orders[0][0] != orders[1][0]
    assert len(set(client_ids)) == len(FLEETS) and "edgefleet-server" not in client_ids


def test_fleet_servers_keep_keys_in_the_secrets_mount_and_data_in_their_own_volume() -> None:
    published, data_volumes = set(), set()
    for name in FLEETS:
        svc = services()[name]
        _, cfg = fleet_config(name)
        keys = [cfg.signing.command_key, *cfg.signing.bundle_keys]
        assert None not in keys and len(keys) == 2
        for key in keys:
            assert host_path(svc, str(key)).parent == CLUSTER / "secrets", key
        # the API listens on the container's port that compose publishes
        assert cfg.api.host == "0.0.0.0"
        ports = [p.split(":") for p in svc["ports"]]
        assert [int(c) for _, c in ports] == [cfg.api.port]
        published.update(h for h, _ in ports)
        # data_dir lies in a named volume of this service only
        volumes = [v.split(":") for v in svc["volumes"] if not v.startswith((".", "/"))]
        holding = [v for v, target in volumes if cfg.data_dir.is_relative_to(target)]
        assert len(holding) == 1, f"{name}: data_dir {cfg.data_dir} is in no volume"
        data_volumes.add(holding[0])
    assert len(published) == len(data_volumes) == len(FLEETS)


PASSWORD = "pw-from-env"


@pytest.fixture(scope="module")
def protected_postgres() -> Iterator[Any]:
    """A PostgreSQL 15 whose TCP connections need the password (the socket stays trusted),
    with the role and database ``fleet-N.toml`` name."""
    import psycopg

    from tests.support.postgres import PostgresServer, why_unavailable

    if why_unavailable():
        pytest.skip(str(why_unavailable()))
    with PostgresServer() as server:
        hba = server.data / "pg_hba.conf"
        lines = [ln for ln in hba.read_text().splitlines() if not ln.startswith("host")]
        hba.write_text("\n".join([*lines, "host all all 127.0.0.1/32 scram-sha-256", ""]))
        with psycopg.connect(
            host=str(server.dir), port=server.port, user="edgefleet", dbname="postgres"
        ) as conn:
            conn.autocommit = True
            conn.execute("set password_encryption = 'scram-sha-256'")
            conn.execute(f"alter role edgefleet password '{PASSWORD}'")
            conn.execute("create database edgefleet")
            conn.execute("select pg_reload_conf()")
        yield server


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    """The secrets folder as deploy/README.md makes it: ``edgefleet keys generate``."""
    folder = tmp_path / "secrets"
    for name in ("fleet-command", "release"):
        made = run_cli(["keys", "generate", "--out", folder, "--name", name])
        assert made.exit_code == 0, made.output
    return folder


def moved_here(
    name: str, folder: Path, secrets: Path, pg_port: int, nats: list[str] | None = None
) -> Path:
    """``deploy/cluster/NAME.toml`` as shipped, with what compose provides moved to this
    machine: the PostgreSQL host, the secrets folder, data_dir, and (given ``nats``, node 1
    to 3) the nodes' URLs. Nothing else is changed."""
    text = (CLUSTER / f"{name}.toml").read_text(encoding="utf-8")
    moves = {
        "@postgres:5432/": f"@127.0.0.1:{pg_port}/",
        "/run/edgefleet/secrets/": f"{secrets}/",
        '"/var/lib/edgefleet/fleet"': json.dumps(str(folder / "data")),
    }
    for i, url in enumerate(nats or [], start=1):
        moves[f"mqtt://nats-{i}:1883"] = url
    for old, new in moves.items():
        assert old in text, f"{name}.toml: {old}"
        text = text.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fleet.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def no_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither PGPASSWORD nor a ~/.pgpass entry: only what a test passes reaches libpq."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))


@pytest.mark.postgres
@pytest.mark.usefixtures("no_password")
def test_fleet_toml_reaches_a_password_protected_postgresql_with_pgpassword(
    tmp_path: Path, secrets: Path, protected_postgres: Any
) -> None:
    """``fleet-1.toml`` with the password only in PGPASSWORD, as compose.yaml passes it."""
    import psycopg

    config = moved_here("fleet-1", tmp_path / "fleet-1", secrets, protected_postgres.port)
    url = load_config(config).registry.url
    assert url is not None
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(url, connect_timeout=5).close()  # the URL alone does not get in
    made = run_cli(
        ["fleet", "token", "create", "--role", "operator", "--config", config],
        env={"PGPASSWORD": PASSWORD},
    )
    assert made.exit_code == 0, made.output
    assert made.stdout.strip()
    with psycopg.connect(url, password=PASSWORD) as conn:
        rows = conn.execute("select count(*) from tokens").fetchone()
    assert rows is not None and rows[0] == 1


@pytest.mark.slow
@pytest.mark.nats
@pytest.mark.postgres
@pytest.mark.usefixtures("no_password")
def test_both_fleet_configs_serve_together_on_one_registry_and_the_nats_cluster(
    tmp_path: Path, secrets: Path, protected_postgres: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What compose starts, without containers: the 3 nodes run from deploy/nats (moved to
    loopback), ``fleet serve`` with each shipped config (hosts moved here): both serve the
    API, see each other in the registry, and one of them runs the rollout tick."""
    import httpx

    from tests.e2e.support import wait_until
    from tests.support.brokers import free_port
    from tests.support.nats_cluster import NatsCluster
    from tests.support.nats_cluster import why_unavailable as nats_missing
    from tests.support.shipped import Process

    if nats_missing():
        pytest.skip(str(nats_missing()))
    monkeypatch.setenv("PGPASSWORD", PASSWORD)  # what compose.yaml sets; Process inherits it
    port = protected_postgres.port
    with NatsCluster() as nats, ExitStack() as stack:
        configs = {n: moved_here(n, tmp_path / n, secrets, port, nats.urls) for n in FLEETS}
        apis = {}
        for name, config in configs.items():
            api_port = free_port()
            args = ["fleet", "serve", "--config", str(config), "--host", "127.0.0.1"]
            fleet = stack.enter_context(
                Process([*args, "--port", str(api_port)], tmp_path / f"{name}.log")
            )
            apis[name] = (fleet, f"http://127.0.0.1:{api_port}")
        for fleet, api in apis.values():
            fleet.wait_http(f"{api}/v1/health", timeout=120)
        made = run_cli(
            ["fleet", "token", "create", "--role", "viewer", "--config", configs["fleet-2"]]
        )
        assert made.exit_code == 0, made.output
        auth = {"authorization": f"Bearer {made.stdout.strip()}"}

        def both_live_one_leader() -> list[dict[str, Any]] | None:
            views = [
                httpx.get(f"{api}/v1/cluster", headers=auth).json() for _, api in apis.values()
            ]
            live = [{p["process_id"] for p in v["processes"] if p["live"]} for v in views]
            leaders = {v["leader"] for v in views}
            if (
                all(ids == set(FLEETS) for ids in live)
                and len(leaders) == 1
                and None not in leaders
            ):
                return views
            return None

        views = wait_until(both_live_one_leader, 60, "both servers live, one tick holder", 0.5)
        assert sum(bool(v["tick"]) for v in views) == 1
        for name, (_, api) in apis.items():
            broker = httpx.get(f"{api}/v1/broker", headers=auth).json()
            first = 1 if name == "fleet-1" else 2
            assert broker["urls"][0] == nats.node(first).url, broker
            assert set(broker["urls"]) == set(nats.urls)
