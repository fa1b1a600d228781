"""Fuzzing every rpc of a real engine: random messages and mutated bytes.

``python -m bench.fuzz --examples 2000`` starts an engine (port 0, manual clock,
credentials) per rpc and sends it, through a channel with identity serializers:

- ``typed``: well-typed requests drawn with hypothesis from the message descriptors
  (every field type, nested messages, enums with unknown values, repeated fields,
  NaN and infinite doubles, extreme and negative-as-unsigned integers, long strings),
  either wholly random or a valid request with random fields laid over it;
- ``bytes``: the encodings of such requests, mutated (bit flips, truncation,
  duplication, random bytes, invalid UTF-8 in a string field).

Each call goes with a token of a role that may make it (for LocationService and
GatewayService, of the gateway the request names when the engine has one), so the
handlers run, not just the interceptor. The property (:meth:`FuzzWorld.exercise`): the
call ends with OK or one of the clean codes in :data:`CLEAN`, never UNKNOWN or
INTERNAL (an exception a handler did not catch) nor a hang; the engine logs no error
or traceback; health still says SERVING and a normal call works; a read-only call
changes nothing, and a state-changing call that failed changed nothing (ListAlerts,
the live devices, the gateway queues). It writes ``bench/results/fuzz.json`` and
``fuzz.md``; ``tests/test_fuzz.py`` runs the same strategies with fewer examples.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import message as pb_message
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from engine import auth, client
from engine.api import alert_pb2, alert_pb2_grpc, gateway_pb2, location_pb2
from engine.clock import ManualClock
from engine.server import ServerOptions, ServerThread

START = 1_800_000_000.0
#: Real seconds a call may take before it counts as a hang.
TIMEOUT_S = 15.0
BEIJING = (39.9042, 116.4074)
#: Gateways the engine has a reporter and a gateway credential for.
GATEWAYS = (0, 1, 2, 65535)
DEVICES_PER_GATEWAY = 300
#: Restart the engine past this many alerts, so that ListAlerts stays cheap.
MAX_ALERTS = 300

OK = grpc.StatusCode.OK.name
#: The codes a call may end with besides OK: each says what was wrong with the call.
CLEAN = frozenset(
    code.name
    for code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
)

#: alert_id placeholders, replaced just before the call: a fresh active alert made for
#: this call, and an id no alert has.
NEW_ALERT = "@new"
UNIQUE_ID = "@unique"
#: A string the bytes mutator replaces with as many bytes of invalid UTF-8.
MARKER = "~BADUTF8~"
BAD_UTF8 = b"\xc0\x80\xed\xa0\x80\xff\xfe\xf8\x80"  # overlong, surrogate, 0xff, 0xfe, 0xf8
assert len(BAD_UTF8) == len(MARKER.encode())


# Values of every scalar type, from the wide range and from the edges the engine checks.

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_EDGE_INTS = sorted(
    {
        *(0, 1, 2, 3, 16, 17, 18, 35, 36, 64, 128, 250, 251, 4096, 4097, 65535, 65536),
        *(604_800, 604_801, 999_999_999, 10**9, 1_000_000, 1_000_001),
        *(2**31 - 1, 2**31, 2**32 - 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1),
        # What -1 and other negatives become in an unsigned field, and negatives.
        *(-1, -2, -(2**31), -(2**63)),
        # Timestamps: the engine's now, a day ahead, and the edges of the valid range.
        *(int(START), int(START) + 86_400, int(START) + 86_401, int(START) - 3_600),
        *(-62_135_596_800, -62_135_596_801, 253_402_300_799, 253_402_300_800),
    }
)
_EDGE_FLOATS = (
    *(0.0, -0.0, 1.0, -1.0, 90.0, -90.0, 90.000001, 180.0, -180.0, 180.000001),
    *(1_000_000.0, 1_000_000.1, 5e-324, 1e-300, 1e308, -1e308, 1e19, 2**64),
    *(math.nan, math.inf, -math.inf, BEIJING[0], BEIJING[1], START, START + 400),
)
_VOCABULARY = (
    *("", " ", "local", "regional", "lunar", "en", "zh-Hans", "fr", "open", "done"),
    *("later", "nobody", NEW_ALERT, UNIQUE_ID, "Li", "110", "a b", "a\x00b", MARKER),
    *("https://a.example/p.jpg", "http://a.example/p.jpg", "x" * 35, "x" * 36),
    *("x" * 128, "x" * 129, "é" * 100, "é" * 101, "中" * 341, "\U0001f600" * 10),
)


def _long_text() -> st.SearchStrategy[str]:
    """Strings at and past the engine's byte limits (200, 1 KiB, 2 KiB, 64 KiB)."""
    return st.builds(
        lambda char, size: char * size,
        st.sampled_from(("x", "é", "中")),
        st.sampled_from((200, 201, 1_024, 1_025, 2_049, 65_537)),
    )


