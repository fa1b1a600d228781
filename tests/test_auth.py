"""Credentials, roles and the auth interceptor, over a real grpc.aio server on port 0.

The test server registers stand-in handlers under the engine's real method names, so the
interceptor is checked against its real table of who may call what; each handler reports
the caller it sees. Kinds covered: unary, server-streaming (async generator),
client-streaming with raw bytes in, and bidirectional written with ``context.write``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import stat
import threading
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine import auth, client, security_cli
from engine.api import (
    alert_pb2,
    alert_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    location_pb2,
    location_pb2_grpc,
)
from engine.auth import (
    AuthInterceptor,
    Credential,
    Credentials,
    CredentialsError,
    Forbidden,
    RateLimits,
    check_gateway,
    current_caller,
)
from engine.metrics import Metrics
from engine.metrics_http import serve_metrics

# Credentials files.

HASH = "a" * 64


def entry(**fields) -> str:
    lines = ["[[credential]]"]
    for key, value in fields.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


GOOD = (
    entry(name="police-hq", role="issuer", token_sha256="1" * 64, alerts_per_minute=3)
    + entry(name="night-desk", role="operator", token_sha256="2" * 64)
    + entry(name="maps-reporter", role="reporter", gateway=1, token_sha256="3" * 64)
    + entry(name="maps-gateway", role="gateway", gateway=0, token_sha256="4" * 64)
)


def test_a_good_file_loads(tmp_path):
    path = tmp_path / "credentials.toml"
    path.write_text(GOOD)
    credentials = Credentials.load(path)
    by_name = {c.name: c for c in credentials}
    assert len(credentials) == 4
    assert by_name["police-hq"] == Credential("police-hq", "issuer", None, "1" * 64, 3)
    assert by_name["night-desk"].alerts_per_minute is None
    assert by_name["maps-reporter"].gateway == 1
    assert by_name["maps-gateway"].gateway == 0


def test_an_issuer_gets_the_default_rate_and_hashes_are_read_case_blind():
    credentials = Credentials.parse(entry(name="hq", role="issuer", token_sha256="AB" * 32))
    (credential,) = credentials
    assert credential.alerts_per_minute == auth.DEFAULT_ALERTS_PER_MINUTE
    assert credential.token_sha256 == "ab" * 32


BAD = [
    # (file text, words the message must contain)
    (entry(role="issuer", token_sha256=HASH), ["credential 1:", "name"]),
    (entry(name="has space", role="issuer", token_sha256=HASH), ["credential 1", "name"]),
    (entry(name="x", token_sha256=HASH), ["credential 1 ('x')", "role"]),
    (entry(name="x", role="admin", token_sha256=HASH), ["('x')", "role", "'admin'"]),
    (entry(name="x", role="reporter", token_sha256=HASH), ["('x')", "gateway is required"]),
    (entry(name="x", role="gateway", gateway=70000, token_sha256=HASH), ["gateway", "70000"]),
    (entry(name="x", role="gateway", gateway=-1, token_sha256=HASH), ["gateway", "-1"]),
    (entry(name="x", role="gateway", gateway="1", token_sha256=HASH), ["gateway", "'1'"]),
    (entry(name="x", role="gateway", gateway=True, token_sha256=HASH), ["gateway", "True"]),
    (entry(name="x", role="issuer", gateway=1, token_sha256=HASH), ["gateway", "not issuer"]),
    (entry(name="x", role="issuer"), ["('x')", "token_sha256"]),
    (entry(name="x", role="issuer", token_sha256="abc"), ["token_sha256", "64 hex"]),
    (entry(name="x", role="issuer", token_sha256="g" * 64), ["token_sha256"]),
    (entry(name="x", role="issuer", token_sha256=HASH, alerts_per_minute=0), ["alerts_per"]),
    (
        entry(name="x", role="operator", token_sha256=HASH, alerts_per_minute=5),
        ["alerts_per_minute", "only for the issuer"],
    ),
    (entry(name="x", role="issuer", token=HASH), ["('x')", "token is not a known field"]),
    (
        entry(name="x", role="issuer", token_sha256=HASH)
        + entry(name="x", role="operator", token_sha256="b" * 64),
        ["credential 2 ('x')", "name is used"],
    ),
    (
        entry(name="x", role="issuer", token_sha256=HASH)
        + entry(name="y", role="operator", token_sha256=HASH),
        ["credential 2 ('y')", "token_sha256", "'x'"],
    ),
    ("", ["no credentials"]),
    ("[credential]\nname = 'x'\n", ["no credentials"]),
    ("[server]\nport = 1\n", ["server is not a known table"]),
    ("[[credential]\n", ["not valid TOML"]),
]


@pytest.mark.parametrize(("text", "words"), BAD)
def test_each_bad_file_is_refused_naming_credential_and_field(text, words):
    with pytest.raises(CredentialsError) as raised:
        Credentials.parse(text, "creds.toml")
    message = str(raised.value)
    assert message.startswith("creds.toml: ")
    for word in words:
        assert word in message


def test_an_unreadable_file_names_the_path(tmp_path):
    with pytest.raises(CredentialsError, match=r"missing\.toml: cannot read"):
        Credentials.load(tmp_path / "missing.toml")


# Tokens and hashes.


def test_tokens_are_fresh_256_bit_values_known_by_their_sha256():
    tokens = {auth.new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(t) == 43 for t in tokens)  # 32 bytes in URL-safe base64
    assert auth.token_sha256("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_find_returns_the_credential_of_a_token_and_nothing_else():
    (hq, hq_token), (maps, maps_token) = (
        auth.new_credential("hq", "issuer"),
        auth.new_credential("maps", "reporter", 1),
    )
    credentials = Credentials([hq, maps])
    assert credentials.find(hq_token) is hq
    assert credentials.find(maps_token) is maps
    assert credentials.find(hq_token + "x") is None
    assert credentials.find("") is None
    assert credentials.find(hq.token_sha256) is None  # the hash is not the token
    assert hq.token_sha256 not in repr(hq)
    assert hq_token not in auth.to_toml(hq)
    assert Credentials.parse(auth.to_toml(hq) + auth.to_toml(maps)).find(maps_token) == maps


def test_dev_credentials_cover_every_role_and_gateway():
    credentials, tokens = auth.dev_credentials(gateways=(1, 7))
    roles = {(c.name, c.role, c.gateway) for c in credentials}
    assert roles == {
        ("dev-issuer", "issuer", None),
        ("dev-operator", "operator", None),
        ("dev-reporter-1", "reporter", 1),
        ("dev-gateway-1", "gateway", 1),
        ("dev-reporter-7", "reporter", 7),
        ("dev-gateway-7", "gateway", 7),
    }
    for name, token in tokens.items():
        assert credentials.find(token).name == name
    _, again = auth.dev_credentials(gateways=(1, 7))
    assert set(again.values()).isdisjoint(tokens.values())


def test_dev_tokens_are_written_for_the_owner_only(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    _, tokens = auth.dev_credentials()
    auth.write_dev_tokens(path, tokens)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.read_dev_tokens(path) == tokens
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.json"]


def test_check_gateway():
    reporter = auth.Caller("maps-reporter", "reporter", 1, "ipv4:127.0.0.1:1")
    check_gateway(reporter, 1, "report devices")
    with pytest.raises(Forbidden) as raised:
        check_gateway(reporter, 2, "report devices")
    assert str(raised.value) == (
        "credential maps-reporter may only report devices of gateway 1, got gateway 2"
    )
    assert raised.value.status == "PERMISSION_DENIED"
    issuer = auth.Caller("hq", "issuer", None, "ipv4:127.0.0.1:1")
    with pytest.raises(Forbidden, match=r"hq \(issuer\) is not bound to a gateway"):
        check_gateway(issuer, 0, "subscribe to the queue")


def test_current_caller_outside_a_call_fails_closed():
    with pytest.raises(RuntimeError, match="AuthInterceptor"):
        current_caller()


def test_the_interceptor_has_no_accidental_off_switch():
    with pytest.raises(TypeError):
        AuthInterceptor(None)
    credentials, _ = auth.dev_credentials()
    with pytest.raises(ValueError):
        AuthInterceptor(credentials, insecure_allow_all=True)


# A real server with stand-in handlers.

ALERT = "tuanyuan.v1.AlertService"
LOCATION = "tuanyuan.v1.LocationService"
GATEWAY = "tuanyuan.v1.GatewayService"


def _who() -> str:
    caller = current_caller()
    return f"{caller.name}/{caller.role}/{caller.gateway}/{bool(caller.peer)}"


async def _create(request, context):
    try:
        with auth.new_alert_quota() as count:  # every call creates an alert here
            count.keep()
    except auth.RateLimited as error:  # as the engine's servicer answers it
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    return alert_pb2.Alert(alert_id=request.alert_id, schedule_name=_who())


async def _get(request, context):
    return alert_pb2.Alert(alert_id=request.alert_id, schedule_name=_who())


#: Set when a "forever" watch's handler has run its cleanup.
WATCH_CLEANED_UP = threading.Event()


async def _watch(request, context):
    if request.alert_id == "forever":
        try:
            while True:
                yield alert_pb2.AlertEvent(stage_number=1)
                await asyncio.sleep(0.01)
        finally:
            WATCH_CLEANED_UP.set()
    for stage in (1, 2):
        yield alert_pb2.AlertEvent(
            stage_number=stage,
            alert=alert_pb2.Alert(alert_id=request.alert_id, schedule_name=_who()),
        )


async def _report(request_iterator, context):
    caller = current_caller()
    summary = location_pb2.ReportSummary()
    async for raw in request_iterator:  # bytes: this handler has no deserializer
        batch = location_pb2.LocationBatch.FromString(raw)
        try:
            check_gateway(caller, batch.gateway_id, "report devices")
        except Forbidden as error:
            await context.abort(grpc.StatusCode[error.status], str(error))
        summary.batches += 1
        summary.reports += len(batch.device_ids)
    return summary


async def _forget(request, context):
    try:
        check_gateway(current_caller(), request.gateway_id, "forget devices")
    except Forbidden as error:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
    return location_pb2.ForgetDevicesResponse(forgotten=len(request.device_ids))


async def _subscribe(request_iterator, context):
    # Written with context.write, not as a generator, and sends raw bytes.
    first = await anext(aiter(request_iterator))
    try:
        check_gateway(current_caller(), first.hello.gateway_id, "subscribe to the queue")
    except Forbidden as error:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
    for sequence in (1, 2, 3):
        message = gateway_pb2.GatewayMessage(sequence=sequence, alert_id=_who())
        await context.write(message.SerializeToString())


async def _secret(request, context):
    return alert_pb2.Alert(alert_id="secret")


def _handlers():
    return (
        grpc.method_handlers_generic_handler(
            ALERT,
            {
                "CreateAlert": grpc.unary_unary_rpc_method_handler(
                    _create,
                    request_deserializer=alert_pb2.CreateAlertRequest.FromString,
                    response_serializer=alert_pb2.Alert.SerializeToString,
                ),
                "GetAlert": grpc.unary_unary_rpc_method_handler(
                    _get,
                    request_deserializer=alert_pb2.GetAlertRequest.FromString,
                    response_serializer=alert_pb2.Alert.SerializeToString,
                ),
                "WatchAlert": grpc.unary_stream_rpc_method_handler(
                    _watch,
                    request_deserializer=alert_pb2.WatchAlertRequest.FromString,
                    response_serializer=alert_pb2.AlertEvent.SerializeToString,
                ),
                # Not in the contract, so not in METHOD_ROLES: closed to everyone.
                "Secret": grpc.unary_unary_rpc_method_handler(
                    _secret,
                    request_deserializer=alert_pb2.GetAlertRequest.FromString,
                    response_serializer=alert_pb2.Alert.SerializeToString,
                ),
            },
        ),
        grpc.method_handlers_generic_handler(
            LOCATION,
            {
                "ReportLocations": grpc.stream_unary_rpc_method_handler(
                    _report,
                    request_deserializer=None,
                    response_serializer=location_pb2.ReportSummary.SerializeToString,
                ),
                "ForgetDevices": grpc.unary_unary_rpc_method_handler(
                    _forget,
                    request_deserializer=location_pb2.ForgetDevicesRequest.FromString,
                    response_serializer=location_pb2.ForgetDevicesResponse.SerializeToString,
                ),
            },
        ),
        grpc.method_handlers_generic_handler(
            GATEWAY,
            {
                "Subscribe": grpc.stream_stream_rpc_method_handler(
                    _subscribe,
                    request_deserializer=gateway_pb2.GatewayUpstream.FromString,
                    response_serializer=None,
                ),
            },
        ),
    )


class AioServer:
    """A grpc.aio server on its own event loop in a daemon thread, bound to port 0."""

    def __init__(self, interceptor: AuthInterceptor) -> None:
        self.interceptor = interceptor
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _start(self) -> int:
        self.server = grpc.aio.server(interceptors=[self.interceptor])
        self.server.add_generic_rpc_handlers(_handlers())
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self.server)
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def __enter__(self) -> AioServer:
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def channel(self, token: str | None = None) -> grpc.Channel:
        return client.connect(f"127.0.0.1:{self.port}", token=token)


@pytest.fixture(scope="module")
def dev():
    return auth.dev_credentials(gateways=(1, 2))


@pytest.fixture(scope="module")
def server(dev):
    credentials, _ = dev
    refusals: list[auth.Refusal] = []
    with AioServer(AuthInterceptor(credentials, on_refusal=refusals.append)) as running:
        running.refusals = refusals
        yield running


@pytest.fixture(scope="module")
def tokens(dev):
    return dev[1]


def _code(call) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call that must fail."""
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def _create_call(channel, alert_id="a1"):
    return alert_pb2_grpc.AlertServiceStub(channel).CreateAlert(
        alert_pb2.CreateAlertRequest(alert_id=alert_id), timeout=10
    )


