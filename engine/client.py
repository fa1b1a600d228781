"""Python clients of the engine's gRPC services, for partner apps, gateways and tools.

- :func:`connect` opens a channel with the engine's message size limits, optionally
  with TLS and a bearer token sent with every call.
- :func:`encode_batch` and :func:`report` stream location batches (arrays straight from
  numpy, without building them value by value).
- :class:`GatewaySubscription` subscribes as a push gateway in a background thread, hands
  each message to a callback with its device ids as a numpy array, and acks it.
- ``alert_stub`` is the generated AlertService stub.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable

import grpc
import numpy as np

from engine import tls as tls_files
from engine import wire
from engine.api import (
    alert_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    location_pb2,
    location_pb2_grpc,
)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_FIELDS = location_pb2.LocationBatch.DESCRIPTOR.fields_by_name


def connect(
    target: str,
    *,
    token: str | None = None,
    tls_ca: str | os.PathLike | None = None,
    tls_cert: str | os.PathLike | None = None,
    tls_key: str | os.PathLike | None = None,
    tls: bool = False,
    allow_cleartext_token: bool = False,
) -> grpc.Channel:
    """A channel to ``host:port``.

    ``token`` goes with every call as ``authorization: Bearer <token>``. With ``tls_ca``
    (the CA of the server's certificate), or ``tls=True`` to trust the system's CAs, the
    channel uses TLS; ``tls_cert`` and ``tls_key`` add a client certificate (mutual TLS).
    A token is refused on a plain channel to anything but a loopback address, where
    anyone on the path could read it, unless ``allow_cleartext_token=True``.
    """
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    secure = tls or tls_ca is not None or tls_cert is not None or tls_key is not None
    if secure:
        credentials = tls_files.channel_credentials(tls_ca, tls_cert, tls_key)
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        if token is not None and not allow_cleartext_token and not is_loopback(target):
            raise ValueError(
                f"refusing to send a token in clear text to {target}: use TLS (tls_ca=...) "
                "or a loopback address"
            )
        channel = grpc.insecure_channel(target, options=options)
    if token is not None:
        channel = grpc.intercept_channel(channel, _BearerToken(token))
    return channel


def is_loopback(target: str) -> bool:
    """Whether a gRPC target names this machine (localhost, 127.0.0.0/8, ::1, unix:)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        target = target.removeprefix(scheme)
    host = target.rpartition(":")[0] if ":" in target else target
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call, of all four kinds.

    An interceptor rather than call credentials: gRPC sends call credentials only over
    TLS, and local engines (the demo, tests) listen on plain loopback.
    """

    def __init__(self, token: str) -> None:
        if not token or any(c.isspace() for c in token):
            raise ValueError("token must be a non-empty string without spaces")
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        metadata = [m for m in details.metadata or () if m[0] != "authorization"]
        metadata.append(self._header)
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


def alert_stub(channel: grpc.Channel) -> alert_pb2_grpc.AlertServiceStub:
    return alert_pb2_grpc.AlertServiceStub(channel)


def encode_batch(
    gateway: int,
    device_ids: np.ndarray,
    lat: np.ndarray,
    lng: np.ndarray,
    observed_at: np.ndarray | None = None,
) -> bytes:
    """A serialized ``LocationBatch``."""
    data = location_pb2.LocationBatch(gateway_id=gateway).SerializeToString()
    data += wire.packed(_FIELDS["device_ids"].number, np.asarray(device_ids, dtype=np.uint64))
    data += wire.packed(_FIELDS["latitudes"].number, np.asarray(lat, dtype=np.float64))
    data += wire.packed(_FIELDS["longitudes"].number, np.asarray(lng, dtype=np.float64))
    if observed_at is not None:
        data += wire.packed(_FIELDS["observed_at"].number, np.asarray(observed_at, np.float64))
    return data


def report(
    channel: grpc.Channel, batches: Iterable[bytes], timeout: float | None = None
) -> location_pb2.ReportSummary:
    """Streams encoded batches (:func:`encode_batch`) through ``ReportLocations``."""
    call = channel.stream_unary(
        "/tuanyuan.v1.LocationService/ReportLocations",
        request_serializer=None,
        response_deserializer=location_pb2.ReportSummary.FromString,
    )
    return call(iter(batches), timeout=timeout)


def forget(channel: grpc.Channel, gateway: int, device_ids: np.ndarray) -> int:
    stub = location_pb2_grpc.LocationServiceStub(channel)
    request = location_pb2.ForgetDevicesRequest(
        gateway_id=gateway, device_ids=np.asarray(device_ids, dtype=np.uint64).tolist()
    )
    return stub.ForgetDevices(request).forgotten


class GatewaySubscription:
    """A push gateway's subscription, running in a background thread.

    ``handle(message, device_ids)`` is called for each message in order, with the
    message's device ids as a uint64 array; the message is acked when it returns (or
    after ``ack_delay_s`` more seconds, to play a slow gateway). :meth:`close` ends
    the stream without acking more; a new subscription for the same gateway resumes
    after the last ack.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        gateway: int,
        handle: Callable[[gateway_pb2.GatewayMessage, np.ndarray], None],
        *,
        max_devices_per_second: float = 0.0,
        max_unacked_messages: int = 0,
        ack_delay_s: float = 0.0,
    ) -> None:
        self.gateway = gateway
        self.error: grpc.RpcError | None = None
        self.last_sequence = 0
        self._handle = handle
        self._ack_delay_s = ack_delay_s
        self._outgoing: queue.Queue = queue.Queue()
        self._outgoing.put(
            gateway_pb2.GatewayUpstream(
                hello=gateway_pb2.Hello(
                    gateway_id=gateway,
                    max_devices_per_second=max_devices_per_second,
                    max_unacked_messages=max_unacked_messages,
                )
            )
        )
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        self._call = stub.Subscribe(self._requests())
        self._thread = threading.Thread(target=self._run, name=f"gateway-{gateway}", daemon=True)
        self._thread.start()

    def _requests(self):
        while (message := self._outgoing.get()) is not None:
            yield message

    def _run(self) -> None:
        try:
            for message in self._call:
                ids = np.array(message.device_ids, dtype=np.uint64)
                self._handle(message, ids)
                if self._ack_delay_s:
                    time.sleep(self._ack_delay_s)
                self.last_sequence = message.sequence
                self._outgoing.put(
                    gateway_pb2.GatewayUpstream(ack=gateway_pb2.Ack(sequence=message.sequence))
                )
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.error = error
        finally:
            self._outgoing.put(None)

    def close(self, timeout: float = 5.0) -> None:
        """Ends the stream (messages being handled are not acked)."""
        self._call.cancel()
        self._thread.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
