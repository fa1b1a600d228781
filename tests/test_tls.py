"""TLS and mutual TLS over real sockets: a gRPC server with the health service (and one
guarded method), and the metrics endpoint over HTTPS. The certificates come from a
throwaway CA made for this module with the ``cryptography`` package."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import ssl
import threading
import urllib.error
import urllib.request

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine import auth, client, security_cli, tls
from engine.api import alert_pb2, alert_pb2_grpc
from engine.metrics import Metrics
from engine.metrics_http import serve_metrics

# A throwaway PKI.


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject, key, issuer, issuer_key, *, ca=False, server=False):
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder, stem, certificate, key):
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class Pki:
    """Files of a CA, a server certificate for localhost and 127.0.0.1, a client
    certificate from the same CA, and one from another CA."""

    def __init__(self, folder) -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("test CA", ca_key, "test CA", ca_key, ca=True)
        self.ca, _ = _write(folder, "ca", ca, ca_key)
        key = ec.generate_private_key(ec.SECP256R1())
        self.server_cert, self.server_key = _write(
            folder, "server", _certificate("localhost", key, "test CA", ca_key, server=True), key
        )
        key = ec.generate_private_key(ec.SECP256R1())
        self.client_cert, self.client_key = _write(
            folder, "client", _certificate("gateway-1", key, "test CA", ca_key), key
        )
        rogue_key = ec.generate_private_key(ec.SECP256R1())
        key = ec.generate_private_key(ec.SECP256R1())
        self.rogue_cert, self.rogue_key = _write(
            folder, "rogue", _certificate("gateway-1", key, "rogue CA", rogue_key), key
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


# A TLS server: health, and GetAlert behind the auth interceptor.


async def _get(request, context):
    return alert_pb2.Alert(alert_id=auth.current_caller().name)


class TLSServer:
    def __init__(self, credentials: grpc.ServerCredentials, interceptor=None) -> None:
        self.credentials = credentials
        self.interceptor = interceptor
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _start(self) -> int:
        interceptors = [self.interceptor] if self.interceptor else []
        self.server = grpc.aio.server(interceptors=interceptors)
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self.server)
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "tuanyuan.v1.AlertService",
                    {
                        "GetAlert": grpc.unary_unary_rpc_method_handler(
                            _get,
                            request_deserializer=alert_pb2.GetAlertRequest.FromString,
                            response_serializer=alert_pb2.Alert.SerializeToString,
                        )
                    },
                ),
            )
        )
        port = self.server.add_secure_port("127.0.0.1:0", self.credentials)
        await self.server.start()
        return port

    def __enter__(self) -> TLSServer:
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _healthy(channel: grpc.Channel) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    return response.status == health_pb2.HealthCheckResponse.SERVING


def _refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        _healthy(channel)
    return raised.value.code()


def test_tls_server_and_client(pki):
    with TLSServer(tls.server_credentials(pki.server_cert, pki.server_key)) as server:
        target = f"localhost:{server.port}"
        assert _healthy(client.connect(target, tls_ca=pki.ca))
        # A client that does not trust the test CA, and one that does not speak TLS.
        assert _refused(client.connect(target, tls=True)) == grpc.StatusCode.UNAVAILABLE
        assert _refused(client.connect(target)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki):
    credentials = tls.server_credentials(pki.server_cert, pki.server_key, pki.ca)
    with TLSServer(credentials) as server:
        target = f"localhost:{server.port}"
        connect = client.connect
        assert _healthy(
            connect(target, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
        )
        assert _refused(connect(target, tls_ca=pki.ca)) == grpc.StatusCode.UNAVAILABLE
        rogue = connect(target, tls_ca=pki.ca, tls_cert=pki.rogue_cert, tls_key=pki.rogue_key)
        assert _refused(rogue) == grpc.StatusCode.UNAVAILABLE


def test_tokens_travel_over_tls_to_the_interceptor(pki):
    credentials, tokens = auth.dev_credentials(gateways=())
    interceptor = auth.AuthInterceptor(credentials)
    with TLSServer(tls.server_credentials(pki.server_cert, pki.server_key), interceptor) as server:
        target = f"localhost:{server.port}"
        channel = client.connect(target, token=tokens["dev-operator"], tls_ca=pki.ca)
        stub = alert_pb2_grpc.AlertServiceStub(channel)
        assert stub.GetAlert(alert_pb2.GetAlertRequest(), timeout=5).alert_id == "dev-operator"
        anonymous = alert_pb2_grpc.AlertServiceStub(client.connect(target, tls_ca=pki.ca))
        with pytest.raises(grpc.RpcError) as raised:
            anonymous.GetAlert(alert_pb2.GetAlertRequest(), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_bad_tls_files_are_named(pki, tmp_path):
    with pytest.raises(tls.TLSError, match="together"):
        tls.channel_credentials(pki.ca, cert_file=pki.client_cert)
    not_pem = tmp_path / "key.txt"
    not_pem.write_text("hello")
    with pytest.raises(tls.TLSError, match=r"private key .*key\.txt: not a PEM file"):
        tls.server_credentials(pki.server_cert, not_pem)
    with pytest.raises(tls.TLSError, match=r"client CA .*cannot read"):
        tls.server_credentials(pki.server_cert, pki.server_key, tmp_path / "missing.pem")
    with pytest.raises(tls.TLSError, match=r"certificate .* and key"):
        tls.ServerTLS(pki.server_cert, pki.client_key).ssl_context()  # a key of another cert


# The metrics endpoint over HTTPS.


def _scrape(port: int, context: ssl.SSLContext, token: str):
    request = urllib.request.Request(f"https://localhost:{port}/metrics")
    request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_metrics_over_mutual_tls(pki):
    credentials, tokens = auth.dev_credentials(gateways=())
    files = tls.ServerTLS(pki.server_cert, pki.server_key, pki.ca)
    server, port = serve_metrics(Metrics(lambda: 0).registry, "127.0.0.1", 0, credentials, files)
    try:
        context = ssl.create_default_context(cafile=pki.ca)
        context.load_cert_chain(pki.client_cert, pki.client_key)
        assert _scrape(port, context, tokens["dev-operator"]) == 200
        assert _scrape(port, context, "wrong") == 401
        without_cert = ssl.create_default_context(cafile=pki.ca)
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _scrape(port, without_cert, tokens["dev-operator"])
        # The endpoint still serves after a failed handshake.
        assert _scrape(port, context, tokens["dev-issuer"]) == 200
    finally:
        server.shutdown()


def test_serve_flags_check_the_tls_files_at_start(pki, tmp_path):
    parser = argparse.ArgumentParser()
    security_cli.add_server_flags(parser)
    tokens = str(tmp_path / "tokens.json")
    argv = ["--dev-tokens", tokens, "--tls-cert", str(pki.server_cert)]
    args = parser.parse_args(
        [*argv, "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)]
    )
    security = security_cli.server_security(args, dev=True)
    assert security.tls == tls.ServerTLS(pki.server_cert, pki.server_key, pki.ca)
    args = parser.parse_args([*argv, "--tls-key", str(pki.client_key)])
    with pytest.raises(tls.TLSError, match="certificate"):
        security_cli.server_security(args, dev=True)
