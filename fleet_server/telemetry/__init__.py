"""Telemetry tools: Prometheus exporter, live topic view and a reusable MQTT subscriber.

Heavy imports (paho, prometheus_client) happen inside the modules that need them.
"""

from __future__ import annotations

__all__ = ["FleetExporter", "Subscriber", "summarize"]


def __getattr__(name: str) -> object:
    if name == "FleetExporter":
        from .prometheus import FleetExporter

        return FleetExporter
    if name == "Subscriber":
        from .subscriber import Subscriber

        return Subscriber
    if name == "summarize":
        from .tail import summarize

        return summarize
    raise AttributeError(name)
