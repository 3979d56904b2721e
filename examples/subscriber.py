"""Print every device's metrics as they arrive: a minimal edgefleet telemetry subscriber.

    python examples/subscriber.py --broker mqtt://127.0.0.1:1883
    python examples/subscriber.py --broker mqtt://mosquitto:1883 --group metrics   # run 2+ copies

With --group on an MQTT 5 broker (Mosquitto, EMQX) the copies split the stream between
them; on an MQTT 3.1.1 broker (the embedded amqtt) each copy sees every message.
See docs/subscribers.md.
"""

from __future__ import annotations

import argparse
import sys
import threading

from fleet_server.telemetry.subscriber import DecodingSubscriber
from protocol.messages import MetricsReport
from protocol.topics import Topics


class PrintMetrics(DecodingSubscriber):
    """Gets decoded, validated messages; payloads that fail validation go to on_invalid."""

    def __init__(self, *args, limit: int | None = None, **kw) -> None:
        super().__init__(*args, **kw)
        self.limit = limit
        self.count = 0
        self.done = threading.Event()

    def on_message(self, device_id: str | None, kind: str, message: MetricsReport) -> None:
        model = f"{message.model.name} {message.model.version}" if message.model else "no model"
        p95 = message.latency.p95_ms
        print(  # noqa: T201 - an example script prints
            f"{device_id} {model} requests={message.requests} errors={message.errors} "
            f"p95={'-' if p95 is None else f'{p95:.1f}ms'}",
            flush=True,
        )
        self.count += 1
        if self.limit is not None and self.count >= self.limit:
            self.done.set()

    def on_invalid(self, topic: str, reason: str) -> None:
        print(f"skipped {topic}: {reason}", file=sys.stderr, flush=True)  # noqa: T201


def main() -> int:
    ap = argparse.ArgumentParser(description="Print device metrics from an edgefleet broker.")
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--prefix", default="edgefleet", help="topic prefix of the fleet")
    ap.add_argument("--group", help="share the stream with other copies (MQTT 5 brokers)")
    ap.add_argument("--count", type=int, help="exit after this many messages")
    args = ap.parse_args()

    topic_filter = f"{args.prefix}/devices/+/telemetry/metrics"
    sub = PrintMetrics(
        args.broker,
        topic_filter,
        prefix=Topics(args.prefix).prefix,
        group=args.group,
        limit=args.count,
    )
    with sub:
        how = f"shared group {args.group!r}" if sub.shared else "a plain subscription"
        print(f"listening on {topic_filter} ({how}, MQTT {sub.protocol})", flush=True)  # noqa: T201
        try:
            sub.done.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
