"""Faults the tests inflict on real processes and a real database: a TCP proxy in front of
PostgreSQL that cuts and refuses connections (as a restart or failover looks to clients)."""

from __future__ import annotations

import socket
import threading

import sqlalchemy as sa
from conftest import PG_URL


class FlakyProxy:
    """Forwards 127.0.0.1:<port> to the database; `outage()` cuts and refuses, `restore()` ends it."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._server: socket.socket | None = None

    def restore(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def outage(self) -> None:
        try:  # shutdown wakes the thread blocked in accept(); close alone would leave the socket
            self._server.shutdown(socket.SHUT_RDWR)  # listening until then, so that restore()
        except OSError:                              # could not bind the port again
            pass
        self._server.close()  # new connections are refused
        with self._lock:
            for sock in self._open:  # open ones are cut
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._open.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):  # shutdown sends the FIN (close alone would not, while the other
            try:                 # pump thread still sits in recv on the socket)
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def through(proxy: FlakyProxy) -> str:
    """PG_URL, reached through `proxy`."""
    url = sa.engine.make_url(PG_URL)
    return url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
