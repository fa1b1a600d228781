"""Bad calls over gRPC: each gets its status code and a message naming the field, and
changes nothing (the alerts as ListAlerts shows them, the live devices).

Table-driven against one engine that holds a small population, an active alert
("open") and a resolved one ("done"); no gateway is subscribed, so nothing moves
unless a test moves it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc_support import (
    BEIJING,
    Engine,
    Population,
    centre,
    create_request,
    offset,
    payload,
    stages,
    tally,
    wait_until,
)

from engine import client
from engine.api import alert_pb2, gateway_pb2
from engine.delivery import timestamp

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED = grpc.StatusCode.FAILED_PRECONDITION
SHANGHAI = (31.2304, 121.4737)


@pytest.fixture(scope="module")
def engine():
    with Engine() as engine:
        engine.report(Population(5_000, seed=5).batches())
        engine.create(create_request("open", [BEIJING]))
        engine.create(create_request("done", [BEIJING]))
        wait_until(
            lambda: all(engine.get(a).stages[0].swept for a in ("open", "done")),
            what="the sweeps",
        )
        assert engine.get("open").stages[0].recipients > 0
        engine.resolve("done", alert_pb2.RESOLUTION_FALSE_REPORT)
        yield engine


def state(engine: Engine) -> tuple[bytes, int]:
    alerts = engine.alerts.ListAlerts(alert_pb2.ListAlertsRequest())
    return alerts.SerializeToString(deterministic=True), engine.live()


def refused(call: Callable[[], object], code: grpc.StatusCode, *words: str) -> str:
    """Runs ``call``, which must fail with ``code`` and a message holding ``words``."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == code, error.details()
    for word in words:
        assert word in error.details(), (word, error.details())
    return error.details()


def unchanged(engine: Engine, call, code, *words) -> None:
    before = state(engine)
    refused(call, code, *words)
    assert state(engine) == before


# AlertService.CreateAlert: one bad field at a time on an otherwise good request.


def _set(field: str, value):
    return lambda r: setattr(r, field, value)


def _centres(*places):
    def change(request):
        del request.centres[:]
        request.centres.extend(centre(*p) for p in places)

    return change


def _stages(*pairs):
    return lambda r: r.stages.CopyFrom(stages(*pairs))


def _payload(**fields):
    return lambda r: r.payload.CopyFrom(payload(**fields))


def _no_payload(request):
    request.ClearField("payload")


def _no_schedule(request):
    request.ClearField("schedule_name")


def _texts(*languages):
    texts = [alert_pb2.LocalizedText(language=lang, name="Li") for lang in languages]
    return _payload(texts=texts)


BAD_CREATES = {
    "empty alert_id": (_set("alert_id", ""), "alert_id"),
    "alert_id with a space": (_set("alert_id", "two words"), "alert_id"),
    "alert_id of 129 bytes": (_set("alert_id", "x" * 129), "alert_id"),
    "no centres": (_centres(), "centres", "got 0"),
    "17 centres": (_centres(*[BEIJING] * 17), "centres", "got 17"),
    "latitude 91": (_centres(BEIJING, (91.0, 116.0)), "centres[1].latitude", "91"),
    "latitude NaN": (_centres((math.nan, 116.0)), "centres[0].latitude", "nan"),
    "longitude -180.5": (_centres((39.0, -180.5)), "centres[0].longitude"),
    "label of 201 bytes": (
        lambda r: setattr(r.centres[0], "label", "x" * 201),
        "centres[0].label",
    ),
    "unknown schedule_name": (_set("schedule_name", "lunar"), "schedule_name", "'lunar'"),
    "no schedule": (_no_schedule, "schedule"),
    "stages shrinking": (_stages((2_000.0, 60), (1_000.0, 60)), "stages", "stage 2"),
    "stage of zero duration": (_stages((1_000.0, 0)), "stages", "stage 1", "duration"),
    "stage of a week and a second": (_stages((1_000.0, 604_801)), "stages", "duration"),
    "radius above 1000 km": (_stages((1_000_001.0, 60)), "stages", "radius"),
    "radius 0": (_stages((0.0, 60)), "stages", "radius"),
    "no stages": (lambda r: r.stages.CopyFrom(alert_pb2.Stages()), "stages"),
    "17 stages": (_stages(*[(1_000.0, 60)] * 17), "stages", "16"),
    "missing payload": (_no_payload, "payload"),
    "payload without texts": (_texts(), "payload.texts"),
    "duplicate language": (_texts("en", "zh-Hans", "en"), "payload.texts[2].language"),
    "empty language": (_texts(""), "payload.texts[0].language"),
    "empty name": (
        _payload(texts=[alert_pb2.LocalizedText(language="en")]),
        "payload.texts[0].name",
    ),
    "age 30": (_payload(age_years=30), "payload.age_years", "30"),
    "height 300": (_payload(height_cm=300), "payload.height_cm"),
    "photo over http": (
        _payload(photo_urls=["https://a.example/1.jpg", "http://a.example/2.jpg"]),
        "payload.photo_urls[1]",
        "https",
    ),
    "nine photos": (_payload(photo_urls=["https://a.example/x.jpg"] * 9), "payload.photo_urls"),
    "unknown sex": (_payload(sex=7), "payload.sex"),
}


