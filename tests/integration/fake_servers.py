"""Misbehaving servers for fault tests, on free local ports, without touching the shared
services: a Postgres that accepts connections and never answers, one that asks for a password
and refuses it, and an HTTP proxy in front of OpenSearch that can answer 429/503 on demand."""
from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit


class _Listener:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:  # default: accept and never answer
        pass

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


class SilentPostgres(_Listener):
    """Accepts TCP connections and never sends a byte (a hung server, a black-holing proxy)."""


class PasswordRefusingPostgres(_Listener):
    """Speaks just enough of the Postgres protocol (docs, "Message Flow", 55.2.1) to ask for a
    cleartext password and refuse it with SQLSTATE 28P01, as a server does for a wrong password.
    ``passwords`` collects what clients sent."""

    def __init__(self) -> None:
        self.passwords: list[bytes] = []
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        try:
            head = conn.recv(8)
            (length, code) = struct.unpack("!ii", head)
            if code == 80877103:  # SSLRequest: no SSL here
                conn.sendall(b"N")
                (length,) = struct.unpack("!i", conn.recv(4))
                conn.recv(length - 4)
            else:
                conn.recv(length - 8)
            conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
            kind = conn.recv(1)
            (length,) = struct.unpack("!i", conn.recv(4))
            body = conn.recv(length - 4)
            if kind == b"p":
                self.passwords.append(body.rstrip(b"\0"))
            fields = b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"postgres\"\0\0"
            conn.sendall(b"E" + struct.pack("!i", len(fields) + 4) + fields)
        except (OSError, struct.error):
            pass
        finally:
            conn.close()


class OpenSearchProxy:
    """An HTTP proxy in front of ``upstream`` (the shared OpenSearch). ``fail`` decides per
    request: return an HTTP status (e.g. 503, 429) to answer it with instead of forwarding, or
    None to forward. ``requests`` counts requests seen, ``failed`` those answered with an error."""

    def __init__(self, upstream: str, fail: Callable[[str, str], int | None] = lambda m, p: None) -> None:
        self.fail = fail
        self.requests = 0
        self.failed = 0
        up = urlsplit(upstream)
        host, port = up.hostname or "127.0.0.1", up.port or 9200
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                proxy.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                status = proxy.fail(self.command, self.path)
                if status is not None:
                    proxy.failed += 1
                    payload = b'{"error":"injected by the test proxy","status":%d}' % status
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(host, port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TcpProxy(_Listener):
    """A TCP proxy to ``127.0.0.1:upstream_port`` that the test can turn silent: :meth:`go_silent`
    cuts every proxied connection, and connections accepted from then on get no byte back (a
    server that vanished behind a black-holing network)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.silent = False
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        if self.silent:
            return
        up = socket.create_connection(("127.0.0.1", self.upstream_port))
        self.pairs.append((conn, up))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(conn, up), daemon=True).start()
        pump(up, conn)

    def go_silent(self) -> None:
        self.silent = True
        for a, b in self.pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.go_silent()
        super().close()
