"""The HTTP side: /metrics, /healthz and a landing page on /, 404 anywhere else.

One thread per connection, bounded: at most MAX_CONNECTIONS at a time (further ones wait in the kernel's
accept queue, as behind Go's LimitListener), and each one has REQUEST_TIMEOUT_SECONDS to deliver a whole
request head, however slowly it trickles in, and to finish a TLS handshake. A client that connects and
sends nothing, or a byte a second, holds one thread for that long and delays nobody else.

With --web.config.file (exporter/http/webconfig.py): TLS, client certificates and basic authentication.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import select
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from sops_nix_exporter import __version__
from sops_nix_exporter.http.webconfig import BasicAuth, TokenBucket, WebConfigError, WebConfigSource, WebSettings

log = logging.getLogger(__name__)

DEFAULT_PORT = 9785
DEFAULT_LISTEN_ADDRESS = f":{DEFAULT_PORT}"
# A client that stops sending mid-request holds only its own thread, and only this long.
REQUEST_TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS = 128
TLS_HANDSHAKE_RECORD = 0x16
PLAIN_HTTP_TO_TLS = (
    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"
    b"Client sent an HTTP request to an HTTPS server.\n"
)

LANDING_PAGE = """<!doctype html>
<html><head><title>sops-nix exporter</title></head>
<body><h1>sops-nix exporter</h1>
<p>Version {version}. Secrets generations and the generation each VM share serves.</p>
<ul><li><a href="/metrics">Metrics</a></li><li><a href="/healthz">Health</a></li></ul>
</body></html>
"""


class ListenAddressError(ValueError):
    pass


def parse_listen_address(address: str) -> tuple[str, int]:
    """':9785', '0.0.0.0:9785', '127.0.0.1:9785', '[::1]:9785' or 'localhost:9785'."""
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise ListenAddressError(f"--web.listen-address {address!r}: expected HOST:PORT or :PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ListenAddressError(f"--web.listen-address {address!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ListenAddressError(f"--web.listen-address {address!r}: port {port} is out of range")
    return host, port


class _DeadlineReader(io.RawIOBase):
    """Reads a connection, but only until a deadline: a request head that trickles in a byte at a time
    still ends on time. Each read waits at most until the deadline."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.deadline = time.monotonic() + REQUEST_TIMEOUT_SECONDS

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.connection.settimeout(remaining)
        return self.connection.recv_into(buffer)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        handler,
        registry: CollectorRegistry,
        web_config: WebConfigSource | None,
        request_timeout: float,
        max_connections: int,
    ) -> None:
        host, _ = address
        self.address_family = socket.AF_INET6 if (host == "" or ":" in host) and socket.has_ipv6 else socket.AF_INET
        self.registry = registry
        self.web_config = web_config
        self.request_timeout = request_timeout
        self.auth = BasicAuth()
        self.rate_limiter = TokenBucket()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._closing = threading.Event()
        self._config_error_logged: str | None = None
        if host == "":
            address = ("::" if self.address_family == socket.AF_INET6 else "0.0.0.0", address[1])
        super().__init__(address, handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # ':PORT' means every address, IPv4 included.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def process_request(self, request, client_address) -> None:
        # Wait for a free slot; the connections behind this one wait in the kernel's queue meanwhile.
        while not self._slots.acquire(timeout=0.5):
            if self._closing.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        connection = request
        try:
            deadline = time.monotonic() + self.request_timeout
            settings = self._settings()
            if settings is None:
                return
            if settings.tls is not None:
                connection = self._handshake(request, settings, deadline)
                if connection is None:
                    return
            Handler(connection, client_address, self, settings)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(connection or request)
            self._slots.release()

    def _settings(self) -> WebSettings | None:
        if self.web_config is None:
            return WebSettings()
        try:
            settings = self.web_config.settings()
        except WebConfigError as exc:
            if self._config_error_logged != str(exc):
                self._config_error_logged = str(exc)
                log.error("web configuration unusable, refusing connections until it is fixed",
                          extra={"kv": {"err": str(exc)}})  # fmt: skip
            return None
        if self._config_error_logged is not None:
            self._config_error_logged = None
            log.info("web configuration usable again")
        return settings

    def _handshake(self, request: socket.socket, settings: WebSettings, deadline: float) -> ssl.SSLSocket | None:
        """The TLS handshake, in this connection's own thread and against the deadline."""
        assert settings.tls is not None
        request.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            first = request.recv(1, socket.MSG_PEEK)
        except (TimeoutError, OSError):
            return None
        if not first:
            return None
        if first[0] != TLS_HANDSHAKE_RECORD:
            self._refuse_plain_http(request, first)
            return None
        tls = settings.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        tls.setblocking(False)
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    wanted = ([tls], [])
                except ssl.SSLWantWriteError:
                    wanted = ([], [tls])
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not any(select.select(*wanted, [], remaining)[:2]):
                    log.debug("TLS handshake timed out", extra={"kv": {"client": _client(request)}})
                    tls.close()
                    return None
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake failed", extra={"kv": {"client": _client(tls), "err": _ssl_reason(exc)}})
            tls.close()
            return None
        tls.setblocking(True)
        if settings.client_allowed_sans and not _allowed_san(tls, settings.client_allowed_sans):
            log.debug("client certificate has no allowed SAN", extra={"kv": {"client": _client(tls)}})
            tls.close()
            return None
        return tls

    def _refuse_plain_http(self, request: socket.socket, first: bytes) -> None:
        """Answer a plain HTTP request on the TLS port in plain text, as Go's servers do, then close."""
        if not first.isalpha():
            return
        try:
            request.sendall(PLAIN_HTTP_TO_TLS)
            request.shutdown(socket.SHUT_WR)
            # Read what the client sent, so that closing does not reset the connection under our answer.
            request.settimeout(1.0)
            for _ in range(16):
                if not request.recv(65536):
                    break
        except OSError:
            pass
        log.debug("plain HTTP request on the TLS port refused", extra={"kv": {"client": _client(request)}})

    def handle_error(self, request, client_address) -> None:
        # Never the traceback on stderr: a client's misbehaviour is worth a debug line, no more.
        log.debug("connection failed", exc_info=True, extra={"kv": {"client": client_address[0]}})

    def shutdown(self) -> None:
        self._closing.set()
        super().shutdown()


def _client(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or type(exc).__name__
    return type(exc).__name__


def _allowed_san(tls: ssl.SSLSocket, allowed: frozenset[str]) -> bool:
    certificate = tls.getpeercert() or {}
    return any(value in allowed for _, value in certificate.get("subjectAltName", ()))


class Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = f"sops-nix-exporter/{__version__}"
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle the second waits for the client's delayed ACK
    # (about 40 ms on every scrape of a kept-alive connection, which is how Prometheus scrapes).
    disable_nagle_algorithm = True

    def __init__(self, request, client_address, server: _Server, settings: WebSettings) -> None:
        self.settings = settings
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        # The whole request head, and the wait for it on a kept-alive connection, within the timeout.
        self.reader.deadline = time.monotonic() + self.server.request_timeout
        super().handle_one_request()

    def end_headers(self) -> None:
        for name, value in self.settings.headers:
            self.send_header(name, value)
        super().end_headers()

    def _send(self, status: int, body: bytes, content_type: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorized(self) -> bool:
        if not self.settings.auth_required:
            return True
        header = self.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                sep = ""
            if sep and self.server.auth.check(self.settings.users, user, password):
                return True
            log.debug("authentication failed", extra={"kv": {"client": self.client_address[0]}})
        return False

    def do_GET(self) -> None:
        # The response may take its time to leave; the deadline was for the request.
        self.connection.settimeout(self.server.request_timeout)
        if not self.server.rate_limiter.allow(self.settings.rate_limit):
            self._send(429, b"too many requests\n", "text/plain; charset=utf-8")
            return
        if not self._authorized():
            self._send(401, b"unauthorized\n", "text/plain; charset=utf-8", (("WWW-Authenticate", "Basic"),))
            return
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, encoder(self.server.registry), content_type)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/":
            self._send(200, LANDING_PAGE.format(version=__version__).encode(), "text/html; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    do_HEAD = do_GET

    def log_message(self, format: str, *args) -> None:
        log.debug("request", extra={"kv": {"client": self.client_address[0], "line": format % args}})


class WebServer:
    def __init__(
        self,
        listen_address: str,
        registry: CollectorRegistry,
        web_config: WebConfigSource | None = None,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.httpd = _Server(
            parse_listen_address(listen_address), Handler, registry, web_config, request_timeout, max_connections
        )

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def tls(self) -> bool:
        return self.httpd.web_config is not None and self.httpd.web_config.tls

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="web", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
