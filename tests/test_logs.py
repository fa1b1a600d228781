"""Alert and gateway events are logged with their figures as fields, and the JSON
format carries them as keys."""

from __future__ import annotations

import json
import logging
import signal

import numpy as np
from grpc_support import BEIJING, Engine, Population, create_request, wait_until

from engine import auth, client, logs, server
from engine.api import alert_pb2


def test_json_lines_carry_the_fields_of_a_record():
    record = logging.LogRecord("engine.alerts", logging.INFO, "", 0, "alert %s: %d", ("a", 3), None)
    record.fields = {"alert_id": "a", "new_recipients": np.int64(3), "radii_m": [1000.0]}
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["message"] == "alert a: 3" and entry["level"] == "info"
    assert entry["alert_id"] == "a" and entry["new_recipients"] == 3
    assert entry["radii_m"] == [1000.0] and entry["time"].endswith("+00:00")


def test_an_alerts_life_is_logged_event_by_event_with_counts(caplog):
    caplog.set_level(logging.INFO, logger="engine")
    with Engine() as engine:
        engine.report(Population(5_000, seed=3).batches())
        gateway = engine.subscribe(1)
        engine.create(create_request("logged", [BEIJING], "local"))
        wait_until(lambda: engine.get("logged").stages[0].swept, what="the first sweep")
        engine.resolve("logged", alert_pb2.RESOLUTION_FOUND)
        gateway.subscription.close()

    def events(**match) -> list[dict]:
        found = []
        for record in caplog.records:
            values = getattr(record, "fields", {})
            if all(values.get(k) == v for k, v in match.items()):
                found.append(json.loads(logs.JsonFormatter().format(record)))
        return found

    created, swept, resolved = (
        events(alert_id="logged", event=name) for name in ("created", "swept", "resolved")
    )
    assert created[0]["schedule"] == "local" and created[0]["radii_m"] == [1000, 2000, 3000]
    assert swept[0]["stage"] == 1 and swept[0]["new_recipients"] > 0
    assert sum(swept[0]["per_gateway"].values()) == swept[0]["new_recipients"]
    assert resolved[0]["resolution"] == "RESOLUTION_FOUND"
    # Gateways 2 and 3 never subscribed: their recipients are withdrawn at the resolve.
    assert resolved[0]["withdrawn"] > 0
    assert resolved[0]["notified"] + resolved[0]["withdrawn"] == swept[0]["new_recipients"]
    assert events(gateway_id=1, event="subscribed") and events(gateway_id=1, event="unsubscribed")


def test_serve_writes_json_lines_with_the_alerts_figures(tmp_path):
    tokens_file, log = tmp_path / "tokens.json", tmp_path / "serve.log"
    flags = ["--dev", "--listen", "127.0.0.1:0", "--dev-tokens", str(tokens_file)]
    process, port = server.spawn([*flags, "--log-format", "json"], tmp_path / "port", log)
    try:
        token = auth.read_dev_tokens(tokens_file)["dev-issuer"]
        alerts = client.alert_stub(client.connect(f"127.0.0.1:{port}", token=token))
        alerts.CreateAlert(create_request("json-1", [BEIJING], "local"), timeout=30)
        wait_until(lambda: '"event": "swept"' in log.read_text(), what="the sweep's line")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    entries = [json.loads(line) for line in log.read_text().splitlines() if line[:1] == "{"]
    assert any(e["message"].startswith("serving on") for e in entries)
    created = [e for e in entries if e.get("event") == "created"]
    assert created[0]["alert_id"] == "json-1" and created[0]["logger"] == "engine.alerts"
    assert {e["level"] for e in entries} <= {"info", "warning"}
