"""Issue 8, load: 32 clients scraping the real exporter process for 60 seconds, while other clients connect
and send nothing or trickle a request a byte a second. No scrape may fail or be held up by them, no thread
may be left behind, and the exporter's memory must stay flat. The limits behind that (a deadline for each
request head, a bound on connections) are also shown directly, on a server in this process with small
limits, so they take seconds rather than minutes to see."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests
from prometheus_client import CollectorRegistry, Gauge

from sops_nix_exporter.http.server import REQUEST_TIMEOUT_SECONDS, WebServer

from scrape import value
from sopsnix import SAMPLE_SECRETS

CLIENTS = 32
LOAD_SECONDS = 60
IDLE_CLIENTS = 8
TRICKLING_CLIENTS = 4
PARTIAL_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\nAccept: */*\r\nX-Pad: " + b"p" * 64


def hold_idle(port: int, stop: threading.Event, lifetimes: list[float], trickle: bool) -> None:
    """Connect and send nothing (or a byte a second, never finishing the request); note how long the
    server kept each connection open before closing it; connect again."""
    while not stop.is_set():
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            opened = time.monotonic()
            sock.settimeout(1.0)
            sent = 0
            while not stop.is_set():
                if trickle and sent < len(PARTIAL_REQUEST):
                    try:
                        sock.sendall(PARTIAL_REQUEST[sent : sent + 1])
                    except OSError:
                        break
                    sent += 1
                try:
                    if sock.recv(4096) == b"":
                        lifetimes.append(time.monotonic() - opened)
                        break
                except TimeoutError:
                    continue
                except OSError:
                    lifetimes.append(time.monotonic() - opened)
                    break


def test_concurrent_scrapes_and_idle_clients(make_store, pinners, scratch, serve):
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    for _ in range(3):
        store.switch(SAMPLE_SECRETS, keep_generations=0)
    pinners(source=store.symlink, mode="namespace", vm="web", state_dir=state_dir)
    mp = str(store.mountpoint)
    served = serve({"stores": [{"mountpoint": mp, "symlink": str(store.symlink), "keep_generations": 2}],
                    "microvm": {"state_dir": str(state_dir)}})  # fmt: skip
    requests.get(served.url + "/metrics", headers={"Connection": "close"}, timeout=30).raise_for_status()
    time.sleep(0.5)
    threads_before = served.threads()

    stop = threading.Event()
    errors: list[str] = []
    scrapes = [0] * CLIENTS
    probe_latencies: list[float] = []
    rss: list[tuple[float, int]] = []
    thread_counts: list[int] = []

    def client(index: int) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    response = session.get(served.url + "/metrics", timeout=30)
                    if response.status_code != 200 or value(response.text, "sopsnix_generations", mountpoint=mp) != 3:
                        errors.append(f"client {index}: {response.status_code}")
                    scrapes[index] += 1
                except requests.RequestException as exc:
                    errors.append(f"client {index}: {type(exc).__name__}: {exc}")

    def probe() -> None:
        """A scraper like Prometheus: one request a second, each on a new connection."""
        while not stop.is_set():
            start = time.monotonic()
            try:
                requests.get(served.url + "/metrics", headers={"Connection": "close"}, timeout=30).raise_for_status()
                probe_latencies.append(time.monotonic() - start)
            except requests.RequestException as exc:
                errors.append(f"probe: {type(exc).__name__}: {exc}")
            stop.wait(1.0)

    idle_lifetimes: list[float] = []
    trickle_lifetimes: list[float] = []
    workers = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    workers += [threading.Thread(target=hold_idle, args=(served.port, stop, idle_lifetimes, False))
                for _ in range(IDLE_CLIENTS)]  # fmt: skip
    workers += [threading.Thread(target=hold_idle, args=(served.port, stop, trickle_lifetimes, True))
                for _ in range(TRICKLING_CLIENTS)]  # fmt: skip
    workers.append(threading.Thread(target=probe))
    started = time.monotonic()
    for worker in workers:
        worker.start()
    try:
        while time.monotonic() - started < LOAD_SECONDS:
            rss.append((time.monotonic() - started, served.rss_bytes()))
            thread_counts.append(served.threads())
            time.sleep(1.0)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)

    total = sum(scrapes)
    print(f"\n{total} scrapes by {CLIENTS} clients in {LOAD_SECONDS} s; probe latency max "
          f"{max(probe_latencies, default=0):.3f} s; RSS MiB {[round(r / 2**20, 1) for _, r in rss[::10]]}; "
          f"threads {threads_before} -> max {max(thread_counts)}; idle cut at {sorted(idle_lifetimes)[:1]}")
    assert errors == []
    assert min(scrapes) > 10, f"a client was starved: {scrapes}"
    # Slow clients held up nobody: every probe answered far within the request deadline they are cut at.
    assert len(probe_latencies) > LOAD_SECONDS / 2
    assert max(probe_latencies) < REQUEST_TIMEOUT_SECONDS / 2, sorted(probe_latencies)[-5:]
    # The server closed them at the deadline, whether they sent nothing or a byte a second.
    for lifetimes in (idle_lifetimes, trickle_lifetimes):
        assert len(lifetimes) >= 3 and all(REQUEST_TIMEOUT_SECONDS - 1 < t < REQUEST_TIMEOUT_SECONDS + 3 for t in lifetimes), lifetimes
    # One thread per open connection, no more: clients, idle ones, the probe, and the exporter's own.
    assert max(thread_counts) <= threads_before + CLIENTS + IDLE_CLIENTS + TRICKLING_CLIENTS + 1
    # Memory flat: after the first third (warm-up: caches, thread stacks, allocator arenas), it stays put.
    settled = [r for t, r in rss if t >= LOAD_SECONDS / 3]
    growth = settled[-1] - min(settled)
    assert growth < 5 << 20, f"RSS grew by {growth >> 10} KiB over {total} scrapes: {[r >> 20 for _, r in rss]}"

    # No thread left behind once the clients are gone.
    deadline = time.monotonic() + 15
    while served.threads() > threads_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert served.threads() == threads_before
    assert served.process.poll() is None
    assert "Traceback" not in served.log()


# ---------------------------------------------------------------------------------------------------------
# The limits, shown directly with small values


@pytest.fixture
def small_server():
    registry = CollectorRegistry()
    Gauge("sopsnix_test_up", "A metric to serve.", registry=registry).set(1)
    server = WebServer("127.0.0.1:0", registry, request_timeout=1.0, max_connections=4)
    server.start_in_thread()
    yield server
    server.shutdown()


def test_request_deadline_ends_slow_and_silent_connections(small_server):
    port = small_server.port
    silent = socket.create_connection(("127.0.0.1", port))
    trickling = socket.create_connection(("127.0.0.1", port))
    start = time.monotonic()
    closed_after = {}
    for sock in (silent, trickling):
        sock.settimeout(0.05)
    sent = 0
    while len(closed_after) < 2 and time.monotonic() - start < 5:
        if "trickling" not in closed_after and sent < len(PARTIAL_REQUEST):
            try:
                trickling.sendall(PARTIAL_REQUEST[sent : sent + 1])
                sent += 1
            except OSError:
                pass
        for name, sock in (("silent", silent), ("trickling", trickling)):
            if name in closed_after:
                continue
            try:
                if sock.recv(4096) == b"":
                    closed_after[name] = time.monotonic() - start
            except TimeoutError:
                pass
            except OSError:
                closed_after[name] = time.monotonic() - start
    silent.close()
    trickling.close()
    assert set(closed_after) == {"silent", "trickling"}
    assert all(0.8 < t < 2.0 for t in closed_after.values()), closed_after
    assert sent > 3, "the trickling client was cut off only after it had sent several bytes"
    # A kept-alive connection idle between requests is ended by the same deadline.
    with requests.Session() as session:
        assert session.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200
        time.sleep(1.5)
        # The server has closed the idle connection; the client notices and reconnects by itself.
        assert session.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200


def test_connections_are_bounded(small_server):
    """With more idle connections than slots, the server runs no more connection threads than its
    bound; the rest wait in the kernel's queue, and a scrape is served once the deadline frees a slot."""
    port = small_server.port
    baseline = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]
    try:
        time.sleep(0.3)
        assert threading.active_count() - baseline == 4
        start = time.monotonic()
        response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert response.status_code == 200 and "sopsnix_test_up 1.0" in response.text
        # Served after the first idle ones were cut at their deadline (1 s), all 12 ahead of it at most
        # three rounds of four.
        assert time.monotonic() - start < 4.5
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == baseline
