"""``edgefleet fleet serve``: one process with the REST API + dashboard, the MQTT bridge,
the rollout engine and the drift engine (optionally with the embedded amqtt broker)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from .config import FleetConfig
from .errors import ConfigError
from .service import FleetService

log = logging.getLogger(__name__)


def make_transport(
    config: FleetConfig,
    *,
    embedded: bool = False,
    client_id: str | None = None,
    clean_session: bool = False,
) -> Any:
    """The server's broker connection (``client_id``: another process's, to adopt its
    session, :mod:`.cluster`)."""
    from protocol.transport_paho import PahoTransport

    b = config.broker
    # amqtt (the embedded broker) speaks MQTT 3.1.1 only: no MQTT 5, no shared subscriptions.
    return PahoTransport(
        b.all_urls(),
        client_id or b.client_id,
        username=b.username,
        password=b.password,
        ca_file=str(b.ca_file) if b.ca_file else None,
        clean_session=clean_session,
        mqtt5=b.mqtt5 and not embedded,
    )


class FleetServer:
    """Everything ``serve`` runs, startable in a thread (tests, the demo)."""

    def __init__(self, config: FleetConfig, *, embedded_broker: bool = False) -> None:
        self.config = config
        self.embedded = embedded_broker or config.broker.embedded
        self.broker: Any = None
        if self.embedded and config.broker.urls:
            raise ConfigError(
                "broker.urls: the embedded broker is one node; set broker.url instead "
                "(or drop --embedded-broker to use the cluster)"
            )
        if self.embedded:
            port = urlparse(config.broker.url).port or 1883
            host = urlparse(config.broker.url).hostname or "127.0.0.1"
            from .embedded_broker import EmbeddedBroker

            self.broker = EmbeddedBroker(host, port)
            broker = config.broker.model_copy(update={"mqtt5": False})
            self.config = config = config.model_copy(update={"broker": broker})
        self.service: FleetService | None = None
        self._uvicorn: Any = None
        self._thread: threading.Thread | None = None

    def check_ports(self) -> None:
        """Refuse to start (:class:`~protocol.errors.AddressInUse`) when a port is taken."""
        from .embedded_broker import ensure_port_free

        api = self.config.api
        ensure_port_free(
            api.host,
            api.port,
            "fleet API",
            "stop it, or choose another with --port (or [api] port)",
        )

    def _build(self) -> tuple[FleetService, Any]:
        from .app import create_app

        self.check_ports()
        if self.broker is not None:
            self.broker.start()
        self.service = FleetService(
            self.config, transport=make_transport(self.config, embedded=self.embedded)
        )
        config, embedded = self.config, self.embedded
        self.service.cluster.transport_factory = lambda cid, clean: make_transport(
            config, embedded=embedded, client_id=cid, clean_session=clean
        )
        self.service.start()
        return self.service, create_app(self.service)

    def _uvicorn_server(self, app: Any) -> Any:
        import uvicorn

        cfg = uvicorn.Config(
            app, host=self.config.api.host, port=self.config.api.port, log_level="warning"
        )
        return uvicorn.Server(cfg)

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve in the foreground until interrupted; ``on_ready()`` once the API listens."""
        _, app = self._build()
        server = self._uvicorn_server(app)
        if on_ready is not None:
            threading.Thread(
                target=_when_started, args=(server, on_ready), name="fleet-ready", daemon=True
            ).start()
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind (a port taken since our check)
            raise ConfigError(f"the API did not start on {self.url}") from None
        finally:
            self.stop()

    def start(self, timeout: float = 15.0) -> FleetServer:
        _, app = self._build()
        self._uvicorn = self._uvicorn_server(app)
        self._thread = threading.Thread(target=self._uvicorn.run, name="fleet-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise ConfigError(
                    f"the API did not start on {self.config.api.host}:{self.config.api.port}"
                )
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            if self._thread is not None:
                self._thread.join(10)
            self._uvicorn = None
        if self.service is not None:
            self.service.stop()
            self.service.repo.close()
            self.service = None
        if self.broker is not None:
            self.broker.stop()

    @property
    def url(self) -> str:
        return f"http://{self.config.api.host}:{self.config.api.port}"

    def __enter__(self) -> FleetServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _when_started(server: Any, callback: Callable[[], None]) -> None:
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    callback()


def serve(config: FleetConfig, embedded_broker: bool = False) -> None:
    FleetServer(config, embedded_broker=embedded_broker).run()
