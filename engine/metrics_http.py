"""The Prometheus endpoint behind a bearer token, optionally over HTTPS.

Prometheus scrapes it with ``authorization: {type: Bearer, credentials_file: ...}`` and,
for HTTPS, a ``tls_config`` naming the CA. Only operator and issuer credentials may read
it: metrics show per-gateway volumes and alert activity, which is not for partner apps.
"""

from __future__ import annotations

import logging
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from engine.auth import METRICS_ROLES, Credentials, parse_bearer
from engine.tls import ServerTLS

_LOG = logging.getLogger("engine.metrics")

#: Seconds a connection may take to finish its TLS handshake and send its request.
CLIENT_TIMEOUT_S = 10.0


class _Handler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        # With TLS, the handshake runs here, in this connection's own thread, so a slow
        # or silent client never holds up the accept loop.
        do_handshake = getattr(self.connection, "do_handshake", None)
        if do_handshake is not None:
            do_handshake()

    def log_message(self, format: str, *args) -> None:
        pass  # one line per scrape would drown the service log


class MetricsServer(ThreadingMixIn, WSGIServer):
    """The HTTP server; :meth:`shutdown` stops it and closes its socket."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client that hung up, stalled or failed the TLS handshake: not worth a
        # traceback on stderr, which is what socketserver prints by default.
        _LOG.debug("metrics connection from %s failed", client_address[0], exc_info=True)

    def shutdown(self) -> None:
        super().shutdown()
        self.server_close()


def _guarded(app, credentials: Credentials):
    """``app`` behind a bearer token of a role in METRICS_ROLES."""

    def guard(environ, start_response):
        token, problem = parse_bearer(environ.get("HTTP_AUTHORIZATION"))
        credential = credentials.find(token) if token is not None else None
        if credential is None:
            body = (problem or "unknown token").encode() + b"\n"
            start_response(
                "401 Unauthorized",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("WWW-Authenticate", 'Bearer realm="tuanyuan-metrics"'),
                    ("Content-Length", str(len(body))),
                ],
            )
            return [body]
        if credential.role not in METRICS_ROLES:
            body = (
                f"credential {credential.name} has role {credential.role}; metrics are for "
                f"{' and '.join(sorted(METRICS_ROLES))} credentials\n"
            ).encode()
            start_response(
                "403 Forbidden",
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
            )
            return [body]
        return app(environ, start_response)

    return guard


def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    credentials: Credentials,
    tls: ServerTLS | None = None,
) -> tuple[MetricsServer, int]:
    """Serves ``registry`` on ``host:port`` (port 0: a free one) in a daemon thread,
    to operator and issuer tokens only, over HTTPS when ``tls`` is given. Returns the
    server (``shutdown()`` stops it) and the port bound."""
    if not isinstance(credentials, Credentials):
        raise TypeError("serve_metrics needs Credentials: the endpoint is never open")
    context = tls.ssl_context() if tls is not None else None

    server_class = MetricsServer
    if ":" in host:  # an IPv6 address
        server_class = type("MetricsServer6", (MetricsServer,), {"address_family": socket.AF_INET6})
    server = server_class((host, port), _Handler)
    if context is not None:
        server.socket = context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
    server.set_app(_guarded(make_wsgi_app(registry), credentials))
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, server.server_address[1]
