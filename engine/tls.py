"""TLS for the engine's gRPC server, its clients and its metrics endpoint.

Files are PEM. A server with a client CA requires every client to present a certificate
signed by it (mutual TLS); bearer tokens are still required on top, since a certificate
says which machine calls, and the token which role it has.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


class TLSError(ValueError):
    """A TLS file that cannot be used; the message names the file and what it should
    hold."""


def _read_pem(path: str | os.PathLike, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise TLSError(f"{what} {path}: cannot read: {error.strerror or error}") from None
    # gRPC only notices a bad file at the first handshake, with a vague message.
    if b"-----BEGIN " not in data:
        raise TLSError(f"{what} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


def server_credentials(
    cert_file: str | os.PathLike,
    key_file: str | os.PathLike,
    client_ca_file: str | os.PathLike | None = None,
) -> grpc.ServerCredentials:
    """Credentials for ``server.add_secure_port``. With ``client_ca_file``, clients must
    present a certificate signed by that CA (mutual TLS)."""
    cert = _read_pem(cert_file, "certificate")
    key = _read_pem(key_file, "private key")
    client_ca = _read_pem(client_ca_file, "client CA") if client_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(
    ca_file: str | os.PathLike | None = None,
    cert_file: str | os.PathLike | None = None,
    key_file: str | os.PathLike | None = None,
) -> grpc.ChannelCredentials:
    """Credentials for ``grpc.secure_channel``: the CA that signed the server's
    certificate (None: the system's CAs), and for mutual TLS the client's certificate
    and key (both or neither)."""
    if (cert_file is None) != (key_file is None):
        raise TLSError("give a client certificate and its key together, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca_file, "CA") if ca_file is not None else None,
        private_key=_read_pem(key_file, "private key") if key_file is not None else None,
        certificate_chain=_read_pem(cert_file, "certificate") if cert_file is not None else None,
    )


@dataclass(frozen=True)
class ServerTLS:
    """A server's TLS files, shared by the gRPC server and the metrics endpoint."""

    cert_file: Path
    key_file: Path
    #: When set, clients must present a certificate signed by this CA.
    client_ca_file: Path | None = None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return server_credentials(self.cert_file, self.key_file, self.client_ca_file)

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context for HTTPS (the metrics endpoint), TLS 1.2 or newer."""
        _read_pem(self.cert_file, "certificate")
        _read_pem(self.key_file, "private key")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as error:
            raise TLSError(
                f"certificate {self.cert_file} and key {self.key_file}: {error.reason or error}"
            ) from None
        if self.client_ca_file is not None:
            _read_pem(self.client_ca_file, "client CA")
            context.load_verify_locations(cafile=self.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context