@pytest.mark.parametrize("case", BAD_CREATES, ids=list(BAD_CREATES))
def test_a_bad_create_names_the_field(engine, case):
    change, *words = BAD_CREATES[case]
    request = create_request("new-alert", [BEIJING], "local")
    change(request)
    unchanged(engine, lambda: engine.create(request), INVALID, *words)
    refused(lambda: engine.get("new-alert"), NOT_FOUND)


def test_a_start_more_than_a_day_ahead_is_refused(engine):
    ahead = engine.clock.now() + 86_400 + 1
    request = create_request("tomorrow", [BEIJING], start_time=timestamp(ahead))
    unchanged(engine, lambda: engine.create(request), INVALID, "start_time")
    # A day ahead exactly is fine.
    request = create_request("tomorrow", [BEIJING], start_time=timestamp(ahead - 1))
    assert engine.create(request).status == alert_pb2.ALERT_STATUS_SCHEDULED
    engine.resolve("tomorrow", alert_pb2.RESOLUTION_CANCELLED)


def test_a_start_so_long_ago_that_the_schedule_ended_is_refused(engine):
    ended = engine.clock.now() - 3 * 3600  # the local schedule lasts three hours
    request = create_request("ended", [BEIJING], "local", start_time=timestamp(ended))
    unchanged(engine, lambda: engine.create(request), INVALID, "start_time", "ended")
    # A second later, it is still in its last stage: accepted, and running when answered.
    request = create_request("ended", [BEIJING], "local", start_time=timestamp(ended + 1))
    created = engine.create(request)
    assert created.status == alert_pb2.ALERT_STATUS_ACTIVE and created.current_stage >= 1
    wait_until(lambda: engine.get("ended").current_stage == 3, what="the last stage")
    engine.resolve("ended", alert_pb2.RESOLUTION_CANCELLED)


def test_an_alert_that_starts_now_is_running_when_create_answers(engine):
    created = engine.create(create_request("now", [BEIJING], "local"))
    assert created.status == alert_pb2.ALERT_STATUS_ACTIVE and created.current_stage == 1
    assert created.stages[0].HasField("started_at")
    engine.resolve("now", alert_pb2.RESOLUTION_CANCELLED)


def test_a_last_seen_time_in_the_future_is_refused(engine):
    request = create_request("future", [BEIJING])
    request.payload.last_seen_at.CopyFrom(timestamp(engine.clock.now() + 3600))
    unchanged(engine, lambda: engine.create(request), INVALID, "payload.last_seen_at")


# UpdateAlert, ResolveAlert, GetAlert, WatchAlert, ListAlerts, PreviewAlert.


def _update(**fields) -> alert_pb2.UpdateAlertRequest:
    fields.setdefault("alert_id", "open")
    return alert_pb2.UpdateAlertRequest(**fields)