def _watch_call(channel):
    stream = alert_pb2_grpc.AlertServiceStub(channel).WatchAlert(
        alert_pb2.WatchAlertRequest(alert_id="a1"), timeout=10
    )
    return [event.alert.schedule_name for event in stream]


def _report_call(channel, *gateways):
    return client.report(
        channel,
        [client.encode_batch(g, [1, 2, 3], [39.9] * 3, [116.4] * 3) for g in gateways],
        timeout=10,
    )


def _subscribe_call(channel, gateway):
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    hello = gateway_pb2.GatewayUpstream(hello=gateway_pb2.Hello(gateway_id=gateway))
    return [m.sequence for m in stub.Subscribe(iter([hello]), timeout=10)]


def test_health_is_open_to_everyone(server):
    stub = health_pb2_grpc.HealthStub(server.channel())
    response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_no_token_is_unauthenticated(server):
    code, details = _code(lambda: _create_call(server.channel()))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert details == "missing credentials: send 'authorization: Bearer <token>'"
    assert server.refusals[-1].code == "UNAUTHENTICATED"
    assert server.refusals[-1].actor == ""
    assert server.refusals[-1].peer.startswith("ipv4:127.0.0.1:")


def test_an_unknown_token_is_unauthenticated(server):
    code, details = _code(lambda: _create_call(server.channel(auth.new_token())))
    assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "unknown token")


