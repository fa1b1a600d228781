"""Prometheus metrics of one engine, served by ``tuanyuan serve --metrics``
(:mod:`engine.metrics_http`).

Each engine has its own registry, so several engines (tests) never share counters.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, live_devices: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.reports = Counter(
            "tuanyuan_location_reports",
            "Location reports received, by gateway (rate() gives the ingest rate).",
            ["gateway"],
            registry=r,
        )
        self.live = Gauge(
            "tuanyuan_live_devices", "Devices with a location younger than the TTL.", registry=r
        )
        self.live.set_function(live_devices)
        self.active = Gauge("tuanyuan_active_alerts", "Alerts with a stage running.", registry=r)
        self.alerts = Counter(
            "tuanyuan_alerts", "Alert events: created, resolved, expired.", ["event"], registry=r
        )
        self.recipients = Counter(
            "tuanyuan_recipients",
            "Devices queued for notification, by stage number and gateway.",
            ["stage", "gateway"],
            registry=r,
        )
        self.geofence = Counter(
            "tuanyuan_geofence_recipients",
            "Devices notified because a location report put them inside a running ring.",
            ["gateway"],
            registry=r,
        )
        self.pending = Gauge(
            "tuanyuan_pending_messages",
            "Messages queued for a gateway or sent and not acknowledged.",
            ["gateway"],
            registry=r,
        )
        self.ack_latency = Histogram(
            "tuanyuan_ack_latency_seconds",
            "Seconds from sending a message to a gateway to its acknowledgement.",
            ["gateway"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.connected = Gauge(
            "tuanyuan_gateway_connected",
            "1 while a gateway is subscribed.",
            ["gateway"],
            registry=r,
        )