def scalar(field: FieldDescriptor) -> st.SearchStrategy:
    """Values of one non-message field."""
    kind = field.type
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        return st.one_of(
            st.integers(low, high),
            st.sampled_from([v for v in _EDGE_INTS if low <= v <= high]),
            st.integers(max(low, 0), min(high, 300)),
        )
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.one_of(st.floats(), st.sampled_from(_EDGE_FLOATS), st.floats(-200, 200))
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.one_of(st.floats(width=32), st.sampled_from((0.0, math.nan, math.inf)))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=24), st.sampled_from(_VOCABULARY), _long_text())
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=32)
    if kind == FieldDescriptor.TYPE_ENUM:
        known = [value.number for value in field.enum_type.values]
        # proto3 enums are open: any int32 goes on the wire and reaches the handler.
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise TypeError(f"no strategy for field {field.full_name} of type {kind}")


#: Most elements of a generated repeated field (above every limit of 16 but the
#: packed arrays', whose limits are far beyond anything worth generating).
MAX_REPEATED = 20


def field_values(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        one = messages(field.message_type, depth + 1)
    else:
        one = scalar(field)
    return st.lists(one, max_size=MAX_REPEATED) if field.is_repeated else one


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy:
    """Random well-typed messages of ``descriptor``: each field present or not; of a
    oneof, the last member drawn wins. Below four levels of nesting, messages are empty."""
    cls = _message_class(descriptor)
    if depth > 4:
        return st.builds(cls)
    optional = {f.name: st.deferred(lambda f=f: field_values(f, depth)) for f in descriptor.fields}
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: build(cls, values))


def _message_class(descriptor: Descriptor) -> type:
    return message_factory.GetMessageClass(descriptor)


def build(cls: type, values: dict) -> pb_message.Message:
    message = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name) if field.is_repeated else None
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                getattr(message, name).CopyFrom(value)
        elif field.is_repeated:
            target.extend(value)
        else:
            setattr(message, name, value)
    return message