BAD_UPDATES = {
    "nothing set": (_update(), INVALID, "nothing to update", "centres, payload or a schedule"),
    "bad alert_id": (_update(alert_id="a b", payload=payload()), INVALID, "alert_id"),
    "no centres": (_update(centres=alert_pb2.Centres()), INVALID, "centres.centres"),
    "latitude 91": (
        _update(centres=alert_pb2.Centres(centres=[centre(91.0, 0.0)])),
        INVALID,
        "centres.centres[0].latitude",
    ),
    "bad payload": (_update(payload=payload(age_years=18)), INVALID, "payload.age_years"),
    "unknown schedule": (_update(schedule_name="lunar"), INVALID, "schedule_name"),
    "shrinking stages": (
        _update(stages=stages((500.0, 60), (100.0, 60))),
        INVALID,
        "stages",
        "stage 2",
    ),
    "unknown alert": (_update(alert_id="nobody", payload=payload()), NOT_FOUND, "'nobody'"),
    "resolved alert": (_update(alert_id="done", payload=payload()), FAILED, "resolved"),
}


@pytest.mark.parametrize("case", BAD_UPDATES, ids=list(BAD_UPDATES))
def test_a_bad_update_names_the_field(engine, case):
    request, code, *words = BAD_UPDATES[case]
    unchanged(engine, lambda: engine.alerts.UpdateAlert(request), code, *words)


def test_an_update_built_from_an_older_version_is_aborted(engine):
    read = engine.get("open")
    first = _update(payload=payload(age_years=7), expected_version=read.version)
    assert engine.alerts.UpdateAlert(first).version == read.version + 1
    # A second change built from the same read: the alert moved on meanwhile.
    second = _update(payload=payload(age_years=8), expected_version=read.version)
    unchanged(
        engine,
        lambda: engine.alerts.UpdateAlert(second),
        grpc.StatusCode.ABORTED,
        f"version {read.version + 1}",
        f"expected_version {read.version}",
    )
    assert engine.get("open").payload.age_years == 7


def _resolve(alert_id="open", resolution=alert_pb2.RESOLUTION_FOUND, follow_up=()):
    return alert_pb2.ResolveAlertRequest(
        alert_id=alert_id,
        resolution=resolution,
        follow_up=[alert_pb2.LocalizedNotice(language=lang, text=t) for lang, t in follow_up],
    )


BAD_RESOLVES = {
    "resolution unspecified": (
        _resolve(resolution=alert_pb2.RESOLUTION_UNSPECIFIED),
        INVALID,
        "resolution",
    ),
    "unknown resolution": (_resolve(resolution=9), INVALID, "resolution"),
    "follow-up language twice": (
        _resolve(follow_up=[("en", "found"), ("en", "found!")]),
        INVALID,
        "follow_up[1].language",
    ),
    "empty follow-up text": (_resolve(follow_up=[("en", "")]), INVALID, "follow_up[0].text"),
    "follow-up over 1 KiB": (_resolve(follow_up=[("en", "x" * 1025)]), INVALID, "follow_up[0]"),
    "unknown alert": (_resolve(alert_id="nobody"), NOT_FOUND, "'nobody'"),
    "resolved alert": (_resolve(alert_id="done"), FAILED, "already resolved"),
}


@pytest.mark.parametrize("case", BAD_RESOLVES, ids=list(BAD_RESOLVES))
def test_a_bad_resolve_names_the_field(engine, case):
    request, code, *words = BAD_RESOLVES[case]
    unchanged(engine, lambda: engine.alerts.ResolveAlert(request), code, *words)


def test_unknown_alerts_are_not_found(engine):
    unchanged(engine, lambda: engine.get("nobody"), NOT_FOUND, "'nobody'")
    watch = engine.alerts.WatchAlert(alert_pb2.WatchAlertRequest(alert_id="nobody"))
    unchanged(engine, lambda: list(watch), NOT_FOUND, "'nobody'")