@pytest.mark.parametrize(
    "value", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer  ", "token-without-scheme"]
)
def test_a_malformed_authorization_is_unauthenticated(server, value):
    call = alert_pb2_grpc.AlertServiceStub(server.channel()).GetAlert
    code, details = _code(
        lambda: call(alert_pb2.GetAlertRequest(), metadata=[("authorization", value)], timeout=10)
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer <token>" in details


def test_the_right_role_is_admitted_and_the_handler_sees_the_caller(server, tokens):
    alert = _create_call(server.channel(tokens["dev-issuer"]), "a-ok")
    assert alert.alert_id == "a-ok"
    assert alert.schedule_name == "dev-issuer/issuer/None/True"
    get = alert_pb2_grpc.AlertServiceStub(server.channel(tokens["dev-operator"])).GetAlert
    assert get(alert_pb2.GetAlertRequest(alert_id="a"), timeout=10).schedule_name.startswith(
        "dev-operator/operator/"
    )


@pytest.mark.parametrize("name", ["dev-operator", "dev-reporter-1", "dev-gateway-1"])
def test_other_roles_may_not_create_alerts(server, tokens, name):
    code, details = _code(lambda: _create_call(server.channel(tokens[name])))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    role = name.split("-")[1]
    assert f"credential {name} has role {role}" in details
    assert "/tuanyuan.v1.AlertService/CreateAlert" in details
    assert server.refusals[-1].actor == name


def test_server_streaming_is_guarded(server, tokens):
    assert (
        _watch_call(server.channel(tokens["dev-operator"]))
        == ["dev-operator/operator/None/True"] * 2
    )
    code, _ = _code(lambda: _watch_call(server.channel()))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = _code(lambda: _watch_call(server.channel(tokens["dev-reporter-1"])))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_a_stream_the_client_cancels_runs_the_handlers_cleanup(server, tokens):
    stub = alert_pb2_grpc.AlertServiceStub(server.channel(tokens["dev-operator"]))
    stream = stub.WatchAlert(alert_pb2.WatchAlertRequest(alert_id="forever"), timeout=10)
    assert next(stream).stage_number == 1
    stream.cancel()
    assert WATCH_CLEANED_UP.wait(10)


def test_client_streaming_with_raw_bytes_is_guarded_and_bound_to_a_gateway(server, tokens):
    summary = _report_call(server.channel(tokens["dev-reporter-1"]), 1, 1)
    assert (summary.batches, summary.reports) == (2, 6)
    code, details = _code(lambda: _report_call(server.channel(tokens["dev-reporter-1"]), 1, 2))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert (
        details == "credential dev-reporter-1 may only report devices of gateway 1, got gateway 2"
    )
    code, _ = _code(lambda: _report_call(server.channel(tokens["dev-issuer"]), 1))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = _code(lambda: _report_call(server.channel(), 1))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_forget_devices_only_for_the_reporters_gateway(server, tokens):
    stub = location_pb2_grpc.LocationServiceStub(server.channel(tokens["dev-reporter-2"]))
    request = location_pb2.ForgetDevicesRequest(gateway_id=2, device_ids=[5, 6])
    assert stub.ForgetDevices(request, timeout=10).forgotten == 2
    request.gateway_id = 1
    code, details = _code(lambda: stub.ForgetDevices(request, timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "may only forget devices of gateway 2, got gateway 1" in details


def test_bidirectional_streaming_is_guarded_and_bound_to_a_gateway(server, tokens):
    assert _subscribe_call(server.channel(tokens["dev-gateway-2"]), 2) == [1, 2, 3]
    code, details = _code(lambda: _subscribe_call(server.channel(tokens["dev-gateway-2"]), 1))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "may only subscribe to the queue of gateway 2, got gateway 1" in details
    code, _ = _code(lambda: _subscribe_call(server.channel(tokens["dev-reporter-2"]), 2))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = _code(lambda: _subscribe_call(server.channel(auth.new_token()), 2))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_a_method_nobody_listed_is_closed_even_to_issuers(server, tokens):
    call = server.channel(tokens["dev-issuer"]).unary_unary(
        f"/{ALERT}/Secret",
        request_serializer=alert_pb2.GetAlertRequest.SerializeToString,
        response_deserializer=alert_pb2.Alert.FromString,
    )
    code, details = _code(lambda: call(alert_pb2.GetAlertRequest(), timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "is not open to any credential" in details


def test_a_refused_call_is_never_deserialized(server):
    # Garbage that would fail to parse as a CreateAlertRequest: refused for the missing
    # token, not for the bytes.
    call = server.channel().unary_unary(
        f"/{ALERT}/CreateAlert", request_serializer=None, response_deserializer=None
    )
    code, _ = _code(lambda: call(b"\xff\xff\xff\xff", timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_the_create_rate_is_limited_per_issuer():
    now = [1000.0]
    hq, hq_token = auth.new_credential("hq", "issuer", alerts_per_minute=2)
    other, other_token = auth.new_credential("other", "issuer", alerts_per_minute=2)
    limits = RateLimits(clock=lambda: now[0])
    with AioServer(AuthInterceptor(Credentials([hq, other]), limits)) as running:
        channel = running.channel(hq_token)
        _create_call(channel, "a1")
        now[0] += 30
        _create_call(channel, "a2")
        code, details = _code(lambda: _create_call(channel, "a3"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == (
            "credential hq may create at most 2 new alerts a minute; retry in 30 s "
            "(repeating a request for an alert already created is not counted)"
        )
        _create_call(running.channel(other_token), "b1")  # each issuer has its own window
        get = alert_pb2_grpc.AlertServiceStub(channel).GetAlert
        get(alert_pb2.GetAlertRequest(alert_id="a"), timeout=10)  # reads are not limited
        now[0] += 30.5  # the first alert left the window; the refused one never counted
        _create_call(channel, "a3")
        code, _ = _code(lambda: _create_call(channel, "a4"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_insecure_allow_all_admits_everyone_for_handler_tests():
    with AioServer(AuthInterceptor(None, insecure_allow_all=True)) as running:
        alert = _create_call(running.channel())
        assert alert.schedule_name == "insecure/insecure-allow-all/None/True"
        assert _subscribe_call(running.channel(), 9) == [1, 2, 3]


def test_connect_refuses_to_send_a_token_in_clear_text_off_loopback():
    with pytest.raises(ValueError, match="clear text"):
        client.connect("engine.example.org:50051", token="t")
    for target in ("127.0.0.1:1", "localhost:1", "[::1]:1", "dns:///localhost:1", "unix:/x"):
        client.connect(target, token="t").close()
    client.connect("10.0.0.1:1", token="t", allow_cleartext_token=True).close()


# The metrics endpoint.


def _get_metrics(port: int, token: str | None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_metrics_need_an_operator_or_issuer_token(dev):
    credentials, tokens = dev
    metrics = Metrics(lambda: 42)
    server, port = serve_metrics(metrics.registry, "127.0.0.1", 0, credentials)
    try:
        for name in ("dev-operator", "dev-issuer"):
            status, body = _get_metrics(port, tokens[name])
            assert status == 200
            assert "tuanyuan_live_devices 42.0" in body
        status, body = _get_metrics(port, None)
        assert status == 401
        assert "missing credentials" in body
        assert _get_metrics(port, auth.new_token())[0] == 401
        status, body = _get_metrics(port, tokens["dev-reporter-1"])
        assert status == 403
        assert "dev-reporter-1 has role reporter" in body
    finally:
        server.shutdown()
    with pytest.raises(TypeError):
        serve_metrics(metrics.registry, "127.0.0.1", 0, None)


# The commands.


def _run(argv):
    parser = argparse.ArgumentParser(prog="tuanyuan")
    security_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_credentials_new_prints_a_token_once_and_an_entry_with_its_hash(capsys, tmp_path):
    argv = ["credentials", "new", "--name", "maps-reporter", "--role", "reporter"]
    assert _run([*argv, "--gateway", "1"]) == 0
    out, err = capsys.readouterr()
    token = err.strip().splitlines()[-1]
    assert token not in out
    credentials = Credentials.parse(out)
    assert credentials.find(token).gateway == 1

    path = tmp_path / "credentials.toml"
    path.write_text(out)
    assert _run(["credentials", "check", str(path)]) == 0
    assert "1 valid credentials" in capsys.readouterr().out

    assert _run(argv) == 2  # a reporter needs --gateway
    assert "gateway is required" in capsys.readouterr().err


def test_credentials_check_refuses_a_bad_file(capsys, tmp_path):
    path = tmp_path / "credentials.toml"
    path.write_text(GOOD + entry(name="x", role="gateway", gateway=1 << 20, token_sha256=HASH))
    assert _run(["credentials", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tuanyuan: {path}: credential 5 ('x'): gateway")


def test_refusals_are_logged_at_most_once_a_minute_per_source(caplog):
    now = [0.0]
    log = auth._RefusalLog(clock=lambda: now[0])
    refusal = auth.Refusal("/m", "ipv4:10.0.0.9:4242", "", "", "UNAUTHENTICATED", "unknown token")
    with caplog.at_level("WARNING", logger="engine.auth"):
        for port in range(100):  # one host, many connections
            log.refused(auth.Refusal(**{**refusal.__dict__, "peer": f"ipv4:10.0.0.9:{port}"}))
        now[0] = 61.0
        log.refused(refusal)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "99 more UNAUTHENTICATED from ipv4:10.0.0.9 since the last such line" in lines[1]


# Flags of `tuanyuan serve` and the client commands.


def _parsed(add, argv):
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def test_serve_needs_credentials_or_dev(tmp_path):
    args = _parsed(security_cli.add_server_flags, [])
    with pytest.raises(security_cli.SecurityUsageError, match="--credentials FILE"):
        security_cli.server_security(args, dev=False)

    path = tmp_path / "credentials.toml"
    path.write_text(GOOD)
    args = _parsed(security_cli.add_server_flags, ["--credentials", str(path)])
    security = security_cli.server_security(args, dev=False)
    assert len(security.credentials) == 4
    assert (security.tls, security.dev_tokens) == (None, None)

    tokens_path = tmp_path / "private" / "dev-tokens.json"
    args = _parsed(security_cli.add_server_flags, ["--dev-tokens", str(tokens_path)])
    security = security_cli.server_security(args, dev=True, gateways=(1,))
    tokens = auth.read_dev_tokens(tokens_path)
    assert security.dev_tokens == tokens_path
    assert security.credentials.find(tokens["dev-reporter-1"]).gateway == 1
    assert stat.S_IMODE(tokens_path.parent.stat().st_mode) == 0o700

    args = _parsed(security_cli.add_server_flags, ["--dev-tokens", "x", "--tls-cert", "c.pem"])
    with pytest.raises(security_cli.SecurityUsageError, match="together"):
        security_cli.server_security(args, dev=True)


def test_client_tokens_come_from_a_file_the_environment_or_the_dev_tokens(tmp_path, monkeypatch):
    dev_tokens = tmp_path / "dev-tokens.json"
    auth.write_dev_tokens(dev_tokens, {"dev-issuer": "dev-secret", "dev-operator": "op"})
    monkeypatch.setattr(security_cli, "DEFAULT_DEV_TOKENS", dev_tokens)
    monkeypatch.delenv("TUANYUAN_TOKEN", raising=False)
    args = _parsed(security_cli.add_client_flags, [])
    token = security_cli.client_token
    assert token(args, "127.0.0.1:1", "dev-issuer") == "dev-secret"
    assert token(args, "127.0.0.1:1", "dev-operator") == "op"
    assert token(args, "engine.example.org:1", "dev-issuer") is None  # dev tokens stay local
    monkeypatch.setenv("TUANYUAN_TOKEN", "from-env")
    assert token(args, "127.0.0.1:1", "dev-issuer") == "from-env"
    path = tmp_path / "token"
    path.write_text("from-file\n")
    args = _parsed(security_cli.add_client_flags, ["--token-file", str(path)])
    assert token(args, "127.0.0.1:1", "dev-issuer") == "from-file"
    with pytest.raises(security_cli.SecurityUsageError, match="clear text"):
        security_cli.client_channel(args, "engine.example.org:1")
    security_cli.client_channel(args, "127.0.0.1:1").close()
