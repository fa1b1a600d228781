"""A gateway whose host vanishes without closing its connection (power cut, network
gone) is noticed by the server's keepalive pings: its stream ends, so it stops counting
as connected and its messages wait for it to subscribe again."""

from __future__ import annotations

import contextlib
import socket
import threading

from grpc_support import wait_until

from engine import client
from engine.server import ServerOptions, ServerThread


class SilentProxy:
    """A TCP proxy that, once :meth:`go_silent` is called, swallows every byte both ways
    and never closes a connection: the far end looks alive and says nothing."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.silent = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def go_silent(self) -> None:
        self.silent.set()

    def close(self) -> None:
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._listener.accept()
            except OSError:
                return
            far = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [near, far]
            for source, sink in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                if not self.silent.is_set():
                    sink.sendall(data)


def test_a_gateway_that_goes_silent_is_dropped_by_keepalive():
    options = ServerOptions(allow_all_callers=True, keepalive_s=0.5, keepalive_timeout_s=0.5)
    with ServerThread(options) as server:
        proxy = SilentProxy(server.port)
        channel = client.connect(f"127.0.0.1:{proxy.port}")
        subscription = client.GatewaySubscription(channel, 1, lambda message, ids: None)
        box = server.engine.dispatcher.outbox(1)
        try:
            wait_until(lambda: box.connection is not None, what="the subscription")
            proxy.go_silent()
            wait_until(lambda: box.connection is None, 20.0, "the silent gateway dropped")
        finally:
            subscription.close(timeout=1)
            channel.close()
            proxy.close()
