"""The engine end to end over real sockets: alerts from creation to expiry or
resolution, checked against the brute-force oracle; the geofence; delivery to gateways
that disconnect, stall or ask to be paced; preview, health and reflection.

Tests that only create alerts share one engine (each with its own alert ids); tests
that move devices, stall gateways or need their own sequence numbers get their own.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_support import (
    ALERT,
    BEIJING,
    CLOSED,
    FOLLOW_UP,
    RECIPIENTS,
    Engine,
    Expected,
    Population,
    Recorder,
    Watcher,
    centre,
    create_request,
    delivered,
    durations,
    offset,
    payload,
    radii,
    seconds,
    stages,
    tally,
    wait_until,
)
from oracle import Key, Ring, assert_answer
from support import destination

from engine import client
from engine.api import alert_pb2
from engine.delivery import timestamp
from engine.server import SERVICES

SCHEDULED = alert_pb2.ALERT_STATUS_SCHEDULED
ACTIVE = alert_pb2.ALERT_STATUS_ACTIVE
EXPIRED = alert_pb2.ALERT_STATUS_EXPIRED
RESOLVED = alert_pb2.ALERT_STATUS_RESOLVED

SNAPSHOT = alert_pb2.ALERT_EVENT_KIND_SNAPSHOT
STAGE_STARTED = alert_pb2.ALERT_EVENT_KIND_STAGE_STARTED
PROGRESS = alert_pb2.ALERT_EVENT_KIND_PROGRESS
EVENT_EXPIRED = alert_pb2.ALERT_EVENT_KIND_EXPIRED
EVENT_RESOLVED = alert_pb2.ALERT_EVENT_KIND_RESOLVED

GATEWAYS = (1, 2, 3)


@pytest.fixture(scope="module")
def metro() -> Population:
    return Population(60_000, seed=7)


@pytest.fixture(scope="module")
def shared(metro: Population):
    """One engine holding ``metro``, with the three gateways subscribed and acking."""
    with Engine() as engine:
        summary = engine.report(metro.batches())
        assert (summary.batches, summary.added) == (3, len(metro))
        gateways = {g: engine.subscribe(g) for g in GATEWAYS}
        yield engine, gateways


def fresh(n: int = 50_000, seed: int = 11, **options) -> tuple[Engine, Population]:
    """An engine of its own, holding a population of its own (tests move devices)."""
    engine = Engine(**options)
    devices = Population(n, seed=seed)
    assert engine.report(devices.batches()).added == n
    return engine, devices


def of_gateway(ring: Ring, gateway: int) -> Ring:
    return Ring(
        frozenset(k for k in ring.must if k[0] == gateway),
        frozenset(k for k in ring.may if k[0] == gateway),
        ring.distance,
    )


def received(gateways: dict[int, Recorder], alert_id: str, stage: int | None = None) -> list[Key]:
    return [key for g in gateways.values() for key in g.keys(alert_id, stage)]


def check_stage(
    alert: alert_pb2.Alert,
    stage: int,
    gateways: dict[int, Recorder],
    expected: Expected,
    walked_in: int = 0,
) -> None:
    """What the gateways got for one stage is the oracle's share of it, and GetAlert's
    progress counts exactly that."""
    found = received(gateways, alert.alert_id, stage)
    assert_answer(found, expected.stage(stage), f"{alert.alert_id} stage {stage}")
    state = alert.stages[stage - 1]
    assert state.recipients == len(found)
    assert state.walked_in == walked_in
    for progress in state.gateways:
        got = gateways[progress.gateway_id].devices(alert.alert_id, stage)
        assert (progress.recipients, progress.handed_over, progress.acked) == (got, got, got)
        assert progress.withdrawn == 0


def check_messages(recorder: Recorder, alert_id: str, closed_status: int | None) -> None:
    """The order the contract gives one gateway for one alert: the payload first,
    recipients under a payload version already sent, one CLOSED after every
    recipient, then only FOLLOW_UP."""
    messages = [m for m, _ in recorder.messages(alert_id)]
    if not messages:
        return
    assert messages[0].kind == ALERT
    versions: set[int] = set()
    closed_at = None
    for position, message in enumerate(messages):
        if message.kind == ALERT:
            versions.add(message.payload_version)
        elif message.kind == RECIPIENTS:
            assert closed_at is None, "recipients after CLOSED"
            assert message.payload_version in versions
        elif message.kind == CLOSED:
            assert closed_at is None, "two CLOSED messages"
            closed_at = position
            assert message.status == closed_status
        else:
            assert message.kind == FOLLOW_UP and closed_at is not None
    if closed_status is not None:
        assert closed_at is not None


def far_rows(devices: Population, places, count: int, seed: int, beyond_m: float = 6_000.0):
    """Devices further than ``beyond_m`` from every place."""
    return devices.pick(devices.distance(places) > beyond_m, count, seed=seed)


def scatter(place, count: int, low_m: float, high_m: float, seed: int):
    """``count`` positions ``low_m`` to ``high_m`` metres from ``place`` in random
    directions (callers keep the range well clear of every ring's boundary)."""
    rng = np.random.default_rng(seed)
    return destination(
        place[0], place[1], rng.uniform(low_m, high_m, count), rng.uniform(0, 360, count)
    )


# 1. A whole alert.

INLINE = stages((800.0, 600), (800.0, 300), (1_800.0, 900))


@pytest.mark.parametrize(
    ("schedule", "places"),
    [("local", [BEIJING]), (INLINE, [BEIJING, offset(BEIJING, 1_200.0, 100.0)])],
    ids=["local", "inline-two-centres"],
)
def test_an_alert_runs_from_scheduled_to_expired(shared, metro, schedule, places):
    engine, gateways = shared
    alert_id = f"lifecycle-{'local' if isinstance(schedule, str) else 'inline'}"
    start = engine.clock.now() + 600
    request = create_request(alert_id, places, schedule, start_time=timestamp(start))
    created = engine.create(request)
    assert created.status == SCHEDULED and created.current_stage == 0
    assert created.version == 1 and not created.HasField("stage_ends_at")
    assert created.schedule_name == (schedule if isinstance(schedule, str) else "")
    assert [s.radius_m for s in created.stages] == radii(schedule)
    assert not any(s.HasField("started_at") for s in created.stages)
    listed = engine.alerts.ListAlerts(alert_pb2.ListAlertsRequest(statuses=[SCHEDULED]))
    assert alert_id in [a.alert_id for a in listed.alerts]

    watcher = Watcher(engine, alert_id)
    wait_until(lambda: watcher.events, what="the first watch event")
    assert watcher.events[0].kind == SNAPSHOT and watcher.events[0].alert.status == SCHEDULED

    # Each stage: the oracle's annulus, delivered and counted.
    expected = Expected(metro)
    starts = np.cumsum([0, *durations(schedule)])
    engine.clock.advance(600)
    for stage, radius in enumerate(radii(schedule), start=1):
        if stage > 1:
            engine.clock.advance(durations(schedule)[stage - 2])
        expected.sweep(stage, places, radius)
        alert = engine.wait_stage(alert_id, stage, minimum=len(expected.stage(stage).must))
        assert alert.status == ACTIVE
        assert seconds(alert.stages[stage - 1].started_at) == start + starts[stage - 1]
        assert seconds(alert.stage_ends_at) == start + starts[stage]
        check_stage(alert, stage, gateways, expected)
        assert alert.notified_devices == len(received(gateways, alert_id))
        if stage == 1:
            wait_until(lambda: PROGRESS in watcher.kinds(), what="a PROGRESS event")
            active = engine.alerts.ListAlerts(alert_pb2.ListAlertsRequest(statuses=[ACTIVE]))
            assert alert_id in [a.alert_id for a in active.alerts]

    # The last stage ends: EXPIRED, CLOSED to every gateway, the watch ends.
    engine.clock.advance(durations(schedule)[-1])
    assert watcher.ended.wait(10) and watcher.error is None
    for recorder in gateways.values():
        wait_until(
            lambda r=recorder: CLOSED in r.kinds(alert_id), what=f"CLOSED to {recorder.gateway}"
        )
        check_messages(recorder, alert_id, EXPIRED)
    final = engine.get(alert_id)
    assert final.status == EXPIRED and final.current_stage == 0
    assert seconds(final.closed_at) == start + starts[-1]
    assert not final.HasField("stage_ends_at")
    for stage in range(1, len(final.stages) + 1):
        check_stage(final, stage, gateways, expected)
    assert_answer(received(gateways, alert_id), expected.union(), f"{alert_id} overall")
    assert final.notified_devices == len(received(gateways, alert_id))
    listed = engine.alerts.ListAlerts(alert_pb2.ListAlertsRequest(statuses=[EXPIRED]))
    assert [a for a in listed.alerts if a.alert_id == alert_id] == [final]
    everything = engine.alerts.ListAlerts(alert_pb2.ListAlertsRequest()).alerts
    created_at = [seconds(a.created_at) for a in everything]
    assert created_at == sorted(created_at, reverse=True), "ListAlerts is newest first"

    kinds = watcher.kinds()
    assert kinds[0] == SNAPSHOT and kinds[-1] == EVENT_EXPIRED
    assert set(kinds) <= {SNAPSHOT, STAGE_STARTED, PROGRESS, EVENT_EXPIRED}
    assert kinds.count(SNAPSHOT) == kinds.count(EVENT_EXPIRED) == 1
    started = [e for e in watcher.events if e.kind == STAGE_STARTED]
    assert [e.stage_number for e in started] == list(range(1, len(radii(schedule)) + 1))
    assert [seconds(e.time) for e in started] == [start + s for s in starts[:-1]]
    assert all(e.alert.current_stage == e.stage_number for e in started)
    assert kinds.index(PROGRESS) > kinds.index(STAGE_STARTED)
    assert watcher.events[-1].alert.status == EXPIRED


# 2. Nobody twice.


def test_no_device_is_notified_twice_across_stages_centres_and_sightings(shared, metro):
    engine, gateways = shared
    alert_id = "sightings"
    a, b, c = BEIJING, offset(BEIJING, 1_200.0, 80.0), offset(BEIJING, 900.0, 350.0)
    schedule = stages((1_000.0, 600), (2_000.0, 600), (3_000.0, 600))
    expected = Expected(metro)

    # Three overlapping centres from the start.
    engine.create(create_request(alert_id, [a, b, c], schedule))
    expected.sweep(1, [a, b, c], 1_000.0)
    engine.wait_stage(alert_id, 1, minimum=len(expected.stage(1).must))

    # A new sighting: the running ring is drawn around it at once.
    d = offset(BEIJING, 2_500.0, 200.0)
    updated = engine.alerts.UpdateAlert(
        alert_pb2.UpdateAlertRequest(
            alert_id=alert_id, centres=alert_pb2.Centres(centres=[centre(*p) for p in (a, b, c, d)])
        )
    )
    assert updated.version == 2 and len(updated.centres) == 4 and updated.current_stage == 1
    expected.sweep(1, [a, b, c, d], 1_000.0)
    assert updated.stages[0].recipients >= len(expected.stage(1).must)

    # The child moved: the old centres are left out, a new one added, with a new payload.
    e = offset(d, 1_500.0, 180.0)
    updated = engine.alerts.UpdateAlert(
        alert_pb2.UpdateAlertRequest(
            alert_id=alert_id,
            centres=alert_pb2.Centres(centres=[centre(*d), centre(*e)]),
            payload=payload(description="now in a blue coat"),
        )
    )
    assert updated.version == 3 and [round(c.latitude, 9) for c in updated.centres] == [
        round(d[0], 9),
        round(e[0], 9),
    ]
    expected.sweep(1, [d, e], 1_000.0)
    check_stage(engine.wait_delivered(alert_id), 1, gateways, expected)

    # Later stages widen around the new centres only.
    for stage, radius in ((2, 2_000.0), (3, 3_000.0)):
        engine.clock.advance(600)
        expected.sweep(stage, [d, e], radius)
        alert = engine.wait_stage(alert_id, stage, minimum=len(expected.stage(stage).must))
        check_stage(alert, stage, gateways, expected)
    engine.clock.advance(600)
    wait_until(lambda: engine.get(alert_id).status == EXPIRED, what="expiry")

    assert_answer(received(gateways, alert_id), expected.union(), "every sighting together")
    for recorder in gateways.values():
        wait_until(lambda r=recorder: CLOSED in r.kinds(alert_id), what="CLOSED")
        check_messages(recorder, alert_id, EXPIRED)
        versions = [m.payload_version for m, _ in recorder.messages(alert_id, ALERT)]
        assert versions == [1, 3], "the corrected payload goes out as version 3"
        later = [m for m, _ in recorder.messages(alert_id, RECIPIENTS, stage=2)]
        assert all(m.payload_version == 3 for m in later)


def test_a_new_schedule_redraws_the_running_ring_at_once(shared, metro):
    engine, gateways = shared
    alert_id, place = "reschedule", offset(BEIJING, 8_000.0, 30.0)
    start = engine.clock.now()
    expected = Expected(metro)
    engine.create(create_request(alert_id, [place], stages((800.0, 600), (1_600.0, 600))))
    expected.sweep(1, [place], 800.0)
    engine.wait_stage(alert_id, 1, minimum=len(expected.stage(1).must))
    watcher = Watcher(engine, alert_id)

    # The running stage now reaches 1.2 km and lasts 15 minutes.
    updated = engine.alerts.UpdateAlert(
        alert_pb2.UpdateAlertRequest(
            alert_id=alert_id, stages=stages((1_200.0, 900), (2_000.0, 600))
        )
    )
    expected.sweep(1, [place], 1_200.0)
    assert (updated.version, updated.current_stage, updated.schedule_name) == (2, 1, "")
    assert [s.radius_m for s in updated.stages] == [1_200.0, 2_000.0]
    assert seconds(updated.stage_ends_at) == start + 900
    assert updated.stages[0].recipients >= len(expected.stage(1).must)
    check_stage(engine.wait_delivered(alert_id), 1, gateways, expected)

    engine.clock.advance(900)
    expected.sweep(2, [place], 2_000.0)
    alert = engine.wait_stage(alert_id, 2, minimum=len(expected.stage(2).must))
    check_stage(alert, 2, gateways, expected)
    engine.clock.advance(600)
    assert watcher.ended.wait(10)
    assert alert_pb2.ALERT_EVENT_KIND_UPDATED in watcher.kinds()
    assert watcher.kinds()[-1] == EVENT_EXPIRED
    assert_answer(received(gateways, alert_id), expected.union(), "after the new schedule")


# 3. The geofence.


def test_devices_walking_into_a_running_ring_are_notified_once():
    engine, devices = fresh()
    with engine:
        gateways = {g: engine.subscribe(g) for g in GATEWAYS}
        alert_id, place = "geofence", BEIJING
        barrier_place = offset(BEIJING, 20_000.0, 90.0)
        expected = Expected(devices)
        engine.create(create_request(alert_id, [place], stages((1_000.0, 600), (2_000.0, 600))))
        engine.create(create_request("geofence-barrier", [barrier_place], stages((1_000.0, 3600))))
        expected.sweep(1, [place], 1_000.0)
        engine.wait_stage(alert_id, 1, minimum=len(expected.stage(1).must))
        engine.wait_stage("geofence-barrier", 1)
        barriers = iter(range(100))

        def barrier(batches: list[bytes]):
            """Reports ``batches`` and then one device into the barrier alert's ring;
            once that device arrives, whatever the batches caused has arrived too
            (each gateway's messages keep their order)."""
            row = far_rows(devices, [place, barrier_place], 1, seed=1000 + next(barriers))
            gateway = gateways[int(devices.gateway[row[0]])]
            before = gateway.devices("geofence-barrier")
            moved = devices.move(row, *scatter(barrier_place, 1, 0.0, 500.0, seed=int(row[0])))
            summary = engine.report(batches + moved)
            wait_until(lambda: gateway.devices("geofence-barrier") == before + 1, what="barrier")
            return summary

        # Devices from far away walk into stage 1's ring.
        walkers = far_rows(devices, [place, barrier_place], 40, seed=1)
        summary = engine.report(devices.move(walkers, *scatter(place, 40, 0.0, 900.0, seed=2)))
        assert summary.geofence_recipients == 40
        expected.walk_in(1, devices.keys(walkers))
        alert = engine.wait_delivered(alert_id)
        check_stage(alert, 1, gateways, expected, walked_in=40)
        assert set(devices.keys(walkers)) <= set(received(gateways, alert_id, 1))

        # Notified devices moving about inside the ring, or out and back in: nothing.
        inside = devices.distance([place]) <= 900.0
        movers = devices.pick(inside, 30, seed=3)
        batches = devices.move(movers, *scatter(place, 30, 0.0, 900.0, seed=4))
        out = devices.pick(inside, 10, seed=5)
        batches += devices.move(out, *scatter(place, 10, 8_000.0, 9_000.0, seed=6))
        batches += devices.move(out, *scatter(place, 10, 0.0, 900.0, seed=7))
        count = len(received(gateways, alert_id))
        summary = barrier(batches)
        assert summary.geofence_recipients == 1  # the barrier device only
        assert len(received(gateways, alert_id)) == count

        # Stage 2: its sweep, then walk-ins credited to stage 2.
        engine.clock.advance(600)
        expected.sweep(2, [place], 2_000.0)
        engine.wait_stage(alert_id, 2, minimum=len(expected.stage(2).must))
        walkers2 = far_rows(devices, [place, barrier_place], 25, seed=8)
        summary = engine.report(devices.move(walkers2, *scatter(place, 25, 1_100.0, 1_900.0, 9)))
        assert summary.geofence_recipients == 25
        expected.walk_in(2, devices.keys(walkers2))
        alert = engine.wait_delivered(alert_id)
        check_stage(alert, 1, gateways, expected, walked_in=40)
        check_stage(alert, 2, gateways, expected, walked_in=25)
        got = [m for g in gateways.values() for m, _ in g.messages(alert_id, RECIPIENTS)]
        assert {m.stage_number for m in got} == {1, 2}

        # After expiry the ring is gone.
        engine.clock.advance(600)
        wait_until(lambda: engine.get(alert_id).status == EXPIRED, what="expiry")
        for recorder in gateways.values():
            wait_until(lambda r=recorder: CLOSED in r.kinds(alert_id), what="CLOSED")
        late = far_rows(devices, [place, barrier_place], 20, seed=10)
        summary = barrier(devices.move(late, *scatter(place, 20, 0.0, 500.0, seed=11)))
        assert summary.geofence_recipients == 1
        final = engine.get(alert_id)
        assert [s.walked_in for s in final.stages] == [40, 25]
        assert_answer(received(gateways, alert_id), expected.union(), "sweeps and walk-ins")
        for recorder in gateways.values():
            check_messages(recorder, alert_id, EXPIRED)


@pytest.fixture
def fenced():
    """An engine with one device held 10 km from a running alert's centre."""
    with Engine() as engine:
        engine.create(create_request("fence", [BEIJING], stages((1_000.0, 3600))))
        wait_until(lambda: engine.get("fence").status == ACTIVE, what="start")
        far = offset(BEIJING, 10_000.0, 0.0)
        batch = client_batch(7, [42], [far])
        assert engine.report([batch]).added == 1
        yield engine, far


def client_batch(gateway, ids, places, observed_at=None) -> bytes:
    return client.encode_batch(
        gateway,
        np.array(ids, dtype=np.uint64),
        np.array([p[0] for p in places]),
        np.array([p[1] for p in places]),
        None if observed_at is None else np.array(observed_at, dtype=np.float64),
    )


def test_a_stale_report_inside_the_ring_notifies_nobody(fenced):
    engine, _ = fenced
    old = engine.clock.now() - 60
    summary = engine.report([client_batch(7, [42], [BEIJING], observed_at=[old])])
    assert summary.stale == 1
    assert summary.geofence_recipients == 0


def test_a_report_superseded_in_its_batch_notifies_nobody(fenced):
    engine, far = fenced
    summary = engine.report([client_batch(7, [42, 42], [BEIJING, far])])
    assert (summary.updated, summary.stale) == (1, 1)
    assert summary.geofence_recipients == 0


def test_the_newest_report_of_a_batch_inside_the_ring_notifies(fenced):
    engine, far = fenced
    now = engine.clock.now()
    batch = client_batch(7, [42, 42], [BEIJING, far], observed_at=[now, now - 30])
    summary = engine.report([batch])
    assert (summary.updated, summary.stale, summary.geofence_recipients) == (1, 1, 1)


# 4. Resolving.


def test_resolving_stops_emission_and_follows_up_exactly_the_devices_reached():
    engine, devices = fresh(seed=12)
    with engine:
        gateways = {g: engine.subscribe(g) for g in GATEWAYS}
        place, barrier_place = BEIJING, offset(BEIJING, 15_000.0, 270.0)
        engine.create(create_request("found", [place]))
        engine.create(create_request("barrier", [barrier_place]))
        engine.wait_stage("found", 1)
        engine.wait_stage("barrier", 1)
        before = {g: set(r.keys("found")) for g, r in gateways.items()}
        watcher = Watcher(engine, "found")
        wait_until(lambda: watcher.events, what="the snapshot")

        notices = [
            ("zh-Hans", "孩子已找到。谢谢"),
            ("en", "The child was found, thank you"),
        ]
        resolved = engine.resolve("found", alert_pb2.RESOLUTION_FOUND, notices)
        assert resolved.status == RESOLVED and resolved.resolution == alert_pb2.RESOLUTION_FOUND
        assert resolved.current_stage == 0 and resolved.version == 2
        assert seconds(resolved.closed_at) == engine.clock.now()
        reached = sum(len(keys) for keys in before.values())
        assert resolved.follow_up_devices == resolved.notified_devices == reached
        assert all(g.withdrawn == 0 for s in resolved.stages for g in s.gateways)

        # CLOSED with the notice, then FOLLOW_UP to exactly the devices reached.
        for gateway, recorder in gateways.items():
            count = len(before[gateway])
            wait_until(
                lambda r=recorder, n=count: r.devices("found", kind=FOLLOW_UP) == n,
                what=f"follow-up to gateway {gateway}",
            )
            check_messages(recorder, "found", RESOLVED)
            closed = recorder.messages("found", CLOSED)[0][0]
            assert closed.resolution == alert_pb2.RESOLUTION_FOUND
            assert [(n.language, n.text) for n in closed.follow_up] == notices
            follow_up = recorder.keys("found", kind=FOLLOW_UP)
            assert len(follow_up) == len(set(follow_up))
            assert set(follow_up) == set(recorder.keys("found")) == before[gateway]
        assert watcher.ended.wait(10)
        assert watcher.kinds()[0] == SNAPSHOT and watcher.kinds()[-1] == EVENT_RESOLVED

        # Walking into the closed ring notifies nobody; the barrier alert still works.
        into_closed = far_rows(devices, [place, barrier_place], 30, seed=1)
        into_barrier = far_rows(devices, [place, barrier_place], 5, seed=2)
        into_barrier = np.setdiff1d(into_barrier, into_closed)
        batches = devices.move(into_closed, *scatter(place, 30, 0.0, 800.0, seed=3))
        batches += devices.move(
            into_barrier, *scatter(barrier_place, into_barrier.size, 0.0, 800.0, seed=4)
        )
        summary = engine.report(batches)
        assert summary.geofence_recipients == into_barrier.size
        wait_until(
            lambda: (
                engine.get("barrier").stages[0].walked_in == into_barrier.size
                and delivered(engine.get("barrier"))
            ),
            what="the barrier's walk-ins",
        )

        # Time passes: the barrier alert moves on, the resolved one does not.
        engine.clock.advance(3600)
        engine.wait_stage("barrier", 2)
        after = engine.get("found")
        assert after.status == RESOLVED and not after.stages[1].HasField("started_at")
        assert after.notified_devices == reached and after.version == 2
        for gateway, recorder in gateways.items():
            assert set(recorder.keys("found")) == before[gateway]
            check_messages(recorder, "found", RESOLVED)

        # A resolved alert takes no more actions.
        with pytest.raises(grpc.RpcError) as caught:
            engine.alerts.UpdateAlert(
                alert_pb2.UpdateAlertRequest(alert_id="found", payload=payload())
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "resolved" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            engine.resolve("found", alert_pb2.RESOLUTION_CANCELLED)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert engine.get("found") == after

        # An expired alert can still be resolved.
        engine.clock.advance(2 * 3600)
        wait_until(lambda: engine.get("barrier").status == EXPIRED, what="expiry")
        assert engine.resolve("barrier", alert_pb2.RESOLUTION_FALSE_REPORT).status == RESOLVED


def test_resolving_withdraws_what_a_stuck_gateway_has_not_taken():
    engine, devices = fresh(seed=13, batch_devices=10)
    with engine:
        normal = engine.subscribe(1)
        stuck = engine.subscribe(
            2, max_unacked_messages=1, hold=lambda message: message.kind == RECIPIENTS
        )
        # Gateway 3 is not connected at all.
        expected = Expected(devices)
        engine.create(create_request("stuck", [BEIJING]))
        expected.sweep(1, [BEIJING], 1_000.0)

        def ready():
            alert = engine.get("stuck")
            first = tally(alert, 1, 1)
            return (
                alert.stages[0].swept
                and first is not None
                and first.acked == first.recipients > 0
                and stuck.devices("stuck") > 0
                and alert
            )

        alert = wait_until(ready, what="gateway 1 done and gateway 2 stuck")
        held = stuck.keys("stuck")
        n = len(held)
        assert 0 < n <= 10, "one message handed over, the window holds the rest"
        second, third = tally(alert, 1, 2), tally(alert, 1, 3)
        assert second.recipients > 30 and second.handed_over == n and second.acked == 0
        assert third.recipients > 0 and third.handed_over == 0

        resolved = engine.resolve("stuck", alert_pb2.RESOLUTION_CANCELLED, [("en", "Withdrawn")])
        first, second, third = (tally(resolved, 1, g) for g in GATEWAYS)
        assert first.withdrawn == 0
        assert second.withdrawn == second.recipients - n and second.handed_over == n
        assert third.withdrawn == third.recipients and third.handed_over == 0
        assert resolved.notified_devices == first.recipients + n
        assert resolved.follow_up_devices == first.recipients + n

        stuck.release()
        wait_until(lambda: stuck.devices("stuck", kind=FOLLOW_UP) == n, what="the follow-up")
        assert set(stuck.keys("stuck")) == set(held), "nothing withdrawn was sent"
        assert set(stuck.keys("stuck", kind=FOLLOW_UP)) == set(held)
        check_messages(stuck, "stuck", RESOLVED)
        wait_until(lambda: normal.devices("stuck", kind=FOLLOW_UP) == first.recipients)
        assert set(normal.keys("stuck", kind=FOLLOW_UP)) == set(normal.keys("stuck"))
        assert_answer(normal.keys("stuck"), of_gateway(expected.stage(1), 1), "gateway 1")
        final = engine.wait_delivered("stuck")
        assert tally(final, 1, 2).acked == n


# 5. Disconnects.


def test_a_gateway_that_drops_its_stream_gets_every_unacked_message_again():
    engine, devices = fresh(seed=14, batch_devices=10)
    with engine:
        first = engine.raw(1, window=8)
        expected = Expected(devices)
        engine.create(create_request("resume", [BEIJING]))
        expected.sweep(1, [BEIJING], 1_000.0)

        # Handle six messages, ack three, drop the stream.
        seen = first.take(6)
        assert [m.sequence for m in seen] == [1, 2, 3, 4, 5, 6]
        first.ack(3)
        wait_until(lambda: engine.acked(1) == 3, what="the ack")
        first.close()

        # The next stream starts after the last ack, with the same numbers and bytes.
        second = engine.raw(1, window=8)
        again = second.take(3)
        assert again == seen[3:]
        total = tally(engine.get("resume"), 1, 1).recipients
        handled = {m.sequence: m for m in seen[:3] + again}
        for message in again:
            second.ack(message.sequence)
        while sum(len(m.device_ids) for m in handled.values() if m.kind == RECIPIENTS) < total:
            message = second.next()
            handled[message.sequence] = message
            second.ack(message.sequence)
        assert sorted(handled) == list(range(1, len(handled) + 1)), "no sequence skipped"
        keys = [(1, i) for m in handled.values() if m.kind == RECIPIENTS for i in m.device_ids]
        assert_answer(keys, of_gateway(expected.stage(1), 1), "after resuming")
        progress = wait_until(
            lambda: (t := tally(engine.get("resume"), 1, 1)).acked == t.recipients and t,
            what="the last acks",
        )
        assert progress.handed_over == progress.acked == progress.recipients == len(keys)


def test_an_ack_ahead_of_the_resend_continues_after_it():
    """A gateway that handled messages on a dropped stream may ack them as soon as it
    reconnects; delivery goes on with the first message after that ack."""
    engine, _ = fresh(seed=15, batch_devices=10)
    with engine:
        first = engine.raw(1, window=8)
        engine.create(create_request("ahead", [BEIJING]))
        seen = first.take(8)
        first.ack(3)
        wait_until(lambda: engine.acked(1) == 3, what="the ack")
        first.close()

        second = engine.raw(1, window=1)
        assert second.next() == seen[3]
        second.ack(5)  # 4 and 5 were handled on the first stream
        assert second.next() == seen[5]
        second.ack(6)
        assert second.next() == seen[6]


def test_a_second_subscription_replaces_the_first():
    engine, _ = fresh(seed=16, batch_devices=20)
    with engine:
        old = engine.raw(2, window=4)
        engine.create(create_request("replace", [BEIJING]))
        seen = old.take(3)
        old.ack(1)
        wait_until(lambda: engine.acked(2) == 1, what="the ack")

        new = engine.raw(2, window=4)
        assert old.finish() is None, "the engine ends the replaced stream normally"
        assert new.take(2) == seen[1:]


# 6. Slow gateways and pacing.


def test_a_stuck_gateway_does_not_delay_the_others():
    engine, devices = fresh(seed=17, batch_devices=10)
    with engine:
        slow = engine.subscribe(1, max_unacked_messages=1, hold=lambda m: m.kind == RECIPIENTS)
        gateways = {1: slow, 2: engine.subscribe(2), 3: engine.subscribe(3)}
        expected = Expected(devices)
        engine.create(create_request("slow", [BEIJING]))
        expected.sweep(1, [BEIJING], 1_000.0)

        def others_done():
            alert = engine.get("slow")
            done = [tally(alert, 1, g) for g in (2, 3)]
            acked = all(t is not None and t.acked == t.recipients > 0 for t in done)
            return alert.stages[0].swept and acked and alert

        alert = wait_until(others_done, what="gateways 2 and 3")
        for gateway in (2, 3):
            want = of_gateway(expected.stage(1), gateway)
            assert_answer(gateways[gateway].keys("slow"), want, f"gateway {gateway}")
        behind = tally(alert, 1, 1)
        held = slow.devices("slow")
        assert 0 < held <= 10, "one message handed over, the window holds the rest"
        assert behind.recipients > 50 and behind.handed_over == held and behind.acked == 0

        slow.release()
        engine.wait_delivered("slow")
        assert_answer(received(gateways, "slow"), expected.stage(1), "after the release")


def test_a_paced_gateway_gets_its_devices_at_its_rate():
    engine, devices = fresh(seed=18, batch_devices=20)
    rate = 200.0
    expected = Expected(devices)
    expected.sweep(1, [BEIJING], 2_500.0)
    inside = len(of_gateway(expected.stage(1), 3).must)
    with engine:
        started = time.monotonic()
        paced = engine.subscribe(3, max_devices_per_second=rate)
        engine.subscribe(1)
        # Gateway 2 is not connected: no hand-over time for it.
        engine.create(create_request("paced", [BEIJING], stages((2_500.0, 600))))

        def queued():  # the whole sweep, not only its first steps
            alert = engine.get("paced")
            progress = tally(alert, 1, 3)
            return progress is not None and progress.recipients >= inside and alert

        alert = wait_until(queued, what="the sweep")
        now = engine.clock.now()
        progress = tally(alert, 1, 3)
        total = progress.recipients
        assert total > 2 * rate, "enough devices to need pacing"
        assert progress.HasField("expected_handover_at")
        assert now < seconds(progress.expected_handover_at) <= now + total / rate
        assert not tally(alert, 1, 2).HasField("expected_handover_at")

        samples = []

        def arrived():
            samples.append((time.monotonic() - started, paced.devices("paced")))
            return samples[-1][1] == total

        wait_until(arrived, timeout=30, what="every paced device")
        for elapsed, count in samples:
            # A second's worth up front, then the rate; one batch of leeway.
            assert count <= rate * (elapsed + 1.0) + 20, (elapsed, count)
        done = wait_until(
            lambda: (a := engine.get("paced")) and tally(a, 1, 3).acked == total and a,
            what="the acks",
        )
        assert not tally(done, 1, 3).HasField("expected_handover_at")


# 7. Idempotency.


def test_creating_twice_is_idempotent_and_other_content_is_refused(shared):
    engine, gateways = shared
    request = create_request("twice", [offset(BEIJING, 3_000.0, 45.0)])
    first = engine.create(request)
    again = engine.create(request)
    assert (again.alert_id, again.version, again.created_at) == (
        first.alert_id,
        1,
        first.created_at,
    )
    settled = engine.wait_stage("twice", 1)
    assert engine.create(request).version == 1
    keys = received(gateways, "twice")
    assert len(keys) == len(set(keys)) == settled.notified_devices > 0

    for change in (
        lambda r: r.centres[0].MergeFrom(centre(39.0, 116.0)),
        lambda r: r.payload.texts[0].MergeFrom(alert_pb2.LocalizedText(name="Wang")),
        lambda r: setattr(r, "schedule_name", "regional"),
    ):
        other = alert_pb2.CreateAlertRequest()
        other.CopyFrom(request)
        change(other)
        with pytest.raises(grpc.RpcError) as caught:
            engine.create(other)
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "alert_id 'twice'" in caught.value.details()
        assert engine.get("twice") == settled
    assert received(gateways, "twice") == keys
    engine.resolve("twice", alert_pb2.RESOLUTION_CANCELLED)


# 9. Preview.


def test_preview_matches_the_oracle_and_records_nothing(shared, metro):
    engine, gateways = shared
    places = [offset(BEIJING, 5_000.0, 120.0), offset(BEIJING, 6_000.0, 140.0)]
    schedule = stages((700.0, 60), (1_500.0, 60), (1_500.0, 60))
    listed = engine.alerts.ListAlerts(alert_pb2.ListAlertsRequest())
    preview = engine.alerts.PreviewAlert(
        alert_pb2.PreviewAlertRequest(centres=[centre(*p) for p in places], stages=schedule)
    )
    assert preview.live_devices == len(metro)
    expected = Expected(metro)
    cumulative = 0
    for number, stage in enumerate(preview.stages, start=1):
        expected.sweep(number, places, stage.radius_m)
        ring = expected.stage(number)
        assert (stage.stage_number, stage.duration_s) == (number, 60)
        counts = {c.gateway_id: c.devices for c in stage.new_by_gateway}
        assert list(counts) == sorted(counts)
        for gateway in GATEWAYS:
            share = of_gateway(ring, gateway)
            assert len(share.must) <= counts.get(gateway, 0) <= len(share.may)
        assert stage.new_recipients == sum(counts.values())
        cumulative += stage.new_recipients
        assert stage.cumulative_recipients == cumulative
    assert preview.stages[2].new_recipients == 0
    assert engine.alerts.ListAlerts(alert_pb2.ListAlertsRequest()) == listed

    # Nothing was recorded: a real alert reaches every device the preview counted.
    request = create_request("after-preview", places, schedule)
    engine.create(request)
    for number, stage in enumerate(preview.stages, start=1):
        if number > 1:
            engine.clock.advance(60)
        alert = engine.wait_stage("after-preview", number, minimum=stage.new_recipients)
        got = {g.gateway_id: g.recipients for g in alert.stages[number - 1].gateways}
        assert got == {c.gateway_id: c.devices for c in stage.new_by_gateway}
    engine.clock.advance(60)
    wait_until(lambda: engine.get("after-preview").status == EXPIRED, what="expiry")
    assert len(received(gateways, "after-preview")) == preview.stages[-1].cumulative_recipients


# 10. Health and reflection.


def test_health_reports_serving(shared):
    engine, _ = shared
    health = health_pb2_grpc.HealthStub(engine.channel)
    for service in ("", *SERVICES):
        response = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_the_services(shared):
    engine, _ = shared
    services = set(ProtoReflectionDescriptorDatabase(engine.channel).get_services())
    assert {
        "tuanyuan.v1.AlertService",
        "tuanyuan.v1.LocationService",
        "tuanyuan.v1.GatewayService",
    } <= services