def sparse(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy:
    """Messages of ``descriptor`` with one or two fields set, nested ones sparse too or
    wholly random: laid over a valid request, they change it in one place or two."""
    cls = _message_class(descriptor)

    def value(field: FieldDescriptor) -> st.SearchStrategy:
        if field.type != FieldDescriptor.TYPE_MESSAGE or depth > 3:
            return field_values(field, depth)
        one = st.one_of(sparse(field.message_type, depth + 1), messages(field.message_type))
        return st.lists(one, min_size=1, max_size=3) if field.is_repeated else one

    def pick(fields):
        return st.fixed_dictionaries({f.name: st.deferred(lambda f=f: value(f)) for f in fields})

    chosen = st.lists(st.sampled_from(list(descriptor.fields)), min_size=1, max_size=2, unique=True)
    return chosen.flatmap(pick).map(lambda values: build(cls, values))


def overlay(base: st.SearchStrategy, descriptor: Descriptor) -> st.SearchStrategy:
    """A valid request with a field or two changed: each field the sparse message sets
    replaces the base's or (``merge``) merges into it (repeated fields grow, nested
    messages change in one place)."""

    def lay(base_message, extra, merge):
        message = type(base_message)()
        message.CopyFrom(base_message)
        if not merge:
            for field, _ in extra.ListFields():
                message.ClearField(field.name)
        message.MergeFrom(extra)
        return message

    return st.builds(lay, base, sparse(descriptor), st.booleans())


# Valid requests, with some variety: the base of the overlays and of the mutations.


def _centres(n_max: int = 3) -> st.SearchStrategy:
    centre = st.builds(
        lambda dlat, dlng, label: alert_pb2.Centre(
            latitude=BEIJING[0] + dlat, longitude=BEIJING[1] + dlng, label=label
        ),
        st.floats(-0.05, 0.05),
        st.floats(-0.05, 0.05),
        st.sampled_from(("", "station", MARKER)),
    )
    return st.lists(centre, min_size=1, max_size=n_max)


def _stages() -> st.SearchStrategy:
    def make(radii, durations):
        radii = sorted(radii)
        return alert_pb2.Stages(
            stages=[
                alert_pb2.Stage(radius_m=r, duration_s=d)
                for r, d in zip(radii, durations, strict=False)
            ]
        )

    return st.builds(
        make,
        st.lists(st.floats(1.0, 1_000_000.0), min_size=1, max_size=4),
        st.lists(st.integers(1, 604_800), min_size=4, max_size=4),
    )


def _schedule(message: pb_message.Message, kind: str, value) -> pb_message.Message:
    if kind == "name":
        message.schedule_name = value
    elif kind == "stages":
        message.stages.CopyFrom(value)
    return message


def _schedules(required: bool) -> st.SearchStrategy:
    options = [
        st.tuples(st.just("name"), st.sampled_from(("local", "regional"))),
        st.tuples(st.just("stages"), _stages()),
    ]
    if not required:
        options.append(st.tuples(st.just("none"), st.none()))
    return st.one_of(options)


def _payloads() -> st.SearchStrategy:
    def make(languages, name, age, sex, height, photos, last_seen):
        payload = alert_pb2.AlertPayload(
            texts=[
                alert_pb2.LocalizedText(
                    language=language, name=name, description="red coat", contact="110"
                )
                for language in languages
            ],
            age_years=age,
            sex=sex,
            height_cm=height,
            photo_urls=photos,
        )
        if last_seen is not None:
            payload.last_seen_at.FromSeconds(last_seen)
        return payload

    return st.builds(
        make,
        st.lists(st.sampled_from(("en", "zh-Hans", "fr")), min_size=1, max_size=3, unique=True),
        st.sampled_from(("Li Xiaoming", "小明", MARKER)),
        st.integers(0, 17),
        st.sampled_from([0, 1, 2]),
        st.integers(0, 250),
        st.lists(st.just("https://a.example/p.jpg"), max_size=3),
        st.one_of(st.none(), st.integers(int(START) - 86_400, int(START))),
    )


def _create_requests() -> st.SearchStrategy:
    def make(alert_id, centres, schedule, payload, start):
        request = alert_pb2.CreateAlertRequest(alert_id=alert_id, centres=centres, payload=payload)
        if start is not None:
            request.start_time.FromSeconds(start)
        return _schedule(request, *schedule)

    return st.builds(
        make,
        st.sampled_from((UNIQUE_ID,) * 4 + ("open", "done")),
        _centres(),
        _schedules(required=True),
        _payloads(),
        st.one_of(st.none(), st.integers(int(START) - 7_200, int(START) + 3_600)),
    )


def _update_requests() -> st.SearchStrategy:
    def make(alert_id, centres, payload, schedule):
        request = alert_pb2.UpdateAlertRequest(alert_id=alert_id)
        if centres is not None:
            request.centres.centres.extend(centres)
        if payload is not None:
            request.payload.CopyFrom(payload)
        return _schedule(request, *schedule)

    return st.builds(
        make,
        st.sampled_from((NEW_ALERT,) * 4 + ("later", "done", "nobody")),
        st.one_of(st.none(), _centres()),
        st.one_of(st.none(), _payloads()),
        _schedules(required=False),
    )


def _resolve_requests() -> st.SearchStrategy:
    notice = st.builds(
        lambda language, text: alert_pb2.LocalizedNotice(language=language, text=text),
        st.sampled_from(("en", "zh-Hans")),
        st.sampled_from(("found, thank you", MARKER)),
    )
    return st.builds(
        lambda alert_id, resolution, notices: alert_pb2.ResolveAlertRequest(
            alert_id=alert_id,
            resolution=resolution,
            follow_up=list({n.language: n for n in notices}.values()),
        ),
        st.sampled_from((NEW_ALERT,) * 4 + ("done", "nobody")),
        st.sampled_from((1, 2, 3)),
        st.lists(notice, max_size=2),
    )


_KNOWN_IDS = ("open", "done", "later", "nobody", MARKER)


def _preview_requests() -> st.SearchStrategy:
    return st.builds(
        lambda centres, schedule: _schedule(
            alert_pb2.PreviewAlertRequest(centres=centres), *schedule
        ),
        _centres(),
        _schedules(required=True),
    )


def _batches() -> st.SearchStrategy:
    def make(gateway, ids, spread, observed):
        n = len(ids)
        rng = np.random.default_rng(n)
        return location_pb2.LocationBatch(
            gateway_id=gateway,
            device_ids=ids,
            latitudes=(BEIJING[0] + rng.uniform(-spread, spread, n)).tolist(),
            longitudes=(BEIJING[1] + rng.uniform(-spread, spread, n)).tolist(),
            observed_at=[START + observed] * n if observed is not None else [],
        )

    return st.builds(
        make,
        st.sampled_from((0, 1, 2)),
        st.lists(st.integers(1, 2 * DEVICES_PER_GATEWAY), max_size=MAX_REPEATED),
        st.sampled_from((0.001, 0.05)),
        st.one_of(st.none(), st.sampled_from((-600.0, 0.0, 299.0, 301.0))),
    )


def _forget_requests() -> st.SearchStrategy:
    return st.builds(
        lambda gateway, ids: location_pb2.ForgetDevicesRequest(gateway_id=gateway, device_ids=ids),
        st.sampled_from((0, 1, 2)),
        st.lists(st.integers(DEVICES_PER_GATEWAY, 2 * DEVICES_PER_GATEWAY), max_size=10),
    )


def _hellos() -> st.SearchStrategy:
    return st.builds(
        lambda gateway, rate, window: gateway_pb2.GatewayUpstream(
            hello=gateway_pb2.Hello(
                gateway_id=gateway, max_devices_per_second=rate, max_unacked_messages=window
            )
        ),
        st.sampled_from((0, 1, 2)),
        st.sampled_from((0.0, 1.0, 1_000.0, 1e6)),
        st.sampled_from((0, 1, 4, 64, 4096)),
    )


def _acks() -> st.SearchStrategy:
    return st.builds(
        lambda sequence: gateway_pb2.GatewayUpstream(ack=gateway_pb2.Ack(sequence=sequence)),
        st.integers(0, 8),
    )


# The rpcs.


@dataclass(frozen=True)
class Target:
    """One rpc, how to call it and how to draw its requests."""

    name: str
    method: str
    #: unary_unary, unary_stream, stream_unary or stream_stream.
    kind: str
    request: type
    #: Valid requests (one message; for client streams, one element).
    valid: Callable[[], st.SearchStrategy]
    #: Whether an admitted call may change the engine's state.
    changes_state: bool
    #: For client streams: the valid first element, when it differs from the others.
    first: Callable[[], st.SearchStrategy] | None = None

    @property
    def client_streams(self) -> bool:
        return self.kind.startswith("stream")


_A = "/tuanyuan.v1.AlertService/"
TARGETS: tuple[Target, ...] = (
    Target(
        "CreateAlert",
        _A + "CreateAlert",
        "unary_unary",
        alert_pb2.CreateAlertRequest,
        _create_requests,
        True,
    ),
    Target(
        "UpdateAlert",
        _A + "UpdateAlert",
        "unary_unary",
        alert_pb2.UpdateAlertRequest,
        _update_requests,
        True,
    ),
    Target(
        "ResolveAlert",
        _A + "ResolveAlert",
        "unary_unary",
        alert_pb2.ResolveAlertRequest,
        _resolve_requests,
        True,
    ),
    Target(
        "GetAlert",
        _A + "GetAlert",
        "unary_unary",
        alert_pb2.GetAlertRequest,
        lambda: st.builds(alert_pb2.GetAlertRequest, alert_id=st.sampled_from(_KNOWN_IDS)),
        False,
    ),
    Target(
        "ListAlerts",
        _A + "ListAlerts",
        "unary_unary",
        alert_pb2.ListAlertsRequest,
        lambda: st.builds(
            alert_pb2.ListAlertsRequest,
            statuses=st.lists(st.sampled_from((1, 2, 3, 4)), max_size=4),
        ),
        False,
    ),
    Target(
        "WatchAlert",
        _A + "WatchAlert",
        "unary_stream",
        alert_pb2.WatchAlertRequest,
        lambda: st.builds(alert_pb2.WatchAlertRequest, alert_id=st.sampled_from(_KNOWN_IDS)),
        False,
    ),
    Target(
        "PreviewAlert",
        _A + "PreviewAlert",
        "unary_unary",
        alert_pb2.PreviewAlertRequest,
        _preview_requests,
        False,
    ),
    Target(
        "ReportLocations",
        "/tuanyuan.v1.LocationService/ReportLocations",
        "stream_unary",
        location_pb2.LocationBatch,
        _batches,
        True,
    ),
    Target(
        "ForgetDevices",
        "/tuanyuan.v1.LocationService/ForgetDevices",
        "unary_unary",
        location_pb2.ForgetDevicesRequest,
        _forget_requests,
        True,
    ),
    Target(
        "Subscribe",
        "/tuanyuan.v1.GatewayService/Subscribe",
        "stream_stream",
        gateway_pb2.GatewayUpstream,
        _acks,
        True,
        first=_hellos,
    ),
)
MODES = ("typed", "bytes")


@dataclass(frozen=True)
class Mutation:
    """One change to the bytes of a message; positions wrap around its length."""

    kind: str
    position: int = 0
    bit: int = 0
    blob: bytes = b""

    def apply(self, data: bytes) -> bytes:
        n = len(data)
        at = self.position % (n + 1)
        if self.kind == "flip":
            if not n:
                return data
            i = self.position % n
            return data[:i] + bytes([data[i] ^ (1 << self.bit)]) + data[i + 1 :]
        if self.kind == "truncate":
            return data[:at]
        if self.kind == "duplicate":  # a slice repeated in place, or the whole message
            end = at + max(1, len(self.blob))
            return data[:end] + data[at:end] + data[end:] if self.blob else data + data
        if self.kind == "insert":
            return data[:at] + self.blob + data[at:]
        if self.kind == "overwrite":
            return data[:at] + self.blob + data[at + len(self.blob) :]
        if self.kind == "utf8":
            return data.replace(MARKER.encode(), BAD_UTF8)
        raise ValueError(f"unknown mutation {self.kind!r}")


def mutations() -> st.SearchStrategy:
    return st.lists(
        st.builds(
            Mutation,
            st.sampled_from(("flip", "truncate", "duplicate", "insert", "overwrite", "utf8")),
            st.integers(0, 2**16),
            st.integers(0, 7),
            st.binary(max_size=12),
        ),
        min_size=1,
        max_size=3,
    )


@dataclass
class Case:
    """The messages of one call and, in bytes mode, the mutations of each."""

    messages: list
    mutations: list[list[Mutation]] | None = None


def _one(target: Target, first: bool, wide: bool) -> st.SearchStrategy:
    """One message: valid, a valid one with random fields over it, or (``wide``)
    wholly random."""
    valid = target.first() if first and target.first is not None else target.valid()
    options = [valid, overlay(valid, target.request.DESCRIPTOR)]
    if wide:
        options.append(messages(target.request.DESCRIPTOR))
    return st.one_of(options)


def cases(target: Target, mode: str) -> st.SearchStrategy[Case]:
    """The calls of one rpc in one mode."""
    wide = mode == "typed"  # mutations of random messages mostly fail to decode the same way
    if target.client_streams:
        stream = st.builds(
            lambda head, tail: [head, *tail],
            _one(target, True, wide),
            st.lists(_one(target, False, wide), max_size=3),
        )
    else:
        stream = _one(target, False, wide).map(lambda message: [message])
    if mode == "typed":
        return stream.map(Case)
    return stream.flatmap(
        lambda messages: st.builds(
            Case,
            st.just(messages),
            st.lists(
                st.one_of(st.just([]), mutations()),
                min_size=len(messages),
                max_size=len(messages),
            ).filter(any),
        )
    )


# The engine under fuzzing.


class _ErrorLog(logging.Handler):
    """Keeps every record of level ERROR or more, or carrying a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


def _credentials() -> tuple[auth.Credentials, dict[str, str]]:
    made = [
        auth.new_credential(
            "fuzz-issuer", auth.ISSUER, alerts_per_minute=auth.MAX_ALERTS_PER_MINUTE
        )
    ]
    for gateway in GATEWAYS:
        made.append(auth.new_credential(f"reporter-{gateway}", auth.REPORTER, gateway))
        made.append(auth.new_credential(f"gateway-{gateway}", auth.GATEWAY, gateway))
    return auth.Credentials(c for c, _ in made), {c.name: token for c, token in made}


@dataclass
class Outcome:
    code: str
    details: str
    problems: list[str] = field(default_factory=list)


def valid_create(alert_id: str, start: float = START) -> alert_pb2.CreateAlertRequest:
    """A CreateAlert the engine accepts: Beijing, 1 km then 3 km, an hour each."""
    request = alert_pb2.CreateAlertRequest(
        alert_id=alert_id,
        centres=[alert_pb2.Centre(latitude=BEIJING[0], longitude=BEIJING[1])],
        stages=alert_pb2.Stages(
            stages=[
                alert_pb2.Stage(radius_m=1_000.0, duration_s=3_600),
                alert_pb2.Stage(radius_m=3_000.0, duration_s=3_600),
            ]
        ),
        payload=alert_pb2.AlertPayload(texts=[alert_pb2.LocalizedText(language="en", name="Li")]),
    )
    request.start_time.FromSeconds(int(start))
    return request


class FuzzWorld:
    """An engine on a manual clock with credentials and devices of gateways 0, 1 and 2
    around Beijing; alerts ``open`` (active), ``done`` (resolved) and ``later``
    (scheduled an hour ahead). Nothing moves unless a call moves it."""

    def __init__(self) -> None:
        self.errors = _ErrorLog()
        logging.getLogger().addHandler(self.errors)
        self._ids = 0
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        credentials, self.tokens = _credentials()
        self.clock = ManualClock(START)
        self.thread = ServerThread(
            ServerOptions(clock=self.clock, ttl_s=30 * 86_400, credentials=credentials)
        )
        port = self.thread.start()
        self.channels = {
            name: client.connect(f"127.0.0.1:{port}", token=token)
            for name, token in self.tokens.items()
        }
        self.alerts = alert_pb2_grpc.AlertServiceStub(self.channels["fuzz-issuer"])
        self.health = health_pb2_grpc.HealthStub(client.connect(f"127.0.0.1:{port}"))
        rng = np.random.default_rng(7)
        for gateway in (0, 1, 2):
            n = DEVICES_PER_GATEWAY
            batch = client.encode_batch(
                gateway,
                np.arange(1, n + 1, dtype=np.uint64),
                BEIJING[0] + rng.uniform(-0.03, 0.03, n),
                BEIJING[1] + rng.uniform(-0.03, 0.03, n),
            )
            client.report(self.channels[f"reporter-{gateway}"], [batch], timeout=TIMEOUT_S)
        self.alerts.CreateAlert(valid_create("open"), timeout=TIMEOUT_S)
        self.alerts.CreateAlert(valid_create("done"), timeout=TIMEOUT_S)
        self.alerts.CreateAlert(valid_create("later", START + 3_600), timeout=TIMEOUT_S)
        self.settle()
        self.alerts.ResolveAlert(
            alert_pb2.ResolveAlertRequest(alert_id="done", resolution=alert_pb2.RESOLUTION_FOUND),
            timeout=TIMEOUT_S,
        )

    def _stop(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.thread.stop()

    def close(self) -> None:
        self._stop()
        logging.getLogger().removeHandler(self.errors)

    def __enter__(self) -> FuzzWorld:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def alert_count(self) -> int:
        return len(self.thread.engine.dispatcher.alerts)

    def settle(self) -> None:
        """Waits for the background work of the calls so far (stage sweeps that
        CreateAlert spawns), so that a state read afterwards is stable."""

        self.thread.call(self.thread.engine.dispatcher.settle)

    def state(self) -> tuple:
        """The alerts (ListAlerts), the live devices and each gateway's queue."""
        listed = self.alerts.ListAlerts(alert_pb2.ListAlertsRequest(), timeout=TIMEOUT_S)
        live = self.alerts.PreviewAlert(
            alert_pb2.PreviewAlertRequest(
                centres=[alert_pb2.Centre()],
                stages=alert_pb2.Stages(stages=[alert_pb2.Stage(radius_m=1.0, duration_s=1)]),
            ),
            timeout=TIMEOUT_S,
        ).live_devices

        async def queues():
            return {
                gateway: (box.acked, box.next_sequence, len(box.queued), len(box.unacked))
                for gateway, box in sorted(self.thread.engine.dispatcher.outboxes.items())
            }

        return listed.SerializeToString(deterministic=True), live, self.thread.call(queues)

    # One call.

    def _fill(self, message: pb_message.Message) -> pb_message.Message:
        """A copy with the alert_id placeholders replaced."""
        if "alert_id" not in message.DESCRIPTOR.fields_by_name:
            return message
        if message.alert_id not in (NEW_ALERT, UNIQUE_ID):
            return message
        copy = type(message)()
        copy.CopyFrom(message)
        self._ids += 1
        copy.alert_id = f"fuzz-{self._ids}"
        if message.alert_id == NEW_ALERT:
            self.alerts.CreateAlert(valid_create(copy.alert_id), timeout=TIMEOUT_S)
        return copy

    def _caller(self, target: Target, messages: list) -> str:
        """A credential that may make the call: for gateway-bound rpcs, the reporter or
        gateway of the first message's gateway when there is one, else gateway 1's."""
        if target.method.startswith(_A):
            return "fuzz-issuer"
        role = "gateway" if target.name == "Subscribe" else "reporter"
        gateway = 1
        first = messages[0] if messages else None
        if first is not None:
            bound = first.hello.gateway_id if target.name == "Subscribe" else first.gateway_id
            gateway = bound if bound in GATEWAYS else 1
        return f"{role}-{gateway}"

    def _call(self, target: Target, caller: str, data: list[bytes]) -> tuple[str, str]:
        channel = self.channels[caller]
        try:
            if target.kind == "unary_unary":
                channel.unary_unary(target.method)(data[0], timeout=TIMEOUT_S)
            elif target.kind == "unary_stream":
                call = channel.unary_stream(target.method)(data[0], timeout=TIMEOUT_S)
                for _ in call:  # the first event shows the handler works; an open
                    call.cancel()  # alert's stream would run for hours
                    break
            elif target.kind == "stream_unary":
                channel.stream_unary(target.method)(iter(data), timeout=TIMEOUT_S)
            else:
                for _ in channel.stream_stream(target.method)(iter(data), timeout=TIMEOUT_S):
                    pass  # the engine ends the stream once the upstream is closed
        except grpc.RpcError as error:
            return error.code().name, error.details() or ""
        return OK, ""

    def exercise(self, target: Target, case: Case) -> Outcome:
        """Makes one call and checks the property; the outcome lists what broke."""
        if self.alert_count() > MAX_ALERTS:
            self._stop()
            self._start()
            self.restarts += 1
        messages = [self._fill(m) for m in case.messages]
        data = [m.SerializeToString() for m in messages]
        if case.mutations is not None:
            for i, changes in enumerate(case.mutations):
                for mutation in changes:
                    data[i] = mutation.apply(data[i])
        caller = self._caller(target, messages)
        self.settle()
        before = self.state()
        logged = len(self.errors.records)

        code, details = self._call(target, caller, data)

        self.settle()
        outcome = Outcome(code, details)
        problems = outcome.problems
        if code != OK and code not in CLEAN:
            problems.append(f"status {code}: {details}")
        elif "metadata size exceeds" in details:  # gRPC's RESOURCE_EXHAUSTED at the client
            problems.append(f"the status message is too long for the client: {details}")
        for record in self.errors.records[logged:]:
            problems.append(f"logged {record.levelname} {record.name}: {record.getMessage()}")
        health = self.health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            problems.append(
                f"health is {health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}"
            )
        try:
            self.alerts.GetAlert(alert_pb2.GetAlertRequest(alert_id="open"), timeout=TIMEOUT_S)
        except grpc.RpcError as error:
            problems.append(f"a normal GetAlert failed afterwards: {error.code().name}")
        # Streams apply message by message: only a failure on the first message must
        # leave everything as it was.
        first_failed = len(data) == 1 or "batch 0" in details
        must_not_change = not target.changes_state or (code != OK and first_failed)
        if must_not_change and self.state() != before:
            problems.append(f"the call ended {code} but changed the engine's state")
        return outcome


# The script.


def run_target(
    world_factory: Callable[[], FuzzWorld], target: Target, mode: str, examples: int, seed: int
) -> dict:
    """Runs ``examples`` generated calls of one rpc in one mode; never raises for a
    broken property (it is counted), so the counts cover every case."""
    codes: collections.Counter[str] = collections.Counter()
    failures: list[dict] = []
    started = time.perf_counter()
    with world_factory() as world:

        @hypothesis_seed(seed)
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(cases(target, mode))
        def fuzz(case: Case) -> None:
            outcome = world.exercise(target, case)
            codes[outcome.code] += 1
            if outcome.problems:
                failures.append({"problems": outcome.problems, "case": repr(case)[:2_000]})

        fuzz()
        restarts = world.restarts
    return {
        "cases": sum(codes.values()),
        "codes": dict(sorted(codes.items())),
        "failures": failures,
        "restarts": restarts,
        "seconds": round(time.perf_counter() - started, 1),
    }


def render_markdown(document: dict) -> str:
    codes = sorted(
        {code for row in document["rpcs"].values() for m in MODES for code in row[m]["codes"]},
        key=lambda code: (code != OK, code),
    )
    lines = [
        "# Fuzzing every rpc",
        "",
        f"`python -m bench.fuzz --examples {document['examples']} --seed {document['seed']}`: "
        f"{document['examples']} generated calls per rpc and mode against a real engine "
        "(typed: random well-typed messages and valid ones with random fields over them; "
        "bytes: mutated encodings). A failure is a status other than OK and the clean "
        "codes, an error logged by the engine, an unhealthy engine afterwards, or a "
        f"failed call that changed state. Wall time {document['seconds']:.0f} s.",
        "",
        "| rpc | mode | cases | " + " | ".join(codes) + " | failures |",
        "|---|---|---:|" + "---:|" * len(codes) + "---:|",
    ]
    for name, row in document["rpcs"].items():
        for mode in MODES:
            result = row[mode]
            counts = " | ".join(str(result["codes"].get(code, 0)) for code in codes)
            lines.append(
                f"| {name} | {mode} | {result['cases']} | {counts} | {len(result['failures'])} |"
            )
    lines += ["", f"Failures: {document['failures']}."]
    for name, row in document["rpcs"].items():
        for mode in MODES:
            for failure in row[mode]["failures"][:3]:
                lines.append(f"- {name} ({mode}): {'; '.join(failure['problems'])[:500]}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2_000, help="calls per rpc and mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rpcs", default="", help="comma-separated rpc names (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    # Bad calls are logged as warnings by design; the fuzzer watches for errors itself.
    logging.basicConfig(level=logging.CRITICAL)

    wanted = {name for name in args.rpcs.split(",") if name}
    targets = [t for t in TARGETS if not wanted or t.name in wanted]
    started = time.perf_counter()
    document: dict = {"examples": args.examples, "seed": args.seed, "rpcs": {}}
    for target in targets:
        row = document["rpcs"].setdefault(target.name, {})
        for mode in MODES:
            row[mode] = run_target(FuzzWorld, target, mode, args.examples, args.seed)
            result = row[mode]
            print(
                f"{target.name:>16} {mode:>5}: {result['cases']} cases in {result['seconds']} s, "
                f"{len(result['failures'])} failures, {result['codes']}",
                flush=True,
            )
    document["failures"] = sum(
        len(row[mode]["failures"]) for row in document["rpcs"].values() for mode in MODES
    )
    document["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.json").write_text(json.dumps(document, indent=1) + "\n")
    (args.out / "fuzz.md").write_text(render_markdown(document))
    return 1 if document["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
