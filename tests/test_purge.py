"""Who an alert reached is forgotten a set time after it closes; its counts stay."""

from __future__ import annotations

import time

from grpc_support import Engine, Population, create_request, stages, wait_until

from engine.alerts import DEFAULT_PURGE_AFTER_S


def test_recipient_lists_are_purged_a_week_after_the_alert_closes():
    people = Population(5_000, seed=11)
    with Engine() as engine:
        engine.report(people.batches())
        for gateway in (1, 2, 3):
            engine.subscribe(gateway)
        centre = (float(people.lat[0]), float(people.lng[0]))
        engine.create(create_request("purged", [centre], stages((3_000.0, 60))))
        reached = engine.wait_stage("purged", 1).notified_devices
        assert reached > 0
        engine.resolve("purged")
        dispatcher = engine.thread.engine.dispatcher
        alert = dispatcher.alerts["purged"]
        assert len(alert.record) == reached

        engine.clock.advance(DEFAULT_PURGE_AFTER_S - 60)
        time.sleep(0.2)  # several scheduler ticks: none may purge early
        assert len(alert.record) == reached and not alert.purged

        engine.clock.advance(120)
        wait_until(lambda: alert.purged, what="the purge")
        assert len(alert.record) == 0 and not alert.acked_ids
        assert engine.get("purged").notified_devices == reached  # counts stay