def test_list_alerts_refuses_unknown_statuses(engine):
    request = alert_pb2.ListAlertsRequest(statuses=[alert_pb2.ALERT_STATUS_ACTIVE, 9])
    unchanged(engine, lambda: engine.alerts.ListAlerts(request), INVALID, "statuses")
    statuses = [alert_pb2.ALERT_STATUS_RESOLVED]
    listed = engine.alerts.ListAlerts(alert_pb2.ListAlertsRequest(statuses=statuses))
    assert "done" in [a.alert_id for a in listed.alerts]
    assert "open" not in [a.alert_id for a in listed.alerts]


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (alert_pb2.PreviewAlertRequest(schedule_name="local"), ("centres", "got 0")),
        (alert_pb2.PreviewAlertRequest(centres=[centre(0.0, 0.0)]), ("schedule",)),
        (
            alert_pb2.PreviewAlertRequest(centres=[centre(0.0, 200.0)], schedule_name="local"),
            ("centres[0].longitude",),
        ),
        (
            alert_pb2.PreviewAlertRequest(
                centres=[centre(0.0, 0.0)], stages=stages((10.0, 60), (5.0, 60))
            ),
            ("stages", "stage 2"),
        ),
    ],
    ids=["no centres", "no schedule", "longitude 200", "shrinking stages"],
)
def test_a_bad_preview_names_the_field(engine, request_, words):
    unchanged(engine, lambda: engine.alerts.PreviewAlert(request_), INVALID, *words)


# LocationService.


def _batch(gateway: int, ids, lat, lng, observed=None) -> bytes:
    return client.encode_batch(gateway, np.asarray(ids, np.uint64), lat, lng, observed)


def _cluster(gateway: int, first_id: int, n: int = 100) -> bytes:
    """``n`` new devices in Shanghai, far from every alert."""
    ids = np.arange(first_id, first_id + n, dtype=np.uint64)
    return _batch(gateway, ids, np.full(n, SHANGHAI[0]), np.full(n, SHANGHAI[1]))


def _devices_near_shanghai(engine: Engine, gateway: int) -> int:
    response = engine.alerts.PreviewAlert(
        alert_pb2.PreviewAlertRequest(centres=[centre(*SHANGHAI)], stages=stages((100.0, 60)))
    )
    counts = {c.gateway_id: c.devices for c in response.stages[0].new_by_gateway}
    return counts.get(gateway, 0)


def _report_refused(engine: Engine, batches: list[bytes], *words: str) -> int:
    """Reports ``batches``, which must be refused; returns the live devices before."""
    before_alerts, before_live = state(engine)
    refused(lambda: engine.report(batches), INVALID, *words)
    assert state(engine)[0] == before_alerts
    return before_live


def test_a_bad_gateway_id_names_its_batch_and_keeps_the_earlier_ones(engine):
    live = _report_refused(
        engine,
        [_cluster(40, 1), _cluster(70_000, 1_000)],
        "batch 1",
        "gateway_id",
        "70000",
    )
    assert engine.live() == live + 100
    assert _devices_near_shanghai(engine, 40) == 100


def test_a_latitude_out_of_range_names_the_field_and_position(engine):
    n, bad = 50, 17
    lat = np.full(n + 5, SHANGHAI[0])
    lat[bad] = 91.0
    # The bad batch moves the first batch's devices away and adds five: none of it holds.
    ids = np.arange(1, n + 6)
    bad_batch = _batch(41, ids, lat, np.full(n + 5, SHANGHAI[1]))
    live = _report_refused(
        engine,
        [_cluster(41, 1, n), bad_batch],
        "batch 1",
        "latitudes",
        f"position {bad}",
        "91",
    )
    assert engine.live() == live + n
    assert _devices_near_shanghai(engine, 41) == n


