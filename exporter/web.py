"""The HTTP side: /metrics, /healthz and a landing page on /, 404 anywhere else."""

from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from exporter import __version__

log = logging.getLogger("exporter.web")

DEFAULT_PORT = 9785
DEFAULT_LISTEN_ADDRESS = f":{DEFAULT_PORT}"
# A client that stops sending mid-request holds only its own thread, and only this long.
REQUEST_TIMEOUT_SECONDS = 10.0

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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler, registry: CollectorRegistry) -> None:
        host, _ = address
        self.address_family = socket.AF_INET6 if (host == "" or ":" in host) and socket.has_ipv6 else socket.AF_INET
        self.registry = registry
        if host == "":
            address = ("::" if self.address_family == socket.AF_INET6 else "0.0.0.0", address[1])
        super().__init__(address, handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # ':PORT' means every address, IPv4 included.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT_SECONDS
    server_version = f"sops-nix-exporter/{__version__}"
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
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
    def __init__(self, listen_address: str, registry: CollectorRegistry) -> None:
        self.httpd = _Server(parse_listen_address(listen_address), Handler, registry)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="web", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
