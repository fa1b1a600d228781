"""The Prometheus endpoint of a running engine: counts that follow the traffic, and only
for operator or issuer tokens."""

from __future__ import annotations

import urllib.error
import urllib.request

import numpy as np
import pytest
from grpc_support import Population

from engine import auth, client
from engine.clock import ManualClock
from engine.server import ServerOptions, ServerThread


def scrape(port: int, token: str | None) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not served")


def test_metrics_follow_ingest_and_need_a_token():
    people = Population(3_000, seed=2)
    credentials, tokens = auth.dev_credentials((1, 2, 3))
    options = ServerOptions(
        clock=ManualClock(1_800_000_000.0),
        credentials=credentials,
        metrics_listen="127.0.0.1:0",
    )
    with ServerThread(options) as server:
        port = server.engine.metrics_port
        for gateway in (1, 2, 3):
            rows = np.flatnonzero(people.gateway == gateway)
            channel = client.connect(
                f"127.0.0.1:{server.port}", token=tokens[f"dev-reporter-{gateway}"]
            )
            client.report(channel, people.batches(rows))

        text = scrape(port, tokens["dev-operator"])
        assert value(text, "tuanyuan_live_devices") == len(people)
        reported = sum(
            value(text, f'tuanyuan_location_reports_total{{gateway="{g}"}}') for g in (1, 2, 3)
        )
        assert reported == len(people)
        assert value(text, "tuanyuan_active_alerts") == 0

        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(port, None)
        assert refused.value.code == 401


def test_an_engine_without_credentials_serves_no_metrics():
    options = ServerOptions(allow_all_callers=True, metrics_listen="127.0.0.1:0")
    with pytest.raises(ValueError, match="never open"):
        ServerThread(options).start()