@pytest.mark.parametrize(
    ("batch", "words"),
    [
        (_batch(42, [1, 2, 3], np.zeros(2), np.zeros(3)), ("latitudes has 2", "device_ids has 3")),
        (_batch(42, [1, 2], np.zeros(2), np.zeros(1)), ("longitudes has 1",)),
        (_batch(42, [1], np.zeros(1), np.zeros(1), np.zeros(2)), ("observed_at has 2",)),
        (_batch(42, [1, 2], np.zeros(2), np.array([0.0, math.inf])), ("longitudes", "position 1")),
        (_batch(42, [1], np.zeros(1), np.zeros(1), np.array([2e9])), ("observed_at",)),
        (b"\xff\xff\xff", ("batch 0", "not a LocationBatch")),
    ],
    ids=[
        "short latitudes",
        "short longitudes",
        "long observed_at",
        "longitude inf",
        "future",
        "junk",
    ],
)
def test_a_bad_first_batch_applies_nothing(engine, batch, words):
    live = _report_refused(engine, [batch], "batch 0", *words)
    assert engine.live() == live


def test_forgotten_devices_are_no_longer_reached(engine):
    place = offset(SHANGHAI, 30_000.0, 0.0)
    ids = np.arange(500, 560, dtype=np.uint64)
    engine.report([_batch(43, ids, np.full(60, place[0]), np.full(60, place[1]))])
    assert client.forget(engine.channel, 43, np.concatenate([ids[:20], [9_999_999]])) == 20
    assert client.forget(engine.channel, 43, ids[:20]) == 0
    refused(lambda: client.forget(engine.channel, 70_000, ids), INVALID, "gateway_id")

    recorder = engine.subscribe(43)
    engine.create(create_request("after-forget", [place], stages((500.0, 60))))
    wait_until(lambda: recorder.devices("after-forget") == 40, what="the remaining devices")
    assert set(recorder.keys("after-forget")) == {(43, int(i)) for i in ids[20:]}
    engine.clock.advance(60)
    wait_until(lambda: engine.get("after-forget").status == alert_pb2.ALERT_STATUS_EXPIRED)
    assert tally(engine.get("after-forget"), 1, 43).recipients == 40


# GatewayService.


def _upstream_ack(sequence: int) -> gateway_pb2.GatewayUpstream:
    return gateway_pb2.GatewayUpstream(ack=gateway_pb2.Ack(sequence=sequence))


def _hello(**fields) -> gateway_pb2.GatewayUpstream:
    return gateway_pb2.GatewayUpstream(hello=gateway_pb2.Hello(**fields))


@pytest.mark.parametrize(
    ("first", "words"),
    [
        (_upstream_ack(0), ("first message must be a hello",)),
        (_hello(gateway_id=70_000), ("hello.gateway_id", "70000")),
        (_hello(gateway_id=1, max_unacked_messages=5_000), ("hello.max_unacked_messages",)),
        (_hello(gateway_id=1, max_devices_per_second=-1.0), ("hello.max_devices_per_second",)),
        (_hello(gateway_id=1, max_devices_per_second=math.nan), ("max_devices_per_second",)),
    ],
    ids=["ack first", "gateway 70000", "window 5000", "negative rate", "NaN rate"],
)
def test_a_bad_first_message_ends_the_stream(engine, first, words):
    stream = engine.raw(first=first)
    error = stream.finish()
    assert error is not None and error.code() == INVALID, error
    for word in words:
        assert word in error.details()


def test_acks_beyond_the_last_sent_or_behind_the_last_ack_end_the_stream(engine):
    # Gateway 9 has nothing: any ack beyond 0 is beyond the last message sent.
    stream = engine.raw(9)
    stream.ack(0)
    stream.ack(5)
    error = stream.finish()
    assert error.code() == INVALID and "ack 5 is beyond the last message sent, 0" in error.details()

    # Gateway 2 has the open alert waiting: ack two, then one.
    stream = engine.raw(2)
    messages = stream.take(3)
    stream.ack(2)
    wait_until(lambda: engine.acked(2) == 2, what="the ack")
    stream.ack(1)
    error = stream.finish()
    assert error.code() == INVALID and "ack 1 is behind the last ack, 2" in error.details()

    # The refused ack changed nothing: a new stream resumes after 2.
    again = engine.raw(2)
    assert again.next() == messages[2]
    again.close()
